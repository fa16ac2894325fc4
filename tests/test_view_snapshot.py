"""The dashboard's data, built from hand-made inputs and checked against figures computed by hand.

The day book: apex-1 bought 2 MESZ6 at 6000.00 (commission 1.24) and sold 1 at 6004.00 (commission 0.62); the mark
is 6002.50; MES is $5 a point. Realized (6004 - 6000) x 1 x 5 = 20.00, commissions 1.86, open 1 at 6000.00 is
2.50 x 5 = 12.50 unrealized, so daily P&L = 20.00 - 1.86 + 12.50 = 30.64. apex-2 had a losing round turn: sold 1
at 6003.00 and bought back at 6005.00 (commission 0.62 each): -10.00 - 1.24 = -11.24.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from types import SimpleNamespace

import pytest

from engine.loader import load_rules
from service.ledger import Ledger
from service.marks import mark_rows
from tests.conftest import EXAMPLE_RULES
from view.snapshot import (account_inputs, alert_rows, attention_rows, dashboard, equity_curves, live_equity,
                           reconciliation_rows, signal_rows)

D = Decimal
NOW = datetime(2026, 11, 24, 19, 30, tzinfo=timezone.utc)
MARKS = {"MESZ6": D("6002.50")}


@pytest.fixture(scope="module")
def rules():  # type: ignore[no-untyped-def]
    result = load_rules([EXAMPLE_RULES])
    assert result.ok
    return result.ruleset


def point_value(contract: str) -> Decimal:
    assert contract.startswith("MES")
    return D(5)


def day_book() -> Ledger:
    book = Ledger()
    fills = [("f1", "apex-1", 2, "6000.00", "1.24"), ("f2", "apex-1", -1, "6004.00", "0.62"),
             ("f3", "apex-2", -1, "6003.00", "0.62"), ("f4", "apex-2", 1, "6005.00", "0.62")]
    for fill_id, account, qty, price, commission in fills:
        book.apply(fill_id=fill_id, account=account, strategy="es-scalper", contract="MESZ6", signed_qty=qty,
                   price=D(price), commission=D(commission), point_value=D(5))
    return book


def snap(cash: str, used: str, free: str) -> SimpleNamespace:
    return SimpleNamespace(cash_balance=D(cash), margin_used=D(used), free_margin=D(free))


def inputs(rules, marks=MARKS.get):  # type: ignore[no-untyped-def]
    return account_inputs(
        rules, day_book(), marks=marks, point_value=point_value,
        snapshots={"apex-1": snap("50018.14", "150.00", "49868.14"), "apex-2": snap("24988.76", "0", "24988.76")},
        free_margin={"apex-1": D("49718.14")},  # the engine's view: 150.00 reserved by an entry in flight
        connected={name: name != "topstep-1" for name in rules.accounts}, halted={"apex-2": "account-daily-loss"})


def test_account_inputs_split_the_day_book_by_account_and_strategy(rules) -> None:  # type: ignore[no-untyped-def]
    accounts, by_strategy = inputs(rules)
    a1 = next(a for a in accounts if a.name == "apex-1")
    assert (a1.realized, a1.commissions) == (D("18.14"), D("1.86"))
    assert [(p.contract, p.quantity, p.avg_price, p.mark, p.unrealized) for p in a1.positions] == [
        ("MESZ6", 1, D("6000.0000"), D("6002.50"), D("12.50"))]
    assert (a1.cash, a1.margin_used, a1.free_margin) == (D("50018.14"), D("150.00"), D("49718.14"))
    a2 = next(a for a in accounts if a.name == "apex-2")
    assert (a2.realized, a2.positions, a2.halted) == (D("-11.24"), (), "account-daily-loss")
    assert a2.free_margin == D("24988.76")  # no engine figure given: the broker's own
    t1 = next(a for a in accounts if a.name == "topstep-1")
    assert (t1.connected, t1.cash, t1.realized) == (False, D(0), D(0))
    assert by_strategy == {"es-scalper": D("6.90")}
    assert [a.name for a in accounts] == sorted(rules.accounts)


def test_an_unknown_mark_leaves_unrealized_unknown_not_zero(rules) -> None:  # type: ignore[no-untyped-def]
    accounts, _ = inputs(rules, marks=lambda contract: None)
    a1 = next(a for a in accounts if a.name == "apex-1")
    assert a1.positions[0].unrealized is None and a1.positions[0].mark is None


def test_the_dashboard_adds_up_against_limits_and_never_pools_margin(rules) -> None:  # type: ignore[no-untyped-def]
    accounts, by_strategy = inputs(rules)
    out = dashboard(rules, accounts, realized_by_strategy=by_strategy,
                    brokers=[{"name": "paper-fast", "connected": True}], halts=[{"name": "apex-2"}],
                    signals=[], reconciliations=[], marks=[], live_equity={"apex-1": D("50030.64")},
                    rules_info={"generation": 3}, now=NOW)
    a1 = next(a for a in out["portfolio"]["accounts"] if a["name"] == "apex-1")
    assert a1["daily_pnl"] == "30.64"
    assert a1["buffer_left"] == "49673.14"  # 49718.14 free - 30% of 150.00 margin used
    assert [(lim["limit"], lim["headroom"], lim["breached"]) for lim in a1["limits"]] == [
        ("account-daily-loss", "1030.64", False)]  # 2% of 50,000 = 1,000
    total = out["portfolio"]["total"]
    assert (total["daily_pnl"], total["commissions"], total["open_contracts"]) == ("19.40", "3.10", 1)
    assert total["free_margin_by_broker"]["paper-fast"] == str(D("49718.14") + D("24988.76"))
    assert "free_margin" not in total  # per broker only
    assert out["portfolio"]["limits"][0]["limit"] == "portfolio-daily-loss"
    assert out["portfolio"]["limits"][0]["headroom"] == "2519.40"
    scalper = next(g for g in out["portfolio"]["by_strategy"] if g["name"] == "es-scalper")
    assert scalper["daily_pnl"] == "19.40"
    assert out["time"] == "2026-11-24T19:30:00.000Z" and out["rules"] == {"generation": 3}


def test_equity_curves_sum_each_days_marks_and_end_with_now() -> None:
    marks = [
        {"trading_day": "2026-11-20", "account": "apex-1", "equity": "50000.00"},
        {"trading_day": "2026-11-20", "account": "apex-2", "equity": "25000.00"},
        {"trading_day": "2026-11-23", "account": "apex-1", "equity": "50100.00"},
        {"trading_day": "2026-11-23", "account": "apex-2", "equity": "24950.00"},
        {"trading_day": "2026-11-23", "account": "ghost", "equity": None},
    ]
    curves = equity_curves(marks, {"apex-1": D("50030.64"), "apex-2": D("24988.76")}, NOW)
    now = "2026-11-24T19:30:00.000Z"
    assert curves == {
        "apex-1": [["2026-11-20", "50000.00"], ["2026-11-23", "50100.00"], [now, "50030.64"]],
        "apex-2": [["2026-11-20", "25000.00"], ["2026-11-23", "24950.00"], [now, "24988.76"]],
        "portfolio": [["2026-11-20", "75000.00"], ["2026-11-23", "75050.00"], [now, "75019.40"]],
    }
    assert equity_curves([]) == {}


def test_live_equity_and_the_daily_mark_value_accounts_the_same_way(rules) -> None:  # type: ignore[no-untyped-def]
    ledger = day_book()
    equity = live_equity(rules, ledger, MARKS.get, point_value)
    assert equity["apex-1"] == D("50030.64") and equity["apex-2"] == D("24988.76")
    assert equity["swing-1"] == D("100000.00")  # nothing traded: its capital
    rows, prices = mark_rows(rules, ledger, marks=MARKS.get, point_value=point_value,
                             snapshots={"apex-1": snap("50018.14", "150.00", "49868.14")})
    a1 = next(r for r in rows if r["account"] == "apex-1")
    assert (a1["equity"], a1["realized"], a1["unrealized"], a1["commissions"]) == (
        D("50030.64"), D("20.00"), D("12.50"), D("1.86"))
    assert (a1["cash"], a1["margin_used"], a1["broker"]) == (D("50018.14"), D("150.00"), "paper-fast")
    assert next(r for r in rows if r["account"] == "apex-2")["cash"] is None
    assert prices == {"MESZ6": D("6002.50")}


def test_signal_and_reconciliation_rows_explain_themselves() -> None:
    decision = {"accepted": True, "rule": "mirror-scalper", "orders": [{"account": "apex-1"}], "skipped": []}
    rows = signal_rows([{"id": "s1", "received_at": "2026-11-24T19:00:00.000Z", "status": "accepted",
                         "reason": None, "strategy": "es-scalper",
                         "signal": {"strategy": "es-scalper", "action": "buy", "ticker": "MES1!"},
                         "decision": decision},
                        {"id": "s2", "received_at": "2026-11-24T19:01:00.000Z", "status": "rejected",
                         "reason": "401 bad secret", "strategy": None, "signal": None, "decision": None}])
    assert rows[0] == {"signal_id": "s1", "received_at": "2026-11-24T19:00:00.000Z", "status": "accepted",
                       "reason": None, "strategy": "es-scalper", "action": "buy", "ticker": "MES1!",
                       "decision": decision}
    assert (rows[1]["status"], rows[1]["reason"], rows[1]["action"]) == ("rejected", "401 bad secret", None)
    recon = reconciliation_rows([
        {"at": "t", "broker": "paper-fast", "account": "apex-1", "ok": True, "mismatches": []},
        {"at": "t", "broker": "paper-slow", "account": "topstep-1", "ok": False, "policy": "halt",
         "mismatches": [{"contract": "MESZ6", "ledger": 2, "broker": 1}]}])
    assert recon[0]["ok"] is True and recon[0]["detail"] is None
    assert recon[1] == {"time": "t", "broker": "paper-slow", "account": "topstep-1", "ok": False,
                        "detail": "MESZ6: ours 2, broker 1", "policy": "halt"}


def test_attention_rows_say_what_each_failed_order_means() -> None:
    base = {"signal_id": "s1", "account": "apex-1", "broker": "paper-fast", "contract": "MESZ6", "side": "sell",
            "quantity": 2, "updated_at": "2026-11-24T20:55:00.000Z"}
    rows = attention_rows([
        {**base, "client_order_id": "mb-1", "intent": "exit", "status": "rejected", "detail": "SessionClosed"},
        {**base, "client_order_id": "mb-2", "intent": "entry", "status": "missed",
         "detail": {"reason": "broker paper-fast down or paused at dispatch"}},
        {**base, "client_order_id": "mb-3", "intent": "entry", "status": "rejected", "detail": None},
        {**base, "client_order_id": "mb-4", "intent": "entry", "status": "unknown", "detail": None}])
    assert [(r["client_order_id"], r["exit"]) for r in rows] == [("mb-1", True), ("mb-2", False), ("mb-3", False),
                                                                  ("mb-4", False)]
    assert "position may still be open" in rows[0]["meaning"] and rows[0]["detail"] == "SessionClosed"
    assert "behind its strategy" in rows[1]["meaning"] and "down or paused" in rows[1]["detail"]
    assert "refused by the broker" in rows[2]["meaning"] and rows[2]["detail"] is None
    assert rows[3]["meaning"].startswith("outcome unknown")
    assert rows[0]["time"] == "2026-11-24T20:55:00.000Z" and rows[0]["quantity"] == 2


def test_alert_rows_keep_what_a_trader_must_see() -> None:
    rows = alert_rows([{"at": "t2", "kind": "flatten_failed", "name": "apex-1", "reason": "r", "source": "flatten:f"},
                       {"at": "t1", "kind": "day_start", "name": "portfolio", "reason": "marks", "source": "risk"},
                       {"at": "t0", "kind": "adopt", "name": "apex-2", "reason": "adopted", "source": "recon"}])
    assert [(r["kind"], r["name"], r["time"]) for r in rows] == [("flatten_failed", "apex-1", "t2"),
                                                                  ("adopt", "apex-2", "t0")]
