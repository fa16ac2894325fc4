"""The risk monitor: daily P&L per account and portfolio from fills and the shared feed's marks on the CME trading
day (18:00 ET), in-flight entries counted as exposure, breaches halting (or flattening and halting) per rule,
halts lifting at the next trading day or by an operator, and exits never blocked by a halt."""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from engine.model import Account, Limit, Location
from service.dispatch import FILLED, SENDING
from service.ledger import Ledger
from service.risk import PORTFOLIO, RiskMonitor
from tests.harness.runtime import Clock, signal, wait_until, world

ET = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")
POINT = Decimal(5)  # MES
PORTFOLIO_LIMIT = "portfolio-loss"


def et(day: int, hh: int, mm: int) -> datetime:
    return datetime(2026, 3, day, hh, mm, tzinfo=ET).astimezone(UTC)


def limit(name: str, scope: str, *, usd: int | None = None, pct: int | None = None,
          on_breach: str = "halt_entries") -> Limit:
    return Limit(name=name, scope=scope, max_daily_loss=None if usd is None else Decimal(usd),
                 max_daily_loss_pct=None if pct is None else Decimal(pct), max_contracts=None, instruments=None,
                 accounts=None, on_breach=on_breach, risk="limits", source=Location("t", 1, 1))


def account(name: str, capital: int = 10000) -> Account:
    return Account(name=name, broker="b", broker_account=name.upper(), capital=Decimal(capital),
                   strategies=("s",), size_multiplier=Decimal(1), instruments=None, catch_up=False,
                   on_mismatch="adopt", source=Location("t", 1, 1))  # type: ignore[call-arg]


class Marks:
    def __init__(self) -> None:
        self.prices: dict[str, Decimal] = {}

    def __call__(self, contract: str) -> Decimal | None:
        return self.prices.get(contract)


def book(monitor: RiskMonitor, ledger: Ledger, fid: str, acct: str, qty: int, price: str, at: datetime) -> None:
    for target in (ledger,):
        target.apply(fill_id=fid, account=acct, strategy="s", contract="MESH6", signed_qty=qty,
                     price=Decimal(price), commission=Decimal("0.25") * abs(qty), point_value=POINT)
    monitor.apply_fill(fill_id=fid, account=acct, strategy="s", contract="MESH6", signed_qty=qty,
                       price=Decimal(price), commission=Decimal("0.25") * abs(qty), at=at)


# -- pure ---------------------------------------------------------------------------------------------------------

def test_daily_pnl_is_realized_plus_marked_minus_commissions_and_restarts_at_18_et() -> None:
    marks, ledger = Marks(), Ledger()
    monitor = RiskMonitor(marks, lambda c: POINT)
    monitor.roll(et(11, 9, 0), ledger)
    book(monitor, ledger, "1", "a", 2, "5000", et(11, 10, 0))
    book(monitor, ledger, "2", "a", -1, "5010", et(11, 11, 0))
    marks.prices["MESH6"] = Decimal("4990")
    monitor.refresh()
    # realized +10 x 5 = 50; open 1 @ 5000 marked 4990 = -50; commissions 3 x 0.25
    assert monitor.daily_pnl("a") == Decimal("-0.75")
    assert monitor.portfolio_pnl(["a", "b"]) == Decimal("-0.75")
    assert not monitor.roll(et(11, 17, 59), ledger)  # still Wednesday's trading day
    assert monitor.roll(et(11, 18, 0), ledger)  # Thursday's trading day began at 18:00 ET
    assert monitor.daily_pnl("a") == 0  # the carried contract counts from the 18:00 mark on
    marks.prices["MESH6"] = Decimal("5000")
    monitor.refresh()
    assert monitor.daily_pnl("a") == Decimal(50)
    # A fill already in the day-start positions is not booked twice.
    book(monitor, ledger, "1", "a", 2, "5000", et(11, 10, 0))
    assert monitor.daily_pnl("a") == Decimal(50)
    # A fill of the previous trading day reported only now joins the day-start position at the day-start mark
    # (4990), with no P&L or commission today: the long is 2 from 4990, marked 5000.
    monitor.apply_fill(fill_id="late", account="a", strategy="s", contract="MESH6", signed_qty=1,
                       price=Decimal("4000"), commission=Decimal(7), at=et(11, 17, 0))
    assert monitor.daily_pnl("a") == Decimal(100)
    monitor.apply_fill(fill_id="late", account="a", strategy="s", contract="MESH6", signed_qty=1,
                       price=Decimal("4000"), commission=Decimal(7), at=et(11, 17, 0))
    assert monitor.daily_pnl("a") == Decimal(100)


