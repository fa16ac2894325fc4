"""The compiled condition format: the pure-Python evaluator answers as durable-rules does, operator by operator,
and messages durable-rules would misjudge are refused before they are posted."""

from __future__ import annotations

from typing import Any

import pytest

from engine.decide import DurableRules, EngineError, durable_available, make_rules
from engine.evaluator import MAX_INT, MessageError, PythonRules, check_message

needs_durable = pytest.mark.skipif(not durable_available(), reason="durable-rules is not importable here")

CONDITIONS: list[tuple[str, dict[str, Any]]] = [
    ("eq", {"$and": [{"k": "e"}, {"a": "x"}]}),
    ("neq", {"$and": [{"k": "e"}, {"$neq": {"a": "x"}}]}),
    ("lt", {"$and": [{"k": "e"}, {"$lt": {"v": 5}}]}),
    ("lte", {"$and": [{"k": "e"}, {"$lte": {"v": -5}}]}),
    ("gt", {"$and": [{"k": "e"}, {"$gt": {"v": 5}}]}),
    ("gte", {"$and": [{"k": "e"}, {"$gte": {"v": {"$m": "w"}}}]}),
    ("mul", {"$and": [{"k": "e"}, {"$lt": {"v": {"$mul": {"$l": {"$mul": {"$l": {"$m": "q"}, "$r": {"$m": "w"}}},
                                                           "$r": 130}}}}]}),
]
MESSAGES = [
    {"k": "e", "a": "x", "v": 5, "w": 5, "q": 1},
    {"k": "e", "a": "y", "v": -5, "w": 4, "q": 0},
    {"k": "e", "a": "x", "v": 649, "w": 5, "q": 1},
    {"k": "e", "a": "x", "v": 650, "w": 5, "q": 1},
    {"k": "e", "a": "x", "v": 2**53 + 1, "w": 2**53 + 1, "q": 1},   # past float precision, still exact
    {"k": "e", "a": "x", "v": 2**53, "w": 2**53 + 1, "q": 1},
    {"k": "f", "a": "x", "v": 1, "w": 1, "q": 1},
    {"k": "e", "w": 1, "q": 1},                                       # compared field missing: false
]


@needs_durable
@pytest.mark.parametrize("name,cond", CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_each_operator_matches_durable_rules(name: str, cond: dict[str, Any]) -> None:
    durable = DurableRules([("hit", 0, cond)])
    python = PythonRules([("hit", 0, cond)])
    try:
        for message in MESSAGES:
            assert durable.post(message) == python.post(message), message
    finally:
        durable.close()


@needs_durable
def test_durable_fires_only_the_lowest_priority_number() -> None:
    rules = [("c", 2, {"k": "e"}), ("a", 0, {"$and": [{"k": "e"}, {"$gte": {"v": 5}}]}),
             ("b", 1, {"$and": [{"k": "e"}, {"$gte": {"v": 3}}]})]
    durable = DurableRules(rules)
    try:
        assert [durable.post({"k": "e", "v": v}) for v in (6, 4, 1)] == ["a", "b", "c"]
        assert durable.post({"k": "z", "v": 6}) is None   # MessageNotHandledException means "no match"
    finally:
        durable.close()


@pytest.mark.parametrize("message,problem", [
    ({"v": True}, "bool is not allowed"),
    ({"v": 1.5}, "float is not allowed"),
    ({"v": None}, "NoneType is not allowed"),
    ({"v": MAX_INT + 1}, "out of range"),
    ({"v": -MAX_INT - 1}, "out of range"),
])
def test_messages_durable_would_misjudge_are_refused(message: dict[str, Any], problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        check_message(message)
    with pytest.raises(MessageError):
        PythonRules([("x", 0, {"k": "e"})]).post(message)


class _Core:
    """A durable-rules core that answers one assert_event with a canned result."""

    def __init__(self, real: Any, assert_result: Any, started: Any = None, more: Any = None) -> None:
        self.real, self.assert_result, self.started, self.more = real, assert_result, started, more

    def assert_event(self, handle: Any, text: str) -> Any:
        return self.assert_result

    def start_action_for_state(self, handle: Any, state: Any) -> Any:
        return self.started

    def complete_and_start_action(self, handle: Any, state: Any) -> Any:
        return self.more

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@needs_durable
@pytest.mark.parametrize("assert_result,started,more,problem", [
    ((2, 0), None, None, "refused the message"),                        # MessageObserved
    ((0, 0), None, None, "started no action"),
    ((0, 0), ("{}", '{"a": {}, "b": {}}'), None, "more than one rule"),
    ((0, 0), ("{}", '{"a": {}}'), "another action", "more than one rule"),
])
def test_anything_unexpected_from_the_core_is_raised_not_swallowed(assert_result: Any, started: Any, more: Any,
                                                                   problem: str) -> None:
    rules = DurableRules([("x", 0, {"k": "e"})])
    real = rules._core
    rules._core = _Core(real, assert_result, started, more)
    try:
        with pytest.raises(EngineError, match=problem):
            rules.post({"k": "e"})
    finally:
        rules._core = real
        rules.close()


def test_python_backend_is_chosen_on_request_and_empty_rule_sets_match_nothing() -> None:
    assert isinstance(make_rules([("x", 0, {"k": "e"})], "python"), PythonRules)
    assert make_rules([], "auto").post({"k": "e"}) is None


def test_fallback_is_announced_when_durable_cannot_be_imported(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    import engine.decide as decide_module

    monkeypatch.setattr(decide_module, "durable_available", lambda: False)
    monkeypatch.setattr(decide_module, "_fallback_announced", False)
    with caplog.at_level("WARNING", logger="multibroker.engine"):
        rules = decide_module.make_rules([("x", 0, {"k": "e"})])
    assert isinstance(rules, PythonRules)
    assert "pure-Python rule evaluator" in caplog.text
