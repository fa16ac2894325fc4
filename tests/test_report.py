"""``multibroker report`` on a real journal file: the hand-computed statement from test_view_performance."""

from __future__ import annotations

import csv
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.test_view_performance import FILLS


def make_journal(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE fills (broker TEXT, fill_id TEXT, account TEXT, contract TEXT, side TEXT, quantity "
                 "INTEGER, price TEXT, commission TEXT, at TEXT, client_order_id TEXT, broker_order_id TEXT, "
                 "strategy TEXT, recorded_at TEXT, data TEXT, PRIMARY KEY (broker, fill_id))")
    for i, f in enumerate(FILLS):
        broker = "paper-fast" if f.contract.startswith("MES") else "paper-slow"
        conn.execute("INSERT INTO fills VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     (broker, f"f{i}", "apex-1", f.contract, f.side, f.quantity, str(f.price), str(f.commission),
                      f.time.isoformat().replace("+00:00", "Z"), None, None, "es-scalper", "x", "{}"))
    conn.commit()
    conn.close()


def test_report_prints_table_writes_csv_and_statements(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make_journal(data / "journal.db")
    out = tmp_path / "table.csv"
    proc = subprocess.run([sys.executable, "-m", "multibroker", "report", "--from", "2026-03-09", "--to",
                           "2026-03-11", "--data", str(data), "--rules", str(REPO / "rules"), "--csv", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "apex-1" in proc.stdout and "-177.68" in proc.stdout
    with out.open() as fh:
        [header, row] = list(csv.reader(fh))
    assert header[:4] == ["account", "net", "gross", "commissions"]
    assert row[:6] == ["apex-1", "-177.68", "-175.00", "2.68", "4", "3"]
    statements = sorted((data / "statements").glob("statement-*.csv"))
    assert [p.name for p in statements] == ["statement-2026-03-09.csv", "statement-2026-03-10.csv",
                                            "statement-2026-03-11.csv"]
    with statements[1].open() as fh:
        day2 = list(csv.DictReader(fh))
    # day 2: ES loss (-250 gross) and the short MES opened (no realized P&L yet), commissions 0.59 * 2 + 0.25
    assert day2[0]["gross"] == "-250.00" and day2[0]["commissions"] == "1.43"
    assert "routing saved" in proc.stdout


def test_report_without_journal_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "multibroker", "report", "--from", "2026-03-09", "--to",
                           "2026-03-11", "--data", str(tmp_path), "--rules", str(REPO / "rules")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no journal at" in proc.stderr and "Traceback" not in proc.stderr


def test_report_bad_dates_are_usage_errors(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "multibroker", "report", "--from", "2026-13-01", "--to",
                           "2026-03-11"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a date" in proc.stderr


async def test_the_report_reads_what_the_service_journals_and_marks_open_positions_at_17_00_et(tmp_path: Path) -> None:
    """Fills and the 17:00 ET daily mark written by the real Journal; the report re-prices the position held
    overnight at that mark: buy 2 MESH6 at 6000 on Monday, marked 5990 at Monday's 17:00 ET (-100.00 open, -0.50
    commission), sold at 6010 on Tuesday: net 99.00, and the drawdown is the marked one, 100.50, not 0.50."""
    from datetime import date, datetime, timezone
    from decimal import Decimal

    from engine.loader import load_rules
    from service.journal import Journal
    from view.report import build_report, load_fills, load_marks, open_readonly

    data = tmp_path / "data"
    async with Journal(data / "journal.db") as journal:
        for fill_id, side, price, at in (("1", "buy", "6000.00", datetime(2026, 3, 9, 15, 0, tzinfo=timezone.utc)),
                                         ("2", "sell", "6010.00", datetime(2026, 3, 10, 15, 0, tzinfo=timezone.utc))):
            await journal.record_fill({"broker": "paper-fast", "fill_id": fill_id, "account": "apex-1",
                                       "contract": "MESH6", "side": side, "quantity": 2, "price": Decimal(price),
                                       "commission": Decimal("0.50"), "at": at, "strategy": "es-scalper"})
        await journal.record_daily_marks(date(2026, 3, 9), datetime(2026, 3, 9, 21, 0, tzinfo=timezone.utc),
                                         [{"account": "apex-1", "broker": "paper-fast", "equity": Decimal("49899.50")}],
                                         {"MESH6": Decimal("5990.00")})
    conn = open_readonly(data / "journal.db")
    first, last = date(2026, 3, 9), date(2026, 3, 10)
    marks, times = load_marks(conn, first, last)
    assert marks == {date(2026, 3, 9): {"MESH6": Decimal("5990.00")}}
    rules = load_rules([REPO / "rules"]).ruleset
    report = build_report(load_fills(conn, first, last), rules, marks=marks, mark_times=times)
    unmarked = build_report(load_fills(conn, first, last), rules)
    conn.close()
    apex = report.groups["apex-1"]
    assert (apex.net, apex.commissions, apex.round_turns) == (Decimal("99.00"), Decimal("1.00"), 2)  # per contract
    assert apex.max_drawdown == Decimal("100.50")
    assert apex.equity_curve == ((date(2026, 3, 9), Decimal("-100.50")), (date(2026, 3, 10), Decimal("99.00")))
    assert unmarked.groups["apex-1"].max_drawdown < apex.max_drawdown
