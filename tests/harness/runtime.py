"""A real ``service.runtime.Runtime`` for tests: real journal, real rules and engine, real paper brokers on a private
price feed, and a clock the test can move. ``submit`` does what the webhook does (decide, journal, dispatch)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable

from brokers.feed import PriceFeed
from engine.decide import build_engine
from engine.decision import Decision
from engine.loader import load_rules
from engine.signal import parse_signal
from service.journal import Journal
from service.runtime import Runtime

# Wednesday 2026-03-11 10:30 ET, a normal trading day, clear of every schedule window below.
NOON = datetime(2026, 3, 11, 14, 30, tzinfo=timezone.utc)
ROOT = "MES"

BROKERS = """
kind: Broker
name: fast
type: paper
rate_limit: {{requests: 1000, per_seconds: 1}}
commissions: {{MES: 0.25, default: 0.79}}
margins: {{MES: 50, default: 1000}}
reconcile_every_seconds: {reconcile}
paper: {{seed: 1, ack_latency_ms: {fast_ms}, fill_latency_ms: {fill_ms}, starting_cash: 50000}}
---
kind: Broker
name: slow
type: paper
rate_limit: {{requests: {slow_rate}, per_seconds: 1}}
commissions: {{MES: 0.20, default: 0.60}}
margins: {{MES: 40, default: 800}}
reconcile_every_seconds: {reconcile}
paper: {{seed: 2, ack_latency_ms: {slow_ms}, fill_latency_ms: {fill_ms}, starting_cash: 50000}}
"""

def account_doc(name: str, broker: str, broker_account: str, strategies: str, *, capital: int = 50000,
                instruments: str | None = "MES", **extra: Any) -> str:
    """One ``kind: Account`` document: the test rule sets differ only in these fields (``strategies`` and
    ``instruments`` are comma-separated; ``extra`` adds fields such as ``catch_up=True``, ``on_mismatch="halt"``)."""
    lines = ["kind: Account", f"name: {name}", f"broker: {broker}", f"broker_account: {broker_account}",
             f"capital: {capital}", f"strategies: [{strategies}]"]
    if instruments is not None:
        lines.append(f"instruments: [{instruments}]")
    lines += [f"{key}: {str(value).lower() if isinstance(value, bool) else value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def routing_doc(*strategies: str, best_select: str | None = None) -> str:
    """A ``kind: Routing`` document with one rule per strategy, named after it, in mirror mode; with
    ``best_select`` (comma-separated criteria) a strategy named ``best`` is routed in best mode."""
    rules = []
    for strategy in strategies:
        rule = f"  - name: {strategy}\n    match: {{strategy: {strategy}}}\n"
        if strategy == "best" and best_select is not None:
            rule += f"    mode: best\n    select: [{best_select}]\n"
        else:
            rule += "    mode: mirror\n"
        rules.append(rule)
    return "kind: Routing\nname: main\nrules:\n" + "".join(rules)


def documents(*docs: str) -> str:
    """Several YAML documents in one file."""
    return "---\n".join(docs)


ACCOUNTS = documents(
    account_doc("f1", "fast", "F-1", "mirror"),
    account_doc("f2", "fast", "F-2", "mirror", on_mismatch="halt"),
    account_doc("s1", "slow", "S-1", "mirror", catch_up=True),
    account_doc("bf", "fast", "B-F", "best"),
    account_doc("bs", "slow", "B-S", "best"),
)

ROUTING = routing_doc("mirror", "best", best_select="cheapest_commission, most_free_margin")

RISK = """
kind: Risk
name: limits
margin_buffer_pct: 0
limits:
  - name: account-loss
    scope: account
    max_daily_loss: {account_loss}
    on_breach: {account_action}
  - name: portfolio-loss
    scope: portfolio
    max_daily_loss: {portfolio_loss}
    on_breach: flatten_and_halt
