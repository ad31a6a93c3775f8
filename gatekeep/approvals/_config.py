"""The ``approvals:`` section of the configuration."""

from __future__ import annotations

from typing import Any

import attrs

from gatekeep.config import ConfigError, Node


#: what a held client is told to run by default
APPROVE_COMMAND = "gatekeep approvals approve {id}"


@attrs.frozen
class WebhookConfig:
    #: a URL, or a Secret holding one (``env:``/``file:``: Slack webhook URLs are secrets)
    url: Any
    timeout: float = 5.0
    retries: int = 3


@attrs.frozen
class ApprovalsConfig:
    webhook: WebhookConfig | None = None
    #: at most this many operations held at once; more are denied at once
    max_pending: int = 10000
    #: what a held client is told to run, ``{id}`` is the request id
    approve_command: str = APPROVE_COMMAND


def read_approvals(node: Node | None) -> ApprovalsConfig:
    if node is None:
        return ApprovalsConfig()
    webhook = None
    hook = node.child("webhook", None)
    if hook is not None:
        webhook = WebhookConfig(hook.url("url"), hook.duration("timeout", 5.0), hook.int("retries", 3, low=0, high=20))
        hook.finish()
    command = node.str("approve_command", APPROVE_COMMAND)
    if "{id}" not in command:
        raise ConfigError(node.sub("approve_command"), "expected a command with {id} where the request id goes")
    cfg = ApprovalsConfig(webhook, node.int("max_pending", 10000, low=1, high=1000000), command)
    node.finish()
    return cfg