def test_breaches_halt_once_and_lift_at_the_next_trading_day_or_when_cleared() -> None:
    marks, ledger = Marks(), Ledger()
    monitor = RiskMonitor(marks, lambda c: POINT)
    accounts = {"a": account("a"), "b": account("b")}
    limits = [limit("acct", "account", pct=1), limit("port", PORTFOLIO, usd=200, on_breach="flatten_and_halt")]
    monitor.roll(et(11, 9, 0), ledger)
    book(monitor, ledger, "1", "a", 1, "5000", et(11, 10, 0))
    book(monitor, ledger, "2", "b", 1, "5000", et(11, 10, 0))
    marks.prices["MESH6"] = Decimal("4985")  # each: -75 - 0.25
    monitor.refresh()
    assert monitor.breaches(limits, accounts) == []
    marks.prices["MESH6"] = Decimal("4979.75")  # each: -101.25 - 0.25; 1% of 10000 = 100; portfolio -203
    monitor.refresh()
    found = {(b.scope_name, b.limit.name, b.accounts) for b in monitor.breaches(limits, accounts)}
    assert found == {("a", "acct", ("a",)), ("b", "acct", ("b",)), (PORTFOLIO, "port", ("a", "b"))}
    for b in monitor.breaches(limits, accounts):
        monitor.act(b, et(11, 12, 0))
        if b.flatten:
            monitor.mark_fired(b.limit.name, b.key)
    assert monitor.breaches(limits, accounts) == []  # halted scopes do not breach again
    assert "account-" not in (monitor.halted("a") or "") and "acct: daily P&L -101.50" in monitor.halted("a")
    assert monitor.clear("a") is not None
    assert monitor.halted("a") is not None and "port" in monitor.halted("a")  # the portfolio halt still holds
    monitor.clear(PORTFOLIO)
    assert monitor.halted("a") is None and monitor.halted("b") is not None
    monitor.roll(et(11, 18, 0), ledger)
    assert monitor.halts == {}
    monitor.halt("b", "reconciliation", "reconciliation", et(11, 19, 0), until_day_end=False)
    monitor.roll(et(12, 18, 0), ledger)
    assert "b" in monitor.halts  # a reconciliation halt waits for a clean pass or an operator


