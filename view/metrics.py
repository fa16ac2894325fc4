"""Prometheus metrics for one service instance.

Each app gets its own ``CollectorRegistry`` (not the process-global one), so tests can run several services in
one process and a restart starts from zero, as Prometheus expects. Money gauges are floats only here, at the very
edge, because the exposition format has no decimals; nothing reads them back.

Most counters are fed from the journal at scrape time (``JournalFeed``): the journal already records every signal
outcome, order transition, reconciliation and reload, so counting its new rows since the last scrape gives exact
numbers without threading a metrics object through the webhook and the dispatcher's hot paths. Only the webhook
latency is observed live (by a middleware), because no row records when the answer left.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
                                          "From the signal received to its order handed to the broker connector "
                                          "(journaled 'sending').",
                                          ["broker"], buckets=LATENCY_BUCKETS, registry=r)
        self.reconciliation_mismatches = Counter("multibroker_reconciliation_mismatches",
                                                 "Differences found between our ledger and a broker.", ["broker"],
                                                 registry=r)
        self.rule_reloads = Counter("multibroker_rule_reloads", "Rule reload attempts by result.", ["result"],
                                    registry=r)
        self.last_reload_ok = Gauge("multibroker_rules_last_reload_successful",
                                    "1 if the last rule reload applied, 0 if it failed (old rules kept).",
                                    registry=r)
        self.last_reload_ok.set(1)

        self._before_scrape: list[Callable[[], None]] = []

    def before_scrape(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` before every scrape (pull what happened since the last one)."""
        self._before_scrape.append(hook)

    def live(self, source: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]) -> None:
        """Register a scrape-time source of (name, help, labels, value) gauges (daily P&L, margin buffer...)."""
        self.registry.register(_Live(source))

    def render(self) -> bytes:
        for hook in self._before_scrape:
            hook()
        return generate_latest(self.registry)


class JournalFeed:
    """Counts the journal rows written since the previous scrape into the counters and histograms.

    The cursors start at the journal's current end, so a restarted service counts from zero like any Prometheus
    counter (``rate()`` handles the reset) instead of replaying history as one huge burst.
    """

    def __init__(self, metrics: Metrics, journal: Any) -> None:
        self.metrics = metrics
        self.journal = journal
        self.signal_at = self._last(journal.signal_outcomes_after(0), "rowid")
        self.event_at = self._last(journal.order_transitions_after(0), "id")
        self.reconciliation_at = self._last(journal.reconciliation_mismatches_after(0), "id")
        self.reload_at = self._last(journal.reload_outcomes_after(0), "id")

    @staticmethod
    def _last(rows: list[dict[str, Any]], key: str) -> int:
        return int(rows[-1][key]) if rows else 0

    def __call__(self) -> None:
        m, j = self.metrics, self.journal
        rows = j.signal_outcomes_after(self.signal_at)
        for row in rows:
            m.signals.labels(outcome=row["status"]).inc()
        self.signal_at = self._last(rows, "rowid") or self.signal_at
        rows = j.order_transitions_after(self.event_at)
        for row in rows:
            m.orders.labels(broker=row["broker"] or "", status=row["status"]).inc()
            if row["status"] == "sending" and row["received_at"]:
                waited = (_parse(row["at"]) - _parse(row["received_at"])).total_seconds()
                m.dispatch_latency.labels(broker=row["broker"] or "").observe(max(waited, 0.0))
        self.event_at = self._last(rows, "id") or self.event_at
        rows = j.reconciliation_mismatches_after(self.reconciliation_at)
        for row in rows:
            m.reconciliation_mismatches.labels(broker=row["broker"] or "").inc(int(row["mismatches"] or 0))
        self.reconciliation_at = self._last(rows, "id") or self.reconciliation_at
        rows = j.reload_outcomes_after(self.reload_at)
        for row in rows:
            m.rule_reloads.labels(result=row["outcome"] or ("applied" if row["ok"] else "invalid")).inc()
        if rows:
            m.last_reload_ok.set(1 if rows[-1]["ok"] else 0)
        self.reload_at = self._last(rows, "id") or self.reload_at


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class _RateLimitWaits:
    """Requests that waited for a broker's rate limit, read from each connector's limiter at scrape time."""

    def __init__(self, connectors: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self.connectors = connectors

    def collect(self):  # type: ignore[no-untyped-def]
        family = CounterMetricFamily("multibroker_rate_limit_waits", "Requests that had to wait for a broker's "
                                     "rate limit (or a penalty the broker imposed).", labels=["broker"])
        for name, connector in self.connectors():
            limiter = getattr(connector, "limiter", None)
            family.add_metric([name], float(getattr(limiter, "waits", 0) or 0))
        yield family


def rate_limit_waits(metrics: Metrics, connectors: Callable[[], Iterable[tuple[str, Any]]]) -> None:
    metrics.registry.register(_RateLimitWaits(connectors))


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
