"""The service tree twistd runs, built from a configuration file: the recorder's gauges reach /metrics."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from gatekeep.config import load
from gatekeep.tap import build
from tests.support.identities import make_identity


def test_the_recorder_backlog_is_a_gauge(tmp_path):
    """gatekeep_recorder_backlog_bytes follows what the recorder keeps unstored; the limit is recording.max_backlog."""
    import yaml

    _, entry = make_identity("agent-7", ["agents"])
    path = tmp_path / "gatekeep.yaml"
    path.write_text(yaml.safe_dump({
        "store": "sqlite://" + str(tmp_path / "gatekeep.db"),
        "recording": {"max_backlog": "2MiB"},
        "identities": [entry],
        "targets": [{"name": "api", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                     "upstream": {"url": "http://127.0.0.1:9"}}],
    }))
    top = build(load(path), MemoryReactorClock())
    gateway = top.gateway
    registry = gateway.chain.metrics.registry
    text = registry.render()
    assert "gatekeep_recorder_backlog_bytes 0" in text
    assert "gatekeep_recorder_backlog_limit_bytes 2097152" in text
    gateway.chain.recorder.backlog = 12345
    assert "gatekeep_recorder_backlog_bytes 12345" in registry.render()
