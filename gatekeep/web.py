"""Small twisted.web helpers shared by the admin API, webhooks and HTTP clients."""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A request body from bytes, for twisted.web.client.Agent."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any):
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(protocol.Protocol):
    def __init__(self, done: Deferred) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


def discard_body(response: Any) -> Deferred:
    """Read a response's body to the end and drop it (so the connection can be reused)."""
    done: Deferred = Deferred()
    response.deliverBody(_Discard(done))
    return done


def url_bytes(url: Any) -> bytes:
    """A URL given as a str or as a config Secret (``env:``/``file:``), as bytes."""
    reveal = getattr(url, "reveal", None)
    return reveal().strip() if reveal is not None else str(url).encode("ascii")


def url_where(url: Any) -> str:
    """
    What a log line may say of a URL: scheme, host and port only. The path and
    query may be its secret (a Slack or Sumo Logic webhook, ``?dd-api-key=``), and
    so may the user and password before the host.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url_bytes(url).decode("ascii", "replace"))
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    host = parts.hostname or "?"
    return f"{parts.scheme}://{'[' + host + ']' if ':' in host else host}{port}"
