"""An account following two strategies: each trades its own position there, on the real runtime and paper brokers.

``m1`` (at ``fast``) follows ``mirror`` and ``trend``. The ledger books every fill per (account, strategy, contract);
the engine must decide from the signal's strategy's own position (its book, its orders in flight, its decided
orders), not from the account's net, or one strategy's flat target sells the other's long and a later flatten of
the other sells it a second time (the broker ends short, a position nobody wanted). Every check reads the broker's
own book as well as the ledger.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from brokers.base import Side
from engine.signal import parse_signal
from service.dispatch import FILLED
from service.ledger import EXTERNAL_STRATEGY
from tests.harness.runtime import NOON, Clock, World, account_doc, documents, routing_doc, signal, wait_until, world
from tests.harness.runtime import write_rules
from tests.test_reconcile import broker_position

ACCOUNTS = documents(
    account_doc("m1", "fast", "M-1", "mirror, trend"),
    account_doc("f1", "fast", "F-1", "mirror"),
)


@contextlib.asynccontextmanager
async def open_world(tmp_path: Path, **rules: Any) -> AsyncIterator[World]:
    directory = write_rules(tmp_path / "rules", **rules)
    (directory / "accounts.yaml").write_text(ACCOUNTS)
    (directory / "routing.yaml").write_text(routing_doc("mirror", "trend"))
    async with world(tmp_path, rules_dir=directory, clock=Clock(NOON)) as started:
        yield started


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(tmp_path) as started:
        yield started


def at_broker(w: World, account: str = "M-1") -> dict[str, int]:
    return {p["contract"]: int(p["quantity"]) for p in w.connector("fast").book.positions(account)
            if int(p["quantity"])}


def books(w: World, account: str = "m1") -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (acct, strategy, contract), book in w.runtime.ledger.items():
        if acct == account and book.quantity:
            out.setdefault(strategy, {})[contract] = book.quantity
    return out


def target(strategy: str, sid: str, position: str, size: int) -> dict[str, Any]:
    action = "sell" if position in ("flat", "short") else "buy"
    return signal(strategy, action, max(size, 1), sid=sid, position=position, position_size=size)


async def test_a_flat_target_or_exit_of_the_other_strategy_sends_nothing(w: World) -> None:
    opened = await w.submit(signal("mirror", "buy", 1, sid="m-long"))
    await w.settle()
    contract = opened.orders[0].contract
    assert books(w) == {"mirror": {contract: 1}}

    flat = await w.submit(target("trend", "t-flat", "flat", 0))
    exit_ = await w.submit(signal("trend", "exit", sid="t-exit"))
    await w.settle()
    assert [o for o in flat.orders if o.account == "m1"] == [] and exit_.orders == ()
    assert [s.by for s in flat.skipped if s.account == "m1"] == ["target"]
    assert [s.by for s in exit_.skipped if s.account == "m1"] == ["exit"]
    assert books(w) == {"mirror": {contract: 1}} and at_broker(w) == {contract: 1}

    # A flatten of mirror then closes mirror's 1: the broker ends flat, not short.
    result = await w.runtime.flatten(strategy="mirror", reason="operator")
    await w.settle()
    assert sorted((o["account"], o["side"], o["quantity"]) for o in result["orders"]) == [("f1", "sell", 1),
                                                                                          ("m1", "sell", 1)]
    assert books(w) == {} and at_broker(w) == {}


async def test_a_target_counts_from_its_own_strategy_and_a_scoped_flatten_closes_only_it(w: World) -> None:
    opened = await w.submit(signal("mirror", "buy", 2, sid="m-long"))
    contract = opened.orders[0].contract
    short = await w.submit(target("trend", "t-short", "short", 1))  # trend's own 0 -> -1, the account 2 -> 1
    await w.settle()
    assert [(o.account, o.side, o.quantity, o.intent) for o in short.orders] == [("m1", "sell", 1, "entry")]
    assert books(w) == {"mirror": {contract: 2}, "trend": {contract: -1}} and at_broker(w) == {contract: 1}

    # trend's exit buys back trend's short only; mirror's long stays where mirror's book says.
    result = await w.runtime.flatten(strategy="trend", reason="operator")
    await w.settle()
    assert [(o["account"], o["side"], o["quantity"]) for o in result["orders"]] == [("m1", "buy", 1)]
    assert books(w) == {"mirror": {contract: 2}} and at_broker(w) == {contract: 2}

    # A reversal of trend: its own position (flat) opens short 2 next to mirror's long 2.
    again = await w.submit(target("trend", "t-short-2", "short", 2))
    await w.settle()
    assert [(o.side, o.quantity, o.intent) for o in again.orders] == [("sell", 2, "entry")]
    assert at_broker(w) == {} and books(w) == {"mirror": {contract: 2}, "trend": {contract: -2}}
    reverse = await w.submit(signal("trend", "buy", 3, sid="t-rev"))
    await w.settle()
    assert [(o.side, o.quantity, o.intent) for o in reverse.orders] == [("buy", 2, "exit"), ("buy", 1, "entry")]
    assert books(w) == {"mirror": {contract: 2}, "trend": {contract: 1}} and at_broker(w) == {contract: 3}


async def test_the_engine_sees_each_strategys_orders_from_their_decision_on(tmp_path: Path) -> None:
    async with open_world(tmp_path, fast_ms=30, fill_ms=30) as w:
        now = w.clock()
        body = signal("trend", "sell", 1, sid="t-short")
        decision = w.watcher.engine.decide(parse_signal(body), w.runtime.engine_state(now), now)
        contract = decision.orders[0].contract
        w.runtime.hold("t-short", decision)  # decided, not journaled yet
        m1 = w.runtime.engine_state(now).accounts["m1"]
        assert m1.strategy_positions == {"trend": {contract: -1}} and dict(m1.positions) == {contract: -1}
        w.runtime.release("t-short")
        assert w.runtime.engine_state(now).accounts["m1"].strategy_positions == {}

        await w.submit(signal("mirror", "buy", 2, sid="m-long"))  # in flight (30 ms to the ack, 30 more to fill)
        await w.submit(body)
        m1 = w.runtime.engine_state(w.clock()).accounts["m1"]
        assert w.statuses("m-long")["m1"] != FILLED
        assert m1.strategy_positions == {"mirror": {contract: 2}, "trend": {contract: -1}}
        assert dict(m1.positions) == {contract: 1}
        await w.settle()
        m1 = w.runtime.engine_state(w.clock()).accounts["m1"]
        assert m1.strategy_positions == {"mirror": {contract: 2}, "trend": {contract: -1}}  # now from the ledger
        assert dict(m1.positions) == {contract: 1} == at_broker(w)


async def test_a_position_booked_to_no_strategy_is_in_the_net_only(w: World) -> None:
    opened = await w.submit(signal("trend", "buy", 1, sid="t-long"))
    await w.settle()
    contract = opened.orders[0].contract
    db = w.connector("fast").book.db  # a manual trade at the broker: 2 more nobody ordered through us
    db["positions"].upsert({"account": "M-1", "contract": contract, "quantity": 3, "avg_price": "5000"},
                           pk=("account", "contract"))
    await w.runtime.reconcile_broker("fast", reason="test")  # adopted into the external bucket
    assert books(w) == {"trend": {contract: 1}, EXTERNAL_STRATEGY: {contract: 2}}
    m1 = w.runtime.engine_state(w.clock()).accounts["m1"]
    assert dict(m1.positions) == {contract: 3} and m1.strategy_positions == {"trend": {contract: 1}}

    nothing = await w.submit(signal("mirror", "exit", sid="m-exit"))
    assert [o for o in nothing.orders if o.account == "m1"] == []
    closed = await w.submit(target("trend", "t-flat", "flat", 0))
    await w.settle()
    assert [(o.account, o.side, o.quantity) for o in closed.orders] == [("m1", "sell", 1)]
    assert books(w) == {EXTERNAL_STRATEGY: {contract: 2}} and at_broker(w) == {contract: 2}


async def test_the_per_strategy_view_is_kept_as_orders_come_and_go(w: World) -> None:
    """The tracker's and the holds' per-strategy views end empty once everything settled (no stale line)."""
    await w.submit(signal("mirror", "buy", 1, sid="a"))
    await w.submit(signal("trend", "sell", 2, sid="b"))
    await w.submit(signal("trend", "exit", sid="c"))
    await w.settle()
    await wait_until(lambda: not w.runtime.tracker.strategy_exposure("m1"), what="exposure drained")
    assert w.runtime._held_by_strategy == {} and w.runtime.tracker._strategy_exposure == {}
    contract = w.decisions[0].orders[0].contract
    assert w.runtime.engine_state(w.clock()).accounts["m1"].strategy_positions == {"mirror": {contract: 1}}


async def test_a_retried_flatten_exit_closes_its_strategys_share_of_a_broker_position_netted_with_another(
        w: World) -> None:
    """``mirror`` long 1 and ``trend`` short 1 in one account: the broker holds 0. A flatten of ``mirror`` whose exit
    the broker rejects is retried against the broker's position, and ``mirror``'s share of it is 0 less ``trend``'s
    -1: the retry sells 1 (the broker ends at ``trend``'s -1), where capping at the account's 0 sent nothing and
    left ``mirror`` open for good."""
    await w.submit(target("mirror", "m-long", "long", 1))
    await w.submit(target("trend", "t-short", "short", 1))
    await w.settle()
    assert books(w) == {"mirror": {"MESH6": 1}, "trend": {"MESH6": -1}} and at_broker(w) == {}
    w.runtime.flatten_retry_delays_s = (0.05, 0.05)
    w.connector("fast").reject_next(1)
    result = await w.runtime.flatten(account="m1", strategy="mirror", reason="operator")
    retry = f"{result['signal_id']}-retry-fast-1"
    await wait_until(lambda: w.journal.get_signal(retry) is not None, 5, what="the retry")
    await w.settle()
    assert [(o["side"], o["quantity"], o["status"]) for o in w.journal.get_signal(retry)["orders"]] == \
        [("sell", 1, FILLED)]
    assert books(w) == {"trend": {"MESH6": -1}} and at_broker(w) == {"MESH6": -1}


async def test_a_manual_close_at_the_broker_is_a_close_of_the_strategys_position(w: World) -> None:
    """The trader closes ``trend``'s long by hand at the broker; reconciliation adopts it into the bucket of no
    strategy (-1 there). ``trend``'s exit then sends nothing: its position is gone, and a sell would open a short."""
    opened = await w.submit(signal("trend", "buy", 1, sid="t-long"))
    await w.settle()
    contract = opened.orders[0].contract
    db = w.connector("fast").book.db  # closed by hand: the broker holds nothing
    db["positions"].upsert({"account": "M-1", "contract": contract, "quantity": 0, "avg_price": "5000"},
                           pk=("account", "contract"))
    await w.runtime.reconcile_broker("fast", reason="test")
    assert books(w) == {}  # booked as a close of trend's long, once
    assert [(f["kind"], f["side"], f["quantity"]) for f in w.journal.fills() if f["kind"]] == [("adopted", "sell", 1)]
    m1 = w.runtime.engine_state(w.clock()).accounts["m1"]
    assert dict(m1.positions) == {} and dict(m1.strategy_positions or {}).get("trend", {}).get(contract, 0) == 0
    gone = await w.submit(signal("trend", "exit", sid="t-exit"))
    assert [o for o in gone.orders if o.account == "m1"] == []
    await w.settle()
    assert at_broker(w) == {}


# -- a manual close at the broker and a strategy's flatten ---------------------------------------------------------

async def test_a_strategy_flatten_after_a_manual_close_does_not_sell_the_closed_position_again(tmp_path: Path) -> None:
    """A trader closes by hand what mirror holds at f1 (reconciliation adopts it into the bucket of no strategy);
    the 15:55-style flatten of mirror alone then has nothing to close at f1. It sold mirror's ledger book before,
    and f1 ended short 1 (the engine's view netted the manual close, the flatten read the raw books)."""
    async with world(tmp_path) as w:
        decision = await w.submit(signal("mirror", "buy", 2, sid="e1"))
        await w.settle()
        contract = decision.orders[0].contract
        broker_position(w, "fast", "F-1", contract, 1)  # one of the two closed by hand at the broker
        await w.runtime.reconcile_broker("fast", reason="test")
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        await w.settle()
        f1 = [(o["side"], o["quantity"]) for o in result["orders"] if o["account"] == "f1"]
        assert f1 == [("sell", 1)]
        assert w.runtime.ledger.account_positions("f1") == {}
        assert {p.contract: p.quantity for p in await w.connector("fast").positions("F-1") if p.quantity} == {}
        again = await w.runtime.flatten(strategy="mirror", reason="operator", flatten_id="again")
        assert [o for o in again["orders"] if o["account"] == "f1"] == []


async def test_a_retried_flatten_caps_against_what_the_other_strategies_still_hold_after_a_manual_close(
        w: World) -> None:
    """m1: mirror 1 and trend 1; a trader closes 1 by hand (it closes mirror's, first by name). trend's flatten exit
    is rejected; its retry caps the exit at the broker's position less what the other strategies hold. Read from the
    raw books, mirror still held 1, so the cap came to 0 and the retry settled with trend still long at the broker,
    and nothing said so."""
    w.runtime.flatten_retry_delays_s = (0.05, 0.1, 0.2)
    opened = await w.submit(signal("mirror", "buy", 1, sid="m-long"))
    await w.submit(signal("trend", "buy", 1, sid="t-long"))
    await w.settle()
    contract = opened.orders[0].contract
    broker_position(w, "fast", "M-1", contract, 1)  # one closed by hand
    await w.runtime.reconcile_broker("fast", reason="test")
    w.connector("fast").reject_next(1)
    await w.runtime.flatten(account="m1", strategy="trend", reason="operator")
    await wait_until(lambda: not at_broker(w), 5, what="m1 flat at the broker after the retry")
    await w.settle()
    assert not any(e["kind"] == "flatten_failed" for e in w.journal.risk_events(50))


async def test_an_account_wide_flatten_closes_a_position_opened_by_hand_and_a_strategys_opposite_it(
        w: World) -> None:
    """Opened by hand long 2 (nobody's), then trend shorts 2: the broker nets to flat, the books hold both. A flatten
    of the account closes both lines, also when its exits are rejected and retried against the broker's (flat)
    position: they go out matched, so that trend's book is flat too. Left open, its next exit would buy 2 and put
    the trader's long back."""
    fill = w.connector("fast").manual_trade("M-1", "MESH6", Side.BUY, 2, "manual-1")
    await wait_until(lambda: f"fast:{fill.fill_id}" in w.runtime.ledger.seen_fills, what="the manual fill")
    await w.submit(target("trend", "t-short", "short", 2))
    await w.settle()
    assert books(w) == {EXTERNAL_STRATEGY: {"MESH6": 2}, "trend": {"MESH6": -2}} and at_broker(w) == {}
    w.runtime.flatten_retry_delays_s = (0.05, 0.05)
    w.connector("fast").reject_next(2)  # both exits: the retry reconciles and caps them to the broker's flat
    result = await w.runtime.flatten(account="m1", reason="operator")
    assert sorted((o["side"], o["quantity"]) for o in result["orders"]) == [("buy", 2), ("sell", 2)]
    retry = f"{result['signal_id']}-retry-fast-1"
    await wait_until(lambda: w.journal.get_signal(retry) is not None, 5, what="the retry")
    await w.settle()
    assert sorted((o["side"], o["quantity"], o["status"]) for o in w.journal.get_signal(retry)["orders"]) == \
        [("buy", 2, FILLED), ("sell", 2, FILLED)]
    assert books(w) == {} and at_broker(w) == {}
