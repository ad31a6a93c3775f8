"""The ``admin:`` section of the configuration: where the admin API listens and who has which role."""

from __future__ import annotations

import attrs

from gatekeep.config import ConfigError, Node, ServerTLS, _check_listen, read_server_tls

ROLES = ("admin", "approver", "auditor")


@attrs.frozen
class AdminConfig:
    listen: str
    tls: ServerTLS | None
    #: role -> the groups whose members have it
    roles: dict[str, frozenset[str]]
    #: "authenticated" (a token with any role) or "public"
    metrics: str = "authenticated"

    def roles_of(self, groups: frozenset[str]) -> frozenset[str]:
        return frozenset(role for role, members in self.roles.items() if not members.isdisjoint(groups))


def read_admin(node: Node | None) -> AdminConfig | None:
    if node is None:
        return None
    listen = _check_listen(node)
    tls = read_server_tls(node.child("tls", None))
    if tls is not None and tls.client_ca is not None:
        # the admin API authenticates callers by token; a client_ca here would be read and never asked for
        raise ConfigError(node.sub("tls") + ".client_ca", "the admin API takes no client certificates: callers "
                                                          "log in with a bearer token")
    roles_node = node.child("roles")
    roles: dict[str, frozenset[str]] = {}
    for role in ROLES:
        roles[role] = frozenset(roles_node.strings(role, ()))
    roles_node.finish()
    if not any(roles.values()):
        raise ConfigError(roles_node.path, "expected groups for at least one of admin, approver, auditor")
    cfg = AdminConfig(listen, tls, roles, node.str("metrics", "authenticated", choices=("authenticated", "public")))
    node.finish()
    return cfg
