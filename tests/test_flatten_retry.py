"""A flatten exit the broker rejected is retried with backoff until the position is closed, or the account is halted.

Real runtime, real journal, paper brokers (``reject_next`` injects the broker's refusal). ``slow`` holds ``s0`` and
``s1``, ``fast`` holds ``f1``; all three follow ``mirror``. A retry is a flatten signal of its own,
``<flatten id>-retry-<broker>-<n>`` (``retry_of`` names the original), computed after a reconciliation and never
larger than what the broker holds. Retries run only within the original's trading day, and only while the broker
is open; when they run out the account's entries are halted (a ``flatten_failed`` risk event). Every check of a
position reads the paper broker's own book. The backoff is shortened per test (``FLATTEN_RETRY_DELAYS_S``).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from zoneinfo import ZoneInfo

import pytest

from brokers.base import BrokerUnavailable, OrderRequest, Side
from service import runtime as runtime_module
from service.dispatch import FILLED, MISSED, REJECTED
from tests.harness.runtime import (Clock, World, account_doc, documents, routing_doc, wait_until, world,
                                   write_rules)

ET = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")

ACCOUNTS = documents(
    account_doc("f1", "fast", "F-1", "mirror", instruments="ES, MES"),
    account_doc("s0", "slow", "S-0", "mirror", instruments="ES, MES"),
    account_doc("s1", "slow", "S-1", "mirror", instruments="ES, MES"),
)
SLOW = {"s0": "S-0", "s1": "S-1"}


def et(day: int, hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(2026, 3, day, hh, mm, ss, tzinfo=ET).astimezone(UTC)


START = et(11, 15, 0)  # Wednesday 15:00 ET


def rules(tmp_path: Path) -> Path:
    directory = write_rules(tmp_path / "rules")
    (directory / "accounts.yaml").write_text(ACCOUNTS)
    (directory / "routing.yaml").write_text(routing_doc("mirror"))
    return directory


def started(tmp_path: Path, clock: Clock) -> Any:
    return world(tmp_path, rules_dir=rules(tmp_path), clock=clock)


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    async with started(tmp_path, Clock(START)) as running:
        running.feed.set_price("ES", Decimal("6000"))
        yield running


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Retries after 50 ms (three attempts) unless a test asks for other delays."""

    def use(*delays: float) -> None:
        monkeypatch.setattr(runtime_module, "FLATTEN_RETRY_DELAYS_S", tuple(delays), raising=False)

    use(0.05, 0.05, 0.05)
    return use


def held(w: World, account: str) -> dict[str, int]:
    """What the paper broker holds for ``account`` (not what the ledger believes)."""
    return {p["contract"]: int(p["quantity"]) for p in w.connector("slow").book.positions(SLOW[account])
            if int(p["quantity"])}


def sent(w: World, account: str) -> list[tuple[str, int, str]]:
    """Every order the paper broker took for ``account``: (side, quantity, its status there). An order it
    rejected is not in its book; the journal holds those."""
    return [(o["side"], int(o["quantity"]), o["status"]) for o in w.book_orders("slow", SLOW[account])]


def family(w: World, fid: str, kind: str) -> list[dict[str, Any]]:
    """The journaled ``-retry-`` or ``-redo-`` signals of flatten ``fid``, oldest first."""
    return sorted((s for s in w.journal.recent_signals(500) if s["id"].startswith(f"{fid}-{kind}-")),
                  key=lambda s: s["id"])


def failures(w: World) -> list[dict[str, Any]]:
    return [e for e in w.journal.risk_events(200) if e["kind"] == "flatten_failed"]


async def open_mirror(w: World, quantity: int = 2) -> str:
    entry = await w.submit({"strategy": "mirror", "ticker": "ES1!", "action": "buy", "quantity": quantity,
                            "id": "e1"})
    await w.settle()
    assert w.statuses("e1") == {"f1": FILLED, "s0": FILLED, "s1": FILLED}
    return entry.orders[0].contract


async def rejected_flatten(w: World, rejections: int = 1) -> str:
    """Flatten ``s0`` with the broker refusing the exit (and ``rejections - 1`` retries after it)."""
    w.connector("slow").reject_next(rejections)
    result = await w.runtime.flatten(account="s0", reason="operator")
    await wait_until(lambda: w.statuses(result["signal_id"]) == {"s0": REJECTED}, what="the exit rejected")
    return str(result["signal_id"])


async def quiet(w: World, seconds: float = 0.3) -> None:
    """Let every retry that could still be due run (several backoffs), then settle."""
    await asyncio.sleep(seconds)
    await w.settle()


# -- the retry closes the position ----------------------------------------------------------------------------------

