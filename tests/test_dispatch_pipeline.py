"""Pipelined dispatch: an account's next order has its ``sending`` committed while the previous one is at the broker,
but its request still leaves only after that answer, in decision order, and every outcome of the previous order
(rejected, throttled, a drop, a pause, a crash) leaves the next one sent exactly once or not at all, as before."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

from service.dispatch import FILLED, MISSED, NEW, REJECTED, SENDING, UNKNOWN
from tests.harness.runtime import World, signal, wait_until, world


def on_disk(journal_path: Path, client_order_id: str) -> str:
    """The order's status as a separate reader of the database file sees it (committed, not in memory)."""
    with sqlite3.connect(journal_path) as conn:
        row = conn.execute("select status from orders where client_order_id = ?", (client_order_id,)).fetchone()
    return row[0]


class Wire:
    """Watches every request to a connector: what arrived (with the order's committed status at that moment), and
    holds one order's request before (``hold_before``) or after (``hold_after``) it reaches the broker's book."""

    def __init__(self, w: World, broker: str) -> None:
        self.w = w
        self.connector = w.connector(broker)
        self.arrived: list[str] = []
        self.disk_at_arrival: dict[str, str] = {}
        self.held: set[str] = set()
        self.before: dict[str, asyncio.Event] = {}
        self.after: dict[str, asyncio.Event] = {}
        self._submit = self.connector._submit
        self.connector._submit = self._watched

    def hold_before(self, coid: str) -> asyncio.Event:
        return self.before.setdefault(coid, asyncio.Event())

    def hold_after(self, coid: str) -> asyncio.Event:
        return self.after.setdefault(coid, asyncio.Event())

    async def _watched(self, request: Any) -> Any:
        coid = request.client_order_id
        self.arrived.append(coid)
        self.disk_at_arrival.setdefault(coid, on_disk(self.w.journal.path, coid))
        if coid in self.before:
            self.held.add(coid)
            await self.before[coid].wait()
        result = await self._submit(request)
        if coid in self.after:
            self.held.add(coid)
            await self.after[coid].wait()
        return result


async def two_orders_of_s1(w: World) -> tuple[str, str]:
    first = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
    second = await w.submit(signal("mirror", "buy", 1, sid="sig-2"))
    assert first.orders[2].account == second.orders[2].account == "s1"
    return first.orders[2].client_order_id, second.orders[2].client_order_id


def history(w: World, coid: str) -> list[str]:
    return [e["status"] for e in w.journal.order_events(coid)]


async def journaled_ahead(w: World, wire: Wire, held: str, waiting: str) -> None:
    """``held`` is at the broker, ``waiting`` has its ``sending`` on disk, is still ``new`` here and was not sent."""
    await wait_until(lambda: held in wire.held and on_disk(w.journal.path, waiting) == SENDING,
                     what="the next order journaled ahead")
    assert w.runtime.tracker.get(waiting).status == NEW
    assert waiting not in wire.arrived


