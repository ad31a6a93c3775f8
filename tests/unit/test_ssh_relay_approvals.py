"""The SSH relay with the approvals service: a line's held parts, withdrawal, and a notice that waits for window."""

import gc
from types import SimpleNamespace

from twisted.conch.ssh.common import NS
from twisted.internet.defer import CancelledError
from twisted.logger import globalLogPublisher

from gatekeep.approvals import ApprovalService, MemoryApprovalStore, Status
from gatekeep.chain import Hold
from gatekeep.model import Action, ClientAddress, Decision, Identity, Operation, Session
from gatekeep.policy.engine import Review
from gatekeep.protocols.ssh._channels import SessionRelay
from gatekeep.protocols.ssh._flow import Leg
from gatekeep.protocols.ssh._unwrap import parse
from gatekeep.protocols.ssh.policy import SshRequest
from gatekeep.protocols.ssh.relay import ClientSession
from gatekeep.testing import FunctionPolicy, make_gateway
from tests.unit.test_ssh_flow import FakeConn

BOB = Identity("bob", frozenset({"ops"}))
RULES = {"touch": Action.REVIEW, "mkdir": Action.REVIEW, "rm": Action.DENY}


def _decide(op):
    command = op.detail.line.commands[op.detail.part]
    action = RULES.get(command.program, Action.ALLOW)
    return Decision(action, f"on-{command.program}" if action is not Action.ALLOW else None, "no" if
                    action is Action.DENY else "", {"program": command.program})


def client_session():
    gateway = make_gateway(policy=FunctionPolicy(_decide))
    service = ApprovalService(gateway.reactor, lambda rule: Review(timeout=60.0), MemoryApprovalStore())
    gateway.chain.approvals = service
    factory = SimpleNamespace(gateway=gateway, target=SimpleNamespace(name="box", options=SimpleNamespace()))
    s = ClientSession(factory, SimpleNamespace(host="127.0.0.1", port=5000))
    s.session = Session("s1", Identity("agent", frozenset({"agents"})), "box", "ssh", ClientAddress("127.0.0.1", 5000),
                        False, 0.0)
    return s, service


def exec_op(s, text):
    return Operation(s.session, 1, "exec", text, 0.0, SshRequest("exec", parse(text)))


def test_each_held_part_is_told_and_the_line_runs_once_all_are_approved():
    """`touch a; mkdir b`: two requests, both told at once; the line is allowed when both are approved."""
    s, service = client_session()
    told, results = [], []
    s.decide(exec_op(s, "touch a; mkdir b"), told.append).addCallback(results.append)
    first, second = service.pending()
    assert [h.request_id for h in told] == [first.id, second.id] and not results
    service.approve(first.id, BOB)
    assert not results
    service.approve(second.id, BOB)
    (decision,) = results
    assert decision.allowed and decision.facts["approvals"][1]["id"] == second.id
    assert "approved by bob" in decision.reason and not s.waiting


def test_a_part_refused_at_once_withdraws_the_held_ones_untold():
    """`touch a; rm b`: the rm is denied at once; the touch's request is withdrawn and the client told nothing."""
    s, service = client_session()
    told, results = [], []
    s.decide(exec_op(s, "touch a; rm b"), told.append).addCallback(results.append)
    (decision,) = results
    assert decision.rule == "on-rm" and told == []
    assert not service.pending() and not s.waiting


def test_one_denial_decides_and_withdraws_the_rest():
    """An approver denying one held part denies the line at once; the other request is withdrawn."""
    s, service = client_session()
    results = []
    s.decide(exec_op(s, "touch a && mkdir b"), lambda h: None).addCallback(results.append)
    first, second = service.pending()
    service.deny(second.id, BOB, "no dirs")
    (decision,) = results
    assert not decision.allowed and "denied by bob: no dirs" in decision.reason
    assert service.lookup(first.id).status is Status.WITHDRAWN


def test_cancelling_withdraws_every_held_part_and_session_end_cancels():
    """Cancelling the decision (channel closed) withdraws both requests; the session's end cancels what is left."""
    s, service = client_session()
    failures, logged = [], []
    globalLogPublisher.addObserver(logged.append)
    try:
        d = s.decide(exec_op(s, "touch a; mkdir b"), lambda h: None)
        d.addErrback(failures.append)
        d.cancel()
        del d
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert failures[0].check(CancelledError) and not service.pending()
    assert not [e for e in logged if e.get("isError")], logged
    other = s.decide(exec_op(s, "touch c"), lambda h: None)
    other.addErrback(failures.append)
    s.session = None  # no session records to make
    s.end_session()
    assert len(failures) == 2 and not service.pending() and not s.waiting


