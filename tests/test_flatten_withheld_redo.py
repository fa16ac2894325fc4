"""A flatten withheld where the account's ledger and its broker disagreed (``on_mismatch: halt``) is owed: the first
reconciliation pass that finds those contracts agreeing carries it out, once, the same trading day
(``FlattenMixin._redo_withheld``).

Real runtime and paper brokers (``tests.harness.runtime``), set up as ``tests/test_flatten_unreconciled.py``: ``f2``
(broker ``fast``, account ``F-2``, strategy ``mirror``) halts on a mismatch. The broker's position is moved "by
hand" with no fill to show for it, so that only a reconciliation pass sees it (the disagreement), and moved back to
make the two agree again. Every check reads the broker's own book.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from brokers.base import Side
from service.flatten import FLATTEN_FAILED, FLATTEN_REDONE
from tests.harness.runtime import NOON, Clock, World, signal, wait_until, world

CONTRACT = "MESH6"
LATER = "MESM6"


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    async with world(tmp_path, clock=Clock(NOON)) as started:
        yield started


def at_broker(w: World, account: str, contract: str = CONTRACT) -> int:
    return sum(int(p["quantity"]) for p in w.connector("fast").book.positions(account) if p["contract"] == contract)


def move_by_hand(w: World, account: str, quantity: int, contract: str = CONTRACT) -> None:
    """The broker's position moves with no fill to show for it (only a reconciliation pass sees it)."""
    book = w.connector("fast").book
    held = at_broker(w, account, contract)
    with book.db.conn:
        book.db.execute("insert into positions (account, contract, quantity, avg_price) values (?, ?, ?, ?) "
                        "on conflict (account, contract) do update set quantity = excluded.quantity",
                        [account, contract, held + quantity, "5000"])


def events(w: World, kind: str, fid: str) -> list[dict[str, Any]]:
    return [e for e in w.journal.risk_events(200) if e["kind"] == kind and e.get("origin") == fid]


def redos(w: World, fid: str) -> list[dict[str, Any]]:
    """The journaled re-issues of flatten ``fid`` at ``fast``, in order."""
    out: list[dict[str, Any]] = []
    while (row := w.journal.get_signal(f"{fid}-redo-fast-{len(out) + 1}")) is not None:
        out.append(row)
    return out


async def withheld_long(w: World, quantity: int = 1, *, extra: int = 1, sid: str = "m-long") -> str:
    """``f2`` long ``quantity`` of mirror, the broker ``extra`` more; a flatten of ``f2`` withholds its exit."""
    await w.submit(signal("mirror", "buy", quantity, sid=sid))
    await w.settle()
    assert at_broker(w, "F-2") == quantity
    move_by_hand(w, "F-2", extra)
    [row] = [r for r in await w.runtime.reconcile_broker("fast", reason="test") if r["account"] == "f2"]
    assert not row["ok"]
    result = await w.runtime.flatten(account="f2", reason="operator")
    await w.settle()
    assert result["orders"] == [] and at_broker(w, "F-2") == quantity + extra
    assert [e["name"] for e in events(w, FLATTEN_FAILED, result["signal_id"])] == ["f2"]
    return str(result["signal_id"])


async def test_the_first_pass_finding_agreement_carries_the_withheld_flatten_out(w: World) -> None:
    fid = await withheld_long(w)
    move_by_hand(w, "F-2", -1)  # put right at the broker: long 1, as the ledger says
    await w.runtime.reconcile_broker("fast", reason="test")
    await w.settle()
    assert at_broker(w, "F-2") == 0
    [redo] = redos(w, fid)
    assert redo["signal"]["redo_of"] == fid and redo["signal"]["withheld"] == {"f2": [CONTRACT]}
    assert [(o["account"], o["side"], o["quantity"], o["status"]) for o in redo["orders"]] == \
        [("f2", "sell", 1, "filled")]
    [event] = events(w, FLATTEN_REDONE, fid)
    assert event["redo"] == redo["id"] and event["contracts"] == [CONTRACT]
    assert "carried out now" in event["reason"] and "disagreed" in event["reason"]
    assert w.runtime.risk.halted("f2")  # the flatten_failed halt stays: an operator lifts it

    # Exactly once: a position opened after the redo is not the flatten's, however many passes agree.
    w.runtime.clear_halt("f2")
    await w.submit(signal("mirror", "buy", 1, sid="m-again"))
    await w.settle()
    for _ in range(2):
        await w.runtime.reconcile_broker("fast", reason="test")
        await w.settle()
    assert at_broker(w, "F-2") == 1 and len(redos(w, fid)) == 1


async def test_no_redo_while_they_still_disagree_and_a_cleared_halt_does_not_cancel_it(w: World) -> None:
    fid = await withheld_long(w)
    [event] = events(w, FLATTEN_FAILED, fid)
    assert "clearing the halt does not cancel it" in event["reason"]
    for moved in (0, 1):  # still long 2, then long 3 at the broker: the ledger says long 1
        move_by_hand(w, "F-2", moved)
        await w.runtime.reconcile_broker("fast", reason="test")
        await w.settle()
        assert redos(w, fid) == [] and at_broker(w, "F-2") == 2 + moved
    w.runtime.clear_halt("f2")  # the operator lifts the halt: the flatten is still owed
    move_by_hand(w, "F-2", -2)
    await w.runtime.reconcile_broker("fast", reason="test")
    await w.settle()
    assert at_broker(w, "F-2") == 0 and len(redos(w, fid)) == 1


