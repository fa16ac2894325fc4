"""Loss limits restricted to roots (``instrument: [ES, MES]``): their breach halts, and for ``flatten_and_halt``
flattens, only those roots of the account (or of every account, for a portfolio limit), as the engine measures
them; the halt has its own key (``a1:ES,MES``) next to an account-wide one, is journaled with its roots, survives a
restart and is cleared on its own."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from engine.model import Account, Limit, Location
from service.dispatch import FILLED
from service.ledger import Ledger
from service.risk import PORTFOLIO, RiskMonitor, halt_key
from tests.harness.runtime import (BROKERS, Clock, account_doc, documents, routing_doc, signal, wait_until,
                                  world)

ET = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")


def et(day: int, hh: int, mm: int) -> datetime:
    return datetime(2026, 3, day, hh, mm, tzinfo=ET).astimezone(UTC)


# -- the monitor, pure ----------------------------------------------------------------------------------------------

def limit(name: str, scope: str, usd: int, instruments: tuple[str, ...] | None = None,
          on_breach: str = "halt_entries") -> Limit:
    return Limit(name=name, scope=scope, max_daily_loss=Decimal(usd), max_daily_loss_pct=None, max_contracts=None,
                 instruments=instruments, accounts=None, on_breach=on_breach, risk="limits",
                 source=Location("t", 1, 1))


def account(name: str) -> Account:
    return Account(name=name, broker="b", broker_account=name.upper(), capital=Decimal(10000),
                   strategies=("s",), size_multiplier=Decimal(1), instruments=None, catch_up=False,
                   on_mismatch="adopt", source=Location("t", 1, 1))  # type: ignore[call-arg]


def losing_monitor() -> RiskMonitor:
    """Accounts a and b, each down 300 USD today (one MES contract bought at 5000, marked 4940)."""
    prices = {"MESH6": Decimal("4940")}
    ledger = Ledger()
    monitor = RiskMonitor(prices.get, lambda c: Decimal(5))
    monitor.roll(et(11, 9, 0), ledger)
    for i, name in enumerate(("a", "b")):
        monitor.apply_fill(fill_id=str(i), account=name, strategy="s", contract="MESH6", signed_qty=1,
                           price=Decimal(5000), commission=Decimal(0), at=et(11, 10, 0))
    return monitor


def test_a_scoped_breach_carries_its_roots_and_halts_only_them() -> None:
    monitor = losing_monitor()
    accounts = {"a": account("a")}
    limits = [limit("es-loss", "account", 250, ("MES", "ES")), limit("acct-loss", "account", 400)]
    [breach] = monitor.breaches(limits, accounts)
    assert breach.limit.name == "es-loss" and breach.instruments == ("ES", "MES") and breach.key == "a:ES,MES"
    assert breach.accounts == ("a",) and "[ES, MES entries only]" in breach.reason
    halt = monitor.halt("a", breach.reason, "risk:es-loss", et(11, 12, 0), instruments=breach.instruments)
    assert halt.key == "a:ES,MES" and set(monitor.halts) == {"a:ES,MES"}
    assert monitor.halted("a") is None  # no account-wide halt
    assert monitor.halted("a", "ES") == monitor.halted("a", "MES") == breach.reason
    assert monitor.halted("a", "CL") is None and monitor.halted("b", "ES") is None
    assert monitor.halted_instruments("a") == {"ES": breach.reason, "MES": breach.reason}
    assert monitor.breaches(limits, accounts) == []  # halted under its key: no second breach
    assert halt.as_dict() == {"name": "a:ES,MES", "scope": "a", "instruments": ["ES", "MES"],
                              "reason": breach.reason, "source": "risk:es-loss", "day": "2026-03-11",
                              "since": "2026-03-11T16:00:00Z"}


def test_an_account_wide_and_a_scoped_halt_coexist_and_clear_on_their_own() -> None:
    monitor = losing_monitor()
    accounts = {"a": account("a")}
    # The account-wide halt (a reconciliation mismatch) does not suppress the scoped limit: its flatten must happen.
    monitor.halt("a", "reconciliation mismatch", "reconciliation", et(11, 11, 0), until_day_end=False)
    [breach] = monitor.breaches([limit("es-loss", "account", 250, ("ES", "MES"), "flatten_and_halt")], accounts)
    monitor.halt("a", breach.reason, "risk:es-loss", et(11, 12, 0), instruments=breach.instruments)
    assert set(monitor.halts) == {"a", "a:ES,MES"}
    assert monitor.halted("a", "CL") == "reconciliation mismatch"  # account-wide first
    assert monitor.clear("a") is not None
    assert monitor.halted("a", "CL") is None and monitor.halted("a", "ES") == breach.reason
    assert monitor.clear("a:MES, ES") is not None  # roots in any order name the same halt
    assert monitor.halts == {}
    monitor.halt("a", "x", "operator", et(11, 12, 0), instruments=["ES"])
    monitor.roll(et(11, 18, 0), Ledger())
    assert monitor.halts == {}  # a scoped halt lifts with the trading day, like the others


def test_a_scoped_portfolio_limit_halts_those_roots_for_every_account() -> None:
    monitor = losing_monitor()
    accounts = {"a": account("a"), "b": account("b")}
    [breach] = monitor.breaches([limit("port-es", PORTFOLIO, 500, ("ES",))], accounts)  # -600 together
    assert breach.scope_name == PORTFOLIO and breach.key == "portfolio:ES" and breach.accounts == ("a", "b")
    monitor.halt(PORTFOLIO, breach.reason, "risk:port-es", et(11, 12, 0), instruments=breach.instruments)
    for name in ("a", "b"):
        assert monitor.halted(name) is None and monitor.halted(name, "MES") is None
        assert monitor.halted(name, "ES") == breach.reason
    # An account's own scoped halt comes before the portfolio's for the same root.
    monitor.halt("a", "own", "operator", et(11, 12, 0), instruments=["ES"])
    assert monitor.halted_instruments("a") == {"ES": "own"} and monitor.halted_instruments("b") == {"ES": breach.reason}
    assert halt_key("a", []) == "a" and halt_key("a", ["MES", "ES", "ES"]) == "a:ES,MES"


# -- through the runtime, against paper brokers --------------------------------------------------------------------

ACCOUNT = documents(
    account_doc("a1", "fast", "A-1", "mirror", instruments=None),
    account_doc("a2", "slow", "A-2", "other", instruments=None),
)

ROUTING = routing_doc("mirror", "other")

RISK = """
kind: Risk
name: limits
margin_buffer_pct: 0
limits:
  - name: es-loss
    scope: account
    instrument: [MES, ES]
    max_daily_loss: 500
    on_breach: {on_breach}
  - name: account-loss
    scope: account
    max_daily_loss: 5000
    on_breach: halt_entries
