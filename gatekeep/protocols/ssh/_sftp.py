"""
The SFTP stream (draft-ietf-secsh-filexfer-02, version 3, as OpenSSH speaks
it), framed in both directions and judged request by request.

:class:`SftpStream` is sans-IO. Feed it what the client sends
(:meth:`~SftpStream.from_client`) and what the server sends
(:meth:`~SftpStream.from_server`); take the bytes to pass on from
``to_server`` and ``to_client``. Requests that change or read files (open,
remove, rename, mkdir, rmdir, setstat, symlink, link, opendir) wait in
``pending`` until :meth:`~SftpStream.decided` is called for each; everything
the client sends after one waits with it, so requests reach the server in
order. A denied request is answered with ``SSH_FX_PERMISSION_DENIED`` and never
reaches the server.

Relative paths are made absolute against the session's starting folder,
which gatekeep asks the server for itself: once the server's VERSION has
passed, it sends its own ``REALPATH "."`` (request id :data:`HOME_ID`) and
keeps the reply from the client. A judged request with a relative path waits
(with everything after it) until that folder is known; if the server cannot
say, the path stays relative and policy refuses it as unjudgeable.

SFTP replies name their request by id only, and gatekeep ties replies to requests by it (handles to the
path they were opened on, the starting folder to a ``REALPATH "."``): a client request reusing the id of one
still unanswered, or gatekeep's own id before gatekeep's answer came, is an :class:`SftpError`.

Only the heads of the two bulk packets (WRITE and DATA) are read; their
payload is passed on as it arrives, so a transfer costs a header parse per
packet. Judged requests end up in ``finished`` with their status and, for
files, the bytes read and written through the handle.
"""

from __future__ import annotations

import functools
import posixpath
import struct
from collections import deque
from typing import Any, Callable

import attrs

from gatekeep.protocols.ssh.policy import UNKNOWN_EXTENSION, SftpRequest, normalize_path

INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, \
    REALPATH, STAT, RENAME, READLINK, SYMLINK = range(1, 21)
EXTENDED = 200
STATUS, HANDLE, DATA, NAME, ATTRS = range(101, 106)
EXTENDED_REPLY = 201

FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE = range(5)
STATUS_TEXT = {0: "ok", 1: "eof", 2: "no such file", 3: "permission denied", 4: "failure", 5: "bad message",
               6: "no connection", 7: "connection lost", 8: "unsupported"}

PF_READ, PF_WRITE, PF_APPEND, PF_CREAT, PF_TRUNC, PF_EXCL = 1, 2, 4, 8, 16, 32

#: the largest non-bulk packet gatekeep frames whole
MAX_PACKET = 1024 * 1024
#: the longest handle a server may give (draft-ietf-secsh-filexfer-02: "MUST NOT be longer than 256 bytes")
MAX_HANDLE = 256
#: the request id of gatekeep's own ``REALPATH "."`` (a client's request with this id while it is out is refused)
HOME_ID = 0xFFFFFFFF


class SftpError(ValueError):
    """The stream is not SFTP gatekeep can follow (the channel is closed)."""


def _malformed_is_sftp_error(method: Callable) -> Callable:
    """A packet too short for the fields its type has (``struct.error`` while reading it) is an SftpError."""

    @functools.wraps(method)
    def call(self: Any, *args: Any) -> Any:
        try:
            return method(self, *args)
        except struct.error as e:
            raise SftpError(f"a packet is too short for its fields ({e})") from None

    return call


def _ns(buf: bytes, off: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">L", buf, off)
    end = off + 4 + n
    if end > len(buf):
        raise SftpError("a string runs past the end of its packet")
    return buf[off + 4:end], end


#: requests judged by the one path they name, and by two
_ONE_PATH = {REMOVE: "remove", MKDIR: "mkdir", RMDIR: "rmdir", SETSTAT: "setstat", OPENDIR: "list"}
_TWO_PATHS = {RENAME: "rename", SYMLINK: "symlink"}
#: extended requests judged by their paths: (operation, how many paths)
_EXTENDED = {b"posix-rename@openssh.com": ("rename", 2), b"hardlink@openssh.com": ("link", 2),
             b"lsetstat@openssh.com": ("setstat", 1)}
#: extended requests passed without a decision: OpenSSH's that only tell the client something (about the file
#: system, limits, paths, users) or act on handles of opens already judged. Any other extension is unjudgeable: a
#: server may act on paths inside it that gatekeep cannot find (``copy-file`` names two).
_PASSED_EXTENSIONS = frozenset({b"statvfs@openssh.com", b"fstatvfs@openssh.com", b"fsync@openssh.com",
                                b"limits@openssh.com", b"expand-path@openssh.com", b"home-directory",
                                b"users-groups-by-id@openssh.com", b"copy-data"})


