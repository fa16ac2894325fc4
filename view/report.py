"""Reports from the journal: performance by account/strategy/broker, daily statements and the cost report.

Reads the journal's SQLite file read-only, so a report can run while the service writes. The numbers come from
``view.performance``; this module only selects rows by CME trading day and lays them out.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from engine.model import RuleSet
from engine.sessions import trading_day
from view.performance import CostLine, FillRecord, Performance, cost_report, performance

ZERO = Decimal(0)


def open_readonly(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FileNotFoundError(f"no journal at {path} (run `multibroker serve` first, or pass --data)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"journal time {text!r} has no offset")
    return value


def load_fills(conn: sqlite3.Connection, first: date, last: date) -> list[FillRecord]:
    """Fills whose CME trading day lies in [first, last]."""
    rows = conn.execute("SELECT * FROM fills WHERE at IS NOT NULL ORDER BY at, recorded_at").fetchall()
    out = []
    for r in rows:
        at = _parse_time(r["at"])
        if not first <= trading_day(at) <= last:
            continue
        out.append(FillRecord(
            account=r["account"] or "?", strategy=r["strategy"] or "(none)", broker=r["broker"],
            contract=r["contract"], side=r["side"], quantity=int(r["quantity"]), price=Decimal(r["price"]),
            commission=Decimal(r["commission"] or "0"), time=at))
    return out


def load_marks(conn: sqlite3.Connection, first: date, last: date) -> tuple[dict[date, dict[str, Decimal]], dict[date, datetime]]:
    """Mark prices of every contract at each trading day's 17:00 ET mark (from ``daily_marks``)."""
    if "daily_marks" not in _tables(conn):
        return {}, {}
    marks: dict[date, dict[str, Decimal]] = defaultdict(dict)
    times: dict[date, datetime] = {}
    for r in conn.execute("SELECT trading_day, at, marks FROM daily_marks WHERE trading_day BETWEEN ? AND ?",
                          (first.isoformat(), last.isoformat())):
        day = date.fromisoformat(r["trading_day"])
        times[day] = _parse_time(r["at"])
        for contract, price in (json.loads(r["marks"] or "{}") or {}).items():
            marks[day][contract] = Decimal(str(price))
    return dict(marks), times


@dataclass(frozen=True)
class Report:
    by: str
    groups: Mapping[str, Performance]
    statements: Mapping[date, Mapping[str, Performance]]
    """Per trading day, per account: that day's figures."""
    costs: Sequence[CostLine]


def build_report(fills: Sequence[FillRecord], rules: RuleSet, *, by: str = "account",
                 marks: Mapping[date, Mapping[str, Decimal]] | None = None,
                 mark_times: Mapping[date, datetime] | None = None) -> Report:
    catalog = rules.catalog
    groups = performance(fills, catalog, marks=marks, mark_times=mark_times, by=by)
    per_day: dict[date, list[FillRecord]] = defaultdict(list)
    for f in fills:
        per_day[trading_day(f.time)].append(f)
    statements = {day: performance(day_fills, catalog, by="account") for day, day_fills in sorted(per_day.items())}

    def commission_of(broker: str, root: str) -> Decimal | None:
        doc = rules.brokers.get(broker)
        return doc.commission(root) if doc else None

    def eligible(fill: FillRecord) -> Iterable[str]:
        brokers = {a.broker for a in rules.accounts.values()
                   if fill.strategy in a.strategies and (a.instruments is None or fill.root in a.instruments)}
        return sorted(brokers | {fill.broker})

    return Report(by, groups, statements, cost_report(fills, commission_of, eligible))


COLUMNS = ["group", "net", "gross", "commissions", "round_turns", "trades", "win_rate", "profit_factor", "max_drawdown"]


def _row(name: str, p: Performance) -> list[str]:
    return [name, str(p.net), str(p.gross), str(p.commissions), str(p.round_turns), str(p.trades),
            "-" if p.win_rate is None else f"{p.win_rate * 100:.1f}%",
            "-" if p.profit_factor is None else str(p.profit_factor), str(p.max_drawdown)]


def render_table(report: Report) -> str:
    rows = [[report.by, *COLUMNS[1:]]] + [_row(name, p) for name, p in report.groups.items()]
    if report.groups:
        total_net = sum((p.net for p in report.groups.values()), ZERO)
        total_comm = sum((p.commissions for p in report.groups.values()), ZERO)
        rows.append(["total", str(total_net), str(total_net + total_comm), str(total_comm), "", "", "", "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if report.costs:
        lines += ["", "commissions by instrument and broker (vs the dearest eligible broker for the same fills)"]
        cost_rows = [["root", "broker", "contracts", "commissions", "dearest", "at dearest", "saved"]] + [
            [c.root, c.broker, str(c.contracts), str(c.commissions), c.dearest_broker, str(c.dearest_commissions),
             str(c.saved)] for c in report.costs]
        cw = [max(len(r[i]) for r in cost_rows) for i in range(7)]
        lines += ["  ".join(c.ljust(w) if i in (0, 1, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, cw)))
                  for r in cost_rows]
        lines.append(f"routing saved {sum((c.saved for c in report.costs), ZERO)} USD in commissions")
    return "\n".join(lines)


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([report.by, *COLUMNS[1:]])
    for name, p in report.groups.items():
        writer.writerow([name, p.net, p.gross, p.commissions, p.round_turns, p.trades,
                         "" if p.win_rate is None else p.win_rate, "" if p.profit_factor is None else p.profit_factor,
                         p.max_drawdown])
    return buffer.getvalue()


def write_statements(report: Report, directory: Path) -> list[Path]:
    """One CSV statement per trading day: each account's fills-based figures for that day."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for day, accounts in report.statements.items():
        path = directory / f"statement-{day.isoformat()}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["trading_day", "account", "gross", "commissions", "net", "round_turns", "trades"])
            for account, p in accounts.items():
                writer.writerow([day.isoformat(), account, p.gross, p.commissions, p.net, p.round_turns, p.trades])
        written.append(path)
    return written
