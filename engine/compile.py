"""Compiling a validated ``RuleSet`` into flat, prioritized conjunctions (see ``engine.evaluator``).

Two kinds of message are posted, one at a time, each fully flat (no facts, no joins: durable-rules 2.0.28 reads out
of bounds in join evaluation and a ``$not`` join crashes the process):

- ``k = "route"``: the signal's strategy and instrument root. Routing rule *i* compiles with priority *i*; of the
  rules a message matches, durable-rules fires only the one with the lowest ``pri`` (the message is consumed), so
  the first matching routing rule wins.
- ``k = "entry"``: one candidate entry (signal x account). Check *i* (a reason to refuse) gets priority *i* and the
  catch-all ``ok`` the lowest priority, so the one rule that fires names the first check that refuses the entry,
  which is what the trader reads, or ``ok``.

Every condition is emitted as a plain conjunction: the compiler turns each check into disjunctive normal form and
emits one rule per conjunct (same priority). durable-rules expands ``$or`` inside ``$and`` into DNF itself and
fails (error 113) past 2**14 paths, which a rule set with a dozen accounts reaches; our own expansion stays linear
in the number of accounts and limits.

Money is compared exactly: every money constant of the rule set is an integer at the generation's scale ``S``
(10**k, k >= 2 covering every constant's decimals), and state values are rounded towards the side that keeps the
comparison exact (``ceil`` for "loss <= -limit", ``floor`` for "free margin >= required"; for an integer T,
``ceil(x) <= T`` iff ``x <= T``). Thresholds that depend on an account's capital are compiled per account.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable, Mapping, Sequence, Union

from engine.evaluator import Condition
from engine.model import Limit, RoutingRule, RuleSet

# ---------------------------------------------------------------------------------------------------------------
# A tiny boolean algebra over message predicates, so that negation (De Morgan) and simplification are exact.
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Const:
    value: bool


TRUE = Const(True)
FALSE = Const(False)


@dataclass(frozen=True)
class Pred:
    op: str
    """``eq``, ``neq``, ``lt``, ``lte``, ``gt``, ``gte``."""
    field: str
    operand: Any
    """int/str, ``("m", field)`` or ``("mul", left, right)``."""


@dataclass(frozen=True)
class And:
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class Or:
    items: tuple["Expr", ...]


Expr = Union[Const, Pred, And, Or]

_NEGATED = {"eq": "neq", "neq": "eq", "lt": "gte", "gte": "lt", "lte": "gt", "gt": "lte"}


def conj(*items: Expr) -> Expr:
    out: list[Expr] = []
    for item in items:
        if item == FALSE:
            return FALSE
        if item == TRUE:
            continue
        out.extend(item.items if isinstance(item, And) else (item,))
    if not out:
        return TRUE
    return out[0] if len(out) == 1 else And(tuple(out))


def disj(*items: Expr) -> Expr:
    out: list[Expr] = []
    for item in items:
        if item == TRUE:
            return TRUE
        if item == FALSE:
            continue
        out.extend(item.items if isinstance(item, Or) else (item,))
    if not out:
        return FALSE
    return out[0] if len(out) == 1 else Or(tuple(out))


def negate(expr: Expr) -> Expr:
    """Exact negation: every message carries every field, so ``not (f == v)`` is ``f != v``."""
    if isinstance(expr, Const):
        return FALSE if expr.value else TRUE
    if isinstance(expr, Pred):
        return Pred(_NEGATED[expr.op], expr.field, expr.operand)
    if isinstance(expr, And):
        return disj(*(negate(e) for e in expr.items))
    return conj(*(negate(e) for e in expr.items))


def one_of(field_name: str, values: Iterable[str] | None) -> Expr:
    """``field`` equals one of ``values``; None means "any value"."""
    if values is None:
        return TRUE
    return disj(*(Pred("eq", field_name, v) for v in values))


MAX_CONJUNCTS = 5000
"""A check whose DNF grows past this is refused at load time rather than slowing every decision."""


class CompileError(ValueError):
    """The rule set cannot be compiled (a condition too large for the rules engine)."""


def dnf(expr: Expr) -> list[tuple[Pred, ...]]:
    """``expr`` as a list of conjunctions (empty list: never true; one empty tuple: always true)."""
    if isinstance(expr, Const):
        return [()] if expr.value else []
    if isinstance(expr, Pred):
        return [(expr,)]
    if isinstance(expr, Or):
        out: list[tuple[Pred, ...]] = []
        for item in expr.items:
            out.extend(dnf(item))
        return out
    result: list[tuple[Pred, ...]] = [()]
    for item in expr.items:
        result = [left + right for left in result for right in dnf(item)]
        if len(result) > MAX_CONJUNCTS:
            raise CompileError(f"condition too large for the rules engine (more than {MAX_CONJUNCTS} cases)")
    return result


def _operand_json(operand: Any) -> Any:
    if isinstance(operand, tuple):
        if operand[0] == "m":
            return {"$m": operand[1]}
        return {"$mul": {"$l": _operand_json(operand[1]), "$r": _operand_json(operand[2])}}
    return operand


def emit_conjunction(preds: Sequence[Pred]) -> Condition:
    """The durable-rules JSON for a conjunction of predicates (never empty: the caller adds ``k``)."""
    items = [emit(p) for p in preds]
    return items[0] if len(items) == 1 else {"$and": items}


def emit(expr: Expr) -> Condition:
    """The durable-rules JSON for ``expr`` (constants must have been simplified away by the caller)."""
    if isinstance(expr, Const):
        raise ValueError("constant conditions are not emitted")
    if isinstance(expr, Pred):
        if expr.op == "eq":
            return {expr.field: expr.operand}
        return {f"${expr.op}": {expr.field: _operand_json(expr.operand)}}
    key = "$and" if isinstance(expr, And) else "$or"
    return {key: [emit(e) for e in expr.items]}


# ---------------------------------------------------------------------------------------------------------------
# Checks on an entry, in the order a trader wants to hear about them.
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One reason an entry can be refused; ``fails`` is its compiled refusal condition."""

    id: str
    kind: str
    """schedule | portfolio_loss | connection | paused | halted | instruments | account_loss | max_contracts |
    portfolio_contracts | margin_unknown | margin"""
    by: str
    """What the decision record names as having excluded the account: a rule or limit name, or a check name."""
    fails: Expr
    limit: Limit | None = None
    thresholds: Mapping[str, Decimal] = field(default_factory=dict)
    """Loss limits: USD threshold per account ("*" for the portfolio)."""