def _judged(kind: int, p: bytes) -> tuple[str, list[bytes]] | None:
    """The operation a client packet is judged as and the paths it names (as sent); None: not judged by path."""
    if kind == OPEN:
        path, off = _ns(p, 9)
        (flags,) = struct.unpack_from(">L", p, off)
        return ("write" if flags & (PF_WRITE | PF_APPEND | PF_CREAT | PF_TRUNC) else "read"), [path]
    op = _ONE_PATH.get(kind)
    if op is not None:
        return op, [_ns(p, 9)[0]]
    count = 2 if kind in _TWO_PATHS else 0
    off = 9
    if count:
        op = _TWO_PATHS[kind]
    elif kind == EXTENDED:
        name, off = _ns(p, 9)
        op, count = _EXTENDED.get(name, ("", 0))
    if not count:
        return None
    paths = []
    for _ in range(count):
        path, off = _ns(p, off)
        paths.append(path)
    return op, paths


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def status_packet(request_id: int, code: int, message: str) -> bytes:
    # the message names the path as the client sent it, bytes that are not UTF-8 included (surrogateescape):
    # SFTP wants UTF-8 text, so those become U+FFFD
    msg = message.encode("utf-8", "replace")
    body = struct.pack(">BLL", STATUS, request_id, code) + struct.pack(">L", len(msg)) + msg + struct.pack(">L", 2) + b"en"
    return struct.pack(">L", len(body)) + body


@attrs.define
class Pending:
    """A judged request waiting for (or past) its decision. ``ref`` is the driver's (its Operation)."""

    id: int
    request: SftpRequest
    raw: bytes
    ref: Any = None


@attrs.define
class OpenFile:
    pending: Pending
    read: int = 0
    written: int = 0


@attrs.define
class Finished:
    pending: Pending
    ok: bool
    status: str
    extra: dict[str, Any]


