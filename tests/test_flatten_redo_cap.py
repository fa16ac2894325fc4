"""A come-up's redo of a missed flatten is capped like a retry: never more on a line than the exits it carries out
again left unfilled there, only on that side, and never more than the broker holds (``service.flatten``:
``_redo_missed_flattens`` through ``_capped_exits``, as ``_retry_flattens`` and ``_redo_withheld``).

Before, the redo recomputed every line in scope from the ledger and capped it to the broker only where the two
disagreed. A flatten's exit is missed at a broker that was open when it was computed in two ways
reached here: a retry of a rejected exit whose request a drop cut (recovery then finds it nowhere), and a follow-up
(``<fid>-follow-<n>``: an order the flatten counted on was cancelled unfilled) dispatched while an operator paused
the broker. Either way the broker was open between the flatten and the miss, so a signal decided after the flatten
reached it, and the redo closed that too (the account ended flat where the later signal meant it to hold 1).
An account the original found away is still redone in its whole scope (it read a ledger that did not know what
that broker held: ``tests/test_missed_flatten.py``), and a trade by hand at the broker while it was away is closed,
never sold through, also with two strategies on opposite sides of one contract (fuzz seed 733's shape).

Real runtime, real journal, paper brokers. Every position checked is the paper broker's own book.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, AsyncIterator
from zoneinfo import ZoneInfo

import pytest

from brokers.base import BrokerUnavailable, Side
from service.dispatch import ACKNOWLEDGED, CANCELLED, FILLED, MISSED, REJECTED
from tests.harness.runtime import (Clock, World, account_doc, documents, routing_doc, signal, wait_until, world,
                                   write_rules)
from tests.test_flatten_race import HeldFill

ET = ZoneInfo("America/New_York")
START = datetime(2026, 3, 11, 15, 0, tzinfo=ET).astimezone(ZoneInfo("UTC"))  # a Wednesday, 15:00 ET
OPEN = {"long": "buy", "short": "sell"}
CLOSE = {"long": "sell", "short": "buy"}
SIGN = {"long": 1, "short": -1}


def rules(tmp_path: Path, fill_ms: float = 0) -> Path:
    """``f1`` at ``fast`` follows mirror and trend; ``s0`` at ``slow`` follows mirror."""
    directory = write_rules(tmp_path / "rules", fill_ms=fill_ms)
    (directory / "accounts.yaml").write_text(documents(account_doc("f1", "fast", "F-1", "mirror, trend"),
                                                       account_doc("s0", "slow", "S-0", "mirror")))
    (directory / "routing.yaml").write_text(routing_doc("mirror", "trend"))
    return directory


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    async with world(tmp_path, rules_dir=rules(tmp_path), clock=Clock(START)) as running:
        yield running


def held(w: World, broker: str, account: str) -> dict[str, int]:
    """What the paper broker holds for ``account`` (not what the ledger believes)."""
    return {p["contract"]: int(p["quantity"]) for p in w.connector(broker).book.positions(account)
            if int(p["quantity"])}


def exits(w: World, sid: str) -> list[tuple[str, int, str]]:
    return [(o["side"], int(o["quantity"]), o["status"]) for o in w.journal.orders(signal_id=sid)]


async def come_back(w: World, broker: str) -> None:
    await w.connector(broker).reconnect()
    await wait_until(lambda: w.runtime.pool.available(broker), what=f"{broker} back")
    await w.settle()


def drop_on_next_request(w: World, broker: str) -> asyncio.Event:
    """The next request to ``broker`` is cut by a drop: the link goes down and nothing reaches the broker."""
    connector = w.connector(broker)
    submit = connector._submit
    dropped = asyncio.Event()

    async def cut(request: Any) -> Any:
        connector._submit = submit
        connector.disconnect("drop while sending")
        dropped.set()
        raise BrokerUnavailable(f"paper broker {broker}: not connected")

    connector._submit = cut
    return dropped


@pytest.mark.parametrize("side", ["long", "short"])
async def test_a_redo_of_a_retry_lost_in_a_drop_keeps_what_a_later_signal_added(w: World, side: str) -> None:
    """s0 holds 2; the flatten's exit is rejected; mirror adds 1 before the retry (it saw s0 still holding 2 and
    meant one more); the retry closes the 2 the flatten meant to, and a drop cuts its request. The come-up's redo
    closes those 2 and keeps the later signal's 1 (before: it closed all 3, the account ended flat)."""
    w.runtime.flatten_retry_delays_s = (30.0,)  # due when the test says, not when the VM is slow
    await w.submit(signal("mirror", OPEN[side], 2, sid="open"))
    await w.settle()
    (contract,) = held(w, "slow", "S-0")
    w.connector("slow").reject_next(1)
    fid = str((await w.runtime.flatten(account="s0", reason="operator"))["signal_id"])
    await wait_until(lambda: w.statuses(fid) == {"s0": REJECTED}, what="the exit rejected")
    await w.submit(signal("mirror", OPEN[side], 1, sid="more"))
    await w.settle()
    assert held(w, "slow", "S-0") == {contract: 3 * SIGN[side]}

    dropped = drop_on_next_request(w, "slow")
    w.clock.advance(timedelta(seconds=31))
    w.runtime._wake_retries("slow")
    await asyncio.wait_for(dropped.wait(), 5)
    slot = w.runtime.pool["slow"]
    await wait_until(lambda: slot.down and not slot.recovering, what="slow down")
    retry = f"{fid}-retry-slow-1"
    assert [(s, q) for s, q, _ in exits(w, retry)] == [(CLOSE[side], 2)]

    await come_back(w, "slow")
    assert w.statuses(retry) == {"s0": MISSED}
    assert exits(w, f"{fid}-redo-slow-1") == [(CLOSE[side], 2, FILLED)]
    assert held(w, "slow", "S-0") == {contract: SIGN[side]}
    assert w.journal.get_signal(f"{fid}-redo-slow-2") is None and w.journal.get_signal(f"{fid}-retry-slow-2") is None


