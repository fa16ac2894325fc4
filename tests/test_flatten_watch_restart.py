"""A flatten's follow-up watch survives kill -9: after a restart, a counted order that settles unfilled is still
followed up, once.

A flatten counts the orders in flight as if they will fill and exits the rest at once; an order that then settles
with quantity unfilled (here: s1's "buy 1" on top of long 1, rejected) leaves the line off flat, and a follow-up
exit closes it. Without it the flatten's "sell 2" leaves s1 short 1, and reconciliation sees nothing wrong (ledger
and broker agree). The crash here is honest: from the instant of the kill nothing more reaches the journal (every
write not yet committed is lost), the brokers keep what they were sent (the paper brokers' books are files), and
the next runtime starts on the same data directory. Every position is read from the paper broker's own book.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

from engine.decision import client_order_id
from service.dispatch import FILLED, MISSED, REJECTED
from service.journal import Journal
from tests.harness.runtime import NOON, Clock, World, signal, world

MIRROR = {"f1": ("fast", "F-1"), "f2": ("fast", "F-2"), "s1": ("slow", "S-1")}


class Kill:
    """kill -9 as the journal sees it: from ``now()`` on, nothing is committed (writes queued and not yet committed
    are lost; a COMMIT already running finishes, as it may have before a real kill). Whatever the dead process
    still awaits never returns; ``bury`` cancels it once the runtime is stopped, so no task outlives the test."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.dead = False
        self.graves: list[asyncio.Future[Any]] = []

    def now(self) -> None:
        self.dead = True
        self.journal._pending.clear()

        def enqueue(_fn: Any, _bare: bool = False) -> asyncio.Future[Any]:
            grave: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.graves.append(grave)
            return grave

        self.journal._enqueue = enqueue  # type: ignore[method-assign,assignment]

    def at_signal(self, which: Callable[[dict[str, Any]], bool], gate: asyncio.Event | None = None) -> None:
        """Die the moment a signal ``which`` matches is about to be journaled (its commit is lost); with ``gate``,
        once it is set (the rest of the process goes on meanwhile)."""
        record = self.journal.record_signal

        async def record_or_die(**kwargs: Any) -> Any:
            if not self.dead and which(kwargs.get("signal") or {}):
                if gate is not None:
                    await gate.wait()
                self.now()
            return await record(**kwargs)

        self.journal.record_signal = record_or_die  # type: ignore[method-assign]

    async def bury(self) -> None:
        while self.graves:
            graves, self.graves = self.graves, []
            for grave in graves:
                grave.cancel()
            await asyncio.sleep(0)


def held(w: World, account: str) -> int:
    """``account``'s position as its paper broker holds it (not what the ledger believes)."""
    broker, name = MIRROR[account]
    return sum(int(p["quantity"]) for p in w.connector(broker).book.positions(name))


def follow_ups(w: World, fid: str) -> list[dict[str, Any]]:
    """Every follow-up journaled for flatten ``fid``, oldest first."""
    ids = sorted(str(row["id"]) for row in w.journal.recent_signals(500)
                 if (row.get("signal") or {}).get("follow_of") == fid)
    return [row for sid in ids if (row := w.journal.get_signal(sid)) is not None]


def legs(row: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    return [(o["account"], o["side"], int(o["quantity"]), o["status"]) for o in row["orders"]]


def ledger(w: World) -> dict[Any, int]:
    return {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}


def s1_leg(sid: str) -> str:
    """The client order id of signal ``sid``'s order for s1 (as the engine derives it)."""
    return client_order_id(sid, "s1", "entry:MESH6")


async def open_long(w: World) -> None:
    await w.submit(signal("mirror", "buy", 1, sid="open"))
    await w.settle()
    assert {a: held(w, a) for a in MIRROR} == {a: 1 for a in MIRROR}


async def restart_is_quiet(tmp_path: Path, clock: Clock, fid: str) -> None:
    """Another restart, with nothing owed: no follow-up, no order, nothing moves at the broker."""
    async with world(tmp_path, clock=clock) as w:
        before = {a: len(w.book_orders(*MIRROR[a])) for a in MIRROR}
        count = len(follow_ups(w, fid))
        await w.settle()
        await asyncio.sleep(0.05)  # anything a come-up started in the background has run
        await w.settle()
        assert len(follow_ups(w, fid)) == count
        assert {a: len(w.book_orders(*MIRROR[a])) for a in MIRROR} == before
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}
        assert w.runtime._owed_follow_ups == {} and w.runtime._netted == {}


