"""Small, explicit rule files for the decision tests, loaded through the real loader (as a trader writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.decide import Engine
from engine.loader import load_rules
from engine.model import RuleSet
from engine.signal import parse_signal
from engine.state import parse_state

RULES = """\
kind: Broker
name: fast
type: paper
commissions: {MES: 0.25, ES: 0.59, default: 0.79}
margins: {MES: 100, ES: 1000, default: 1000}
---
kind: Broker
name: cheap
type: paper
commissions: {MES: 0.20, default: 0.60}
margins: {MES: 150, default: 2000}
---
kind: Broker
name: nomargin
type: paper
commissions: {default: 0.10}
---
kind: Account
name: a1
broker: fast
broker_account: A1
capital: 10000            # 2% daily loss limit: 200
strategies: [scalp]
instruments: [ES, MES]
---
kind: Account
name: a2
broker: fast
broker_account: A2
capital: 10000
strategies: [scalp]
size_multiplier: 0.5
---
kind: Account
name: a3
broker: fast
broker_account: A3
capital: 10000
strategies: [scalp]
size_multiplier: 0.25
---
kind: Account
name: a4
broker: fast
broker_account: A4
capital: 10000
strategies: [scalp]
size_multiplier: 0
---
kind: Account
name: b1
broker: cheap
broker_account: B1
capital: 20000
strategies: [trend]
---
kind: Account
name: b2
broker: fast
broker_account: B2
capital: 20000
strategies: [trend]
---
kind: Account
name: b3
broker: fast
broker_account: B3
capital: 20000
strategies: [trend]
---
kind: Account
name: n1
broker: nomargin
broker_account: N1
capital: 20000
strategies: [odd]
---
kind: Routing
name: main
rules:
  - name: mirror-scalp
    match: {strategy: scalp}
    mode: mirror
    accounts: [a1, a2, a3, a4]
  - name: best-trend
    match: {strategy: trend}
    mode: best
    select: [cheapest_commission, most_free_margin]
  - name: odd
    match: {strategy: odd, instrument: MES}
    mode: mirror
---
kind: Risk
name: limits
margin_buffer_pct: 30
limits:
  - name: portfolio-loss
    scope: portfolio
    max_daily_loss: 1000
  - name: account-loss
    scope: account
    max_daily_loss_pct: 2
  - name: mes-size
    scope: account
    instrument: [MES]
    max_contracts: 4
---
kind: Schedule
name: sessions
timezone: America/New_York
rules:
  - name: no-late-entries
    between: ["15:50", "18:00"]
    action: block_entries
"""

NOW = "2026-03-10T10:00:00-04:00"
"""A Tuesday morning in EDT; MES1! is MESH6 until the roll day, Thursday 2026-03-12."""

RICH = {"connected": True, "free_margin": 100000, "daily_pnl": 0}


def write_rules(directory: Path, text: str = RULES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(text)
    return directory


def load(directory: Path, text: str = RULES) -> RuleSet:
    result = load_rules([write_rules(directory, text)])
    assert result.ok and result.ruleset is not None, [str(d) for d in result.diagnostics]
    return result.ruleset


def state_doc(accounts: dict[str, dict[str, Any]] | None = None, now: str = NOW, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"now": now, "accounts": accounts if accounts is not None else {}}
    doc.update(extra)
    return doc


def decide(engine: Engine, signal: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    now, parsed = parse_state(state)
    return engine.decide(parse_signal({"id": "sig-1", **signal}), parsed, now).to_json()


def legs(record: dict[str, Any]) -> list[tuple[str, str, str, int, str]]:
    return [(o["account"], o["contract"], o["side"], o["quantity"], o["intent"]) for o in record["orders"]]


def skips(record: dict[str, Any], *, with_state: bool = False) -> list[tuple[str, str]]:
    """(account, by) of the skipped accounts; accounts merely absent from the state only when asked for."""
    return [(s["account"], s["by"]) for s in record["skipped"] if with_state or s["by"] != "state"]
