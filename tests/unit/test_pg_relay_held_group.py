"""What waits behind (and before) a held statement, and when it goes."""

from __future__ import annotations

from gatekeep.protocols.postgres import _codec as pg
from tests.unit.test_pg_relay_approvals import held, relay  # noqa: F401 (fixtures)
from tests.unit.test_pg_relay_memory import ALICE_TOKEN, FakePostgres


def test_access_ended_while_held_sends_nothing_queued_behind_it(relay):  # noqa: F811
    """Access ends while a DELETE is held and the client has pipelined another statement behind it: the
    withdrawal ends the session; the queued statement never reaches the server."""
    client, _, _ = held(relay)
    client.send(pg.query("select 'after'"))
    relay.gateway.terminate(relay.recorder.sessions[0].id, "the token expired")
    relay.network.flush()
    assert "select 'after'" not in relay.server.queries


COPY_DONE = b"c\x00\x00\x00\x04"
COPY_IN = b"G\x00\x00\x00\x07\x00\x00\x00"  # text, no columns


class CopyingPostgres(FakePostgres):
    """FakePostgres with COPY FROM STDIN: CopyInResponse, then CommandComplete and ReadyForQuery at CopyDone."""

    def handle(self, m):
        if self.reader.typed and m.type == b"Q" and "copy" in pg.parse_query(m.body).lower():
            self.factory.queries.append(pg.parse_query(m.body))
            self.send(COPY_IN)
        elif self.reader.typed and m.type == b"d":
            self.factory.copied.append(m.body)
        elif self.reader.typed and m.type == b"c":
            self.factory.copied.append("done")
            self.send(pg.command_complete("COPY 1"), pg.ready_for_query("I"))
        else:
            super().handle(m)


def test_copy_data_before_a_statement_waiting_for_settings_goes_to_the_server(relay):  # noqa: F811
    """A COPY FROM STDIN whose Query runs code leaves the settings in doubt until the server answers it; the client
    pipelines its data, CopyDone and a statement with a backslash, which waits for that answer. The COPY's data
    and CopyDone are not part of the waiting statement's group: they go to the server, which answers, and the
    waiting statement follows."""
    relay.server.copied = []
    relay.server.buildProtocol = lambda addr: CopyingPostgres(relay.server)
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    answer = client.send(pg.query("COPY t FROM STDIN WHERE lower(a) = 'x'") + pg.copy_data(b"x\n") + COPY_DONE
                         + pg.query("select 'a\\b'"))
    relay.network.flush()
    answer += client.send(b"")
    assert relay.server.copied == [b"x\n", "done"]
    assert relay.server.queries[-1] == "select 'a\\b'"