async def test_the_next_order_is_journaled_ahead_and_sent_only_after_the_previous_answer(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, n1 = await two_orders_of_s1(w)
        release = wire.hold_after(n)  # the broker has N; its answer is on the way
        await journaled_ahead(w, wire, n, n1)
        await asyncio.sleep(0.05)
        assert wire.arrived == [n]  # N+1 waits for N's answer, whatever the time
        release.set()
        await w.settle()
        assert wire.arrived == [n, n1]
        assert wire.disk_at_arrival == {n: SENDING, n1: SENDING}
        assert [o["client_order_id"] for o in w.book_orders("slow", "S-1")] == [n, n1]
        for coid in (n, n1):
            events = history(w, coid)
            assert events[:2] == [NEW, SENDING] and events[-1] == FILLED and events.count(SENDING) == 1


async def test_after_a_rejection_the_journaled_ahead_order_goes_out_once(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        w.connector("slow").reject_next()
        n, n1 = await two_orders_of_s1(w)
        release = wire.hold_before(n)
        await journaled_ahead(w, wire, n, n1)
        release.set()
        await w.settle()
        assert w.statuses("sig-1")["s1"] == REJECTED and w.statuses("sig-2")["s1"] == FILLED
        assert wire.arrived == [n, n1]
        assert history(w, n1).count(SENDING) == 1 and history(w, n1)[-1] == FILLED


async def test_a_throttled_previous_order_keeps_the_next_one_waiting(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        w.connector("slow").rate_limit_next(2, retry_after_s=0.05)
        n, n1 = await two_orders_of_s1(w)
        await w.settle()
        # N was refused (retried by the connector or the dispatcher), then placed; N+1 arrived only after N's last
        # (accepted) attempt, once.
        assert len(wire.arrived) >= 3 and wire.arrived == [n] * (len(wire.arrived) - 1) + [n1]
        assert [o["client_order_id"] for o in w.book_orders("slow", "S-1")] == [n, n1]
        assert w.statuses("sig-1")["s1"] == FILLED and w.statuses("sig-2")["s1"] == FILLED


async def test_a_pause_while_journaled_ahead_makes_the_order_missed_never_sent(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, n1 = await two_orders_of_s1(w)
        release = wire.hold_after(n)
        await journaled_ahead(w, wire, n, n1)
        await w.runtime.pause_broker("slow")
        release.set()
        await w.settle()
        assert w.statuses("sig-1")["s1"] == FILLED and w.statuses("sig-2")["s1"] == MISSED
        assert wire.arrived == [n]
        events = w.journal.order_events(n1)
        assert [e["status"] for e in events] == [NEW, SENDING, MISSED] and "paused" in str(events[-1]["detail"])
        await w.runtime.resume_broker("slow")
        await asyncio.sleep(0.05)
        assert wire.arrived == [n] and [o["client_order_id"] for o in w.book_orders("slow", "S-1")] == [n]


async def test_a_drop_of_the_previous_request_leaves_the_next_order_missed_never_sent(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, n1 = await two_orders_of_s1(w)
        release = wire.hold_before(n)
        await journaled_ahead(w, wire, n, n1)
        wire.connector.disconnect("drop")  # N's request is lost with the link; the broker goes down
        await wait_until(lambda: w.runtime.pool["slow"].down, what="slow down")
        release.set()
        await wait_until(lambda: w.statuses("sig-2")["s1"] == MISSED, what="N+1 missed")
        assert w.statuses("sig-1")["s1"] == UNKNOWN
        await wire.connector.reconnect()
        await w.settle()
        # N never reached the broker: recovery finds nothing and, as for any order of this process, calls it missed.
        assert w.statuses("sig-1")["s1"] == MISSED and w.book_orders("slow", "S-1") == []
        assert n1 not in wire.arrived and history(w, n1) == [NEW, SENDING, MISSED]


async def test_a_reconnect_while_journaled_ahead_sends_the_order_once_not_missed(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, n1 = await two_orders_of_s1(w)
        release = wire.hold_after(n)  # N is in the book; its answer is held across the drop
        await journaled_ahead(w, wire, n, n1)
        wire.connector.disconnect("drop")
        await wait_until(lambda: w.runtime.pool["slow"].down, what="slow down")
        await wire.connector.reconnect()
        # Recovery looks both up: N is found and adopted; N+1 (not sent yet) is not at the broker and is sent by
        # recovery, as an order still "new" would be. It must not be called missed, nor sent again when N answers.
        await wait_until(lambda: w.runtime.pool.available("slow"), what="slow recovered")
        await wait_until(lambda: w.statuses("sig-2")["s1"] == FILLED, what="N+1 filled")
        release.set()
        await w.settle()
        assert w.statuses("sig-1")["s1"] == FILLED
        assert wire.arrived.count(n1) == 1 and wire.disk_at_arrival[n1] == SENDING
        assert sorted(o["client_order_id"] for o in w.book_orders("slow", "S-1")) == sorted([n, n1])
        assert MISSED not in history(w, n1) and history(w, n1).count(SENDING) == 1


async def test_a_request_still_under_way_at_the_reconnect_is_waited_for_never_called_missed(tmp_path: Path) -> None:
    """Fuzz on the real connectors (helper AC): an order's request was under way when the link dropped (or waiting
    out a 429) and reached the broker after the reconnect. Recovery looked it up first, found nothing and journaled
    it ``missed``: then it filled, an order the journal says never left. Recovery now waits for the request this
    process has under way, and judges the order by its outcome."""
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, _n1 = await two_orders_of_s1(w)
        release = wire.hold_before(n)  # N is on its way: past ``sending``, not at the broker yet
        await wait_until(lambda: n in wire.held, what="N under way")
        wire.connector.disconnect("drop")
        await wait_until(lambda: w.runtime.pool["slow"].down, what="slow down")
        await wire.connector.reconnect()
        await asyncio.sleep(0.2)  # the come-up's recovery runs meanwhile (a lookup takes milliseconds)
        assert MISSED not in history(w, n)
        release.set()  # the request lands now, after the reconnect
        await wait_until(lambda: w.runtime.pool.available("slow"), what="slow recovered")
        await w.settle()
        assert w.statuses("sig-1")["s1"] == FILLED and MISSED not in history(w, n)
        assert [o["client_order_id"] for o in w.book_orders("slow", "S-1")].count(n) == 1
        assert wire.arrived.count(n) == 1


async def test_a_crash_after_the_next_sending_commit_sends_it_once_after_lookup(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, n1 = await two_orders_of_s1(w)
        wire.hold_after(n)  # N reached the broker; the process dies before its answer
        await journaled_ahead(w, wire, n, n1)
    # What the killed process left: N at the broker (its fill events may have made it "filled" already), N+1
    # "sending" on disk and never sent.
    async with world(tmp_path, start=False) as w:
        wire = Wire(w, "slow")
        lookups: list[str] = []
        find_order = wire.connector.find_order

        async def watched_find(account: str, coid: str) -> Any:
            lookups.append(coid)
            return await find_order(account, coid)

        wire.connector.find_order = watched_find  # type: ignore[method-assign]
        await w.runtime.start()
        await w.settle()
        assert n1 in lookups
        assert wire.arrived == [n1]  # N not sent again; N+1 looked up, not found, sent once
        assert [o["client_order_id"] for o in w.book_orders("slow", "S-1")] == [n, n1]
        assert w.statuses("sig-1")["s1"] == FILLED and w.statuses("sig-2")["s1"] == FILLED
        assert history(w, n1)[:4] == [NEW, SENDING, UNKNOWN, SENDING] and history(w, n1)[-1] == FILLED
        assert history(w, n).count(SENDING) == 1


async def test_a_next_order_whose_sending_cannot_be_journaled_is_never_sent(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, n1 = await two_orders_of_s1(w)
        order_status = w.journal.order_status

        async def failing(coid: str, status: str, **kw: Any) -> None:
            if coid == n1 and status == SENDING:
                raise OSError("disk full")
            await order_status(coid, status, **kw)

        w.journal.order_status = failing  # type: ignore[method-assign]
        release = wire.hold_after(n)
        await wait_until(lambda: n in wire.held, what="N at the broker")
        await asyncio.sleep(0.05)
        release.set()
        await wait_until(lambda: w.statuses("sig-1")["s1"] == FILLED, what="N filled")
        await asyncio.sleep(0.05)
        assert wire.arrived == [n] and w.statuses("sig-2")["s1"] == NEW
        assert w.runtime.tracker.get(n1).status == NEW


async def test_a_sending_write_that_fails_ahead_is_retried_at_the_orders_turn(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, n1 = await two_orders_of_s1(w)
        order_status = w.journal.order_status
        failed: list[str] = []

        async def fails_once(coid: str, status: str, **kw: Any) -> None:
            if coid == n1 and status == SENDING and not failed:
                failed.append(coid)
                raise OSError("transient")
            await order_status(coid, status, **kw)

        w.journal.order_status = fails_once  # type: ignore[method-assign]
        release = wire.hold_after(n)
        await wait_until(lambda: failed and n in wire.held, what="the ahead write failed")
        assert on_disk(w.journal.path, n1) == NEW and wire.arrived == [n]
        release.set()
        await w.settle()
        assert wire.arrived == [n, n1] and wire.disk_at_arrival[n1] == SENDING
        assert history(w, n1).count(SENDING) == 1 and w.statuses("sig-2")["s1"] == FILLED



# -- unit level: slots and the depth of journaling ahead ----------------------------------------------------------

class Recorder:
    """The journal side of an ``OrderTracker``: records every write; the writes listed in ``held`` wait for it."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []
        self.held: dict[tuple[str, str], asyncio.Event] = {}

    async def order_status(self, client_order_id: str, status: str, **_: Any) -> None:
        self.writes.append((client_order_id, status))
        gate = self.held.get((client_order_id, status))
        if gate is not None:
            await gate.wait()


class Gate:
    """A broker pool with one connector that fills at once, except the requests listed in ``held``."""

    def __init__(self) -> None:
        self.placed: list[str] = []
        self.held: dict[str, asyncio.Event] = {}
        self.connected = True

    def available(self, name: str) -> bool:
        return True

    def connector(self, name: str) -> Any:
        return self

    async def report_failure(self, name: str, exc: BaseException) -> None:
        return None

    async def unresolved(self, name: str, client_order_id: str, exc: BaseException) -> None:
        return None

    def report_success(self, name: str) -> None:
        return None

    async def place_order(self, request: Any) -> Any:
        from brokers.base import Order, OrderStatus, OrderType, Side, utcnow
        self.placed.append(request.client_order_id)
        gate = self.held.get(request.client_order_id)
        if gate is not None:
            await gate.wait()
        now = utcnow()
        return Order(broker_order_id=f"b-{request.client_order_id}", client_order_id=request.client_order_id,
                     account=request.account, contract=request.contract, side=Side(request.side),
                     quantity=request.quantity, filled_quantity=request.quantity, status=OrderStatus.FILLED,
                     order_type=OrderType.MARKET, created_at=now, updated_at=now)


def unit_job(n: int, account: str) -> Any:
    from service.dispatch import Job
    return Job(client_order_id=f"mb-{n}", signal_id=f"s{n}", strategy="s", account=account, broker="b",
               broker_account=account, contract="MESZ6", side="buy", quantity=1, intent="entry", margin_usd=Decimal(0))


async def eventually(check: Any, what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_request_slot_is_free_once_the_broker_answered_not_once_the_answer_is_journaled() -> None:
    from service.dispatch import Dispatcher, OrderTracker
    journal, pool = Recorder(), Gate()
    journal.held[("mb-0", FILLED)] = commit = asyncio.Event()  # a1's answer takes long to commit
    dispatcher = Dispatcher(OrderTracker(journal), pool, concurrency=1)  # type: ignore[arg-type]
    try:
        dispatcher.submit_all([unit_job(0, "a1"), unit_job(1, "a2")])
        await eventually(lambda: dispatcher.tracker.orders["mb-1"].status == FILLED, "a2's order filled")
        assert dispatcher.tracker.orders["mb-0"].status == SENDING  # its "filled" is still committing
        assert pool.placed == ["mb-0", "mb-1"]
    finally:
        commit.set()
        await dispatcher.drain()
        await dispatcher.stop()
    assert dispatcher.tracker.orders["mb-0"].status == FILLED


async def test_no_more_than_ahead_orders_of_an_account_are_journaled_ahead_and_all_leave_once_in_order() -> None:
    from service.dispatch import Dispatcher, OrderTracker
    journal, pool = Recorder(), Gate()
    pool.held["mb-0"] = answer = asyncio.Event()
    dispatcher = Dispatcher(OrderTracker(journal), pool, ahead=3)  # type: ignore[arg-type]
    jobs = [unit_job(n, "a1") for n in range(10)] + [unit_job(10, "a2")]
    try:
        dispatcher.submit_all(jobs)
        await eventually(lambda: pool.placed[:1] == ["mb-0"] and "mb-10" in pool.placed, "the head at the broker")
        await asyncio.sleep(0.05)
        on_disk = [coid for coid, status in journal.writes if status == SENDING]
        assert sorted(on_disk) == ["mb-0", "mb-1", "mb-10", "mb-2", "mb-3"]  # a1: the head and 3 ahead; a2 sent
        assert pool.placed == ["mb-0", "mb-10"]
        assert all(dispatcher.tracker.orders[f"mb-{n}"].status == NEW for n in range(1, 10))
        answer.set()
        await dispatcher.drain()
    finally:
        answer.set()
        await dispatcher.stop()
    assert [c for c in pool.placed if c != "mb-10"] == [f"mb-{n}" for n in range(10)]
    for n in range(11):
        statuses = [status for coid, status in journal.writes if coid == f"mb-{n}"]
        assert statuses == [SENDING, FILLED], (n, statuses)


async def test_an_order_held_at_the_broker_never_holds_back_another_accounts_orders() -> None:
    from service.dispatch import Dispatcher, OrderTracker
    journal, pool = Recorder(), Gate()
    pool.held["mb-0"] = answer = asyncio.Event()
    dispatcher = Dispatcher(OrderTracker(journal), pool, concurrency=2)  # type: ignore[arg-type]
    try:
        dispatcher.submit_all([unit_job(0, "a1"), unit_job(1, "a1")] + [unit_job(n, "a2") for n in (10, 11, 12)])
        await eventually(lambda: all(dispatcher.tracker.orders[f"mb-{n}"].status == FILLED for n in (10, 11, 12)),
                         "a2's orders filled")
        assert pool.placed == ["mb-0", "mb-10", "mb-11", "mb-12"]  # a1's second waits for its first's answer
        assert dispatcher.queued() == {"b": 1}  # mb-1 waits in its lane
        answer.set()
        await dispatcher.drain()
    finally:
        answer.set()
        await dispatcher.stop()
    assert pool.placed == ["mb-0", "mb-10", "mb-11", "mb-12", "mb-1"]
    assert all(t.status == FILLED for t in dispatcher.tracker.orders.values())


async def test_transitions_of_one_order_take_turns_and_a_cancelled_one_passes_its_turn_on() -> None:
    from service.dispatch import OrderTracker
    journal = Recorder()
    journal.held[("mb-0", SENDING)] = commit = asyncio.Event()
    tracker = OrderTracker(journal)  # type: ignore[arg-type]
    tracker.track(unit_job(0, "a1"))
    first = asyncio.create_task(tracker.transition("mb-0", SENDING))
    await eventually(lambda: journal.writes == [("mb-0", SENDING)], "the first transition journaling")
    cancelled = asyncio.create_task(tracker.transition("mb-0", UNKNOWN))
    last = asyncio.create_task(tracker.transition("mb-0", FILLED))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    assert journal.writes == [("mb-0", SENDING)] and tracker.get("mb-0").status == NEW  # not believed before commit
    commit.set()
    assert await first is True and await last is True
    assert cancelled.cancelled()
    assert journal.writes == [("mb-0", SENDING), ("mb-0", FILLED)] and tracker.get("mb-0").status == FILLED
    assert not tracker.get("mb-0").busy
