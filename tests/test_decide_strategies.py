"""Each strategy trades its own position in an account; best mode keeps one holder of a strategy's position.

Rules below: ``m1`` follows ``alpha`` and ``beta`` (mirror), ``bf``/``bs`` follow ``gamma`` and ``delta`` (best,
cheapest commission: ``bs``); the gamma rule lists its accounts as [bs, bf], so that order (not the names') breaks
ties. Account limit: 4 MES; portfolio limit: 8 MES. Every row runs on both evaluators (durable-rules and the
pure-Python fallback), which must agree.

State documents give each account's per-strategy positions under ``strategies:`` (``positions``, the account's net,
is their sum unless given: contracts beyond the sum are booked to no strategy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from engine.decide import Engine
from engine.state import parse_state
from tests.test_decide_fixtures import RICH, decide, legs, load, skips, state_doc

RULES = """\
kind: Broker
name: fast
type: paper
commissions: {MES: 0.25, default: 0.79}
margins: {MES: 100, default: 1000}
---
kind: Broker
name: cheap
type: paper
commissions: {MES: 0.20, default: 0.60}
margins: {MES: 150, default: 2000}
---
kind: Account
name: m1
broker: fast
broker_account: M1
capital: 10000
strategies: [alpha, beta]
---
kind: Account
name: bf
broker: fast
broker_account: BF
capital: 20000
strategies: [gamma, delta]
---
kind: Account
name: bs
broker: cheap
broker_account: BS
capital: 20000
strategies: [gamma, delta]
---
kind: Routing
name: main
rules:
  - name: mirror-ab
    match: {strategy: [alpha, beta]}
    mode: mirror
  - name: best-gamma
    match: {strategy: gamma}
    mode: best
    select: [cheapest_commission]
    accounts: [bs, bf]
  - name: best-delta
    match: {strategy: delta}
    mode: best
    select: [cheapest_commission]
---
kind: Risk
name: limits
margin_buffer_pct: 30
limits:
  - name: mes-size
    scope: account
    instrument: [MES]
    max_contracts: 4
  - name: book-size
    scope: portfolio
    instrument: [MES]
    max_contracts: 8
