"""The decision path's shortcuts are exact: each gives what the slow, obvious code it replaces gives.

(The shortcuts exist for speed, see benchmarks/engine.py; nothing here times anything.) Covered: the flat JSON
encoder and the entry-message template against ``json.dumps``; the fired-rule reader of ``DurableRules``; the
trading-day bounds against ``trading_day``; integer quantity and money scaling against Decimal rounding; the engine's
written entry texts against the encoder; account-scoped schedule blocks (computed per account, not per decision).
"""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.compile import ceil_scaled, floor_scaled, scaled
from engine.decide import (ENTRY_FIELDS, DurableRules, Engine, EngineError, durable_available, round_half_up,
                           scale_quantity)
from engine.evaluator import MAX_INT, MessageError, Template, check_message, flat_json, referenced_fields
from engine.model import Schedule, ScheduleRule
from engine.sessions import ET, trading_day, trading_day_bounds
from engine.signal import parse_signal
from engine.state import AccountState, EngineState, parse_state
from engine.symbols import SymbolError, resolve
from tests.test_decide_fixtures import RICH, load, state_doc
from tests.test_decide_property import HERE, random_ruleset, run_case

needs_durable = pytest.mark.skipif(not durable_available(), reason="durable-rules is not importable here")

keys = st.text(min_size=1, max_size=8)
values = st.one_of(st.text(max_size=12), st.integers(min_value=-MAX_INT, max_value=MAX_INT))


def dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


# -- the encoder and the template -------------------------------------------------------------------------------

@given(message=st.dictionaries(keys, values, max_size=10), data=st.data())
def test_flat_json_writes_what_json_dumps_writes(message: dict[str, Any], data: st.DataObject) -> None:
    assert flat_json(message) == dumps(message)
    sent = frozenset(data.draw(st.sets(st.sampled_from(sorted(message))) if message else st.just(set())))
    assert flat_json(message, sent) == dumps({k: v for k, v in message.items() if k in sent})


@pytest.mark.parametrize("bad", [True, 1.5, None, MAX_INT + 1, -MAX_INT - 1, Decimal(1)])
def test_flat_json_refuses_what_check_message_refuses_even_in_fields_it_leaves_out(bad: Any) -> None:
    message = {"k": "e", "unsent": bad}
    with pytest.raises(MessageError):
        check_message(message)
    with pytest.raises(MessageError, match="'unsent'"):
        flat_json(message, frozenset({"k"}))


@given(fields=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=8, unique=True), data=st.data())
def test_a_template_writes_what_json_dumps_writes(fields: list[str], data: st.DataObject) -> None:
    message = {name: data.draw(values) for name in fields}
    sent = frozenset(data.draw(st.sets(st.sampled_from(fields))))
    encoded = [json.dumps(v, ensure_ascii=False) if isinstance(v, str) else v for v in message.values()]
    assert Template(fields, sent).write(*encoded) == dumps({k: v for k, v in message.items() if k in sent})
    assert Template(fields).write(*encoded) == dumps(message)


def test_referenced_fields_are_every_compared_or_referenced_field() -> None:
    conditions = [{"$and": [{"k": "e"}, {"$neq": {"a": "x"}}]},
                  {"$or": [{"$lt": {"v": {"$mul": {"$l": {"$m": "q"}, "$r": 3}}}}, {"$gte": {"w": {"$m": "z"}}}]}]
    assert referenced_fields(conditions) == {"k", "a", "v", "q", "w", "z"}
    with pytest.raises(ValueError, match="unsupported operator"):
        referenced_fields([{"$nex": {"a": 1}}])


# -- reading the fired rule -------------------------------------------------------------------------------------

class _Started:
    """A durable-rules core whose started action is a canned text (the real core for everything else)."""

    def __init__(self, real: Any, action: str) -> None:
        self.real, self.action = real, action

    def assert_event(self, handle: Any, text: str) -> Any:
        return (0, 0)

    def start_action_for_state(self, handle: Any, state: Any) -> Any:
        return ("{}", self.action)

    def complete_and_start_action(self, handle: Any, state: Any) -> Any:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@needs_durable
