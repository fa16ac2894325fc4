"""Performance figures against a hand-computed statement: three trades over three days, one of them a losing day.

Account A trades MES (point value 5 USD) and ES (50 USD), commissions per side 0.25 (MES) and 0.59 (ES):
  day 1  buy 2 MESH6 @ 5000.00, sell 2 @ 5010.00      gross +100.00, commissions 1.00, net  +99.00   (win)
  day 2  buy 1 ESH6 @ 5020.00, sell 1 @ 5015.00       gross -250.00, commissions 1.18, net -251.18   (loss)
         sell 1 MESH6 @ 5015.00 (stays open; mark 5012.00 => unrealized +15.00; commission 0.25)
  day 3  buy 1 MESH6 @ 5020.00 (closes the short)     gross  -25.00, commissions 0.50, net  -25.50   (loss)
Totals: gross -175.00, commissions 2.68, net -177.68; 4 round turns; 3 trades, 1 win; win rate 0.3333;
profit factor 99.00 / 276.68 = 0.36. Equity at the marks: 99.00, -137.43, -177.68; max drawdown 276.68.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from decimal import Decimal as D

import pytest

from engine.catalog import Catalog
from view.performance import FillRecord, cost_report, max_drawdown, performance


def fill(day: int, hour: int, contract: str, side: str, qty: int, price: str, commission: str,
         account: str = "A", strategy: str = "s1", broker: str = "b1") -> FillRecord:
    return FillRecord(account, strategy, broker, contract, side, qty, D(price), D(commission),
                      datetime(2026, 3, 8 + day, hour, 0, tzinfo=timezone.utc))


FILLS = [
    fill(1, 15, "MESH6", "buy", 2, "5000.00", "0.50"),
    fill(1, 16, "MESH6", "sell", 2, "5010.00", "0.50"),
    fill(2, 15, "ESH6", "buy", 1, "5020.00", "0.59"),
    fill(2, 16, "ESH6", "sell", 1, "5015.00", "0.59"),
    fill(2, 17, "MESH6", "sell", 1, "5015.00", "0.25"),
    fill(3, 15, "MESH6", "buy", 1, "5020.00", "0.25"),
]
MARKS = {date(2026, 3, 9): {"MESH6": D("5010")}, date(2026, 3, 10): {"MESH6": D("5012"), "ESH6": D("5015")},
         date(2026, 3, 11): {"MESH6": D("5020")}}


def test_statement_matches_hand_computation() -> None:
    perf = performance(FILLS, Catalog(), marks=MARKS, by="account")["A"]
    assert perf.gross == D("-175.00")
    assert perf.commissions == D("2.68")
    assert perf.net == D("-177.68")
    assert perf.round_turns == 4
    assert (perf.trades, perf.wins, perf.losses) == (3, 1, 2)
    assert perf.win_rate == D("0.3333")
    assert perf.profit_factor == D("0.36")
    assert [v for _, v in perf.equity_curve] == [D("99.00"), D("-137.43"), D("-177.68")]
    assert perf.max_drawdown == D("276.68")


def test_grouping_by_strategy_and_broker_splits_the_same_fills() -> None:
    other = [fill(1, 18, "MESH6", "buy", 1, "5000", "0.20", account="B", strategy="s2", broker="b2"),
             fill(1, 19, "MESH6", "sell", 1, "5001", "0.20", account="B", strategy="s2", broker="b2")]
    by_strategy = performance(FILLS + other, Catalog(), by="strategy")
    assert by_strategy["s2"].net == D("5") - D("0.40")
    assert by_strategy["s1"].net == D("-177.68")
    combo = performance(FILLS + other, Catalog(), by="strategy_broker")
    assert set(combo) == {"s1@b1", "s2@b2"}
    total = performance(FILLS + other, Catalog(), by="all")["portfolio"]
    assert total.net == D("-177.68") + D("4.60")


def test_partial_close_and_flip_through_zero() -> None:
    fills = [fill(1, 15, "MESH6", "buy", 3, "100", "0"), fill(1, 16, "MESH6", "sell", 5, "102", "0"),
             fill(1, 17, "MESH6", "buy", 2, "101", "0")]
    perf = performance(fills, Catalog(), by="account")["A"]
    # long 3 closed at +2 points (3*2*5 = 30), short 2 opened at 102 and closed at 101 (+1*2*5 = 10)
    assert perf.gross == D("40") and perf.round_turns == 5 and perf.trades == 1


def test_no_losing_trade_means_no_profit_factor() -> None:
    perf = performance(FILLS[:2], Catalog(), by="account")["A"]
    assert perf.profit_factor is None and perf.win_rate == D("1.0000")


def test_max_drawdown_is_peak_to_trough() -> None:
    assert max_drawdown([D(0), D(10), D(-5), D(20), D(15)]) == D(15)
    assert max_drawdown([]) == D(0)
    assert max_drawdown([D(-10), D(-5)]) == D(10)  # a period that opens with a loss starts in drawdown


def test_naive_fill_time_is_refused() -> None:
    with pytest.raises(ValueError):
        FillRecord("A", "s", "b", "MESH6", "buy", 1, D(1), D(0), datetime(2026, 3, 9, 15))


def test_cost_report_shows_what_routing_saved() -> None:
    rates = {("cheap", "MES"): D("0.20"), ("dear", "MES"): D("0.37")}
    fills = [fill(1, 15, "MESH6", "buy", 2, "5000", "0.40", broker="cheap"),
             fill(1, 16, "MESH6", "sell", 2, "5001", "0.40", broker="cheap")]
    [line] = cost_report(fills, lambda b, r: rates.get((b, r)), lambda f: ["cheap", "dear"])
    assert (line.root, line.broker, line.contracts, line.commissions) == ("MES", "cheap", 4, D("0.80"))
    assert line.dearest_broker == "dear" and line.dearest_commissions == D("1.48") and line.saved == D("0.68")
