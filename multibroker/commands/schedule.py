"""``multibroker schedule``: what the Schedule rules will do, and when, before they do it."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import click

from engine.loader import DEFAULT_RULES_DIR, load_rules
from engine.schedule import firings


def _instant(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """ISO-8601 with a UTC offset (``Z`` or ``-05:00``); a naive time is refused rather than guessed."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time (e.g. 2026-03-09T00:00:00Z)") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise click.BadParameter(f"{value!r} has no UTC offset; write it as {parsed.isoformat()}Z (UTC) or "
                                 f"{parsed.isoformat()}-05:00 (EST) / -04:00 (EDT)")
    return parsed


@click.command("schedule")
@click.option("--rules", "rules_dir", default=DEFAULT_RULES_DIR, show_default=True, type=click.Path(path_type=str),
              help="Rules directory (or file) to read the Schedule documents from.")
@click.option("--from", "start", required=True, callback=_instant, metavar="ISO",
              help="Window start, included (ISO-8601 with offset).")
@click.option("--to", "end", required=True, callback=_instant, metavar="ISO",
              help="Window end, excluded (ISO-8601 with offset).")
def command(rules_dir: str, start: datetime, end: datetime) -> None:
    """Print every schedule firing in [--from, --to), one JSON object per line, in time order.

    Each line is {"rule", "action", "at" (UTC), "at_et" (America/New_York with its offset)}. A `between` or
    block `before_close` window gives two lines: "block_entries" at its start and "end_block_entries" at its end.
    `before_close` follows the CME session calendar (early closes included, nothing on holidays). Exit 0 on
    success, 2 on invalid rules or arguments.

    Example: multibroker schedule --rules rules --from 2026-11-23T00:00:00-05:00 --to 2026-11-28T00:00:00-05:00
    """
    if end <= start:
        raise click.BadParameter(f"--to {end.isoformat()} is not after --from {start.isoformat()}",
                                 param_hint="'--to'")
    result = load_rules([rules_dir])
    if result.ruleset is None:
        for diagnostic in result.diagnostics:
            click.echo(str(diagnostic), err=True)
        click.echo(f"multibroker schedule: {rules_dir}: the rules are invalid ({len(result.diagnostics)} "
                   "error(s)); nothing to schedule", err=True)
        sys.exit(2)
    for firing in firings(result.ruleset.schedule_rules, start, end):
        click.echo(json.dumps(firing.to_json()))