@pytest.mark.parametrize("side", ["long", "short"])
async def test_a_redo_of_a_follow_up_missed_while_paused_keeps_what_a_later_signal_opened(tmp_path: Path,
                                                                                          side: str) -> None:
    """f1's mirror holds 2 and its exit is working at fast (its fill not done yet) when f1 is flattened: the flatten
    counts on the exit and sends nothing. Mirror then opens 1 (the line looked flat). The operator pauses fast and
    the exit is cancelled there unfilled: the follow-up closing the 2 it left is missed (paused). The resume's redo of
    that follow-up closes those 2 and keeps the later 1 (before: it recomputed mirror's whole line and closed 3)."""
    async with world(tmp_path, rules_dir=rules(tmp_path, fill_ms=1), clock=Clock(START)) as w:
        await w.submit(signal("mirror", OPEN[side], 2, sid="open"))
        await w.settle()
        (contract,) = held(w, "fast", "F-1")
        working = HeldFill(w)
        leaving = await w.submit(signal("mirror", "exit", sid="exit"))
        (coid,) = [o.client_order_id for o in leaving.orders if o.account == "f1"]
        await wait_until(lambda: w.runtime.tracker.orders[coid].status == ACKNOWLEDGED, what="the exit working")
        result = await w.runtime.flatten(account="f1", reason="operator")
        assert result["orders"] == []  # it counted on the exit
        fid = str(result["signal_id"])
        await w.submit(signal("mirror", OPEN[side], 1, sid="later"))
        await wait_until(lambda: w.statuses("later").get("f1") == FILLED and held(w, "fast", "F-1") ==
                         {contract: 3 * SIGN[side]}, what="the later signal filled")

        await w.runtime.pause_broker("fast")
        assert working.order_id is not None
        w.connector("fast").book.cancel("F-1", working.order_id)
        follow = f"{fid}-follow-1"
        await wait_until(lambda: w.journal.get_signal(follow) is not None and w.statuses(follow) == {"f1": MISSED},
                         what="the follow-up missed")
        assert w.journal.get_order(coid)["status"] == CANCELLED
        assert [(s, q) for s, q, _ in exits(w, follow)] == [(CLOSE[side], 2)]

        await w.runtime.resume_broker("fast")
        await w.settle()
        assert exits(w, f"{follow}-redo-fast-1") == [(CLOSE[side], 2, FILLED)]
        assert held(w, "fast", "F-1") == {contract: SIGN[side]}
        working.gate.set()


