"""``multibroker decide``: where would this signal go, given these rules and this state? (``amtool config routes
test`` for orders.) Prints the same decision record the service journals; nothing is sent anywhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from engine.evaluator import MessageError
from engine.loader import load_rules
from engine.signal import SignalError, parse_signal
from engine.state import StateError, parse_state
from engine.symbols import SymbolError


def _fail(message: str) -> None:
    click.echo(f"multibroker decide: {message}", err=True)
    sys.exit(2)


def _read(path: str, what: str) -> Any:
    """JSON or YAML (YAML is a superset of JSON, but JSON errors read better from the JSON parser)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"{what} {path}: cannot read: {exc.strerror or exc}")
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            _fail(f"{what} {path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}")
    try:
        return YAML(typ="safe").load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        _fail(f"{what} {path}{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}")


@click.command("decide")
@click.option("--rules", "rules_dir", default="rules", show_default=True, type=click.Path(path_type=str),
              help="Rules directory or file.")
@click.option("--state", "state_path", required=True, type=click.Path(path_type=str),
              help="YAML or JSON: now, accounts {NAME: {connected, free_margin, daily_pnl, positions, optional "
                   "strategies {STRATEGY: {CONTRACT: qty}}: each strategy's own position}}, optional paused, "
                   "halted, daily_pnl.")
@click.option("--signal", "signal_path", required=True, type=click.Path(path_type=str),
              help="The webhook JSON body (without its secret).")
def command(rules_dir: str, state_path: str, signal_path: str) -> None:
    """Print the decision record for SIGNAL under the rules and STATE, as JSON.

    The decision time is the state's `now` (contract months, roll and schedule are judged then). The record's
    `ruleset.content_hash` names the rules read (compare it with a journaled record's); its `generation` is null:
    only the running service numbers its reloads. Exit 0 for any decision, accepted or not; 2 for invalid rules,
    state or signal.

    Example: multibroker decide --rules rules/ --state state.yaml --signal signal.json
    """
    result = load_rules([rules_dir])
    if not result.ok or result.ruleset is None:
        shown = "\n".join(str(d) for d in result.diagnostics[:20])
        _fail(f"invalid rules in {rules_dir} ({len(result.diagnostics)} errors; run multibroker validate):\n{shown}")
        return
    try:
        now, state = parse_state(_read(state_path, "state"))
    except StateError as exc:
        _fail(f"state {state_path}: {exc}")
        return
    unknown = sorted(set(state.accounts) - set(result.ruleset.accounts))
    if unknown:
        _fail(f"state {state_path}: accounts.{unknown[0]}: no such account in the rules "
              f"(known: {', '.join(sorted(result.ruleset.accounts))})")
    try:
        signal = parse_signal(_read(signal_path, "signal"))
    except SignalError as exc:
        _fail(f"signal {signal_path}: {exc}")
        return
    from engine.decide import build_engine  # noqa: PLC0415 - keeps `multibroker --help` fast

    engine = build_engine(result.ruleset)
    try:
        decision = engine.decide(signal, state, now)
    except SymbolError as exc:
        _fail(f"signal {signal_path}: $.ticker: {exc}")
        return
    except MessageError as exc:  # a state value too large to compare exactly at this rule set's money scale
        _fail(f"state {state_path}: {exc}")
        return
    finally:
        engine.close()
    click.echo(json.dumps(decision.to_json(), indent=2))
