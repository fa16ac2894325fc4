"""The compiled condition format, and a pure-Python evaluator of it.

Rules compile (``engine.compile``) into conditions on one flat message, written in a subset of durable-rules'
own expression language so that the very same JSON is handed to the durable-rules C core:

- ``{"field": value}`` equality; ``{"$neq": {"field": value}}``;
- ``{"$lt" | "$lte" | "$gt" | "$gte": {"field": operand}}`` where an operand is an integer, ``{"$m": "other"}``
  (another field of the same message) or ``{"$mul": {"$l": operand, "$r": operand}}``;
- ``{"$and": [...]}`` and ``{"$or": [...]}`` (never empty).

Message values are ``int`` or ``str`` only (``check_message``), because durable-rules compares a string with a
number as text and saturates integers past 2**63; money therefore travels as scaled integers. A compared field
missing from the message makes the comparison false, as in durable-rules. A field *referenced* through ``$m`` must
be present: durable-rules then answers inconsistently (both ``<`` and ``>=`` hold), so the engine builds every
message with every field.

Why a second evaluator: durable-rules is a C extension that does not build on Python 3.13+, and an evaluator we can
read is the oracle for property tests that run both on thousands of random rule sets and require identical
decisions. ``PythonRules`` mirrors the one behaviour of durable-rules we rely on: a posted message fires exactly
one rule, the matching rule with the lowest ``pri``, or none (durable-rules raises ``MessageNotHandledException``).
"""

from __future__ import annotations

from typing import Any, Mapping

Condition = dict[str, Any]
Message = Mapping[str, Any]

MAX_INT = 2**62
"""Largest magnitude a message integer may have: products of two fields must stay far from durable's int64."""

_CMP = ("$lt", "$lte", "$gt", "$gte")


class MessageError(ValueError):
    """A message that durable-rules would misjudge (wrong type or an integer out of range)."""


def check_message(message: Message) -> None:
    """Refuse values durable-rules would compare wrongly, naming the field."""
    for value in message.values():  # the fast path: every decision posts several messages
        kind = type(value)
        if not (kind is str or (kind is int and -MAX_INT <= value <= MAX_INT)):
            break
    else:
        return
    for key, value in message.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise MessageError(f"message field {key!r}: {type(value).__name__} is not allowed (int or str only)")
        if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
            raise MessageError(f"message field {key!r}: {value} is out of range (|value| <= 2**62)")


def _operand(spec: Any, message: Message) -> Any:
    if isinstance(spec, dict):
        if "$m" in spec:
            return message.get(spec["$m"])
        if "$mul" in spec:
            left = _operand(spec["$mul"]["$l"], message)
            right = _operand(spec["$mul"]["$r"], message)
            if left is None or right is None:
                return None
            return left * right
        raise ValueError(f"unknown operand {spec!r}")
    return spec


def evaluate(cond: Condition, message: Message) -> bool:
    """Whether ``message`` satisfies ``cond`` (the same answer durable-rules gives for our subset)."""
    if len(cond) != 1:
        # A multi-key object is an implicit conjunction in durable-rules; the compiler never emits one, but the
        # evaluator stays faithful.
        return all(evaluate({k: v}, message) for k, v in cond.items())
    ((op, arg),) = cond.items()
    if op == "$and":
        return all(evaluate(c, message) for c in arg)
    if op == "$or":
        return any(evaluate(c, message) for c in arg)
    if op == "$neq":
        ((field, value),) = arg.items()
        return field in message and message[field] != value
    if op in _CMP:
        ((field, spec),) = arg.items()
        left = message.get(field)
        right = _operand(spec, message)
        if left is None or right is None or type(left) is not type(right):
            return False
        if op == "$lt":
            return bool(left < right)
        if op == "$lte":
            return bool(left <= right)
        if op == "$gt":
            return bool(left > right)
        return bool(left >= right)
    if op.startswith("$"):
        raise ValueError(f"unsupported operator {op!r}")
    return op in message and message[op] == arg


class PythonRules:
    """A stateless rule set: ``post`` returns the name of the rule that fires, or None.

    Of the rules a message satisfies, the one with the lowest priority number fires (ties: the earlier rule), the
    behaviour of durable-rules with ``pri`` when a single event can be consumed by one rule only.
    """

    def __init__(self, rules: "list[tuple[str, int, Condition]]") -> None:
        ordered = sorted(enumerate(rules), key=lambda item: (item[1][1], item[0]))
        self._rules = [(name, cond) for _, (name, _pri, cond) in ordered]

    def post(self, message: Message) -> str | None:
        check_message(message)
        for name, cond in self._rules:
            if evaluate(cond, message):
                return name
        return None

    def matching(self, message: Message) -> list[str]:
        """Every rule whose condition holds, highest priority first."""
        return [name for name, cond in self._rules if evaluate(cond, message)]

    def close(self) -> None:
        self._rules = []
