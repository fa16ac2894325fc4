"""Deciding which orders a signal becomes: one rules generation (``Engine``) and its pure ``decide``.

``Engine(ruleset)`` compiles the rules (``engine.compile``) and loads them into durable-rules (a ``Host`` that
starts no threads) or, where the C extension cannot be imported, into the pure-Python evaluator of the same
compiled format (announced in the log). ``decide(signal, state, now)`` does no I/O: the service, ``multibroker
decide`` and the tests call the very same code.

What goes through the rules engine: which routing rule applies (one ``route`` message) and whether each candidate
entry is allowed, and if not, which check refuses it first (one ``entry`` message per account). What stays in plain
Python, and why:

- quantities (multiplier rounding, target convergence, splitting a zero-crossing order into exit + entry, which
  held contracts an exit closes): arithmetic over the strategy's holdings, not a condition;
- picking one account in ``best`` mode: "the cheapest of several candidates" compares messages with each other,
  which would need joins, and durable-rules' joins are unsafe (out-of-bounds reads, a ``$not`` join segfaults);
- schedule windows (``engine.schedule``): wall-clock and calendar logic; the engine sees "blocked" as a field.

Semantics chosen where the rules format is silent (a demanding trader's expectations):

- A signal of strategy S acts on S's own position in each account (``AccountState.strategy_held``: S's ledger
  book, its orders in flight and its decided orders, per contract), never on another strategy's that the account
  also follows, nor on contracts booked to no strategy (a manual trade reconciliation adopted; reconciliation
  reports them, no strategy's target or exit touches them). Targets, exits, reversals, which held contracts an
  order closes (oldest first) and best mode's holders all read S's position; an order's ``intent`` says what it
  does to S's position (``exit``: reduces it). A state that does not know positions per strategy (a document
  giving only ``positions``) stands for the signal's strategy's.
- Account-wide checks stay account-wide: margin (the account's free margin), loss limits and halts (the account's
  and the portfolio's), and contract limits. An account's ``max_contracts`` reads the absolute value of the
  account's net position in the root (every strategy's, plus contracts booked to no strategy, in flight included)
  after every leg of this order; a portfolio ``max_contracts`` reads the sum over accounts of those absolute nets.
  Only entries are judged: a strategy's exit that leaves the account's net larger (another strategy held the
  opposite side) is never blocked, like every exit.
- Exits are never blocked: not by risk, schedule, margin, a paused or disconnected broker (the decision says what
  the account should do; the service journals such an order ``missed`` and catch-up converges a ``catch_up``
  account once its broker is back), nor by ``mode``/``select``. A size multiplier of 0 excludes the account
  entirely, exits included ("size multiplier 0").
- ``action: exit`` closes every contract of the instrument the strategy holds (after a roll, the old contract).
  ``buy``/``sell`` that reduce a position close the oldest held contracts first; the opening part of a
  zero-crossing order goes into the contract the ticker resolves to now.
- Target signals (``position``/``position_size``): target = round_half_up(size x multiplier), signed; the order is
  target - held. An account already at its target is listed as skipped ("already at target").
- ``best`` mode, buy/sell: every account holding an opposite position gets its exit. If the signal only reduces
  those positions, nobody gets a new entry; if it reverses them, the opening part goes to exactly one of those
  holders (the book's net position then matches the strategy's). With no opposite holder, exactly one eligible
  account gets the entry, chosen by ``select`` then account name. ``best`` mode, target signals: if the strategy
  holds the instrument at a target account (already at its target or not), the position lives there: that holder
  converges to the target and nobody else opens it (that would double it); if none holds it, one account chosen by
  ``select`` opens it. With several holders (after a failover), one keeps the position (a holder already at its
  target, else the one with the fewest contracts to trade to reach it, ties by the rule's account order) and
  converges; every other holder is closed to flat, its line saying so ("the MES position is kept at bf; closing 1
  here"). A flat target closes every holder.
- ``max_contracts`` rejects (never resizes); a portfolio-scope ``max_contracts`` counts the book after this
  decision's exits and the entries it already accepted. A loss limit restricted to ``instrument`` blocks entries in
  those roots only; so does the service's halt after such a limit breached (``AccountState.halted_instruments``,
  root -> reason): the ``halted`` field of the entry message is computed per account and root here, in Python, so
  the compiled rules (and the pure-Python evaluator, which sees the same message) need no change. An entry at a
  broker with no margin for the root (nor a ``default``) is refused: its margin cannot be checked.
- Checks are reported in this order: schedule, portfolio loss limits, broker connection, broker paused, account
  halted, allowed instruments, account loss limits, contract limits, margin. ``blocked_by`` is set when every entry
  this signal would have made was refused by one and the same schedule or risk rule.
- Daily P&L measured before the current CME trading day began (18:00 ET) counts as 0.
- ``action: cancel``: no orders (``accepted`` is false); ``cancel`` lists every target account with state, for the
  service to cancel working orders in the instrument there.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from json.encoder import encode_basestring
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Mapping, Protocol, Sequence

from engine.compile import Check, Compiled, ceil_scaled, compile_ruleset, floor_scaled
from engine.decision import Cancel, Decision, Order, Skip, client_order_id
from engine.evaluator import (MAX_INT, Condition, Message, PythonRules, Template, check_message, flat_json,
                              referenced_fields)
from engine.model import Account, RoutingRule, RuleSet, ScheduleRule
from engine.schedule import BLOCK, blocking_rule
from engine.sessions import to_et, trading_day, trading_day_bounds
from engine.signal import Signal
from engine.state import AccountState, EngineState
from engine.symbols import Symbol, parse_contract, resolve

log = logging.getLogger("multibroker.engine")

RISK_KINDS = frozenset({"schedule", "portfolio_loss", "account_loss", "max_contracts", "portfolio_contracts"})


class EngineError(RuntimeError):
    """The rules engine misbehaved (an action raised, or more than one rule fired): never a silent decision."""


class Rules(Protocol):
    @property
    def text_fields(self) -> frozenset[str] | None:
        """The fields a backend that parses JSON text reads (a caller may then pass ``post`` the text, holding only
        these); None for backends that read the message itself."""

    def post(self, message: Message, text: str | None = None) -> str | None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
# durable-rules, used statelessly
# ---------------------------------------------------------------------------------------------------------------

_generation = itertools.count()


def durable_available() -> bool:
    try:
        import durable.engine  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class DurableRules:
    """One compiled rule set in its own durable-rules ``Host``, for one rules generation.

    Why not the stock machinery:

    - The stock ``Host`` starts two timer threads that never stop (about 1 MB and 2 threads leaked per reload), so
      ``_QuietHost`` starts none: we never use timers or queued actions.
    - ``Host.post`` runs each fired action through closures, JSON round trips of the state and a completion
      callback, and swallows exceptions raised by actions into the returned state. We need only the name of the
      rule that fired, so ``post`` asserts the event into the C core, reads the fired rule's name from the action
      it starts, and completes it: the same C calls ``Host.post`` makes, without Python actions (nothing to
      swallow) and at a third of the cost. Anything else the core reports is raised as ``EngineError``.
    - The text posted holds only the fields some rule reads (``referenced_fields``): the core parses, stores and
      echoes every field, and a field no condition reads cannot change which rule fires.
    - The fired rule's name is read off the action text without ``json.loads`` when that text is exactly what one
      rule firing on our message looks like (``_fired``); anything else is parsed in full and checked as before.
    - ``close`` deletes the ruleset (and its state) in the C core.
    """

    def __init__(self, rules: Sequence[tuple[str, int, Condition]]) -> None:
        import durable_rules_engine  # noqa: PLC0415
        from durable.engine import Host  # noqa: PLC0415

        class _QuietHost(Host):  # type: ignore[misc]
            def _run(self) -> None:  # no dispatch/timer threads
                pass

        self._core = durable_rules_engine
        self._name = f"multibroker-{next(_generation)}"
        self._lock = threading.Lock()
        self._host = _QuietHost()
        definition = {name: {"pri": pri, "all": [{"m": cond}], "run": _never_called}
                      for name, pri, cond in rules}
        self._host.set_rulesets({self._name: definition})  # set_rulesets mutates (pops "run"): a throwaway dict
        self._handle = self._host.get_ruleset(self._name)._handle
        self._closed = False
        self._state_complete = False
        self.text_fields = referenced_fields(cond for _, _, cond in rules)
        # Names the fast path of ``_fired`` may recognise: no quote or backslash, so that '{"<name>":' cannot
        # span two JSON members (ours are identifiers like ``route0.1``; anything else takes the json.loads path).
        self._names = frozenset(name for name, _, _ in rules if '"' not in name and "\\" not in name)

    def post(self, message: Message, text: str | None = None) -> str | None:
        """The name of the rule that fires for ``message``, or None. ``text``, when given, must be what
        ``flat_json(message, self.text_fields)`` returns for a message ``check_message`` accepts (the engine writes
        its entry messages from a ``Template``); without it the message is checked and encoded here."""
        if text is None:
            text = flat_json(message, self.text_fields)  # refuses what check_message refuses
        core = self._core
        with self._lock:
            if self._closed:
                raise EngineError(f"rules generation {self._name} is retired")
            result = core.assert_event(self._handle, text)
            if result[0] == 1:  # MessageNotHandled: no rule matches
                return None
            if result[0] != 0:
                raise EngineError(f"durable-rules refused the message (code {result[0]}): {message}")
            state_handle = result[1]
            started = core.start_action_for_state(self._handle, state_handle)
            if not started:
                raise EngineError(f"durable-rules matched but started no action for {message}")
            fired = self._fired(started[1], text)
            more = core.complete_and_start_action(self._handle, state_handle)
            self._state_complete = True
            if len(fired) != 1 or more:
                raise EngineError(f"durable-rules fired more than one rule for one message: {fired}")
            return fired[0]

    def _fired(self, action: str, sent: str) -> list[str]:
        """The names of the rules in the action the core started (one, unless something is wrong).

        The core writes the action as ``{"<rule>":{"m":<the message as posted>}}``. When the text is exactly that
        for one of our rule names (which hold no quote or backslash), it is a JSON object with that single member,
        so the name is read without parsing the echoed message; any other text (two rules, a reformatted echo) is
        parsed in full, and the caller refuses anything but exactly one name.
        """
        tail = '":{"m":' + sent + "}}"
        if action.startswith('{"') and action.endswith(tail):
            name = action[2:len(action) - len(tail)]
            if name in self._names:
                return [name]
        return [str(name) for name in json.loads(action)]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._state_complete:
                # After only unmatched posts the C core holds a half-made state whose delete_state segfaults
                # (2.0.28); delete_ruleset alone frees it.
                try:
                    self._core.delete_state(self._handle, "0")
                except Exception:  # noqa: BLE001 - nothing to delete
                    pass
            self._core.delete_ruleset(self._handle)
            self._host._ruleset_directory.clear()
            self._host._ruleset_list.clear()


def _never_called(c: Any) -> None:
    """The action durable-rules requires per rule; ``DurableRules.post`` completes actions without running them."""
    raise EngineError("durable-rules ran an action through Host.post; use DurableRules.post")


class _NoRules:
    """A rule set with no rules at all (nothing to route): durable-rules refuses an empty ruleset."""

    text_fields = None

    def post(self, message: Message, text: str | None = None) -> str | None:
        check_message(message)
        return None

    def close(self) -> None:
        pass


_fallback_announced = False


def make_rules(rules: Sequence[tuple[str, int, Condition]], backend: str = "auto") -> Rules:
    """``durable`` or ``python``; ``auto`` prefers durable-rules and says so in the log when it cannot."""
    global _fallback_announced
    if not rules:
        return _NoRules()
    if backend == "python":
        return PythonRules(rules)
    if backend == "auto" and not durable_available():
        if not _fallback_announced:
            log.warning("durable-rules cannot be imported on this Python; using the pure-Python rule evaluator")
            _fallback_announced = True
        return PythonRules(rules)
    return DurableRules(rules)


# ---------------------------------------------------------------------------------------------------------------
# Quantities
# ---------------------------------------------------------------------------------------------------------------

_ZERO = Decimal(0)


def round_half_up(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def _sign(n: int) -> int:
    return (n > 0) - (n < 0)


@dataclass(slots=True)
class Plan:
    """What one account's order becomes: exit legs (contract, signed qty) and an opening part (signed qty), computed
    from the signal's strategy's own position there (``net``); the account's net over every strategy
    (``account_net``) is what account-wide limits judge the opening part against."""

    account: Account
    state: AccountState
    net: int
    """The signal's strategy's net position in the root at this account."""
    account_net: int | None
    """The account's net position in the root: every strategy's and the contracts booked to no strategy (None: not
    computed yet; ``_Decider.net_after`` computes it for the plans whose opening part is judged)."""
    exits: list[tuple[str, int]] = field(default_factory=list)
    entry: int = 0


def _oldest_first(held: Mapping[str, int], now: datetime) -> list[str]:
    def key(code: str) -> tuple[int, int, str]:
        try:
            _, month, year = parse_contract(code, now)
        except ValueError:
            return (9999, 99, code)
        return (year, month, code)

    return sorted(held, key=key)


def split_order(delta: int, held: Mapping[str, int], now: datetime) -> tuple[list[tuple[str, int]], int]:
    """A signed order against the held contracts: the closing part (oldest contract first) and the opening part."""
    net = sum(held.values())
    if delta == 0:
        return [], 0
    if net == 0 or _sign(delta) == _sign(net):
        return [], delta
    closing = min(abs(delta), abs(net))
    remaining = closing
    exits: list[tuple[str, int]] = []
    for contract in _oldest_first(held, now):
        qty = held[contract]
        if remaining == 0:
            break
        if _sign(qty) != _sign(net):
            continue
        take = min(abs(qty), remaining)
        exits.append((contract, -_sign(net) * take))
        remaining -= take
    return exits, delta + _sign(net) * closing


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------

def _money(value: Decimal) -> str:
    text = f"{value:.2f}"
    return text if Decimal(text) == value else format(value.normalize(), "f")


def _fmt_pct(value: Decimal) -> str:
    return format(value.normalize(), "f")


@dataclass(frozen=True)
class _Facts:
    """Per-generation constants of one account, computed once in ``Engine.__init__`` so that a decision spends no
    lookups or Decimal arithmetic on them."""

    account: Account
    multiplier: tuple[int, int]
    """The size multiplier as an exact fraction (numerator, denominator > 0): quantities are scaled in ints."""
    names_json: tuple[str, str] | None
    """The account's and its broker's names as JSON strings, for the entry message's text (None: not str)."""


