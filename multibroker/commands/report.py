"""``multibroker report``: performance, daily statements and the cost report, from the journal."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

import click

from engine.diagnostics import render_text as render_diagnostics
from engine.loader import DEFAULT_RULES_DIR, load_rules


def _day(ctx: click.Context, param: click.Parameter, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD, a CME trading day)") from None


@click.command("report")
@click.option("--from", "first", required=True, callback=_day, help="First trading day (YYYY-MM-DD).")
@click.option("--to", "last", required=True, callback=_day, help="Last trading day, inclusive (YYYY-MM-DD).")
@click.option("--by", type=click.Choice(["account", "strategy", "broker", "strategy_broker"]), default="account",
              show_default=True, help="How to group the figures.")
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table as CSV to this file.")
@click.option("--data", "data_dir", default="data", show_default=True, type=click.Path(path_type=Path),
              help="The service's data directory (holds journal.db).")
@click.option("--rules", "rules_dir", default=DEFAULT_RULES_DIR, show_default=True,
              help="Rules (commissions and eligible brokers for the cost report).")
@click.option("--statements", "statements_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the daily statements (default: DATA/statements).")
def command(first: date, last: date, by: str, csv_file: Path | None, data_dir: Path, rules_dir: str,
            statements_dir: Path | None) -> None:
    """Net and gross P&L, commissions, round turns, win rate, profit factor and drawdown per group.

    Days are CME trading days (a day begins at 18:00 ET the evening before). Prints the table and the cost report
    (commissions per instrument and broker, and what routing saved against the dearest eligible broker), and
    writes one CSV statement per trading day.

    Example: multibroker report --from 2026-11-02 --to 2026-11-06 --by strategy --csv week.csv
    """
    from view.report import build_report, load_fills, load_marks, open_readonly, render_csv, render_table, \
        write_statements

    if last < first:
        raise click.UsageError("--to is before --from")
    loaded = load_rules([rules_dir])
    if not loaded.ok:
        click.echo(render_diagnostics(loaded.diagnostics, len(loaded.files), loaded.documents), err=True)
        sys.exit(2)
    try:
        conn = open_readonly(data_dir / "journal.db")
    except FileNotFoundError as exc:
        click.echo(f"multibroker report: {exc}", err=True)
        sys.exit(2)
    with conn:
        fills = load_fills(conn, first, last)
        marks, mark_times = load_marks(conn, first, last)
    assert loaded.ruleset is not None  # loaded.ok
    report = build_report(fills, loaded.ruleset, by=by, marks=marks, mark_times=mark_times)
    click.echo(render_table(report) if fills else f"no fills between {first} and {last}")
    if csv_file is not None:
        csv_file.write_text(render_csv(report))
    written = write_statements(report, statements_dir or data_dir / "statements")
    if written:
        click.echo(f"{len(written)} daily statements in {written[0].parent}", err=True)
