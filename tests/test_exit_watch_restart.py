"""A signal's exit watch survives kill -9 (``service.exits``): after a restart, an exit that counted on an entry the
broker then rejected is still made good, once, toward where the exit meant the line to be.

"long 2" whose entry is in flight, then "short 1": the engine counts the entry, so "short 1" sells 2 to close it and
1 to open. The broker rejects the entry; without the make-good (buy 2) the account ends short 3, and reconciliation
sees nothing wrong (the ledger and the broker agree). The crash is the one of ``tests.test_flatten_watch_restart``:
from the instant of the kill nothing more reaches the journal, the paper brokers keep their books (files), and the
next runtime starts on the same data directory. Every position is read from the paper broker's own book.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

from service.dispatch import FILLED, REJECTED
from tests.harness.runtime import NOON, Clock, World, account_doc, documents, routing_doc, wait_until, world
from tests.harness.runtime import write_rules
from tests.test_flatten_watch_restart import Kill
from tests.test_strategy_positions import target

CONTRACT = "MESH6"
BROKER_ACCOUNT = {"a1": "A-1", "a2": "A-2"}


@contextlib.asynccontextmanager
async def trend_world(tmp_path: Path, clock: Clock, *, accounts: tuple[str, ...] = ("a1",), start: bool = True,
                      fast_ms: float = 0) -> AsyncIterator[World]:
    """``trend`` in mirror mode at ``accounts``, all at the ``fast`` paper broker (same ``tmp_path``: same journal
    and broker books)."""
    directory = write_rules(tmp_path / "rules", fast_ms=fast_ms)
    (directory / "accounts.yaml").write_text(documents(*(account_doc(a, "fast", BROKER_ACCOUNT[a], "trend")
                                                         for a in accounts)))
    (directory / "routing.yaml").write_text(routing_doc("trend"))
    async with world(tmp_path, rules_dir=directory, clock=clock, start=start) as started:
        yield started


def held(w: World, account: str = "a1") -> int:
    """``account``'s position as its paper broker holds it (not what the ledger believes)."""
    return sum(int(p["quantity"]) for p in w.connector("fast").book.positions(BROKER_ACCOUNT[account]))


def ledger(w: World) -> dict[Any, int]:
    return {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}


def follow_ups(w: World, sid: str) -> list[dict[str, Any]]:
    """Every follow-up journaled for signal ``sid`` (its exits' make-goods), oldest first."""
    ids = sorted(str(row["id"]) for row in w.journal.recent_signals(500)
                 if (row.get("signal") or {}).get("follow_of") == sid)
    return [row for fid in ids if (row := w.journal.get_signal(fid)) is not None]