class SftpStream:
    def __init__(self) -> None:
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.pending: deque[Pending] = deque()
        self.finished: list[Finished] = []
        self.home: str | None = None
        # client -> server
        self._chead = b""
        self._crest = 0
        self._held: list[bytes] | None = None
        # server -> client
        self._shead = b""
        self._srest = 0
        self._inject: list[bytes] = []
        # bookkeeping
        self._handles: dict[bytes, OpenFile] = {}
        self._opening: dict[int, Pending] = {}
        self._waiting: dict[int, Pending] = {}
        self._reads: dict[int, OpenFile] = {}
        self._realpath_dot: set[int] = set()
        self._closing: dict[int, OpenFile] = {}
        #: ids of the client's requests not answered yet (by the server or by a denial)
        self._unanswered: set[int] = set()
        self._undecided = 0
        #: the starting folder: "unknown" (not asked yet), "asking", "known" or "failed"
        self.home_state = "unknown"
        self._waiting_home = False  # client bytes are held until the starting folder is known
        self._version_seen = False

    # -- client -> server -------------------------------------------------------------

    @property
    def blocked(self) -> bool:
        return self._held is not None

    @property
    def held_bytes(self) -> int:
        return sum(len(b) for b in self._held) if self._held else 0

    @_malformed_is_sftp_error
    def from_client(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        self._client(data)

    def _client(self, data: bytes) -> None:
        i, n = 0, len(data)
        out = self.to_server
        while i < n:
            if self._crest:
                k = min(self._crest, n - i)
                out.append(data[i:i + k] if (i or k < n) else data)
                self._crest -= k
                i += k
                continue
            head = self._chead
            while True:
                need = self._need_client(head)
                if len(head) >= need:
                    break
                if i >= n:
                    self._chead = head
                    return
                k = min(need - len(head), n - i)
                head += data[i:i + k]
                i += k
            self._chead = b""
            packet = head
            length, kind = struct.unpack_from(">LB", head)
            if kind == WRITE:
                self._request_id(packet)
                self._write_head(packet)
                out.append(packet)
                self._crest = 4 + length - len(packet)
                continue
            if self._home_missing(kind, packet):
                # a relative path before the starting folder is known: it and everything after wait for it
                rest = data[i:]
                self._held = [packet, rest] if rest else [packet]
                self._waiting_home = True
                return
            if self._client_packet(kind, packet):
                # judged: everything after waits for the decision
                rest = data[i:]
                self._held = [rest] if rest else []
                return
        if self.home_state == "unknown" and self._version_seen:
            self._ask_home()

    @staticmethod
    def _need_client(head: bytes) -> int:
        """How many bytes of a client packet gatekeep reads before passing it on."""
        if len(head) < 5:
            return 5
        length, kind = struct.unpack_from(">LB", head)
        if kind != WRITE:
            if length > MAX_PACKET:
                raise SftpError(f"client packet of {length} bytes")
            return 4 + length
        if len(head) < 13:
            return min(13, 4 + length)
        (hlen,) = struct.unpack_from(">L", head, 9)
        if hlen > MAX_HANDLE:  # what gatekeep reads before passing a WRITE on stays small
            raise SftpError(f"a WRITE with a handle of {hlen} bytes")
        return min(13 + hlen + 12, 4 + length)

    def _need_server(self, head: bytes) -> int:
        if len(head) < 5:
            return 5
        length, kind = struct.unpack_from(">LB", head)
        if len(head) < 9:
            return min(9, 4 + length)
        (rid,) = struct.unpack_from(">L", head, 5)
        if kind == DATA:
            return min(13, 4 + length)
        if kind in (STATUS, HANDLE) or (kind == NAME and (rid in self._realpath_dot or rid == HOME_ID)):
            if length > MAX_PACKET:
                raise SftpError(f"server packet of {length} bytes")
            return 4 + length
        return min(9, 4 + length)

    def _write_head(self, packet: bytes) -> None:
        handle, off = _ns(packet, 9)
        if off + 12 <= len(packet):
            (dlen,) = struct.unpack_from(">L", packet, off + 8)
            f = self._handles.get(handle)
            if f is not None:
                f.written += dlen

    def _home_missing(self, kind: int, p: bytes) -> bool:
        """A judged request naming a relative path while the starting folder is still to come."""
        if self.home is not None or self.home_state == "failed" or kind == INIT:
            return False
        judged = _judged(kind, p)
        return judged is not None and any(not path.startswith(b"/") for path in judged[1])

    def _ask_home(self) -> None:
        """Send gatekeep's own ``REALPATH "."`` (at a packet boundary of the client's stream)."""
        if self._crest:
            return  # in the middle of a WRITE's data: asked once it has passed (see _client)
        self.home_state = "asking"
        body = struct.pack(">BL", REALPATH, HOME_ID) + struct.pack(">L", 1) + b"."
        self.to_server.append(struct.pack(">L", len(body)) + body)

    def _home_settled(self) -> None:
        """The starting folder is known (or cannot be): requests that waited for it go on. (gatekeep's own
        question stays "asking" until its own answer comes: that answer is never the client's to see.)"""
        if not self._waiting_home:
            return
        self._waiting_home = False
        self._release_held()

    def _release_held(self) -> None:
        """Go on with the client's bytes held behind a request; those after another request that waits stay held."""
        held, self._held = self._held, None
        for chunk in held or ():
            if self._held is not None:
                self._held.append(chunk)
            else:
                self._client(chunk)

    def _request_id(self, p: bytes) -> int:
        """The id of a client request, now unanswered: SftpError when replies to it could be taken for another's."""
        (rid,) = struct.unpack_from(">L", p, 5)
        if rid == HOME_ID and self.home_state in ("unknown", "asking"):
            raise SftpError(f"the client used request id {HOME_ID}, which gatekeep is using")
        if rid in self._unanswered:
            raise SftpError(f"the client reused request id {rid} while its request is unanswered")
        self._unanswered.add(rid)
        return rid

    def _client_packet(self, kind: int, p: bytes) -> bool:
        """Pass on or hold one whole client packet; True when it waits for a decision."""
        if kind == INIT:
            self.to_server.append(p)
            return False
        rid = self._request_id(p)
        req: SftpRequest | None = None
        judged = _judged(kind, p)
        if judged is not None and kind == SYMLINK:
            # OpenSSH sends the target, then the link; a relative target is resolved against the link's folder
            target, link = judged[1][0], self._path(judged[1][1])
            req = SftpRequest("symlink", normalize_path(_text(target), posixpath.dirname(link)), link)
        elif judged is not None:
            op, paths = judged
            req = SftpRequest(op, *(self._path(path) for path in paths))
        elif kind == FSETSTAT:
            handle, _ = _ns(p, 9)
            f = self._handles.get(handle)
            req = SftpRequest("setstat", f.pending.request.path if f is not None else "(unknown handle)")
        elif kind == CLOSE:
            handle, _ = _ns(p, 9)
            f = self._handles.pop(handle, None)
            if f is not None:
                # finished when the server answers, after the replies to earlier reads
                self._closing[rid] = f
        elif kind == READ:
            handle, _ = _ns(p, 9)
            f = self._handles.get(handle)
            if f is not None:
                self._reads[rid] = f
        elif kind == REALPATH:
            path, _ = _ns(p, 9)
            if path in (b".", b""):
                self._realpath_dot.add(rid)
        elif kind == EXTENDED:
            name, _ = _ns(p, 9)
            if name not in _PASSED_EXTENSIONS:
                req = SftpRequest(UNKNOWN_EXTENSION, _text(name))
        if req is None:
            self.to_server.append(p)
            return False
        self.pending.append(Pending(rid, req, p))
        self._undecided += 1
        return True

    def _path(self, raw: bytes) -> str:
        return normalize_path(_text(raw), self.home)

    @_malformed_is_sftp_error
    def decided(self, pending: Pending, allowed: bool, message: str = "") -> None:
        """
        The decision for ``pending`` (the oldest undecided request). The client's bytes held behind it go on:
        SftpError when they are not SFTP gatekeep can follow.
        """
        if self.pending and self.pending[0] is pending:
            self.pending.popleft()
        self._undecided -= 1
        if allowed:
            self.to_server.append(pending.raw)
            if pending.raw[4] in (OPEN, OPENDIR):
                self._opening[pending.id] = pending
            else:
                self._waiting[pending.id] = pending
        else:
            self._unanswered.discard(pending.id)
            self._to_client(status_packet(pending.id, FX_PERMISSION_DENIED, message or "denied by gatekeep"))
            self.finished.append(Finished(pending, False, "denied", {}))
        self._release_held()

    # -- server -> client ---------------------------------------------------------------

    @_malformed_is_sftp_error
    def from_server(self, data: bytes) -> None:
        i, n = 0, len(data)
        out = self.to_client
        while i < n:
            if self._srest:
                k = min(self._srest, n - i)
                out.append(data[i:i + k] if (i or k < n) else data)
                self._srest -= k
                i += k
                if not self._srest:
                    self._flush_inject()
                continue
            head = self._shead
            while True:
                need = self._need_server(head)
                if len(head) >= need:
                    break
                if i >= n:
                    self._shead = head
                    return
                k = min(need - len(head), n - i)
                head += data[i:i + k]
                i += k
            self._shead = b""
            packet = head
            length, kind = struct.unpack_from(">LB", head)
            rid = struct.unpack_from(">L", head, 5)[0] if len(head) >= 9 else 0
            if kind in (NAME, STATUS) and rid == HOME_ID and self.home_state == "asking":
                self._own_reply(kind, packet)  # gatekeep's own question: the client never sees the answer
                self._flush_inject()
                continue
            self._server_packet(kind, rid, packet, length)
            out.append(packet)
            self._srest = 4 + length - len(packet)
            if not self._srest:
                self._flush_inject()

    def _own_reply(self, kind: int, p: bytes) -> None:
        name = b""
        if kind == NAME and struct.unpack_from(">L", p, 9)[0] >= 1:
            name, _ = _ns(p, 13)
        if name.startswith(b"/") and self.home is None:
            self.home = _text(name)
        # without one, relative paths stay relative: policy refuses them
        self.home_state = "known" if self.home is not None else "failed"
        self._home_settled()

    def _server_packet(self, kind: int, rid: int, p: bytes, length: int) -> None:
        if kind != VERSION:
            self._unanswered.discard(rid)
        if kind == VERSION:
            self._version_seen = True
            if self.home_state == "unknown" and self.home is None:
                self._ask_home()
        elif kind == DATA:
            f = self._reads.pop(rid, None)
            if f is not None and len(p) >= 13:
                f.read += struct.unpack_from(">L", p, 9)[0]
        elif kind == HANDLE:
            pending = self._opening.pop(rid, None)
            if pending is not None:
                handle, _ = _ns(p, 9)
                self._handles[handle] = OpenFile(pending)
        elif kind == STATUS:
            (code,) = struct.unpack_from(">L", p, 9)
            self._reads.pop(rid, None)
            closing = self._closing.pop(rid, None)
            if closing is not None:
                self.finished.append(Finished(closing.pending, True, "closed",
                                              {"bytes_read": closing.read, "bytes_written": closing.written}))
            pending = self._opening.pop(rid, None) or self._waiting.pop(rid, None)
            if pending is not None:
                self.finished.append(Finished(pending, code == FX_OK, STATUS_TEXT.get(code, f"status {code}"), {}))
        elif kind == NAME and rid in self._realpath_dot:
            self._realpath_dot.discard(rid)
            (count,) = struct.unpack_from(">L", p, 9)
            if count >= 1:
                name, _ = _ns(p, 13)
                if name.startswith(b"/"):
                    self.home = _text(name)
                    if self._waiting_home:
                        self._home_settled()

    def _to_client(self, packet: bytes) -> None:
        if self._srest or self._shead:
            self._inject.append(packet)
        else:
            self.to_client.append(packet)

    def _flush_inject(self) -> None:
        if self._inject:
            self.to_client.extend(self._inject)
            self._inject.clear()

    # -- output ---------------------------------------------------------------------------

    def take_to_server(self) -> bytes:
        out, self.to_server = self.to_server, []
        return out[0] if len(out) == 1 else b"".join(out)

    def take_to_client(self) -> bytes:
        out, self.to_client = self.to_client, []
        return out[0] if len(out) == 1 else b"".join(out)

    def take_finished(self) -> list[Finished]:
        out, self.finished = self.finished, []
        return out