"""


def write_rules(directory: Path, on_breach: str) -> Path:
    """One account a1 trading ES and CL (strategy mirror), one bystander a2 also holding ES (strategy other), an
    ES/MES-only loss limit of 500 and an account-wide one of 5000."""
    directory.mkdir(parents=True, exist_ok=True)
    brokers = BROKERS.format(fast_ms=0, slow_ms=0, fill_ms=0, slow_rate=1000, reconcile=3600).replace(
        "margins: {MES: 50, default: 1000}", "margins: {MES: 50, ES: 500, CL: 500, default: 1000}").replace(
        "margins: {MES: 40, default: 800}", "margins: {MES: 40, ES: 500, CL: 500, default: 800}")
    (directory / "brokers.yaml").write_text(brokers)
    (directory / "accounts.yaml").write_text(ACCOUNT)
    (directory / "routing.yaml").write_text(ROUTING)
    (directory / "risk.yaml").write_text(RISK.format(on_breach=on_breach))
    return directory


def es(action: str, quantity: int | None = None, sid: str | None = None, strategy: str = "mirror") -> dict[str, Any]:
    return signal(strategy, action, quantity, sid=sid, ticker="ES1!")


def cl(action: str, quantity: int | None = None, sid: str | None = None) -> dict[str, Any]:
    return signal("mirror", action, quantity, sid=sid, ticker="CL1!")


async def open_es_and_cl(w: Any) -> None:
    """a1: long 2 ES and 1 CL; a2: long 1 ES; then ES falls 20 points (a1: -2000, a2: -1000)."""
    w.feed.set_price("ES", Decimal("6000"))
    w.feed.set_price("CL", Decimal("70"))
    assert len((await w.submit(es("buy", 2, sid="es1"))).orders) == 1
    assert len((await w.submit(cl("buy", 1, sid="cl1"))).orders) == 1
    assert len((await w.submit(es("buy", 1, sid="o1", strategy="other"))).orders) == 1
    await w.settle()
    w.feed.set_price("ES", Decimal("5980"))


def same_market(w: Any) -> None:
    """After a restart (a new feed): the prices the last process left, ES 5980 and CL 74."""
    w.feed.set_price("ES", Decimal("5980"))
    w.feed.set_price("CL", Decimal("74"))


def roots_held(w: Any, account: str) -> dict[str, int]:
    positions = w.runtime.engine_state(w.clock()).accounts[account].positions
    return {c[:-2]: q for c, q in positions.items() if q}


async def test_flatten_and_halt_of_an_es_limit_flattens_es_only_and_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock(et(11, 11, 0))
    rules_dir = write_rules(tmp_path / "rules", "flatten_and_halt")
    async with world(tmp_path, clock=clock, rules_dir=rules_dir) as w:
        rt = w.runtime
        await open_es_and_cl(w)
        await rt.check_risk()
        await w.settle()
        # a1 breached its ES limit (a2 lost 1000 as well: its own ES limit flattens its ES, nothing else of a1's).
        assert set(rt.risk.halts) == {"a1:ES,MES", "a2:ES,MES"}
        assert roots_held(w, "a1") == {"CL": 1} and roots_held(w, "a2") == {}
        flatten = w.journal.get_signal("risk-es-loss-2026-03-11-a1")
        assert flatten is not None and [(o["contract"][:-2], o["side"], o["quantity"]) for o in flatten["orders"]] \
            == [("ES", "sell", 2)]
        [event] = [e for e in w.journal.risk_events(20) if e["kind"] == "halt" and e["name"] == "a1"]
        assert event["instruments"] == ["ES", "MES"] and event["key"] == "a1:ES,MES" and event["limit"] == "es-loss"
        halts = {h["name"]: h for h in rt.status()["halts"]}
        assert halts["a1:ES,MES"]["instruments"] == ["ES", "MES"] and halts["a1:ES,MES"]["scope"] == "a1"
        state = rt.engine_state(clock()).accounts["a1"]
        assert state.halted is None and set(state.halted_instruments) == {"ES", "MES"}
        # CL recovers the day (+4000): the engine's own ES limit no longer trips, the halt alone refuses ES.
        w.feed.set_price("CL", Decimal("74"))
        await rt.check_risk()
        assert rt.risk.daily_pnl("a1") > 0
        refused = await w.submit(es("buy", 1, sid="es2"))
        assert refused.orders == () and [(s.account, s.by) for s in refused.skipped] == [("a1", "halted")]
        assert refused.skipped[0].reason.startswith("ES entries halted: es-loss [ES, MES entries only]")
        accepted = await w.submit(cl("buy", 1, sid="cl2"))
        assert [(o.account, o.intent) for o in accepted.orders] == [("a1", "entry")]
        await w.settle()
    async with world(tmp_path, clock=clock, rules_dir=rules_dir) as w:
        rt = w.runtime
        same_market(w)  # a new process, the same market (the day's P&L counts from the day's marks, not the feed's)
        await rt.check_risk()
        assert rt.risk.daily_pnl("a1") > 0  # the ES loss and the CL gain both survived the restart
        assert {"a1:ES,MES", "a2:ES,MES"} <= set(rt.risk.halts) and rt.risk.halts["a1:ES,MES"].instruments == (
            "ES", "MES")
        assert "a1" not in rt.risk.halts
        assert {("es-loss", "a1:ES,MES"), ("es-loss", "a2:ES,MES")} <= rt.risk.fired
        refused = await w.submit(es("buy", 1, sid="es3"))
        assert [(s.account, s.by) for s in refused.skipped] == [("a1", "halted")]
        assert len((await w.submit(cl("buy", 1, sid="cl3"))).orders) == 1
        assert rt.clear_halt("a1:MES,ES")["cleared"] == "a1:ES,MES"
        await wait_until(lambda: any(e["kind"] == "clear" for e in w.journal.risk_events(20)), what="clear journaled")
        assert [(o.account, o.intent) for o in (await w.submit(es("buy", 1, sid="es4"))).orders] == [("a1", "entry")]
        await w.settle()
    async with world(tmp_path, clock=clock, rules_dir=rules_dir) as w:
        same_market(w)
        # Cleared stays cleared across a restart; a2's halt, never cleared, is still there.
        assert "a1:ES,MES" not in w.runtime.risk.halts and "a2:ES,MES" in w.runtime.risk.halts
        # a1 is back above its ES limit with its halt cleared: the limit re-arms (a new crossing flattens again).
        await w.runtime.check_risk()
        assert ("es-loss", "a1:ES,MES") not in w.runtime.risk.fired and "a1:ES,MES" not in w.runtime.risk.halts
        assert any(e["kind"] == "rearm" and e["key"] == "a1:ES,MES" for e in w.journal.risk_events(50))


async def test_halt_entries_of_an_es_limit_keeps_es_exits_and_cl_and_coexists_with_an_account_halt(
        tmp_path: Path) -> None:
    clock = Clock(et(11, 11, 0))
    async with world(tmp_path, clock=clock, rules_dir=write_rules(tmp_path / "rules", "halt_entries")) as w:
        rt = w.runtime
        await open_es_and_cl(w)
        await rt.check_risk()
        assert {"a1:ES,MES"} <= set(rt.risk.halts) and "a1" not in rt.risk.halts
        assert roots_held(w, "a1") == {"ES": 2, "CL": 1}  # halt_entries flattens nothing
        row = {r["name"]: r for r in rt.accounts()}["a1"]
        reason = rt.risk.halts["a1:ES,MES"].reason
        assert row["halted"] is None and row["halted_instruments"] == {"ES": reason, "MES": reason}
        assert len((await w.submit(cl("buy", 1, sid="cl2"))).orders) == 1
        assert [s.by for s in (await w.submit(es("buy", 1, sid="es2"))).skipped] == ["halted"]
        out = await w.submit(es("exit", sid="x1"))
        assert [(o.account, o.intent, o.quantity) for o in out.orders] == [("a1", "exit", 2)]
        await w.settle()
        assert set(w.statuses("x1").values()) == {FILLED} and roots_held(w, "a1") == {"CL": 2}
        # CL falls 2 (-4000 on 2): the account-wide limit trips too; both halts are listed and hold.
        w.feed.set_price("CL", Decimal("68"))
        await rt.check_risk()
        assert {"a1", "a1:ES,MES"} <= {h["name"] for h in rt.status()["halts"]}
        blocked = await w.submit(cl("buy", 1, sid="cl3"))
        assert [s.by for s in blocked.skipped] == ["halted"] and blocked.skipped[0].reason.startswith(
            "account halted: account-loss")
        # CL recovers; the operator clears the account-wide halt: CL trades again, ES stays halted.
        w.feed.set_price("CL", Decimal("74"))
        await rt.check_risk()
        assert rt.clear_halt("a1")["cleared"] == "a1"
        assert len((await w.submit(cl("buy", 1, sid="cl4"))).orders) == 1
        assert [s.by for s in (await w.submit(es("buy", 1, sid="es3"))).skipped] == ["halted"]
        assert rt.clear_halt("a1:ES,MES")["halt"]["instruments"] == ["ES", "MES"]
        assert len((await w.submit(es("buy", 1, sid="es4"))).orders) == 1
        await w.settle()