def legs(row: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    return [(o["account"], o["side"], int(o["quantity"]), o["status"]) for o in row["orders"]]


def coid(w: World, sid: str, account: str, intent: str) -> str:
    """The client order id of signal ``sid``'s ``intent`` order at ``account``."""
    [found] = [o["client_order_id"] for o in (w.journal.get_signal(sid) or {})["orders"]
               if o["account"] == account and o["intent"] == intent]
    return str(found)


def refuse(w: World, coids: set[str]) -> None:
    """The broker rejects these orders whenever they reach it (a prop firm's margin check)."""
    book = w.connector("fast").book
    accept = book.accept

    def accept_or_refuse(request: Any) -> Any:
        if request.client_order_id in coids:
            raise book._rejected(request, "insufficient margin (test)")
        return accept(request)

    book.accept = accept_or_refuse


async def long_then_short(w: World) -> None:
    """"long 2" (its entry in flight), then "short 1", which counts on it: sell 2 to close it, sell 1 to open."""
    await w.submit(target("trend", "t-long", "long", 2))
    short = await w.submit(target("trend", "t-short", "short", 1))
    assert [(o.account, o.side, o.quantity, o.intent) for o in short.orders if o.account == "a1"] == [
        ("a1", "sell", 2, "exit"), ("a1", "sell", 1, "entry")]


async def long_then_short_unanswered(w: World) -> None:
    """``long_then_short`` with the entry's request gone to the broker and no answer coming before the kill."""
    arrived = asyncio.Event()

    async def lost(request: Any) -> Any:
        arrived.set()
        await asyncio.Event().wait()

    w.connector("fast")._submit = lost
    await long_then_short(w)
    await asyncio.wait_for(arrived.wait(), 5)


async def restart_is_quiet(tmp_path: Path, clock: Clock, sid: str, where: dict[str, int]) -> None:
    """Another restart, with nothing owed: no follow-up, no order, nothing moves at the broker."""
    async with trend_world(tmp_path, clock, accounts=tuple(where)) as w:
        before = len(w.book_orders("fast", "A-1")) + len(w.book_orders("fast", "A-2"))
        count = len(follow_ups(w, sid))
        await w.settle()
        await asyncio.sleep(0.05)  # anything a come-up started in the background has run
        await w.settle()
        assert len(follow_ups(w, sid)) == count
        assert len(w.book_orders("fast", "A-1")) + len(w.book_orders("fast", "A-2")) == before
        assert {a: held(w, a) for a in where} == where
        assert w.runtime._owed_follow_ups == {} and w.runtime._exit_watches == {} and w.runtime._counted_by == {}


async def test_a_counted_entry_in_flight_at_the_crash_and_rejected_in_recovery_is_made_good_once(
        tmp_path: Path) -> None:
    """(a) The entry's request never got an answer, "short 1" was decided on it, and the process dies. The
    restart's recovery finds the entry nowhere at the broker, sends it again, and the broker rejects it; the exit
    goes out and fills. The rebuilt watch makes good the overshoot (buy 2): short 1, not short 3."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        await long_then_short_unanswered(w)
        entry, exit_ = coid(w, "t-long", "a1", "entry"), coid(w, "t-short", "a1", "exit")
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()

    async with trend_world(tmp_path, clock, start=False) as w:
        refuse(w, {entry})
        await w.runtime.start()
        assert exit_ in w.runtime._exit_watches  # rebuilt from the journal before any broker came up
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert w.statuses("t-long") == {"a1": REJECTED}
        assert (w.journal.get_order(exit_) or {})["status"] == FILLED
        assert held(w) == -1 and ledger(w) == {("a1", "trend", CONTRACT): -1}  # short 1, not short 3
        [follow] = follow_ups(w, "t-short")
        assert follow["signal"]["covers"] == exit_ and legs(follow) == [("a1", "buy", 2, FILLED)]
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})


async def test_a_make_good_lost_with_the_process_after_everything_settled_is_issued_by_the_restart(
        tmp_path: Path) -> None:
    """(b) The entry is rejected and the exit fills before the crash (both final on disk); the make-good is held and
    the process dies before its commit: nothing in the journal says it is owed but the signal's watch. The restart
    issues it once the broker is up and reconciled: short 1, not short 3."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock, fast_ms=30) as w:
        kill = Kill(w.journal)
        kill.at_signal(lambda body: body.get("follow_of") == "t-short")
        w.connector("fast").reject_next(1)  # the entry of "long 2"
        await long_then_short(w)
        await asyncio.wait_for(wait_until(lambda: kill.dead), 5)
        entry, exit_ = coid(w, "t-long", "a1", "entry"), coid(w, "t-short", "a1", "exit")
        assert (w.journal.get_order(entry) or {})["status"] == REJECTED  # settled, on disk
        assert follow_ups(w, "t-short") == []  # its make-good died with the process
    await kill.bury()

    async with trend_world(tmp_path, clock) as w:
        await w.settle()
        assert (w.journal.get_order(exit_) or {})["status"] == FILLED
        assert held(w) == -1 and ledger(w) == {("a1", "trend", CONTRACT): -1}
        [follow] = follow_ups(w, "t-short")
        assert follow["id"] == "t-short-follow-1"  # the lost id never reached the journal, nor a broker
        assert follow["signal"]["covers"] == exit_ and legs(follow) == [("a1", "buy", 2, FILLED)]
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})