"""

ROLLED = "2026-03-13T10:00:00-04:00"
"""After the roll day: MES1! is MESM6, MESH6 is the old contract."""


@pytest.fixture(scope="module", params=["durable", "python"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(load(tmp_path_factory.mktemp("rules"), RULES), backend=request.param)
    yield eng
    eng.close()


def acct(strategies: dict[str, dict[str, int]] | None = None, **overrides: Any) -> dict[str, Any]:
    doc = {**RICH, **overrides}
    if strategies is not None:
        doc["strategies"] = strategies
    return doc


def sig(strategy: str, action: str, quantity: int | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"strategy": strategy, "ticker": "MES1!", "action": action, **extra}
    if quantity is not None:
        body["quantity"] = quantity
    return body


def target(strategy: str, position: str, size: int) -> dict[str, Any]:
    return sig(strategy, "sell" if position in ("flat", "short") else "buy", max(size, 1), position=position,
               position_size=size)


# (name, signal, accounts, extra state, expected legs, expected skips (state skips left out), blocked_by)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], list[Any], list[Any], str | None]] = [
    # --- targets, exits and reversals act on the signal's strategy's own position ---
    ("another strategy's long is not this one's: a flat target sends nothing",
     target("beta", "flat", 0), {"m1": acct({"alpha": {"MESH6": 1}})}, {},
     [], [("m1", "target")], None),
    ("an exit of a strategy that holds nothing sends nothing, whatever the others hold",
     sig("beta", "exit"), {"m1": acct({"alpha": {"MESH6": 1}})}, {},
     [], [("m1", "exit")], None),
    ("a target counts from the strategy's own position: beta long 2 buys 2 next to alpha's 1",
     target("beta", "long", 2), {"m1": acct({"alpha": {"MESH6": 1}})}, {},
     [("m1", "MESH6", "buy", 2, "entry")], [], None),
    ("an exit closes the strategy's contracts only",
     sig("alpha", "exit"), {"m1": acct({"alpha": {"MESH6": 2}, "beta": {"MESH6": -1}})}, {},
     [("m1", "MESH6", "sell", 2, "exit")], [], None),
    ("a flat target closes the strategy's contracts only",
     target("beta", "flat", 0), {"m1": acct({"alpha": {"MESH6": 2}, "beta": {"MESH6": -1}})}, {},
     [("m1", "MESH6", "buy", 1, "exit")], [], None),
    ("a reversal exits the strategy's short and opens the rest",
     sig("beta", "buy", 3), {"m1": acct({"alpha": {"MESH6": 2}, "beta": {"MESH6": -1}})}, {},
     [("m1", "MESH6", "buy", 1, "exit"), ("m1", "MESH6", "buy", 2, "entry")], [], None),
    # --- account-wide limits count every strategy ---
    ("an account's max_contracts counts every strategy's position: 3 + 2 > 4",
     sig("beta", "buy", 2), {"m1": acct({"alpha": {"MESH6": 3}})}, {},
     [], [("m1", "mes-size")], "mes-size"),
    ("... and a reversal is judged on the account's net after every leg: 1 + 1 + 3 > 4; the exit goes",
     sig("beta", "buy", 4), {"m1": acct({"alpha": {"MESH6": 2}, "beta": {"MESH6": -1}})}, {},
     [("m1", "MESH6", "buy", 1, "exit")], [("m1", "mes-size")], "mes-size"),
    ("an opposite strategy's position leaves room: alpha long 4, beta short 2, alpha buys 2 (net 4)",
     sig("alpha", "buy", 2), {"m1": acct({"alpha": {"MESH6": 4}, "beta": {"MESH6": -2}})}, {},
     [("m1", "MESH6", "buy", 2, "entry")], [], None),
    ("a strategy's exit is never blocked, even when it leaves the account's net above the limit",
     sig("beta", "exit"), {"m1": acct({"alpha": {"MESH6": 5}, "beta": {"MESH6": -1}}, daily_pnl=-5000)}, {},
     [("m1", "MESH6", "buy", 1, "exit")], [], None),
    ("margin is the account's: a second strategy's entry needs the account's free margin",
     sig("beta", "buy", 1), {"m1": acct({"alpha": {"MESH6": 1}}, free_margin="129.99")}, {},
     [], [("m1", "margin")], None),
    ("the portfolio's max_contracts counts every strategy at every account: 3 + 4 + 2 > 8",
     target("delta", "long", 2),
     {"m1": acct({"alpha": {"MESH6": 2}, "beta": {"MESH6": 1}}), "bf": acct({"gamma": {"MESH6": 4}}),
      "bs": acct({})}, {},
     [], [("bf", "mes-size"), ("bs", "book-size")], None),
    # --- contracts booked to no strategy (a manual trade) belong to none ---
    ("an external position is nobody's: alpha's exit closes alpha's 1 of the account's 3",
     sig("alpha", "exit"), {"m1": acct({"alpha": {"MESH6": 1}}, positions={"MESH6": 3})}, {},
     [("m1", "MESH6", "sell", 1, "exit")], [], None),
    ("... a flat target of a strategy holding nothing leaves it alone",
     target("beta", "flat", 0), {"m1": acct({"alpha": {"MESH6": 1}}, positions={"MESH6": 3})}, {},
     [], [("m1", "target")], None),
    ("... yet the account's limit counts it: 3 external + 2 > 4",
     sig("beta", "buy", 2), {"m1": acct({}, positions={"MESH6": 3})}, {},
     [], [("m1", "mes-size")], "mes-size"),
    # --- a document with positions only: they are the signal's strategy's (the tables written before) ---
    ("positions without strategies are the signal's strategy's",
     target("beta", "flat", 0), {"m1": acct(positions={"MESH6": 1})}, {},
     [("m1", "MESH6", "sell", 1, "exit")], [], None),
    # --- best mode: holders are per strategy ---
    ("best: another strategy's position does not make a holder; the cheapest opens",
     target("delta", "long", 1), {"bf": acct({"gamma": {"MESH6": 2}}), "bs": acct({})}, {},
     [("bs", "MESH6", "buy", 1, "entry")], [("bf", "best-delta")], None),
    ("best: a strategy's holder converges its own position only",
     target("delta", "long", 2), {"bf": acct({"gamma": {"MESH6": 1}, "delta": {"MESH6": 1}}), "bs": acct({})}, {},
     [("bf", "MESH6", "buy", 1, "entry")], [("bs", "best-delta")], None),
    # --- best mode with the position at two holders: one keeps it, the others close ---
    ("best, two holders: the one at the target keeps it, the other is closed",
     target("gamma", "long", 2), {"bf": acct({"gamma": {"MESH6": 1}}), "bs": acct({"gamma": {"MESH6": 2}})}, {},
     [("bf", "MESH6", "sell", 1, "exit")], [("bs", "target"), ("bf", "best-gamma")], None),
    ("best, two holders, none at the target: the fewest contracts to trade keeps it",
     target("gamma", "long", 2), {"bf": acct({"gamma": {"MESH6": 3}}), "bs": acct({"gamma": {"MESH6": -1}})}, {},
     [("bs", "MESH6", "buy", 1, "exit"), ("bf", "MESH6", "sell", 1, "exit")], [("bs", "best-gamma")], None),
    ("best, two holders, a tie: the rule's account order (bs before bf) keeps it",
     target("gamma", "long", 2), {"bf": acct({"gamma": {"MESH6": 1}}), "bs": acct({"gamma": {"MESH6": 3}})}, {},
     [("bs", "MESH6", "sell", 1, "exit"), ("bf", "MESH6", "sell", 1, "exit")], [("bf", "best-gamma")], None),
    ("best, two holders: the keeper adds where it must, the other holder still closes",
     target("gamma", "long", 3), {"bf": acct({"gamma": {"MESH6": 1}}), "bs": acct({"gamma": {"MESH6": -1}})}, {},
     [("bs", "MESH6", "buy", 1, "exit"), ("bf", "MESH6", "buy", 2, "entry")], [("bs", "best-gamma")], None),
    ("best, two holders: a holder at a disconnected broker is closed all the same (exits are never blocked)",
     target("gamma", "long", 2),
     {"bf": acct({"gamma": {"MESH6": 2}}), "bs": acct({"gamma": {"MESH6": 1}}, connected=False)}, {},
     [("bs", "MESH6", "sell", 1, "exit")], [("bs", "best-gamma"), ("bf", "target")], None),
    ("best, two holders: the holder at the target keeps it even at a paused broker",
     target("gamma", "long", 2), {"bf": acct({"gamma": {"MESH6": 2}}), "bs": acct({"gamma": {"MESH6": 1}})},
     {"paused": ["fast"]},
     [("bs", "MESH6", "sell", 1, "exit")], [("bs", "best-gamma"), ("bf", "target")], None),
    ("best, two holders, a flat target: both close, nobody keeps anything",
     target("gamma", "flat", 0), {"bf": acct({"gamma": {"MESH6": 1}}), "bs": acct({"gamma": {"MESH6": 2}})}, {},
     [("bs", "MESH6", "sell", 2, "exit"), ("bf", "MESH6", "sell", 1, "exit")], [], None),
    ("best, two holders of delta: the closed one keeps its gamma position",
     target("delta", "long", 2),
     {"bf": acct({"gamma": {"MESH6": 1}, "delta": {"MESH6": 1}}), "bs": acct({"delta": {"MESH6": 2}})}, {},
     [("bf", "MESH6", "sell", 1, "exit")], [("bf", "best-delta"), ("bs", "target")], None),
    ("best, two holders (positions only, as before): one keeps it",
     target("gamma", "short", 1), {"bf": acct(positions={"MESH6": -1}), "bs": acct(positions={"MESH6": 2})}, {},
     [("bs", "MESH6", "sell", 2, "exit")], [("bs", "best-gamma"), ("bf", "target")], None),
]


@pytest.mark.parametrize("name,signal,accounts,extra,want_legs,want_skips,want_blocked", CASES,
                         ids=[c[0] for c in CASES])
def test_semantics(engine: Engine, name: str, signal: dict[str, Any], accounts: dict[str, Any],
                   extra: dict[str, Any], want_legs: list[Any], want_skips: list[Any],
                   want_blocked: str | None) -> None:
    record = decide(engine, signal, state_doc(accounts, **extra))
    assert legs(record) == want_legs
    assert skips(record) == want_skips
    assert record["blocked_by"] == want_blocked
    assert record["accepted"] == bool(want_legs)


# --- roll: a strategy's orders close its own contracts, oldest first ---------------------------------------------

def test_after_the_roll_a_strategy_closes_its_own_contract_not_the_older_one_of_another(engine: Engine) -> None:
    state = state_doc({"m1": acct({"alpha": {"MESH6": 2}, "beta": {"MESM6": 1}})}, now=ROLLED)
    assert legs(decide(engine, sig("beta", "sell", 2), state)) == [
        ("m1", "MESM6", "sell", 1, "exit"), ("m1", "MESM6", "sell", 1, "entry")]
    assert legs(decide(engine, sig("beta", "exit"), state)) == [("m1", "MESM6", "sell", 1, "exit")]


def test_after_the_roll_a_strategy_splits_its_order_over_its_own_contracts_oldest_first(engine: Engine) -> None:
    state = state_doc({"m1": acct({"alpha": {"MESH6": 1}, "beta": {"MESH6": 1, "MESM6": 1}})}, now=ROLLED)
    assert legs(decide(engine, sig("beta", "sell", 1), state)) == [("m1", "MESH6", "sell", 1, "exit")]
    assert legs(decide(engine, sig("beta", "sell", 3), state)) == [
        ("m1", "MESH6", "sell", 1, "exit"), ("m1", "MESM6", "sell", 1, "exit"), ("m1", "MESM6", "sell", 1, "entry")]
    assert legs(decide(engine, target("beta", "flat", 0), state)) == [
        ("m1", "MESH6", "sell", 1, "exit"), ("m1", "MESM6", "sell", 1, "exit")]


# --- what the record says ----------------------------------------------------------------------------------------

def test_a_closed_holder_says_where_the_position_is_kept(engine: Engine) -> None:
    record = decide(engine, target("gamma", "long", 2),
                    state_doc({"bf": acct({"gamma": {"MESH6": 1}}), "bs": acct({"gamma": {"MESH6": 2}})}))
    assert [s for s in record["skipped"] if s["by"] != "state"] == [
        {"account": "bs", "by": "target", "reason": "already at target +2 MES"},
        {"account": "bf", "by": "best-gamma", "reason": "best mode: the MES position is kept at bs; closing 1 here"}]
    assert record["orders"][0]["intent"] == "exit" and record["accepted"]


def test_a_non_holder_is_told_where_the_position_is_kept(tmp_path: Path) -> None:
    three = RULES.replace("accounts: [bs, bf]", "accounts: [bs, bf, m1]").replace(
        "strategies: [alpha, beta]", "strategies: [alpha, beta, gamma]")
    with Engine(load(tmp_path, three)) as eng:
        record = decide(eng, target("gamma", "long", 2), state_doc({
            "bf": acct({"gamma": {"MESH6": 1}}), "bs": acct({"gamma": {"MESH6": 3}}), "m1": acct({})}))
        assert legs(record) == [("bs", "MESH6", "sell", 1, "exit"), ("bf", "MESH6", "sell", 1, "exit")]
        assert {s["account"]: s["reason"] for s in record["skipped"]} == {
            "bf": "best mode: the MES position is kept at bs; closing 1 here",
            "m1": "best mode: the MES position is held at bs"}


# --- the state document ------------------------------------------------------------------------------------------

def test_the_state_document_takes_positions_per_strategy() -> None:
    _, state = parse_state(state_doc({
        "m1": acct({"alpha": {"mesh6": 2, "MESM6": 1}, "beta": {"MESH6": -2}, "idle": {}}),
        "m2": acct({"alpha": {"MESH6": 1}}, positions={"MESH6": 4}),
        "m3": acct(positions={"MESH6": 1})}))
    m1, m2, m3 = (state.accounts[n] for n in ("m1", "m2", "m3"))
    assert m1.strategy_positions == {"alpha": {"MESH6": 2, "MESM6": 1}, "beta": {"MESH6": -2}}
    assert dict(m1.positions) == {"MESM6": 1}  # the strategies' sum when not given; flat lines dropped
    assert m1.strategy_held("alpha", "MES") == {"MESH6": 2, "MESM6": 1} and m1.strategy_held("idle", "MES") == {}
    assert m1.strategy_held("alpha", "ES") == {}
    assert dict(m2.positions) == {"MESH6": 4} and m2.strategy_held("beta", "MES") == {}  # 3 booked to no strategy
    assert m3.strategy_positions is None and m3.strategy_held("anyone", "MES") == {"MESH6": 1}
    with pytest.raises(ValueError, match=r"accounts\.m1\.strategies: expected a mapping"):
        parse_state(state_doc({"m1": acct(strategies=["alpha"])}))
    with pytest.raises(ValueError, match=r"accounts\.m1\.strategies\.alpha\.MESH6: expected a signed integer"):
        parse_state(state_doc({"m1": acct({"alpha": {"MESH6": 1.5}})}))
    with pytest.raises(ValueError, match=r"accounts\.m1\.strategies\.alpha\.MES: not a contract code"):
        parse_state(state_doc({"m1": acct({"alpha": {"MES": 1}})}))
