"""One behavioural contract, every connector: the suite runs against each harness in ``tests.harness``.

A harness whose module (or its connector) does not exist yet is skipped *visibly*, with the reason in the pytest
summary, never silently. What is promised here is what the engine relies on: fills at the broker's price with its
commissions, far limit orders rest and cancel, rejections leave nothing behind, P&L adds up after a round turn, an
order is never duplicated (lost answers, rate limits, drops), and every time is aware UTC.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from brokers.base import (
    BrokerError,
    BrokerUnavailable,
    FillEvent,
    Order,
    OrderRejected,
    OrderRequest,
    OrderStatus,
    OrderType,
    OutcomeUnknown,
    Side,
)
from tests.harness import HARNESS_MODULES, BrokerHarness

WAIT_S = 5.0


@pytest.fixture(params=HARNESS_MODULES)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    module = pytest.importorskip(
        f"tests.harness.{request.param}",
        reason=f"harness tests/harness/{request.param}.py (or the connector it drives) is not in the tree yet",
    )
    async with module.make_harness(tmp_path) as h:
        yield h


def coid() -> str:
    return f"ct-{uuid.uuid4().hex[:16]}"


def market(h: BrokerHarness, side: Side, qty: int, client_order_id: str | None = None) -> OrderRequest:
    return OrderRequest(client_order_id or coid(), h.account, h.contract, side, qty)


async def wait_for_order(h: BrokerHarness, client_order_id: str,
                         done: Callable[[Order], bool] = lambda o: o.status is OrderStatus.FILLED) -> Order:
    """Poll the broker until the order satisfies ``done`` (fills may arrive after the placement answer)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        order = await h.connector.find_order(h.account, client_order_id)
        if order is not None and done(order):
            return order
        if time.monotonic() > deadline:
            raise AssertionError(f"order {client_order_id} did not reach the expected state: {order}")
        await asyncio.sleep(0.02)


async def flat_quantity(h: BrokerHarness) -> int:
    return sum(p.quantity for p in await h.connector.positions(h.account) if p.contract == h.contract)


async def test_market_order_fills_at_the_set_price_with_commission(harness: BrokerHarness) -> None:
    h = harness
    h.set_price(Decimal("6000.25"))
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    request = market(h, Side.BUY, 1)
    placed = await h.connector.place_order(request)
    assert placed.client_order_id == request.client_order_id
    order = await wait_for_order(h, request.client_order_id)
    assert order.filled_quantity == 1
    assert order.avg_fill_price == Decimal("6000.25")
    fills = [f for f in await h.connector.fills_since(h.account, since)
             if f.client_order_id == request.client_order_id or f.broker_order_id == order.broker_order_id]
    assert [(f.quantity, f.price, f.side) for f in fills] == [(1, Decimal("6000.25"), Side.BUY)]
    assert fills[0].commission == h.commission_per_side
    assert await flat_quantity(h) == 1


async def test_far_limit_order_rests_and_cancels(harness: BrokerHarness) -> None:
    h = harness
    h.set_price(Decimal("6000"))
    request = OrderRequest(coid(), h.account, h.contract, Side.BUY, 1, OrderType.LIMIT,
                           limit_price=Decimal("5000"))
    placed = await h.connector.place_order(request)
    order = await wait_for_order(h, request.client_order_id, lambda o: o.status is OrderStatus.WORKING)
    assert order.broker_order_id == placed.broker_order_id
    assert order.limit_price == Decimal("5000")
    working = await h.connector.working_orders(h.account)
    assert placed.broker_order_id in {o.broker_order_id for o in working}

    cancelled = await h.connector.cancel_order(h.account, placed.broker_order_id)
    assert cancelled.broker_order_id == placed.broker_order_id
    final = await wait_for_order(h, request.client_order_id, lambda o: o.status is OrderStatus.CANCELLED)
    assert final.filled_quantity == 0
    assert placed.broker_order_id not in {o.broker_order_id for o in await h.connector.working_orders(h.account)}
    assert await flat_quantity(h) == 0


async def test_partial_fills_arrive_as_separate_fills(harness: BrokerHarness) -> None:
    h = harness
    h.set_price(Decimal("6001"))
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    h.partial_fill_next([1, 2])
    request = market(h, Side.BUY, 3)
    await h.connector.place_order(request)
    order = await wait_for_order(h, request.client_order_id)
    assert order.filled_quantity == 3
    fills = [f for f in await h.connector.fills_since(h.account, since) if f.broker_order_id == order.broker_order_id]
    assert sorted(f.quantity for f in fills) == [1, 2]
    assert sum(f.commission for f in fills) == 3 * h.commission_per_side
    assert await flat_quantity(h) == 3


