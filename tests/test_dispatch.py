"""Dispatch against real paper brokers and a real journal: per-broker queues, the order state machine journaled
before it acts, refused transitions, and fills into the ledger."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from brokers.base import Order, OrderStatus, OrderType, Side, utcnow
from service.dispatch import (
    ACKNOWLEDGED,
    CANCELLED,
    FILLED,
    MISSED,
    NEW,
    PARTIALLY_FILLED,
    REJECTED,
    SENDING,
    TRANSITIONS,
    UNKNOWN,
    Job,
    OrderTracker,
    allowed,
)
from tests.harness.runtime import signal, wait_until, world


def on_disk(journal_path: Path, client_order_id: str) -> str:
    """The order's status as a separate reader of the database file sees it (committed, not in memory)."""
    with sqlite3.connect(journal_path) as conn:
        row = conn.execute("select status from orders where client_order_id = ?", (client_order_id,)).fetchone()
    return row[0]


def gate(connector: Any) -> asyncio.Event:
    """Hold every order request to ``connector`` until the returned event is set."""
    opened = asyncio.Event()
    submit = connector._submit

    async def held(request: Any) -> Any:
        await opened.wait()
        return await submit(request)

    connector._submit = held
    return opened


# -- the state machine (pure) ------------------------------------------------------------------------------------

def test_final_states_have_no_way_out_and_a_fill_never_goes_back_to_acknowledged() -> None:
    for final in (FILLED, REJECTED, CANCELLED, MISSED):
        assert TRANSITIONS[final] == frozenset()
    assert not allowed(FILLED, ACKNOWLEDGED)
    assert not allowed(PARTIALLY_FILLED, ACKNOWLEDGED)
    assert not allowed(ACKNOWLEDGED, SENDING)
    assert not allowed(ACKNOWLEDGED, MISSED)  # the broker has it: it can never be "missed"
    assert allowed(NEW, SENDING) and allowed(SENDING, UNKNOWN) and allowed(UNKNOWN, SENDING)
    assert allowed(PARTIALLY_FILLED, PARTIALLY_FILLED)  # a second partial fill is news


class RecordingJournal:
    def __init__(self, fail_on: str | None = None) -> None:
        self.rows: list[tuple[str, str]] = []
        self.fail_on = fail_on

    async def order_status(self, client_order_id: str, status: str, **_: Any) -> None:
        if status == self.fail_on:
            raise OSError("disk full")
        self.rows.append((client_order_id, status))


def job(coid: str = "mb-1") -> Job:
    return Job(client_order_id=coid, signal_id="s", strategy="st", account="a", broker="b", broker_account="A",
               contract="MESH6", side="buy", quantity=2, intent="entry")


def broker_order(status: OrderStatus, filled: int = 0) -> Order:
    now = utcnow()
    return Order(broker_order_id="P9", client_order_id="mb-1", account="A", contract="MESH6", side=Side.BUY,
                 quantity=2, filled_quantity=filled, status=status, order_type=OrderType.MARKET, created_at=now,
                 updated_at=now)


async def test_illegal_transitions_are_refused_and_not_journaled() -> None:
    journal = RecordingJournal()
    tracker = OrderTracker(journal)
    tracker.track(job())
    assert await tracker.transition("mb-1", SENDING)
    assert await tracker.transition("mb-1", FILLED, broker_order_id="P9")
    # A late acknowledgement, a cancel, a "missed": all refused after the fill, and nothing reaches the journal.
    assert not await tracker.transition("mb-1", ACKNOWLEDGED)
    assert not await tracker.transition("mb-1", CANCELLED)
    assert not await tracker.transition("mb-1", MISSED)
    await tracker.adopt("mb-1", broker_order(OrderStatus.WORKING))
    assert tracker.get("mb-1").status == FILLED
    assert journal.rows == [("mb-1", SENDING), ("mb-1", FILLED)]
    assert tracker.find("b", None, "P9") is tracker.get("mb-1")


async def test_a_transition_the_journal_could_not_store_is_not_believed() -> None:
    tracker = OrderTracker(RecordingJournal(fail_on=SENDING))
    tracker.track(job())
    with pytest.raises(OSError):
        await tracker.transition("mb-1", SENDING)
    assert tracker.get("mb-1").status == NEW


# -- against paper brokers ---------------------------------------------------------------------------------------

async def test_sending_is_on_disk_before_the_request_leaves(tmp_path: Path) -> None:
    seen: dict[str, str] = {}
    async with world(tmp_path) as w:
        for broker in ("fast", "slow"):
            connector = w.connector(broker)
            submit = connector._submit

            async def watched(request: Any, submit: Any = submit) -> Any:
                seen[request.client_order_id] = on_disk(w.journal.path, request.client_order_id)
                return await submit(request)

            connector._submit = watched
        decision = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        await w.settle()
        assert set(seen) == {o.client_order_id for o in decision.orders} and len(seen) == 3
        assert set(seen.values()) == {SENDING}
        for order in decision.orders:
            history = [e["status"] for e in w.journal.order_events(order.client_order_id)]
            assert history[:2] == [NEW, SENDING] and history[-1] == FILLED


