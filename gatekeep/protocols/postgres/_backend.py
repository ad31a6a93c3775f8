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
already forwarded, so that message passes on unchanged; a header split across
chunks is forwarded or withheld as a whole, never in part. A change of ``hold``
made by the handler takes effect at the next message when the chunk is being
scanned in hold mode, and at the next chunk otherwise.
"""

from __future__ import annotations

import struct
from typing import Callable

from gatekeep.protocols.postgres._codec import MAX_MESSAGE, ProtocolError

#: handler(type, body) -> replacement bytes (whole messages), or None to keep it
Handler = Callable[[bytes, bytes], "bytes | None"]

_HEADER = struct.Struct("!cI")

#: the server messages that may be long: libpq's VALID_LONG_MESSAGE_TYPE (RowDescription, DataRow, CopyData,
#: FunctionCallResponse, ErrorResponse, NoticeResponse, NotificationResponse), and ParameterDescription and
#: ParameterStatus, which drivers other than libpq may meet long
LONG_TYPES = frozenset({b"T", b"D", b"d", b"V", b"E", b"N", b"A", b"t", b"S"})
#: any other message longer than this (libpq's limit too) is a stream that lost its framing: taken as it is,
#: its "body" would carry the messages that follow past every check, and past masking
SHORT_LIMIT = 30000


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

    def forwarded_whole(self) -> bool:
        """Whether what was forwarded so far ends at a message boundary (a message held back is not forwarded)."""
        return not (self._skip or (self._type is not None and not self._held) or (self._hdr and self._hdr_sent))

    def feed(self, data: bytes, later: list | None = None) -> list[bytes]:
        """
        Return what to forward to the client now, as a list of byte strings.

        With ``later``, watched messages of a chunk that passes unchanged are not
        handed to the handler here but appended to ``later`` as (type, body): the
        caller forwards the chunk first and calls :meth:`handle` on them after, so
        the bookkeeping is off the client's critical path. (Framing is still checked
        before anything is returned.)
        """
        if not self.hold and not self._held:
            if not self._hdr and self._type is None:
                self._pass(data, later)
                return [data]
            if self._hdr_sent or not self._hdr:
                self._scan(data, None)
                return [data]
        out: list[bytes] = []
        self._scan(data, out)
        return [chunk for chunk in out if chunk]

    def handle(self, later: list) -> None:
        """Give the handler the watched messages :meth:`feed` put in ``later``, in order."""
        handler = self._handler
        for mtype, body in later:
            handler(mtype, body)

    def _pass(self, data: bytes, later: list | None = None) -> None:
        """
        :meth:`_scan` without hold mode, starting at a message boundary or inside a
        message being skipped: the common case, kept lean (whole messages are
        read in place, the handler gets slices of ``data``).
        """
        n = len(data)
        pos = self._skip
        if pos:
            if pos >= n:
                self._skip = pos - n
                return
            self._skip = 0
        interesting, unpack, handler, limit = self.interesting, _HEADER.unpack_from, self._handler, self._max
        while pos + 5 <= n:
            mtype, length = unpack(data, pos)
            if length < 4 or length > limit or (length > SHORT_LIMIT and mtype not in LONG_TYPES):
                raise ProtocolError(f"server message {mtype!r} has an invalid length {length}")
            end = pos + 1 + length
            if end > n:
                if mtype in interesting:
                    self._type = mtype
                    self._header = data[pos:pos + 5]
                    self._body = bytearray(data[pos + 5:])
                    self._need = end - n
                    self._held = False
                else:
                    self._skip = end - n
                return
            if mtype in interesting:
                if later is None:
                    handler(mtype, data[pos + 5:end])
                else:
                    later.append((mtype, data[pos + 5:end]))
            pos = end
        if pos < n:
            self._hdr = data[pos:]
            self._hdr_sent = True

    def _scan(self, data: bytes, out: list[bytes] | None) -> None:
        """
        Follow message boundaries through ``data``. With ``out`` (hold mode) the
        bytes to forward are appended to it: verbatim regions as slices of
        ``data``, held messages whole (or their replacement) once complete.
        Without ``out`` the caller forwards ``data`` as it is.
        """
        n = len(data)
        pos = 0
        # start of the verbatim region not yet appended to out; None inside a held message
        seg: int | None = None if self._held else 0
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
                if self._need == 0 and self._finish(out):
                    seg = pos
                continue
            # at a message boundary; seg is not None here
            start = pos
            carried = self._hdr
            header = carried + data[pos:pos + 5 - len(carried)]
            pos += len(header) - len(carried)
            # a header carried over from the last chunk that was not forwarded yet
            withheld = bool(carried) and not self._hdr_sent
            if len(header) < 5:
                self._hdr = header
                if out is None:
                    self._hdr_sent = True  # feed() forwards the whole chunk
                elif carried and self._hdr_sent:
                    pass  # its start was forwarded: so is the rest (verbatim, from seg)
                elif self.hold:
                    out.append(data[seg:start])
                    seg = None
                    self._hdr_sent = False
                else:
                    if withheld:
                        out.append(carried)  # start == 0: nothing of data precedes it
                    self._hdr_sent = True
                break
            self._hdr = b""
            self._hdr_sent = False
            mtype = header[0:1]
            length = int.from_bytes(header[1:5], "big")
            if length < 4 or length > self._max or (length > SHORT_LIMIT and mtype not in LONG_TYPES):
                raise ProtocolError(f"server message {mtype!r} has an invalid length {length}")
            body_len = length - 4
            if mtype in interesting:
                # hold it only if none of it was forwarded yet
                held = out is not None and self.hold and (not carried or withheld)
            else:
                held = False
            if withheld and not held and out is not None:
                # a header held back now passes on; it precedes this chunk (start == 0)
                out.append(carried)
            if held:
                out.append(data[seg:start])
                seg = None
            if mtype in interesting:
                self._type = mtype
                self._header = header
                self._body = bytearray()
                self._need = body_len
                self._held = held
                if body_len == 0 and self._finish(out):
                    seg = pos
            else:
                self._skip = body_len
        if out is not None and seg is not None and seg < n:
            out.append(data[seg:n])

    def _finish(self, out: list[bytes] | None) -> bool:
        """A watched message is complete: call the handler; True if it was held (and is now in out)."""
        mtype, body, held = self._type, bytes(self._body), self._held
        self._type = None
        self._held = False
        self._body = bytearray()
        replacement = self._handler(mtype, body)
        if held and out is not None:
            out.append(self._header + body if replacement is None else replacement)
            return True
        return False