def test_a_hard_limit_flattens_past_a_softer_halt_once_and_re_arms_only_after_a_clear_and_a_recovery() -> None:
    marks, ledger = Marks(), Ledger()
    monitor = RiskMonitor(marks, lambda c: POINT)
    accounts = {"a": account("a")}
    soft, hard = limit("soft", "account", usd=500), limit("hard", "account", usd=1000, on_breach="flatten_and_halt")
    monitor.roll(et(11, 9, 0), ledger)
    book(monitor, ledger, "1", "a", 4, "5000", et(11, 10, 0))  # 1 USD commissions

    def check(price: str) -> list[tuple[str, bool]]:
        marks.prices["MESH6"] = Decimal(price)
        monitor.refresh()
        found = monitor.breaches([hard, soft], accounts)  # the hard one listed first: its halt must still win
        for b in found:
            monitor.act(b, et(11, 12, 0))
            if b.flatten:
                monitor.mark_fired(b.limit.name, b.key)
        return [(b.limit.name, b.flatten) for b in found]

    assert check("4980") == []  # -401
    assert check("4975") == [("soft", False)]  # -501
    assert check("4970") == []  # -601: halted by the soft limit already
    assert check("4950") == [("hard", True)]  # -1001: flattens although the key is halted
    assert monitor.halts["a"].source == "risk:hard" and "flatten_and_halt)" in monitor.halts["a"].reason
    assert check("4940") == []  # never twice
    # Both at once, hard listed first: one flattening breach, the soft one adds nothing.
    fresh = RiskMonitor(marks, lambda c: POINT)
    fresh.roll(et(11, 9, 0), Ledger())
    book(fresh, Ledger(), "1", "a", 4, "5000", et(11, 10, 0))
    assert [(b.limit.name, b.flatten) for b in fresh.breaches([hard, soft], accounts)] == [("hard", True)]
    # Cleared while still past the limit: halted again, not flattened again.
    monitor.clear("a")
    assert monitor.rearm([hard, soft], accounts) == []
    assert check("4940") == [("hard", False)]
    assert "flattened earlier today" in monitor.halts["a"].reason and ("hard", "a") in monitor.fired
    # Cleared once the day is back above the limit: re-armed, and the next crossing flattens again.
    monitor.clear("a")
    marks.prices["MESH6"] = Decimal("4990")
    monitor.refresh()
    assert monitor.rearm([hard, soft], accounts) == [("hard", "a")]
    assert check("4990") == []
    assert check("4949") == [("hard", True)]  # the soft one breaches too, but the hard one's halt holds the key
    assert monitor.fire_count[("hard", "a")] == 2
    # A reconciliation halt (until cleared) keeps its life when a hard limit's halt replaces it.
    other = RiskMonitor(marks, lambda c: POINT)
    other.roll(et(11, 9, 0), Ledger())
    book(other, Ledger(), "1", "a", 4, "5000", et(11, 10, 0))
    other.halt("a", "reconciliation mismatch", "reconciliation", et(11, 11, 0), until_day_end=False)
    [breach] = other.breaches([hard], accounts)
    assert breach.flatten and other.act(breach, et(11, 12, 0)).day is None
    other.roll(et(11, 18, 0), ledger)
    assert other.fired == set() and "a" in other.halts


# -- through the runtime, against paper brokers --------------------------------------------------------------------

async def test_in_flight_entries_count_as_exposure_until_the_slow_broker_resolves_them(tmp_path: Path) -> None:
    async with world(tmp_path, rules={"fast_ms": 15, "slow_ms": 200}) as w:
        rt = w.runtime
        before = rt.engine_state(w.clock())
        samples: list[Any] = []
        decision = await w.submit(signal("mirror", "buy", 4, sid="e1"))
        slow_coid = decision.orders[2].client_order_id
        saw_fast_filled_slow_in_flight = False
        while rt.tracker.in_flight() or rt._reservations:
            state = rt.engine_state(w.clock())
            samples.append(state)
            statuses = w.statuses("e1")
            if statuses["f1"] == FILLED and statuses["s1"] != FILLED:
                saw_fast_filled_slow_in_flight = True
            await asyncio.sleep(0.002)
            if len(samples) > 5000:
                break
        assert saw_fast_filled_slow_in_flight
        assert rt.tracker.get(slow_coid).status == FILLED
        after = rt.engine_state(w.clock())
        for name, margin in (("f1", 50), ("f2", 50), ("s1", 40)):
            final = after.accounts[name].free_margin
            used = before.accounts[name].free_margin - final
            assert margin * 4 <= used < margin * 4 + 5  # the margin, plus commissions and spread
            for state in samples:
                acct = state.accounts[name]
                # Never safer than the truth once everything settled (commissions aside: < 1 USD here).
                assert acct.free_margin <= final + 1, (name, acct.free_margin, final)
                # The position the engine sees includes what is still on its way.
                assert sum(acct.positions.values()) == 4, (name, acct.positions)