async def test_a_rejected_flatten_exit_is_retried_once_and_the_account_ends_flat(w: World) -> None:
    contract = await open_mirror(w)
    fid = await rejected_flatten(w)
    await wait_until(lambda: held(w, "s0") == {}, what="s0 flat at the broker")
    await quiet(w)

    [retry] = family(w, fid, "retry")
    assert retry["id"] == f"{fid}-retry-slow-1" and retry["signal"]["retry_of"] == fid
    assert retry["signal"]["accounts"] == ["s0"] and "rejected by risk check" in retry["reason"]
    assert w.statuses(retry["id"]) == {"s0": FILLED}
    assert sent(w, "s0") == [("buy", 2, "filled"), ("sell", 2, "filled")]
    assert held(w, "s1") == {contract: 2} and sent(w, "s1") == [("buy", 2, "filled")]  # not in the scope
    assert w.runtime.engine_state(w.clock()).accounts["s0"].positions == {}
    assert family(w, fid, "redo") == [] and failures(w) == [] and not w.runtime.risk.halted("s0")

    # A reconnect later owes nothing: the retry settled it.
    w.connector("slow").disconnect("test drop")
    await wait_until(lambda: w.runtime.pool["slow"].down, what="slow down")
    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    await quiet(w)
    assert len(family(w, fid, "retry")) == 1 and family(w, fid, "redo") == []
    assert len(sent(w, "s0")) == 2


async def test_a_position_closed_at_the_broker_before_the_retry_gets_no_order(w: World) -> None:
    w.runtime.flatten_retry_delays_s = (0.4,)  # the runtime took the delays when built
    contract = await open_mirror(w)
    fid = await rejected_flatten(w)
    # The trader closes it by hand at the broker before the retry is due (booked to no strategy).
    await w.connector("slow").place_order(OrderRequest(client_order_id="by-hand-1", account="S-0",
                                                       contract=contract, side=Side.SELL, quantity=2))
    await wait_until(lambda: held(w, "s0") == {}, what="closed by hand")
    await wait_until(lambda: family(w, fid, "retry"), timeout_s=5, what="the retry journaled")
    await quiet(w)

    [retry] = family(w, fid, "retry")
    assert retry["status"] == "decided" and w.journal.orders(signal_id=retry["id"]) == []  # nothing left: no order
    assert held(w, "s0") == {}  # not short: the strategy's book still showed long 2, the broker held nothing
    assert sent(w, "s0") == [("buy", 2, "filled"), ("sell", 2, "filled")]
    assert failures(w) == [] and not w.runtime.risk.halted("s0")


# -- the retries run out --------------------------------------------------------------------------------------------

async def test_when_every_retry_is_rejected_the_account_is_halted_and_exits_still_go_out(tmp_path: Path,
                                                                                       short_backoff: Any) -> None:
    short_backoff(0.05, 0.05)
    clock = Clock(START)
    async with started(tmp_path, clock) as w:
        w.feed.set_price("ES", Decimal("6000"))
        contract = await open_mirror(w)
        fid = await rejected_flatten(w, rejections=3)  # the original and both retries
        await wait_until(lambda: failures(w), what="flatten_failed journaled")
        await quiet(w)

        assert [r["id"] for r in family(w, fid, "retry")] == [f"{fid}-retry-slow-1", f"{fid}-retry-slow-2"]
        assert all(w.statuses(r["id"]) == {"s0": REJECTED} for r in family(w, fid, "retry"))
        [event] = failures(w)
        assert (event["name"], event["broker"], event["contract"], event["quantity"]) == ("s0", "slow", contract, 2)
        assert event["origin"] == fid and "rejected by risk check" in event["last_reason"]
        assert "rejected by risk check" in event["reason"] and contract in event["reason"]
        assert held(w, "s0") == {contract: 2} and len(sent(w, "s0")) == 1  # the buy; three sells rejected
        assert w.runtime.risk.halted("s0") and not w.runtime.risk.halted("s1")
        assert any(a["kind"] == "flatten_failed" and a["account"] == "s0" for a in w.runtime.status()["alerts"])

        # Entries are halted, exits are not.
        await w.submit({"strategy": "mirror", "ticker": "ES1!", "action": "buy", "quantity": 1, "id": "e2"})
        await w.settle()
        assert "s0" not in w.statuses("e2") and held(w, "s0") == {contract: 2}
        await w.submit({"strategy": "mirror", "ticker": "ES1!", "action": "exit", "id": "x1"})
        await w.settle()
        assert w.statuses("x1")["s0"] == FILLED and held(w, "s0") == {}

    # The halt survives a restart, and nothing more is retried.
    async with started(tmp_path, clock) as w:
        await quiet(w)
        assert w.runtime.risk.halted("s0") and len(failures(w)) == 1
        assert len(family(w, fid, "retry")) == 2 and len(sent(w, "s0")) == 2
        w.runtime.clear_halt("s0")
        assert not w.runtime.risk.halted("s0")