@pytest.mark.parametrize("action,fired", [
    ('{"a":{"m":{"k":"e","v":1}}}', "a"),                                     # the fast path
    ('{"a": {"m": {"k": "e", "v": 1}}}', "a"),                                # reformatted: parsed in full
    ('{"a":{"m":{"k":"e","v":1}},"b":{"m":{"k":"e","v":1}}}', None),          # two rules: refused
    ('{"b":{"m":{"k":"e","v":1}},"a":{"m":{"k":"e","v":1}}}', None),
    ('{"a":{"m":{"k":"e","v":2}}}', "a"),                                     # another echo: parsed in full
])
def test_the_fired_rule_is_read_exactly_and_two_fired_rules_are_refused(action: str, fired: str | None) -> None:
    rules = DurableRules([("a", 0, {"k": "e"}), ("b", 1, {"$and": [{"k": "e"}, {"$gte": {"v": 0}}]})])
    real = rules._core
    rules._core = _Started(real, action)
    try:
        if fired is None:
            with pytest.raises(EngineError, match="more than one rule"):
                rules.post({"k": "e", "v": 1})
        else:
            assert rules.post({"k": "e", "v": 1}) == fired
    finally:
        rules._core = real
        rules.close()


@needs_durable
def test_durable_posts_only_the_fields_its_rules_read_and_answers_the_same() -> None:
    rules = DurableRules([("hit", 0, {"$and": [{"k": "e"}, {"$gt": {"v": 5}}]})])
    sent: list[str] = []
    real = rules._core

    class Spy:
        def assert_event(self, handle: Any, text: str) -> Any:
            sent.append(text)
            return real.assert_event(handle, text)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    rules._core = Spy()
    try:
        assert rules.text_fields == {"k", "v"}
        assert rules.post({"k": "e", "other": "x", "v": 6}) == "hit"
        assert rules.post({"k": "e", "other": "x", "v": 5}) is None
        assert sent == ['{"k":"e","v":6}', '{"k":"e","v":5}']
    finally:
        rules._core = real
        rules.close()


# -- the engine's entry texts -----------------------------------------------------------------------------------

@needs_durable
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_entry_texts_the_engine_writes_are_what_the_encoder_writes(seed: int) -> None:
    rng = random.Random(seed)
    ruleset = random_ruleset(rng)
    with Engine(ruleset, backend="durable") as engine:
        posted: list[tuple[dict[str, Any], str | None]] = []
        real = engine.rules.post

        def spy(message: Any, text: str | None = None) -> str | None:
            posted.append((dict(message), text))
            return real(message, text)

        engine.rules.post = spy  # type: ignore[method-assign]
        for n in range(5):
            run_case(rng, ruleset, engine, n)
        for message, text in posted:
            if message["k"] == "entry":
                assert tuple(message) == ENTRY_FIELDS
                assert text == flat_json(message, engine.rules.text_fields)
            else:
                assert text is None


@pytest.mark.parametrize("backend", ["durable", "python"])
def test_an_entry_message_out_of_range_is_refused_by_both_backends(backend: str, tmp_path: Path) -> None:
    if backend == "durable" and not durable_available():
        pytest.skip("durable-rules is not importable here")
    with Engine(load(tmp_path), backend=backend) as engine:
        signal = parse_signal({"strategy": "scalp", "ticker": "MES1!", "action": "buy", "quantity": 1})
        state = EngineState({"a1": AccountState(True, Decimal(10) ** 17, Decimal(0))})
        with pytest.raises(MessageError, match="'free'"):
            engine.decide(signal, state, datetime(2026, 3, 10, 15, tzinfo=timezone.utc))


# -- time, quantities and money ---------------------------------------------------------------------------------

@given(seconds=st.integers(min_value=0, max_value=3 * 366 * 86400))
def test_trading_day_bounds_hold_exactly_the_instants_of_that_trading_day(seconds: int) -> None:
    at = datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    day = trading_day(at)
    start, end = trading_day_bounds(day)
    assert start <= at < end
    assert trading_day(start) == day and trading_day(start - timedelta(microseconds=1)) == day - timedelta(days=1)
    assert trading_day(end) == day + timedelta(days=1)
    assert trading_day(end - timedelta(microseconds=1)) == day


