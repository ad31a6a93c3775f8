"""
The server-to-client stream, sans-IO.

Most of what a PostgreSQL server sends (DataRow, CopyData) passes through
untouched: the stream forwards each chunk as it arrives and only tracks message
boundaries, collecting the bodies of the few message types the relay asked for
(CommandComplete, ErrorResponse, ReadyForQuery, ...). A DataRow split over many
chunks costs nothing but its header.

When ``hold`` is on, the messages the relay asked for are held back until they
are complete and the relay's handler may replace them: that is how a poisoned
statement's error becomes gatekeep's denial, and later how masking rewrites
DataRows. Bytes of a message that began before ``hold`` was turned on were
already forwarded, so that message passes on unchanged.
"""

from __future__ import annotations

from typing import Callable

from gatekeep.protocols.postgres._codec import MAX_MESSAGE, ProtocolError

#: handler(type, body) -> replacement bytes (whole messages), or None to keep it
Handler = Callable[[bytes, bytes], "bytes | None"]


class BackendStream:
    def __init__(self, interesting: set[bytes], handler: Handler, max_length: int = MAX_MESSAGE) -> None:
        self.interesting = interesting
        self.hold = False
        self._handler = handler
        self._max = max_length
        self._skip = 0
        # a header split across chunks
        self._hdr = b""
        self._hdr_sent = False
        # the interesting message being collected
        self._type: bytes | None = None
        self._header = b""
        self._body = bytearray()
        self._need = 0
        self._held = False

    def at_boundary(self) -> bool:
        return not (self._skip or self._hdr or self._type is not None)

    def feed(self, data: bytes) -> list[bytes]:
        """Return what to forward to the client now, as a list of byte strings."""
        if not self.hold and not self._held and not (self._hdr and not self._hdr_sent):
            self._scan(data, None)
            return [data]
        out: list[bytes] = []
        self._scan(data, out)
        return out

    def _scan(self, data: bytes, out: list[bytes] | None) -> None:
        n = len(data)
        pos = 0
        seg: int | None = 0  # start of the verbatim region not yet emitted (hold mode)
        interesting = self.interesting
        while pos < n:
            if self._skip:
                step = self._skip if self._skip < n - pos else n - pos
                pos += step
                self._skip -= step
                continue
            if self._type is not None:
                step = self._need if self._need < n - pos else n - pos
                self._body += data[pos:pos + step]
                pos += step
                self._need -= step
                if self._need == 0:
                    done = self._finish(out)
                    if done is not None:
                        seg = pos
                continue
            # at a message boundary
            start = pos
            carried = self._hdr
            if carried:
                take = 5 - len(carried)
                header = carried + data[pos:pos + take]
                pos += len(header) - len(carried)
            else:
                header = data[pos:pos + 5]
                pos += len(header)
            if len(header) < 5:
                self._hdr = header
                if out is not None and seg is not None:
                    if self.hold:
                        out.append(data[seg:start])
                        self._hdr_sent = False
                    else:
                        out.append(data[seg:n])
                        self._hdr_sent = True
                    seg = None
                elif out is None:
                    self._hdr_sent = True
                return
            self._hdr = b""
            mtype = header[0:1]
            length = int.from_bytes(header[1:5], "big")
            if length < 4 or length > self._max:
                raise ProtocolError(f"server message {mtype!r} has an invalid length {length}")
            body_len = length - 4
            held_before = carried and not self._hdr_sent
            if mtype in interesting:
                holdable = out is not None and self.hold and (not carried or held_before)
                if holdable and seg is not None:
                    out.append(data[seg:start])
                if held_before and not holdable and out is not None:
                    out.append(carried)
                self._type = mtype
                self._header = header
                self._body = bytearray()
                self._need = body_len
                self._held = holdable
                if holdable:
                    seg = None
                if body_len == 0:
                    done = self._finish(out)
                    if done is not None:
                        seg = pos
            else:
                if held_before and out is not None:
                    # a header we held back turned out to be uninteresting
                    out.append(carried)
                    if seg is None:
                        seg = start
                self._skip = body_len
        if out is not None and seg is not None and seg < n:
            out.append(data[seg:n])

    def _finish(self, out: list[bytes] | None) -> bool | None:
        mtype, body, held = self._type, bytes(self._body), self._held
        self._type = None
        self._held = False
        self._body = bytearray()
        replacement = self._handler(mtype, body)
        if held and out is not None:
            out.append(self._header + body if replacement is None else replacement)
            return True
        return None
