"""A flatten where the account's ledger and its broker disagree (``on_mismatch: halt``): no exit is computed from
either side there; the account is named in ``flatten_failed`` and halted (``FlattenMixin._unreconciled_lines``).

Real runtime and paper brokers (``tests.harness.runtime``): ``f2`` (broker ``fast``, account ``F-2``, strategy
``mirror``) halts on a mismatch; ``f1`` (``F-1``) adopts. Every check reads the broker's own book.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from brokers.base import Side
from service.flatten import FLATTEN_FAILED
from service.ledger import EXTERNAL_STRATEGY
from tests.harness.runtime import NOON, Clock, World, signal, wait_until, world

CONTRACT = "MESH6"


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    async with world(tmp_path, clock=Clock(NOON)) as started:
        yield started


def at_broker(w: World, account: str) -> int:
    return sum(int(p["quantity"]) for p in w.connector("fast").book.positions(account) if p["contract"] == CONTRACT)


def move_by_hand(w: World, account: str, quantity: int) -> None:
    """The broker's position moves with no fill to show for it (only a reconciliation pass sees it)."""
    book = w.connector("fast").book
    held = at_broker(w, account)
    with book.db.conn:
        book.db.execute("insert into positions (account, contract, quantity, avg_price) values (?, ?, ?, ?) "
                        "on conflict (account, contract) do update set quantity = excluded.quantity",
                        [account, CONTRACT, held + quantity, "5000"])


async def sell_by_hand(w: World, account: str, quantity: int) -> None:
    fill = w.connector("fast").manual_trade(account, CONTRACT, Side.SELL, quantity, "manual-1")
    await wait_until(lambda: f"fast:{fill.fill_id}" in w.runtime.ledger.seen_fills, what="the trade by hand booked")


def refusals(w: World, fid: str) -> list[dict]:
    return [e for e in w.journal.risk_events(100) if e["kind"] == FLATTEN_FAILED and e.get("origin") == fid]


async def test_an_account_flatten_sends_no_exit_the_broker_would_take_the_wrong_way(w: World) -> None:
    """Fuzz seed 646: the broker shows long 2 the ledger never saw (halted, kept); the trader then sells 1 by hand,
    which the ledger books as short 1 by hand. The broker is long 1. A flatten from the ledger would *buy* 1, taking
    the account to long 2. Now nothing is sent there, and ``flatten_failed`` says why, with both sides' numbers."""
    move_by_hand(w, "F-2", 2)
    [row] = [r for r in await w.runtime.reconcile_broker("fast", reason="test") if r["account"] == "f2"]
    assert not row["ok"] and w.runtime.risk.halted("f2")
    await sell_by_hand(w, "F-2", 1)
    assert w.runtime.ledger.strategy_lines().get(("f2", EXTERNAL_STRATEGY, CONTRACT)) == -1
    assert at_broker(w, "F-2") == 1

    result = await w.runtime.flatten(account="f2", reason="operator")
    await w.settle()
    assert result["orders"] == []
    assert at_broker(w, "F-2") == 1  # not 2
    [event] = refusals(w, result["signal_id"])
    assert event["name"] == "f2" and event["broker"] == "fast"
    assert f"{CONTRACT}: ledger -1, broker +1 (the last reconciliation's +2 moved by the fills booked since)" \
        in event["reason"]
    assert event["positions"][0]["exits_withheld"] == [{"strategy": EXTERNAL_STRATEGY, "side": "buy", "quantity": 1}]
    assert w.runtime.risk.halted("f2")


async def test_only_the_disagreeing_account_is_withheld_and_a_matching_pass_lifts_it(w: World) -> None:
    """A flatten of everything still closes the accounts whose ledger agrees with their broker; once a pass finds
    the ledger and the broker agreeing again, the account is flattened like any other."""
    await w.submit(signal("mirror", "buy", 1, sid="m-long"))
    await w.settle()
    assert at_broker(w, "F-1") == 1 and at_broker(w, "F-2") == 1
    move_by_hand(w, "F-2", 1)  # the broker long 2, the ledger long 1
    await w.runtime.reconcile_broker("fast", reason="test")

    result = await w.runtime.flatten(reason="operator")
    await w.settle()
    assert at_broker(w, "F-1") == 0 and at_broker(w, "F-2") == 2
    assert {o["account"] for o in result["orders"]} >= {"f1"} and "f2" not in {o["account"] for o in result["orders"]}
    assert [e["name"] for e in refusals(w, result["signal_id"])] == ["f2"]

    move_by_hand(w, "F-2", -1)  # put right at the broker: it agrees with the ledger again
    await w.runtime.reconcile_broker("fast", reason="test")
    again = await w.runtime.flatten(account="f2", strategy="mirror", reason="operator")
    await w.settle()
    assert at_broker(w, "F-2") == 0 and refusals(w, again["signal_id"]) == []


async def test_a_strategy_flatten_is_withheld_only_where_the_strategy_holds_something(w: World) -> None:
    """The unknown position belongs to no strategy: a flatten of ``mirror``, which holds nothing there, has nothing
    to withhold and says nothing."""
    move_by_hand(w, "F-2", 2)
    await w.runtime.reconcile_broker("fast", reason="test")
    result = await w.runtime.flatten(account="f2", strategy="mirror", reason="operator")
    await w.settle()
    assert result["orders"] == [] and refusals(w, result["signal_id"]) == []
    assert at_broker(w, "F-2") == 2