async def test_a_counted_order_in_flight_at_the_crash_and_rejected_in_recovery_is_followed_up_once(
        tmp_path: Path) -> None:
    """(a) s1 long 1, "buy 1" in flight (its request never got an answer): the flatten sells 2, counting on it, and
    the process dies. The restart's recovery finds the buy nowhere at the broker, sends it again, and the broker
    rejects it: the rebuilt watch follows it up (buy 1), and s1 ends flat, not short 1. The follow-up is held
    through the rest of the broker's come-up and sent once it opens, not missed there meanwhile."""
    clock = Clock(NOON)
    async with world(tmp_path, clock=clock) as w:
        await open_long(w)
        slow = w.connector("slow")
        arrived = asyncio.Event()

        async def lost(request: Any) -> Any:  # the request leaves; no answer comes before the kill
            arrived.set()
            await asyncio.Event().wait()

        slow._submit = lost
        await w.submit(signal("mirror", "buy", 1, sid="more"))
        await asyncio.wait_for(arrived.wait(), 5)
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        fid = result["signal_id"]
        assert ("s1", "sell", 2) in [(o["account"], o["side"], o["quantity"]) for o in result["orders"]]
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()

    async with world(tmp_path, clock=clock, start=False) as w:
        slow = w.connector("slow")
        submit = slow._submit

        async def refuse_the_buy(request: Any) -> Any:
            if request.client_order_id == s1_leg("more"):
                slow.reject_next(1)
            return await submit(request)

        slow._submit = refuse_the_buy
        positions = slow.positions

        async def slow_positions(account: str) -> Any:  # the come-up's reconciliation takes a while
            await asyncio.sleep(0.1)
            return await positions(account)

        slow.positions = slow_positions
        await w.runtime.start()
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert w.statuses("more")["s1"] == REJECTED
        assert w.statuses(fid)["s1"] == FILLED
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}  # flat, not short 1
        assert ledger(w) == {}
        [follow] = follow_ups(w, fid)
        assert follow["signal"]["covers"] == s1_leg("more")
        assert legs(follow) == [("s1", "buy", 1, FILLED)]
        # The flatten journaled what it counted on, s1's buy among it: what the restart watched again.
        watch = (w.journal.get_signal(fid) or {})["signal"]["watch"]
        assert s1_leg("more") in [coid for line in watch if line["account"] == "s1" for coid in line["counted"]]
    await restart_is_quiet(tmp_path, clock, fid)


async def test_a_follow_up_lost_with_the_process_after_its_order_settled_is_issued_by_the_restart(
        tmp_path: Path) -> None:
    """(b) The counted buy is rejected before the crash (final on disk), its follow-up is held, and the process dies
    before the follow-up's commit: nothing in the journal says it is owed but the flatten's watch. The restart
    issues it once the broker is up and reconciled, and s1 ends flat, not short 1."""
    clock = Clock(NOON)
    async with world(tmp_path, rules={"slow_ms": 30}, clock=clock) as w:
        await open_long(w)
        kill = Kill(w.journal)
        kill.at_signal(lambda body: bool(body.get("follow_of")))
        w.connector("slow").reject_next(1)  # s1's buy below
        await w.submit(signal("mirror", "buy", 1, sid="more"))
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        fid = result["signal_id"]
        assert ("s1", "sell", 2) in [(o["account"], o["side"], o["quantity"]) for o in result["orders"]]
        await asyncio.wait_for(_until(lambda: kill.dead), 5)
        assert (w.journal.get_order(s1_leg("more")) or {}).get("status") == REJECTED  # settled, on disk
        assert follow_ups(w, fid) == []  # its follow-up died with the process
    await kill.bury()

    async with world(tmp_path, clock=clock) as w:
        await w.settle()
        assert w.statuses(fid)["s1"] == FILLED
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}  # flat, not short 1
        assert ledger(w) == {}
        [follow] = follow_ups(w, fid)
        assert follow["id"] == f"{fid}-follow-1"  # the lost id never reached the journal, nor a broker
        assert follow["signal"]["covers"] == s1_leg("more")
        assert legs(follow) == [("s1", "buy", 1, FILLED)]
    await restart_is_quiet(tmp_path, clock, fid)


async def test_a_restart_after_the_follow_up_was_journaled_issues_nothing(tmp_path: Path) -> None:
    """The follow-up was journaled (and filled) before the crash: it covers the rejected buy, so the restarts owe
    nothing and send nothing, however many there are."""
    clock = Clock(NOON)
    async with world(tmp_path, rules={"slow_ms": 30}, clock=clock) as w:
        await open_long(w)
        w.connector("slow").reject_next(1)
        await w.submit(signal("mirror", "buy", 1, sid="more"))
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        fid = result["signal_id"]
        await w.settle()
        [follow] = follow_ups(w, fid)
        assert follow["signal"]["covers"] == s1_leg("more") and legs(follow) == [("s1", "buy", 1, FILLED)]
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()
    await restart_is_quiet(tmp_path, clock, fid)
    await restart_is_quiet(tmp_path, clock, fid)


