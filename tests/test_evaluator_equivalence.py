"""durable-rules and the pure-Python evaluator must make identical decisions on anything we can generate.

The Python evaluator is the fallback where durable-rules cannot be imported (Python 3.13+), so any difference is a
bug in one of them. Thousands of random rule sets, states and signals, each decided by both.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.decide import Engine, durable_available
from engine.evaluator import PythonRules, evaluate
from tests.test_decide_property import random_now, random_ruleset, random_signal, random_state

pytestmark = pytest.mark.skipif(not durable_available(), reason="durable-rules is not importable here")

CASES_PER_RULESET = 5


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_durable_and_python_decide_identically(seed: int) -> None:
    rng = random.Random(seed)
    ruleset = random_ruleset(rng)
    with Engine(ruleset, backend="durable") as durable, Engine(ruleset, backend="python") as python:
        assert durable.backend == "DurableRules" and python.backend == "PythonRules"
        for n in range(CASES_PER_RULESET):
            now = random_now(rng)
            state = random_state(rng, ruleset, now)
            signal = random_signal(rng, n)
            assert durable.decide(signal, state, now).to_json() == python.decide(signal, state, now).to_json()


def test_every_compiled_rule_is_a_flat_conjunction() -> None:
    """No ``$or`` reaches durable-rules: it expands them into DNF itself and fails past 2**14 paths."""
    rng = random.Random(7)
    for _ in range(200):
        engine = Engine(random_ruleset(rng), backend="python")
        for _name, _pri, cond in engine.compiled.rules:
            assert "$or" not in repr(cond)
        engine.close()


def test_python_rules_fire_the_lowest_priority_number() -> None:
    rules = PythonRules([("late", 2, {"k": "x"}), ("early", 1, {"$gte": {"v": 5}}), ("never", 0, {"k": "y"})])
    assert rules.post({"k": "x", "v": 6}) == "early"
    assert rules.post({"k": "x", "v": 4}) == "late"
    assert rules.post({"k": "z", "v": 1}) is None
    assert evaluate({"$lt": {"v": {"$mul": {"$l": {"$m": "q"}, "$r": 3}}}}, {"v": 8, "q": 3})
