"""
Putting the approvals service and the admin API into the gateway's service
tree (called from :func:`gatekeep.tap.build`).

    GatewayService
      recorder             starts first, stops last
      approvals            recovers at start; denies what is still held at stop
      admin                the admin API listener (when ``admin:`` is configured)
      target:...           the relays
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from gatekeep.admin._api import AdminAPI, StoreReader, make_site
from gatekeep.approvals import ApprovalService, StoreApprovals, WebhookNotifier
from gatekeep.model import Action

_log = Logger()


class ApprovalsService(service.Service):
    name = "approvals"

    def __init__(self, approvals: ApprovalService) -> None:
        self.approvals = approvals

    def startService(self) -> None:
        super().startService()
        self.approvals.recover()

    def stopService(self) -> None:
        super().stopService()
        self.approvals.shutdown()


class ClusterService(service.Service):
    """Listens for approvals given on other nodes (PostgreSQL store only)."""

    def __init__(self, cluster: Any, store: Any, retry: float = 2.0) -> None:
        self.cluster = cluster
        self.store = store
        self.retry = retry
        self._pending: Any = None

    def startService(self) -> None:
        super().startService()
        self.cluster.notifier.start()
        self._load_key()

    def _load_key(self) -> None:
        # the messages are signed with the store's cluster key: listen once it is read (the store may be down)
        self._pending = None
        if not self.running:
            return

        def loaded(key: bytes) -> None:
            if self.running:
                self.cluster.start(key)

        def failed(f: Any) -> None:
            _log.warn("cannot read the store's cluster key ({error}); approvals given on other nodes reach "
                      "this one once it can; retrying in {retry} s", error=f.getErrorMessage(), retry=self.retry)
            if self.running:
                self._pending = self.cluster.reactor.callLater(self.retry, self._load_key)

        self.store.cluster_key().addCallbacks(loaded, failed)

    def stopService(self) -> Any:
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self.cluster.stop()
        return self.cluster.notifier.stop()


def add_approvals_and_admin(top: service.MultiService, config: Any, gateway: Any, store: Any) -> ApprovalService:
    """Install the approvals service in the chain, and the admin API listener if configured."""
    from gatekeep.approvals._config import ApprovalsConfig
    from gatekeep.store.sqlite import SQLiteStore

    reactor = gateway.reactor
    chain = gateway.chain
    settings = config.approvals or ApprovalsConfig()
    registry = chain.metrics.registry
    notifier = None
    if settings.webhook is not None:
        notifier = WebhookNotifier(reactor, settings.webhook.url, timeout=settings.webhook.timeout,
                                   retries=settings.webhook.retries, approve_command=settings.approve_command)
    # reads: SQLite through its own read-only connections (one per pool thread), PostgreSQL on its pool
    reader = store if getattr(store, "aio", None) is not None else SQLiteStore(store.path, node=config.node,
                                                                               readonly=True)
    approvals = ApprovalService(
        # the policy of now (a reload replaces it), asked for a rule's review settings
        reactor, lambda name: getattr(chain.policy, "review_for", lambda _: None)(name),
        StoreApprovals.for_store(reader, chain.record, reactor), notifier=notifier, registry=registry,
        node=config.node, max_pending=settings.max_pending, approve_command=settings.approve_command)
    chain.approvals = approvals
    ApprovalsService(approvals).setServiceParent(top)
    if getattr(store, "aio", None) is not None:
        # several nodes share a PostgreSQL store: an approval given on any node reaches the holder
        from gatekeep.approvals._cluster import ApprovalCluster
        from gatekeep.store.notify import notifier_for

        approvals.cluster = ApprovalCluster(approvals, notifier_for(store, reactor), reactor, config.node)
        ClusterService(approvals.cluster, store).setServiceParent(top)

    recorder = chain.recorder
    registry.gauge("gatekeep_recorder_events_written_total", "Events the recorder has stored.",
                   function=lambda: getattr(recorder, "written", 0))
    registry.gauge("gatekeep_recorder_store_failures_total", "Failed attempts to write to the store.",
                   function=lambda: getattr(recorder, "failures", 0))
    registry.gauge("gatekeep_recorder_healthy", "1 while the store takes records, 0 while it fails.",
                   function=lambda: 1 if getattr(recorder, "healthy", True) else 0)
    registry.gauge("gatekeep_recorder_backlog_bytes", "Bytes of records kept in memory, not yet stored.",
                   function=lambda: getattr(recorder, "backlog", 0))
    registry.gauge("gatekeep_recorder_backlog_limit_bytes",
                   "recording.max_backlog: at this backlog new operations wait for the store.",
                   function=lambda: getattr(recorder, "max_backlog", 0))

    reviews = [r.name for r in config.policies if r.action is Action.REVIEW]
    if config.admin is None:
        if reviews:
            _log.warn("rules {rules} hold operations for approval but no admin API is configured (admin:): "
                      "held operations can only expire", rules=", ".join(reviews))
        return approvals

    def health() -> dict:
        return {"sessions_active": len(gateway.sessions),
                "recording": "ok" if getattr(recorder, "healthy", True) else "failing"}

    api = AdminAPI(chain=chain, approvals=approvals, roles_of=config.admin.roles_of,
                   records=StoreReader(reader, reactor), registry=registry, node=config.node,
                   metrics_public=config.admin.metrics == "public", health=health, clock=reactor.seconds)
    factory: Any = make_site(api)
    if config.admin.tls is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from gatekeep.tls import server_options

        factory = TLSMemoryBIOFactory(server_options(config.admin.tls.cert, config.admin.tls.key), False, factory)
    svc = StreamServerEndpointService(serverFromString(reactor, config.admin.listen), factory)
    svc._raiseSynchronously = True
    svc.setName("admin")
    svc.setServiceParent(top)
    _log.info("admin API listening on {listen}{tls}", listen=config.admin.listen,
              tls=" (TLS)" if config.admin.tls is not None else "")
    return approvals
