"""Random rule sets, states and signals: deciding never raises, and no entry ever breaks a rule.

The invariants are checked against an independent reading of the rules (Decimal arithmetic straight from the
``RuleSet``), not against the compiled conditions. The generator is shared with the durable-vs-Python
equivalence test (tests/test_evaluator_equivalence.py).
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.catalog import Catalog
from engine.compile import loss_threshold
from engine.decide import Engine
from engine.decision import Decision
from engine.model import Account, Broker, Limit, Location, Risk, Routing, RoutingRule, RuleSet, Schedule, ScheduleRule
from engine.schedule import blocking_rule
from engine.signal import Signal
from engine.state import AccountState, EngineState
from engine.symbols import resolve

ROOTS = ("ES", "MES", "NQ", "MNQ")
STRATEGIES = ("s1", "s2", "s3")
HERE = Location("random.yaml", 1, 1)


def _money(rng: random.Random, low: int, high: int, places: int = 2) -> Decimal:
    return Decimal(rng.randint(low * 10**places, high * 10**places)) / 10**places


def _subset(rng: random.Random, items: tuple[str, ...] | list[str]) -> tuple[str, ...] | None:
    if rng.random() < 0.5:
        return None
    chosen = tuple(x for x in items if rng.random() < 0.5)
    return chosen or (items[0],)


def random_ruleset(rng: random.Random) -> RuleSet:
    brokers: dict[str, Broker] = {}
    for i in range(rng.randint(1, 3)):
        name = f"b{i}"
        commissions = {r: _money(rng, 0, 2) for r in ROOTS if rng.random() < 0.7}
        margins = {r: _money(rng, 10, 2000, rng.choice([0, 2, 3])) for r in ROOTS if rng.random() < 0.8}
        if rng.random() < 0.5:
            margins["default"] = _money(rng, 10, 2000)
        brokers[name] = Broker(name, "paper", "demo", {}, None, commissions, margins, 60, {}, {}, HERE)
    accounts: dict[str, Account] = {}
    for i in range(rng.randint(1, 6)):
        name = f"acc{i}"
        accounts[name] = Account(
            name=name, broker=rng.choice(list(brokers)), broker_account=name.upper(),
            capital=_money(rng, 1000, 100000, rng.choice([0, 2])),
            strategies=tuple(s for s in STRATEGIES if rng.random() < 0.6),
            size_multiplier=Decimal(rng.choice(["0", "0.25", "0.5", "1", "1", "1.5", "2"])),
            instruments=_subset(rng, ROOTS), catch_up=False, on_mismatch="adopt", source=HERE)
    rules = []
    for i in range(rng.randint(1, 6)):
        select = list(("cheapest_commission", "most_free_margin"))
        rng.shuffle(select)
        rules.append(RoutingRule(
            name=f"r{i}", strategies=_subset(rng, STRATEGIES), instruments=_subset(rng, ROOTS),
            mode=rng.choice(["mirror", "best"]), select=tuple(select[:rng.randint(0, 2)]),
            accounts=_subset(rng, list(accounts)) if rng.random() < 0.3 else None,
            brokers=_subset(rng, list(brokers)) if rng.random() < 0.2 else None,
            routing="main", source=HERE))
    limits = []
    for i in range(rng.randint(0, 5)):
        scope = rng.choice(["account", "portfolio"])
        kind = rng.choice(["loss", "pct", "both", "contracts"])
        limits.append(Limit(
            name=f"l{i}", scope=scope,
            max_daily_loss=_money(rng, 50, 3000) if kind in ("loss", "both") else None,
            max_daily_loss_pct=Decimal(rng.choice(["0.5", "1", "2", "2.5", "3.333"])) if kind in ("pct", "both")
            else None,
            max_contracts=rng.randint(0, 8) if kind == "contracts" else None,
            instruments=_subset(rng, ROOTS), accounts=_subset(rng, list(accounts)) if scope == "account" else None,
            on_breach="halt_entries", risk="risk", source=HERE))
    buffer = Decimal(rng.choice(["0", "12.5", "30", "33.333"])) if rng.random() < 0.8 else None
    schedules = []
    if rng.random() < 0.5:
        start = f"{rng.randint(0, 23):02d}:{rng.choice(['00', '30'])}"
        end = f"{rng.randint(0, 23):02d}:{rng.choice(['00', '30'])}"
        schedules.append(Schedule("sessions", "America/New_York", (ScheduleRule(
            name="block", action="block_entries", at=None, between=(start, end), before_close_minutes=None,
            days=("mon", "tue", "wed", "thu", "fri", "sat", "sun"), strategies=_subset(rng, STRATEGIES),
            accounts=None, schedule="sessions", source=HERE),), HERE))
    return RuleSet(brokers=brokers, accounts=accounts, routing=(Routing("main", tuple(rules), {}, HERE),),
                   risks=(Risk("risk", buffer, tuple(limits), HERE),), schedules=tuple(schedules),
                   catalog=Catalog(), content_hash="random")


def random_now(rng: random.Random) -> datetime:
    start = datetime(2026, 1, 2, tzinfo=timezone.utc)
    return start + timedelta(seconds=rng.randint(0, 360 * 86400))


def random_state(rng: random.Random, ruleset: RuleSet, now: datetime) -> EngineState:
    accounts = {}
    for name in ruleset.accounts:
        if rng.random() < 0.15:
            continue
        positions = {}
        for root in ROOTS:
            if rng.random() < 0.3:
                front = resolve(f"{root}1!", now, ruleset.catalog).contract
                previous = resolve(f"{root}1!", now - timedelta(days=rng.choice([0, 30, 95])), ruleset.catalog).contract
                positions[rng.choice([front, previous])] = rng.randint(-6, 6)
        account = ruleset.accounts[name]
        free = _money(rng, 0, 20000, rng.choice([0, 2, 4]))
        margin = ruleset.brokers[account.broker].margin(rng.choice(ROOTS))
        if margin is not None and rng.random() < 0.4:  # exactly at the buffer for some quantity
            free = rng.randint(1, 5) * margin * (100 + ruleset.margin_buffer_pct) / 100
            free += rng.choice([Decimal(0), Decimal(0), Decimal("-0.0001"), Decimal("0.0001")])
        pnl = _money(rng, -3000, 500)
        thresholds = [t for lim in ruleset.limits if (t := loss_threshold(lim, account.capital)) is not None]
        if thresholds and rng.random() < 0.4:  # exactly at a loss limit
            pnl = -rng.choice(thresholds) + rng.choice([Decimal(0), Decimal(0), Decimal("0.01")])
        by_strategy = None
        if rng.random() < 0.5:  # known per strategy: split the account's positions, some booked to no strategy
            by_strategy = {}
            for contract, qty in positions.items():
                for part in range(rng.randint(1, 3)):
                    owner = rng.choice(STRATEGIES + ("other", None))
                    share = qty if part == 0 else rng.randint(-3, 3)
                    if owner is not None:
                        book = by_strategy.setdefault(owner, {})
                        book[contract] = book.get(contract, 0) + share
                    if part:
                        positions[contract] += share
        accounts[name] = AccountState(
            connected=rng.random() < 0.85, free_margin=free, daily_pnl=pnl, positions=positions,
            halted="halted by operator" if rng.random() < 0.1 else None, strategy_positions=by_strategy)
    paused = frozenset(b for b in ruleset.brokers if rng.random() < 0.1)
    portfolio = _money(rng, -3000, 500) if rng.random() < 0.2 else None
    total_capital = sum((a.capital for a in ruleset.accounts.values()), Decimal(0))
    portfolio_limits = [t for lim in ruleset.limits if lim.scope == "portfolio"
                        and (t := loss_threshold(lim, total_capital)) is not None]
    if portfolio_limits and rng.random() < 0.3:
        portfolio = -rng.choice(portfolio_limits)
    return EngineState(accounts, paused, portfolio)


def random_signal(rng: random.Random, n: int) -> Signal:
    action = rng.choice(["buy", "buy", "sell", "sell", "exit", "cancel"])
    position = None
    size = None
    if action in ("buy", "sell") and rng.random() < 0.3:
        position = rng.choice(["long", "short", "flat"])
        size = 0 if position == "flat" else rng.randint(1, 6)
    return Signal(id=f"sig-{n}", strategy=rng.choice(STRATEGIES + ("other",)), ticker=f"{rng.choice(ROOTS)}1!",
                  action=action, quantity=rng.randint(1, 5) if action in ("buy", "sell") else None,
                  position=position, position_size=size)


def check_invariants(ruleset: RuleSet, state: EngineState, signal: Signal, now: datetime, decision: Decision) -> None:
    root = resolve(signal.ticker, now, ruleset.catalog).root
    buffer = ruleset.margin_buffer_pct
    portfolio_pnl = state.portfolio_daily_pnl
    if portfolio_pnl is None:
        portfolio_pnl = sum((a.daily_pnl for a in state.accounts.values()), Decimal(0))
    total_capital = sum((a.capital for a in ruleset.accounts.values()), Decimal(0))
    assert decision.accepted == bool(decision.orders)
    for order in decision.orders:
        account = ruleset.accounts[order.account]
        acc = state.accounts[order.account]
        assert order.quantity > 0 and order.side in ("buy", "sell")
        assert account.size_multiplier != 0
        signed = order.quantity if order.side == "buy" else -order.quantity
        if order.intent == "exit":  # closes the signal's strategy's own position, never another's
            held = acc.strategy_held(signal.strategy, root).get(order.contract, 0)
            assert held != 0 and (held > 0) != (signed > 0) and order.quantity <= abs(held), order
            continue
        assert order.contract == resolve(signal.ticker, now, ruleset.catalog).contract
        assert acc.connected and account.broker not in state.paused and not acc.halted
        assert account.instruments is None or root in account.instruments
        assert blocking_rule(ruleset.schedule_rules, now, strategy=signal.strategy, account=account.name) is None
        margin = ruleset.brokers[account.broker].margin(root)
        assert margin is not None
        assert acc.free_margin * 100 >= order.quantity * margin * (100 + buffer), order
        assert order.margin_usd == order.quantity * margin
        net_after = sum(acc.held(root).values()) + sum(
            (o.quantity if o.side == "buy" else -o.quantity) for o in decision.orders if o.account == order.account)
        for lim in ruleset.limits:
            if lim.instruments is not None and root not in lim.instruments:
                continue
            if lim.scope == "account" and lim.accounts is not None and account.name not in lim.accounts:
                continue
            capital = total_capital if lim.scope == "portfolio" else account.capital
            threshold = loss_threshold(lim, capital)
            pnl = portfolio_pnl if lim.scope == "portfolio" else acc.daily_pnl
            if threshold is not None:
                assert pnl > -threshold, (lim.name, pnl, threshold)
            if lim.max_contracts is not None and lim.scope == "account":
                assert abs(net_after) <= lim.max_contracts, (lim.name, net_after)
            if lim.max_contracts is not None and lim.scope == "portfolio":
                book = sum(abs(sum(a.held(root).values()) + sum(
                    (o.quantity if o.side == "buy" else -o.quantity) for o in decision.orders if o.account == name))
                    for name, a in state.accounts.items())
                assert book <= lim.max_contracts, (lim.name, book)
    rule = next((r for r in ruleset.routing_rules if r.name == decision.rule), None)
    if rule is not None and rule.mode == "best" and signal.is_target:
        # Best mode: after a target signal, at most one target account holds the strategy's position.
        if rule.accounts is not None:
            targets = [ruleset.accounts[n] for n in rule.accounts if n in ruleset.accounts]
        elif rule.brokers is not None:
            targets = [a for a in ruleset.accounts.values() if a.broker in rule.brokers]
        else:
            targets = [a for a in ruleset.accounts.values() if signal.strategy in a.strategies]
        after = {}
        for account in targets:
            acc = state.accounts.get(account.name)
            if acc is None or account.size_multiplier == 0:
                continue
            after[account.name] = sum(acc.strategy_held(signal.strategy, root).values()) + sum(
                (o.quantity if o.side == "buy" else -o.quantity) for o in decision.orders if o.account == account.name)
        assert sum(1 for net in after.values() if net) <= 1, (after, decision.to_json())


def run_case(rng: random.Random, ruleset: RuleSet, engine: Engine, n: int) -> Decision:
    now = random_now(rng)
    state = random_state(rng, ruleset, now)
    signal = random_signal(rng, n)
    decision = engine.decide(signal, state, now)
    check_invariants(ruleset, state, signal, now, decision)
    return decision


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_random_decisions_never_raise_and_never_break_a_limit(seed: int) -> None:
    rng = random.Random(seed)
    ruleset = random_ruleset(rng)
    with Engine(ruleset) as engine:
        for n in range(8):
            run_case(rng, ruleset, engine, n)
