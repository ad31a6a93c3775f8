"""The ``postgres`` protocol plugin: target configuration and the relay's factory."""

from __future__ import annotations

import functools
from typing import Any

import attrs
from zope.interface import implementer

from gatekeep.config import ConfigError, Node
from gatekeep.interfaces import IProtocolPlugin
from gatekeep.tls import UPSTREAM_MODES, UpstreamTLS

#: startup parameters a client may pass on to the upstream server
PASSED_PARAMETERS = frozenset({
    "application_name", "client_encoding", "DateStyle", "TimeZone", "extra_float_digits", "search_path",
    "IntervalStyle", "lc_messages", "lc_monetary", "lc_numeric", "lc_time", "statement_timeout",
    "idle_in_transaction_session_timeout", "options", "standard_conforming_strings", "datestyle", "timezone",
    "intervalstyle", "bytea_output", "geqo",
})


@attrs.frozen
class Upstream:
    host: str
    port: int
    database: str
    user: str
    password: Any  # Secret | None
    tls: UpstreamTLS
    connect_timeout: float = 10.0


@attrs.frozen
class PostgresTarget:
    upstream: Upstream
    #: reserved (checked, not used yet): each connection is the other's producer, so a slow reader stops
    #: upstream reads when Twisted's own write buffer fills
    max_buffer: int = 256 * 1024


def read_upstream_tls(node: Node | None) -> UpstreamTLS:
    if node is None:
        return UpstreamTLS("disable")
    mode = node.str("mode", "verify-full", choices=UPSTREAM_MODES)
    ca = node.secret("ca", None, strip=False)
    server_name = node.str("server_name", None)
    if mode in ("verify-ca",) and ca is None:
        raise ConfigError(node.sub("ca"), f"is required with mode {mode}")
    node.finish()
    return UpstreamTLS(mode, ca, server_name)


#: operations whose text is SQL: a Query, a Parse, and an Execute judged again (see the relay's on_execute)
_SQL_KINDS = frozenset({"query", "parse", "execute"})


@functools.cache
def _policy() -> Any:
    """gatekeep.protocols.postgres.policy, imported on first use (it loads the SQL parser)."""
    from gatekeep.protocols.postgres import policy

    return policy


@implementer(IProtocolPlugin)
class PostgresPlugin:
    name = "postgres"
    matchKeys = ("statements", "tables", "schemas", "functions", "conditions")

    def parseMatch(self, node: Node):
        from gatekeep.protocols.postgres.policy import read_match

        return read_match(node)

    def facts(self, operation, target):
        """What a statement does (see gatekeep.protocols.postgres.policy); None for non-SQL operations."""
        kind = operation.kind
        if kind in _SQL_KINDS:
            return _policy().facts_for(operation.text, operation.detail, target.options.upstream.user)
        if kind == "function-call":
            policy = _policy()
            return policy.SqlFacts(policy.Analysis(unjudgeable="a fastpath function call names its function by number"),
                                   (), target.options.upstream.user)
        return None

    def cacheKey(self, operation, target):
        """The key ``facts(...).cache_key`` would have, without working out the facts (a cache hit needs none)."""
        kind = operation.kind
        if kind in _SQL_KINDS:
            return _policy().cache_key_for(operation.text, operation.detail)
        return None

    def parseTarget(self, node: Node) -> PostgresTarget:
        up = node.child("upstream")
        upstream = Upstream(
            host=up.str("host"),
            port=up.int("port", 5432, low=1, high=65535),
            database=up.str("database"),
            user=up.str("user"),
            password=up.secret("password", None),
            tls=read_upstream_tls(up.child("tls", None)),
            connect_timeout=up.duration("connect_timeout", 10.0),
        )
        up.finish()
        return PostgresTarget(upstream, node.int("max_buffer", 256 * 1024, low=16 * 1024, high=64 * 1024 * 1024))

    def makeFactory(self, target, gateway):
        from gatekeep.protocols.postgres.relay import PostgresRelayFactory

        return PostgresRelayFactory(target, gateway)
