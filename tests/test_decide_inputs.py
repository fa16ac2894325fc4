"""Signals and states as they arrive: validated, normalized, and refused with the path of the problem."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from engine.signal import SignalError, derive_signal_id, parse_signal
from engine.state import StateError, parse_state

BASE = {"strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 2}


def test_signal_is_normalized_and_the_secret_dropped() -> None:
    signal = parse_signal({**BASE, "action": "BUY", "quantity": "3", "price": "5123.25", "ticker": "cme_mini:mes1!",
                           "secret": "hunter2", "time": "2026-03-09T10:30:00-04:00"})
    assert (signal.action, signal.quantity, signal.price, signal.ticker) == ("buy", 3, Decimal("5123.25"),
                                                                           "CME_MINI:MES1!")
    assert signal.time == datetime(2026, 3, 9, 14, 30, tzinfo=timezone.utc)
    assert "hunter2" not in repr(signal)


def test_derived_id_ignores_the_secret_and_depends_on_the_content() -> None:
    a = parse_signal({**BASE, "secret": "one"})
    b = parse_signal({**BASE, "secret": "two"})
    c = parse_signal({**BASE, "quantity": 3})
    assert a.id == b.id == derive_signal_id(BASE) and a.id != c.id and a.id_derived
    assert a.id.startswith("sig-") and len(a.id) == 20
    assert parse_signal({**BASE, "id": "tv-42"}).id == "tv-42"


@pytest.mark.parametrize("body,message", [
    ({**BASE, "quantity": 0}, "$.quantity: 0 is less than the minimum of 1"),
    ({**BASE, "quantity": None}, "$.quantity"),
    ({k: v for k, v in BASE.items() if k != "quantity"}, "$: 'quantity' is a required property"),
    ({**BASE, "order_type": "limit"}, "$: 'price' is a required property"),
    ({**BASE, "position": "long"}, "$: 'position_size' is a required property"),
    ({**BASE, "ticker": "MES 1!"}, "$.ticker"),
    ({**BASE, "colour": "red"}, "'colour' was unexpected"),
    ([1, 2], "$: a signal must be a JSON object"),
])
def test_bad_signals_name_the_path(body: Any, message: str) -> None:
    with pytest.raises(SignalError) as info:
        parse_signal(body)
    assert message in str(info.value)


def test_state_document() -> None:
    now, state = parse_state({
        "now": "2026-03-09T10:30:00-04:00", "paused": ["paper-slow"], "halted": {"a2": "manual"},
        "daily_pnl": "-12.5",
        "accounts": {"a1": {"connected": True, "free_margin": 0.1, "positions": {"mesh6": 2, "ESH2026": -1}},
                     "a2": {"connected": False, "free_margin": "5", "daily_pnl": -1}}})
    assert now == datetime(2026, 3, 9, 14, 30, tzinfo=timezone.utc)
    a1 = state.accounts["a1"]
    assert a1.free_margin == Decimal("0.1") and a1.daily_pnl == 0 and a1.positions == {"MESH6": 2, "ESH2026": -1}
    assert a1.held("MES") == {"MESH6": 2} and a1.held("ES") == {"ESH2026": -1}
    assert state.accounts["a2"].halted == "manual" and state.paused == {"paper-slow"}
    assert state.portfolio_daily_pnl == Decimal("-12.5")


@pytest.mark.parametrize("doc,message", [
    ({"accounts": {}}, "now: required"),
    ({"now": "2026-03-09T10:30:00", "accounts": {}}, "has no UTC offset"),
    ({"now": datetime(2026, 3, 9, 10, 30), "accounts": {}}, "has no UTC offset"),
    ({"now": "yesterday"}, "not an ISO-8601 time"),
    ({"now": "2026-03-09T10:30:00Z", "accounts": {"a": {"connected": True}}}, "accounts.a: 'free_margin' is required"),
    ({"now": "2026-03-09T10:30:00Z", "accounts": {"a": {"connected": 1, "free_margin": 1}}}, "expected true or false"),
    ({"now": "2026-03-09T10:30:00Z", "accounts": {"a": {"connected": True, "free_margin": True}}},
     "accounts.a.free_margin: expected a number"),
    ({"now": "2026-03-09T10:30:00Z", "accounts": {"a": {"connected": True, "free_margin": "NaN"}}}, "not a finite"),
    ({"now": "2026-03-09T10:30:00Z", "accounts": {"a": {"connected": True, "free_margin": 1,
                                                        "positions": {"MESH6": 1.5}}}}, "expected a signed integer"),
    ({"now": "2026-03-09T10:30:00Z", "accounts": {"a": {"connected": True, "free_margin": 1, "margin": 1}}},
     "unknown key(s) margin"),
    ({"now": "2026-03-09T10:30:00Z", "accounts": {"a": {"connected": True, "free_margin": "1e30"}}},
     "accounts.a.free_margin: '1e30' is out of range"),
    ({"now": "2026-03-09T10:30:00Z", "paused": "paper"}, "paused: expected a list"),
    ({"now": "2026-03-09T10:30:00Z", "colour": 1}, "state: unknown key(s) colour"),
])
def test_bad_states_name_the_path(doc: Any, message: str) -> None:
    with pytest.raises(StateError) as info:
        parse_state(doc)
    assert message in str(info.value)