async def test_the_next_trading_day_gets_no_retry(w: World) -> None:
    w.runtime.flatten_retry_delays_s = (0.3,)  # the runtime took the delays when built
    contract = await open_mirror(w)
    fid = await rejected_flatten(w)
    w.clock.set(et(11, 18, 30))  # Thursday's trading day began at 18:00 ET, before the retry was due
    await wait_until(lambda: failures(w), what="flatten_failed journaled")
    await quiet(w)

    assert family(w, fid, "retry") == []
    assert held(w, "s0") == {contract: 2} and len(sent(w, "s0")) == 1
    [event] = failures(w)
    assert event["day"] == "2026-03-12" and "2026-03-11 ended" in event["reason"]
    assert w.runtime.risk.halted("s0")


# -- restarts and drops ---------------------------------------------------------------------------------------------

async def test_a_restart_between_the_rejection_and_the_retry_retries_once(tmp_path: Path,
                                                                         short_backoff: Any) -> None:
    short_backoff(0.5)
    clock = Clock(START)
    async with started(tmp_path, clock) as w:
        w.feed.set_price("ES", Decimal("6000"))
        contract = await open_mirror(w)
        fid = await rejected_flatten(w)
    # Stopped before the retry was due: the journal says what is owed.
    async with started(tmp_path, clock) as w:
        w.feed.set_price("ES", Decimal("6000"))
        await wait_until(lambda: held(w, "s0") == {}, what="s0 flat after the restart")
        await quiet(w, 0.7)
        assert [r["id"] for r in family(w, fid, "retry")] == [f"{fid}-retry-slow-1"]
        assert sent(w, "s0") == [("buy", 2, "filled"), ("sell", 2, "filled")]
        assert held(w, "s1") == {contract: 2}
    # And once more: nothing left to do.
    async with started(tmp_path, clock) as w:
        await quiet(w, 0.7)
        assert len(family(w, fid, "retry")) == 1 and len(sent(w, "s0")) == 2


async def test_a_retry_waits_for_a_broker_that_dropped(w: World) -> None:
    w.runtime.flatten_retry_delays_s = (0.2,)  # the runtime took the delays when built
    await open_mirror(w)
    fid = await rejected_flatten(w)
    slow = w.connector("slow")
    slow.disconnect("test drop")
    await wait_until(lambda: w.runtime.pool["slow"].down, what="slow down")
    await asyncio.sleep(0.4)  # the retry came due while the broker was away
    assert family(w, fid, "retry") == [] and len(sent(w, "s0")) == 1

    await slow.reconnect()
    await wait_until(lambda: held(w, "s0") == {}, what="s0 flat after the come-up")
    await quiet(w)
    assert [r["id"] for r in family(w, fid, "retry")] == [f"{fid}-retry-slow-1"] and family(w, fid, "redo") == []
    assert sent(w, "s0") == [("buy", 2, "filled"), ("sell", 2, "filled")]


async def test_a_retry_missed_in_a_drop_is_redone_on_the_come_up_and_not_retried_as_well(w: World) -> None:
    contract = await open_mirror(w)
    slow = w.connector("slow")
    submit = slow._submit
    dropped = asyncio.Event()
    calls = 0

    async def refuse_then_drop(request: Any) -> Any:  # the flatten's exit is refused, the retry's lost in a drop
        nonlocal calls
        calls += 1
        if calls == 1:
            return await submit(request)
        slow._submit = submit
        slow.disconnect("drop while sending")
        dropped.set()
        raise BrokerUnavailable("paper broker slow: not connected")

    slow._submit = refuse_then_drop
    fid = await rejected_flatten(w)
    await asyncio.wait_for(dropped.wait(), 5)
    slot = w.runtime.pool["slow"]
    await wait_until(lambda: slot.down and not slot.recovering, what="slow down")
    [retry] = family(w, fid, "retry")
    assert held(w, "s0") == {contract: 2}

    await slow.reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    await wait_until(lambda: held(w, "s0") == {}, what="s0 flat")
    await quiet(w)
    # Recovery found the retry's exit nowhere (missed): the redo closed the position, and the retry path, which
    # looks at the latest attempt, owed nothing more. One sell filled: not short.
    assert w.statuses(retry["id"]) == {"s0": MISSED}
    [redo] = family(w, fid, "redo")
    assert redo["signal"]["redo_of"] == fid and w.statuses(redo["id"]) == {"s0": FILLED}
    assert len(family(w, fid, "retry")) == 1
    assert sent(w, "s0") == [("buy", 2, "filled"), ("sell", 2, "filled")]
    assert held(w, "s1") == {contract: 2}


# -- signals decided between the rejection and the retry ------------------------------------------------------------