async def test_an_owed_follow_up_never_buys_back_what_the_flattens_missed_exit_never_sold(tmp_path: Path) -> None:
    """slow is paused as s1's buy and the flatten's "sell 2" reach their turn: both are missed, and the buy's
    follow-up dies with the process. The restart owes it, but the broker still holds the long 1 the exit never
    sold: capped to what the broker holds, the follow-up closes nothing (it is journaled all the same: done), and
    the redo of the missed exit, computed after it, sells 1. Flat, with no round trip (buy 1, then sell 2)."""
    clock = Clock(NOON)
    async with world(tmp_path, clock=clock) as w:
        await open_long(w)
        kill, gate = Kill(w.journal), asyncio.Event()
        kill.at_signal(lambda body: bool(body.get("follow_of")), gate)
        await w.submit(signal("mirror", "buy", 1, sid="more"))
        await w.runtime.pause_broker("slow")  # before s1's buy leaves: it is missed at its turn
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        fid = result["signal_id"]
        assert ("s1", "sell", 2) in [(o["account"], o["side"], o["quantity"]) for o in result["orders"]]
        await asyncio.wait_for(_until(lambda: w.statuses(fid).get("s1") == MISSED), 5)
        assert w.statuses("more")["s1"] == MISSED
        gate.set()  # the follow-up's commit: the process dies instead
        await asyncio.wait_for(_until(lambda: kill.dead), 5)
    await kill.bury()

    async with world(tmp_path, clock=clock) as w:
        await w.settle()
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}
        assert ledger(w) == {}
        [follow] = follow_ups(w, fid)
        assert follow["signal"]["covers"] == s1_leg("more") and follow["orders"] == []
        redo = w.journal.get_signal(f"{fid}-redo-slow-1")
        assert redo is not None and legs(redo) == [("s1", "sell", 1, FILLED)]
        assert [(o["side"], int(o["quantity"])) for o in w.book_orders("slow", "S-1")] == [("buy", 1), ("sell", 1)]
    await restart_is_quiet(tmp_path, clock, fid)


async def _until(check: Callable[[], Any]) -> None:
    while not check():
        await asyncio.sleep(0.005)


async def test_an_owed_follow_up_counts_from_the_start_not_only_from_the_come_up(tmp_path: Path) -> None:
    """As (b), with slow's come-up held up: between the start and the follow-up's issue, the engine must see s1's
    line flat (the follow-up stands in as a held exit), not short 1, as it would have without the crash: the
    portfolio's counts and best mode's holder read that view, and an operator flatten meanwhile must not buy the
    difference back a second time."""
    clock = Clock(NOON)
    async with world(tmp_path, rules={"slow_ms": 30}, clock=clock) as w:
        await open_long(w)
        kill = Kill(w.journal)
        kill.at_signal(lambda body: bool(body.get("follow_of")))
        w.connector("slow").reject_next(1)
        await w.submit(signal("mirror", "buy", 1, sid="more"))
        fid = (await w.runtime.flatten(strategy="mirror", reason="operator"))["signal_id"]
        await asyncio.wait_for(_until(lambda: kill.dead), 5)
    await kill.bury()

    async with world(tmp_path, clock=clock, start=False) as w:
        slow = w.connector("slow")
        positions, reading, come_up = slow.positions, asyncio.Event(), asyncio.Event()

        async def held_up(account: str) -> Any:
            reading.set()
            await come_up.wait()
            return await positions(account)

        slow.positions = held_up
        starting = asyncio.ensure_future(w.runtime.start())
        await asyncio.wait_for(reading.wait(), 5)
        assert held(w, "s1") == -1  # at the broker: short 1 until the follow-up buys it back
        assert w.runtime.engine_state(clock()).accounts["s1"].positions == {}  # flat: the follow-up is counted
        again = await w.runtime.flatten(account="s1", reason="operator, during the come-up")
        assert again["orders"] == []  # nothing to close a second time

        come_up.set()
        await starting
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR} and ledger(w) == {}
        [follow] = follow_ups(w, fid)
        assert legs(follow) == [("s1", "buy", 1, FILLED)]
        assert not [key for key in w.runtime._holds if key.startswith("owed:")]
        assert w.runtime.engine_state(clock()).accounts["s1"].positions == {}
    await restart_is_quiet(tmp_path, clock, fid)