async def test_a_watch_rebuilt_whose_entry_fills_in_recovery_owes_nothing(tmp_path: Path) -> None:
    """The entry in flight at the crash fills during recovery: the rebuilt watch (journaled with its signal) ends
    with nothing to make good, and neither this restart nor the next sends anything of its own."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock) as w:
        await long_then_short_unanswered(w)
        entry, exit_ = coid(w, "t-long", "a1", "entry"), coid(w, "t-short", "a1", "exit")
        assert (w.journal.get_signal("t-short") or {})["signal"]["exit_watch"] == [
            {"exit": exit_, "account": "a1", "strategy": "trend", "contract": CONTRACT, "counted": [entry],
             "assumed": 2}]
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()

    async with trend_world(tmp_path, clock, start=False) as w:
        await w.runtime.start()
        assert w.runtime._exit_watches[exit_].counted == {entry}
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert w.statuses("t-long") == {"a1": FILLED}
        assert held(w) == -1 and ledger(w) == {("a1", "trend", CONTRACT): -1}
        assert follow_ups(w, "t-short") == []
        assert w.runtime._exit_watches == {} and w.runtime._counted_by == {}
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})


async def test_a_make_good_journaled_before_the_crash_is_not_issued_again(tmp_path: Path) -> None:
    """The make-good was journaled (and filled) before the crash: it covers the exit, so the restarts owe nothing
    and send nothing, however many there are."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock, fast_ms=30) as w:
        w.connector("fast").reject_next(1)
        await long_then_short(w)
        await w.settle()
        [follow] = follow_ups(w, "t-short")
        assert legs(follow) == [("a1", "buy", 2, FILLED)] and held(w) == -1
        assert (w.journal.get_signal("t-short") or {})["signal"]["exit_watch"][0]["exit"] == follow["signal"]["covers"]
        kill = Kill(w.journal)
        kill.now()
    await kill.bury()
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -1})


async def test_a_watch_a_flatten_took_over_before_the_crash_is_not_revived(tmp_path: Path) -> None:
    """a1 and a2 both follow trend; both entries of "long 2" are held at the broker when "short 1" is decided, and
    both are rejected. A flatten of a1 takes a1's watch over before the crash (its own watch buys the 2 back) and
    "short 2" opens a1 again; then the process dies at a2's make-good commit. The restart makes good a2's exit
    (short 2, not short 4) and must not revive a1's: buying 2 there would close the short 2 that "short 2" opened."""
    clock = Clock(NOON)
    async with trend_world(tmp_path, clock, accounts=("a1", "a2")) as w:
        fast = w.connector("fast")
        submit, gates = fast._submit, {}

        async def held_back(request: Any) -> Any:  # the entries of "long 2" wait at the broker until let go
            gate = gates.get(request.client_order_id)
            if gate is not None:
                await gate.wait()
            return await submit(request)

        fast._submit = held_back
        await w.submit(target("trend", "t-long", "long", 2))
        entries = {a: coid(w, "t-long", a, "entry") for a in ("a1", "a2")}
        gates.update({c: asyncio.Event() for c in entries.values()})
        refuse(w, set(entries.values()))
        short = await w.submit(target("trend", "t-short", "short", 1))
        assert sorted((o.account, o.side, o.quantity, o.intent) for o in short.orders) == [
            ("a1", "sell", 1, "entry"), ("a1", "sell", 2, "exit"), ("a2", "sell", 1, "entry"), ("a2", "sell", 2, "exit")]
        exits = {a: coid(w, "t-short", a, "exit") for a in ("a1", "a2")}

        flatten = await w.runtime.flatten(account="a1", reason="operator")
        assert set(w.runtime._exit_watches) == {exits["a2"]}  # a1's taken over
        gates[entries["a1"]].set()
        await wait_until(lambda: held(w, "a1") == 0 and not [t for t in w.runtime.tracker.unsettled()
                                                             if t.job.account == "a1"], what="a1 flat")
        [own] = follow_ups(w, flatten["signal_id"])  # the flatten's watch bought back what its count assumed
        assert own["signal"]["covers"] == entries["a1"] and legs(own) == [("a1", "buy", 2, FILLED)]
        await w.submit(target("trend", "t-again", "short", 2))  # a1 opens again
        await wait_until(lambda: held(w, "a1") == -2, what="a1 short 2")

        kill = Kill(w.journal)
        kill.at_signal(lambda body: body.get("follow_of") == "t-short")
        gates[entries["a2"]].set()
        await asyncio.wait_for(wait_until(lambda: kill.dead), 5)
    await kill.bury()

    async with trend_world(tmp_path, clock, accounts=("a1", "a2")) as w:
        await w.settle()
        assert {a: held(w, a) for a in ("a1", "a2")} == {"a1": -2, "a2": -2}  # a2 not short 4, a1 not flat
        assert ledger(w) == {("a1", "trend", CONTRACT): -2, ("a2", "trend", CONTRACT): -2}
        [follow] = follow_ups(w, "t-short")
        assert follow["signal"]["covers"] == exits["a2"] and legs(follow) == [("a2", "buy", 2, FILLED)]
    await restart_is_quiet(tmp_path, clock, "t-short", {"a1": -2, "a2": -2})
