"""Compilation: rules become flat prioritized conjunctions with exact integer money thresholds."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from engine.compile import (FALSE, TRUE, CompileError, Pred, ceil_scaled, compile_ruleset, conj, disj, dnf,
                            floor_scaled, negate)
from tests.test_decide_fixtures import RULES, load


def test_routing_rules_keep_their_order_as_priority(tmp_path: Path) -> None:
    compiled = compile_ruleset(load(tmp_path))
    routes = [(name, pri, compiled.routes[name].name) for name, pri, _ in compiled.rules if name.startswith("route")]
    assert routes == [("route0.0", 0, "mirror-scalp"), ("route1.0", 1, "best-trend"), ("route2.0", 2, "odd")]
    assert dict((n, c) for n, _, c in compiled.rules)["route2.0"] == {
        "$and": [{"k": "route"}, {"strategy": "odd"}, {"root": "MES"}]}


def test_checks_come_in_the_order_a_trader_reads_them_and_ok_is_last(tmp_path: Path) -> None:
    compiled = compile_ruleset(load(tmp_path))
    kinds = list(dict.fromkeys(compiled.checks[n].kind for n, _, _ in compiled.rules if n in compiled.checks))
    assert kinds == ["schedule", "portfolio_loss", "connection", "paused", "halted", "instruments", "account_loss",
                     "max_contracts", "margin_unknown", "margin"]
    name, pri, cond = compiled.rules[-1]
    assert name == "ok" and pri == max(p for _, p, _ in compiled.rules) and cond == {"k": "entry"}


def test_capital_based_thresholds_are_compiled_per_account(tmp_path: Path) -> None:
    compiled = compile_ruleset(load(tmp_path))
    loss = [(n, c) for n, _, c in compiled.rules if n in compiled.checks and compiled.checks[n].kind == "account_loss"]
    assert {n: c["$and"][1:] for n, c in loss}["check6.0"] == [{"account": "a1"}, {"$lte": {"pnl": -20000}}]
    assert compiled.scale == 100


def test_scale_covers_every_money_constant(tmp_path: Path) -> None:
    text = RULES.replace("margins: {MES: 100, ES: 1000, default: 1000}", "margins: {MES: 100.125, default: 1000}")
    text = text.replace("margin_buffer_pct: 30", "margin_buffer_pct: 12.5")
    compiled = compile_ruleset(load(tmp_path, text))
    assert compiled.scale == 1000
    assert (compiled.margin_factor, compiled.margin_factor_scale) == (1125, 10)


@pytest.mark.parametrize("value,floor,ceil", [("1.005", 100, 101), ("-1.005", -101, -100), ("2", 200, 200)])
def test_state_values_round_towards_the_exact_side(value: str, floor: int, ceil: int) -> None:
    assert floor_scaled(Decimal(value), 100) == floor and ceil_scaled(Decimal(value), 100) == ceil


def test_negation_and_dnf() -> None:
    a, b, c = Pred("eq", "a", 1), Pred("lt", "b", 2), Pred("gte", "c", 3)
    assert negate(conj(a, b)) == disj(Pred("neq", "a", 1), Pred("gte", "b", 2))
    assert dnf(conj(disj(a, b), c)) == [(a, c), (b, c)]
    assert dnf(TRUE) == [()] and dnf(FALSE) == [] and conj(a, FALSE) == FALSE and disj(a, TRUE) == TRUE


def test_a_condition_too_large_for_the_engine_is_refused() -> None:
    huge = conj(*(disj(Pred("eq", "a", i), Pred("eq", "b", i)) for i in range(14)))
    with pytest.raises(CompileError, match="too large"):
        dnf(huge)
