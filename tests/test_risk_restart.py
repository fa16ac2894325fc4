"""The risk monitor across a restart: the day book is rebuilt as if the process had never stopped (positions carried
into the day at the day-start marks, plus every fill of the day), so a loss limit does not forget the day's losses;
and a ``flatten_and_halt`` limit flattens even when a softer limit (or the portfolio's) halted the scope first,
once per trading day, before and after a restart."""

from __future__ import annotations

import asyncio
import logging
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from service.risk import PORTFOLIO
from tests.harness.runtime import Clock, World, signal, wait_until, world, write_rules

ET = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")
MIRROR = ("f1", "f2", "s1")


def et(day: int, hh: int, mm: int) -> datetime:
    return datetime(2026, 3, day, hh, mm, tzinfo=ET).astimezone(UTC)


def day_starts(w: Any) -> list[dict[str, Any]]:
    return [e for e in w.journal.risk_events(200) if e["kind"] == "day_start"]


def on_test_clock(w: Any) -> Any:
    """The paper brokers stamp their fills with the test's clock (their own is the wall clock): the trading day a
    fill belongs to is what these tests are about."""
    for broker in ("fast", "slow"):
        w.connector(broker).book.clock = w.clock
    return w


async def held(w: Any, broker: str, account: str) -> dict[str, int]:
    """What the paper broker itself holds (not what the ledger believes)."""
    return {p.contract: p.quantity for p in await w.connector(broker).positions(account) if p.quantity}


# -- bug 1: the day's losses survive a restart -------------------------------------------------------------------

async def test_a_restart_mid_day_keeps_the_days_loss_and_a_further_loss_crosses_the_limit(tmp_path: Path) -> None:
    clock = Clock(et(11, 10, 0))
    rules = {"account_loss": 1000}
    async with world(tmp_path, clock=clock, rules=rules) as w:
        on_test_clock(w)
        await w.submit(signal("mirror", "buy", 3, sid="e1"))
        await w.settle()
        w.feed.set_price("MES", Decimal("4950"))
        await w.submit(signal("mirror", "sell", 2, sid="x1"))  # 2 x -50 x 5 = -500 realized, 1 still open
        await w.settle()
        w.feed.set_price("MES", Decimal("4960"))
        assert await w.runtime.check_risk() == []
        before = {a: w.runtime.risk.daily_pnl(a) for a in MIRROR}
        # -500 realized, the open contract 40 points down from its 5000 fill (-200), commissions.
        assert all(Decimal(-700) > pnl > Decimal(-705) for pnl in before.values()), before
    clock.set(et(11, 13, 0))
    async with world(tmp_path, clock=clock, rules=rules, price=Decimal("4960")) as w:
        on_test_clock(w)
        rt = w.runtime
        assert {a: rt.risk.daily_pnl(a) for a in MIRROR} == before
        rows = {r["name"]: r for r in rt.accounts()}
        assert all(Decimal(rows[a]["daily_pnl"]) == before[a] for a in MIRROR)
        # The open contract moves from where it stood at the restart: its change counts on top of the day's loss.
        w.feed.set_price("MES", Decimal("4940"))
        assert await rt.check_risk() == []
        assert all(rt.risk.daily_pnl(a) == before[a] - 100 for a in MIRROR)
        # Another 425 down (85 points on the open contract) crosses the 1,000 USD limit: halted, as it would be
        # had the process never stopped (a book rebased at the restart would say -525: nothing would trip).
        w.feed.set_price("MES", Decimal("4855"))
        breaches = await rt.check_risk()
        assert sorted(b.scope_name for b in breaches) == sorted(MIRROR)
        assert all("account-loss" in (rt.risk.halted(a) or "") for a in MIRROR)
    # The next trading day (18:00 ET) starts from zero: the open contract counts from the day-start mark.
    clock.set(et(11, 19, 0))
    async with world(tmp_path, clock=clock, rules=rules, price=Decimal("4855")) as w:
        on_test_clock(w)
        rt = w.runtime
        assert rt.risk.day == date(2026, 3, 12) and rt.risk.halts == {}
        assert all(rt.risk.daily_pnl(a) == 0 for a in MIRROR)
        [event] = [e for e in day_starts(w) if e["day"] == "2026-03-12"]
        assert set(event["marks"].values()) == {"4855.00"} and set(event["basis"].values()) == {"current mark"}