async def test_an_order_whose_sending_state_cannot_be_journaled_is_never_sent(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        order_status = w.journal.order_status

        async def failing(coid: str, status: str, **kw: Any) -> None:
            if status == SENDING:
                raise OSError("disk full")
            await order_status(coid, status, **kw)

        w.journal.order_status = failing  # type: ignore[method-assign]
        decision = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        await asyncio.sleep(0.1)
        assert w.book_orders("fast", "F-1") == [] and w.book_orders("slow", "S-1") == []
        assert set(w.statuses(decision.signal_id).values()) == {NEW}


async def test_a_slow_broker_never_delays_a_fast_one(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        slow = w.connector("slow")
        slow_open = gate(slow)
        sent: list[str] = []  # requests that left for the slow broker (recorded before the gate holds them)
        submit = slow._submit

        async def watched(request: Any) -> Any:
            sent.append(request.client_order_id)
            return await submit(request)

        slow._submit = watched
        first = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        second = await w.submit(signal("mirror", "buy", 1, sid="sig-2"))
        # Every order at the fast broker completes while the slow broker still holds its first request.
        await wait_until(lambda: all(w.statuses(d.signal_id)[a] == FILLED for d in (first, second)
                                     for a in ("f1", "f2")), what="fast orders filled")
        assert w.statuses(first.signal_id)["s1"] == SENDING
        # Same account: the next order may have its "sending" journaled ahead, but it is not sent (still "new" in
        # the process) before the broker answered the previous one; it waits its turn, in decision order.
        assert w.runtime.tracker.get(second.orders[2].client_order_id).status == NEW
        assert len(w.book_orders("fast", "F-1")) == 2 and w.book_orders("slow", "S-1") == []
        assert sent == [first.orders[2].client_order_id]
        slow_open.set()
        await w.settle()
        assert [o["client_order_id"] for o in w.book_orders("slow", "S-1")] == \
            [first.orders[2].client_order_id, second.orders[2].client_order_id]


async def test_fills_update_the_ledger_per_account_strategy_and_contract(tmp_path: Path) -> None:
    async with world(tmp_path, rules={"fill_ms": 20}) as w:
        w.connector("fast").partial_fill_next([1, 2])
        buy = await w.submit(signal("mirror", "buy", 3, sid="sig-1"))
        await w.settle()
        contract = buy.orders[0].contract
        f1 = buy.orders[0].client_order_id
        assert buy.orders[0].account == "f1"
        history = [e["status"] for e in w.journal.order_events(f1)]
        assert history == [NEW, SENDING, ACKNOWLEDGED, PARTIALLY_FILLED, FILLED]
        assert [f["quantity"] for f in w.journal.fills(account="f1")] in ([1, 2], [2, 1])
        book = w.runtime.ledger.books[("f1", "mirror", contract)]
        assert book.quantity == 3 and book.avg_price == Decimal(5000) and book.commissions == Decimal("0.75")
        assert w.runtime.engine_state(w.clock()).accounts["s1"].positions == {contract: 3}

        # The same fills reported again (reconciliation asks for the day's fills) count once.
        await w.runtime.reconcile_broker("fast", reason="test")
        assert w.runtime.ledger.books[("f1", "mirror", contract)].quantity == 3
        assert len(w.journal.fills(account="f1")) == 2

        w.feed.set_price("MES", Decimal("5010"))
        await w.submit(signal("mirror", "exit", sid="sig-2"))
        await w.settle()
        book = w.runtime.ledger.books[("f1", "mirror", contract)]
        assert book.quantity == 0 and book.realized == Decimal(10) * 3 * 5
        assert w.runtime.engine_state(w.clock()).accounts["f1"].positions == {}


async def test_a_rejected_order_is_journaled_rejected_and_books_nothing(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        w.connector("slow").reject_next()
        decision = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        await w.settle()
        assert w.statuses(decision.signal_id) == {"f1": FILLED, "f2": FILLED, "s1": REJECTED}
        assert w.runtime.ledger.account_positions("s1") == {}
        assert w.runtime._reserved("s1") == 0  # the reservation is released with the rejection


async def test_a_lost_answer_is_looked_up_not_resent(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        w.connector("fast").lose_next_place_response()
        decision = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        await w.settle()
        assert set(w.statuses(decision.signal_id).values()) == {FILLED}
        for account in ("F-1", "F-2"):
            assert len(w.book_orders("fast", account)) == 1
        assert sum(b.quantity for b in w.runtime.ledger.books.values()) == 3


async def test_an_order_for_a_paused_broker_is_missed_not_sent(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        first = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        await w.runtime.pause_broker("slow")  # paused after the decision, before the order's turn
        await w.settle()
        assert w.statuses(first.signal_id) == {"f1": FILLED, "f2": FILLED, "s1": MISSED}
        assert w.book_orders("slow", "S-1") == []
        events = w.journal.order_events(first.orders[2].client_order_id)
        assert [e["status"] for e in events] == [NEW, MISSED] and "paused" in str(events[-1]["detail"])
        assert UNKNOWN not in w.statuses(first.signal_id).values()


async def test_a_throttled_order_waits_and_goes_out_once(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        w.connector("fast").rate_limit_next(1, retry_after_s=0.05)
        decision = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        await w.settle()
        assert set(w.statuses(decision.signal_id).values()) == {FILLED}
        assert [len(w.book_orders("fast", a)) for a in ("F-1", "F-2")] == [1, 1]
        for order in decision.orders:
            assert [e["status"] for e in w.journal.order_events(order.client_order_id)].count(SENDING) == 1