async def retry_now(w: World) -> None:
    """Make the retry due now: past its backoff on the runtime's clock, and its loop woken to look again."""
    assert family_is_empty(w)
    w.clock.advance(timedelta(seconds=31))
    w.runtime._wake_retries("slow")


def family_is_empty(w: World) -> bool:
    return not [s for s in w.journal.recent_signals(500) if "-retry-" in s["id"]]

async def test_a_position_a_later_signal_added_is_not_closed_by_the_retry(w: World) -> None:
    w.runtime.flatten_retry_delays_s = (30.0,)  # due when the test says (``retry_now``), not when the VM is slow
    contract = await open_mirror(w)
    fid = await rejected_flatten(w)
    # Before the retry is due, the strategy buys one more: it saw s0 still long 2 and meant one more than that.
    await w.submit({"strategy": "mirror", "ticker": "ES1!", "action": "buy", "quantity": 1, "id": "e2"})
    await w.settle()
    assert held(w, "s0") == {contract: 3}
    await retry_now(w)
    await wait_until(lambda: family(w, fid, "retry"), timeout_s=5, what="the retry journaled")
    await quiet(w)

    [retry] = family(w, fid, "retry")
    assert [(o["side"], o["quantity"]) for o in w.journal.orders(signal_id=retry["id"])] == [("sell", 2)]
    assert held(w, "s0") == {contract: 1}  # what the flatten meant to close is closed; the later buy stays
    assert held(w, "s1") == {contract: 3} and failures(w) == [] and not w.runtime.risk.halted("s0")


async def test_a_reversal_decided_before_the_retry_is_not_undone(w: World) -> None:
    w.runtime.flatten_retry_delays_s = (30.0,)  # due when the test says (``retry_now``), not when the VM is slow
    contract = await open_mirror(w)
    fid = await rejected_flatten(w)
    await w.submit({"strategy": "mirror", "ticker": "ES1!", "action": "sell", "quantity": 3, "id": "r1"})
    await w.settle()
    assert held(w, "s0") == {contract: -1}
    await retry_now(w)
    await wait_until(lambda: family(w, fid, "retry"), timeout_s=5, what="the retry journaled")
    await quiet(w)

    # The long the flatten was to close is gone (the sell closed it); the short is the later signal's.
    [retry] = family(w, fid, "retry")
    assert retry["status"] == "decided" and w.journal.orders(signal_id=retry["id"]) == []
    assert held(w, "s0") == {contract: -1} and failures(w) == []


async def test_a_partly_closed_line_gets_the_rest_of_the_exit_only(w: World) -> None:
    w.runtime.flatten_retry_delays_s = (30.0,)  # due when the test says (``retry_now``), not when the VM is slow
    contract = await open_mirror(w, quantity=3)
    fid = await rejected_flatten(w)
    # The strategy sells 1 before the retry (s0 long 2), then buys 2 (long 4): the retry still closes 3 only.
    await w.submit({"strategy": "mirror", "ticker": "ES1!", "action": "sell", "quantity": 1, "id": "p1"})
    await w.settle()
    await w.submit({"strategy": "mirror", "ticker": "ES1!", "action": "buy", "quantity": 2, "id": "p2"})
    await w.settle()
    assert held(w, "s0") == {contract: 4}
    await retry_now(w)
    await wait_until(lambda: family(w, fid, "retry"), timeout_s=5, what="the retry journaled")
    await quiet(w)
    [retry] = family(w, fid, "retry")
    assert [(o["side"], o["quantity"]) for o in w.journal.orders(signal_id=retry["id"])] == [("sell", 3)]
    assert held(w, "s0") == {contract: 1}


def test_the_retry_cap_keeps_each_line_to_what_its_rejected_exit_left_open() -> None:
    from service.flatten import _cap_to_unfilled

    def exit_(account: str, strategy: str, side: str, quantity: int, contract: str = "ESM6") -> dict[str, Any]:
        return {"account": account, "strategy": strategy, "contract": contract, "side": side, "quantity": quantity}

    unfilled = {"s0": {("mirror", "ESM6"): 2, ("trend", "ESM6"): -1}}
    orders = [exit_("s0", "mirror", "sell", 3),  # a later buy added 1: closes the 2 owed
              exit_("s0", "trend", "sell", 1),  # owed a buy (a short), now long: a later signal reversed it
              exit_("s0", "mirror", "sell", 1, "MESM6"),  # not a line the rejected exits left open
              exit_("s1", "mirror", "sell", 5)]  # no cap known for s1: unchanged
    assert _cap_to_unfilled(orders, unfilled) == [exit_("s0", "mirror", "sell", 2), exit_("s1", "mirror", "sell", 5)]
    assert _cap_to_unfilled([exit_("s0", "trend", "buy", 4)], unfilled) == [exit_("s0", "trend", "buy", 1)]
