"""
``twistd gatekeep``: options and the service tree.

    twistd -n gatekeep --config gatekeep.yaml

The service tree: the recorder (its writer thread starts first and stops last,
after a final flush), the identity providers (OIDC key refresh; reloaded on
SIGHUP, see gatekeep.identity.service), the approvals service and the admin API (when
configured), then one listening service per target.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from gatekeep import dispatch
from gatekeep.access import RevocationWatch
from gatekeep.admin._wiring import add_approvals_and_admin
from gatekeep.chain import Chain, Gateway
from gatekeep.masking.rules import MaskingPolicy
from gatekeep.policy.engine import RuleEngine
from gatekeep.config import Config, ConfigError, load
from gatekeep.identity.service import IdentityService, providers_for
from gatekeep.plugin import protocol_plugins
from gatekeep.recording.process import ProcessRecorder
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

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def startService(self) -> None:
        super().startService()
        self.recorder.start()

    def stopService(self) -> Any:
        super().stopService()
        return self.recorder.stop()  # the asynchronous recorder returns a Deferred: twistd waits for it


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
    """The key that seals sessions: from ``recording.signing_key``, or made once in the state folder."""
    if config.recording.signing_key is not None:
        return ledger.load_signer(config.recording.signing_key.reveal())
    return ledger.load_or_create_signer(state_dir(config) / "signing_key.pem")


def state_dir(config: Config) -> Any:
    """Where the gateway keeps state: the SQLite store's folder, or the configuration's (PostgreSQL)."""
    return config.store.state_dir if config.store.state_dir is not None else config.store.path.parent


def migrate_at_start(store: Any) -> None:
    """
    Bring a PostgreSQL store's schema up to date before anything reads it (blocking, once, before the
    reactor runs; the advisory lock makes concurrent starts safe). A database that cannot be reached now
    does not stop the gateway: the recorder migrates when it first writes, and until then
    ``recording.on_failure`` decides what happens to operations.
    """
    import psycopg2

    try:
        store.migrate()
    except psycopg2.OperationalError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _log.error("store {url} cannot be reached at start ({error}); recording will retry", url=store.url,
                   error=first)
    finally:
        store.close_blocking()  # twistd may fork to daemonize: no connection crosses it


def recording_for(config: Config, reactor: Any) -> tuple[Any, Any]:
    """
    The store and recorder the configuration names: SQLite with the writer-thread
    recorder, PostgreSQL with the asynchronous one (txpostgres; no thread).
    """
    sinks = build_sinks(config.recording.sinks, reactor, config.node)
    rec = config.recording
    if config.store.kind == "postgresql":
        from gatekeep.recording.async_recorder import AsyncRecorder
        from gatekeep.store.postgres import PostgresStore

        store = PostgresStore.from_config(config.store, config.node, signer=signer_for(config), reactor=reactor)
        _log.info("recording to {url} ({durability}, on failure {on_failure})", url=config.store.url,
                  durability=rec.durability, on_failure=rec.on_failure)
        migrate_at_start(store)
        return store, AsyncRecorder(store, reactor, durability=rec.durability, on_failure=rec.on_failure,
                                    interval=rec.interval, sinks=sinks, max_backlog=rec.max_backlog)
    signer = signer_for(config)
    store = SQLiteStore(config.store.path, node=config.node, signer=signer)
    store.keep_entries = bool(sinks)  # the ledger entries a write returns are for sinks (the writer process: the same)
    if rec.writer == "thread":
        return store, ThreadedRecorder(store, reactor, durability=rec.durability, on_failure=rec.on_failure,
                                       interval=rec.interval, sinks=sinks, max_backlog=rec.max_backlog)
    settings = {"path": str(config.store.path), "node": config.node, "signing_key": signer.private_pem()}
    return store, ProcessRecorder(reactor, settings, durability=rec.durability, on_failure=rec.on_failure,
                                  interval=rec.interval, sinks=sinks, max_backlog=rec.max_backlog)


def build(config: Config, reactor: Any = None) -> GatewayService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    store, recorder = recording_for(config, reactor)
    plugins = protocol_plugins()
    chain = Chain(
        identities=providers_for(config, reactor),
        policy=RuleEngine(config.policies, {t.name: t for t in config.targets}, plugins),
        masking=MaskingPolicy(config.masking),
        recorder=recorder,
    )
    gateway = Gateway(chain, reactor, config.node, os.urandom(32), state_dir=state_dir(config))
    top = GatewayService(gateway, config)
    RecorderService(recorder).setServiceParent(top)
    IdentityService(gateway, config).setServiceParent(top)
    add_approvals_and_admin(top, config, gateway, store)
    for target in config.targets:
        factory = plugins[target.protocol].makeFactory(target, gateway)
        endpoint = serverFromString(reactor, target.listen)
        svc = StreamServerEndpointService(endpoint, factory)
        svc._raiseSynchronously = True
        svc.setName(f"target:{target.name}")
        svc.setServiceParent(top)
        crl = getattr(target.tls, "client_crl", None)
        if crl is not None:  # sessions already open end when the list comes to revoke their certificate
            RevocationWatch(gateway, target.name, crl).setServiceParent(top)
        _log.info("target {name} ({protocol}) listening on {listen}", name=target.name, protocol=target.protocol,
                  listen=target.listen)
    return top


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor  # the one twistd runs (installed by now, or the default)

    dispatch.install(reactor)
    top = build(options["parsed"], reactor)
    top.getServiceNamed("identities").reload_on_sighup = True
    return top
