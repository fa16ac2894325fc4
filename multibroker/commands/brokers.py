"""``multibroker brokers``: look at the configured brokers from the command line (``brokers check``)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Callable

import click

from brokers.check import BrokerCheck, check_broker, render_json, render_text
from engine.diagnostics import render_text as render_diagnostics
from engine.loader import DEFAULT_RULES_DIR, load_rules
from engine.model import Broker, RuleSet


@click.group("brokers")
def command() -> None:
    """Inspect the brokers the rules configure."""


@command.command("check")
@click.option("--rules", "rules_dir", default=DEFAULT_RULES_DIR, show_default=True, type=click.Path(path_type=str),
              help="Rules directory (or file) with the Broker and Account documents.")
@click.option("--broker", "only", multiple=True, metavar="NAME",
              help="Check only this broker (repeatable). Default: every configured broker.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=20.0, show_default=True,
              help="Seconds each broker gets for the whole check.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Paper brokers' state directory. Default: a throwaway in-memory book, so the probe's "
                   "simulated commissions never touch the real paper accounts.")
def check(rules_dir: str, only: tuple[str, ...], fmt: str, timeout_s: float, data_dir: Path | None) -> None:
    """Log in to every broker, place and cancel a far-from-market limit order, and report the timings.

    Reports per broker: login time, order acknowledgement and cancel latency, fill latency (paper only: a
    market order and its flattening), rate-limit headroom, and clock offset (broker time minus ours). Anything
    slower than 500 ms, or a clock off by more than that, is flagged. The probe trades in the first Account that
    uses each broker; without one, only the login is checked.

    Exit 0 when every broker passed, 1 when any failed, 2 when the rules do not load.

    Example: multibroker brokers check --rules rules/ --format json
    """
    result = load_rules([rules_dir])
    if result.ruleset is None:
        click.echo(render_diagnostics(result.diagnostics, len(result.files), result.documents), err=True)
        click.echo(f"multibroker brokers check: rules in {rules_dir} do not load; fix them first", err=True)
        sys.exit(2)
    ruleset = result.ruleset
    brokers = list(ruleset.brokers.values())
    if only:
        unknown = sorted(set(only) - set(ruleset.brokers))
        if unknown:
            raise click.BadParameter(f"no broker named {', '.join(unknown)} (configured: "
                                     f"{', '.join(sorted(ruleset.brokers)) or 'none'})", param_hint="--broker")
        brokers = [b for b in brokers if b.name in only]
    if not brokers:
        click.echo(f"multibroker brokers check: no Broker documents in {rules_dir}", err=True)
        sys.exit(1)

    def options_for(broker_type: str) -> dict[str, object]:
        return {"data_dir": data_dir} if broker_type == "paper" and data_dir is not None else {}

    results = asyncio.run(_run(brokers, ruleset, timeout_s, options_for))
    click.echo(render_json(results) if fmt == "json" else render_text(results))
    sys.exit(0 if all(r.ok for r in results) else 1)


async def _run(selected: list[Broker], ruleset: RuleSet, timeout_s: float,
               options_for: Callable[[str], dict[str, object]]) -> list[BrokerCheck]:
    """All brokers at once, each with the options its type needs."""
    return list(await asyncio.gather(*(
        check_broker(b, ruleset, timeout_s=timeout_s, connector_options=options_for(b.type)) for b in selected)))


__all__ = ["command"]