async def carry_into_wednesday(w: World, clock: Clock) -> str:
    """Buy 2 MES on Tuesday at 5000, then open Wednesday's trading day (18:00 ET) with MES at 4990; the contract."""
    on_test_clock(w)
    await w.submit(signal("mirror", "buy", 2, sid="e1"))
    await w.settle()
    [contract] = {c for (_a, _s, c), b in w.runtime.ledger.books.items() if b.quantity}
    clock.set(et(10, 18, 0))
    w.feed.set_price("MES", Decimal("4990"))
    await w.runtime.check_risk()
    return contract


async def test_a_carried_position_counts_from_the_day_start_mark_not_the_restart_mark(tmp_path: Path) -> None:
    clock = Clock(et(10, 14, 0))
    async with world(tmp_path, clock=clock) as w:
        rt = w.runtime
        contract = await carry_into_wednesday(w, clock)
        assert rt.risk.day == date(2026, 3, 11) and rt.risk.day_marks == {contract: Decimal("4990")}
        await wait_until(lambda: any(e["day"] == "2026-03-11" for e in day_starts(w)), what="day start journaled")
        clock.set(et(11, 11, 0))
        w.feed.set_price("MES", Decimal("4950"))
        await rt.check_risk()
        assert all(rt.risk.daily_pnl(a) == -400 for a in MIRROR)  # 2 x -40 x 5 since the day began
    async with world(tmp_path, clock=clock, price=Decimal("4950")) as w:
        on_test_clock(w)
        # Restarted at 4950: still -400 (rebasing at the restart's mark would have said 0).
        assert all(w.runtime.risk.daily_pnl(a) == -400 for a in MIRROR)
        assert w.runtime.risk.day_marks == {contract: Decimal("4990")}
        assert len([e for e in day_starts(w) if e["day"] == "2026-03-11"]) == 1  # found, not journaled again


