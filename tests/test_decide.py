"""The decision semantics, one table row per rule of the rules format, each edge tested on both sides.

Rules: tests/test_decide_fixtures.py (a1..a4 mirror ``scalp``; b1..b3 ``trend`` in best mode; 30% margin buffer;
portfolio loss 1000; account loss 2% of 10000 = 200; MES max 4 contracts; no entries 15:50-18:00 ET). Every row
runs on both evaluators (durable-rules and the pure-Python fallback), which must agree.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import pytest

from engine.decide import Engine, round_half_up
from engine.decision import client_order_id
from engine.signal import parse_signal
from engine.state import parse_state
from engine.symbols import SymbolError
from tests.test_decide_fixtures import RICH, RULES, decide, legs, load, skips, state_doc


@pytest.fixture(scope="module", params=["durable", "python"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(load(tmp_path_factory.mktemp("rules")), backend=request.param)
    yield eng
    eng.close()


def acct(**overrides: Any) -> dict[str, Any]:
    return {**RICH, **overrides}


BUY1 = {"strategy": "scalp", "ticker": "MES1!", "action": "buy", "quantity": 1}
ONLY_A1 = {"a1": RICH}


# (name, signal, accounts, extra state, expected legs, expected skips, expected blocked_by)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], list[Any], list[Any], str | None]] = [
    # --- mirror and size multipliers (round half up) ---
    ("mirror: every eligible target gets the order, multipliers round half up",
     {**BUY1, "quantity": 3}, {"a1": RICH, "a2": RICH, "a3": RICH, "a4": RICH}, {},
     [("a1", "MESH6", "buy", 3, "entry"), ("a2", "MESH6", "buy", 2, "entry"), ("a3", "MESH6", "buy", 1, "entry")],
     [("a4", "size_multiplier")], None),
    ("0.5 rounds up: 1 x 0.5 = 1; 1 x 0.25 rounds to 0 and is skipped",
     BUY1, {"a2": RICH, "a3": RICH}, {},
     [("a2", "MESH6", "buy", 1, "entry")], [("a1", "state"), ("a3", "size_multiplier"), ("a4", "state")], None),
    ("2 x 0.25 = 0.5 rounds up to 1; 6 x 0.25 = 1.5 rounds up to 2",
     {**BUY1, "quantity": 6}, {"a3": RICH}, {},
     [("a3", "MESH6", "buy", 2, "entry")], [("a1", "state"), ("a2", "state"), ("a4", "state")], None),
    ("size multiplier 0 skips the account entirely, exits included",
     {**BUY1, "action": "exit"}, {"a4": acct(positions={"MESH6": 2})}, {},
     [], [("a1", "state"), ("a2", "state"), ("a3", "state"), ("a4", "size_multiplier")], None),
    # --- margin, exactly at the buffer ---
    ("margin exactly at the buffer passes: 130.00 >= 1 x 100 x 1.30",
     BUY1, {"a1": acct(free_margin="130.00")}, {}, [("a1", "MESH6", "buy", 1, "entry")], [], None),
    ("margin one cent under the buffer fails",
     BUY1, {"a1": acct(free_margin="129.99")}, {}, [], [("a1", "margin")], None),
    ("margin is exact Decimal: a float-looking 129.99999999999999 still fails",
     BUY1, {"a1": acct(free_margin="129.99999999999999")}, {}, [], [("a1", "margin")], None),
    ("no margin configured for the root at the broker: refused",
     {"strategy": "odd", "ticker": "MES1!", "action": "buy", "quantity": 1}, {"n1": RICH}, {},
     [], [("n1", "margin")], None),
    # --- loss limits: breached when the loss reaches the limit ---
    ("account loss exactly at the limit (-200 = 2% of 10000) blocks entries",
     BUY1, {"a1": acct(daily_pnl=-200)}, {}, [], [("a1", "account-loss")], "account-loss"),
    ("account loss one cent short of the limit does not",
     BUY1, {"a1": acct(daily_pnl="-199.99")}, {}, [("a1", "MESH6", "buy", 1, "entry")], [], None),
    ("portfolio loss exactly at the limit blocks every account's entries",
     {**BUY1, "quantity": 2}, {"a1": acct(daily_pnl=-150), "a2": acct(daily_pnl=-150), "b1": acct(daily_pnl=-700)},
     {}, [], [("a1", "portfolio-loss"), ("a2", "portfolio-loss"), ("a3", "state"), ("a4", "state")],
     "portfolio-loss"),
    ("portfolio loss one cent short of the limit does not",
     BUY1, {"a1": RICH}, {"daily_pnl": "-999.99"}, [("a1", "MESH6", "buy", 1, "entry")], [], None),
    ("an explicit portfolio daily_pnl overrides the sum of the accounts'",
     BUY1, {"a1": RICH}, {"daily_pnl": -1000}, [], [("a1", "portfolio-loss")], "portfolio-loss"),
    ("a breached limit never blocks an exit (and the record is accepted and blocked_by)",
     {**BUY1, "action": "sell", "quantity": 3}, {"a1": acct(daily_pnl=-5000, positions={"MESH6": 2})}, {},
     [("a1", "MESH6", "sell", 2, "exit")], [("a1", "portfolio-loss")], "portfolio-loss"),
    # --- max_contracts: reject, never resize ---
    ("max_contracts: reaching 4 is allowed",
     BUY1, {"a1": acct(positions={"MESH6": 3})}, {}, [("a1", "MESH6", "buy", 1, "entry")], [], None),
    ("max_contracts: 5 > 4 rejects the whole entry",
     {**BUY1, "quantity": 2}, {"a1": acct(positions={"MESH6": 3})}, {}, [], [("a1", "mes-size")], "mes-size"),
    ("max_contracts applies to the position after a zero-crossing order",
     {**BUY1, "action": "sell", "quantity": 7}, {"a1": acct(positions={"MESH6": 2})}, {},
     [("a1", "MESH6", "sell", 2, "exit")], [("a1", "mes-size")], "mes-size"),
    # --- eligibility ---
    ("a disconnected broker gets no entry", BUY1, {"a1": acct(connected=False)}, {}, [], [("a1", "connection")], None),
    ("a disconnected broker still gets its exits",
     {**BUY1, "action": "exit"}, {"a1": acct(connected=False, positions={"MESH6": -2})}, {},
     [("a1", "MESH6", "buy", 2, "exit")], [], None),
    ("a paused broker gets no entry", BUY1, ONLY_A1, {"paused": ["fast"]}, [], [("a1", "paused")], None),
    ("a halted account gets no entry", BUY1, ONLY_A1, {"halted": {"a1": "reconciliation mismatch"}}, [],
     [("a1", "halted")], None),
    ("a halt restricted to ES leaves MES entries alone",
     BUY1, {"a1": acct(halted_instruments={"ES": "es-loss breached"})}, {}, [("a1", "MESH6", "buy", 1, "entry")], [],
     None),
    ("a halt restricted to MES refuses MES entries",
     BUY1, {"a1": acct(halted_instruments={"MES": "mes-loss breached"})}, {}, [], [("a1", "halted")], None),
    ("a halt restricted to MES never blocks a MES exit",
     {**BUY1, "action": "exit"}, {"a1": acct(halted_instruments={"MES": "mes-loss breached"},
                                             positions={"MESH6": 2})}, {},
     [("a1", "MESH6", "sell", 2, "exit")], [], None),
    ("long 2 MES, sell 4 with MES halted: the exit goes, the opening part is refused",
     {**BUY1, "action": "sell", "quantity": 4}, {"a1": acct(halted_instruments={"MES": "mes-loss breached"},
                                                            positions={"MESH6": 2})}, {},
     [("a1", "MESH6", "sell", 2, "exit")], [("a1", "halted")], None),
    ("an instrument outside the account's allow-list is refused",
     {**BUY1, "ticker": "MNQ1!"}, {"a1": RICH, "a2": RICH}, {},
     [("a2", "MNQH6", "buy", 1, "entry")], [("a1", "instruments")], None),
    # --- zero crossing and exits ---
    ("long 2, sell 4: an exit of 2 and an entry of 2, each judged on its own",
     {**BUY1, "action": "sell", "quantity": 4}, {"a1": acct(positions={"MESH6": 2})}, {},
     [("a1", "MESH6", "sell", 2, "exit"), ("a1", "MESH6", "sell", 2, "entry")], [], None),
    ("long 2, sell 4 without margin: the exit still goes, the entry is refused",
     {**BUY1, "action": "sell", "quantity": 4}, {"a1": acct(free_margin=0, positions={"MESH6": 2})}, {},
     [("a1", "MESH6", "sell", 2, "exit")], [("a1", "margin")], None),
    ("exit closes the position; an account holding nothing is skipped",
     {**BUY1, "action": "exit"}, {"a1": acct(positions={"MESH6": 2, "ESH6": 1}), "a2": RICH}, {},
     [("a1", "MESH6", "sell", 2, "exit")], [("a2", "exit")], None),
    # --- target-position signals converge each account ---
    ("target long 2 from long 3: sell 1 (exit)",
     {**BUY1, "action": "sell", "position": "long", "position_size": 2}, {"a1": acct(positions={"MESH6": 3})}, {},
     [("a1", "MESH6", "sell", 1, "exit")], [], None),
    ("target long 2 from short 1: exit 1 and enter 2",
     {**BUY1, "position": "long", "position_size": 2}, {"a1": acct(positions={"MESH6": -1})}, {},
     [("a1", "MESH6", "buy", 1, "exit"), ("a1", "MESH6", "buy", 2, "entry")], [], None),
    ("target already reached: skipped, no order",
     {**BUY1, "position": "long", "position_size": 2}, {"a1": acct(positions={"MESH6": 2})}, {},
     [], [("a1", "target")], None),
    ("target x multiplier rounds half up: long 3 x 0.5 = 2",
     {**BUY1, "position": "long", "position_size": 3}, {"a2": RICH}, {},
     [("a2", "MESH6", "buy", 2, "entry")], [], None),
    ("target flat closes every account that holds",
     {**BUY1, "action": "sell", "position": "flat", "position_size": 0},
     {"a1": acct(positions={"MESH6": 2}), "a2": acct(positions={"MESH6": -1})}, {},
     [("a1", "MESH6", "sell", 2, "exit"), ("a2", "MESH6", "buy", 1, "exit")], [], None),
    # --- best mode ---
    ("best: the cheapest commission wins (b1 at the cheap broker)",
     {"strategy": "trend", "ticker": "MES1!", "action": "buy", "quantity": 1}, {"b1": RICH, "b2": RICH, "b3": RICH},
     {}, [("b1", "MESH6", "buy", 1, "entry")], [("b2", "best-trend"), ("b3", "best-trend")], None),
    ("best: an ineligible cheapest falls through to the most free margin, then the name",
     {"strategy": "trend", "ticker": "MES1!", "action": "buy", "quantity": 1},
     {"b1": acct(connected=False), "b2": acct(free_margin=5000), "b3": acct(free_margin=5000)}, {},
     [("b2", "MESH6", "buy", 1, "entry")], [("b1", "connection"), ("b3", "best-trend")], None),
    ("best: more free margin beats the name",
     {"strategy": "trend", "ticker": "MES1!", "action": "buy", "quantity": 1},
     {"b2": acct(free_margin=5000), "b3": acct(free_margin="5000.01")}, {},
     [("b3", "MESH6", "buy", 1, "entry")], [("b1", "state"), ("b2", "best-trend")], None),
    ("best: exits go to every holder; a pure reduction opens nothing elsewhere",
     {"strategy": "trend", "ticker": "MES1!", "action": "sell", "quantity": 2},
     {"b1": RICH, "b2": acct(positions={"MESH6": 2}), "b3": acct(positions={"MESH6": 3})}, {},
     [("b2", "MESH6", "sell", 2, "exit"), ("b3", "MESH6", "sell", 2, "exit")], [("b1", "best-trend")], None),
    ("best: a reversal opens only at the holder",
     {"strategy": "trend", "ticker": "MES1!", "action": "sell", "quantity": 3},
     {"b1": RICH, "b2": acct(positions={"MESH6": 2}), "b3": RICH}, {},
     [("b2", "MESH6", "sell", 2, "exit"), ("b2", "MESH6", "sell", 1, "entry")],
     [("b1", "best-trend"), ("b3", "best-trend")], None),
    ("best + target: the holder converges, nobody else opens",
     {"strategy": "trend", "ticker": "MES1!", "action": "buy", "quantity": 2, "position": "long", "position_size": 3},
     {"b1": RICH, "b2": acct(positions={"MESH6": 1}), "b3": RICH}, {},
     [("b2", "MESH6", "buy", 2, "entry")], [("b1", "best-trend"), ("b3", "best-trend")], None),
    ("best + target: a holder already at the target still holds it; nobody opens a second position",
     {"strategy": "trend", "ticker": "MES1!", "action": "buy", "quantity": 2, "position": "long", "position_size": 2},
     {"b1": RICH, "b2": acct(positions={"MESH6": 2}), "b3": RICH}, {},
     [], [("b1", "best-trend"), ("b2", "target"), ("b3", "best-trend")], None),
    ("best + target: a holder at the target at a disconnected broker still holds it",
     {"strategy": "trend", "ticker": "MES1!", "action": "buy", "quantity": 2, "position": "long", "position_size": 2},
     {"b1": RICH, "b2": acct(connected=False, positions={"MESH6": 2})}, {},
     [], [("b1", "best-trend"), ("b2", "target"), ("b3", "state")], None),
    ("best: every candidate blocked by the same rule names it",
     {"strategy": "trend", "ticker": "MES1!", "action": "buy", "quantity": 1},
     {"b1": RICH, "b2": RICH}, {"daily_pnl": -1000},
     [], [("b1", "portfolio-loss"), ("b2", "portfolio-loss"), ("b3", "state")], "portfolio-loss"),
    # --- routing ---
    ("no routing rule matches: rejected with rule null",
     {**BUY1, "strategy": "odd", "ticker": "ES1!"}, {"n1": RICH}, {}, [], [], None),
]


@pytest.mark.parametrize("name,signal,accounts,extra,want_legs,want_skips,want_blocked", CASES,
                         ids=[c[0] for c in CASES])
def test_semantics(engine: Engine, name: str, signal: dict[str, Any], accounts: dict[str, Any],
                   extra: dict[str, Any], want_legs: list[Any], want_skips: list[Any],
                   want_blocked: str | None) -> None:
    record = decide(engine, signal, state_doc(accounts, **extra))
    assert legs(record) == want_legs
    # Accounts absent from the state are skipped as "state"; rows list them only where that is the point.
    assert [s for s in skips(record, with_state=True) if s[1] != "state" or s in want_skips] == want_skips
    assert record["blocked_by"] == want_blocked
    assert record["accepted"] == bool(want_legs)


def test_no_matching_rule_says_so(engine: Engine) -> None:
    record = decide(engine, {**BUY1, "strategy": "odd", "ticker": "ES1!"}, state_doc({"n1": RICH}))
    assert record["rule"] is None and not record["accepted"]
    assert record["reason"] == "no routing rule matches strategy 'odd' and instrument ES"


def test_reasons_are_in_trader_words(engine: Engine) -> None:
    record = decide(engine, BUY1, state_doc({"a1": acct(free_margin=120)}))
    assert record["skipped"][:1] == [{"account": "a1", "by": "margin",
                                  "reason": "free margin 120.00 < required 130.00 (1 x MES @ 100.00 + 30% buffer)"}]
    record = decide(engine, BUY1, state_doc({"a1": acct(daily_pnl=-250)}))
    assert record["skipped"][0]["reason"] == ("daily P&L -250.00 reached the limit -200.00 (2% of capital 10000.00) "
                                              "(account-loss)")
    assert record["reason"].startswith("mirror-scalp: daily P&L -250.00")


def test_a_halt_restricted_to_a_root_names_the_root_and_the_halt(engine: Engine) -> None:
    halted = acct(halted_instruments={"MES": "es-loss [ES, MES entries only]: daily P&L -600.00 USD reached ..."})
    record = decide(engine, BUY1, state_doc({"a1": halted, "a2": RICH}))
    assert legs(record) == [("a2", "MESH6", "buy", 1, "entry")]
    assert record["skipped"][0] == {"account": "a1", "by": "halted", "reason": (
        "MES entries halted: es-loss [ES, MES entries only]: daily P&L -600.00 USD reached ...")}
    # The account-wide halt is the news when both hold.
    both = acct(halted="reconciliation mismatch", halted_instruments={"MES": "es-loss"})
    record = decide(engine, BUY1, state_doc({"a1": both}))
    assert record["skipped"][0]["reason"] == "account halted: reconciliation mismatch"


def test_the_state_document_takes_halted_instruments() -> None:
    _now, state = parse_state(state_doc({"a1": acct(halted_instruments={"es": "es-loss", "MES": None})}))
    assert dict(state.accounts["a1"].halted_instruments) == {"ES": "es-loss", "MES": "halted by operator"}
    assert state.accounts["a1"].halted_in("ES") == "es-loss" and state.accounts["a1"].halted_in("CL") is None
    with pytest.raises(ValueError, match=r"accounts\.a1\.halted_instruments: expected a mapping"):
        parse_state(state_doc({"a1": acct(halted_instruments=["ES"])}))
    with pytest.raises(ValueError, match=r"accounts\.a1\.halted_instruments\.ES: expected the reason as text"):
        parse_state(state_doc({"a1": acct(halted_instruments={"ES": 3})}))
    with pytest.raises(ValueError, match=r"accounts\.a1\.halted_instruments\.E-S: not an instrument root"):
        parse_state(state_doc({"a1": acct(halted_instruments={"E-S": "x"})}))


# --- schedule: 15:49:59 vs 15:50:00 ET, in EST and in EDT; 18:00:00 is outside ---------------------------------

@pytest.mark.parametrize("now,blocked", [
    ("2026-01-14T20:49:59Z", False),   # 15:49:59 EST
    ("2026-01-14T20:50:00Z", True),    # 15:50:00 EST
    ("2026-07-15T19:49:59Z", False),   # 15:49:59 EDT
    ("2026-07-15T19:50:00Z", True),    # 15:50:00 EDT
    ("2026-07-15T21:59:59Z", True),    # 17:59:59 EDT
    ("2026-07-15T22:00:00Z", False),   # 18:00:00 EDT: the window excludes its end
])
def test_schedule_window_edges(engine: Engine, now: str, blocked: bool) -> None:
    record = decide(engine, BUY1, state_doc(ONLY_A1, now=now))
    if blocked:
        assert record["blocked_by"] == "no-late-entries" and not record["orders"]
        assert skips(record)[0] == ("a1", "no-late-entries")
    else:
        assert [o["intent"] for o in record["orders"]] == ["entry"]


def test_schedule_never_blocks_exits(engine: Engine) -> None:
    record = decide(engine, {**BUY1, "action": "exit"},
                    state_doc({"a1": acct(positions={"MESH6": 1})}, now="2026-03-10T19:55:00Z"))
    assert legs(record) == [("a1", "MESH6", "sell", 1, "exit")]


# --- the trading day starts 18:00 ET: yesterday's loss stops counting --------------------------------------------

@pytest.mark.parametrize("measured_at,counts", [
    ("2026-03-10T17:59:59-04:00", False),   # measured during the trading day that ended at 18:00 ET
    ("2026-03-10T18:00:00-04:00", True),    # measured during the current one, which began at 18:00 ET
])
def test_daily_pnl_counts_from_1800_et(engine: Engine, measured_at: str, counts: bool) -> None:
    state = state_doc({"a1": acct(daily_pnl=-200, daily_pnl_at=measured_at)}, now="2026-03-10T18:00:01-04:00")
    record = decide(engine, BUY1, state)
    if counts:
        assert skips(record) == [("a1", "account-loss")] and record["blocked_by"] == "account-loss"
    else:
        assert legs(record) == [("a1", "MESH6", "buy", 1, "entry")]


def test_portfolio_pnl_from_an_earlier_trading_day_does_not_count(engine: Engine) -> None:
    state = state_doc(ONLY_A1, now="2026-03-11T10:00:00-04:00", daily_pnl=-5000,
                      daily_pnl_at="2026-03-10T16:00:00-04:00")
    assert legs(decide(engine, BUY1, state)) == [("a1", "MESH6", "buy", 1, "entry")]


# --- roll: exits close the contract actually held ----------------------------------------------------------------

@pytest.mark.parametrize("now,front", [
    ("2026-03-11T23:59:59-04:00", "MESH6"),   # the day before the roll day (ET)
    ("2026-03-12T00:00:00-04:00", "MESM6"),   # from the roll day on, MES1! is June
])
def test_continuous_ticker_rolls_on_the_roll_day(engine: Engine, now: str, front: str) -> None:
    record = decide(engine, BUY1, state_doc(ONLY_A1, now=now))
    assert legs(record) == [("a1", front, "buy", 1, "entry")]


def test_after_the_roll_exits_close_the_old_contract(engine: Engine) -> None:
    state = state_doc({"a1": acct(positions={"MESH6": 2})}, now="2026-03-13T10:00:00-04:00")
    assert legs(decide(engine, {**BUY1, "action": "exit"}, state)) == [("a1", "MESH6", "sell", 2, "exit")]
    assert legs(decide(engine, {**BUY1, "action": "sell", "quantity": 3}, state)) == [
        ("a1", "MESH6", "sell", 2, "exit"), ("a1", "MESM6", "sell", 1, "entry")]


def test_after_the_roll_a_partial_exit_closes_the_oldest_first(engine: Engine) -> None:
    state = state_doc({"a1": acct(positions={"MESM6": 1, "MESH6": 1})}, now="2026-03-13T10:00:00-04:00")
    assert legs(decide(engine, {**BUY1, "action": "sell", "quantity": 1}, state)) == [
        ("a1", "MESH6", "sell", 1, "exit")]


# --- cancel, ids, records ----------------------------------------------------------------------------------------

def test_cancel_is_an_explicit_record_without_orders(engine: Engine) -> None:
    record = decide(engine, {"strategy": "scalp", "ticker": "MES1!", "action": "cancel"},
                    state_doc({"a1": RICH, "a2": RICH}))
    assert record["accepted"] is False and record["orders"] == []
    assert record["cancel"] == [{"account": "a1", "broker": "fast", "instrument": "MES"},
                                {"account": "a2", "broker": "fast", "instrument": "MES"}]
    assert record["reason"] == "cancel working MES orders at a1, a2"


def test_record_shape_and_client_order_ids(engine: Engine) -> None:
    record = decide(engine, {**BUY1, "action": "sell", "quantity": 4}, state_doc({"a1": acct(positions={"MESH6": 2})}))
    assert set(record) == {"signal_id", "strategy", "accepted", "rule", "blocked_by", "reason", "order_type", "price",
                           "orders", "skipped", "cancel", "ruleset"}
    assert record["signal_id"] == "sig-1" and record["strategy"] == "scalp" and record["rule"] == "mirror-scalp"
    ids = [o["client_order_id"] for o in record["orders"]]
    assert len(set(ids)) == 2
    for cid in ids:
        assert len(cid) <= 32 and re.fullmatch(r"[A-Za-z0-9-]+", cid)
    assert ids[0] == client_order_id("sig-1", "a1", "exit:MESH6")
    again = decide(engine, {**BUY1, "action": "sell", "quantity": 4}, state_doc({"a1": acct(positions={"MESH6": 2})}))
    assert [o["client_order_id"] for o in again["orders"]] == ids
    other = decide(engine, {**BUY1, "id": "sig-2", "action": "sell", "quantity": 4},
                   state_doc({"a1": acct(positions={"MESH6": 2})}))
    assert not set(o["client_order_id"] for o in other["orders"]) & set(ids)


def test_entries_carry_the_margin_they_reserve(engine: Engine) -> None:
    now, state = parse_state(state_doc({"a1": RICH, "a2": RICH}))
    decision = engine.decide(parse_signal({**BUY1, "quantity": 3}), state, now)
    assert [(o.account, o.margin_usd) for o in decision.orders] == [("a1", Decimal(300)), ("a2", Decimal(200))]


def test_unknown_instrument_is_an_input_error(engine: Engine) -> None:
    now, state = parse_state(state_doc(ONLY_A1))
    with pytest.raises(SymbolError, match="unknown instrument"):
        engine.decide(parse_signal({**BUY1, "ticker": "ZZ1!"}), state, now)


def test_naive_now_is_refused(engine: Engine) -> None:
    from datetime import datetime
    _, state = parse_state(state_doc(ONLY_A1))
    with pytest.raises(ValueError, match="aware"):
        engine.decide(parse_signal(BUY1), state, datetime(2026, 3, 10, 10))


@pytest.mark.parametrize("value,expected", [("0.5", 1), ("1.5", 2), ("2.5", 3), ("0.49", 0), ("2.4999", 2)])
def test_round_half_up(value: str, expected: int) -> None:
    assert round_half_up(Decimal(value)) == expected


def test_a_retired_generation_refuses_to_decide(tmp_path: Path) -> None:
    eng = Engine(load(tmp_path / "rules"), backend="durable")
    eng.close()
    eng.close()  # idempotent
    now, state = parse_state(state_doc(ONLY_A1))
    with pytest.raises(RuntimeError, match="retired"):
        eng.decide(parse_signal(BUY1), state, now)


def test_portfolio_contract_limit_counts_exits_and_earlier_entries(tmp_path: Path) -> None:
    text = RULES_WITH_BOOK_LIMIT
    with Engine(load(tmp_path, text)) as eng:
        # Book of 3 long; sell 4 reverses a1 (2 -> -2) and a2 (x 0.5: 1 -> -1). The exits empty the book before the
        # entries are judged, so the book ends at 3 contracts, within the limit.
        state = state_doc({"a1": acct(positions={"MESH6": 2}), "a2": acct(positions={"MESH6": 1})})
        record = decide(eng, {**BUY1, "action": "sell", "quantity": 4}, state)
        assert legs(record) == [("a1", "MESH6", "sell", 2, "exit"), ("a2", "MESH6", "sell", 1, "exit"),
                                ("a1", "MESH6", "sell", 2, "entry"), ("a2", "MESH6", "sell", 1, "entry")]
        # Mirror buy 2 into an empty book of limit 3: a1 takes 2, a2 (1 after rounding) makes 3, a3 (1) would be 4.
        record = decide(eng, {**BUY1, "quantity": 2}, state_doc({"a1": RICH, "a2": RICH, "a3": RICH}))
        assert legs(record) == [("a1", "MESH6", "buy", 2, "entry"), ("a2", "MESH6", "buy", 1, "entry")]
        assert skips(record) == [("a3", "book-size")]


RULES_WITH_BOOK_LIMIT = RULES.replace("""  - name: mes-size
    scope: account""", """  - name: book-size
    scope: portfolio
    instrument: MES
    max_contracts: 3
  - name: mes-size
    scope: account""")
