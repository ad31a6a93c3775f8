"""
The identity providers of a running gateway, and their reload.

:class:`IdentityService` builds the chain's providers from the configuration
(the ``identities`` list, then the ``oidc`` issuer when there is one), starts
and stops the OIDC provider's key refresh, and reloads both from the
configuration file on SIGHUP (``twistd gatekeep`` only): the new providers
replace the old ones at once, and every live session is asked again, so
sessions whose identity was removed, whose groups or token changed, or whose
OIDC issuer or audience is no longer accepted end, and the others go on.

``policies`` and ``masking`` are reloaded too: every operation from then on
is judged by the new rules (decisions cached under the old ones are dropped,
and a prepared statement is judged again at its next execution), and sessions
that start from then on are masked by the new rules; an open session keeps the
masking it started with. Other changes (targets, recording, store, node) are
reported in the log and need a restart.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from gatekeep.config import Config, ConfigError, load
from gatekeep.identity.oidc import OidcIdentityProvider
from gatekeep.identity.tokens import StaticIdentityProvider

_log = Logger()

#: configuration sections a reload does not apply
_NOT_RELOADED = ("targets", "recording", "store", "node")


def providers_for(config: Config, reactor: Any, previous: list | None = None) -> list:
    """The identity providers for ``config``; an OIDC provider with unchanged settings is kept."""
    providers: list = [StaticIdentityProvider.from_config(config.identities)]
    if config.oidc is not None:
        kept = [p for p in previous or () if isinstance(p, OidcIdentityProvider) and p.config == config.oidc]
        providers.append(kept[0] if kept else OidcIdentityProvider(config.oidc, reactor))
    return providers


class IdentityService(service.Service):
    name = "identities"

    def __init__(self, gateway: Any, config: Config) -> None:
        self.gateway = gateway
        self.config = config
        #: set by ``twistd gatekeep``: reload identities on SIGHUP
        self.reload_on_sighup = False
        self._previous_handler: Any = None

    def _oidc(self, providers: list) -> list[OidcIdentityProvider]:
        return [p for p in providers if isinstance(p, OidcIdentityProvider)]

    def _start(self, provider: OidcIdentityProvider) -> None:
        provider.on_refresh = self.gateway.recheck_sessions
        provider.start()

    def startService(self) -> None:
        super().startService()
        for provider in self._oidc(self.gateway.chain.identities):
            self._start(provider)
        if self.reload_on_sighup:
            reactor = self.gateway.reactor
            self._previous_handler = signal.signal(
                signal.SIGHUP, lambda signum, frame: reactor.callFromThread(self.reload))

    def stopService(self) -> None:
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        for provider in self._oidc(self.gateway.chain.identities):
            provider.on_refresh = None
            provider.stop()

    def reload(self) -> bool:
        """Read the configuration file again and apply its identities; False when it is refused."""
        if self.config.source is None:
            _log.warn("cannot reload: the configuration did not come from a file")
            return False
        try:
            config = load(self.config.source)
        except ConfigError as e:
            _log.error("configuration reload refused, keeping the running one: {error}", error=str(e))
            return False
        self.apply(config)
        return True

    def apply(self, config: Config) -> None:
        """Use the identities and OIDC settings of ``config``; end the sessions they no longer allow."""
        old = list(self.gateway.chain.identities)
        new = providers_for(config, self.gateway.reactor, old)
        self.gateway.chain.identities = new
        for provider in self._oidc(old):
            if provider not in new:
                provider.on_refresh = None
                provider.stop()
        if self.running:
            for provider in self._oidc(new):
                if provider not in old:
                    self._start(provider)
        rules = self._rules(config)
        changed = [key for key in _NOT_RELOADED if getattr(config, key) != getattr(self.config, key)]
        if changed:
            _log.warn("configuration reload: {sections} changed and need a restart; identities, policies and "
                      "masking were reloaded", sections=", ".join(changed))
        self.config = config
        ended = self.gateway.recheck_sessions()
        _log.info("configuration reloaded: {identities} identities{oidc}{rules}; {ended} sessions ended",
                  identities=len(config.identities), oidc=", OIDC issuer " + config.oidc.issuer if config.oidc else "",
                  rules=rules, ended=len(ended))

    def _rules(self, config: Config) -> str:
        """Put the policies and masking rules of ``config`` in use where they changed; what changed, for the log."""
        from gatekeep.masking.rules import MaskingPolicy
        from gatekeep.plugin import protocol_plugins
        from gatekeep.policy.engine import RuleEngine

        chain = self.gateway.chain
        said = ""
        # only what the configuration built (a RuleEngine, a MaskingPolicy) is replaced by what it now says
        if config.policies != self.config.policies and isinstance(chain.policy, RuleEngine):
            # targets are not reloaded: the running ones keep their default_action and unjudgeable settings
            chain.use_policy(RuleEngine(config.policies, chain.policy.targets, protocol_plugins()))
            said += f", {len(config.policies)} policy rules"
        if config.masking != self.config.masking and isinstance(chain.masking, MaskingPolicy):
            chain.masking = MaskingPolicy(config.masking)
            said += f", {len(config.masking)} masking rules (for sessions that start from now)"
        return said
