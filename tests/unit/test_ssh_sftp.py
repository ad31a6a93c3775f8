"""The SFTP stream, framed and judged (gatekeep.protocols.ssh._sftp), whole and split at every byte."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.protocols.ssh import _sftp as sftp
from gatekeep.protocols.ssh._sftp import SftpError, SftpStream


def ns(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">L", len(b)) + b


def pkt(kind, body):
    return struct.pack(">LB", len(body) + 1, kind) + body


def req(kind, rid, body=b""):
    return pkt(kind, struct.pack(">L", rid) + body)


INIT = pkt(sftp.INIT, struct.pack(">L", 3))
VERSION = pkt(sftp.VERSION, struct.pack(">L", 3))
#: gatekeep's own REALPATH "." (sent after the server's VERSION)
HOME_ASK = req(sftp.REALPATH, sftp.HOME_ID, ns("."))
ATTRS0 = struct.pack(">L", 0)


def open_(rid, path, flags):
    return req(sftp.OPEN, rid, ns(path) + struct.pack(">L", flags) + ATTRS0)


def write(rid, handle, offset, data):
    return req(sftp.WRITE, rid, ns(handle) + struct.pack(">Q", offset) + ns(data))


def handle_reply(rid, handle):
    return req(sftp.HANDLE, rid, ns(handle))


def status(rid, code):
    return req(sftp.STATUS, rid, struct.pack(">L", code) + ns("") + ns(""))


def data_reply(rid, data):
    return req(sftp.DATA, rid, ns(data))


def feed(stream, data, side, step=None):
    f = stream.from_client if side == "c" else stream.from_server
    if step is None:
        f(data)
    else:
        for i in range(0, len(data), step):
            f(data[i:i + step])


def decide_all(stream, allow=lambda p: True):
    while stream.pending:
        p = stream.pending[0]
        stream.decided(p, allow(p), "denied by test")


def test_upload_is_judged_then_passed_through_with_its_size():
    """An open for writing waits for a decision; the data that follows is passed on and counted."""
    s = SftpStream()
    payload = b"x" * 70000
    client = INIT + open_(1, "/tmp/f", sftp.PF_WRITE | sftp.PF_CREAT | sftp.PF_TRUNC) + write(2, b"h1", 0, payload) \
        + req(sftp.CLOSE, 3, ns(b"h1"))
    s.from_client(client)
    assert s.take_to_server() == INIT
    assert [(p.request.op, p.request.path) for p in s.pending] == [("write", "/tmp/f")]
    decide_all(s)
    s.from_server(handle_reply(1, b"h1"))
    assert s.take_to_client() == handle_reply(1, b"h1")
    # the rest was held behind the decision and goes on in order
    assert s.take_to_server() == open_(1, "/tmp/f", 26) + write(2, b"h1", 0, payload) + req(sftp.CLOSE, 3, ns(b"h1"))
    # the handle was unknown when WRITE was read: feed again to count it on the handle
    s2 = SftpStream()
    s2.from_client(INIT + open_(1, "/tmp/f", sftp.PF_WRITE))
    decide_all(s2)
    s2.from_server(handle_reply(1, b"h1"))
    s2.from_client(write(2, b"h1", 0, payload) + req(sftp.CLOSE, 3, ns(b"h1")))
    s2.from_server(status(2, sftp.FX_OK) + status(3, sftp.FX_OK))
    done = s2.take_finished()
    assert done[-1].extra == {"bytes_read": 0, "bytes_written": 70000} and done[-1].ok


@pytest.mark.parametrize("step", [1, 3, 7, 4096])
def test_split_input_gives_the_same_bytes(step):
    """Fed in pieces of any size, both directions pass on exactly the same bytes and count the same sizes."""
    client = INIT + open_(1, "/data/f", sftp.PF_READ) + req(sftp.READ, 2, ns(b"h") + struct.pack(">QL", 0, 5000)) \
        + req(sftp.CLOSE, 3, ns(b"h"))
    server = pkt(sftp.VERSION, struct.pack(">L", 3)) + handle_reply(1, b"h") + data_reply(2, b"d" * 5000) \
        + status(3, sftp.FX_OK)
    s = SftpStream()
    feed(s, client[:len(INIT) + len(open_(1, "/data/f", 1))], "c", step)
    decide_all(s)
    feed(s, server[:-len(status(3, 0)) - len(data_reply(2, b"d" * 5000))], "s", step)
    feed(s, client[len(INIT) + len(open_(1, "/data/f", 1)):], "c", step)
    feed(s, server[-len(status(3, 0)) - len(data_reply(2, b"d" * 5000)):], "s", step)
    # gatekeep asks for the starting folder itself once the server's VERSION has passed
    head = len(INIT) + len(open_(1, "/data/f", 1))
    assert s.take_to_server() == client[:head] + HOME_ASK + client[head:]
    assert s.take_to_client() == server
    (closed,) = [f for f in s.take_finished() if f.status == "closed"]
    assert closed.extra == {"bytes_read": 5000, "bytes_written": 0}


def test_denied_request_is_answered_and_never_sent():
    """A denied remove gets PERMISSION_DENIED from gatekeep; the server never sees it."""
    s = SftpStream()
    s.from_client(INIT + req(sftp.REMOVE, 9, ns("/etc/passwd")) + req(sftp.STAT, 10, ns("/")))
    decide_all(s, allow=lambda p: False)
    assert s.take_to_server() == INIT + req(sftp.STAT, 10, ns("/"))
    out = s.take_to_client()
    length, kind, rid, code = struct.unpack_from(">LBLL", out)
    assert (kind, rid, code) == (sftp.STATUS, 9, sftp.FX_PERMISSION_DENIED) and len(out) == length + 4
    assert b"denied by test" in out
    assert [f.status for f in s.take_finished()] == ["denied"]


def test_denial_waits_for_a_packet_boundary():
    """A denial answered while a server packet is half through is sent after that packet."""
    s = SftpStream()
    s.from_client(INIT)
    big = data_reply(5, b"z" * 1000)
    s.from_server(big[:100])
    s.from_client(req(sftp.MKDIR, 6, ns("/x") + ATTRS0))
    decide_all(s, allow=lambda p: False)
    assert s.take_to_client() == big[:100]
    s.from_server(big[100:])
    out = s.take_to_client()
    assert out.startswith(big[100:]) and out[len(big) - 100 + 4] == sftp.STATUS


def test_rename_and_extended_requests_name_both_paths():
    """rename and posix-rename carry both paths; paths are made absolute against the login folder."""
    s = SftpStream()
    s.from_client(INIT + req(sftp.REALPATH, 1, ns(".")))
    s.from_server(req(sftp.NAME, 1, struct.pack(">L", 1) + ns("/home/a") + ns("/home/a") + ATTRS0))
    s.from_client(req(sftp.RENAME, 2, ns("a.txt") + ns("../b.txt")))
    assert s.pending[0].request.paths == ("/home/a/a.txt", "/home/b.txt")
    decide_all(s)
    s.from_client(req(sftp.EXTENDED, 3, ns("posix-rename@openssh.com") + ns("/x") + ns("/y")))
    assert (s.pending[0].request.op, s.pending[0].request.paths) == ("rename", ("/x", "/y"))


def test_an_extension_gatekeep_does_not_know_waits_for_a_decision_as_one_and_known_ones_pass():
    """A server may act on paths inside an extension gatekeep cannot read (``copy-file`` names two): such a request
    is judged (policy finds it unjudgeable); OpenSSH's informational and handle extensions pass."""
    s = SftpStream()
    s.from_client(INIT + req(sftp.EXTENDED, 3, ns("copy-file") + ns("/etc/shadow") + ns("/tmp/x") + b"\x00"))
    (p,) = s.pending
    assert (p.request.op, p.request.path) == ("extension", "copy-file") and s.take_to_server() == INIT
    decide_all(s)
    s.from_client(req(sftp.EXTENDED, 4, ns("statvfs@openssh.com") + ns("/")))
    assert not s.pending and s.take_to_server().endswith(ns("/"))