async def test_without_journaled_day_start_marks_the_17_et_mark_then_the_first_fill_then_the_current_mark(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The service was down at 18:00 ET: the 17:00 ET daily mark values what it has; for a contract the mark lacks,
    the day's first fill; for one with neither, the current mark, with a warning."""
    rules_dir = write_rules(tmp_path / "rules")
    now = et(11, 11, 0)

    def fill(fid: str, contract: str, side: str, qty: int, price: str, at: datetime) -> dict[str, Any]:
        return {"broker": "fast", "fill_id": fid, "account": "f1", "contract": contract, "side": side,
                "quantity": qty, "price": price, "commission": "0", "strategy": "mirror",
                "at": at.isoformat().replace("+00:00", "Z")}

    yesterday, today = et(10, 14, 0), et(11, 10, 0)
    fills = [fill("1", "MESH6", "buy", 2, "5000", yesterday), fill("2", "ESH6", "buy", 1, "6000", yesterday),
             fill("3", "NQH6", "buy", 1, "21000", yesterday), fill("4", "ESH6", "sell", 1, "5980", today)]
    async with world(tmp_path, clock=Clock(now), start=False, rules_dir=rules_dir) as w:
        on_test_clock(w)
        await w.journal.record_daily_marks(date(2026, 3, 10), et(10, 17, 0), [{"account": "f1"}],
                                           {"MESH6": Decimal("4990")})
        w.feed.set_price("NQ", Decimal("21010"))
        w.feed.set_price("MES", Decimal("4980"))
        with caplog.at_level(logging.INFO, logger="service.runtime"):
            await w.runtime._open_day_book(fills, now, w.journal.risk_events(1000))
        risk = w.runtime.risk
        assert risk.day_marks == {"MESH6": Decimal("4990"), "ESH6": Decimal("5980"), "NQH6": Decimal("21010")}
        # MES: 2 x -10 x 5; ES closed at its own day-start mark: 0; NQ: from the current mark: 0.
        assert risk.daily_pnl("f1") == -100
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("NQH6" in m and "current mark" in m and "not counted" in m for m in warned), warned
        assert any("ESH6" in m and "earliest fill" in m for m in warned), warned
        await wait_until(lambda: day_starts(w), what="day start journaled")
        [event] = day_starts(w)
        assert event["day"] == "2026-03-11" and event["marks"] == {"ESH6": "5980", "MESH6": "4990",
                                                                    "NQH6": "21010.00"}
        assert event["basis"]["MESH6"] == "17:00 ET daily mark"
    async with world(tmp_path, clock=Clock(now), start=False, rules_dir=rules_dir) as w:
        on_test_clock(w)
        # A second restart, the market moved: the journaled marks are taken, not the fallbacks again.
        w.feed.set_price("NQ", Decimal("21020"))
        w.feed.set_price("MES", Decimal("4980"))
        await w.runtime._open_day_book(fills, now, w.journal.risk_events(1000))
        assert w.runtime.risk.day_marks["NQH6"] == Decimal("21010")
        assert w.runtime.risk.daily_pnl("f1") == Decimal(-100) + Decimal(10) * 20  # MES at 4980; NQ +10 x 20
        assert len(day_starts(w)) == 1


# -- bug 2: a hard limit flattens past a softer limit's halt -----------------------------------------------------

RISK = """
kind: Risk
name: limits
margin_buffer_pct: 0
limits:
  - name: account-hard
    scope: account
    accounts: [f1, f2, s1]
    max_daily_loss: 1000
    on_breach: flatten_and_halt
  - name: account-soft
    scope: account
    max_daily_loss: 500
    on_breach: halt_entries
  - name: portfolio-soft
    scope: portfolio
    max_daily_loss: {portfolio}
    on_breach: halt_entries
"""


def hard_rules(tmp_path: Path, portfolio: int = 1000000) -> Path:
    rules_dir = write_rules(tmp_path / "rules")
    (rules_dir / "risk.yaml").write_text(RISK.format(portfolio=portfolio))
    return rules_dir


async def test_a_soft_halt_does_not_keep_the_hard_limit_from_flattening_and_it_flattens_once(tmp_path: Path) -> None:
    clock = Clock(et(11, 11, 0))
    async with world(tmp_path, clock=clock, rules_dir=hard_rules(tmp_path)) as w:
        on_test_clock(w)
        rt = w.runtime
        await w.submit(signal("mirror", "buy", 2, sid="e1"))
        await w.settle()
        w.feed.set_price("MES", Decimal("4940"))  # 2 x -60 x 5 = -600 each
        assert {(b.limit.name, b.flatten) for b in await rt.check_risk()} == {("account-soft", False)}
        assert all(rt.risk.halts[a].source == "risk:account-soft" for a in MIRROR)
        w.feed.set_price("MES", Decimal("4895"))  # -1050 each
        breaches = await rt.check_risk()
        assert sorted((b.scope_name, b.limit.name, b.flatten) for b in breaches) == [
            (a, "account-hard", True) for a in MIRROR]
        await w.settle()
        # Closed at the brokers, not just in the ledger.
        assert await held(w, "fast", "F-1") == {} and await held(w, "fast", "F-2") == {}
        assert await held(w, "slow", "S-1") == {}
        for a in MIRROR:
            halt = rt.risk.halts[a]
            assert halt.source == "risk:account-hard" and halt.reason.startswith("account-hard:")
            assert w.journal.get_signal(f"risk-account-hard-2026-03-11-{a}") is not None
        events = [e for e in w.journal.risk_events(50) if e["kind"] == "halt" and e["limit"] == "account-hard"]
        assert sorted(e["name"] for e in events) == sorted(MIRROR) and all(e["flattened"] for e in events)
        row = {r["name"]: r for r in rt.accounts()}["f1"]
        assert row["halted"].startswith("account-hard:") and row["halted_instruments"] == {}
        # Never twice the same day: not on the next check, not after the operator clears the halt.
        assert await rt.check_risk() == []
        rt.clear_halt("f1")
        [again] = await rt.check_risk()
        assert (again.scope_name, again.limit.name, again.flatten) == ("f1", "account-hard", False)
        assert "flattened earlier today" in (rt.risk.halted("f1") or "")
        risk_flattens = [s["id"] for s in w.journal.recent_signals(50) if s["id"].startswith("risk-")]
        assert sorted(risk_flattens) == sorted(f"risk-account-hard-2026-03-11-{a}" for a in MIRROR)


async def test_a_portfolio_soft_halt_then_an_account_hard_limit_flattens_that_account(tmp_path: Path) -> None:
    clock = Clock(et(11, 11, 0))
    async with world(tmp_path, clock=clock, rules_dir=hard_rules(tmp_path, portfolio=1200)) as w:
        on_test_clock(w)
        rt = w.runtime
        await w.submit(signal("mirror", "buy", 2, sid="e1"))
        await w.submit(signal("best", "buy", 1, sid="b1"))
        await w.settle()
        w.feed.set_price("MES", Decimal("4955"))  # mirror accounts -450 each, best -225: portfolio -1575
        assert {(b.scope_name, b.limit.name) for b in await rt.check_risk()} == {(PORTFOLIO, "portfolio-soft")}
        w.feed.set_price("MES", Decimal("4898"))  # mirror accounts -1020 each: hard; best -510: soft
        breaches = {(b.scope_name, b.limit.name, b.flatten) for b in await rt.check_risk()}
        assert {(a, "account-hard", True) for a in MIRROR} <= breaches
        await w.settle()
        assert await held(w, "fast", "F-1") == {} and await held(w, "slow", "S-1") == {}
        assert rt.ledger.account_positions("bf") or rt.ledger.account_positions("bs")  # best: not flattened
        assert rt.risk.halts[PORTFOLIO].source == "risk:portfolio-soft"


async def test_a_restart_between_the_soft_and_the_hard_limit_still_flattens(tmp_path: Path) -> None:
    clock = Clock(et(11, 11, 0))
    rules_dir = hard_rules(tmp_path)
    async with world(tmp_path, clock=clock, rules_dir=rules_dir) as w:
        on_test_clock(w)
        await w.submit(signal("mirror", "buy", 2, sid="e1"))
        await w.settle()
        w.feed.set_price("MES", Decimal("4940"))
        assert {b.limit.name for b in await w.runtime.check_risk()} == {"account-soft"}
    async with world(tmp_path, clock=clock, rules_dir=rules_dir, price=Decimal("4940")) as w:
        on_test_clock(w)
        rt = w.runtime
        assert all(rt.risk.halts[a].source == "risk:account-soft" for a in MIRROR)
        w.feed.set_price("MES", Decimal("4895"))
        assert {(b.limit.name, b.flatten) for b in await rt.check_risk()} == {("account-hard", True)}
        await w.settle()
        assert all(not rt.ledger.account_positions(a) for a in MIRROR)
        assert await held(w, "fast", "F-1") == {}
    async with world(tmp_path, clock=clock, rules_dir=rules_dir, price=Decimal("4895")) as w:
        on_test_clock(w)
        # And after another restart it remembers that it flattened: no second flatten today.
        rt = w.runtime
        assert {("account-hard", a) for a in MIRROR} <= rt.risk.fired
        assert all(rt.risk.halts[a].source == "risk:account-hard" for a in MIRROR)
        assert await rt.check_risk() == []


# -- a busy day: what a restart restores does not depend on how many risk events the day wrote ---------------------

async def noise(w: Any, count: int) -> None:
    """``count`` risk events of no consequence (reconciliation adoptions), written after everything else today."""
    await asyncio.gather(*(w.journal.record_risk_event({
        "scope": "account", "name": "bf", "kind": "adopt", "reason": f"noise {n}", "source": "reconciliation",
        "day": "2026-03-11", "at": w.clock()}) for n in range(count)))


async def test_halts_and_day_start_marks_of_today_survive_a_restart_after_a_thousand_other_events(
        tmp_path: Path) -> None:
    clock = Clock(et(10, 14, 0))
    rules = {"account_loss": 1000}
    async with world(tmp_path, clock=clock, rules=rules) as w:
        rt = w.runtime
        contract = await carry_into_wednesday(w, clock)
        await wait_until(lambda: any(e["day"] == "2026-03-11" for e in day_starts(w)), what="day start journaled")
        clock.set(et(11, 11, 0))
        w.feed.set_price("MES", Decimal("4880"))  # 2 x -110 x 5 = -1,100 each since the day began
        assert {b.scope_name for b in await rt.check_risk()} == set(MIRROR)
        clock.set(et(11, 12, 0))
        await noise(w, 1100)
    clock.set(et(11, 13, 0))
    async with world(tmp_path, clock=clock, rules=rules, price=Decimal("4880")) as w:
        on_test_clock(w)
        rt = w.runtime
        assert rt.risk.day_marks == {contract: Decimal("4990")}  # not the restart's 4880
        assert all(rt.risk.daily_pnl(a) == -1100 for a in MIRROR)
        assert all((rt.risk.halted(a) or "").startswith("account-loss") for a in MIRROR)
        assert len([e for e in w.journal.risk_events_since(et(10, 18, 0), kinds=["day_start"])
                    if e["day"] == "2026-03-11"]) == 1  # found, not journaled again
