"""
gatekeep's connection to the PostgreSQL server of a target, as the target's
service account: TLS if configured, the login (:class:`UpstreamLogin`), the
catalog query masking needs, then relaying. In relaying, server bytes go
through :class:`BackendStream`, which forwards each chunk as it arrives and
hands the frontend (``Frontend.from_server``) only the messages it watches.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatekeep import sendnow
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres import _encoding
from gatekeep.protocols.postgres import _masking
from gatekeep.protocols.postgres._backend import BackendStream
from gatekeep.protocols.postgres._login import LoginError, UpstreamLogin
from gatekeep.protocols.postgres.plugin import PASSED_PARAMETERS
from gatekeep.tls import client_options

_log = Logger()

#: server messages the relay looks at while relaying (ParseComplete and CloseComplete: a statement change took
#: effect; CopyInResponse: the server ignores Syncs until the COPY's data)
WATCHED = {b"C", b"E", b"Z", b"I", b"s", b"S", b"1", b"3", b"G"}


class EndSession(Exception):
    """Raised by the handler of a server message: the session ends with this FATAL (a setting the server reports
    that gatekeep cannot relay), sent once the client's stream is at a message boundary."""

    def __init__(self, code: str, message: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.message = message
        self.reason = reason


class Upstream(protocol.Protocol):
    """gatekeep's connection to the PostgreSQL server, as the target's service account."""

    def __init__(self, frontend: Any) -> None:
        self.frontend = frontend
        self.options = frontend.target.options.upstream
        self.reader = pg.MessageReader(typed=True)
        self.login = UpstreamLogin(self.options.user, self.options.password)
        self.stream = BackendStream(set(WATCHED), frontend.from_server)
        self.state = "connecting"
        self._parameter_status: list[bytes] = []
        self._key = (0, 0)
        self._catalog_error: str | None = None
        #: how the server writes text to this session (its client_encoding, reported during login)
        self._codec = "utf-8"
        self._ready_status = b""
        self.error_reason = "connection closed"

    def send(self, data: bytes) -> None:
        sendnow.write(self.transport, data)

    def connectionMade(self) -> None:
        if self.frontend.closed:
            self.transport.loseConnection()
            return
        sendnow.no_delay(self.transport)
        if self.options.tls.enabled:
            self.state = "tls"
            self.send(pg.ssl_request())
        else:
            self.start()

    def start(self) -> None:
        self.state = "login"
        params = {"user": self.options.user, "database": self.options.database}
        for k, v in self.frontend.parameters.items():
            if k in PASSED_PARAMETERS:
                params[k] = v
        self.send(pg.startup_message(params))

    def dataReceived(self, data: bytes) -> None:
        if self.state == "ready":
            fe = self.frontend
            later: list = []
            whole = self.stream.forwarded_whole()
            try:
                out = self.stream.feed(data, later)
            except Exception as e:  # a malformed server message, or a handler that failed on one
                self._broken(e, whole)  # nothing of this chunk went to the client
                return
            if not fe.closed:  # (a handler may have ended the session: nothing follows its FATAL)
                for chunk in out:
                    fe.bytes_out += len(chunk)
                sendnow.write_many(fe.transport, out)
            if later:
                # a chunk that passed unchanged: its CommandComplete, ReadyForQuery ... are
                # accounted for now that the client has it
                try:
                    self.stream.handle(later)
                except Exception as e:
                    self._broken(e, self.stream.forwarded_whole())
                    return
            if fe._notices and self.stream.at_boundary():
                notices, fe._notices = fe._notices, []
                fe.send(b"".join(notices))
            return
        if self.state in ("failed", "closed"):
            return  # what the server sent after gatekeep gave up on it (a TLS transport may still deliver it)
        try:
            self._during_login(data)
        except pg.ProtocolError as e:
            self.fail(f"protocol error from the server: {e}")
        except LoginError as e:
            self.fail(str(e), "28000")
        except Exception as e:  # a server message gatekeep failed on: the login fails, the gateway goes on
            _log.failure("bad data from the upstream of {target} during login", target=self.frontend.target.name)
            self.fail(f"invalid message from the server during login ({type(e).__name__})")

    def _broken(self, error: Exception, whole: bool = True) -> None:
        """
        A malformed server message, or a handler that failed on one: the session ends with FATAL 08P01 (or the
        FATAL of an :class:`EndSession`), without a word when the client already has part of a message (``whole``
        False: the FATAL would be read as the rest of it).
        """
        fe = self.frontend
        code = "08P01"
        message = f"gatekeep received an invalid message from the database of target {fe.target.name}"
        if isinstance(error, EndSession):
            _log.warn("session on {target} ended: {reason}", target=fe.target.name, reason=error.reason)
            code, message, reason = error.code, error.message, error.reason
        elif isinstance(error, pg.ProtocolError):
            _log.warn("invalid message from the upstream of {target}: {error}", target=fe.target.name, error=str(error))
            reason = f"upstream protocol error: {error}"
        else:  # a handler failed: a bug
            _log.failure("bad data from the upstream of {target}", target=fe.target.name)
            reason = f"upstream protocol error: {type(error).__name__}"
        self.state = "failed"
        if not fe.closed:
            fe.end_reason = reason
            if whole:
                fe.fatal(code, message)
            else:
                fe.close()
        self.transport.loseConnection()

    def _during_login(self, data: bytes) -> None:
        if self.state == "tls":
            answer, data = data[:1], data[1:]
            if answer != b"S":
                self.fail("the server does not accept TLS")
                return
            if data:
                raise pg.ProtocolError("unencrypted data after the TLS answer")
            self.transport.startTLS(client_options(self.options.tls, self.options.host))
            self.start()
            return
        for m in self.reader.feed(data):
            if m.type == b"R":
                code, payload = pg.parse_authentication(m.body)
                reply = self.login.on_authentication(code, payload)
                if reply:
                    self.send(reply)
            elif m.type == b"S":
                name, value = pg.parse_parameter_status(m.body)
                if name == "client_encoding":
                    self._codec = _encoding.codec_for(value)  # the server's messages from now on
                self._parameter_status.append(m.encode())
            elif m.type == b"K":
                self._key = pg.parse_backend_key_data(m.body)
            elif m.type == b"N":
                self._parameter_status.append(m.encode())
            elif m.type == b"E" and self.state != "catalog":
                fields = pg.parse_fields(m.body, self._codec, "replace")
                self.fail(f"{fields.get('C', '?')} {fields.get('M', '')}", "08004" if fields.get("C") != "28P01" else "28000")
                return
            elif m.type == b"Z" and self.login.done:
                results = self.frontend.results
                query = _masking.catalog_query(results.plan) if results is not None else None
                if query is not None and self.state == "login":
                    # name the columns masking may need before the client gets the session
                    self.state = "catalog"
                    self._ready_status = m.encode()
                    self.send(pg.query(query))
                    continue
                if self.state == "catalog":
                    if self._catalog_error:
                        self.fail(f"cannot read the catalog for masking: {self._catalog_error}")
                        return
                    status = self._ready_status
                else:
                    status = m.encode()
                self.state = "ready"
                rest = self.reader.take_buffer()
                self.frontend.upstream_ready(self._parameter_status, self._key, status)
                if rest:
                    self.dataReceived(rest)
                return
            elif self.state == "catalog":
                if m.type == b"D":
                    self.frontend.results.catalog.add_row(pg.parse_data_row(m.body), self._codec)
                elif m.type == b"E":
                    self._catalog_error = pg.parse_fields(m.body, self._codec, "replace").get("M", "error")
                continue
            elif m.type == b"v":
                continue  # NegotiateProtocolVersion: the server speaks 3.0 without our extras
            else:
                raise pg.ProtocolError(f"unexpected message {m.type!r} during login")

    def fail(self, reason: str, code: str = "08004") -> None:
        self.state = "failed"
        self.frontend.upstream_failed(code, reason)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        previous, self.state = self.state, "closed"
        if previous == "failed":
            return
        message = reason.getErrorMessage() if reason is not None else "closed"
        if previous == "tls" or previous == "login":
            self.frontend.upstream_failed("08006", f"connection closed during login ({message})")
        else:
            self.frontend.upstream_lost(message)
