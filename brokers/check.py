"""Pre-flight check of every configured broker: can we log in, place, cancel — and how fast, and how skewed?

Run before a session (``multibroker brokers check``) so a broken credential, a throttled app or a drifting clock is
found by a person at 08:00, not by a signal at 09:30. The probe trades as little as possible: one limit order far
from the market, placed and cancelled. Only the paper broker (no money at stake) also does a market order and its
flattening, which measures fill latency.

Measuring lives here (async, talks to brokers); rendering is pure and separate so tests can read both.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Mapping

from brokers.base import (
    Connector,
    FillEvent,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    make_connector,
)
from brokers.feed import DEFAULT_START_PRICES, FALLBACK_START_PRICE, snap
from engine.catalog import Catalog
from engine.model import Broker, RuleSet
from engine.symbols import front_contract

SLOW_MS = 500.0
"""Anything slower (or a clock further off) than this is flagged for a person to look at."""
PROBE_ROOT = "MES"
"""The cheapest liquid contract: what the probe trades unless the account allows only other roots."""
FAR_FRACTION = Decimal("0.5")
"""The probe's buy limit sits at half the reference price: never fills, never outside a price band on the buy side."""


@dataclass
class BrokerCheck:
    """What we learned about one broker. Times in milliseconds; ``None`` when not measured."""

    broker: str
    type: str
    ok: bool = False
    error: str | None = None
    account: str | None = None
    contract: str | None = None
    login_ms: float | None = None
    ack_ms: float | None = None
    cancel_ms: float | None = None
    fill_ms: float | None = None
    headroom: float | None = None
    clock_offset_ms: float | None = None
    """Broker clock minus ours (positive: the broker is ahead)."""
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def flag_slow(self) -> None:
        for label, value in (("login", self.login_ms), ("ack latency", self.ack_ms),
                             ("cancel latency", self.cancel_ms), ("fill latency", self.fill_ms)):
            if value is not None and value > SLOW_MS:
                self.flags.append(f"{label} {value:.0f} ms > {SLOW_MS:.0f} ms")
        if self.clock_offset_ms is not None and abs(self.clock_offset_ms) > SLOW_MS:
            self.flags.append(f"clock offset {self.clock_offset_ms:+.0f} ms beyond ±{SLOW_MS:.0f} ms")


def _ms(start: float, end: float | None = None) -> float:
    return round(((time.perf_counter() if end is None else end) - start) * 1000, 1)


def probe_account(broker: Broker, ruleset: RuleSet | None) -> tuple[str | None, str]:
    """The broker account the probe trades in and the root it trades: the first Account of this broker."""
    if ruleset is None:
        return None, PROBE_ROOT
    for account in ruleset.accounts.values():
        if account.broker == broker.name:
            roots = account.instruments
            root = PROBE_ROOT if not roots or PROBE_ROOT in roots else roots[0]
            return account.broker_account, root
    return None, PROBE_ROOT


def far_limit_price(connector: Connector, contract: str, catalog: Catalog) -> Decimal:
    """A buy limit that cannot fill: half the current (paper) or typical price, on the tick."""
    root = contract[:-2]
    feed = getattr(connector, "feed", None)
    reference = feed.price(contract) if feed is not None else DEFAULT_START_PRICES.get(root, FALLBACK_START_PRICE)
    return max(snap(reference * FAR_FRACTION, catalog[root].tick_size), catalog[root].tick_size)


async def _wait_filled(connector: Connector, queue: "asyncio.Queue[Any]", request: OrderRequest,
                       placed: Order, timeout_s: float) -> None:
    """Until the order is filled: the event stream when it talks, the broker's answer otherwise."""
    if placed.status is OrderStatus.FILLED:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            event = await asyncio.wait_for(queue.get(), 0.05)
        except asyncio.TimeoutError:
            order = await connector.find_order(request.account, request.client_order_id)
            if order is not None and order.status is OrderStatus.FILLED:
                return
            continue
        if isinstance(event, FillEvent) and event.fill.broker_order_id == placed.broker_order_id:
            order = await connector.find_order(request.account, request.client_order_id)
            if order is not None and order.status is OrderStatus.FILLED:
                return
    raise TimeoutError(f"order {request.client_order_id} not filled within {timeout_s:g}s")


async def _clock_offset(connector: Connector, placed_at: datetime, acked_at: datetime, order: Order) -> float:
    """Broker time minus ours: from the broker's clock when it has an endpoint, else from the order's stamp."""
    server_time = getattr(connector, "server_time", None)
    if server_time is not None:
        before = datetime.now(timezone.utc)
        theirs = await server_time()
        after = datetime.now(timezone.utc)
        ours = before + (after - before) / 2
    else:
        theirs, ours = order.created_at, placed_at + (acked_at - placed_at) / 2
    return round((theirs - ours) / timedelta(milliseconds=1), 1)


