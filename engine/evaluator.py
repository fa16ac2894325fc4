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

from functools import lru_cache
from json.encoder import encode_basestring
from typing import Any, Iterable, Mapping, Sequence

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


@lru_cache(maxsize=1024)
def _json_key(key: str) -> str:
    return encode_basestring(key) + ":"


def flat_json(message: Message, fields: frozenset[str] | None = None) -> str:
    """The text ``json.dumps(message, ensure_ascii=False, separators=(",", ":"))`` gives, keeping only ``fields``
    (None: every field) in the message's order; refuses what ``check_message`` refuses, every field (sent or not)
    checked in the same pass.

    Why not ``json.dumps`` after ``check_message``: two generic passes over every field cost more than the rules
    engine's own parse of the text, and every decision posts one message per account. Strings go through
    ``encode_basestring``, the very function ``json.dumps`` uses with ``ensure_ascii=False``; an int prints as
    ``int.__repr__``, as in ``json``.
    """
    parts = []
    for key, value in message.items():
        kind = type(value)
        if kind is int and -MAX_INT <= value <= MAX_INT:
            if fields is None or key in fields:
                parts.append(_json_key(key) + int.__repr__(value))
        elif kind is str:
            if fields is None or key in fields:
                parts.append(_json_key(key) + encode_basestring(value))
        else:
            check_message(message)  # raises, naming the field
            raise AssertionError(f"check_message accepted {key!r}: {value!r}")  # pragma: no cover
    return "{" + ",".join(parts) + "}"


class Template:
    """Writes messages of one layout known in advance (field names in order) as ``flat_json`` writes them.

    Why: the engine posts one entry message per candidate account, and a format string generated once per rules
    generation writes one in a quarter of the time of any generic encoder. ``write`` takes every field's value in
    layout order: strings already encoded by ``encode_basestring``, ints as they are; fields outside ``sent`` are
    skipped. The caller guarantees what ``check_message`` would check (exact ints within +-MAX_INT, strings), or
    posts without a text and lets the backend encode and check the message.
    """

    def __init__(self, fields: Sequence[str], sent: frozenset[str] | None = None) -> None:
        self.fields = tuple(fields)
        pieces = [_json_key(name).replace("{", "{{").replace("}", "}}") + f"{{{i}}}"
                  for i, name in enumerate(self.fields) if sent is None or name in sent]
        self.write = ("{{" + ",".join(pieces) + "}}").format


def referenced_fields(conditions: Iterable[Condition]) -> frozenset[str]:
    """Every message field the conditions read (compared, or referenced through ``$m``).

    A field no condition reads cannot change which rule fires, so a backend may leave it out of what it sends.
    """
    found: set[str] = set()

    def operand(spec: Any) -> None:
        if isinstance(spec, dict):
            if "$m" in spec:
                found.add(spec["$m"])
            elif "$mul" in spec:
                operand(spec["$mul"]["$l"])
                operand(spec["$mul"]["$r"])
            else:
                raise ValueError(f"unknown operand {spec!r}")

    def walk(cond: Condition) -> None:
        for op, arg in cond.items():
            if op in ("$and", "$or"):
                for item in arg:
                    walk(item)
            elif op == "$neq" or op in _CMP:
                for field, spec in arg.items():
                    found.add(field)
                    operand(spec)
            elif op.startswith("$"):
                raise ValueError(f"unsupported operator {op!r}")
            else:
                found.add(op)

    for cond in conditions:
        walk(cond)
    return frozenset(found)


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

    text_fields = None
    """Reads the message itself, never its text."""

    def __init__(self, rules: "Sequence[tuple[str, int, Condition]]") -> None:
        ordered = sorted(enumerate(rules), key=lambda item: (item[1][1], item[0]))
        self._rules = [(name, cond) for _, (name, _pri, cond) in ordered]

    def post(self, message: Message, text: str | None = None) -> str | None:
        """The rule that fires for ``message`` (``text``, its JSON, is for backends that parse text: unused)."""
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
