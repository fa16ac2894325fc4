"""The overtaken-exit watch survives kill -9 (``service.overtaken``): an exit that a trade by hand overtook is still
made good, once, after a restart, whether it had settled before the crash or was still in flight.

``trend`` long 2 at ``a1`` (paper broker ``fast``, account ``A-1``). Its exit sells 2; while the exit is on its way
the trader sells 2 by hand, and the broker fills both: short 2, which a follow-up buys back. Nothing but the
follow-up tells: the ledger and the broker agree on the short, so reconciliation stays quiet. The crash is the one
of ``tests.test_flatten_watch_restart`` (from the instant of the kill nothing more reaches the journal; the paper
broker keeps its book; the next runtime starts on the same data directory). The exit is held at the broker, or
never answered, by events, not by timing. Every position is read from the paper broker's own book.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from brokers.base import Side
from service.dispatch import FILLED
from service.overtaken import BASIS_PREFIX
from tests.harness.runtime import NOON, Clock, World, signal, wait_until
from tests.test_exit_watch_restart import CONTRACT, coid, follow_ups, held, ledger, legs, trend_world
from tests.test_flatten_watch_restart import Kill
from tests.test_strategy_positions import target


async def by_hand(w: World, side: Side, quantity: int, n: int) -> None:
    """The trader trades at the broker, not through us; returns once the ledger booked it."""
    fill = w.connector("fast").manual_trade("A-1", CONTRACT, side, quantity, f"manual-{n}")
    await wait_until(lambda: f"fast:{fill.fill_id}" in w.runtime.ledger.seen_fills, what="the trade by hand booked")


def gate_exits(w: World) -> asyncio.Event:
    """The exits of ``t-exit`` wait at the broker (their request arrived, nothing is placed) until the gate opens."""
    fast = w.connector("fast")
    submit, gate = fast._submit, asyncio.Event()

    async def held_back(request: Any) -> Any:
        if request.client_order_id.startswith("mb-") and request.side == Side.SELL and \
                int(request.quantity) == 2 and not gate.is_set():
            await gate.wait()
        return await submit(request)

    fast._submit = held_back
    return gate


async def overtaken(w: World, *, closed_before: int = 0) -> tuple[str, asyncio.Event]:
    """long 2 (after the trader closed ``closed_before`` of an earlier long 2 by hand, re-opened); "exit" sells 2,
    held at the broker; the trader sells 2 by hand meanwhile. Returns the exit's id and the gate holding it."""
    await w.submit(target("trend", "t-long", "long", 2))
    await w.settle()
    if closed_before:
        await by_hand(w, Side.SELL, closed_before, 0)
        await w.submit(target("trend", "t-long-again", "long", 2))
        await w.settle()
    assert held(w) == 2 and ledger(w) == {("a1", "trend", CONTRACT): 2}
    gate = gate_exits(w)
    await w.submit(signal("trend", "exit", sid="t-exit"))
    exit_ = coid(w, "t-exit", "a1", "exit")
    await wait_until(lambda: (w.journal.get_order(exit_) or {}).get("status") == "sending", what="exit sent")
    await by_hand(w, Side.SELL, 2, 1)
    assert ledger(w) == {}  # the trade by hand closed trend's long; our exit is still on its way
    return exit_, gate


async def restart_is_quiet(tmp_path: Path, clock: Clock, where: int) -> None:
    """Another restart, with nothing owed: no follow-up, no order, nothing moves at the broker."""
    async with trend_world(tmp_path, clock) as w:
        before, count = len(w.book_orders("fast", "A-1")), len(follow_ups(w, "t-exit"))
        await w.settle()
        await asyncio.sleep(0.05)  # anything a come-up started in the background has run
        await w.settle()
        assert len(follow_ups(w, "t-exit")) == count and len(w.book_orders("fast", "A-1")) == before
        assert held(w) == where
        assert w.runtime._owed_follow_ups == {} and w.runtime._overtaking == {} and w.runtime._hand_basis == {}