"""

SCHEDULE = """
kind: Schedule
name: sessions
timezone: America/New_York
rules:
  - name: flatten-mirror
    at: "15:55"
    days: [mon, tue, wed, thu, fri]
    action: flatten
    strategies: [mirror]
  - name: no-late-entries
    between: ["15:50", "18:00"]
    days: [mon, tue, wed, thu, fri]
    action: block_entries
"""


def write_rules(directory: Path, *, fast_ms: float = 0, slow_ms: float = 0, fill_ms: float = 0,
                slow_rate: int = 1000, reconcile: int = 3600, account_loss: int = 100000,
                account_action: str = "halt_entries", portfolio_loss: int = 1000000, schedule: bool = False) -> Path:
    """Two paper brokers (``fast``/``slow``: ack latency in ms), five accounts, mirror and best routing, loss limits
    and, with ``schedule``, a 15:55 ET flatten of the mirror strategy and a 15:50-18:00 ET entry block."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "brokers.yaml").write_text(BROKERS.format(fast_ms=fast_ms, slow_ms=slow_ms, fill_ms=fill_ms,
                                                           slow_rate=slow_rate, reconcile=reconcile))
    (directory / "accounts.yaml").write_text(ACCOUNTS)
    (directory / "routing.yaml").write_text(ROUTING)
    (directory / "risk.yaml").write_text(RISK.format(account_loss=account_loss, account_action=account_action,
                                                     portfolio_loss=portfolio_loss))
    if schedule:
        (directory / "schedule.yaml").write_text(SCHEDULE)
    return directory


class Clock:
    """Real time shifted so that it starts at ``start``; ``advance`` jumps; ``freeze`` pins it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.offset = timedelta(0) if start is None else start - datetime.now(timezone.utc)
        self.frozen: datetime | None = None

    def __call__(self) -> datetime:
        return self.frozen if self.frozen is not None else datetime.now(timezone.utc) + self.offset

    def set(self, at: datetime) -> None:
        self.offset = at - datetime.now(timezone.utc)
        if self.frozen is not None:
            self.frozen = at

    def advance(self, delta: timedelta) -> None:
        self.set(self() + delta)


class StaticWatcher:
    """The part of ``RulesWatcher`` the runtime reads (``current``)."""

    def __init__(self, rules_dir: Path) -> None:
        result = load_rules(rules_dir)
        assert result.ok, [str(d) for d in result.diagnostics]
        self.ruleset = result.ruleset
        self.engine = build_engine(result.ruleset)
        self.current = (self.ruleset, self.engine)

    def close(self) -> None:
        self.engine.close()


@dataclass
class World:
    runtime: Runtime
    journal: Journal
    watcher: StaticWatcher
    feed: PriceFeed
    clock: Clock
    data_dir: Path
    decisions: list[Decision] = field(default_factory=list)

    def connector(self, broker: str) -> Any:
        assert self.runtime.pool is not None
        return self.runtime.pool.connector(broker)

    def book_orders(self, broker: str, account: str) -> list[dict[str, Any]]:
        """The broker side: every order the paper broker holds for ``account``."""
        return list(self.connector(broker).book.db.query(
            "select * from orders where account = ? order by broker_order_id", [account]))

    def book_positions(self, broker: str, account: str) -> dict[str, int]:
        """The broker side: what the paper broker holds for ``account`` (contract -> signed quantity, flat lines
        left out), not what the ledger believes."""
        return {p["contract"]: int(p["quantity"]) for p in self.connector(broker).book.positions(account)
                if int(p["quantity"])}

    async def submit(self, body: dict[str, Any], *, at: datetime | None = None) -> Decision:
        """Decide, journal (orders 'new') and dispatch, as the webhook does."""
        now = at or self.clock()
        signal = parse_signal(body)
        decision = self.watcher.engine.decide(signal, self.runtime.engine_state(now), now)
        self.runtime.hold(signal.id, decision)  # counted from the decision on, as the webhook does
        try:
            await self.journal.record_signal(
                signal_id=signal.id, raw=str(body), remote=None, status="accepted" if decision.orders else "decided",
                reason=decision.reason, key=signal.id,
                signal={k: v for k, v in vars(signal).items() if v is not None and k != "id_derived"},
                decision=decision.to_json(),
                orders=[{**o.to_json(), "margin_usd": o.margin_usd} for o in decision.orders], at=now)
            if decision.orders or decision.cancel:
                self.runtime.dispatch(signal.id, decision)
        finally:
            self.runtime.release(signal.id)  # nothing once dispatched
        self.decisions.append(decision)
        return decision

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Until every order the runtime tracks is final with its fills booked, every queue is empty, and no flatten's
        exits are held (a flatten or its follow-up waiting for its journal commit; a signal's hold is the test's)."""
        await wait_until(lambda: not self.runtime.tracker.unsettled()
                         and not any(h.flatten for h in self.runtime._holds.values())
                         and not self.runtime.redo_tasks
                         and not any(self.runtime.dispatcher.queued().values())
                         and not self.runtime.dispatcher._running, timeout_s)

    def statuses(self, signal_id: str) -> dict[str, str]:
        row = self.journal.get_signal(signal_id)
        assert row is not None
        return {o["account"]: o["status"] for o in row["orders"]}