@pytest.mark.parametrize("hand", ["close", "reverse"])
async def test_a_redo_for_an_account_that_was_away_closes_what_the_broker_holds_after_a_trade_by_hand(
        w: World, hand: str) -> None:
    """f1: mirror long 2 and trend short 2 at one contract, fast holding 0 (seed 733's shape). fast drops; the
    operator flattens f1 (missed there: away); the trader then buys 1 (closing) or buys 3 (reversing) by hand. The
    come-up's redo closes the account's whole scope as the broker and the ledger show it, and never past flat."""
    await w.submit(signal("mirror", "buy", 2, sid="m"))
    await w.submit(signal("trend", "sell", 2, sid="t"))
    await w.settle()
    assert held(w, "fast", "F-1") == {}
    fast = w.connector("fast")
    fast.disconnect("test drop")
    await wait_until(lambda: w.runtime.pool["fast"].down, what="fast down")
    fid = str((await w.runtime.flatten(account="f1", reason="operator"))["signal_id"])
    await wait_until(lambda: w.statuses(fid) == {"f1": MISSED}, what="the flatten's exits missed")
    (contract,) = {o["contract"] for o in w.journal.orders(signal_id=fid)}
    fast.manual_trade("F-1", contract, Side.BUY, 1 if hand == "close" else 3, "manual-1")

    await come_back(w, "fast")
    assert held(w, "fast", "F-1") == {}
    assert {(p["strategy"], p["quantity"]) for p in w.runtime.positions() if p["account"] == "f1"} == set()
    assert w.journal.get_signal(f"{fid}-redo-fast-1") is not None
    assert not [e for e in w.journal.risk_events(50) if e.get("kind") == "flatten_failed"]


def test_the_redo_caps_a_line_it_carries_out_and_keeps_the_opposite_line_whole() -> None:
    """The cap and the clamp the redo shares with the retry, on seed 733's shape: mirror +2 and trend -2 at a broker
    holding 0, a later signal's 1 of mirror's 2 not the flatten's. Mirror's exit is capped to the 1 the flatten
    owed; what it keeps back is the broker's too, so trend's buy of 2 is not cut as if it went past flat."""
    from service.flatten import _cap_to_unfilled, _clamp_to_broker, _kept_back

    def exit_(strategy: str, side: str, quantity: int) -> dict[str, Any]:
        return {"account": "f1", "strategy": strategy, "contract": "MESH6", "side": side, "quantity": quantity,
                "client_order_id": f"x-{strategy}"}

    computed = [exit_("mirror", "sell", 2), exit_("trend", "buy", 2)]
    capped = _cap_to_unfilled(computed, {"f1": {("mirror", "MESH6"): 1, ("trend", "MESH6"): -2}})
    reconciled = {"f1": {"account": "f1", "broker_positions": {}}}
    kept = _kept_back(computed, capped)
    assert kept == {("f1", "MESH6"): 1}
    assert _clamp_to_broker(capped, reconciled, {}, {}, kept=kept) == [exit_("mirror", "sell", 1),
                                                                         exit_("trend", "buy", 2)]
    # Without what mirror keeps back, trend's exit would be cut to 1 and trend left short 1, owed by nobody.
    assert _clamp_to_broker(capped, reconciled, {}, {}) == [exit_("mirror", "sell", 1), exit_("trend", "buy", 1)]
