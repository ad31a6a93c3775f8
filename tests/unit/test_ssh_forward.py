"""direct-tcpip channels (gatekeep.protocols.ssh._pair.ForwardRelay): the host is judged and forwarded in one
canonical spelling."""

import struct
from types import SimpleNamespace

from twisted.conch.ssh.common import NS, getNS
from twisted.internet.defer import Deferred

from gatekeep.protocols.ssh._flow import Leg
from gatekeep.protocols.ssh._pair import ForwardRelay


def _relay(host):
    asked = []
    session = SimpleNamespace(options=SimpleNamespace(window=1 << 20), down_leg=Leg("client"), up_leg=Leg("upstream"),
                              now=lambda: 0.0,
                              operation=lambda kind, text, detail, extra: asked.append((kind, text, detail, extra)),
                              decide=lambda op, notify: Deferred())
    data = NS(host.encode()) + struct.pack(">L", 80) + NS(b"127.0.0.1") + struct.pack(">L", 40000)
    return ForwardRelay(session, None, 1, 1 << 20, 32768, data), asked


def test_the_judged_spelling_is_the_one_sent_upstream():
    """`2852039166` is judged as 169.254.169.254, and the server is asked to connect to 169.254.169.254
    (not to a spelling it would read its own way); the client's spelling is kept in the record."""
    relay, asked = _relay("2852039166")
    relay.start()
    ((kind, text, detail, extra),) = asked
    assert (kind, text, detail.forward) == ("forward", "169.254.169.254:80", ("169.254.169.254", 80))
    assert extra["requested_host"] == "2852039166"
    host, rest = getNS(relay.data)
    assert host == b"169.254.169.254" and rest == struct.pack(">L", 80) + NS(b"127.0.0.1") + struct.pack(">L", 40000)


def test_a_name_loses_its_trailing_dot_and_capitals():
    """`Metadata.Internal.` is judged and forwarded as `metadata.internal`."""
    relay, asked = _relay("Metadata.Internal.")
    relay.start()
    assert asked[0][2].forward == ("metadata.internal", 80) and "requested_host" in asked[0][3]
    assert getNS(relay.data)[0] == b"metadata.internal"
