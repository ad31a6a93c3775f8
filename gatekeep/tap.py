"""
``twistd gatekeep``: options and the service tree.

    twistd -n gatekeep --config gatekeep.yaml

The service tree: the recorder (its writer thread starts first and stops last,
after a final flush), then one listening service per target.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from gatekeep.chain import Chain, Gateway
from gatekeep.masking.rules import MaskingPolicy
from gatekeep.policy.engine import RuleEngine
from gatekeep.config import Config, ConfigError, load
from gatekeep.identity.tokens import StaticIdentityProvider
from gatekeep.plugin import protocol_plugins
from gatekeep.recording.recorder import ThreadedRecorder
from gatekeep.recording.sinks import build_sinks
from gatekeep.store import ledger
from gatekeep.store.sqlite import SQLiteStore

_log = Logger()


class Options(usage.Options):
    synopsis = "--config PATH"
    longdesc = "Run the gatekeep access gateway with the targets in a YAML configuration file."
    optParameters = [
        ["config", "c", os.environ.get("GATEKEEP_CONFIG", "gatekeep.yaml"), "Path of the YAML configuration."],
    ]

    def postOptions(self) -> None:
        try:
            self["parsed"] = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"configuration refused: {e}") from None


class RecorderService(service.Service):
    name = "recorder"

    def __init__(self, recorder: ThreadedRecorder) -> None:
        self.recorder = recorder

    def startService(self) -> None:
        super().startService()
        self.recorder.start()

    def stopService(self) -> None:
        super().stopService()
        self.recorder.stop()


class GatewayService(service.MultiService):
    """The whole gateway; children are stopped in reverse order, so listeners close before the recorder."""

    def __init__(self, gateway: Gateway, config: Config) -> None:
        super().__init__()
        self.gateway = gateway
        self.config = config

    def stopService(self):
        # end live sessions so their records are complete before the recorder stops
        for relay in list(self.gateway.sessions.values()):
            try:
                relay.end_reason = "gateway shutting down"
                relay.transport.loseConnection()
                relay.end_session()
            except Exception:
                _log.failure("ending session on shutdown")
        return super().stopService()


def signer_for(config: Config) -> ledger.Signer:
    """The key that seals sessions: from ``recording.signing_key``, or made once in the store's folder."""
    if config.recording.signing_key is not None:
        return ledger.load_signer(config.recording.signing_key.reveal())
    return ledger.load_or_create_signer(config.store.path.parent / "signing_key.pem")


def build(config: Config, reactor: Any = None) -> GatewayService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    store = SQLiteStore(config.store.path, node=config.node, signer=signer_for(config))
    recorder = ThreadedRecorder(store, reactor, durability=config.recording.durability,
                                on_failure=config.recording.on_failure,
                                sinks=build_sinks(config.recording.sinks, reactor, config.node))
    plugins = protocol_plugins()
    chain = Chain(
        identities=[StaticIdentityProvider.from_config(config.identities)],
        policy=RuleEngine(config.policies, {t.name: t for t in config.targets}, plugins),
        masking=MaskingPolicy(config.masking),
        recorder=recorder,
    )
    gateway = Gateway(chain, reactor, config.node, os.urandom(32), state_dir=config.store.path.parent)
    top = GatewayService(gateway, config)
    RecorderService(recorder).setServiceParent(top)
    for target in config.targets:
        factory = plugins[target.protocol].makeFactory(target, gateway)
        endpoint = serverFromString(reactor, target.listen)
        svc = StreamServerEndpointService(endpoint, factory)
        svc._raiseSynchronously = True
        svc.setName(f"target:{target.name}")
        svc.setServiceParent(top)
        _log.info("target {name} ({protocol}) listening on {listen}", name=target.name, protocol=target.protocol,
                  listen=target.listen)
    return top


def makeService(options: Options) -> service.IService:
    return build(options["parsed"])