def _json_string(value: object) -> str | None:
    return encode_basestring(value) if type(value) is str else None


def _names_json(account: Account) -> tuple[str, str] | None:
    name, broker = _json_string(account.name), _json_string(account.broker)
    return None if name is None or broker is None else (name, broker)


ENTRY_FIELDS = ("k", "account", "broker", "strategy", "root", "sched", "ppnl", "connected", "paused", "halted", "pnl",
                "abs_after", "pabs_after", "qty", "mpc", "free")
"""The entry message's fields, in the order ``_Decider.judge`` builds them (the compiled checks read them)."""


def scale_quantity(quantity: int, multiplier: tuple[int, int]) -> int:
    """``round_half_up(Decimal(quantity) * size_multiplier)`` in exact integer arithmetic (half away from zero)."""
    numerator, denominator = multiplier
    magnitude = (2 * abs(quantity * numerator) + denominator) // (2 * denominator)
    return magnitude if quantity * numerator >= 0 else -magnitude


class Engine:
    """One rules generation. ``decide`` is thread-safe and pure; ``close`` retires the generation.

    Everything that depends only on the rules is computed here, once per generation: per account facts, each
    broker's margin per root (scaled for the margin check), the schedule's block rules and whether any of them is
    scoped to accounts; and each resolved ticker is kept per Eastern date (``resolve`` depends on nothing else).
    """

    def __init__(self, ruleset: RuleSet, backend: str = "auto") -> None:
        self.ruleset = ruleset
        self.content_hash = ruleset.content_hash
        """Named by every decision of this generation (``Decision.content_hash``): which rules decided."""
        self.compiled: Compiled = compile_ruleset(ruleset)
        self.rules: Rules = make_rules(self.compiled.rules, backend)
        self.backend = type(self.rules).__name__
        self._schedule_rules = ruleset.schedule_rules
        self._block_rules = tuple(r for r in ruleset.schedule_rules if r.action == BLOCK)
        self._block_per_account = any(r.accounts is not None for r in self._block_rules)
        """Only then can two accounts of one decision see different schedule blocks."""
        by_name = sorted(ruleset.accounts.values(), key=lambda a: a.name)
        self._accounts_by_name = by_name
        self._facts = {a.name: _Facts(a, a.size_multiplier.as_integer_ratio(), _names_json(a)) for a in by_name}
        sent = self.rules.text_fields
        self._entry_template = None if sent is None else Template(ENTRY_FIELDS, sent)
        """Writes entry messages for a backend that parses text (durable-rules)."""
        scale = self.compiled.scale
        self._margins: dict[tuple[str, str], tuple[Decimal | None, int]] = {}
        """(broker, root) -> (margin per contract or None, the ``mpc`` field: margin x S, -1 when unknown)."""
        for broker in ruleset.brokers.values():
            for root in ruleset.catalog.roots():
                self._margins[(broker.name, root)] = self._margin_facts(broker.name, root)
        self._free_factor = 100 * self.compiled.margin_factor_scale * scale
        """free margin x this = the ``free`` field (a power of ten: the product is exact)."""
        self._symbols: dict[tuple[str, date], Symbol] = {}

    def close(self) -> None:
        self.rules.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _margin_facts(self, broker: str, root: str) -> tuple[Decimal | None, int]:
        margin = self.ruleset.brokers[broker].margin(root)
        return margin, (-1 if margin is None else int(margin * self.compiled.scale))

    def margin(self, broker: str, root: str) -> tuple[Decimal | None, int]:
        """(margin per contract, ``mpc`` field) for ``broker`` and ``root``."""
        found = self._margins.get((broker, root))
        return found if found is not None else self._margin_facts(broker, root)

    def _targets(self, rule: RoutingRule, strategy: str) -> list[Account]:
        accounts = self.ruleset.accounts
        if rule.accounts is not None:
            return [accounts[name] for name in rule.accounts if name in accounts]
        if rule.brokers is not None:
            return [a for a in self._accounts_by_name if a.broker in rule.brokers]
        return [a for a in self._accounts_by_name if strategy in a.strategies]

    def _resolve(self, ticker: str, now: datetime, today: date) -> Symbol:
        """``resolve(ticker, now, catalog)``, kept per (ticker, Eastern date ``today``): ``resolve`` reads ``now``
        only as its Eastern date, and the catalog is the generation's. Errors are not kept (raised every time)."""
        key = (ticker, today)
        symbol = self._symbols.get(key)
        if symbol is None:
            symbol = resolve(ticker, now, self.ruleset.catalog)
            if len(self._symbols) >= 1024:  # tickers come from signals: bounded, whatever they send
                self._symbols.clear()
            self._symbols[key] = symbol
        return symbol

    # -- the decision ----------------------------------------------------------------------------------------

    def decide(self, signal: Signal, state: EngineState, now: datetime) -> Decision:
        """The decision for ``signal`` given ``state`` at ``now`` (aware). Raises SymbolError for an unknown or
        expired instrument, which is an input error rather than a decision."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("decide: `now` must be an aware datetime")
        local = to_et(now)
        symbol = self._resolve(signal.ticker, now, local.date())
        base: dict[str, Any] = {"signal_id": signal.id, "strategy": signal.strategy,
                                "order_type": signal.order_type, "price": signal.price,
                                "content_hash": self.content_hash}
        fired = self.rules.post({"k": "route", "strategy": signal.strategy, "root": symbol.root})
        if fired is None:
            return Decision(rule=None, blocked_by=None, reason=(
                f"no routing rule matches strategy '{signal.strategy}' and instrument {symbol.root}"), **base)
        rule = self.compiled.routes[fired]
        targets = self._targets(rule, signal.strategy)
        if not targets:
            return Decision(rule=rule.name, blocked_by=None, reason=(
                f"routing rule {rule.name} selects no account for strategy '{signal.strategy}'"), **base)
        return _Decider(self, signal, state, now, local, symbol, rule, targets, base).run()


class _Decider:
    """The working state of one decision (kept off ``Engine`` so that ``decide`` stays re-entrant)."""

    def __init__(self, engine: Engine, signal: Signal, state: EngineState, now: datetime, local: datetime,
                 symbol: Symbol, rule: RoutingRule, targets: Sequence[Account], base: dict[str, Any]) -> None:
        self.engine = engine
        self.ruleset = engine.ruleset
        self.compiled = engine.compiled
        self.signal = signal
        self.state = state
        self.now = now
        self.symbol = symbol
        self.root = symbol.root
        self.rule = rule
        self.targets = targets
        self.base = base
        self.orders: list[Order] = []
        self.skipped: list[Skip] = []
        self.entry_refusals: list[Skip] = []
        self.entry_refusal_kinds: set[str] = set()
        self.entered = 0
        """Contracts of the entries accepted so far in this decision (portfolio-wide contract limits count them)."""
        self.exited: dict[str, int] = {}
        """Account -> signed quantity of this decision's exits (all decided before any entry is judged)."""
        self.holders: list[str] = []
        """Best mode, target signals: the target accounts where the strategy holds the root."""
        self.keeper: str | None = None
        """Best mode, target signals with several holders: the one that keeps the position."""
        # Per-decision constants, computed once rather than per account.
        self.day_start, self.day_end = trading_day_bounds(trading_day(now))
        self.blocking = None if engine._block_per_account else self.blocking_rule(None)
        scale = self.compiled.scale
        if state.portfolio_daily_pnl is not None:
            self.portfolio_pnl = self.pnl(state.portfolio_daily_pnl, state.portfolio_daily_pnl_at)
        else:
            self.portfolio_pnl = sum((self.pnl(a.daily_pnl, a.daily_pnl_at) for a in state.accounts.values()),
                                     Decimal(0))
        self.ppnl = ceil_scaled(self.portfolio_pnl, scale)
        self._portfolio_abs: int | None = None
        self.strategy_json = _json_string(signal.strategy)
        self.root_json = encode_basestring(self.root)

    def pnl(self, value: Decimal, at: datetime | None) -> Decimal:
        """Daily P&L as it counts now: measured during another trading day than now's, it counts as 0."""
        if at is not None and not self.day_start <= at < self.day_end:
            return Decimal(0)  # measured during an earlier trading day, which has ended
        return value

    def blocking_rule(self, account: str | None) -> ScheduleRule | None:
        """The schedule rule blocking this signal's entries at ``account`` (any account, when no block rule is
        scoped to accounts: then the answer is the same for all, computed once per decision)."""
        if not self.engine._block_rules:
            return None
        return blocking_rule(self.engine._block_rules, self.now, strategy=self.signal.strategy, account=account)

    @property
    def portfolio_abs(self) -> int:
        """Sum over accounts of the absolute position in the root once this decision's exits are done (exits are
        never refused, so they count; computed only when an entry is judged)."""
        if self._portfolio_abs is None:
            self._portfolio_abs = sum(abs(sum(a.held(self.root).values()) + self.exited.get(name, 0))
                                      for name, a in self.state.accounts.items())
        return self._portfolio_abs

    # -- per account -----------------------------------------------------------------------------------------

    def skip(self, account: str, reason: str, by: str) -> None:
        self.skipped.append(Skip(account, reason, by))

    def _new_plan(self, account: Account, acc_state: AccountState, held: Mapping[str, int]) -> Plan:
        net = sum(held.values())
        # Positions not known per strategy are the signal's: the account's net is the strategy's.
        return Plan(account, acc_state, net, net if acc_state.strategy_positions is None else None)

    def net_after(self, plan: Plan) -> int:
        """The account's net position in the root once the plan's exits and opening part are done: what an
        account's ``max_contracts`` reads (every strategy's position and the contracts booked to no strategy)."""
        net = plan.account_net
        if net is None:
            net = plan.account_net = sum(plan.state.held(self.root).values())
        return net + sum(q for _, q in plan.exits) + plan.entry if plan.exits else net + plan.entry

    def target(self, account: Account) -> int:
        """The signed target of a target signal at ``account``: position_size x multiplier, rounded half up."""
        size = scale_quantity(self.signal.position_size or 0, self.engine._facts[account.name].multiplier)
        return {"long": size, "short": -size}.get(self.signal.position or "flat", 0)

    def plan(self, account: Account) -> Plan | None:
        acc_state = self.state.accounts.get(account.name)
        if acc_state is None:
            self.skip(account.name, "no state for this account (not connected to the service yet?)", "state")
            return None
        if account.size_multiplier == 0:
            self.skip(account.name, "size multiplier 0", "size_multiplier")
            return None
        signal = self.signal
        held = acc_state.strategy_held(signal.strategy, self.root)
        plan = self._new_plan(account, acc_state, held)
        net = plan.net
        mult = account.size_multiplier
        if signal.action == "exit":
            if not held:
                self.skip(account.name, f"no {self.root} position to exit", "exit")
                return None
            plan.exits = [(c, -q) for c, q in sorted(held.items())]
            return plan
        multiplier = self.engine._facts[account.name].multiplier
        if signal.is_target:
            target = self.target(account)
            delta = target - net
            if delta == 0:
                self.skip(account.name, f"already at target {target:+d} {self.root}", "target")
                return None
        else:
            qty = scale_quantity(signal.quantity or 0, multiplier)
            if qty == 0:
                self.skip(account.name, f"quantity {signal.quantity} x size multiplier {_fmt_pct(mult)} rounds to 0",
                          "size_multiplier")
                return None
            delta = qty if signal.action == "buy" else -qty
        plan.exits, plan.entry = split_order(delta, held, self.now)
        return plan

    def add_exits(self, plan: Plan) -> None:
        for contract, qty in plan.exits:
            self.exited[plan.account.name] = self.exited.get(plan.account.name, 0) + qty
            self.orders.append(self._order(plan.account, contract, qty, "exit", Decimal(0)))

    def _order(self, account: Account, contract: str, qty: int, intent: str, margin: Decimal) -> Order:
        return Order(account.name, account.broker, contract, "buy" if qty > 0 else "sell", abs(qty), intent,
                     client_order_id(self.signal.id, account.name, f"{intent}:{contract}"), margin)

    def judge(self, plan: Plan) -> tuple[Skip | None, Decimal, str | None]:
        """(refusal or None, reserved margin, kind of the refusing check) for the plan's opening part."""
        account = plan.account
        acc_state = plan.state
        engine = self.engine
        qty = abs(plan.entry)
        margin, mpc = engine.margin(account.broker, self.root)
        blocking = self.blocking_rule(account.name) if engine._block_per_account else self.blocking
        pnl = self.pnl(acc_state.daily_pnl, acc_state.daily_pnl_at)
        sched = 1 if blocking is not None else 0
        connected = 1 if acc_state.connected else 0
        paused = 1 if account.broker in self.state.paused else 0
        halted = 1 if acc_state.halted_in(self.root) else 0
        pnl_scaled = ceil_scaled(pnl, self.compiled.scale)
        abs_after = abs(self.net_after(plan))
        pabs_after = self.portfolio_abs + self.entered + qty
        # free margin x 100 x 10**j x S in one multiplication by that power of ten: the same exact product
        free = floor_scaled(acc_state.free_margin, engine._free_factor)
        message = {  # in ENTRY_FIELDS order
            "k": "entry", "account": account.name, "broker": account.broker, "strategy": self.signal.strategy,
            "root": self.root, "sched": sched, "ppnl": self.ppnl, "connected": connected, "paused": paused,
            "halted": halted, "pnl": pnl_scaled, "abs_after": abs_after, "pabs_after": pabs_after, "qty": qty,
            "mpc": mpc, "free": free,
        }
        text = None
        names = engine._facts[account.name].names_json
        if (engine._entry_template is not None and names is not None and self.strategy_json is not None
                and type(qty) is int and type(abs_after) is int and type(pabs_after) is int
                and -MAX_INT <= min(self.ppnl, pnl_scaled, abs_after, pabs_after, qty, mpc, free)
                and max(self.ppnl, pnl_scaled, abs_after, pabs_after, qty, mpc, free) <= MAX_INT):
            # What check_message requires holds: the names are str (checked once), the flags are the literals 0/1,
            # ppnl/pnl/free come from int() in ceil_scaled/floor_scaled and mpc from int() or -1, the three counts
            # derived from positions were just checked to be exact ints, and every int is within +-MAX_INT.
            # Otherwise the backend checks and encodes the message itself (and refuses it, naming the field).
            text = engine._entry_template.write(
                '"entry"', names[0], names[1], self.strategy_json, self.root_json, sched, self.ppnl, connected,
                paused, halted, pnl_scaled, abs_after, pabs_after, qty, mpc, free)
        fired = engine.rules.post(message, text)
        reserved = (margin or _ZERO) * qty
        if fired == "ok":
            return None, reserved, None
        if fired is None:
            raise EngineError(f"no check fired for entry message {message}")
        check = self.compiled.checks[fired]
        by = blocking.name if check.kind == "schedule" and blocking is not None else check.by
        reason = self.explain(check, plan, message, pnl, margin, blocking)
        return Skip(account.name, reason, by), reserved, check.kind

    def explain(self, check: Check, plan: Plan, message: Mapping[str, Any], pnl: Decimal, margin: Decimal | None,
                blocking: Any) -> str:
        account = plan.account
        kind = check.kind
        if kind == "schedule":
            window = (f"{blocking.between[0]}-{blocking.between[1]} ET" if blocking.between
                      else f"{blocking.before_close_minutes} min before the close" if blocking.before_close_minutes
                      else "")
            return f"entries blocked by schedule rule {blocking.name}" + (f" ({window})" if window else "")
        if kind == "portfolio_loss":
            limit = check.thresholds["*"]
            return (f"portfolio daily P&L {_money(self.portfolio_pnl)} reached the limit -{_money(limit)} "
                    f"({check.by}, since 18:00 ET)")
        if kind == "connection":
            return f"broker {account.broker} is not connected"
        if kind == "paused":
            return f"broker {account.broker} is paused"
        if kind == "halted":
            if plan.state.halted:
                return f"account halted: {plan.state.halted}"
            return f"{self.root} entries halted: {plan.state.halted_in(self.root)}"
        if kind == "instruments":
            return f"{self.root} is not among the account's instruments ({', '.join(account.instruments or ())})"
        if kind == "account_loss":
            limit = check.thresholds[account.name]
            lim = check.limit
            how = (f"{_fmt_pct(lim.max_daily_loss_pct)}% of capital {_money(account.capital)}"
                   if lim is not None and lim.max_daily_loss_pct is not None and limit != lim.max_daily_loss
                   else "")
            return (f"daily P&L {_money(pnl)} reached the limit -{_money(limit)}" + (f" ({how})" if how else "")
                    + f" ({check.by})")
        if kind == "max_contracts":
            assert check.limit is not None
            return (f"position after the order would be {message['abs_after']} {self.root} > max_contracts "
                    f"{check.limit.max_contracts} ({check.by}); orders are rejected, never resized")
        if kind == "portfolio_contracts":
            assert check.limit is not None
            return (f"portfolio {self.root} position after the order would be {message['pabs_after']} > "
                    f"max_contracts {check.limit.max_contracts} ({check.by})")
        if kind == "margin_unknown":
            return f"broker {account.broker} has no margin for {self.root} (add it under margins:)"
        qty = abs(plan.entry)
        assert margin is not None
        required = Decimal(qty) * margin * (100 + self.compiled.buffer_pct) / 100
        return (f"free margin {_money(plan.state.free_margin)} < required {_money(required)} "
                f"({qty} x {self.root} @ {_money(margin)} + {_fmt_pct(self.compiled.buffer_pct)}% buffer)")

    def refuse(self, skip: Skip, kind: str | None) -> None:
        self.skipped.append(skip)
        self.entry_refusals.append(skip)
        if kind is not None:
            self.entry_refusal_kinds.add(kind)

    def accept_entry(self, plan: Plan, reserved: Decimal) -> None:
        self.entered += abs(plan.entry)
        self.orders.append(self._order(plan.account, self.symbol.contract, plan.entry, "entry", reserved))

    # -- modes -----------------------------------------------------------------------------------------------

    def run(self) -> Decision:
        if self.signal.action == "cancel":
            return self.cancel()
        if self.rule.mode == "best" and self.signal.is_target:
            plans = self.best_target_plans()
        else:
            plans = [p for a in self.targets if (p := self.plan(a)) is not None]
        for plan in plans:
            self.add_exits(plan)
        if self.rule.mode == "mirror":
            self.mirror(plans)
        else:
            self.best(plans)
        return self.finish()

    def mirror(self, plans: Sequence[Plan]) -> None:
        for plan in plans:
            if plan.entry == 0:
                continue
            refusal, reserved, kind = self.judge(plan)
            if refusal is None:
                self.accept_entry(plan, reserved)
            else:
                self.refuse(refusal, kind)

    def best(self, plans: Sequence[Plan]) -> None:
        openers = [p for p in plans if p.entry != 0]
        if not openers:
            return
        if self.signal.is_target:
            # Holders are every target account where the strategy holds the root, not only those with a plan: an
            # account already at its target has no plan ("already at target"), yet the position lives there.
            # Counting plans only let a flat account open the same position a second time (a repeated target, or a
            # broker's catch-up after best routing had placed the entry elsewhere while it was away).
            holders = self.holders
            if holders:
                where = self.keeper or ", ".join(holders)
                for plan in openers:
                    if plan.net == 0:
                        self.skip(plan.account.name, f"best mode: the {self.root} position is held at {where}",
                                  self.rule.name)
                        continue
                    refusal, reserved, kind = self.judge(plan)
                    if refusal is None:
                        self.accept_entry(plan, reserved)
                    else:
                        self.refuse(refusal, kind)
                return
        candidates = openers
        if not self.signal.is_target:
            reducers = [p for p in plans if p.exits]
            if reducers:
                where = ", ".join(p.account.name for p in reducers)
                # A reduction opens nothing; a reversal opens only where the position was, so the book's net
                # position is what the strategy holds.
                reversal = all(p.entry != 0 for p in reducers)
                candidates = reducers if reversal else []
                for plan in openers:
                    if not any(plan is c for c in candidates):
                        self.skip(plan.account.name, f"best mode: the signal {'reverses' if reversal else 'reduces'}"
                                                     f" the {self.root} position at {where}", self.rule.name)
        eligible: list[tuple[Plan, Decimal]] = []
        for plan in candidates:
            refusal, reserved, kind = self.judge(plan)
            if refusal is None:
                eligible.append((plan, reserved))
            else:
                self.refuse(refusal, kind)
        if not eligible:
            return
        eligible.sort(key=lambda pr: self._rank(pr[0]))
        winner, reserved = eligible[0]
        self.accept_entry(winner, reserved)
        why = self._why(winner)
        for plan, _ in eligible[1:]:
            self.skip(plan.account.name, f"eligible, but best mode chose {winner.account.name}{why}", self.rule.name)

    def best_target_plans(self) -> list[Plan]:
        """Plans of a target signal in ``best`` mode: the strategy's position lives at one account.

        With the position at several holders (after a failover: an exit missed at a paused broker while a later
        target opened the position elsewhere), one holder keeps it and converges to the target, and every other
        holder is closed to flat (exits: never blocked; at a broker that is down or paused the runtime records them
        missed and re-issues or catches up as usual). Converging every holder would hold the position once per
        holder. The keeper: a holder already at its target, else the one with the fewest contracts to trade to reach
        it, ties by the rule's account order (what a repeated target keeps choosing). A flat target has nothing to
        keep: every holder converges to flat."""
        holders = self._holders()
        self.holders = [a.name for a, _, _ in holders]
        keeper = None
        if len(holders) > 1 and self.signal.position in ("long", "short") and self.signal.position_size:
            keeper = min(holders, key=lambda h: abs(self.target(h[0]) - h[2]))[0]  # min keeps the first of ties
            self.keeper = keeper.name
        plans = []
        for account in self.targets:
            holder = next((h for h in holders if h[0] is account), None) if keeper is not None else None
            if holder is None or holder[0] is keeper:
                plan = self.plan(account)
                if plan is not None:
                    plans.append(plan)
                continue
            _, acc_state, _ = holder
            held = acc_state.strategy_held(self.signal.strategy, self.root)
            plan = self._new_plan(account, acc_state, held)
            plan.exits = [(c, -q) for c, q in sorted(held.items())]
            self.skip(account.name, f"best mode: the {self.root} position is kept at {self.keeper}; closing "
                                    f"{abs(plan.net)} here", self.rule.name)
            plans.append(plan)
        return plans

    def _holders(self) -> list[tuple[Account, AccountState, int]]:
        """(account, state, the strategy's net) of the target accounts where the signal's strategy holds a net
        position in the root (in flight included, as the state counts it), in the rule's account order; an account
        with size multiplier 0 does not follow the strategy, so its position is not the strategy's. Another
        strategy's position in the same account, or contracts booked to no strategy, do not make a holder."""
        found = []
        strategy = self.signal.strategy
        for account in self.targets:
            acc_state = self.state.accounts.get(account.name)
            if acc_state is not None and account.size_multiplier != 0:
                net = sum(acc_state.strategy_held(strategy, self.root).values())
                if net != 0:
                    found.append((account, acc_state, net))
        return found

    def _rank(self, plan: Plan) -> tuple[Any, ...]:
        key: list[Any] = []
        for criterion in self.rule.select:
            if criterion == "cheapest_commission":
                commission = self.ruleset.brokers[plan.account.broker].commission(self.root)
                key.append((commission is None, commission or Decimal(0)))
            elif criterion == "most_free_margin":
                key.append(-plan.state.free_margin)
        key.append(plan.account.name)
        return tuple(key)

    def _why(self, plan: Plan) -> str:
        parts = []
        for criterion in self.rule.select:
            if criterion == "cheapest_commission":
                commission = self.ruleset.brokers[plan.account.broker].commission(self.root)
                parts.append(f"commission {_money(commission)}" if commission is not None else "no commission set")
            elif criterion == "most_free_margin":
                parts.append(f"free margin {_money(plan.state.free_margin)}")
        return f" ({', '.join(parts)})" if parts else " (account name order)"

    def cancel(self) -> Decision:
        cancels = []
        for account in self.targets:
            if account.name not in self.state.accounts:
                self.skip(account.name, "no state for this account (not connected to the service yet?)", "state")
                continue
            cancels.append(Cancel(account.name, account.broker, self.root))
        where = ", ".join(c.account for c in cancels) or "no account"
        return Decision(rule=self.rule.name, blocked_by=None,
                        reason=f"cancel working {self.root} orders at {where}", skipped=tuple(self.skipped),
                        cancel=tuple(cancels), **self.base)

    def finish(self) -> Decision:
        entries = [o for o in self.orders if o.intent == "entry"]
        blocked_by = None
        if not entries and self.entry_refusals:
            names = {s.by for s in self.entry_refusals}
            if len(names) == 1 and self.entry_refusal_kinds <= RISK_KINDS:
                blocked_by = names.pop()
        rule = self.rule.name
        if self.orders:
            accounts = ", ".join(dict.fromkeys(o.account for o in self.orders))
            noun = "order" if len(self.orders) == 1 else "orders"
            reason = f"{rule}: {len(self.orders)} {noun} to {accounts}"
            if blocked_by:
                reason += f"; entries blocked by {blocked_by}"
            if self.skipped:
                reason += f"; {len(self.skipped)} skipped"
        elif blocked_by:
            reason = f"{rule}: {self.entry_refusals[0].reason}"
        elif self.skipped:
            reason = f"{rule}: no orders; " + "; ".join(f"{s.account}: {s.reason}" for s in self.skipped[:3])
            if len(self.skipped) > 3:
                reason += f"; and {len(self.skipped) - 3} more"
        else:
            reason = f"{rule}: no orders"
        order = {a.name: i for i, a in enumerate(self.targets)}
        skipped = sorted(self.skipped, key=lambda s: order.get(s.account, len(order)))  # stable: in target order
        return Decision(rule=rule, blocked_by=blocked_by, reason=reason, orders=tuple(self.orders),
                        skipped=tuple(skipped), **self.base)


def build_engine(ruleset: RuleSet) -> Engine:
    """The engine for one rules generation (what the hot-reloader builds and later retires with ``close``)."""
    return Engine(ruleset)