async def test_an_overtaken_exit_settled_before_the_crash_is_made_good_by_the_restart(tmp_path: Path) -> None:
    """(a) The exit fills after the trade by hand (short 2); the process dies at its follow-up's commit. Nothing in
    the journal says a follow-up is owed, and ledger = broker; the restart buys the 2 back once the broker is up and
    reconciled, then never again."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        exit_, gate = await overtaken(w)
        kill = Kill(w.journal)
        kill.at_signal(lambda body: body.get("follow_of") == "t-exit")
        gate.set()
        await asyncio.wait_for(wait_until(lambda: kill.dead), 5)
        assert (w.journal.get_order(exit_) or {})["status"] == FILLED and held(w) == -2
        assert follow_ups(w, "t-exit") == []  # died with the process
    await kill.bury()

    async with trend_world(tmp_path, clock) as w:
        await w.settle()
        assert held(w) == 0 and ledger(w) == {}  # not short 2
        [follow] = follow_ups(w, "t-exit")
        assert follow["id"] == "t-exit-follow-1"
        assert follow["signal"]["covers"] == BASIS_PREFIX + exit_ and legs(follow) == [("a1", "buy", 2, FILLED)]
    await restart_is_quiet(tmp_path, clock, 0)
    await restart_is_quiet(tmp_path, clock, 0)


async def test_the_journaled_basis_counts_only_what_was_closed_by_hand_after_the_decision(tmp_path: Path) -> None:
    """(a) on a line the trader had closed 1 of by hand earlier in the day: the exit's basis (-1) is journaled with
    its signal, and the restart makes good the 2 closed twice, not 3."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        exit_, gate = await overtaken(w, closed_before=1)
        assert (w.journal.get_signal("t-exit") or {})["signal"]["exit_watch"] == [
            {"exit": BASIS_PREFIX + exit_, "hand_basis": -1}]
        kill = Kill(w.journal)
        kill.at_signal(lambda body: body.get("follow_of") == "t-exit")
        gate.set()
        await asyncio.wait_for(wait_until(lambda: kill.dead), 5)
        assert held(w) == -2
    await kill.bury()

    async with trend_world(tmp_path, clock) as w:
        await w.settle()
        assert held(w) == 0 and ledger(w) == {}
        [follow] = follow_ups(w, "t-exit")
        assert legs(follow) == [("a1", "buy", 2, FILLED)]
    await restart_is_quiet(tmp_path, clock, 0)


def answer_nothing(w: World) -> asyncio.Event:
    """From now on ``fast`` takes orders and never answers (the process dies waiting); set once one arrives."""
    arrived = asyncio.Event()

    async def lost(request: Any) -> Any:
        arrived.set()
        await asyncio.Event().wait()

    w.connector("fast")._submit = lost
    return arrived


async def test_an_exit_in_flight_at_the_crash_overtaken_before_it_is_made_good_once(tmp_path: Path) -> None:
    """(b) The exit's request never got an answer, and the trader's sell 2 was booked before the process died. The
    start must not take the basis from the ledger it replays (the trade by hand is in it: the overtaking would be
    invisible): it takes the journaled one (none: zero), holds the stand-in, and the exit, sent again by recovery
    and filled, is bought back once."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        await w.submit(target("trend", "t-long", "long", 2))
        await w.settle()
        arrived = answer_nothing(w)
        await w.submit(signal("trend", "exit", sid="t-exit"))
        await asyncio.wait_for(arrived.wait(), 5)
        exit_ = coid(w, "t-exit", "a1", "exit")
        await by_hand(w, Side.SELL, 2, 1)
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()

    async with trend_world(tmp_path, clock, start=False) as w:
        await w.runtime.start()
        assert exit_ in w.runtime._overtaking and w.runtime._hand_basis == {}  # before any broker came up
        assert BASIS_PREFIX + exit_ in w.runtime._holds  # the stand-in: the engine sees the line where it will be
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert (w.journal.get_order(exit_) or {})["status"] == FILLED
        assert held(w) == 0 and ledger(w) == {}  # not short 2
        [follow] = follow_ups(w, "t-exit")
        assert follow["signal"]["covers"] == BASIS_PREFIX + exit_ and legs(follow) == [("a1", "buy", 2, FILLED)]
    await restart_is_quiet(tmp_path, clock, 0)
    await restart_is_quiet(tmp_path, clock, 0)


async def test_a_restart_after_an_exit_nothing_overtook_issues_nothing(tmp_path: Path) -> None:
    """The trader closed 1 by hand before the exit was decided (its basis, journaled), the exit filled, and "short
    1" opened the line again: nothing was closed twice. Without the journaled basis a restart would count that
    trade by hand as overtaking the exit and buy back the short that "short 1" asked for."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        await w.submit(target("trend", "t-long", "long", 2))
        await w.settle()
        await by_hand(w, Side.SELL, 1, 1)
        await w.submit(signal("trend", "exit", sid="t-exit"))
        await w.settle()
        await w.submit(target("trend", "t-short", "short", 1))
        await w.settle()
        assert held(w) == -1 and ledger(w) == {("a1", "trend", CONTRACT): -1}
        assert follow_ups(w, "t-exit") == []
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()
    await restart_is_quiet(tmp_path, clock, -1)
    await restart_is_quiet(tmp_path, clock, -1)
