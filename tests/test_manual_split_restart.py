"""A position change reconciliation adopts stays where it was booked: live, and after a restart.

Reconciliation adopts what the broker shows moved by hand (no fill) as the difference between the broker and the
ledger at that moment, netted against what the strategies held then (``Ledger._book_manual``). The journal keeps
it among the fills (``Journal.record_adoption``), and both a restart's replay and the live rebuild of a fill
reported out of the broker's order (``Arrivals.late``) order the fills by time. The adoption was stamped with the
time its pass began, which can be earlier than a fill the ledger booked before it: one the pass itself read
(``fills_since`` at a come-up, crash fuzz seed 313), or one a broker stamped ahead of our clock. The adoption then
counted as late, the live ledger was rebuilt with it before that fill, and a strategy's share of the position went
to nobody's line (or nobody's to the strategy's): the strategy's next exit then traded a position it did not hold.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from service.ledger import ADOPTED, EXTERNAL_STRATEGY, Arrivals, replay
from tests.harness.runtime import NOON, Clock, World, signal, world
from tests.test_reconcile import broker_position

MES = Decimal(5)
AHEAD = timedelta(seconds=5)


def lines(w: World, account: str = "f1") -> dict[str, int]:
    return {s: q for (a, s, _c), q in w.runtime.ledger.strategy_lines().items() if a == account}


async def test_an_adoption_after_a_fill_stamped_ahead_of_our_clock_nets_what_that_fill_opened(tmp_path: Path) -> None:
    """mirror buys 1 at f1, which the broker stamps 5 s ahead of our clock; then the trader sells 2 by hand at the
    broker with no fill (-1 there). The pass adopts -2 against the ledger as it stands (mirror +1): mirror's long is
    closed and nobody is short 1. Before, the adoption was stamped with the pass's start, earlier than mirror's
    fill: it counted as late, the rebuild booked it first (nobody short 2) and mirror's fill after it (mirror long
    1 again), so mirror's exit sold 1 more and the account ended short 2. A restart books it the same way."""
    clock = Clock(NOON)
    async with world(tmp_path, clock=clock, connector_options={"clock": lambda: clock() + AHEAD}) as w:
        opened = await w.submit(signal("mirror", "buy", 1, sid="m-long"))
        await w.settle()
        contract = opened.orders[0].contract
        assert lines(w) == {"mirror": 1}
        broker_position(w, "fast", "F-1", contract, -1)  # sold 2 by hand: the broker's position only
        await w.runtime.reconcile_broker("fast", reason="test")
        adopted = [f for f in w.journal.fills(account="f1") if f["kind"] == ADOPTED]
        assert [(f["side"], f["quantity"]) for f in adopted] == [("sell", 2)]
        assert lines(w) == {EXTERNAL_STRATEGY: -1}  # mirror's long closed by hand, nobody short the rest
        assert w.journal.fills(account="f1")[-1]["kind"] == ADOPTED  # placed after the fill it netted
        exit_ = await w.submit(signal("mirror", "exit", sid="m-exit"))
        assert [o for o in exit_.orders if o.account == "f1"] == []  # mirror holds nothing there
        await w.settle()
        assert w.runtime.ledger.account_positions("f1") == {contract: -1}
    async with world(tmp_path, clock=clock, connector_options={"clock": lambda: clock() + AHEAD}) as w:
        assert lines(w) == {EXTERNAL_STRATEGY: -1}


