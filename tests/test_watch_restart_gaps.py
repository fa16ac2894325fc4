"""The journaled exit watches across kill -9, in the corners the first tests left open (``service.exits``,
``service.overtaken``): an exit made good twice whose second make-good dies with the process; a basis appended to a
come-up's re-issued exit; an overtaken exit of a flatten or a follow-up; an exit with no journaled basis; a trade by
hand reported late in the come-up of a restart.

The crash is the one of ``tests.test_flatten_watch_restart`` (from the instant of the kill nothing more reaches the
journal; the paper broker keeps its book; the next runtime starts on the same data directory). Orders are held at
the broker, or never answered, by events, not by timing. Every position is read from the paper broker's own book,
and every test restarts once more to pin that nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from brokers.base import Side
from service.dispatch import CANCELLED, FILLED
from service.overtaken import BASIS_PREFIX
from tests.harness.runtime import NOON, Clock, World, signal, wait_until
from tests.test_exit_watch_restart import CONTRACT, coid, follow_ups, held, ledger, legs, trend_world
from tests.test_exit_watch_restart import restart_is_quiet
from tests.test_flatten_watch_restart import Kill
from tests.test_overtaken_restart import answer_nothing, by_hand
from tests.test_strategy_positions import target


def resting(w: World, coids: set[str]) -> None:
    """These market orders are accepted at the broker and rest there unfilled (working) until ``broker_cancels``."""
    fast = w.connector("fast")
    fill_now = fast._fill_now

    def fill_unless_resting(order_id: str) -> Any:
        if (fast.book.order(order_id) or {}).get("client_order_id") in coids:
            return None
        return fill_now(order_id)

    fast._fill_now = fill_unless_resting


def broker_cancels(w: World, client_order_id: str) -> None:
    """The broker ends a resting order unfilled (an expiry, a risk desk): it settles ``cancelled``, 0 filled."""
    book = w.connector("fast").book
    found = book.find("A-1", client_order_id)
    assert found is not None and found["status"] == "working"
    book.cancel("A-1", found["broker_order_id"])


# -- 1. one exit, two make-goods, the second lost ---------------------------------------------------------------

async def two_make_goods_second_lost(tmp_path: Path, clock: Clock) -> tuple[str, str]:
    """"long 1" and "long 2" (buy 1 more): both entries rest at the broker unfilled when "short 1" is decided, so
    its exit sells 2 counting on both. The exit fills; the broker cancels the first entry (make-good: buy 1,
    journaled, filled), then the second (make-good: buy 1), and the process dies at that commit: short 2 at the
    broker. Returns the exit's id and the first entry's."""
    async with trend_world(tmp_path, clock) as w:
        await w.submit(target("trend", "t-long-1", "long", 1))
        first = coid(w, "t-long-1", "a1", "entry")
        resting(w, {first})
        await w.submit(target("trend", "t-long-2", "long", 2))
        second = coid(w, "t-long-2", "a1", "entry")
        resting(w, {second})
        await wait_until(lambda: w.statuses("t-long-2") == {"a1": "acknowledged"}, what="both entries resting")
        short = await w.submit(target("trend", "t-short", "short", 1))
        assert [(o.side, o.quantity, o.intent) for o in short.orders] == [("sell", 2, "exit"), ("sell", 1, "entry")]
        exit_ = coid(w, "t-short", "a1", "exit")
        await wait_until(lambda: (w.journal.get_order(exit_) or {}).get("status") == FILLED, what="exit filled")
        broker_cancels(w, first)
        await wait_until(lambda: len(follow_ups(w, "t-short")) == 1 and held(w) == -2, 10, "first make-good")
        kill = Kill(w.journal)
        kill.at_signal(lambda body: body.get("follow_of") == "t-short")
        broker_cancels(w, second)
        await asyncio.wait_for(wait_until(lambda: kill.dead), 5)
        assert (w.journal.get_order(second) or {})["status"] == CANCELLED and held(w) == -2
    await kill.bury()
    return exit_, first


async def test_the_second_make_good_of_one_exit_lost_in_a_crash_is_owed_and_the_first_is_not_repeated(
        tmp_path: Path) -> None:
    """``two_make_goods_second_lost``: the restart owes exactly the second make-good: short 1, not short 2 (the
    first follow-up, naming only the exit, read as covering both) nor flat (both made good again)."""
    clock = Clock(NOON)
    exit_, first = await two_make_goods_second_lost(tmp_path, clock)

    async with trend_world(tmp_path, clock) as w:
        await w.settle()
        assert held(w) == -1 and ledger(w) == {("a1", "trend", CONTRACT): -1}
        made = follow_ups(w, "t-short")
        assert [legs(f) for f in made] == [[("a1", "buy", 1, FILLED)], [("a1", "buy", 1, FILLED)]]
        # The first, made while the second entry was in flight, names what it made good; the last names the exit.
        assert [f["signal"]["covers"] for f in made] == [f"{exit_}:{first}", exit_]
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})


async def test_a_make_good_journaled_by_the_old_code_naming_only_the_exit_is_never_repeated(tmp_path: Path) -> None:
    """The same crash on a journal whose first make-good names the bare exit (as the code before partial
    make-goods were told apart wrote every one): it reads as covering every order the exit counted on, so the
    restart repeats nothing (no buy 2: flat), at the price of the old limit (the second make-good stays lost)."""
    clock = Clock(NOON)
    exit_, _first = await two_make_goods_second_lost(tmp_path, clock)
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "journal.db")) as db, db:
        db.execute("UPDATE signals SET signal = json_set(signal, '$.covers', ?) WHERE id = 't-short-follow-1'",
                   (exit_,))
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -2})
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -2})


# -- 2a. a basis appended to a come-up's re-issued exit ----------------------------------------------------------

async def redo_dies_before_sending(w: World, *, append_lost: bool) -> tuple[Kill, str]:
    """trend long 2; the trader sells 1 by hand (trend's line: 1 closed by hand, its basis from now on); ``fast``
    drops, an operator flatten of a1 misses there, ``fast`` comes back and the come-up re-issues it: sell 1, with
    its basis (-1) appended to the redo's signal already written. The process dies before the exit goes out: after
    the append's commit, or (``append_lost``) before it. Returns the kill and the redo's id."""
    await w.submit(target("trend", "t-long", "long", 2))
    await w.settle()
    await by_hand(w, Side.SELL, 1, 1)
    assert held(w) == 1 and w.runtime.ledger.hand_closed == {("a1", "trend", CONTRACT): -1}
    w.connector("fast").disconnect("test drop")
    await wait_until(lambda: w.runtime.pool is not None and w.runtime.pool["fast"].down, what="fast down")
    flatten = await w.runtime.flatten(account="a1", reason="operator")
    await wait_until(lambda: w.statuses(flatten["signal_id"]) == {"a1": "missed"}, what="the flatten missed at a1")
    kill = Kill(w.journal)
    if append_lost:
        note = w.journal.note_with_exit

        def die_then_note(signal_id: str, client_order_id: str, entry: Any) -> None:
            kill.now()
            note(signal_id, client_order_id, entry)

        w.journal.note_with_exit = die_then_note  # type: ignore[method-assign]
    send_come_up = w.runtime._send_come_up

    async def die_before_sending(jobs: list[Any], broker: str, what: str) -> None:
        if what == "exits" and jobs:
            if not kill.dead:
                await w.journal.execute("SELECT 1")  # queued after the append: it has committed
                kill.now()
            return
        await send_come_up(jobs, broker, what)

    w.runtime._send_come_up = die_before_sending  # type: ignore[method-assign]
    await w.connector("fast").reconnect()
    await asyncio.wait_for(wait_until(lambda: kill.dead), 5)
    [redo] = [s["id"] for s in w.journal.recent_signals(50) if "-redo-" in s["id"]]
    return kill, redo


async def test_a_come_up_exit_whose_appended_basis_reached_the_disk_is_sent_by_the_restart_and_not_made_good(
        tmp_path: Path) -> None:
    """The append committed, the exit never left (``new``): the restart's recovery sends it (sell 1: flat) with
    its journaled basis, so the sell 1 by hand before its decision does not read as overtaking it: no follow-up."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        kill, redo = await redo_dies_before_sending(w, append_lost=False)
        exit_ = coid(w, redo, "a1", "exit")
        assert (w.journal.get_order(exit_) or {})["status"] == "new" and held(w) == 1
        assert (w.journal.get_signal(redo) or {})["signal"]["exit_watch"] == [
            {"exit": BASIS_PREFIX + exit_, "hand_basis": -1}]
    await kill.bury()

    async with trend_world(tmp_path, clock) as w:
        await w.settle()
        assert (w.journal.get_order(exit_) or {})["status"] == FILLED
        assert held(w) == 0 and ledger(w) == {}
        assert follow_ups(w, redo) == []
    await overtaken_quiet(tmp_path, clock, redo, 0)


async def test_a_come_up_exit_whose_appended_basis_was_lost_is_not_taken_for_overtaken(tmp_path: Path) -> None:
    """The process dies between the redo's commit and the append's: the exit is ``new`` with no basis on disk,
    which is not "basis 0" here (the re-issue was journaled before its basis could be). Read as 0, the sell 1 by
    hand made before the decision would count as overtaking it, and a follow-up would buy 1: long 1."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        kill, redo = await redo_dies_before_sending(w, append_lost=True)
        exit_ = coid(w, redo, "a1", "exit")
        assert (w.journal.get_order(exit_) or {})["status"] == "new" and held(w) == 1
        assert "exit_watch" not in (w.journal.get_signal(redo) or {})["signal"]
    await kill.bury()

    async with trend_world(tmp_path, clock, start=False) as w:
        await w.runtime.start()
        # Not overtaken, no stand-in: the engine sees trend's line where the exit will leave it (flat), not long 1.
        assert w.runtime._overtaking == {} and BASIS_PREFIX + exit_ not in w.runtime._holds
        assert w.runtime._hand_basis == {exit_: -1}
        assert w.runtime._line_stands("a1", "trend", CONTRACT) == 0
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert (w.journal.get_order(exit_) or {})["status"] == FILLED
        assert held(w) == 0 and ledger(w) == {}
        assert follow_ups(w, redo) == []
    await overtaken_quiet(tmp_path, clock, redo, 0)


async def overtaken_quiet(tmp_path: Path, clock: Clock, sid: str, where: int) -> None:
    """Another restart, with nothing owed: no follow-up of ``sid``, no order, nothing moves at the broker."""
    async with trend_world(tmp_path, clock) as w:
        before, count = len(w.book_orders("fast", "A-1")), len(follow_ups(w, sid))
        await w.settle()
        await asyncio.sleep(0.05)  # anything a come-up started in the background has run
        await w.settle()
        assert len(follow_ups(w, sid)) == count and len(w.book_orders("fast", "A-1")) == before
        assert held(w) == where
        assert w.runtime._owed_follow_ups == {} and w.runtime._overtaking == {} and w.runtime._hand_basis == {}


# -- 2b. an overtaken flatten exit with a non-zero basis across a crash --------------------------------------------

async def test_an_overtaken_flatten_exit_in_flight_at_the_crash_keeps_its_basis_and_is_made_good_once(
        tmp_path: Path) -> None:
    """trend long 2; the trader sells 1 by hand (basis -1); an operator flatten's exit (sell 1, its basis journaled
    in the flatten's own body) gets no answer, the trader sells 1 more by hand, and the process dies. The restart
    takes the flatten exit's basis from the journal (-1, not 0 and not the count at load, -2), holds its stand-in,
    and once recovery has it filled buys back the 1 closed twice: flat, then nothing more."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        await w.submit(target("trend", "t-long", "long", 2))
        await w.settle()
        await by_hand(w, Side.SELL, 1, 1)
        arrived = answer_nothing(w)
        flatten = await w.runtime.flatten(account="a1", reason="operator")
        fid = str(flatten["signal_id"])
        await asyncio.wait_for(arrived.wait(), 5)
        exit_ = coid(w, fid, "a1", "exit")
        assert (w.journal.get_signal(fid) or {})["signal"]["exit_watch"] == [
            {"exit": BASIS_PREFIX + exit_, "hand_basis": -1}]
        await by_hand(w, Side.SELL, 1, 2)
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()

    async with trend_world(tmp_path, clock, start=False) as w:
        await w.runtime.start()
        assert w.runtime._hand_basis == {exit_: -1} and w.runtime._overtaking[exit_].basis == -1
        assert BASIS_PREFIX + exit_ in w.runtime._holds
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert (w.journal.get_order(exit_) or {})["status"] == FILLED
        assert held(w) == 0 and ledger(w) == {}
        [follow] = follow_ups(w, fid)
        assert follow["signal"]["covers"] == BASIS_PREFIX + exit_ and legs(follow) == [("a1", "buy", 1, FILLED)]
    await overtaken_quiet(tmp_path, clock, fid, 0)
    await overtaken_quiet(tmp_path, clock, fid, 0)


# -- 2d. a trade by hand reported late, in the come-up a crash cut short -------------------------------------------

async def test_an_exit_settled_in_a_come_up_cut_short_by_a_crash_stays_watched_for_the_trade_by_hand_reported_late(
        tmp_path: Path) -> None:
    """trend long 2; "exit" sells 2 and gets no answer; the link drops and the trader sells 2 by hand at the broker
    (not reported: the link is down). The restart's recovery finds the exit nowhere and sends it: it fills after the
    trader's sale (short 2), and the process dies before the come-up's reconciliation reads the trader's fill. The
    next start finds the exit final and not overtaken (the trade by hand is not in the journal): unless it watches
    it until its broker's come-up pass ends, as the live watch did, that pass books the trade by hand and nothing
    buys the 2 back."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        await w.submit(target("trend", "t-long", "long", 2))
        await w.settle()
        arrived = answer_nothing(w)
        fast = w.connector("fast")
        await w.submit(signal("trend", "exit", sid="t-exit"))
        await asyncio.wait_for(arrived.wait(), 5)
        exit_ = coid(w, "t-exit", "a1", "exit")
        fast.disconnect("test drop")
        fast.manual_trade("A-1", CONTRACT, Side.SELL, 2, "manual-1")  # at the broker; not reported
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()

    async with trend_world(tmp_path, clock, start=False) as w:
        kill = Kill(w.journal)
        reconcile = w.runtime.reconcile_broker

        async def die_first(broker: str, *, reason: str) -> Any:
            if not kill.dead:
                await wait_until(lambda: (w.journal.get_order(exit_) or {}).get("status") == FILLED
                                 and w.runtime.ledger.book("a1", "trend", CONTRACT).quantity == 0)
                kill.now()
                await asyncio.Event().wait()
            return await reconcile(broker, reason=reason)

        w.runtime.reconcile_broker = die_first  # type: ignore[method-assign]
        await w.runtime.start()
        await asyncio.wait_for(wait_until(lambda: kill.dead), 5)
        assert held(w) == -2 and len(w.journal.fills()) == 2  # trend's buy 2 and its exit: not the trader's sale
    await kill.bury()

    async with trend_world(tmp_path, clock) as w:
        await w.settle()
        assert held(w) == 0 and ledger(w) == {}  # not short 2
        [follow] = follow_ups(w, "t-exit")
        assert follow["signal"]["covers"] == BASIS_PREFIX + exit_ and legs(follow) == [("a1", "buy", 2, FILLED)]
        assert w.runtime._overtaken == {}  # the come-up's pass ended the watch
    await overtaken_quiet(tmp_path, clock, "t-exit", 0)
    await overtaken_quiet(tmp_path, clock, "t-exit", 0)
