"""The store's txpostgres connection: a server closing it is a lost connection, never an unhandled error."""

import psycopg2
import psycopg2.extensions
from twisted.internet import error as neterror

from gatekeep.store._pgdriver import Connection


class FakeReactor:
    """Records readers as epoll does, refusing a negative descriptor the same way."""

    def __init__(self):
        self.readers = []

    def addReader(self, reader):
        if reader.fileno() < 0:
            raise ValueError("file descriptor cannot be a negative integer (-1)")
        self.readers.append(reader)

    def removeReader(self, reader):
        if reader in self.readers:
            self.readers.remove(reader)


class FakePsycopg:
    """A psycopg2 async connection as it is after the server went away, or a healthy one."""

    def __init__(self, fd, *, error=None):
        self.closed = 0
        self.fd = fd
        self.error = error
        self.notifies = []

    def poll(self):
        if self.error is not None:
            raise self.error
        return psycopg2.extensions.POLL_OK

    def fileno(self):
        return self.fd


def connection(raw):
    conn = Connection(reactor=FakeReactor())
    conn._connection = raw
    return conn


def test_a_socket_libpq_dropped_is_a_lost_connection():
    """Polling succeeded but libpq already closed the socket (fileno -1) while psycopg2 says open."""
    conn = connection(FakePsycopg(-1))
    why = conn.doRead()
    assert isinstance(why, neterror.ConnectionLost)
    assert conn.reactor.readers == []


def test_a_poll_error_is_a_lost_connection():
    conn = connection(FakePsycopg(7, error=psycopg2.OperationalError("server closed the connection unexpectedly")))
    why = conn.doRead()
    assert isinstance(why, neterror.ConnectionLost)
    assert "server closed the connection" in str(why)


def test_a_healthy_connection_keeps_watching_for_notifications():
    conn = connection(FakePsycopg(7))
    assert conn.doRead() is None
    assert conn.reactor.readers == [conn]
