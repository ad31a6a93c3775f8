"""
A small metrics registry that renders the Prometheus text format (0.0.4).

No dependency and no background work: counters and histograms are plain
dictionaries updated in the reactor thread, gauges may be functions read only
when ``/metrics`` is scraped. :class:`GatewayMetrics` holds the families the
chain updates; other parts (the approvals service, the recorder) add their own
to the same :class:`Registry`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any, Callable, Iterable

#: seconds: from a cached decision (microseconds) to a person's approval (minutes)
DEFAULT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Family:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def lines(self) -> list[str]:
        out = self.header()
        if not self.values and not self.labels:
            out.append(f"{self.name} 0")
        for key, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.labels, key)} {_number(v)}")
        return out


class Gauge(_Family):
    """A value set by the code, or read from ``function()`` at scrape time
    (a number, or a mapping of label tuples to numbers)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), function: Callable[[], Any] | None = None):
        super().__init__(name, help, labels)
        self.function = function
        self.values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) - amount

    def value(self, *labels: str) -> float:
        if self.function is not None:
            found = self.function()
            return found.get(labels, 0.0) if isinstance(found, dict) else float(found)
        return self.values.get(labels, 0.0)

    def lines(self) -> list[str]:
        out = self.header()
        values = self.values
        if self.function is not None:
            try:
                found = self.function()
            except Exception:
                return out  # a gauge that cannot be read is left out, not the whole scrape
            values = found if isinstance(found, dict) else {(): float(found)}
        if not values and not self.labels:
            values = {(): 0.0}
        for key, v in sorted(values.items()):
            out.append(f"{self.name}{_labels(self.labels, key)} {_number(v)}")
        return out


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        #: labels -> [count per bucket (+Inf last), sum]
        self.values: dict[tuple[str, ...], list] = {}

    def observe(self, value: float, *labels: str) -> None:
        entry = self.values.get(labels)
        if entry is None:
            entry = self.values[labels] = [[0] * (len(self.buckets) + 1), 0.0]
        entry[0][bisect_left(self.buckets, value)] += 1
        entry[1] += value

    def count(self, *labels: str) -> int:
        entry = self.values.get(labels)
        return sum(entry[0]) if entry else 0

    def lines(self) -> list[str]:
        out = self.header()
        for key, (counts, total) in sorted(self.values.items()):
            running = 0
            for bound, n in zip(self.buckets + (math.inf,), counts):
                running += n
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {running}")
        return out


class Registry:
    """Metric families by name, rendered in registration order."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def _add(self, family: _Family) -> Any:
        existing = self._families.get(family.name)
        if existing is not None:
            if type(existing) is not type(family) or existing.labels != family.labels:
                raise ValueError(f"metric {family.name} is already registered differently")
            return existing
        self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        return self._add(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: Iterable[str] = (),
              function: Callable[[], Any] | None = None) -> Gauge:
        return self._add(Gauge(name, help, labels, function))

    def histogram(self, name: str, help: str, labels: Iterable[str] = (),
                  buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))

    def get(self, name: str) -> Any:
        return self._families.get(name)

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.extend(family.lines())
        return "\n".join(lines) + "\n"


#: the content type of :meth:`Registry.render`
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    """The families the chain keeps: sessions, logins, decisions and operations."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        r = self.registry
        self.sessions = r.counter("gatekeep_sessions_total", "Sessions that passed authentication.",
                                  ("protocol", "target"))
        self.active = r.gauge("gatekeep_sessions_active", "Sessions open now.")
        self.login_failures = r.counter("gatekeep_login_failures_total", "Failed authentication attempts.",
                                        ("protocol", "target"))
        self.decisions = r.counter("gatekeep_decisions_total",
                                   "Policy decisions by protocol and action (review: held for approval).",
                                   ("protocol", "action"))
        self.decision_seconds = r.histogram("gatekeep_decision_seconds",
                                            "Time the policy took to decide on an operation.", ("protocol",))
        self.operations = r.counter("gatekeep_operations_total",
                                    "Operations (statements, commands, requests) by protocol and final action.",
                                    ("protocol", "action"))

    def session_started(self, protocol: str, target: str) -> None:
        self.sessions.inc(protocol, target)
        self.active.inc()

    def session_ended(self) -> None:
        self.active.dec()