def test_status_finishes_judged_requests():
    """The server's STATUS ends a judged request with its result."""
    s = SftpStream()
    s.from_client(INIT + req(sftp.MKDIR, 4, ns("/tmp/d") + ATTRS0))
    decide_all(s)
    s.from_server(status(4, sftp.FX_FAILURE))
    (f,) = s.take_finished()
    assert (f.pending.request.op, f.ok, f.status) == ("mkdir", False, "failure")


def test_oversized_control_packet_is_refused():
    """A non-data packet larger than the limit ends the stream with SftpError."""
    s = SftpStream()
    with pytest.raises(SftpError):
        s.from_client(struct.pack(">LB", sftp.MAX_PACKET + 10, sftp.OPEN))


def test_fsetstat_names_the_file_of_its_handle():
    """FSETSTAT on an open handle is judged as setstat of that file's path."""
    s = SftpStream()
    s.from_client(INIT + open_(1, "/srv/f", sftp.PF_READ))
    decide_all(s)
    s.from_server(handle_reply(1, b"hh"))
    s.from_client(req(sftp.FSETSTAT, 2, ns(b"hh") + ATTRS0))
    assert (s.pending[0].request.op, s.pending[0].request.path) == ("setstat", "/srv/f")


def name_reply(rid, path):
    return req(sftp.NAME, rid, struct.pack(">L", 1) + ns(path) + ns(path) + ATTRS0)


