"""Ordered channel output and coupled window credit (gatekeep.protocols.ssh._flow), with a fake connection."""

from twisted.internet.defer import Deferred

from gatekeep.protocols.ssh._flow import Leg, RelayChannel


class FakeConn:
    def __init__(self):
        self.sent = []
        self.channelsToRemoteChannel = {}
        self.adjusted = []

    def open(self, ch, window, max_packet=100):
        ch.conn = self
        ch.id = len(self.channelsToRemoteChannel)
        ch.remoteWindowLeft = window
        ch.remoteMaxPacket = max_packet
        self.channelsToRemoteChannel[ch] = 7

    def sendData(self, ch, data):
        self.sent.append(("data", data))

    def sendExtendedData(self, ch, code, data):
        self.sent.append(("ext", code, data))

    def sendRequest(self, ch, kind, data, want):
        self.sent.append(("request", kind))
        if want:
            d = Deferred()
            self.sent.append(("pending", d))
            return d
        return None

    def sendEOF(self, ch):
        self.sent.append(("eof",))

    def sendClose(self, ch):
        self.sent.append(("close",))
        ch.localClosed = True

    def send_reply(self, ch, ok):
        self.sent.append(("reply", ok))

    def adjustWindow(self, ch, n):
        self.adjusted.append(n)
        ch.localWindowLeft += n


class Handler:
    def __init__(self):
        self.drained = 0

    def on_drained(self, ch):
        self.drained += 1


def _kinds(conn):
    return [s[0] for s in conn.sent if s[0] != "pending"]


def test_data_waits_for_window_and_is_split_at_max_packet():
    """Data beyond the peer's window waits; what goes is cut at the peer's maximum packet size."""
    conn, ch = FakeConn(), RelayChannel(Handler(), 1000)
    conn.open(ch, window=250)
    ch.send_data(b"a" * 400)
    assert [len(s[1]) for s in conn.sent] == [100, 100, 50]
    assert ch.queued == 150
    ch.addWindowBytes(1000)
    assert [len(s[1]) for s in conn.sent] == [100, 100, 50, 100, 50] and ch.queued == 0


def test_eof_exit_status_and_close_stay_behind_queued_data():
    """EOF, requests and close leave only after the data queued before them (conch sends EOF at once)."""
    conn, ch = FakeConn(), RelayChannel(Handler(), 1000)
    conn.open(ch, window=10)
    ch.send_data(b"x" * 30)
    ch.send_request(b"exit-status", b"\0\0\0\0")
    ch.send_eof()
    ch.send_close()
    assert _kinds(conn) == ["data"]
    ch.addWindowBytes(100)
    assert _kinds(conn) == ["data", "data", "request", "eof", "close"]


def test_replies_keep_request_order():
    """A reply that is ready waits for an earlier one still pending."""
    conn, ch = FakeConn(), RelayChannel(Handler(), 1000)
    conn.open(ch, window=100)
    first = Deferred()
    ch.queue_reply(first)
    ch.queue_reply(False)
    assert conn.sent == []
    first.callback(True)
    assert conn.sent == [("reply", True), ("reply", False)]


def test_queued_before_open_goes_when_started():
    """What is queued before the channel is open is sent once it is."""
    conn, ch = FakeConn(), RelayChannel(Handler(), 1000)
    ch.send_data(b"early")
    conn.open(ch, window=100)
    assert conn.sent == []
    ch.started()
    assert conn.sent == [("data", b"early")]


def test_credit_only_for_bytes_that_left():
    """Window goes back to the sender only for bytes not still queued on the other leg."""
    up_conn, down_conn = FakeConn(), FakeConn()
    inbound, outbound = RelayChannel(Handler(), 1000), RelayChannel(Handler(), 1000)
    up_conn.open(inbound, window=0)
    down_conn.open(outbound, window=100, max_packet=1000)
    inbound.peer, outbound.peer = outbound, inbound
    inbound.localWindowLeft -= 600  # 600 bytes arrived
    outbound.send_data(b"y" * 600)  # 100 went out, 500 wait for the client's window
    inbound.grant()
    assert up_conn.adjusted == []  # 100 left, less than a quarter window
    outbound.addWindowBytes(300)
    inbound.grant()
    assert up_conn.adjusted == [400]


def test_no_credit_while_the_other_leg_is_congested():
    """A paused TCP transport on the other leg stops window credit until it resumes."""
    up_conn, down_conn = FakeConn(), FakeConn()
    inbound, outbound = RelayChannel(Handler(), 1000), RelayChannel(Handler(), 1000)
    up_conn.open(inbound, window=0)
    down_conn.open(outbound, window=10000)
    inbound.peer = outbound
    outbound.leg = Leg("client")
    resumed = []
    outbound.leg.listeners.append(lambda: (resumed.append(1), inbound.grant()))
    inbound.localWindowLeft = 0
    outbound.leg.pauseProducing()
    inbound.grant()
    assert up_conn.adjusted == []
    outbound.leg.resumeProducing()
    assert resumed == [1] and up_conn.adjusted == [1000]


def test_close_now_drops_queued_output():
    """close_now sends close at once and forgets what was queued."""
    conn, ch = FakeConn(), RelayChannel(Handler(), 1000)
    conn.open(ch, window=0)
    ch.send_data(b"lost")
    ch.close_now()
    assert conn.sent == [("close",)] and ch.queued == 0


def test_client_close_is_answered_after_the_servers_so_its_exit_status_arrives():
    """The client closes first (an OpenSSH multiplexing master does): the server's exit-status still reaches it,
    queued output it will not read is dropped, and its close is answered once the server closed."""
    from types import SimpleNamespace

    from gatekeep.protocols.ssh._channels import SessionRelay

    session = SimpleNamespace(options=SimpleNamespace(window=1 << 20), down_leg=Leg("client"),
                              up_leg=Leg("upstream"), next_channel=lambda: 0, now=lambda: 0.0)
    relay = SessionRelay(session, None, 3, 1 << 20, 32768)
    down_conn, up_conn = FakeConn(), FakeConn()
    down_conn.open(relay.down, window=0)
    up_conn.open(relay.up, window=1 << 20)
    relay.down.send_data(b"output the client will not read")
    relay.down.remoteClosed = True  # the client's CHANNEL_CLOSE
    relay.on_close(relay.down)
    assert up_conn.sent == [("close",)] and down_conn.sent == [] and relay.down.queued == 0
    relay.on_request(relay.up, b"exit-status", b"\0\0\0\x07", False)
    relay.on_data(relay.up, b"late output")
    relay.up.remoteClosed = True  # the server's CHANNEL_CLOSE
    relay.on_close(relay.up)
    assert down_conn.sent == [("request", b"exit-status"), ("close",)]