async def test_a_breach_halts_entries_but_never_exits_and_the_halt_lifts_next_day(tmp_path: Path) -> None:
    clock = Clock(et(11, 11, 0))
    async with world(tmp_path, clock=clock, rules={"account_loss": 100}) as w:
        rt = w.runtime
        await w.submit(signal("mirror", "buy", 2, sid="e1"))
        await w.settle()
        w.feed.set_price("MES", Decimal("4985"))  # 2 x -15 x 5 = -150 each
        await rt.check_risk()
        assert {h["name"] for h in rt.status()["halts"]} == {"f1", "f2", "s1"}
        events = [e for e in w.journal.risk_events(20) if e["kind"] == "halt"]
        assert {e["name"] for e in events} == {"f1", "f2", "s1"} and all(e["limit"] == "account-loss" for e in events)
        assert rt.engine_state(clock()).accounts["f1"].halted
        blocked = await w.submit(signal("mirror", "buy", 1, sid="e2"))
        assert blocked.orders == () and {s.by for s in blocked.skipped} == {"halted"}
        assert all("account-loss" in s.reason for s in blocked.skipped), blocked.skipped
        # Exits are never blocked by a halt.
        out = await w.submit(signal("mirror", "exit", sid="x1"))
        assert sorted(o.account for o in out.orders) == ["f1", "f2", "s1"]
        await w.settle()
        assert set(w.statuses("x1").values()) == {FILLED}
        assert all(not rt.engine_state(clock()).accounts[a].positions for a in ("f1", "f2", "s1"))
        # The operator clears one; the next trading day (18:00 ET) lifts the rest.
        cleared = rt.clear_halt("f1")
        assert cleared["cleared"] == "f1"
        await wait_until(lambda: any(e["kind"] == "clear" for e in w.journal.risk_events(20)), what="clear journaled")
        assert rt.engine_state(clock()).accounts["f1"].halted is None
        clock.set(et(11, 18, 0))
        await rt.check_risk()
        assert rt.status()["halts"] == [] and rt.status()["trading_day"] == "2026-03-12"
        again = await w.submit(signal("mirror", "buy", 1, sid="e3"))
        assert len(again.orders) == 3


async def test_flatten_and_halt_closes_every_position_and_the_halt_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock(et(11, 11, 0))
    rules = {"portfolio_loss": 300}
    async with world(tmp_path, clock=clock, rules=rules) as w:
        await w.submit(signal("mirror", "buy", 2, sid="e1"))
        await w.submit(signal("best", "buy", 1, sid="b1"))
        await w.settle()
        w.feed.set_price("MES", Decimal("4985"))  # 7 contracts x -75 = -525 < -300
        breaches = await w.runtime.check_risk()
        assert [b.scope_name for b in breaches] == [PORTFOLIO]
        await w.settle()
        state = w.runtime.engine_state(clock())
        assert all(not a.positions for a in state.accounts.values())
        assert all(a.halted for a in state.accounts.values())
        flattens = [s for s in w.journal.recent_signals(20) if s["id"].startswith("risk-portfolio-loss")]
        assert len(flattens) == 5 and all(s["reason"] for s in flattens)
    async with world(tmp_path, clock=clock, rules=rules) as w:
        rt = w.runtime
        assert PORTFOLIO in rt.risk.halts
        assert (PORTFOLIO_LIMIT, PORTFOLIO) in rt.risk.fired
        # The day's loss (7 contracts x -15 points x 5, closed, plus commissions) survives the restart.
        assert rt.risk.portfolio_pnl(rt.ruleset.accounts) <= -525
        refused = await w.submit(signal("mirror", "buy", 1, sid="e2"))
        assert refused.orders == ()
        assert rt.clear_halt(PORTFOLIO)["cleared"] == PORTFOLIO
        # Cleared, but the day is still past the limit: the engine refuses entries itself, and the next check
        # halts again without a second flatten.
        again = await w.submit(signal("mirror", "buy", 1, sid="e3"))
        assert again.orders == () and again.blocked_by == PORTFOLIO_LIMIT
        [breach] = await rt.check_risk()
        assert not breach.flatten and "flattened earlier today" in rt.risk.halts[PORTFOLIO].reason
        assert len([s for s in w.journal.recent_signals(50) if s["id"].startswith("risk-")]) == 5
        # The next trading day starts from zero.
        clock.set(et(11, 18, 0))
        await rt.check_risk()
        assert rt.risk.halts == {} and rt.risk.portfolio_pnl(rt.ruleset.accounts) == 0
        assert len((await w.submit(signal("mirror", "buy", 1, sid="e4"))).orders) == 3
        await w.settle()
        assert SENDING not in w.statuses("e4").values()