async def test_rejected_order_raises_and_leaves_nothing(harness: BrokerHarness) -> None:
    h = harness
    h.reject_next()
    request = market(h, Side.BUY, 1)
    with pytest.raises(OrderRejected) as excinfo:
        await h.connector.place_order(request)
    assert excinfo.value.reason
    assert await h.connector.find_order(h.account, request.client_order_id) is None
    assert await h.broker_order_count(request.client_order_id) == 0
    assert await flat_quantity(h) == 0
    # The next order goes through: one rejection does not poison the connector.
    ok = market(h, Side.BUY, 1)
    await h.connector.place_order(ok)
    await wait_for_order(h, ok.client_order_id)


async def test_round_turn_realizes_pnl_net_of_commissions(harness: BrokerHarness) -> None:
    h = harness
    before = await h.connector.account_snapshot(h.account)
    h.set_price(Decimal("6000"))
    buy = market(h, Side.BUY, 2)
    await h.connector.place_order(buy)
    await wait_for_order(h, buy.client_order_id)
    assert await flat_quantity(h) == 2
    h.set_price(Decimal("6010"))
    sell = market(h, Side.SELL, 2)
    await h.connector.place_order(sell)
    sold = await wait_for_order(h, sell.client_order_id)
    assert sold.avg_fill_price == Decimal("6010")
    assert await flat_quantity(h) == 0

    expected = Decimal(10) * 2 * h.point_value - 4 * h.commission_per_side
    deadline = time.monotonic() + WAIT_S
    while True:  # brokers may book the cash a moment after the fill
        after = await h.connector.account_snapshot(h.account)
        if after.cash_balance - before.cash_balance == expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert after.cash_balance - before.cash_balance == expected
    assert after.realized_pnl - before.realized_pnl == expected


async def test_lost_answer_does_not_duplicate_the_order(harness: BrokerHarness) -> None:
    h = harness
    h.set_price(Decimal("6002"))
    h.lose_next_place_response()
    request = market(h, Side.BUY, 1)
    order = await h.connector.place_order(request)
    assert order.client_order_id == request.client_order_id
    await wait_for_order(h, request.client_order_id)
    assert await h.broker_order_count(request.client_order_id) == 1
    assert await flat_quantity(h) == 1


async def test_rate_limit_answer_is_waited_out_without_duplicate(harness: BrokerHarness) -> None:
    h = harness
    h.set_price(Decimal("6003"))
    h.rate_limit_next(1, retry_after_s=0.2)
    request = market(h, Side.BUY, 1)
    started = time.monotonic()
    await h.connector.place_order(request)
    waited = time.monotonic() - started
    await wait_for_order(h, request.client_order_id)
    assert waited >= 0.15, f"retried after {waited:.3f}s, before the broker's 0.2 s wait was over"
    assert await h.broker_order_count(request.client_order_id) == 1


async def test_times_are_aware_utc_and_current(harness: BrokerHarness) -> None:
    h = harness
    h.set_price(Decimal("6004"))
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    request = market(h, Side.BUY, 1)
    placed = await h.connector.place_order(request)
    order = await wait_for_order(h, request.client_order_id)
    fills = await h.connector.fills_since(h.account, since)
    snapshot = await h.connector.account_snapshot(h.account)
    now = datetime.now(timezone.utc)
    stamps = [placed.created_at, placed.updated_at, order.created_at, order.updated_at, snapshot.time,
              *(f.time for f in fills)]
    assert fills
    for stamp in stamps:
        assert stamp.utcoffset() == timedelta(0), stamp
        assert abs(now - stamp) < timedelta(seconds=30), f"{stamp} is not close to now ({now})"


async def test_event_stream_delivers_the_fill(harness: BrokerHarness) -> None:
    h = harness
    h.set_price(Decimal("6005"))
    queue = h.connector.subscribe()
    request = market(h, Side.BUY, 1)
    order = await h.connector.place_order(request)
    deadline = time.monotonic() + WAIT_S
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no FillEvent for the order within the wait"
        event = await asyncio.wait_for(queue.get(), remaining)
        if isinstance(event, FillEvent) and (event.fill.client_order_id == request.client_order_id
                                             or event.fill.broker_order_id == order.broker_order_id):
            break
    assert event.fill.quantity == 1
    assert event.fill.price == Decimal("6005")


async def test_dropped_connection_sends_nothing_then_recovers(harness: BrokerHarness) -> None:
    h = harness
    h.set_price(Decimal("6006"))
    await h.drop_connection()
    request = market(h, Side.BUY, 1)
    with pytest.raises(BrokerError) as excinfo:
        await h.connector.place_order(request)
    assert isinstance(excinfo.value, (BrokerUnavailable, OutcomeUnknown))
    assert await h.broker_order_count(request.client_order_id) == 0
    await h.restore_connection()
    await h.connector.place_order(request)
    await wait_for_order(h, request.client_order_id)
    assert await h.broker_order_count(request.client_order_id) == 1
