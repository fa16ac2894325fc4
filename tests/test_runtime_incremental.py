"""The runtime's incremental bookkeeping equals a from-scratch recomputation after any sequence of events.

``OrderTracker.exposure`` (in-flight signed quantity per account and contract) replaced a scan of every unsettled
order per engine rebuild, and ``Runtime._reserved`` / ``Runtime._set_snapshot`` replaced scans of every reservation;
a wrong figure there makes the portfolio look safer than it is, so random histories are checked against the old
scans, kept here as the reference.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from brokers.base import AccountSnapshot
from service.dispatch import CANCELLED, FILLED, MISSED, PARTIALLY_FILLED, REJECTED, TRANSITIONS, Job, OrderTracker
from service.runtime import Runtime

ACCOUNTS = ("a1", "a2")
CONTRACTS = ("MESZ6", "MNQZ6")
STATUSES = sorted(TRANSITIONS)
T0 = datetime(2026, 11, 24, 15, 0, tzinfo=timezone.utc)


class Journal:
    async def order_status(self, client_order_id: str, status: str, **_: Any) -> None:
        return None


def job(n: int, account: str, contract: str, side: str, quantity: int, margin: int) -> Job:
    return Job(client_order_id=f"mb-{n}", signal_id=f"s{n}", strategy="s", account=account, broker="b",
               broker_account=account, contract=contract, side=side, quantity=quantity, intent="entry",
               margin_usd=Decimal(margin) / 4)


def scanned_exposure(tracker: OrderTracker) -> dict[str, dict[str, int]]:
    """The old ``engine_state`` loop over every unsettled order."""
    out: dict[str, dict[str, int]] = {}
    for tracked in tracker.unsettled():
        signed = (tracked.job.quantity - tracked.filled) * (1 if tracked.job.side == "buy" else -1)
        book = out.setdefault(tracked.job.account, {})
        book[tracked.job.contract] = book.get(tracked.job.contract, 0) + signed
    return {a: {c: q for c, q in book.items() if q} for a, book in out.items()}


new_order = st.tuples(st.just("track"), st.sampled_from(ACCOUNTS), st.sampled_from(CONTRACTS),
                      st.sampled_from(("buy", "sell")), st.integers(1, 5), st.integers(0, 9))
move = st.tuples(st.just("status"), st.integers(0, 40), st.sampled_from(STATUSES))
fill = st.tuples(st.just("fill"), st.integers(0, 40), st.integers(1, 3))
snapshot = st.tuples(st.just("snapshot"), st.sampled_from(ACCOUNTS), st.integers(-3, 3))
tick = st.tuples(st.just("tick"), st.integers(0, 5))
histories = st.lists(st.one_of(new_order, move, fill, snapshot, tick), max_size=80)


def run(history: list[tuple[Any, ...]]) -> None:
    asyncio.run(replay(history))


async def replay(history: list[tuple[Any, ...]]) -> None:
    now = [T0]
    runtime = Runtime(SimpleNamespace(), Journal(), None, clock=lambda: now[0], feed=SimpleNamespace())
    runtime._refresh_snapshot_soon = lambda broker, account: None  # type: ignore[method-assign]
    tracker = runtime.tracker
    reference: dict[str, list[Any]] = {}  # coid -> [account, margin, resolved_at]: the old algorithm, verbatim
    coids: list[str] = []
    for step in history:
        kind = step[0]
        if kind == "track":
            _, account, contract, side, quantity, margin = step
            j = job(len(coids), account, contract, side, quantity, margin)
            coids.append(j.client_order_id)
            tracker.track(j)
            runtime._reserve(j)
            if j.margin_usd > 0:
                reference.setdefault(j.client_order_id, [account, j.margin_usd, None])
        elif kind == "status" and coids:
            coid = coids[step[1] % len(coids)]
            status = step[2]
            if await tracker.transition(coid, status):
                found = reference.get(coid)
                if found is not None:
                    if status in (REJECTED, CANCELLED, MISSED):
                        del reference[coid]
                    elif status in (FILLED, PARTIALLY_FILLED) and found[2] is None:
                        found[2] = now[0]
        elif kind == "fill" and coids:
            tracker.book_fill(coids[step[1] % len(coids)], step[2])
        elif kind == "snapshot":
            _, account, offset = step
            at = now[0] + timedelta(seconds=offset)
            runtime._set_snapshot(account, AccountSnapshot(account, Decimal(0), Decimal(0), Decimal(1000), Decimal(0),
                                                           Decimal(0), at))
            for coid, (acct, _, resolved_at) in list(reference.items()):
                if acct == account and resolved_at is not None and at >= resolved_at:
                    tracked = tracker.get(coid)
                    if tracked is None or tracked.status == FILLED:
                        del reference[coid]
        elif kind == "tick":
            now[0] += timedelta(seconds=step[1])

        expected = scanned_exposure(tracker)
        for account in ACCOUNTS:
            assert dict(tracker.exposure(account)) == expected.get(account, {})
            assert runtime._reserved(account) == sum((m for a, m, _ in reference.values() if a == account),
                                                     Decimal(0))
        assert set(runtime._reservations) == set(reference)


@settings(max_examples=300, deadline=None)
@given(histories)
def test_incremental_exposure_and_reservations_equal_a_full_scan(history: list[tuple[Any, ...]]) -> None:
    run(history)


def test_a_partially_filled_reservation_outlives_snapshots_until_the_order_fills() -> None:
    run([("track", "a1", "MESZ6", "buy", 3, 8), ("status", 0, "sending"), ("status", 0, "partially_filled"),
         ("fill", 0, 1), ("tick", 2), ("snapshot", "a1", 0), ("snapshot", "a1", 1), ("status", 0, "filled"),
         ("fill", 0, 2), ("snapshot", "a1", -3), ("snapshot", "a1", 0)])


def test_exposure_counts_an_order_filled_at_the_broker_until_its_fills_are_booked() -> None:
    tracker = OrderTracker(Journal())
    tracker.track(job(0, "a1", "MESZ6", "sell", 4, 0))
    assert dict(tracker.exposure("a1")) == {"MESZ6": -4}
    asyncio.run(tracker.transition("mb-0", FILLED))
    assert dict(tracker.exposure("a1")) == {"MESZ6": -4}  # "filled" came first; the fills are still on their way
    tracker.book_fill("mb-0", 3)
    assert dict(tracker.exposure("a1")) == {"MESZ6": -1}
    tracker.book_fill("mb-0", 1)
    assert dict(tracker.exposure("a1")) == {}
    assert dict(tracker.exposure("a2")) == {}


# -- one account's orders: in decision order at the broker, without waiting for each other's journaling ----------

class Pool:
    def __init__(self, connector: Any) -> None:
        self._connector = connector

    def available(self, name: str) -> bool:
        return True

    def connector(self, name: str) -> Any:
        return self._connector

    async def report_failure(self, name: str, exc: BaseException) -> None:
        return None

    async def unresolved(self, name: str, client_order_id: str, exc: BaseException) -> None:
        return None

    def report_success(self, name: str) -> None:
        return None


async def test_an_accounts_next_order_leaves_after_the_broker_answered_the_previous_not_after_its_journaling(
) -> None:
    from brokers.base import Order, OrderStatus, OrderType, Side, utcnow
    from service.dispatch import SENDING, Dispatcher

    events: list[str] = []
    filled_may_commit = asyncio.Event()

    class SlowFilled(Journal):
        async def order_status(self, client_order_id: str, status: str, **_: Any) -> None:
            events.append(f"journal {status} {client_order_id}")
            if status == FILLED and client_order_id == "mb-0":
                await filled_may_commit.wait()  # the first order's answer takes long to commit

    class Broker:
        connected = True

        async def place_order(self, request: Any) -> Order:
            events.append(f"place {request.client_order_id}")
            await asyncio.sleep(0.01)  # the first answer is slow: the second must not overtake it
            events.append(f"answered {request.client_order_id}")
            now = utcnow()
            return Order(broker_order_id=f"b-{request.client_order_id}", client_order_id=request.client_order_id,
                         account=request.account, contract=request.contract, side=Side(request.side),
                         quantity=request.quantity, filled_quantity=request.quantity, status=OrderStatus.FILLED,
                         order_type=OrderType.MARKET, created_at=now, updated_at=now)

    tracker = OrderTracker(SlowFilled())
    dispatcher = Dispatcher(tracker, Pool(Broker()))
    try:
        dispatcher.submit_all([job(0, "a1", "MESZ6", "sell", 1, 0), job(1, "a1", "MESZ6", "buy", 2, 0)])
        for _ in range(200):
            if tracker.orders["mb-1"].status == FILLED:
                break
            await asyncio.sleep(0.005)
        assert tracker.orders["mb-1"].status == FILLED  # went out while mb-0's "filled" was still committing
        assert tracker.orders["mb-0"].status == SENDING
        # mb-1's "sending" may be journaled ahead while mb-0 is at the broker; its request leaves after both.
        assert events.index("journal sending mb-1") < events.index("place mb-1")
        assert events.index("answered mb-0") < events.index("place mb-1")
        filled_may_commit.set()
        await dispatcher.drain()
        assert tracker.orders["mb-0"].status == FILLED
    finally:
        filled_may_commit.set()
        await dispatcher.stop()
