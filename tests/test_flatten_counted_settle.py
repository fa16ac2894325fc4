"""A flatten's exit rejected around the settling of an order it counted on: the line still ends flat.

A flatten computed while an order is in flight on a line counts it as if it will fill and exits the rest
(``service.flatten``: ``_Netted``). When the counted order then does not fill (rejected, or cancelled after a part
fill), the line is off flat by what it left: a follow-up closes that while the flatten's own exit is in flight, and
the retry of a rejected exit recomputes the line when the exit failed first (``_own_exit_failed``). The retry is
capped to what the rejected exit left unfilled (``_cap_to_unfilled``), and that exit was sized on the counted order
filling: a sell counted on a long line that then did not fill left more open than the cap allowed, and nobody owed
the rest (the retry filled, the flatten counted as settled, the line stayed long with no ``flatten_failed``). A retry
due while the counted order was still in flight counted it as the flatten had, unwatched: a buy counted on a long
line that then did not fill (or filled only after the retry's sell) left the account short. Now the cap counts what
counted orders left undone after the exit failed (``_counted_undone``), and a retry waits for the orders in flight on
its lines (``_retry_waits``). Before the fix the second ordering below failed in every outcome it runs (the line left
long 1 or 2, or the account short 1 or 2, or short 2 on the way)

Real runtime, real journal, paper brokers with no latency. ``f1`` follows ``trend`` at ``fast``. The counted order is
a market order whose fill the broker holds back (so that it fills, fills in part and is cancelled, or is rejected, when
the test says); every
request to ``fast`` waits at the door (``Door``) until the test lets it through, and the retries wait until the test
lets them compute (``hold_retries``). Positions are read from the paper broker's own book.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from service.dispatch import FINAL, REJECTED
from tests.harness.runtime import NOON, Clock, World, signal, wait_until, world
from tests.test_flatten_race import books, held, rules  # f1 follows trend at fast, fills after 1 ms
from tests.test_flatten_retry_caps import Door, coid_of, failures, hold_retries

SIDES = {
    # name: (trend's position before, the counted order: side, quantity; what the flatten's exit sells)
    "counted on the exit's side": (3, "sell", 2, 1),
    "counted against the exit": (1, "buy", 2, 3),
}
OUTCOMES = ("filled", "part filled then cancelled", "cancelled unfilled", "rejected")
ORDERINGS = (
    "exit rejected after the counted order settles",
    "exit rejected before, retry due before the counted order settles",
)
CASES = [(outcome, ordering) for outcome in OUTCOMES for ordering in ORDERINGS
         # An account's orders leave one at a time, each after the broker answered the one before (``Dispatcher``'s
         # lanes): the counted order is rejected (or not) before the flatten's exit is sent at all.
         if (outcome, ordering) != ("rejected", ORDERINGS[1])]


class Counted:
    """The counted order: a market order whose fill the paper broker holds back (it works at the broker,
    acknowledged) until ``settle`` says how it ends; or, to be rejected, one that waits at the door until then."""

    def __init__(self, w: World, door: Door, outcome: str) -> None:
        self.w, self.door, self.outcome = w, door, outcome
        self.coid = ""
        self.gate = asyncio.Event()
        connector = w.connector("fast")
        fill_later = connector._fill_later

        async def fill(order_id: str) -> None:
            row = connector.book.order(order_id)
            if row is None or row["client_order_id"] != self.coid:
                return await fill_later(order_id)
            await self.gate.wait()
            book = connector.book
            if self.outcome == "filled":
                book.fill(order_id, int(row["quantity"]))
                return
            if self.outcome == "part filled then cancelled":
                book.fill(order_id, 1)
            book.cancel("F-1", order_id)

        connector._fill_later = fill

    async def send(self, sid: str) -> None:
        """Once signal ``sid`` is decided: its order reaches the broker and works there (a rejected one waits)."""
        self.coid = coid_of(self.w, sid)
        if self.outcome != "rejected":
            await through(self.door, self.coid)

    async def settle(self) -> None:
        """The counted order ends as ``outcome``; return once the runtime acted on it (its settled hooks ran)."""
        tracker = self.w.runtime.tracker
        if self.outcome == "rejected":
            self.w.connector("fast").reject_next(1)
            await self.door.let_through(self.coid, REJECTED)
            return
        self.gate.set()
        await wait_until(lambda: tracker.orders[self.coid].status in FINAL
                         and tracker.orders[self.coid] not in tracker.unsettled(), what=f"{self.coid} settled")


def open_door(door: Door) -> None:
    """Every request from now on goes straight to the broker, and so do those waiting (a follow-up)."""
    door.closed = False
    for gate in door.waiting.values():
        gate.set()


async def through(door: Door, coid: str) -> None:
    """Let ``coid`` reach the broker; return once the runtime has its answer (working: its fill held or to come)."""
    tracker = door.w.runtime.tracker
    await wait_until(lambda: coid in door.waiting, what=f"{coid} at the door")
    door.waiting[coid].set()
    await wait_until(lambda: (t := tracker.orders.get(coid)) is not None and t.status not in ("new", "sending"),
                     what=f"{coid} answered")


def family(w: World, fid: str) -> list[dict[str, Any]]:
    """Every order of flatten ``fid`` and of the flattens that carry it out (follow-ups, retries, their retries)."""
    return [o for o in w.journal.orders() if str(o["signal_id"]).startswith(fid)]


def positions(w: World) -> list[int]:
    """f1's position at the broker after each of its fills there, in order (never short: nothing reversed it)."""
    running, out = 0, []
    for fill in w.connector("fast").book.fills_since("F-1", NOON - timedelta(days=1)):
        running += int(fill["quantity"]) if fill["side"] == "buy" else -int(fill["quantity"])
        out.append(running)
    return out


