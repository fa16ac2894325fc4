"""The hand-written signal check agrees with jsonschema, so skipping jsonschema for valid bodies changes nothing.

``parse_signal`` runs jsonschema only when ``_certainly_valid`` does not vouch for the body. That is safe if the
fast check never vouches for a body the schema refuses (it may be unsure about one the schema accepts: then
jsonschema decides, as before). Random bodies are valid ones with a few edits: boundary values and hostile ones
(bools where integers are expected, huge integers, floats, NaN, unicode, nested JSON, unknown keys, missing
fields). For each, the fast verdict is compared with the schema's, and ``parse_signal`` with the fast path is
compared with ``parse_signal`` forced through jsonschema (same Signal, or the same error message).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import schemas
from engine import signal as sig
from engine.signal import SignalError, parse_signal

SCHEMA = schemas.load(schemas.SIGNAL_FILE)

_STRS = st.text(max_size=12) | st.sampled_from(["", " ", "\n", "é", "ＥＳ１！", "\u0000", "ß", "İ"])
_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), _STRS,
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _length(n: int, ch: str = "a") -> st.SearchStrategy[str]:
    return st.sampled_from([ch * k for k in (n - 1, n, n + 1) if k >= 0])


# Per field: boundary and near-miss values (hostile values of any type come from _JUNK, drawn separately so that
# hypothesis's flattening of one_of does not drown these few in junk).


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "secret": st.just("s3cret"),
    "strategy": st.sampled_from(["trend", "é", "s" * 64]) | _length(1) | _length(64),
    "ticker": st.sampled_from(["ES1!", "cme_mini:es1!", "ESH2026", " mesz6 ", "ES1!!", "E", "ES1!\n", "ES:",
                               ":ES", "ＥＳ１", "ÉS1", "ES-1"]) | _length(2, "E") | _length(40, "E"),
    "action": st.sampled_from(["buy", "SELL", " Exit ", "cancel", "hold", "buy\n", "BUY "]),
    "quantity": st.integers(min_value=-2, max_value=100002) | st.sampled_from(
        [0, 1, 100000, 100001, True, False, 2.0, 2.5, 1e300, "1", "2", "01", "0", "999999", "1000000", "3\n",
         " 3", "٣", 10**30, -(10**30), float("nan")]),
    "order_type": st.sampled_from(["market", "LIMIT", "stop ", "stop_limit", ""]),
    "price": st.sampled_from([6000, 6000.25, 0, 0.0, -1, -0.0, 1e-300, True, "6000.25", "6000.", ".5", "1e3",
                              "6000.25\n", "٦", float("inf"), float("nan"), 10**40]),
    "position": st.sampled_from(["long", "SHORT", " flat", "none", ""]),
    "position_size": st.integers(min_value=-2, max_value=100002) | st.sampled_from(
        [0, True, 3.0, "0", "000000", "1234567", "12\n", "-1", 10**30]),
    "id": st.sampled_from(["a", "x" * 128, "x" * 129, "", "ид-1"]),
    "time": st.sampled_from(["2026-03-02T14:30:00Z", "2026-03-02T14:30Z", "2026-03-02T14:30:00.123-05:00",
                             "2026-03-02T14:30:00+0530", "2026-03-02 14:30:00Z", "2026-13-45T99:99:99Z",
                             "2026-03-02T14:30:00Z\n", "２０２６-03-02T14:30Z"]),
    "comment": st.sampled_from(["", "x" * 500, "x" * 501, "émoji 🚀"]),
}


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Bodies the schema accepts: the fast path must take all of them."""
    body: dict[str, Any] = {
        "strategy": draw(st.text(min_size=1, max_size=64)),
        "ticker": draw(st.from_regex(r"\A([A-Z0-9_]{1,5}:)?[A-Z0-9]{2,10}!?\Z")),
        "action": draw(st.sampled_from(["buy", "sell", "exit", "cancel"])),
    }
    if body["action"] in ("buy", "sell") or draw(st.booleans()):
        body["quantity"] = draw(st.integers(1, 100000) | st.from_regex(r"\A[1-9][0-9]{0,5}\Z"))
    order_type = draw(st.sampled_from([None, "market", "limit", "stop"]))
    if order_type is not None:
        body["order_type"] = order_type
    if order_type in ("limit", "stop") or draw(st.booleans()):
        body["price"] = draw(st.integers(1, 10**9) | st.floats(min_value=1e-9, allow_infinity=False)
                             | st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{1,4})?\Z"))
    position = draw(st.sampled_from([None, "long", "short", "flat"]))
    if position is not None:
        body["position"] = position
    if position in ("long", "short") or draw(st.booleans()):
        body["position_size"] = draw(st.integers(0, 100000) | st.from_regex(r"\A[0-9]{1,6}\Z"))
    if draw(st.booleans()):
        body["id"] = draw(st.text(min_size=1, max_size=128))
    if draw(st.booleans()):
        body["time"] = draw(st.sampled_from(["2026-03-02T14:30:00Z", "2026-03-02T09:30:00.5-05:00"]))
    if draw(st.booleans()):
        body["comment"] = draw(st.text(max_size=500))
    return body


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with 0-3 edits (a field set to a boundary or hostile value, a field dropped, a key added):
    most bodies sit right next to the schema's boundary, where a wrong fast check would show."""
    body = draw(valid_bodies())
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["set", "set", "set", "drop", "add"]))
        if edit == "set":
            key = draw(st.sampled_from(sorted(FIELDS)))
            body[key] = draw(_JUNK) if draw(st.integers(0, 3)) == 0 else draw(FIELDS[key])
        elif edit == "drop" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        elif edit == "add":
            body[draw(st.text(min_size=1, max_size=8))] = draw(_JUNK)
    return body


