"""An exit overtaken by a trade made by hand: the same position closed twice is made good toward flat
(``service.overtaken``).

Real runtime and paper brokers; fills come 150 ms after the broker accepts an order, so the trader's hand is
quicker than our exit. ``trend`` trades at ``m1`` alone (broker ``fast``, account ``M-1``). Every check reads the
broker's own book.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from brokers.base import Side
from service.dispatch import FILLED
from service.ledger import EXTERNAL_STRATEGY
from tests.harness.runtime import World, signal, wait_until
from tests.test_strategy_positions import at_broker, books, open_world, target


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(tmp_path, fill_ms=150) as started:
        yield started


def follow_ups(w: World, sid: str) -> list[tuple[str, int, str, Any]]:
    """(side, quantity, status, covers) of each order of ``sid``'s follow-ups."""
    out = []
    for n in range(1, 5):
        row = w.journal.get_signal(f"{sid}-follow-{n}")
        if row is not None:
            out += [(o["side"], o["quantity"], o["status"], row["signal"].get("covers")) for o in row["orders"]]
    return out


async def long_2(w: World) -> None:
    await w.submit(target("trend", "t-long", "long", 2))
    await w.settle()
    assert at_broker(w) == {"MESH6": 2} and books(w) == {"trend": {"MESH6": 2}}


async def by_hand(w: World, side: Side, quantity: int, n: int = 1) -> None:
    fill = w.connector("fast").manual_trade("M-1", "MESH6", side, quantity, f"manual-{n}")
    await wait_until(lambda: f"fast:{fill.fill_id}" in w.runtime.ledger.seen_fills, what="the trade by hand booked")


async def test_a_flatten_exit_overtaken_by_a_close_by_hand_is_bought_back(w: World) -> None:
    """The flatten sells 2; before its fill the trader sells 2 by hand. The broker fills both: short 2, which a
    follow-up buys back. Without it the account ends short 2 after a flatten (fuzz crash seeds 108, 144)."""
    await long_2(w)
    result = await w.runtime.flatten(account="m1", strategy="trend", reason="operator")
    await by_hand(w, Side.SELL, 2)
    assert books(w) == {}  # the trade by hand closed trend's long; our exit is still on its way
    await w.settle()
    exit_id = result["orders"][0]["client_order_id"]
    assert follow_ups(w, result["signal_id"]) == [("buy", 2, FILLED, f"overtaken:{exit_id}")]
    assert at_broker(w) == {} and books(w) == {}
    assert w.runtime._hand_basis == {}


async def test_a_signal_exit_overtaken_in_part_makes_good_only_what_was_closed_twice(w: World) -> None:
    """"exit" sells 2; before its fill the trader sells 1 by hand: one contract closed twice, bought back once."""
    await long_2(w)
    await w.submit(signal("trend", "exit", sid="t-exit"))
    await by_hand(w, Side.SELL, 1)
    await w.settle()
    assert [(side, qty, status) for side, qty, status, _ in follow_ups(w, "t-exit")] == [("buy", 1, FILLED)]
    assert at_broker(w) == {} and books(w) == {}


async def test_a_new_entry_after_the_overtaken_exit_keeps_what_it_opened(w: World) -> None:
    """The exit is overtaken (the line ends short 2 before the follow-up), and a "short 1" decided meanwhile sees
    the line flat and sells 1: only the overshoot is bought back, trend ends short 1 as it asked."""
    await long_2(w)
    await w.submit(signal("trend", "exit", sid="t-exit"))
    await by_hand(w, Side.SELL, 2)
    await w.submit(target("trend", "t-short", "short", 1))
    await w.settle()
    assert [(side, qty) for side, qty, _, _ in follow_ups(w, "t-exit")] == [("buy", 2)]
    assert at_broker(w) == {"MESH6": -1} and books(w) == {"trend": {"MESH6": -1}}


async def test_a_trade_by_hand_after_the_exit_filled_is_the_traders_own(w: World) -> None:
    """Not overtaken: the exit filled first, and the trader then sells 1 by hand. That short is the trader's (booked
    to no strategy), and no follow-up touches it."""
    await long_2(w)
    await w.submit(signal("trend", "exit", sid="t-exit"))
    await w.settle()
    await by_hand(w, Side.SELL, 1)
    await w.settle()
    assert follow_ups(w, "t-exit") == []
    assert at_broker(w) == {"MESH6": -1} and books(w) == {EXTERNAL_STRATEGY: {"MESH6": -1}}


async def test_a_close_by_hand_of_an_exit_that_was_rejected_is_not_made_good(w: World) -> None:
    """The broker rejects our exit and the trader closes by hand: closed once, nothing to make good."""
    await long_2(w)
    w.connector("fast").reject_next(1)
    await w.submit(signal("trend", "exit", sid="t-exit"))
    await by_hand(w, Side.SELL, 2)
    await w.settle()
    assert w.statuses("t-exit") == {"m1": "rejected"}
    assert follow_ups(w, "t-exit") == [] and at_broker(w) == {} and books(w) == {}