@pytest.mark.parametrize("day", [date(2026, 3, 9), date(2026, 3, 8), date(2026, 11, 2), date(2026, 11, 1)])
def test_trading_day_bounds_across_dst_changes(day: date) -> None:
    start, end = trading_day_bounds(day)
    assert trading_day(start) == day and trading_day(end) == day + timedelta(days=1)
    assert end - start in (timedelta(hours=23), timedelta(hours=24), timedelta(hours=25))


@given(quantity=st.integers(min_value=-10**6, max_value=10**6),
       multiplier=st.decimals(min_value=-100, max_value=100, places=4, allow_nan=False, allow_infinity=False))
def test_integer_quantity_scaling_rounds_as_decimal_half_up(quantity: int, multiplier: Decimal) -> None:
    assert scale_quantity(quantity, multiplier.as_integer_ratio()) == round_half_up(Decimal(quantity) * multiplier)


@given(value=st.decimals(min_value=-10**12, max_value=10**12, allow_nan=False, allow_infinity=False),
       digits=st.integers(min_value=0, max_value=8))
def test_money_scaling_rounds_as_the_decimal_roundings(value: Decimal, digits: int) -> None:
    scale = 10**digits
    assert ceil_scaled(value, scale) == scaled(value, scale, ROUND_CEILING)
    assert floor_scaled(value, scale) == scaled(value, scale, ROUND_FLOOR)


# -- per-generation and per-decision constants ------------------------------------------------------------------

def test_resolved_tickers_are_kept_per_eastern_date_and_errors_are_not(tmp_path: Path) -> None:
    with Engine(load(tmp_path), backend="python") as engine:
        catalog = engine.ruleset.catalog
        for now in (datetime(2026, 3, 11, 3, tzinfo=timezone.utc), datetime(2026, 3, 12, 3, tzinfo=timezone.utc),
                    datetime(2026, 3, 12, 5, tzinfo=timezone.utc)):  # the roll day begins at midnight ET
            local = now.astimezone(ET).date()
            assert engine._resolve("MES1!", now, local) == resolve("MES1!", now, catalog)
        for _ in range(2):
            with pytest.raises(SymbolError):
                engine._resolve("MESH5", now, local)  # expired in March 2025


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_schedule_blocks_scoped_to_accounts_block_those_accounts_only(seed: int) -> None:
    rng = random.Random(seed)
    ruleset = random_ruleset(rng)
    scoped = tuple(a for a in ruleset.accounts if rng.random() < 0.5) or (next(iter(ruleset.accounts)),)
    start = f"{rng.randint(0, 23):02d}:00"
    end = f"{rng.randint(0, 23):02d}:30"
    block = ScheduleRule(name="scoped", action="block_entries", at=None, between=(start, end), before_close_minutes=None,
                         days=("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
                         strategies=None, accounts=scoped, schedule="scoped", source=HERE)
    ruleset = dataclasses.replace(ruleset, schedules=(*ruleset.schedules, Schedule("scoped", "America/New_York",
                                                                                   (block,), HERE)))
    with Engine(ruleset, backend="python") as engine:
        assert engine._block_per_account
        for n in range(6):
            run_case(rng, ruleset, engine, n)  # asserts blocking_rule(..., account=...) is None for every entry


def test_a_schedule_block_for_one_account_names_it_and_lets_the_others_enter(tmp_path: Path) -> None:
    ruleset = load(tmp_path)
    block = ScheduleRule(name="a1-quiet", action="block_entries", at=None, between=("09:00", "11:00"),
                         before_close_minutes=None, days=("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
                         strategies=None, accounts=("a1",), schedule="q", source=HERE)
    ruleset = dataclasses.replace(ruleset, schedules=(*ruleset.schedules, Schedule("q", "America/New_York",
                                                                                   (block,), HERE)))
    with Engine(ruleset) as engine:
        now, state = parse_state(state_doc({"a1": RICH, "a2": RICH}, now="2026-03-10T10:00:00-04:00"))
        decision = engine.decide(parse_signal({"strategy": "scalp", "ticker": "MES1!", "action": "buy",
                                               "quantity": 2}), state, now).to_json()
    assert [(o["account"], o["quantity"]) for o in decision["orders"]] == [("a2", 1)]
    a1 = [s for s in decision["skipped"] if s["account"] == "a1"]
    assert a1 == [{"account": "a1", "reason": "entries blocked by schedule rule a1-quiet (09:00-11:00 ET)",
                   "by": "a1-quiet"}]