def _normalized(obj: dict[str, Any]) -> dict[str, Any]:
    """The body as parse_signal validates it (secret dropped, enums lowered, ticker uppercased)."""
    body = {k: v for k, v in obj.items() if k != "secret"}
    for key in ("action", "order_type", "position"):
        if isinstance(body.get(key), str):
            body[key] = body[key].strip().lower()
    if isinstance(body.get("ticker"), str):
        body["ticker"] = body["ticker"].strip().upper()
    return body


def _unsure_by_design(body: dict[str, Any]) -> bool:
    """Valid values the fast check leaves to jsonschema: integral floats as integers, NaN as a price."""
    return any(type(body.get(k)) is float for k in ("quantity", "position_size")) or (
        type(body.get("price")) is float and math.isnan(body["price"]))


def _outcome(obj: Any) -> Any:
    try:
        return parse_signal(obj)
    except SignalError as exc:
        return ("error", str(exc))


def _slow_outcome(obj: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(sig, "_certainly_valid", lambda body: False)
        return _outcome(obj)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(body=bodies())
@example(body={"strategy": "t", "ticker": "ES1!", "action": "buy", "quantity": True})
@example(body={"strategy": "t", "ticker": "ES1!", "action": "buy", "quantity": 10**30})
@example(body={"strategy": "t", "ticker": "ES1!", "action": "exit", "position_size": False})
@example(body={"strategy": "t", "ticker": "ES1!", "action": "buy", "quantity": "3\n"})
@example(body={"strategy": "t", "ticker": "ES1!", "action": "buy", "quantity": 1, "extra": 1})
@example(body={"strategy": "t", "ticker": "ES1!", "action": "buy", "quantity": 1, "order_type": "limit"})
@example(body={"strategy": "t", "ticker": "ES1!", "action": "buy", "quantity": 1, "position": "long"})
@example(body={"strategy": "t", "ticker": "ES1!", "action": "buy", "quantity": 1, "price": True})
def test_fast_check_agrees_with_the_schema_and_parsing_is_unchanged(body: dict[str, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    normalized = _normalized(body)
    schema_ok = not sig.schema_errors(normalized)
    fast_ok = sig._certainly_valid(normalized)
    if fast_ok:
        assert schema_ok, f"fast path accepts a body the schema refuses: {normalized!r}"
    elif not _unsure_by_design(normalized):
        assert not schema_ok, f"fast path unsure about a plain valid body: {normalized!r}"
    assert repr(_outcome(body)) == repr(_slow_outcome(body, monkeypatch))  # repr: NaN prices compare equal


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=valid_bodies())
def test_every_plain_valid_body_takes_the_fast_path(body: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    assert not sig.schema_errors(body), body
    assert sig._certainly_valid(body)
    assert repr(_outcome(body)) == repr(_slow_outcome(body, monkeypatch))  # repr: NaN prices compare equal


def test_invalid_bodies_keep_their_jsonschema_messages() -> None:
    base = {"strategy": "t", "ticker": "ES1!", "action": "buy"}
    with pytest.raises(SignalError, match=r"^\$\.quantity: True is not valid under any of the given schemas"):
        parse_signal({**base, "quantity": True})
    with pytest.raises(SignalError, match=r"^\$: 'quantity' is a required property"):
        parse_signal(base)
    with pytest.raises(SignalError, match=r"^\$: Additional properties are not allowed \('qty' was unexpected\) "
                                          r"\(allowed: secret, strategy"):
        parse_signal({**base, "quantity": 1, "qty": 1})


def test_the_fast_check_restates_the_schema() -> None:
    """Pins the hand-written constants to the schema: editing one without the other fails here."""
    props = SCHEMA["properties"]
    assert set(sig._FIELD_OK) == set(props) - {"secret"}
    assert set(SCHEMA["required"]) == {"strategy", "ticker", "action"}
    assert SCHEMA["additionalProperties"] is False
    assert set(props["action"]["enum"]) == sig._ACTIONS
    assert set(props["order_type"]["enum"]) == sig._ORDER_TYPES
    assert set(props["position"]["enum"]) == sig._POSITIONS
    assert props["ticker"]["pattern"] == sig._TICKER.pattern
    assert props["time"]["pattern"] == sig._TIME.pattern
    assert (props["strategy"]["minLength"], props["strategy"]["maxLength"]) == (1, 64)
    assert (props["ticker"]["minLength"], props["ticker"]["maxLength"]) == (2, 40)
    assert (props["id"]["minLength"], props["id"]["maxLength"]) == (1, 128)
    assert props["comment"]["maxLength"] == 500
    assert props["quantity"]["oneOf"] == [
        {"type": "integer", "minimum": 1, "maximum": sig._MAX_CONTRACTS},
        {"type": "string", "pattern": sig._QUANTITY.pattern}]
    assert props["price"]["oneOf"] == [{"type": "number", "exclusiveMinimum": 0},
                                       {"type": "string", "pattern": sig._PRICE.pattern}]
    assert props["position_size"]["oneOf"] == [
        {"type": "integer", "minimum": 0, "maximum": sig._MAX_CONTRACTS},
        {"type": "string", "pattern": sig._SIZE.pattern}]
    conditions = [(c["if"]["properties"], c["if"]["required"], c["then"]["required"]) for c in SCHEMA["allOf"]]
    assert conditions == [({"action": {"enum": ["buy", "sell"]}}, ["action"], ["quantity"]),
                          ({"order_type": {"enum": ["limit", "stop"]}}, ["order_type"], ["price"]),
                          ({"position": {"enum": ["long", "short"]}}, ["position"], ["position_size"])]


@pytest.mark.parametrize("price", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_price_is_refused_although_the_schema_lets_nan_through(price: float) -> None:
    body = {"strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 1, "order_type": "limit",
            "price": price}
    with pytest.raises(SignalError, match=r"^\$\.price: "):
        parse_signal(body)