def trades(w: World) -> list[tuple[str, str, int, str]]:
    """Every order journaled, in order: (signal id less the flatten's time, side, quantity, status)."""
    return [(str(o["signal_id"])[-24:], str(o["side"]), int(o["quantity"]), str(o["status"]))
            for o in sorted(w.journal.orders(), key=lambda o: str(o["created_at"]))]


@pytest.mark.parametrize(("outcome", "ordering"), CASES)
@pytest.mark.parametrize("side", SIDES)
async def test_the_line_ends_flat_whatever_the_counted_order_does_and_whenever(
        tmp_path: Path, side: str, outcome: str, ordering: str) -> None:
    before, counted_side, counted_qty, exit_qty = SIDES[side]
    async with world(tmp_path, rules_dir=rules(tmp_path), clock=Clock(NOON)) as w:
        w.runtime.flatten_retry_delays_s = (0.0, 0.0, 0.0)  # due at once: ``hold_retries`` says when
        await w.submit(signal("trend", "buy", before, sid="open"))
        await w.settle()
        contract = str(w.journal.get_signal("open")["orders"][0]["contract"])  # type: ignore[index]
        assert books(w) == {"trend": before} and held(w) == {contract: before}

        door, go = Door(w), hold_retries(w)
        counted = Counted(w, door, outcome)
        await w.submit(signal("trend", counted_side, counted_qty, sid="counted"))
        await counted.send("counted")
        fid = str((await w.runtime.flatten(account="f1", reason="operator"))["signal_id"])
        exit_ = coid_of(w, fid)
        order = w.journal.get_order(exit_)
        assert order is not None and (order["side"], order["quantity"]) == ("sell", exit_qty)

        retry, early = f"{fid}-retry-fast-1", False
        if ordering == ORDERINGS[0]:
            await counted.settle()
            w.connector("fast").reject_next(1)
            await door.let_through(exit_, REJECTED)
            open_door(door)
            go.set()
        else:
            w.connector("fast").reject_next(1)
            await door.let_through(exit_, REJECTED)
            open_door(door)
            go.set()  # due now: it waits for the counted order instead of counting it as if it will fill
            await asyncio.sleep(0.05)
            early = w.journal.get_signal(retry) is not None
            await counted.settle()
        await wait_until(lambda: w.journal.get_signal(retry), what="the retry journaled")
        await w.settle()
        await w.settle()  # a follow-up's own retry, if any

        # Flat at the broker and in the ledger, never short on the way (no exit past flat),
        # the counted order placed once and nothing else entered, and nothing to say: no flatten_failed.
        assert held(w) == {} and books(w) == {}, (held(w), books(w), trades(w))
        assert min(positions(w)) >= 0, (positions(w), trades(w))
        assert w.connector("fast").book.order_count("F-1", counted.coid) == (outcome != "rejected")
        assert {str(o["signal_id"]) for o in w.journal.orders() if o["intent"] == "entry"} <= {"open", "counted"}
        assert failures(w) == []
        assert not early, "the retry computed with the counted order in flight"
