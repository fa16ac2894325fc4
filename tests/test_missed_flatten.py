"""A flatten whose exit an account missed (its broker down or paused) is carried out when the broker comes back.

Real runtime, real journal, paper brokers. ``slow`` holds the accounts that miss: ``s0`` (``catch_up: false``,
mirror and trend) and ``s1`` (``catch_up: true``, mirror); ``f1`` at ``fast`` always gets its exits. Flattens come
from the schedule, the risk monitor and the operator; on the come-up (or the operator's resume) each missed one of
the current trading day is re-issued once, as a flatten signal of its own (``<id>-redo-<broker>-<n>``), for the
positions still in its scope; catch-up then treats the flatten as voiding the strategy's earlier target. Every check
of a position reads the paper broker's own book.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator
from zoneinfo import ZoneInfo

import pytest

from brokers.base import BrokerUnavailable, Side
from service.dispatch import FILLED, MISSED, REJECTED
from service.flatten import FLATTEN_FAILED
from tests.harness.runtime import (Clock, World, account_doc, documents, routing_doc, wait_until, world,
                                  write_rules)

ET = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")

ACCOUNTS = documents(
    account_doc("f1", "fast", "F-1", "mirror, trend", instruments="ES, MES"),
    account_doc("s0", "slow", "S-0", "mirror, trend", instruments="ES, MES"),
    account_doc("s1", "slow", "S-1", "mirror", instruments="ES, MES", catch_up=True),
)

ROUTING = routing_doc("mirror", "trend")

SLOW = {"s0": "S-0", "s1": "S-1"}


def et(day: int, hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(2026, 3, day, hh, mm, ss, tzinfo=ET).astimezone(UTC)


@pytest.fixture
async def w(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    options = getattr(request, "param", {})
    rules = write_rules(tmp_path / "rules", **options)
    (rules / "accounts.yaml").write_text(ACCOUNTS)
    (rules / "routing.yaml").write_text(ROUTING)
    async with world(tmp_path, rules_dir=rules, clock=Clock(et(11, 15, 0))) as started:
        started.feed.set_price("ES", Decimal("6000"))
        yield started


def es(strategy: str, action: str, quantity: int, sid: str, **extra: Any) -> dict[str, Any]:
    return {"strategy": strategy, "ticker": "ES1!", "action": action, "quantity": quantity, "id": sid, **extra}


def held(w: World, broker: str, account: str) -> dict[str, int]:
    """What the paper broker holds for ``account`` (not what the ledger believes)."""
    return {p["contract"]: int(p["quantity"]) for p in w.connector(broker).book.positions(account)
            if int(p["quantity"])}


def slow_book(w: World) -> dict[str, list[tuple[str, int]]]:
    return {name: [(o["side"], int(o["quantity"])) for o in w.book_orders("slow", acct)] for name, acct in SLOW.items()}


def redos(w: World) -> list[dict[str, Any]]:
    return [s for s in w.journal.recent_signals(200) if "-redo-" in s["id"]]


async def drop(w: World, broker: str) -> None:
    w.connector(broker).disconnect("test drop")
    await wait_until(lambda: w.runtime.pool[broker].down, what=f"{broker} down")


async def come_back(w: World, broker: str) -> None:
    await w.connector(broker).reconnect()
    await wait_until(lambda: w.runtime.pool.available(broker), what=f"{broker} back")
    await w.settle()


async def open_mirror(w: World, quantity: int = 2, **target: Any) -> str:
    entry = await w.submit(es("mirror", "buy", quantity, "e1", **target))
    await w.settle()
    assert w.statuses("e1") == {"f1": FILLED, "s0": FILLED, "s1": FILLED}
    return entry.orders[0].contract


# -- the schedule ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [{"schedule": True}], indirect=True)
async def test_a_schedule_flatten_missed_while_down_is_carried_out_once_on_reconnect(w: World) -> None:
    contract = await open_mirror(w)
    await drop(w, "slow")
    w.clock.set(et(11, 15, 55, 1))
    assert w.runtime.scheduler is not None
    fired = await w.runtime.scheduler.tick()
    assert [f.rule.name for f in fired if f.action == "flatten"] == ["flatten-mirror"]
    await w.settle()
    [flatten] = [s for s in w.journal.recent_signals(50) if s["id"].startswith("flatten-flatten-mirror")]
    assert w.statuses(flatten["id"]) == {"f1": FILLED, "s0": MISSED, "s1": MISSED}
    assert held(w, "slow", "S-0") == {contract: 2}

    await come_back(w, "slow")
    [redo] = redos(w)
    assert redo["id"] == f"{flatten['id']}-redo-slow-1" and redo["signal"]["redo_of"] == flatten["id"]
    assert w.statuses(redo["id"]) == {"s0": FILLED, "s1": FILLED}
    assert held(w, "slow", "S-0") == {} and held(w, "slow", "S-1") == {}
    assert slow_book(w) == {"s0": [("buy", 2), ("sell", 2)], "s1": [("buy", 2), ("sell", 2)]}
    assert w.runtime.engine_state(w.clock()).accounts["s0"].positions == {}

    # Another drop and come-up: the flatten reached them, nothing more is sent.
    await drop(w, "slow")
    await come_back(w, "slow")
    assert len(redos(w)) == 1
    assert slow_book(w) == {"s0": [("buy", 2), ("sell", 2)], "s1": [("buy", 2), ("sell", 2)]}


# -- the risk monitor ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [{"account_loss": 500, "account_action": "flatten_and_halt"}], indirect=True)
async def test_a_risk_flatten_missed_while_down_is_carried_out_and_catch_up_does_not_reopen(w: World) -> None:
    contract = await open_mirror(w, position="long", position_size=2)
    await drop(w, "slow")
    w.feed.set_price("ES", Decimal("5990"))  # 2 x -10 points x 50 USD = -1,000 each, past the 500 limit
    await w.runtime.check_risk()
    await w.settle()
    flattens = {s["id"]: s for s in w.journal.recent_signals(50) if s["id"].startswith("risk-account-loss")}
    assert sorted(flattens) == [f"risk-account-loss-2026-03-11-{a}" for a in ("f1", "s0", "s1")]
    assert w.statuses("risk-account-loss-2026-03-11-s1") == {"s1": MISSED}
    assert all(w.runtime.risk.halted(a) for a in ("f1", "s0", "s1"))
    assert held(w, "slow", "S-1") == {contract: 2}

    before = len(w.runtime.catchups)
    await come_back(w, "slow")
    assert sorted(r["id"] for r in redos(w)) == [f"risk-account-loss-2026-03-11-{a}-redo-slow-1" for a in ("s0", "s1")]
    assert held(w, "slow", "S-0") == {} and held(w, "slow", "S-1") == {}
    # s1 catches up: its strategy's target (long 2) predates the risk flatten, so it converges to flat, not long.
    [caught] = [c for c in w.runtime.catchups[before:] if c["strategy"] == "mirror"]
    assert caught["flat"] is True and caught["orders"] == []
    assert slow_book(w)["s1"] == [("buy", 2), ("sell", 2)]
    assert all(w.runtime.risk.halted(a) for a in ("f1", "s0", "s1"))


# -- the operator ----------------------------------------------------------------------------------------------------

async def test_an_operator_flatten_of_one_strategy_missed_while_paused_is_carried_out_on_resume(w: World) -> None:
    contract = await open_mirror(w)
    await w.submit(es("trend", "buy", 1, "t1"))
    await w.settle()
    assert held(w, "slow", "S-0") == {contract: 3}
    await w.runtime.pause_broker("slow")
    result = await w.runtime.flatten(strategy="mirror", reason="operator")
    await w.settle()
    assert w.statuses(result["signal_id"]) == {"f1": FILLED, "s0": MISSED, "s1": MISSED}

    # A drop and come-up while paused leaves it to the resume: the operator's pause holds.
    await drop(w, "slow")
    await w.connector("slow").reconnect()
    await wait_until(lambda: not w.runtime.pool["slow"].down, what="slow recovered (paused)")
    await w.settle()
    assert redos(w) == [] and held(w, "slow", "S-0") == {contract: 3}

    resumed = await w.runtime.resume_broker("slow")
    assert resumed["available"] is True
    await w.settle()
    [redo] = redos(w)
    assert w.statuses(redo["id"]) == {"s0": FILLED, "s1": FILLED}
    assert held(w, "slow", "S-0") == {contract: 1} and held(w, "slow", "S-1") == {}  # trend's contract stays
    assert held(w, "fast", "F-1") == {contract: 1}
    positions = {(p["account"], p["strategy"]): p["quantity"] for p in w.runtime.positions()}
    assert positions == {("f1", "trend"): 1, ("s0", "trend"): 1}
    # A second pause and resume finds nothing owed.
    await w.runtime.pause_broker("slow")
    await w.runtime.resume_broker("slow")
    await w.settle()
    assert len(redos(w)) == 1 and held(w, "slow", "S-0") == {contract: 1}


async def test_an_operator_flatten_voids_the_target_for_catch_up(w: World) -> None:
    await open_mirror(w, position="long", position_size=2)
    await drop(w, "slow")
    result = await w.runtime.flatten(account="s1", reason="operator")
    await w.settle()
    assert w.statuses(result["signal_id"]) == {"s1": MISSED}

    before = len(w.runtime.catchups)
    await come_back(w, "slow")
    [caught] = [c for c in w.runtime.catchups[before:] if c["strategy"] == "mirror"]
    # Without the flatten voiding the target, catch-up would see s1 flat (its exit in flight) and buy 2 again.
    assert caught["flat"] is True and caught["orders"] == []
    assert held(w, "slow", "S-1") == {}
    assert slow_book(w)["s1"] == [("buy", 2), ("sell", 2)]
    assert len(held(w, "slow", "S-0")) == 1  # s0 was not in the flatten's scope


# -- what is not redone ----------------------------------------------------------------------------------------------

async def test_a_flatten_that_reached_the_broker_is_not_redone(w: World) -> None:
    contract = await open_mirror(w)
    w.runtime.flatten_retry_delays_s = (1.5,)  # the rejected exit's retry (tests/test_flatten_retry.py) comes later
    w.connector("slow").reject_next(1)
    result = await w.runtime.flatten(strategy="mirror", reason="operator")
    await w.settle()
    statuses = w.statuses(result["signal_id"])
    assert statuses["f1"] == FILLED and sorted([statuses["s0"], statuses["s1"]]) == [FILLED, REJECTED]
    rejected = "s0" if statuses["s0"] == REJECTED else "s1"
    await drop(w, "slow")
    await come_back(w, "slow")
    # Filled: done. Rejected: the broker was there and refused; not redone on a reconnect, but retried (once).
    assert redos(w) == []
    assert held(w, "slow", SLOW[rejected]) == {contract: 2}
    assert sum(len(orders) for orders in slow_book(w).values()) == 3
    await wait_until(lambda: held(w, "slow", SLOW[rejected]) == {}, what="the retry closed it")
    await w.settle()
    assert redos(w) == [] and [s["id"] for s in w.journal.recent_signals(50) if "-retry-" in s["id"]] == [
        f"{result['signal_id']}-retry-slow-1"]
    assert sum(len(orders) for orders in slow_book(w).values()) == 4


async def test_a_flatten_of_an_earlier_trading_day_is_not_carried_out_and_fails_loudly(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    """Its flatten time has passed: not redone on the new day, but a flatten that did not close is a
    ``flatten_failed`` (alert, risk event, entries halted), once: the next come-up does not raise it again."""
    contract = await open_mirror(w)
    await drop(w, "slow")
    result = await w.runtime.flatten(account="s0", reason="operator")
    await w.settle()
    assert w.statuses(result["signal_id"]) == {"s0": MISSED}
    w.clock.set(et(11, 18, 30))  # Thursday's trading day began at 18:00 ET
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        await come_back(w, "slow")
    assert redos(w) == [] and held(w, "slow", "S-0") == {contract: 2}
    [warning] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"flatten {result['signal_id']}")]
    assert "s0" in warning and contract in warning and "2026-03-11" in warning and "it is not" in warning
    [event] = [e for e in w.journal.risk_events(50) if e.get("kind") == FLATTEN_FAILED]
    assert event["name"] == "s0" and event["origin"] == result["signal_id"] and event["lapsed_day"] == "2026-03-11"
    assert event["positions"] == [{"contract": contract, "strategy": "mirror", "quantity": 2}]
    assert w.runtime.risk.halts["s0"].source == f"flatten:{result['signal_id']}"
    w.runtime.clear_halt("s0")
    await drop(w, "slow")
    await come_back(w, "slow")
    assert [e for e in w.journal.risk_events(50) if e.get("kind") == FLATTEN_FAILED] == [event]
    assert "s0" not in w.runtime.risk.halts


async def test_a_flatten_of_an_earlier_trading_day_that_one_of_today_redoes_is_not_a_failure(w: World) -> None:
    """The same, with a flatten of the new day that also missed s0: its redo closes the account, so the older one
    has nothing left undone that matters (no ``flatten_failed``, no halt)."""
    contract = await open_mirror(w)
    await drop(w, "slow")
    older = await w.runtime.flatten(account="s0", reason="operator")
    w.clock.set(et(11, 18, 30))
    newer = await w.runtime.flatten(account="s0", reason="operator again")
    await w.settle()
    await come_back(w, "slow")
    await w.settle()
    assert held(w, "slow", "S-0") == {} and f"{newer['signal_id']}-redo-slow-1" in [s["id"] for s in redos(w)]
    assert not [e for e in w.journal.risk_events(50) if e.get("kind") == FLATTEN_FAILED], older
    assert "s0" not in w.runtime.risk.halts
    assert contract


async def test_a_redo_whose_exits_are_missed_again_is_reissued_on_the_next_come_up(w: World) -> None:
    contract = await open_mirror(w)
    await drop(w, "slow")
    result = await w.runtime.flatten(account="s0", reason="operator")
    await w.settle()
    slow = w.connector("slow")
    submit = slow._submit

    sent = asyncio.Event()

    async def dropped(request: Any) -> Any:  # the link drops as the re-issued exit goes out; nothing arrives
        slow._submit = submit
        slow.disconnect("drop while sending")
        sent.set()
        raise BrokerUnavailable("paper broker slow: not connected")

    slow._submit = dropped
    await slow.reconnect()
    await asyncio.wait_for(sent.wait(), 5)
    slot = w.runtime.pool["slow"]
    await wait_until(lambda: slot.down and not slot.recovering, what="slow's come-up over, down again")
    first = f"{result['signal_id']}-redo-slow-1"
    assert w.journal.get_signal(first) is not None
    assert held(w, "slow", "S-0") == {contract: 2}

    await come_back(w, "slow")
    assert w.statuses(first) == {"s0": MISSED}  # recovery: not at the broker, never arrived
    assert w.statuses(f"{result['signal_id']}-redo-slow-2") == {"s0": FILLED}
    assert held(w, "slow", "S-0") == {} and slow_book(w)["s0"] == [("buy", 2), ("sell", 2)]
    await drop(w, "slow")
    await come_back(w, "slow")
    assert len(redos(w)) == 2


def test_a_reissued_exit_never_exceeds_what_the_broker_holds_where_the_ledger_disagrees() -> None:
    """An ``on_mismatch: halt`` account keeps its ledger after a mismatch: where the broker holds less (or the
    other side), the exits close what it holds and never open a position. A contract the broker holds nothing of
    gets no exit, and an account no reconciliation row covers is not exited at all (what it holds is unknown)."""
    from service.flatten import _clamp_to_broker

    def sell(strategy: str, contract: str, quantity: int, account: str = "s0") -> dict[str, Any]:
        return {"account": account, "contract": contract, "side": "sell", "quantity": quantity, "strategy": strategy}

    reconciled = {"s0": {"account": "s0", "broker_positions": {"ESH6": 3, "NQH6": -1},
                         "mismatches": [{"contract": "ESH6", "ledger": 4, "broker": 3},
                                        {"contract": "NQH6", "ledger": 1, "broker": -1}]}}
    orders = [sell("mirror", "ESH6", 2), sell("trend", "ESH6", 2), sell("mirror", "NQH6", 1),
              sell("mirror", "MESH6", 5), sell("mirror", "ESH6", 2, account="s1")]
    clamped = _clamp_to_broker(orders, reconciled, {})
    assert [(o["account"], o["strategy"], o["contract"], o["quantity"]) for o in clamped] \
        == [("s0", "mirror", "ESH6", 2), ("s0", "trend", "ESH6", 1)]
    # An order of ours still in flight that may add 2 to ESH6 at the broker leaves room for 2 more.
    clamped = _clamp_to_broker(orders[:2], reconciled, {("s0", "ESH6"): 2})
    assert [(o["strategy"], o["quantity"]) for o in clamped] == [("mirror", 2), ("trend", 2)]


async def test_a_flatten_decided_while_the_broker_is_away_closes_what_a_trade_by_hand_opened_there(w: World) -> None:
    """s0 holds nothing by the ledger; while ``slow`` is down the trader buys 2 there by hand (its fill is reported
    at the come-up). An operator flatten of s0 meanwhile has nothing to exit by the ledger, but its broker was away:
    it is owed there all the same, and the come-up closes what reconciliation finds. Before, the account stayed
    long 2 after a flatten that reported success (fuzz crash seed 384, with a risk flatten)."""
    contract = await open_mirror(w)
    closed = await w.runtime.flatten(account="s0", reason="operator")  # s0 flat, its broker up: nothing owed
    await w.settle()
    assert held(w, "slow", "S-0") == {} and "away" not in w.journal.get_signal(closed["signal_id"])["signal"]
    await drop(w, "slow")
    w.connector("slow").manual_trade("S-0", contract, Side.BUY, 2, "manual-1")
    result = await w.runtime.flatten(account="s0", reason="operator")
    assert result["orders"] == []
    assert w.journal.get_signal(result["signal_id"])["signal"]["away"] == {"slow": ["s0"]}
    await come_back(w, "slow")
    [redo] = redos(w)
    assert redo["id"] == f"{result['signal_id']}-redo-slow-1"
    assert [(o["side"], o["quantity"], o["status"]) for o in w.journal.get_signal(redo["id"])["orders"]] == \
        [("sell", 2, FILLED)]
    assert held(w, "slow", "S-0") == {} and held(w, "slow", "S-1") == {contract: 2}  # s1 was not in its scope
    await drop(w, "slow")
    await come_back(w, "slow")
    assert len(redos(w)) == 1 and held(w, "slow", "S-0") == {}


async def test_a_flatten_decided_while_the_broker_is_paused_is_carried_out_on_resume(w: World) -> None:
    """The same with an operator's pause: the resume closes what the trader opened there by hand."""
    contract = await open_mirror(w)
    await w.runtime.flatten(account="s0", reason="operator")
    await w.settle()
    await w.runtime.pause_broker("slow")
    w.connector("slow").manual_trade("S-0", contract, Side.SELL, 1, "manual-1")
    result = await w.runtime.flatten(account="s0", reason="operator")
    assert w.journal.get_signal(result["signal_id"])["signal"]["away"] == {"slow": ["s0"]}
    await w.runtime.resume_broker("slow")
    await w.settle()
    [redo] = redos(w)
    assert [(o["side"], o["quantity"], o["status"]) for o in w.journal.get_signal(redo["id"])["orders"]] == \
        [("buy", 1, FILLED)]
    assert held(w, "slow", "S-0") == {}
