"""What the engine knows about the accounts at the moment of a decision.

The service builds an ``EngineState`` from its broker snapshots and ledger; ``multibroker decide`` and tests build
one from a YAML/JSON document with ``parse_state``. Money is ``Decimal`` (a float is converted through ``str``);
positions are signed contract counts keyed by contract code (``MESH6: -2``); times are aware UTC.

Document shape (``parse_state``)::

    now: 2026-03-09T10:30:00-04:00      # the decision time, ISO-8601 with an offset (naive is an error)
    paused: [paper-slow]                # brokers an operator paused: no entries there
    halted: {apex-2: "manual halt"}     # accounts halted, with the reason shown to the trader
    daily_pnl: -1200                    # portfolio P&L; the sum of the accounts' when absent
    accounts:
      apex-1: {connected: true, free_margin: 5000, daily_pnl: -20.5, positions: {MESH6: 2}}
      apex-3: {connected: true, free_margin: 9000, halted_instruments: {ES: "es-loss breached"}}
      apex-4:                           # follows two strategies: what each holds, and the account's net
        connected: true
        free_margin: 9000
        strategies: {es-scalper: {MESH6: 1}, micro-trend: {MESH6: -1, MESM6: 2}}
        positions: {MESH6: 3, MESM6: 2} # optional: the sum of the strategies' when absent; here +3 is external

Positions, per strategy and per account. An account may follow several strategies, and each strategy trades its own
position there: a signal of strategy S acts on S's position (``strategies.S``: its book plus its orders in flight
and decided), never on another strategy's, so a ``flat`` target or an ``exit`` of S leaves the others' contracts
alone. ``positions`` is the account's net (every strategy's, plus contracts booked to no strategy, e.g. a manual
trade reconciliation adopted): what the broker holds, and what account-wide checks (``max_contracts``, the
portfolio's contracts) count. Contracts in ``positions`` beyond the strategies' sum belong to no strategy: no
strategy's target or exit touches them. A document that gives only ``positions`` (no ``strategies``) describes an
account whose positions are the signal's strategy's, as every account following one strategy has (and as decision
tables and ``multibroker decide`` examples written before per-strategy positions mean).

``halted_instruments`` halts an account's entries in some roots only (root -> reason), as a loss limit restricted to
``instrument`` does in the service (``service.risk``); ``halted`` halts them in every root. Neither ever blocks an
exit.

An account may also carry ``daily_pnl_at`` (when its P&L was measured): P&L measured during an earlier CME trading
day (which begins 18:00 ET) no longer counts, so a loss halt lifts at 18:00 ET, not at midnight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping


MAX_USD = 10**12
"""Money beyond a trillion USD is a unit error, and the engine's scaled integers must stay far from 2**63."""
MAX_CONTRACTS = 10**6


class StateError(ValueError):
    """A malformed state document; the message names the offending path."""


@dataclass(frozen=True)
class AccountState:
    connected: bool
    free_margin: Decimal
    daily_pnl: Decimal
    """Realized + unrealized USD since the trading day began."""
    positions: Mapping[str, int] = field(default_factory=dict)
    """Contract code -> signed quantity (long > 0): the account's net over every strategy and the contracts booked
    to no strategy (what the broker holds, orders in flight and decided included). Account-wide limits read it."""
    halted: str | None = None
    """Why entries are halted for this account (operator or reconciliation), None when not halted."""
    daily_pnl_at: datetime | None = None
    """When ``daily_pnl`` was measured (UTC); None means "now"."""
    halted_instruments: Mapping[str, str] = field(default_factory=dict)
    """Root -> why entries in that root alone are halted (a loss limit restricted to roots breached); the other
    roots keep trading. ``halted`` (every root) comes first when both are set."""
    strategy_positions: Mapping[str, Mapping[str, int]] | None = None
    """Strategy -> contract code -> signed quantity: each strategy's own position in this account (its ledger book,
    its orders in flight, its decided orders not sent yet). A strategy absent holds nothing here. None: not known
    per strategy (a state document giving only ``positions``), and the account's positions are taken as the
    signal's strategy's. Positions booked to no strategy are in ``positions`` only."""

    def halted_in(self, root: str) -> str | None:
        """Why entries in ``root`` are halted for this account, or None."""
        return self.halted or self.halted_instruments.get(root)

    def held(self, root: str) -> dict[str, int]:
        """Non-zero positions in contracts of ``root`` (``MESH6`` belongs to ``MES``, not to ``ES``)."""
        if not self.positions:  # the common case, asked for every account of every decision
            return {}
        return {c: q for c, q in self.positions.items() if q and contract_root(c) == root}

    def strategy_held(self, strategy: str, root: str) -> dict[str, int]:
        """Non-zero positions of ``strategy`` in contracts of ``root``: what a signal of that strategy acts on."""
        if self.strategy_positions is None:
            return self.held(root)
        own = self.strategy_positions.get(strategy)
        if not own:
            return {}
        return {c: q for c, q in own.items() if q and contract_root(c) == root}


@dataclass(frozen=True)
class EngineState:
    accounts: Mapping[str, AccountState]
    paused: frozenset[str] = frozenset()
    """Paused broker names."""
    portfolio_daily_pnl: Decimal | None = None
    """Given explicitly, or None to use the sum of the accounts' daily P&L."""
    portfolio_daily_pnl_at: datetime | None = None


def contract_root(code: str) -> str:
    """``MESH6`` -> ``MES``; ``ESH2026`` -> ``ES`` (root + month code + one- or four-digit year)."""
    return code[:-5] if code[-4:].isdigit() else code[:-2]


def _path(*parts: str) -> str:
    return ".".join(parts)