@pytest.mark.parametrize("step", [1, 5, 4096])
def test_relative_path_waits_for_the_starting_folder_gatekeep_asks_for(step):
    """A client that never sends `realpath .`: after VERSION gatekeep asks the server itself, holds REMOVE
    ../../etc/cron.d/backup until the answer, and judges it as /etc/cron.d/backup; the client never sees the
    answer to gatekeep's question."""
    s = SftpStream()
    feed(s, INIT, "c", step)
    feed(s, VERSION, "s", step)
    assert s.take_to_server() == INIT + HOME_ASK
    assert s.take_to_client() == VERSION
    feed(s, req(sftp.REMOVE, 1, ns("../../etc/cron.d/backup")) + req(sftp.STAT, 2, ns("/")), "c", step)
    assert not s.pending and s.take_to_server() == b"" and s.held_bytes > 0
    feed(s, name_reply(sftp.HOME_ID, "/home/deploy"), "s", step)
    assert s.take_to_client() == b""
    assert [(p.request.op, p.request.path) for p in s.pending] == [("remove", "/etc/cron.d/backup")]
    decide_all(s, allow=lambda p: False)
    assert s.take_to_server() == req(sftp.STAT, 2, ns("/"))


def test_the_answer_to_gatekeeps_question_never_reaches_the_client_whatever_comes_first():
    """The client asks `realpath .` too and its answer comes first: that settles the starting folder, but
    gatekeep's own answer, coming after, is still gatekeep's and is not passed to the client."""
    s = SftpStream()
    s.from_client(INIT + req(sftp.REALPATH, 1, ns(".")))
    s.from_server(VERSION)
    s.take_to_client()
    s.from_client(open_(2, "rel.txt", sftp.PF_READ))
    s.from_server(name_reply(1, "/home/u"))
    assert s.take_to_client() == name_reply(1, "/home/u")
    assert [p.request.path for p in s.pending] == ["/home/u/rel.txt"]
    s.from_server(name_reply(sftp.HOME_ID, "/home/u"))
    assert s.take_to_client() == b"" and s.home == "/home/u"


def test_absolute_paths_do_not_wait_for_the_starting_folder():
    """Requests with absolute paths are judged at once, before gatekeep's question is answered."""
    s = SftpStream()
    s.from_client(INIT)
    s.from_server(VERSION)
    s.from_client(req(sftp.MKDIR, 1, ns("/tmp/d") + ATTRS0))
    assert [p.request.path for p in s.pending] == ["/tmp/d"]


def test_starting_folder_unknown_leaves_the_path_relative_for_policy_to_refuse():
    """The server refuses gatekeep's REALPATH: the held request goes on with its path relative (policy
    refuses it as unjudgeable), and the refusal is not passed to the client."""
    s = SftpStream()
    s.from_client(INIT)
    s.from_server(VERSION)
    s.take_to_client()
    s.from_client(req(sftp.REMOVE, 1, ns("x")))
    s.from_server(status(sftp.HOME_ID, sftp.FX_FAILURE))
    assert s.take_to_client() == b"" and s.home_state == "failed"
    assert [p.request.path for p in s.pending] == ["x"]


def test_the_request_id_gatekeep_uses_is_refused_while_its_question_is_out():
    """A client request with gatekeep's own request id, while gatekeep waits for its answer, ends the stream."""
    s = SftpStream()
    s.from_client(INIT)
    s.from_server(VERSION)
    with pytest.raises(SftpError):
        s.from_client(req(sftp.STAT, sftp.HOME_ID, ns("/")))


