"""A signal's exit that counted on an order still in flight, and that order does not fill (``service.exits``).

On the real runtime and paper brokers: ``trend`` trades at ``m1`` alone, so the broker's ``reject_next`` picks the
orders of one account in the order the signals decide them. Every check reads the broker's own book.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from engine.signal import parse_signal
from tests.harness.runtime import World, signal, wait_until
from tests.test_strategy_positions import at_broker, books, open_world, target


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(tmp_path) as started:
        yield started


def follow_ups(w: World, sid: str) -> list[tuple[str, int, str]]:
    """(side, quantity, status) of each order of ``sid``'s follow-ups."""
    out = []
    for n in range(1, 5):
        row = w.journal.get_signal(f"{sid}-follow-{n}")
        if row is not None:
            out += [(o["side"], o["quantity"], o["status"]) for o in row["orders"]]
    return out


def quiet(w: World) -> None:
    """Nothing watched, nothing standing in, once everything settled."""
    assert w.runtime._exit_watches == {} and w.runtime._counted_by == {}
    assert not [key for key in w.runtime._holds if key.startswith("standin:")]


async def test_an_exit_that_closed_an_entry_the_broker_rejected_is_bought_back(w: World) -> None:
    """"long 2" whose entry the broker rejects, then "short 1" while it is in flight: the engine counts the entry,
    so "short 1" sells 2 to close it and 1 to open. Without a follow-up the account ends short 3."""
    w.connector("fast").reject_next(1)  # trend's buy 2
    await w.submit(target("trend", "t-long", "long", 2))
    short = await w.submit(target("trend", "t-short", "short", 1))
    assert [(o.side, o.quantity, o.intent) for o in short.orders] == [("sell", 2, "exit"), ("sell", 1, "entry")]
    await w.settle()
    assert w.statuses("t-long") == {"m1": "rejected"}
    assert follow_ups(w, "t-short") == [("buy", 2, "filled")]
    assert at_broker(w) == {"MESH6": -1} and books(w) == {"trend": {"MESH6": -1}}
    quiet(w)
    flat = await w.submit(signal("trend", "exit", sid="t-exit"))  # and its exit closes exactly that
    await w.settle()
    assert [(o.side, o.quantity) for o in flat.orders] == [("buy", 1)] and at_broker(w) == {}


async def test_an_exit_the_broker_rejected_as_well_is_not_made_good(w: World) -> None:
    """The exit closed nothing: the line holds what the entry of "short 1" opened, as the strategy wants."""
    w.connector("fast").reject_next(2)  # trend's buy 2, then its exit sell 2
    await w.submit(target("trend", "t-long", "long", 2))
    await w.submit(target("trend", "t-short", "short", 1))
    await w.settle()
    assert follow_ups(w, "t-short") == []
    assert at_broker(w) == {"MESH6": -1} and books(w) == {"trend": {"MESH6": -1}}
    quiet(w)


async def test_an_exit_after_an_entry_that_filled_is_left_alone(w: World) -> None:
    await w.submit(target("trend", "t-long", "long", 2))
    await w.submit(signal("trend", "exit", sid="t-exit"))
    await w.settle()
    assert follow_ups(w, "t-exit") == [] and at_broker(w) == {} and books(w) == {}
    quiet(w)


async def test_a_plain_exit_of_a_rejected_entry_ends_flat(w: World) -> None:
    """TradingView's "exit" right behind the entry it closes (one bar, two alerts); the entry is rejected."""
    w.connector("fast").reject_next(1)
    await w.submit(signal("trend", "buy", 3, sid="t-buy"))
    closing = await w.submit(signal("trend", "exit", sid="t-exit"))
    assert [(o.side, o.quantity) for o in closing.orders] == [("sell", 3)]
    await w.settle()
    assert follow_ups(w, "t-exit") == [("buy", 3, "filled")] and at_broker(w) == {} and books(w) == {}
    quiet(w)


async def test_while_the_difference_stands_in_a_new_exit_does_not_close_it_again(w: World) -> None:
    """Between the rejection and the follow-up the engine's view stays where the exit meant it (a stand-in is
    held at once): an exit decided in that gap closes only what the strategy really holds."""
    w.connector("fast").reject_next(1)
    await w.submit(target("trend", "t-long", "long", 2))
    await w.submit(target("trend", "t-short", "short", 1))
    await wait_until(lambda: any(k.startswith("standin:") for k in w.runtime._holds), what="the stand-in")
    view = w.runtime.engine_state(w.clock()).accounts["m1"].strategy_positions or {}
    assert view.get("trend") == {"MESH6": -1}
    again = await w.submit(signal("trend", "exit", sid="t-exit"))
    assert [(o.side, o.quantity) for o in again.orders] == [("buy", 1)]
    await w.settle()
    assert at_broker(w) == {} and books(w) == {}
    quiet(w)


async def test_a_flatten_that_supersedes_the_held_exit_takes_its_stand_in_with_it(w: World) -> None:
    """The counted entry is rejected while the exit is still held (its signal's journal commit): the stand-in
    holds the difference; a flatten then supersedes the exit (never sent), and must not count the stand-in either:
    the flatten sells the 1 the strategy holds, not 3."""
    await w.submit(target("trend", "t-long", "long", 1))
    await w.settle()
    w.connector("fast").reject_next(1)
    await w.submit(target("trend", "t-more", "long", 3))  # buy 2, rejected
    now = w.clock()
    held = parse_signal(target("trend", "t-short", "short", 1))
    decision = w.watcher.engine.decide(held, w.runtime.engine_state(now), now)
    assert [(o.side, o.quantity, o.intent) for o in decision.orders] == [("sell", 3, "exit"), ("sell", 1, "entry")]
    w.runtime.hold(held.id, decision)  # not dispatched
    await wait_until(lambda: any(k.startswith("standin:") for k in w.runtime._holds), what="the stand-in")
    result = await w.runtime.flatten(strategy="trend", reason="operator")
    w.runtime.release(held.id)
    await w.settle()
    assert [(o["side"], o["quantity"]) for o in result["orders"]] == [("sell", 1)]
    assert at_broker(w) == {} and books(w) == {}
    quiet(w)


async def test_an_exit_counting_on_another_watched_exit_leaves_its_make_good_to_that_watch(w: World) -> None:
    """"long 2" (rejected), "short 1" (its exit sell 2 counted on the buy: rejected too; its entry sell 1 fills),
    then "long 2" while those are in flight: it buys 1 to close the short and 2 to open. The first exit's watch
    lands the line where it meant, whatever becomes of that exit; the second one counting the first exit as well
    made its rejection good a second time and sold 1 (fuzz crash seed 126, under load)."""
    w.connector("fast").reject_next(2)  # trend's buy 2, then the exit sell 2 of "short 1"
    await w.submit(target("trend", "t-long", "long", 2))
    await w.submit(target("trend", "t-short", "short", 1))
    await w.submit(target("trend", "t-long2", "long", 2))
    await w.settle()
    assert w.statuses("t-long") == {"m1": "rejected"}
    assert at_broker(w) == {"MESH6": 2} and books(w) == {"trend": {"MESH6": 2}}
    quiet(w)
