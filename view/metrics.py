"""Prometheus metrics for one service instance.

Each app gets its own ``CollectorRegistry`` (not the process-global one), so tests can run several services in
one process and a restart starts from zero, as Prometheus expects. Money gauges are floats only here, at the very
edge, because the exposition format has no decimals; nothing reads them back.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Live:
    """Gauges computed at scrape time from the service's current view (never stale, never double-booked)."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]) -> None:
        self.source = source

    def collect(self):  # type: ignore[no-untyped-def]
        families: dict[str, GaugeMetricFamily] = {}
        for name, doc, labels, value in self.source():
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, doc, labels=sorted(labels))
            family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.signals = Counter("multibroker_signals", "Webhook signals by outcome "
                               "(accepted, no_orders, duplicate, rejected_<status>).", ["outcome"], registry=r)
        self.orders = Counter("multibroker_orders", "Order state transitions by broker and new status.",
                              ["broker", "status"], registry=r)
        self.webhook_latency = Histogram("multibroker_webhook_latency_seconds",
                                         "From request received to answer sent (signal journaled).",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.dispatch_latency = Histogram("multibroker_dispatch_latency_seconds",
                                          "From answer sent to the order handed to its broker connector.",
                                          ["broker"], buckets=LATENCY_BUCKETS, registry=r)
        self.reconciliation_mismatches = Counter("multibroker_reconciliation_mismatches",
                                                 "Differences found between our ledger and a broker.", ["broker"],
                                                 registry=r)
        self.rule_reloads = Counter("multibroker_rule_reloads", "Rule reload attempts by result.", ["result"],
                                    registry=r)
        self.last_reload_ok = Gauge("multibroker_rules_last_reload_successful",
                                    "1 if the last rule reload applied, 0 if it failed (old rules kept).",
                                    registry=r)
        self.rate_limit_waits = Counter("multibroker_rate_limit_waits",
                                        "Requests that had to wait for a broker's rate limit.", ["broker"],
                                        registry=r)
        self.last_reload_ok.set(1)

    def live(self, source: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]) -> None:
        """Register a scrape-time source of (name, help, labels, value) gauges (daily P&L, margin buffer...)."""
        self.registry.register(_Live(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def account_gauges(accounts: Iterable[object]) -> Iterable[tuple[str, str, dict[str, str], float]]:
    """Daily P&L and margin buffer per account, from ``view.aggregate.AccountView`` objects."""
    for view in accounts:
        labels = {"account": view.name, "broker": view.broker}  # type: ignore[attr-defined]
        yield ("multibroker_account_daily_pnl_usd", "Daily P&L (realized + unrealized since 18:00 ET), USD.",
               labels, float(view.daily_pnl))  # type: ignore[attr-defined]
        yield ("multibroker_account_margin_buffer_usd", "Free margin left above the required margin buffer, USD.",
               labels, float(view.buffer_left))  # type: ignore[attr-defined]
        yield ("multibroker_account_free_margin_usd", "Free margin at the account's own broker, USD.",
               labels, float(view.free_margin))  # type: ignore[attr-defined]


def as_float(value: Decimal | int | float) -> float:
    return float(value)