async def test_an_adoption_after_a_fill_booked_during_its_pass_nets_that_fill(tmp_path: Path) -> None:
    """Seed 313's path: while the pass reads the broker's fills, an order of ours fills (stamped after the pass
    began) and is booked; then the trader sells at the broker by hand, with no fill, what mirror holds. The pass
    adopts -2 against the ledger with that fill in it: mirror is flat. Before, the adoption (stamped with the
    pass's start) was rebuilt before that fill: nobody short 1 and mirror long 1, which mirror's exit then sold
    at the account that held nothing."""
    clock = Clock(NOON)
    async with world(tmp_path, clock=clock) as w:
        opened = await w.submit(signal("mirror", "buy", 1, sid="m-long"))
        await w.settle()
        contract = opened.orders[0].contract
        connector = w.connector("fast")
        read = connector.fills_since
        during: list[str] = []

        async def fills_since(account: str, since: datetime) -> list[Any]:
            found = await read(account, since)
            if account == "F-1" and not during:
                clock.advance(timedelta(seconds=1))
                during.append("m-more")
                await w.submit(signal("mirror", "buy", 1, sid="m-more"))
                await w.settle()
                broker_position(w, "fast", "F-1", contract, 0)  # then closed by hand: the position only
            return found

        connector.fills_since = fills_since
        try:
            await w.runtime.reconcile_broker("fast", reason="test")
        finally:
            connector.fills_since = read
        assert during and lines(w) == {}  # mirror's 2 closed by hand, once
        assert [(f["kind"], f["side"], f["quantity"]) for f in w.journal.fills(account="f1")] == \
            [(None, "buy", 1), (None, "buy", 1), (ADOPTED, "sell", 2)]  # in the order booked
        exit_ = await w.submit(signal("mirror", "exit", sid="m-exit"))
        assert [o for o in exit_.orders if o.account == "f1"] == []
    async with world(tmp_path, clock=clock) as w:
        assert lines(w) == {}


def _row(fid: str, strategy: str, qty: int, at: str, recorded: str, kind: str | None = None) -> dict[str, object]:
    return {"broker": "fast", "fill_id": fid, "account": "f1", "strategy": strategy, "contract": "MESH6",
            "side": "buy" if qty > 0 else "sell", "quantity": abs(qty), "price": "5000", "commission": "0",
            "client_order_id": None if strategy == EXTERNAL_STRATEGY else f"mb-{fid}", "at": at,
            "recorded_at": recorded, "kind": kind}


def test_a_replay_books_an_adoption_after_every_fill_journaled_before_it_whatever_its_time() -> None:
    """A journal written before the fix holds adoptions stamped earlier than fills booked before them; the journal
    reads fills in time order. ``replay`` books each adoption after every fill of its account and contract
    journaled before it (where the live ledger booked it), and leaves the fills in time order among themselves
    (a fill the broker reported late across a trade by hand is still booked in the broker's order)."""
    rows = [_row("F1", "mirror", 1, "2026-03-11T14:30:00.100000Z", "2026-03-11T14:30:00.101000Z"),
            _row("A1", EXTERNAL_STRATEGY, -2, "2026-03-11T14:30:00.200000Z", "2026-03-11T14:30:00.320000Z", ADOPTED),
            _row("F2", "mirror", 1, "2026-03-11T14:30:00.300000Z", "2026-03-11T14:30:00.301000Z"),
            _row("F3", "mirror", -1, "2026-03-11T14:30:00.400000Z", "2026-03-11T14:30:00.401000Z")]
    ledger = replay(rows, lambda contract: MES)
    assert ledger.strategy_lines() == {("f1", "mirror", "MESH6"): -1}  # F1, F2, then A1 closes both, then F3
    undisturbed = [rows[0], {**rows[1], "recorded_at": "2026-03-11T14:30:00.201000Z"}, rows[2], rows[3]]
    assert replay(undisturbed, lambda contract: MES).strategy_lines() == {("f1", EXTERNAL_STRATEGY, "MESH6"): -1}


def test_an_adoption_is_placed_after_everything_booked_at_its_account_and_contract() -> None:
    arrivals = Arrivals()
    found = datetime(2026, 3, 11, 14, 30, tzinfo=timezone.utc)
    assert arrivals.placed("f1", "MESH6", found) == found  # nothing booked there: when the pass found it
    arrivals.note("f1", "MESH6", found + timedelta(seconds=2), manual=False)
    arrivals.note("f2", "MESH6", found + timedelta(seconds=9), manual=False)
    placed = arrivals.placed("f1", "MESH6", found)
    assert placed == found + timedelta(seconds=2, microseconds=1)
    assert not arrivals.late("f1", "MESH6", placed, manual=True)
    assert arrivals.placed("f1", "MESH6", found + timedelta(seconds=3)) == found + timedelta(seconds=3)
