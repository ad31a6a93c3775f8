"""
The rule engine: ordered rules from the configuration's ``policies`` list.

Each rule has a ``match`` and an ``action`` (allow, deny, review). The first
rule whose match fits an operation decides; when none does, the target's
``default_action`` decides. Common match keys (``identities``, ``groups``,
``targets``) work for every protocol; other keys belong to the protocol plugin
that claims them (``statements``, ``tables`` ... for PostgreSQL), and a rule
with such keys applies only to operations of that protocol.

Before any rule, the protocol plugin describes the operation (its *facts*). An
operation the plugin cannot judge (a statement that does not parse, SQL built at
run time) is denied, unless the target says ``unjudgeable: allow``. Facts that
name a ``refused`` (rule, reason) are denied whatever the rules and settings
say: what gatekeep itself cannot relay (a PostgreSQL switch to a client encoding
it cannot read).

Decisions are cached when the plugin gives the facts a cache key, so a repeated
statement costs a dictionary lookup. A plugin with ``cacheKey(operation,
target)`` names that key without working out the facts (it must be the key the
facts would carry).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Mapping

import attrs
from zope.interface import implementer

from gatekeep.bounded import BoundedCache
from gatekeep.config import ConfigError, Node, unknown_key
from gatekeep.interfaces import IPolicy
from gatekeep.model import Action, Decision, Operation

COMMON_KEYS = ("identities", "groups", "targets")
UNJUDGEABLE = "unjudgeable"
CACHE_LIMIT = 20000
#: facts not worked out yet (None is a plugin's answer: no facts)
_NOT_YET = object()
#: bytes of keys the decision cache may hold (keys carry statement shapes and request targets)
CACHE_BYTES = 64 * 1024 * 1024


@attrs.frozen
class Review:
    """``review:`` of a rule whose action is review (held for approval)."""

    approvers: tuple[str, ...] = ()
    approvals: int = 1
    timeout: float = 600.0
    reason_required: bool = False
    #: None for "once", or the window in seconds
    window: float | None = None


@attrs.frozen
class Rule:
    name: str
    action: Action
    identities: tuple[str, ...] | None = None
    groups: frozenset[str] | None = None
    targets: tuple[str, ...] | None = None
    #: the protocol whose keys the match uses, or None for a rule on common keys only
    protocol: str | None = None
    matcher: Any = None
    reason: str = ""
    review: Review | None = None

    def applies_to_session(self, op: Operation) -> bool:
        s = op.session
        if self.identities is not None and not any(fnmatchcase(s.identity.name, p) for p in self.identities):
            return False
        if self.groups is not None and self.groups.isdisjoint(s.identity.groups):
            return False
        if self.targets is not None and not any(fnmatchcase(s.target, p) for p in self.targets):
            return False
        if self.protocol is not None and self.protocol != s.protocol:
            return False
        return True


def read_review(node: Node | None) -> Review | None:
    if node is None:
        return None
    grant = node.raw("grant", "once")
    window = None
    if isinstance(grant, dict):
        g = Node.of(grant, node.sub("grant"), node.base)
        window = g.duration("window")
        g.finish()
    elif grant != "once":
        raise ConfigError(node.sub("grant"), f"expected once or {{window: DURATION}}, got {grant!r}")
    review = Review(
        approvers=node.strings("approvers", ()),
        approvals=node.int("approvals", 1, low=1, high=10),
        timeout=node.duration("timeout", 600.0),
        reason_required=node.bool("reason_required", False),
        window=window,
    )
    node.finish()
    return review


def read_rule(node: Node, plugins: Mapping[str, Any]) -> Rule:
    name = node.str("name")
    action = Action(node.str("action", choices=tuple(a.value for a in Action)))
    match = node.child("match", None) or Node({}, node.sub("match"), node.base)
    identities = match.strings("identities", None)
    groups = match.strings("groups", None)
    targets = match.strings("targets", None)
    extra = [k for k in match.value if k not in COMMON_KEYS]
    protocol = matcher = None
    if extra:
        # the plugin that claims every key (kubernetes rules may add HTTP keys), else the first key's owner
        owners = {p.name for p in plugins.values() if all(k in getattr(p, "matchKeys", ()) for k in extra)} \
            or {p.name for p in plugins.values() if extra[0] in getattr(p, "matchKeys", ())}
        if not owners:
            known = set(COMMON_KEYS).union(*(getattr(p, "matchKeys", ()) for p in plugins.values()))
            raise unknown_key(match.sub(extra[0]), extra[0], known)
        protocol = sorted(owners)[0]
        matcher = plugins[protocol].parseMatch(match)
    match.finish()
    review = read_review(node.child("review", None))
    if action is Action.REVIEW and review is None:
        review = Review()
    if action is not Action.REVIEW and review is not None:
        raise ConfigError(node.sub("review"), "only rules with action: review take review settings")
    rule = Rule(name, action, identities, frozenset(groups) if groups is not None else None, targets, protocol,
                matcher, node.str("reason", ""), review)
    node.finish()
    return rule


@implementer(IPolicy)
class RuleEngine:
    def __init__(self, rules: tuple[Rule, ...], targets: Mapping[str, Any], plugins: Mapping[str, Any]) -> None:
        self.rules = rules
        self.targets = targets
        self.plugins = plugins
        self._cache = BoundedCache(CACHE_LIMIT, CACHE_BYTES)
        #: decisions made and cache hits, for metrics
        self.decisions = 0
        self.cache_hits = 0

    def decide(self, operation: Operation) -> Decision:
        self.decisions += 1
        session = operation.session
        plugin = self.plugins.get(session.protocol)
        target = self.targets[session.target]
        # a plugin that can name the cache key without working out the facts: a hit needs none
        quick = getattr(plugin, "cacheKey", None)
        key = quick(operation, target) if quick is not None else None
        facts = _NOT_YET
        if key is None and plugin is not None:
            facts = plugin.facts(operation, target)
            key = getattr(facts, "cache_key", None)
        if key is not None:
            key = (session.target, session.identity.name, session.identity.groups, key)
            cached = self._cache.get(key)
            if cached is not None:
                self.cache_hits += 1
                return cached
        if facts is _NOT_YET:
            facts = plugin.facts(operation, target) if plugin is not None else None
        decision = self._decide(operation, facts)
        if key is not None:
            self._cache.put(key, decision)
        return decision

    def _decide(self, operation: Operation, facts: Any) -> Decision:
        target = self.targets[operation.session.target]
        summary = facts.summary() if facts is not None else {}
        refused = getattr(facts, "refused", None)
        if refused:  # gatekeep itself cannot relay it, whatever the rules and settings say
            return Decision(Action.DENY, refused[0], refused[1], summary)
        if facts is not None and facts.unjudgeable and getattr(target, "unjudgeable", "deny") != "allow":
            return Decision(Action.DENY, UNJUDGEABLE, facts.unjudgeable, summary)
        for rule in self.rules:
            if not rule.applies_to_session(operation):
                continue
            if rule.matcher is not None and not self._fits(rule, facts, operation):
                continue
            return Decision(rule.action, rule.name, rule.reason, summary)
        if target.default_action == "allow":
            return Decision(Action.ALLOW, None, "", summary)
        return Decision(Action.DENY, None, "denied by the target's default action", summary)

    @staticmethod
    def _fits(rule: Rule, facts: Any, operation: Operation) -> bool:
        """A deny or review rule fits when any part of the operation matches; an allow rule
        only when every part does (plugins that split operations into parts offer ``matches_all``)."""
        if rule.action is Action.ALLOW and hasattr(rule.matcher, "matches_all"):
            return rule.matcher.matches_all(facts, operation)
        return rule.matcher.matches(facts, operation)

    def review_for(self, rule_name: str) -> Review | None:
        for rule in self.rules:
            if rule.name == rule_name:
                return rule.review
        return None