def _money(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise StateError(f"{where}: expected a number, got {type(value).__name__}")
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        raise StateError(f"{where}: {value!r} is not a number") from None
    if not result.is_finite():
        raise StateError(f"{where}: {value!r} is not a finite number")
    if abs(result) > MAX_USD:
        raise StateError(f"{where}: {value!r} is out of range (at most {MAX_USD:,} USD in magnitude)")
    return result


def _time(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise StateError(f"{where}: {value!r} is not an ISO-8601 time") from None
    else:
        raise StateError(f"{where}: expected an ISO-8601 time, got {type(value).__name__}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise StateError(f"{where}: {value} has no UTC offset; write e.g. 2026-03-09T10:30:00-04:00 or ...Z")
    return parsed.astimezone(timezone.utc)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise StateError(f"{where}: expected true or false, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StateError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def parse_account(name: str, obj: Any, halted: str | None = None) -> AccountState:
    where = _path("accounts", name)
    data = _mapping(obj, where)
    unknown = set(data) - {"connected", "free_margin", "daily_pnl", "positions", "halted", "daily_pnl_at",
                           "halted_instruments", "strategies"}
    if unknown:
        raise StateError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    for key in ("connected", "free_margin"):
        if key not in data:
            raise StateError(f"{where}: '{key}' is required")
    positions = _positions(data.get("positions"), _path(where, "positions"))
    by_strategy: dict[str, dict[str, int]] | None = None
    if data.get("strategies") is not None:
        by_strategy = {}
        for strategy, book in _mapping(data["strategies"], _path(where, "strategies")).items():
            if not isinstance(strategy, str) or not strategy.strip():
                raise StateError(f"{_path(where, 'strategies')}: {strategy!r} is not a strategy name")
            held = _positions(book, _path(where, "strategies", strategy))
            if held:
                by_strategy[strategy] = held
        if data.get("positions") is None:  # the account holds what its strategies hold
            for held in by_strategy.values():
                for code, qty in held.items():
                    positions[code] = positions.get(code, 0) + qty
            positions = {c: q for c, q in positions.items() if q}
    own_halt = data.get("halted")
    if own_halt is not None and not isinstance(own_halt, str):
        raise StateError(f"{_path(where, 'halted')}: expected the reason as text")
    halted_roots: dict[str, str] = {}
    for root, reason in _mapping(data.get("halted_instruments") or {}, _path(where, "halted_instruments")).items():
        code = str(root).strip().upper()
        if not code or not code.isalnum():
            raise StateError(f"{_path(where, 'halted_instruments', str(root))}: not an instrument root (e.g. ES)")
        if reason is not None and reason is not True and not isinstance(reason, str):
            raise StateError(f"{_path(where, 'halted_instruments', str(root))}: expected the reason as text")
        halted_roots[code] = reason if isinstance(reason, str) and reason else "halted by operator"
    at = data.get("daily_pnl_at")
    return AccountState(
        connected=_bool(data["connected"], _path(where, "connected")),
        free_margin=_money(data["free_margin"], _path(where, "free_margin")),
        daily_pnl=_money(data.get("daily_pnl", 0), _path(where, "daily_pnl")),
        positions=positions,
        halted=halted or own_halt or None,
        daily_pnl_at=None if at is None else _time(at, _path(where, "daily_pnl_at")),
        halted_instruments=halted_roots,
        strategy_positions=by_strategy,
    )


def _positions(obj: Any, where: str) -> dict[str, int]:
    """Contract code -> signed quantity from a document's mapping (codes upper-cased; repeats add up)."""
    positions: dict[str, int] = {}
    for contract, qty in _mapping(obj or {}, where).items():
        if isinstance(qty, bool) or not isinstance(qty, int) or abs(qty) > MAX_CONTRACTS:
            raise StateError(f"{_path(where, str(contract))}: expected a signed integer "
                             f"(|qty| <= {MAX_CONTRACTS:,}), got {qty!r}")
        code = str(contract).strip().upper()
        if len(code) < 3 or not code[-1].isdigit():
            raise StateError(f"{_path(where, str(contract))}: not a contract code (e.g. MESH6)")
        positions[code] = positions.get(code, 0) + qty
    return positions


def parse_state(obj: Any) -> tuple[datetime, EngineState]:
    """The decision time and the state described by a ``decide`` STATE document."""
    data = _mapping(obj, "state")
    unknown = set(data) - {"now", "accounts", "paused", "halted", "daily_pnl", "daily_pnl_at"}
    if unknown:
        raise StateError(f"state: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    if "now" not in data:
        raise StateError("now: required (the decision time, ISO-8601 with an offset)")
    now = _time(data["now"], "now")
    paused = data.get("paused") or []
    if not isinstance(paused, list) or not all(isinstance(p, str) for p in paused):
        raise StateError("paused: expected a list of broker names")
    halted_raw = _mapping(data.get("halted") or {}, "halted")
    halted: dict[str, str] = {}
    for name, reason in halted_raw.items():
        halted[str(name)] = str(reason) if reason not in (None, True) else "halted by operator"
    accounts = {
        str(name): parse_account(str(name), value, halted.get(str(name)))
        for name, value in _mapping(data.get("accounts") or {}, "accounts").items()
    }
    pnl = data.get("daily_pnl")
    pnl_at = data.get("daily_pnl_at")
    return now, EngineState(
        accounts=accounts,
        paused=frozenset(paused),
        portfolio_daily_pnl=None if pnl is None else _money(pnl, "daily_pnl"),
        portfolio_daily_pnl_at=None if pnl_at is None else _time(pnl_at, "daily_pnl_at"),
    )
