"""
Approvals across gateway nodes that share a PostgreSQL store (gatekeep/approvals/_cluster.py), on a real
PostgreSQL server: two nodes' ApprovalServices, each with its ApprovalCluster and its own LISTEN/NOTIFY
connection, the cluster key read from the store. An approval given on the node that does not hold the
request releases it on the holder; a notification sent by any other role that can connect to the store's
database (PUBLIC has CONNECT on a new database), or a genuine message replayed, approves nothing.
"""

from __future__ import annotations

import json

import psycopg2
import pytest

from gatekeep.approvals import ApprovalService, MemoryApprovalStore
from gatekeep.approvals._cluster import CHANNEL, ApprovalCluster
from gatekeep.model import Action, ClientAddress, Decision, Identity, Operation, Session
from gatekeep.policy.engine import Review
from gatekeep.store.notify import Notifier
from gatekeep.store.postgres import PostgresStore
from tests.integration.pg_gateway_helpers import poll

pytestmark = pytest.mark.integration

AGENT = Identity("agent-7", frozenset({"agents"}))
ALICE = Identity("alice", frozenset({"dba"}))
BOB = Identity("bob", frozenset({"dba"}))
REVIEWS = {"two-dbas": Review(approvers=("dba",), approvals=2, timeout=600.0)}


class Node:
    def __init__(self, rt, store_db, name):
        self.rt = rt
        self.store = PostgresStore(store_db.connect, name, reactor=rt.reactor)
        self.notifier = Notifier(store_db.connect, rt.reactor)
        self.service = ApprovalService(rt.reactor, REVIEWS.get, MemoryApprovalStore(), node=name)
        self.cluster = ApprovalCluster(self.service, self.notifier, rt.reactor, name, timeout=5.0)
        self.service.cluster = self.cluster
        key = rt.call(self.store.cluster_key)
        rt.call(self.notifier.start)
        rt.call(self.cluster.start, key)
        self.key = key

    def hold(self, text):
        holds, fired = [], []
        s = Session("s-" + text[:4], AGENT, "prod", "postgres", ClientAddress("127.0.0.1", 5000), False, 0.0)
        op = Operation(s, 1, "query", text, 0.0, None, ())

        def hold():
            self.service.hold(op, Decision(Action.REVIEW, "two-dbas", "", {}), holds.append).addBoth(fired.append)
        self.rt.call(hold)
        return holds[0].request_id, fired

    def close(self):
        self.rt.call(self.cluster.stop)
        self.rt.call(self.notifier.stop)
        self.rt.call(self.store.close)


@pytest.fixture
def nodes(store_db, reactor_thread):
    made = [Node(reactor_thread, store_db, "gk-a"), Node(reactor_thread, store_db, "gk-b")]
    yield made
    for node in made:
        node.close()


@pytest.fixture
def mallory(store_db, store_pg):
    """A role with nothing but LOGIN on the store's server: it can connect to the store's database."""
    store_pg.admin_psql("DROP ROLE IF EXISTS gk_mallory; CREATE ROLE gk_mallory LOGIN PASSWORD 'm';")
    conn = psycopg2.connect(host=store_db.host, port=store_db.port, dbname=store_db.name, user="gk_mallory",
                            password="m", sslmode="disable")
    conn.autocommit = True
    yield conn
    conn.close()
    store_pg.admin_psql(f"REVOKE ALL ON DATABASE {store_db.name} FROM gk_mallory; DROP ROLE gk_mallory;")


def test_an_approval_given_on_another_node_releases_the_hold(nodes):
    a, b = nodes
    assert a.key == b.key and len(a.key) == 32
    rid, fired = a.hold("DROP TABLE billing")
    for who in (ALICE, BOB):
        status = b.rt.call(b.cluster.decide, "approve", rid, who, "change 42", False)
        assert status in ("pending", "approved")
    poll("the hold on gk-a to be released", lambda: fired, timeout=10)
    assert fired[0].action is Action.ALLOW
    assert a.service.lookup(rid).status.value == "approved"
    assert a.cluster.dropped == b.cluster.dropped == 0


def test_a_notification_from_another_role_approves_nothing(nodes, mallory):
    a, _ = nodes
    rid, fired = a.hold("DROP TABLE invoices")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        mallory.cursor().execute("SELECT key FROM cluster_secret")
    for i, name in enumerate(["ghost-1", "ghost-2"]):
        forged = {"t": "ask", "call": f"c{i}", "from": "nowhere", "verb": "approve", "request": rid,
                  "approver": name, "groups": ["dba"], "reason": "lgtm", "admin": True, "at": 0, "mac": "0" * 64}
        mallory.cursor().execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(forged)))
        unsigned = dict(forged, call=f"u{i}")
        del unsigned["mac"]
        mallory.cursor().execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(unsigned)))
    poll("gk-a to drop the four forged messages", lambda: a.cluster.dropped >= 4, timeout=10)
    assert fired == [] and a.service.lookup(rid).status.value == "pending"


def test_a_genuine_message_replayed_approves_nothing(nodes, mallory):
    a, b = nodes
    rid, fired = a.hold("DROP TABLE ledger_old")
    heard = []
    mallory.cursor().execute(f'LISTEN "{CHANNEL}"')
    b.rt.call(b.cluster.decide, "approve", rid, ALICE, "first of two", False)
    poll("alice's approval on gk-a", lambda: len(a.service.lookup(rid).decisions) == 1, timeout=10)

    def read():
        mallory.poll()
        heard.extend(n.payload for n in mallory.notifies)
        mallory.notifies.clear()
        return [p for p in heard if json.loads(p)["t"] == "ask"]
    ask = poll("the role to hear alice's signed ask", read, timeout=10)[0]
    assert json.loads(ask)["mac"]
    # the same signed message again: same call, so a replay; with another call id, the MAC no longer fits
    mallory.cursor().execute("SELECT pg_notify(%s, %s)", (CHANNEL, ask))
    other = dict(json.loads(ask), call="c-new", approver="bob")
    mallory.cursor().execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(other)))
    poll("gk-a to drop the replay and the altered copy", lambda: a.cluster.dropped >= 2, timeout=10)
    request = a.service.lookup(rid)
    assert fired == [] and request.status.value == "pending" and len(request.decisions) == 1
