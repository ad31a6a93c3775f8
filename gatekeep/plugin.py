"""
Finding protocol plugins.

A protocol plugin is an object providing
:class:`gatekeep.interfaces.IProtocolPlugin`. gatekeep's own protocols are
listed in ``BUILTIN``; others are found two ways:

- Python entry points in the group ``gatekeep.protocols`` (the usual way for a
  separately installed package), and
- Twisted drop-ins: a module in any ``gatekeep/plugins`` directory on
  ``sys.path``, found with ``twisted.plugin.getPlugins``.

See docs/writing-a-protocol-plugin.md.
"""

from __future__ import annotations

import warnings
from importlib import import_module, metadata
from typing import Any

from twisted.logger import Logger

from gatekeep.interfaces import IProtocolPlugin

_log = Logger()

BUILTIN = ("gatekeep.plugins.gatekeep_postgres:postgres", "gatekeep.plugins.gatekeep_ssh:ssh",
           "gatekeep.plugins.gatekeep_http:http", "gatekeep.plugins.gatekeep_kubernetes:kubernetes")


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(import_module(module), attr)


def protocol_plugins() -> dict[str, Any]:
    found: dict[str, Any] = {}

    def add(plugin: Any, origin: str) -> None:
        if not IProtocolPlugin.providedBy(plugin):
            _log.warn("{origin} does not provide IProtocolPlugin; ignored", origin=origin)
            return
        found.setdefault(plugin.name, plugin)

    for spec in BUILTIN:
        add(_load(spec), spec)
    for ep in metadata.entry_points(group="gatekeep.protocols"):
        try:
            add(ep.load(), ep.value)
        except Exception:
            _log.failure("cannot load protocol plugin {name}", name=ep.value)
    try:
        from twisted.plugin import getPlugins

        import gatekeep.plugins

        with warnings.catch_warnings():
            # editable installs confuse Twisted's module walker; it says so and carries on
            warnings.simplefilter("ignore", UserWarning)
            plugins = list(getPlugins(IProtocolPlugin, gatekeep.plugins))
        for plugin in plugins:
            add(plugin, repr(plugin))
    except Exception:
        _log.failure("cannot scan gatekeep.plugins for drop-in protocol plugins")
    return found
