"""The ``kubernetes`` protocol plugin: target configuration, policy keys, the relay's factory."""

from __future__ import annotations

import attrs
from zope.interface import implementer

from gatekeep.config import Node
from gatekeep.interfaces import IProtocolPlugin
from gatekeep.protocols.http.plugin import HttpTarget, read_http_target


@attrs.frozen
class KubernetesOptions:
    #: Secret data and stringData are masked in every response
    mask_secrets: bool = True


@implementer(IProtocolPlugin)
class KubernetesPlugin:
    name = "kubernetes"
    #: its own keys, and the HTTP keys, which may be combined with them
    matchKeys = ("verbs", "api_groups", "resources", "subresources", "namespaces", "names",
                 "methods", "hosts", "paths", "query")

    def parseMatch(self, node: Node):
        from gatekeep.protocols.kubernetes.policy import read_match

        return read_match(node)

    def facts(self, operation, target):
        """What a request does, as the API server understands it; None for other operations."""
        if operation.kind != "http" or operation.detail is None:
            return None
        from gatekeep.protocols.kubernetes.policy import facts_for

        extra = getattr(getattr(target, "options", None), "extra", None)
        return facts_for(operation.detail, getattr(extra, "mask_secrets", True))

    def parseTarget(self, node: Node) -> HttpTarget:
        options = KubernetesOptions(mask_secrets=node.bool("mask_secrets", True))
        return read_http_target(node, options)

    def makeFactory(self, target, gateway):
        from gatekeep.protocols.http._factory import make_factory
        from gatekeep.protocols.kubernetes._dialect import KubernetesDialect

        return make_factory(target, gateway, KubernetesDialect(target.options.extra))
