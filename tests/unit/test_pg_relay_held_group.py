"""What waits behind (and before) a held statement, and when it goes."""

from __future__ import annotations

from gatekeep.protocols.postgres import _codec as pg
from tests.unit.test_pg_relay_approvals import BOB, held, relay  # noqa: F401 (fixtures)
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


class TypesPostgres(FakePostgres):
    """FakePostgres that notes the type of every message of the extended protocol it gets (and answers none)."""

    def handle(self, m):
        if self.reader.typed and m.type in b"PBDECHS":
            self.factory.types.append(m.type)
        else:
            super().handle(m)


def _typed_server(relay):  # noqa: F811
    relay.server.types = []
    relay.server.buildProtocol = lambda addr: TypesPostgres(relay.server)
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    return client


def test_a_bind_sent_before_its_held_execute_waits_with_it(relay):  # noqa: F811
    """The client sends the Parse of a DELETE, its Bind, and its Execute and Sync in three writes (a Parse sent
    alone goes to the server unheld; its Execute is held with the values bound): the Parse and Bind (which
    would open the server's transaction and take the table's locks) wait for the rest of the group, and then
    for the approval of the Execute, with it."""
    client = _typed_server(relay)
    client.send(pg.parse("", "delete from users where id = $1", ()))
    client.send(pg.bind("", "", (), (b"7",), ()))
    relay.network.flush()
    assert relay.server.types == []
    client.send(pg.execute("") + pg.sync())
    relay.network.flush()
    (request,) = relay.approvals.pending()
    assert request.parameters == ("7",)
    assert relay.server.types == []
    relay.approvals.approve(request.id, BOB, "ok")
    relay.network.flush()
    assert relay.server.types == [b"P", b"B", b"E", b"S"]


def test_an_unfinished_group_goes_with_a_flush_or_an_allowed_execute(relay):  # noqa: F811
    """The group's start waits only for the rest of it: a Flush (the client then waits for the answers) sends
    it, and so does an Execute that is allowed."""
    client = _typed_server(relay)
    client.send(pg.parse("", "select 1", ()))
    relay.network.flush()
    assert relay.server.types == []
    client.send(pg.bind("", "", (), (), ()) + pg.describe("P", ""))
    relay.network.flush()
    assert relay.server.types == []
    client.send(pg.flush())
    relay.network.flush()
    assert relay.server.types == [b"P", b"B", b"D", b"H"]
    client.send(pg.bind("", "", (), (), ()))
    relay.network.flush()
    assert relay.server.types == [b"P", b"B", b"D", b"H"]
    client.send(pg.execute(""))
    relay.network.flush()
    assert relay.server.types == [b"P", b"B", b"D", b"H", b"B", b"E"]


def test_an_unfinished_group_past_the_limit_goes_at_once(relay, monkeypatch):  # noqa: F811
    """What is kept back is bounded: a client that sends Parses without end has them sent on past the limit."""
    from gatekeep.protocols.postgres import relay as relay_module

    monkeypatch.setattr(relay_module, "UNFINISHED_LIMIT", 200)
    client = _typed_server(relay)
    client.send(pg.parse("a", "select 1", ()))
    relay.network.flush()
    assert relay.server.types == []
    client.send(b"".join(pg.parse(f"s{i}", "select 1", ()) for i in range(10)))
    relay.network.flush()
    assert relay.server.types == [b"P"] * 11