def test_withdrawing_with_a_reason_marks_every_held_part():
    """The relay withdraws a line's held parts with its reason (access ended): both requests carry it, though
    cancelling one cancels the other."""
    s, service = client_session()
    failures = []
    d = s.decide(exec_op(s, "touch a; mkdir b"), lambda h: None)
    d.addErrback(failures.append)
    first, second = service.pending()
    assert service.withdraw([first.id, second.id], "access ended: the token expired") == 2
    assert failures[0].check(CancelledError) and not service.pending()
    for r in (first, second):
        assert service.lookup(r.id).resolution == "withdrawn: access ended: the token expired"


def test_the_hold_notice_waits_for_window_instead_of_being_dropped():
    """With the client's window full the stderr notice is queued, and sent once the client opens its window."""
    session = SimpleNamespace(options=SimpleNamespace(window=1 << 20), down_leg=Leg("client"), up_leg=Leg("upstream"),
                              next_channel=lambda: 0, now=lambda: 0.0)
    relay = SessionRelay(session, None, 3, 1 << 20, 32768)
    conn = FakeConn()
    conn.open(relay.down, window=0)
    relay._on_hold(Hold("abcdefghjk", "held as request abcdefghjk; an approver runs: gatekeep approvals approve "
                                      "abcdefghjk"))
    assert conn.sent == [] and relay.down.queued > 0
    relay.down.addWindowBytes(4096)
    ((kind, code, data),) = conn.sent
    assert (kind, code) == ("ext", 1) and data.endswith(b"gatekeep approvals approve abcdefghjk\n")


def test_once_access_ended_nothing_more_from_the_client_reaches_the_server():
    """Between the notice and the disconnect (the session is closed), client data and requests are dropped,
    while the server's output still reaches the client."""
    from tests.unit.test_ssh_flow import FakeConn

    session = SimpleNamespace(options=SimpleNamespace(window=1 << 20), down_leg=Leg("client"), up_leg=Leg("upstream"),
                              next_channel=lambda: 0, now=lambda: 0.0, closed=False)
    relay = SessionRelay(session, None, 3, 1 << 20, 32768)
    down_conn, up_conn = FakeConn(), FakeConn()
    down_conn.open(relay.down, window=1 << 20)
    up_conn.open(relay.up, window=1 << 20)
    relay.on_data(relay.down, b"before\n")
    assert up_conn.sent == [("data", b"before\n")]
    relay.tell("gatekeep: access ended: the token expired")
    session.closed = True
    relay.on_data(relay.down, b"rm -rf /\n")
    assert relay.on_request(relay.down, b"exec", b"", True) is False
    assert up_conn.sent == [("data", b"before\n")]
    relay.on_data(relay.up, b"last output")
    assert down_conn.sent == [("ext", 1, b"gatekeep: access ended: the token expired\n"), ("data", b"last output")]


def test_a_malformed_request_queued_behind_a_held_exec_fails_and_the_output_still_flows():
    """An exec held for approval, then a window-change too short to read, then the approval: the queued request
    is answered with failure, as one that arrives on its own is, instead of raising inside the approval's
    callback and leaving its reply pending, which held up everything queued for the client behind it."""
    s, service = client_session()
    s.options.__dict__.update(window=1 << 20, mask_client_output=False, record_input=True,
                              max_recorded_bytes=1 << 20, judge_shell_commands=True, echo_wait=1.0, env_allow=())
    relay = SessionRelay(s, None, 3, 1 << 20, 32768)
    down, up = FakeConn(), FakeConn()
    down.open(relay.down, window=1 << 20, max_packet=1 << 16)
    up.open(relay.up, window=1 << 20, max_packet=1 << 16)
    relay.down.queue_reply(relay.on_request(relay.down, b"exec", NS(b"touch a"), True))
    relay.down.queue_reply(relay.on_request(relay.down, b"window-change", b"\x00\x00\x00\x50", True))
    (held,) = service.pending()
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        service.approve(held.id, BOB)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert [e["log_format"] for e in logged if e.get("log_failure")] == ["handling a queued {kind!r} request"]
    ((_, exec_reply),) = [item for item in up.sent if item[0] == "pending"]
    assert up.sent[0] == ("request", b"exec")
    exec_reply.callback(True)
    relay.on_data(relay.up, b"touched\n")
    assert down.sent[-3:] == [("reply", True), ("reply", False), ("data", b"touched\n")]