#: the client packet types the stream reads fields of
_READ_KINDS = (sftp.OPEN, sftp.CLOSE, sftp.READ, sftp.REMOVE, sftp.MKDIR, sftp.RMDIR, sftp.SETSTAT, sftp.FSETSTAT,
               sftp.OPENDIR, sftp.REALPATH, sftp.RENAME, sftp.SYMLINK, sftp.EXTENDED)


def _started(home: bool = True) -> SftpStream:
    s = SftpStream()
    s.from_client(INIT)
    s.from_server(VERSION)
    if home:
        s.from_server(req(sftp.NAME, sftp.HOME_ID, struct.pack(">L", 1) + ns("/home/u") + ns("") + ATTRS0))
    return s


@pytest.mark.parametrize("kind", _READ_KINDS)
def test_a_client_packet_too_short_for_its_fields_ends_the_stream_with_sftp_error(kind):
    """An OPEN with only its request id, a path whose length runs past the packet, a RENAME whose second path
    is cut: SftpError (the channel is closed), never another exception escaping into the connection."""
    first = ns(b"posix-rename@openssh.com" if kind == sftp.EXTENDED else b"/a")
    whole = struct.pack(">L", 7) + first + ns(b"/b")
    cuts = [4, 6] + ([len(first) + 6] if kind in (sftp.RENAME, sftp.SYMLINK, sftp.EXTENDED) else [])
    for cut in cuts:
        s = _started()
        with pytest.raises(SftpError):
            s.from_client(pkt(kind, whole[:cut]))
            decide_all(s)


@settings(max_examples=300, deadline=None)
@given(side=st.sampled_from(["c", "s"]), kind=st.integers(0, 255), body=st.binary(max_size=40),
       home=st.booleans())
def test_any_packet_is_relayed_judged_or_an_sftp_error(side, kind, body, home):
    """Whatever one packet holds, the stream passes it on, holds it for a decision, or raises SftpError."""
    s = _started(home)
    packet = struct.pack(">LB", len(body) + 1, kind) + body
    try:
        if side == "c":
            s.from_client(packet)
            decide_all(s)
        else:
            s.from_server(packet)
    except SftpError:
        return


def test_a_malformed_request_held_behind_a_decision_is_an_sftp_error_when_released():
    """A request waits for its decision; a truncated OPEN arrived behind it: the decision releases it, and the
    stream says SftpError (the channel closes it) instead of a struct error in the middle of a callback."""
    s = _started()
    s.from_client(req(sftp.REMOVE, 1, ns("/x")) + struct.pack(">LBL", 5, sftp.OPEN, 2))
    assert [p.request.op for p in s.pending] == ["remove"]
    with pytest.raises(SftpError):
        decide_all(s)


def test_a_denied_path_that_is_not_utf8_is_answered():
    """A REMOVE of a file name with a byte that is not UTF-8 is denied: the client gets its PERMISSION_DENIED (the
    name read with surrogateescape used to fail to encode in the answer, and the stream hung)."""
    s = _started()
    s.from_client(req(sftp.REMOVE, 4, ns(b"/srv/caf\xe9")))
    (p,) = s.pending
    assert p.request.path == "/srv/caf\udce9"
    s.take_to_client()  # the VERSION
    s.decided(p, False, f"denied: remove {p.request.path}")
    length, kind, rid, code = struct.unpack_from(">LBLL", s.take_to_client())
    assert (kind, rid, code) == (sftp.STATUS, 4, sftp.FX_PERMISSION_DENIED)


def test_a_request_id_still_unanswered_cannot_be_reused_to_forge_the_starting_folder():
    """`realpath /tmp/a/b/c` and `realpath .` under one request id: the server's answer to the first used to be
    taken as the starting folder, so `remove ../../etc/cron.d/backup` (really /etc/cron.d/backup from /home/u) was
    judged as /tmp/a/etc/cron.d/backup. A request id reused while its request is unanswered ends the stream."""
    s = _started()
    with pytest.raises(SftpError, match="request id 5"):
        s.from_client(req(sftp.REALPATH, 5, ns("/tmp/a/b/c")) + req(sftp.REALPATH, 5, ns(".")))
        s.from_server(name_reply(5, "/tmp/a/b/c") + name_reply(5, "/home/u"))
        s.from_client(req(sftp.REMOVE, 6, ns("../../etc/cron.d/backup")))
        assert [p.request.path for p in s.pending] == ["/etc/cron.d/backup"]