def _decimals(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _scale_digits(values: Iterable[Decimal]) -> int:
    return max([2, *(_decimals(v) for v in values)])


def scaled(value: Decimal, scale: int, rounding: str) -> int:
    """``value * scale`` as an integer, rounded in the direction the caller's comparison needs."""
    return int((value * scale).to_integral_value(rounding=rounding))


def ceil_scaled(value: Decimal, scale: int) -> int:
    """``scaled(value, scale, ROUND_CEILING)`` without the keyword call (the decision path scales every account's
    P&L): ``int`` truncates towards zero, so a product with a fraction left above the integer rounds up by one.
    Exact: the product is the same Decimal, and comparing a Decimal with an int is exact."""
    product = value * scale
    whole = int(product)
    return whole + 1 if product > whole else whole


def floor_scaled(value: Decimal, scale: int) -> int:
    """``scaled(value, scale, ROUND_FLOOR)``, computed as ``ceil_scaled`` is."""
    product = value * scale
    whole = int(product)
    return whole - 1 if product < whole else whole


@dataclass
class Compiled:
    """What one rules generation posts to an evaluator, and how to read the rule that fires."""

    rules: list[tuple[str, int, Condition]]
    """(rule name, priority, conjunction): ``route<i>.<j>``, ``check<i>.<j>`` and ``ok``; lower priority fires."""
    routes: dict[str, RoutingRule]
    """Rule name -> the routing rule it stands for."""
    checks: dict[str, Check]
    """Rule name -> the check it stands for."""
    scale: int
    """Money scale S: USD x S is an integer for every money constant of the rule set."""
    margin_factor: int
    """(100 + margin_buffer_pct) x 10**j, an integer."""
    margin_factor_scale: int
    """10**j."""
    buffer_pct: Decimal


def loss_threshold(limit: Limit, capital: Decimal) -> Decimal | None:
    """The loss (as a positive USD amount) at which ``limit`` is breached; the smaller of its two forms."""
    candidates = []
    if limit.max_daily_loss is not None:
        candidates.append(limit.max_daily_loss)
    if limit.max_daily_loss_pct is not None:
        candidates.append(capital * limit.max_daily_loss_pct / 100)
    return min(candidates) if candidates else None


def compile_ruleset(ruleset: RuleSet) -> Compiled:
    accounts = list(ruleset.accounts.values())
    total_capital = sum((a.capital for a in accounts), Decimal(0))
    money: list[Decimal] = []
    for broker in ruleset.brokers.values():
        money.extend(broker.margins.values())
    loss_limits = [lim for lim in ruleset.limits
                   if lim.max_daily_loss is not None or lim.max_daily_loss_pct is not None]
    thresholds: dict[str, dict[str, Decimal]] = {}
    for lim in loss_limits:
        if lim.scope == "portfolio":
            t = loss_threshold(lim, total_capital)
            thresholds[lim.name] = {"*": t} if t is not None else {}
        else:
            scoped = [a for a in accounts if lim.accounts is None or a.name in lim.accounts]
            thresholds[lim.name] = {a.name: t for a in scoped if (t := loss_threshold(lim, a.capital)) is not None}
        money.extend(thresholds[lim.name].values())
    scale = 10 ** _scale_digits(money)

    buffer_pct = ruleset.margin_buffer_pct
    factor_scale = 10 ** _decimals(buffer_pct)
    margin_factor = int((100 + buffer_pct) * factor_scale)
    assert margin_factor == (100 + buffer_pct) * factor_scale, "margin factor must be exact"

    rules: list[tuple[str, int, Condition]] = []
    routes: dict[str, RoutingRule] = {}
    compiled_checks: dict[str, Check] = {}
    route = Pred("eq", "k", "route")
    for i, rule in enumerate(ruleset.routing_rules):
        match = conj(one_of("strategy", rule.strategies), one_of("root", rule.instruments))
        for j, preds in enumerate(dnf(match)):
            name = f"route{i}.{j}"
            rules.append((name, i, emit_conjunction((route, *preds))))
            routes[name] = rule
    entry = Pred("eq", "k", "entry")
    checks = _entry_checks(ruleset, loss_limits, thresholds, scale, margin_factor)
    for i, check in enumerate(checks):
        for j, preds in enumerate(dnf(check.fails)):
            name = f"{check.id}.{j}"
            rules.append((name, i, emit_conjunction((entry, *preds))))
            compiled_checks[name] = check
    rules.append(("ok", len(checks), emit_conjunction((entry,))))
    return Compiled(rules, routes, compiled_checks, scale, margin_factor, factor_scale, buffer_pct)


def _entry_checks(ruleset: RuleSet, loss_limits: Sequence[Limit], thresholds: Mapping[str, Mapping[str, Decimal]],
                  scale: int, margin_factor: int) -> list[Check]:
    checks: list[Check] = []

    def add(kind: str, by: str, fails: Expr, limit: Limit | None = None,
            limit_thresholds: Mapping[str, Decimal] | None = None) -> None:
        checks.append(Check(f"check{len(checks)}", kind, by, fails, limit, dict(limit_thresholds or {})))

    # Whole-portfolio blocks first: when the book is halted, that is the news for every account.
    add("schedule", "schedule", Pred("eq", "sched", 1))
    for lim in loss_limits:
        if lim.scope != "portfolio" or "*" not in thresholds[lim.name]:
            continue
        limit_scaled = ceil_scaled(thresholds[lim.name]["*"], scale)  # exact: the constant is a multiple of 1/S
        add("portfolio_loss", lim.name,
            conj(one_of("root", lim.instruments), Pred("lte", "ppnl", -limit_scaled)), lim, thresholds[lim.name])
    add("connection", "connection", Pred("eq", "connected", 0))
    add("paused", "paused", Pred("eq", "paused", 1))
    add("halted", "halted", Pred("eq", "halted", 1))
    add("instruments", "instruments", disj(*(
        conj(Pred("eq", "account", a.name), negate(one_of("root", a.instruments)))
        for a in ruleset.accounts.values() if a.instruments is not None
    )))
    for lim in loss_limits:
        if lim.scope != "account":
            continue
        per_account = thresholds[lim.name]
        fails = disj(*(
            conj(Pred("eq", "account", name), Pred("lte", "pnl", -ceil_scaled(t, scale)))
            for name, t in sorted(per_account.items())
        ))
        add("account_loss", lim.name, conj(one_of("root", lim.instruments), fails), lim, per_account)
    for lim in ruleset.limits:
        if lim.max_contracts is None:
            continue
        if lim.scope == "portfolio":
            add("portfolio_contracts", lim.name,
                conj(one_of("root", lim.instruments), Pred("gt", "pabs_after", lim.max_contracts)), lim)
        else:
            add("max_contracts", lim.name,
                conj(one_of("account", lim.accounts), one_of("root", lim.instruments),
                     Pred("gt", "abs_after", lim.max_contracts)), lim)
    add("margin_unknown", "margin", Pred("lt", "mpc", 0))
    # free x 100 x 10**j x S >= qty x (margin x S) x (100 + buffer) x 10**j, all integers.
    add("margin", "margin", Pred("lt", "free", ("mul", ("mul", ("m", "qty"), ("m", "mpc")), margin_factor)))
    return checks