async def wait_until(check: Callable[[], Any], timeout_s: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or check}")
        await asyncio.sleep(0.005)


def signal(strategy: str, action: str, quantity: int | None = None, sid: str | None = None, **extra: Any
           ) -> dict[str, Any]:
    body: dict[str, Any] = {"strategy": strategy, "ticker": "MES1!", "action": action, **extra}
    if quantity is not None:
        body["quantity"] = quantity
    if sid is not None:
        body["id"] = sid
    return body


@contextlib.asynccontextmanager
async def world(tmp_path: Path, *, clock: Clock | None = None, start: bool = True, journal: Journal | None = None,
                price: Decimal = Decimal("5000"), rules: dict[str, Any] | None = None,
                connector_options: dict[str, Any] | None = None, rules_dir: Path | None = None
                ) -> AsyncIterator[World]:
    """A started runtime on fresh rules in ``tmp_path`` (same ``tmp_path`` again: same journal and broker files)."""
    if rules_dir is None:
        rules_dir = write_rules(tmp_path / "rules", **(rules or {}))
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    own_journal = journal is None
    clock = clock or Clock()
    if journal is None:
        journal = Journal(data_dir / "journal.db", clock=clock)
        await journal.start()
    watcher = StaticWatcher(rules_dir)
    feed = PriceFeed(seed=0)
    feed.set_price(ROOT, price)
    config = SimpleNamespace(data_dir=data_dir, reconnect_backoff_s=0.02, reconnect_backoff_max_s=0.1)
    runtime = Runtime(config, journal, watcher, clock=clock, feed=feed,
                      connector_options={"reconnect_wait_s": 0.2, **(connector_options or {})})
    w = World(runtime, journal, watcher, feed, clock, data_dir)
    try:
        if start:
            await runtime.start()
            # start() returns before the brokers are up (the service listens meanwhile); tests begin with them.
            assert await runtime.ready(10.0), f"brokers still starting: {runtime.starting()}"
        else:
            runtime.prepare()
        yield w
    finally:
        await runtime.stop()
        watcher.close()
        if own_journal:
            await journal.close()


def app_runtime(feed: PriceFeed, start: datetime = NOON) -> Callable[[Any, Any, Any], Runtime]:
    """A ``runtime_factory`` for ``service.app.create_app``: the real Runtime on the test clock and ``feed``, with
    reconnects and backoff short enough for a test to watch a broker drop and come back."""

    def factory(config: Any, journal: Any, watcher: Any) -> Runtime:
        runtime = Runtime(config, journal, watcher, clock=Clock(start), feed=feed,
                          connector_options={"reconnect_wait_s": 0.2})
        runtime.backoff_s, runtime.backoff_max_s = 0.02, 0.1
        return runtime

    return factory