async def check_broker(broker: Broker, ruleset: RuleSet | None = None, *,
                       factory: Callable[..., Connector] = make_connector, timeout_s: float = 20.0,
                       connector_options: Mapping[str, Any] | None = None) -> BrokerCheck:
    """Connect, probe and measure one broker; never raises (the failure is in the result)."""
    result = BrokerCheck(broker.name, broker.type)
    try:
        await asyncio.wait_for(_probe(broker, ruleset, factory, dict(connector_options or {}), result, timeout_s),
                               timeout_s)
        result.ok = True
    except asyncio.TimeoutError:
        result.error = f"no answer within {timeout_s:g}s"
    except Exception as exc:  # noqa: BLE001 - a check reports every failure, whatever its kind
        result.error = f"{type(exc).__name__}: {exc}"
    result.flag_slow()
    return result


async def _probe(broker: Broker, ruleset: RuleSet | None, factory: Callable[..., Connector],
                 options: dict[str, Any], result: BrokerCheck, timeout_s: float) -> None:
    catalog = ruleset.catalog if ruleset is not None else Catalog()
    connector = factory(broker, **options)
    started = time.perf_counter()
    try:
        await connector.connect()
        result.login_ms = _ms(started)
        account, root = probe_account(broker, ruleset)
        if account is None:
            result.notes.append("no Account uses this broker: login checked, order probe skipped")
            result.headroom = round(connector.rate_limit_headroom(), 3)
            return
        contract = front_contract(catalog[root], datetime.now(timezone.utc))
        result.account, result.contract = account, contract
        tag = uuid.uuid4().hex[:12]

        limit = OrderRequest(f"check-{tag}-L", account, contract, Side.BUY, 1, OrderType.LIMIT,
                             limit_price=far_limit_price(connector, contract, catalog))
        placed_at = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        resting = await connector.place_order(limit)
        result.ack_ms = _ms(t0)
        acked_at = datetime.now(timezone.utc)
        try:
            result.clock_offset_ms = await _clock_offset(connector, placed_at, acked_at, resting)
        finally:
            if resting.status.is_final:
                result.notes.append(f"probe limit order ended {resting.status.value} instead of resting")
            else:
                t0 = time.perf_counter()
                cancelled = await connector.cancel_order(account, resting.broker_order_id)
                result.cancel_ms = _ms(t0)
                if cancelled.status not in (OrderStatus.CANCELLED, OrderStatus.PENDING, OrderStatus.WORKING):
                    result.notes.append(f"cancel answered {cancelled.status.value}")

        if broker.type == "paper":
            await _fill_probe(connector, account, contract, tag, result, timeout_s)
        result.headroom = round(connector.rate_limit_headroom(), 3)
    finally:
        await connector.close()


async def _fill_probe(connector: Connector, account: str, contract: str, tag: str, result: BrokerCheck,
                      timeout_s: float) -> None:
    """Paper only: a market order and its flattening, to measure fill latency (costs simulated commissions)."""
    queue = connector.subscribe()
    buy = OrderRequest(f"check-{tag}-B", account, contract, Side.BUY, 1)
    t0 = time.perf_counter()
    placed = await connector.place_order(buy)
    await _wait_filled(connector, queue, buy, placed, timeout_s)
    result.fill_ms = _ms(t0)
    flatten = OrderRequest(f"check-{tag}-S", account, contract, Side.SELL, 1)
    closing = await connector.place_order(flatten)
    await _wait_filled(connector, queue, flatten, closing, timeout_s)


# -- rendering (pure) ------------------------------------------------------------------------------------------

def _cell(value: float | None, unit: str = " ms", *, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.0f}{unit}" if signed else f"{value:.0f}{unit}"
    return text + ("!" if abs(value) > SLOW_MS and unit == " ms" else "")


def render_text(results: list[BrokerCheck]) -> str:
    header = ("broker", "type", "status", "login", "ack", "cancel", "fill", "headroom", "clock")
    rows = [header]
    for r in results:
        rows.append((r.broker, r.type, "ok" if r.ok else "FAILED", _cell(r.login_ms), _cell(r.ack_ms),
                     _cell(r.cancel_ms), _cell(r.fill_ms),
                     "-" if r.headroom is None else f"{r.headroom:.0%}", _cell(r.clock_offset_ms, signed=True)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    for r in results:
        for message in ([r.error] if r.error else []) + r.flags + r.notes:
            lines.append(f"{r.broker}: {message}")
    failed = sum(not r.ok for r in results)
    flagged = sum(bool(r.flags) for r in results)
    lines.append(f"{len(results)} broker(s) checked: {len(results) - failed} ok, {failed} failed, "
                 f"{flagged} flagged (> {SLOW_MS:.0f} ms)")
    return "\n".join(lines)


def render_json(results: list[BrokerCheck]) -> str:
    return json.dumps({"ok": all(r.ok for r in results), "slow_ms": SLOW_MS,
                       "brokers": [asdict(r) for r in results]}, indent=2)