async def test_a_pass_agreeing_on_some_contracts_redoes_those_and_keeps_owing_the_rest(w: World) -> None:
    await w.submit(signal("mirror", "buy", 1, sid="m-h"))
    await w.submit(signal("mirror", "buy", 1, sid="m-m", ticker=LATER))
    await w.settle()
    assert at_broker(w, "F-2", CONTRACT) == 1 and at_broker(w, "F-2", LATER) == 1
    move_by_hand(w, "F-2", 1, CONTRACT)
    move_by_hand(w, "F-2", 1, LATER)
    await w.runtime.reconcile_broker("fast", reason="test")
    result = await w.runtime.flatten(account="f2", reason="operator")
    fid = result["signal_id"]
    await w.settle()
    assert result["orders"] == []

    move_by_hand(w, "F-2", -1, CONTRACT)  # only MESH6 agrees again
    await w.runtime.reconcile_broker("fast", reason="test")
    await w.settle()
    assert at_broker(w, "F-2", CONTRACT) == 0 and at_broker(w, "F-2", LATER) == 2
    [first] = redos(w, fid)
    assert first["signal"]["withheld"] == {"f2": [CONTRACT]}
    assert "still withheld where they disagree: MESM6" in events(w, FLATTEN_REDONE, fid)[0]["reason"]

    move_by_hand(w, "F-2", -1, LATER)
    await w.runtime.reconcile_broker("fast", reason="test")
    await w.settle()
    assert at_broker(w, "F-2", CONTRACT) == 0 and at_broker(w, "F-2", LATER) == 0
    assert [r["signal"]["withheld"] for r in redos(w, fid)] == [{"f2": [CONTRACT]}, {"f2": [LATER]}]


async def test_it_is_owed_across_a_restart_and_redone_once_across_two(tmp_path: Path) -> None:
    clock = Clock(NOON)
    async with world(tmp_path, clock=clock) as w:
        fid = await withheld_long(w)
    async with world(tmp_path, clock=clock) as w:  # the start-up pass still finds them disagreeing
        await w.settle()
        assert redos(w, fid) == [] and at_broker(w, "F-2") == 2
        move_by_hand(w, "F-2", -1)
        await w.runtime.reconcile_broker("fast", reason="test")
        await w.settle()
        assert at_broker(w, "F-2") == 0 and len(redos(w, fid)) == 1
    async with world(tmp_path, clock=clock) as w:  # a second restart: the redo is journaled, nothing is owed
        await w.runtime.reconcile_broker("fast", reason="test")
        await w.settle()
        assert len(redos(w, fid)) == 1 and len(events(w, FLATTEN_REDONE, fid)) == 1
        assert w.runtime._withheld_debts() == {}


async def test_a_newer_flatten_of_the_scope_replaces_the_older_debt(w: World) -> None:
    """Withheld twice while they disagree: the agreement carries out the newer one only (both would sell 1)."""
    older = await withheld_long(w)
    newer = (await w.runtime.flatten(account="f2", reason="operator again"))["signal_id"]
    await w.settle()
    move_by_hand(w, "F-2", -1)
    await w.runtime.reconcile_broker("fast", reason="test")
    await w.settle()
    assert at_broker(w, "F-2") == 0
    assert redos(w, older) == [] and len(redos(w, newer)) == 1


async def test_no_redo_after_a_newer_flatten_closed_it(w: World) -> None:
    """The pass finds agreement while a redo or retry holds the lock; before the redo runs, the operator flattens
    again and that flatten closes the line: the withheld one is not carried out on top of it (it would sell short)."""
    fid = await withheld_long(w)
    move_by_hand(w, "F-2", -1)
    async with w.runtime._redo_guard:
        await w.runtime.reconcile_broker("fast", reason="test")  # agrees: the redo waits for the lock
        closed = await w.runtime.flatten(account="f2", reason="operator again")
        assert [(o["side"], o["quantity"]) for o in closed["orders"]] == [("sell", 1)]
    await w.settle()
    await w.runtime.reconcile_broker("fast", reason="test")
    await w.settle()
    assert at_broker(w, "F-2") == 0 and redos(w, fid) == []


async def test_a_redo_never_exits_more_than_the_broker_holds(w: World) -> None:
    """Withheld: sell 2. The trader then sells 1 at the broker (a fill: the ledger books it) and the broker's extra
    contract goes away: the two agree on long 1. The redo sells 1, not the 2 it withheld."""
    fid = await withheld_long(w, 2)
    fill = w.connector("fast").manual_trade("F-2", CONTRACT, Side.SELL, 1, "manual-1")
    await wait_until(lambda: f"fast:{fill.fill_id}" in w.runtime.ledger.seen_fills, what="the trade by hand booked")
    move_by_hand(w, "F-2", -1)
    assert at_broker(w, "F-2") == 1
    await w.runtime.reconcile_broker("fast", reason="test")
    await w.settle()
    assert at_broker(w, "F-2") == 0
    [redo] = redos(w, fid)
    assert [(o["side"], o["quantity"]) for o in redo["orders"]] == [("sell", 1)]