def test_a_request_id_still_unanswered_cannot_be_reused_to_swap_handles():
    """Two OPENs under one request id: the handle of the first (/etc/passwd, opened for reading) used to be
    tied to the second's path (/tmp/ok), so FSETSTAT on it (chmod of /etc/passwd) was judged as setstat /tmp/ok."""
    s = _started()
    with pytest.raises(SftpError, match="request id 7"):
        s.from_client(open_(7, "/etc/passwd", sftp.PF_READ) + open_(7, "/tmp/ok", sftp.PF_READ))
        decide_all(s)
        s.from_server(handle_reply(7, b"h0") + handle_reply(7, b"h1"))
        s.from_client(req(sftp.FSETSTAT, 8, ns(b"h0") + ATTRS0))
        assert [p.request.path for p in s.pending] == ["/etc/passwd"]


def test_a_request_id_is_free_again_once_answered_or_denied():
    """Reusing an id after its answer (or gatekeep's denial) is ordinary SFTP and goes on."""
    s = _started()
    s.from_client(req(sftp.STAT, 1, ns("/")))
    s.from_server(status(1, sftp.FX_OK))
    s.from_client(req(sftp.REMOVE, 1, ns("/x")))
    decide_all(s, allow=lambda p: False)
    s.from_client(write(1, b"h", 0, b"data"))
    s.from_server(status(1, sftp.FX_FAILURE))
    s.from_client(req(sftp.STAT, 1, ns("/")))
    with pytest.raises(SftpError, match="request id 1"):
        s.from_client(write(1, b"h", 0, b"data"))


def test_gatekeeps_request_id_is_refused_before_its_question_too():
    """A client that sends `realpath /tmp/a/b/c` with gatekeep's request id before the server's VERSION: its
    answer used to be taken for gatekeep's own, forging the starting folder."""
    s = SftpStream()
    with pytest.raises(SftpError):
        s.from_client(INIT + req(sftp.REALPATH, sftp.HOME_ID, ns("/tmp/a/b/c")))
        s.from_server(VERSION + name_reply(sftp.HOME_ID, "/tmp/a/b/c"))
        s.from_client(req(sftp.REMOVE, 6, ns("../../etc/cron.d/backup")))
        assert [p.request.path for p in s.pending] == ["/etc/cron.d/backup"]


def test_a_relative_symlink_target_is_judged_from_the_links_folder():
    """OpenSSH's SYMLINK names the target, then the link; the kernel resolves a relative target against the
    link's folder, not the starting folder: `ln -s ../etc/passwd /tmp/x` (sftp sends the target as typed) makes
    /tmp/x point at /etc/passwd, and was judged as a link to /home/etc/passwd."""
    s = _started()
    s.from_client(req(sftp.SYMLINK, 3, ns("../etc/passwd") + ns("/tmp/x")))
    assert s.pending[0].request.paths == ("/etc/passwd", "/tmp/x")
    decide_all(s)
    s.from_client(req(sftp.SYMLINK, 4, ns("../../etc") + ns("sub/l")))
    assert s.pending[0].request.paths == ("/home/etc", "/home/u/sub/l")
    decide_all(s)
    s.from_client(req(sftp.SYMLINK, 5, ns("/etc/shadow") + ns("l2")))
    assert s.pending[0].request.paths == ("/etc/shadow", "/home/u/l2")


def test_a_write_naming_a_huge_handle_is_refused_before_anything_is_buffered():
    """A WRITE whose handle length says 2 GiB: gatekeep reads a WRITE's head (its handle, offset and length)
    before passing the packet on, and those bytes are not flow-controlled as held data. A handle is at most 256
    bytes, so the stream refuses it at once instead of buffering towards 2 GiB."""
    s = SftpStream()
    s.from_client(struct.pack(">LBL", 5, sftp.INIT, 3))
    s.take_to_server()
    with pytest.raises(SftpError, match="handle of 2147483632 bytes"):
        s.from_client(struct.pack(">LBL", 0xFFFFFFF0, sftp.WRITE, 7) + struct.pack(">L", 0x7FFFFFF0))
    ok = SftpStream()
    ok.from_client(struct.pack(">LBL", 5, sftp.INIT, 3))
    ok.take_to_server()
    handle = b"h" * 256
    packet = struct.pack(">BL", sftp.WRITE, 8) + struct.pack(">L", len(handle)) + handle + struct.pack(">QL", 0, 2)
    ok.from_client(struct.pack(">L", len(packet) + 2) + packet + b"hi")
    assert ok.take_to_server().endswith(b"hi")
