"""Seeded random scenarios against the whole runtime (``tests.harness.fuzz``): signals, duplicates, flattens, drops,
pauses, price moves, clock moves across the schedule and the 18:00 ET trading-day boundary, restarts, broker
rejections and partial fills, loss limits that halt or flatten, with the invariants checked after every step, at
every quiescence point and after every flatten.

The crash variant (``generate(seed, crash=True)``) also kills the process (kill -9 semantics, in-process) at chosen
moments, among them inside a restart's or a reconnect's come-up (recovery, reconciliation, re-issued flatten exits,
catch-up), restarts it, and hot-reloads the rules (size multipliers, a ``max_contracts`` cap, the mirror routing;
valid and invalid edits) while signals flow.

CI runs ``DEFAULT_SEEDS`` and ``DEFAULT_CRASH_SEEDS``; ``MB_FUZZ_SEEDS=500`` runs seeds 0..499 of both instead
(``MB_FUZZ_SEEDS=500-999``: seeds 500..999), ``MB_FUZZ_SEED=<n>`` replays one seed of both (a failure prints the
seed and its steps).
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from brokers.base import Side
from engine.decision import Order
from engine.reload import Reload
from service.journal import Journal
from service.risk import RiskMonitor
from tests.harness.fuzz import (
    ACCOUNTS,
    CAP_LIMIT,
    Answer,
    InvariantError,
    Runner,
    Scenario,
    generate,
    rules_dir,
    run_scenario,
)
from tests.harness.runtime import NOON, Clock, signal, wait_until, world

KNOWN_FAILING: dict[int, str] = {}
"""Seeds that fail on a known bug pinned below as a strict xfail, kept out of the CI set until it is fixed (they
still run with MB_FUZZ_SEEDS / MB_FUZZ_SEED). None today."""
DEFAULT_SEEDS = [seed for seed in (*range(40), 238, 632, 646) if seed not in KNOWN_FAILING]
KNOWN_FAILING_CRASH: dict[int, str] = {}
"""The same for ``generate(seed, crash=True)`` (crashes and rules reloads), out of ``DEFAULT_CRASH_SEEDS``."""
DEFAULT_CRASH_SEEDS = [seed for seed in (*range(7), 12, 21, 27, 108, 126, 384) if seed not in KNOWN_FAILING_CRASH]
"""About 0.8 s a seed (each kills the process 0-3 times: mid-flight, inside a restart's or a reconnect's come-up,
and reloads the rules 0-4 times: multipliers, the contract cap, routing, invalid edits). 12 and 27 for a crash in
a reconnect's re-issue of missed flatten exits and in its catch-up, with routing edits; 126 for an exit that
counted on an entry the broker rejected (``service.exits``), 21 for a flatten taking over such an exit's watch; 108
for a flatten exit a trade by hand overtook while the process was dead (``service.overtaken``), 384 for a flatten
decided while the account's broker was away, with a position opened there by hand (``FlattenMixin._away``)."""
"""About 0.45 s a seed (300 seeds: 128 s). The bugs below were found by seeds 11, 16, 26, 35, 36, 40, 41, 46, 68, 72,
80, 101, 114, 122, 130, 176, 207, 319, 425, 465 and others; all of 0..299 pass since their fixes."""


def _crash_seeds() -> list[int]:
    if os.environ.get("MB_FUZZ_SEED") or os.environ.get("MB_FUZZ_SEEDS"):
        return _seeds()
    return DEFAULT_CRASH_SEEDS


def _seeds() -> list[int]:
    if os.environ.get("MB_FUZZ_SEED"):
        return [int(os.environ["MB_FUZZ_SEED"])]
    if os.environ.get("MB_FUZZ_SEEDS"):
        first, _, last = os.environ["MB_FUZZ_SEEDS"].rpartition("-")
        return list(range(int(first), int(last) + 1) if first else range(int(last)))
    return DEFAULT_SEEDS


@pytest.mark.parametrize("seed", _seeds())
async def test_a_random_scenario_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    runner = await run_scenario(tmp_path, generate(seed))
    assert runner.checks >= 1


@pytest.mark.parametrize("seed", _crash_seeds())
async def test_a_random_scenario_with_crashes_and_reloads_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    runner = await run_scenario(tmp_path, generate(seed, crash=True))
    assert runner.checks >= 1



def test_the_fuzzer_reports_an_entry_decided_for_a_halted_account_and_lets_exits_pass(tmp_path: Path) -> None:
    """The halt invariant watches ``Runtime.hold``: an entry for a halted account is a violation, an exit is not,
    and the decision is held either way (the runtime must not change because it is watched)."""
    runner = Runner(tmp_path, generate(0))
    risk = RiskMonitor(lambda contract: None, lambda contract: Decimal(5))
    risk.halt("f1", "account-loss breached", "risk:account-loss", NOON)
    held: list[str] = []
    rt = SimpleNamespace(risk=risk, hold=lambda sid, decision: held.append(sid))
    runner._watch_entries(rt)  # type: ignore[arg-type]
    exit_f1 = Order("f1", "fast", "MESH6", "sell", 1, "exit", "c-exit")
    entry_f2 = Order("f2", "fast", "MESH6", "buy", 1, "entry", "c-f2")
    rt.hold("a", SimpleNamespace(orders=(exit_f1, entry_f2)))
    assert held == ["a"] and runner.violations == []
    rt.hold("b", SimpleNamespace(orders=(Order("f1", "fast", "MESH6", "buy", 2, "entry", "c-f1"),)))
    assert held == ["a", "b"] and len(runner.violations) == 1 and "c-f1" in runner.violations[0]

def test_the_fuzzer_holds_each_decision_to_the_routing_and_the_contract_cap_of_the_rules_that_made_it(
        tmp_path: Path) -> None:
    """``check_rules_used`` reads the rules a decision came from (routing narrowed to f1 and f2 for mirror, a
    ``max_contracts`` of 2) and the positions it was decided from: a refused entry with its reason, an exit under a
    cap below the position pass; an order to an account the routing left out, an entry over the cap, an entry
    refused with no reason and an exit left out each fail, naming what broke."""
    runner = Runner(tmp_path, generate(0, crash=True))
    runner.multipliers["g"] = {name: Decimal(1) for name in ACCOUNTS}
    runner.caps["g"] = 2
    runner.routes["g"] = {"mirror": frozenset({"f1", "f2"}), "trend": frozenset({"f1", "ft", "s2", "bs"})}
    runner.states[("buy", "g")] = {"f1": (1, 1), "f2": (2, 2), "s1": (0, 0)}
    runner.states[("exit", "g")] = {"f1": (3, 3), "f2": (0, 0), "s1": (1, 1)}

    def order(account: str, side: str, quantity: int, intent: str) -> dict[str, Any]:
        return {"account": account, "side": side, "quantity": quantity, "intent": intent,
                "client_order_id": f"{account}-{intent}"}

    refused = {"account": "f2", "by": CAP_LIMIT,
               "reason": f"position after the order would be 3 MES > max_contracts 2 ({CAP_LIMIT}); orders are "
                         "rejected, never resized"}

    def check(sid: str, body: dict[str, Any], orders: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
        decision = {"signal_id": sid, "orders": orders, "skipped": skipped,
                    "ruleset": {"content_hash": "g", "generation": 2}}
        payload = {"signal_id": sid, "decision": decision}
        runner.check_rules_used(Answer({**body, "id": sid}, 202, payload, 0, frozenset({"g"})), decision)

    buy = {"strategy": "mirror", "ticker": "MES1!", "action": "buy", "quantity": 1}
    check("buy", buy, [order("f1", "buy", 1, "entry")], [refused])
    check("exit", {"strategy": "mirror", "ticker": "MES1!", "action": "exit"}, [order("f1", "sell", 3, "exit")], [])
    with pytest.raises(InvariantError, match=r"orders for \['s1'\], not among the accounts"):
        check("buy", buy, [order("f1", "buy", 1, "entry"), order("s1", "buy", 1, "entry")], [refused])
    with pytest.raises(InvariantError, match="over size-cap max_contracts 2"):
        check("buy", buy, [order("f1", "buy", 1, "entry"), order("f2", "buy", 1, "entry")], [])
    with pytest.raises(InvariantError, match="no skip says why"):
        check("buy", buy, [order("f1", "buy", 1, "entry")], [])
    with pytest.raises(InvariantError, match="an exit always closes it"):
        check("exit", {"strategy": "mirror", "ticker": "MES1!", "action": "exit"}, [], [])

    refused_g = {"signal_id": "buy", "orders": [], "skipped": [], "ruleset": {"content_hash": "g", "generation": 2}}
    with pytest.raises(InvariantError, match=r"names rules g as the ones that decided it, expected \['h'\]"):
        runner.check_rules_used(Answer({**buy, "id": "buy"}, 202, {"decision": refused_g}, 0, frozenset({"h"})),
                                refused_g)


def test_the_fuzzer_takes_the_rules_that_decided_from_the_record_not_from_which_engine_ran_first(
        tmp_path: Path) -> None:
    """A signal posted with a reload: both generations' engines may see it (the reload's swap lands around it);
    the journaled record names the one whose decision was kept, and ``check_rules_used`` holds the decision to
    those rules and to the positions they decided from (crash seed 306 failed about 1 run in 4 when the harness
    took the first engine it saw). A record naming rules whose engine never decided the signal fails."""
    runner = Runner(tmp_path, generate(0, crash=True))
    for rules, f1 in (("old", "2"), ("new", "1")):
        runner.multipliers[rules] = {name: Decimal(f1 if name == "f1" else 1) for name in ACCOUNTS}
        runner.caps[rules] = None
        runner.routes[rules] = {"mirror": frozenset({"f1"}), "trend": frozenset({"f1"})}
    runner.states[("sig", "old")] = {"f1": (0, 0)}  # noted first: this engine ran, its decision was not kept
    runner.states[("sig", "new")] = {"f1": (0, 0)}
    body = {"strategy": "mirror", "ticker": "MES1!", "action": "buy", "quantity": 2, "id": "sig"}
    orders = [{"account": "f1", "side": "buy", "quantity": 2, "intent": "entry", "client_order_id": "c"}]

    def check(rules: str, sid: str = "sig") -> None:
        decision = {"signal_id": sid, "orders": orders, "skipped": [],
                    "ruleset": {"content_hash": rules, "generation": 2}}
        runner.check_rules_used(Answer(body, 202, {"signal_id": sid, "decision": decision}, 23,
                                       frozenset({"old", "new"})), decision)

    check("new")
    with pytest.raises(InvariantError, match="its multiplier 2 in the rules that decided it makes 4"):
        check("old")
    with pytest.raises(InvariantError, match="no engine of those rules decided it"):
        check("new", sid="other")


async def test_the_fuzzer_requires_each_record_to_name_a_generation_its_own_process_applied(tmp_path: Path) -> None:
    """``check_rulesets``: a decision record names (content hash, generation) of a reload its process journaled as
    applied: the first process's generation 2 does not vouch for a record of the second; a record without
    ``ruleset`` fails too. A restart numbers on from the journal (``service.app``), so one number naming two rule
    sets in one journal fails as well."""
    runner = Runner(tmp_path, generate(0))
    journal = Journal(tmp_path / "journal.db", clock=Clock(NOON))
    await journal.start()
    try:
        runner.w = SimpleNamespace(journal=journal)  # type: ignore[assignment]

        async def reload(content_hash: str, generation: int, outcome: Any = "applied") -> None:
            await journal.record_reload(Reload(NOON, content_hash, outcome != "invalid", (), outcome, "manual",
                                               generation).as_dict())

        async def record(sid: str, ruleset: dict[str, Any] | None, **signal: Any) -> None:
            decision = {"signal_id": sid, "orders": [], "skipped": [], **({"ruleset": ruleset} if ruleset else {})}
            await journal.record_signal(raw="{}", remote=None, status="decided", reason="r",
                                        key=signal.pop("key", None), signal={"strategy": "mirror", **signal},
                                        decision=decision, signal_id=sid, at=NOON)

        runner._begin_epoch(journal)  # the first process: A at start, B applied, C rejected
        await reload("A", 1)
        await reload("B", 2)
        await reload("C", 2, "invalid")
        await record("first-b", {"content_hash": "B", "generation": 2}, key="k1")
        runner._begin_epoch(journal)  # a restart: B again, numbered on as generation 3
        await reload("B", 3)
        await record("flatten-1", {"content_hash": "B", "generation": 3}, flatten=True)
        runner.check_rulesets()
        await record("second-b2", {"content_hash": "B", "generation": 2}, key="k2")
        with pytest.raises(InvariantError, match=r"webhook signal second-b2 names rules B generation 2, which its "
                                                 r"process \(start #2 of the scenario\) never journaled"):
            runner.check_rulesets()
        await journal.execute("delete from signals where id = ?", ["second-b2"])
        await record("catch-c", {"content_hash": "C", "generation": 2}, catch_up=True)
        with pytest.raises(InvariantError, match="catch-up catch-c names rules C generation 2"):
            runner.check_rulesets()
        await journal.execute("delete from signals where id = ?", ["catch-c"])
        await record("bare", None, key="k3")
        with pytest.raises(InvariantError, match="webhook signal bare does not name its rules"):
            runner.check_rulesets()
        await journal.execute("delete from signals where id = ?", ["bare"])
        runner.check_rulesets()
        runner._begin_epoch(journal)  # a process that counts from 1 again: generation 1 would name A and B
        await reload("B", 1)
        with pytest.raises(InvariantError, match="rules generation 1 names two rule sets in one journal: A and B"):
            runner.check_rulesets()
    finally:
        await journal.close()


# -- bugs the fuzzer found, as minimal reproductions ------------------------------------------

async def test_a_flatten_closes_an_entry_still_in_flight_on_a_flat_line(tmp_path: Path) -> None:
    async with world(tmp_path, rules={"slow_ms": 20, "fill_ms": 20}, clock=Clock(NOON)) as w:
        opened = await w.submit(signal("mirror", "buy", 1, sid="open"))  # dispatched, not filled yet
        assert {o.account for o in opened.orders} == {"f1", "f2", "s1"}
        result = await w.runtime.flatten(reason="operator: everything")
        await w.settle()
        held = {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}
        assert held == {}, (held, result["orders"])


async def test_a_flatten_that_nets_an_exit_later_missed_at_a_paused_broker_still_closes_on_resume(
        tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await w.submit(signal("mirror", "buy", 1, sid="open"))
        await w.settle()
        await w.runtime.pause_broker("slow")
        closing = await w.submit(signal("mirror", "exit", sid="close"))  # s1's exit: 'new', in slow's lane
        assert {o.account for o in closing.orders} == {"f1", "f2", "s1"}
        result = await w.runtime.flatten(strategy="mirror", reason="operator")  # nets the exits in flight
        await w.settle()
        assert w.statuses("close")["s1"] == "missed"
        await w.runtime.resume_broker("slow")
        await w.settle()
        held = {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}
        assert held == {}, (held, result["orders"])
        assert [int(p["quantity"]) for p in w.connector("slow").book.positions("S-1") if int(p["quantity"])] == []


async def test_a_signal_after_a_flatten_that_counted_on_an_entry_in_flight_does_not_exit_it_again(
        tmp_path: Path) -> None:
    """Seed 72: the flatten counts the entry in flight as filled and exits it at once, so every decision after it sees
    the line flat; an exit signal meanwhile sends nothing (a follow-up closing it too would leave the account long)."""
    async with world(tmp_path, rules={"slow_ms": 20, "fill_ms": 20}, clock=Clock(NOON)) as w:
        await w.submit(signal("mirror", "sell", 2, sid="open"))  # in flight
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert sorted((o["account"], o["side"], o["quantity"]) for o in result["orders"]) == \
            [("f1", "buy", 2), ("f2", "buy", 2), ("s1", "buy", 2)]
        after = await w.submit(signal("mirror", "exit", sid="exit-after"))
        assert after.orders == ()
        await w.settle()
        assert {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity} == {}
        assert not any(s["id"].endswith("-follow-1") for s in w.journal.recent_signals(50))


async def test_an_entry_the_flatten_counted_on_and_the_broker_rejected_is_bought_back(tmp_path: Path) -> None:
    """The other way round: the broker rejects the entry the flatten exited, so the flatten's own exit opened a
    position; the follow-up closes it once the entry settles, and the account ends flat."""
    async with world(tmp_path, rules={"slow_ms": 20, "fill_ms": 20}, clock=Clock(NOON)) as w:
        w.connector("slow").reject_next(1)
        await w.submit(signal("mirror", "buy", 1, sid="open"))  # s1's entry will be rejected
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert ("s1", "sell", 1) in [(o["account"], o["side"], o["quantity"]) for o in result["orders"]]
        await w.settle()
        assert w.statuses("open")["s1"] == "rejected"
        follow = w.journal.get_signal(f"{result['signal_id']}-follow-1")
        assert follow is not None and [(o["account"], o["side"], o["quantity"], o["status"])
                                       for o in follow["orders"]] == [("s1", "buy", 1, "filled")]
        assert {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity} == {}
        assert [p for p in w.connector("slow").book.positions("S-1") if int(p["quantity"])] == []


async def test_when_the_flattens_own_exit_is_rejected_too_the_follow_up_and_the_retry_close_the_line_once(
        tmp_path: Path) -> None:
    """The flatten counted on an entry in flight (and sold 2 for it), and the broker rejects both the entry and the
    flatten's exit: the entry's follow-up buys back what the flatten sold for it, and the retry of the exit
    recomputes the line from the ledger and the broker, counting that follow-up: the account ends flat, and no
    contract is closed twice."""
    async with world(tmp_path, rules={"slow_ms": 100}, clock=Clock(NOON)) as w:
        w.runtime.flatten_retry_delays_s = (0.05, 0.05)
        await w.submit(signal("mirror", "buy", 1, sid="open"))
        await w.settle()
        w.connector("slow").reject_next(2)  # s1's next entry, then the flatten's exit
        await w.submit(signal("mirror", "buy", 1, sid="more"))  # in flight at slow for 100 ms
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert ("s1", "sell", 2) in [(o["account"], o["side"], o["quantity"]) for o in result["orders"]]
        await wait_until(lambda: w.journal.get_signal(f"{result['signal_id']}-retry-slow-1") is not None, 5)
        await w.settle()
        assert w.statuses("more")["s1"] == "rejected" and w.statuses(result["signal_id"])["s1"] == "rejected"
        follow = w.journal.get_signal(f"{result['signal_id']}-follow-1")
        assert follow is not None and [(o["account"], o["side"], o["quantity"]) for o in follow["orders"]] == \
            [("s1", "buy", 1)]
        retry = w.journal.get_signal(f"{result['signal_id']}-retry-slow-1")
        assert [(o["side"], o["quantity"], o["status"]) for o in retry["orders"]] == [("sell", 2, "filled")]
        # What the broker took (it keeps no rejected orders): the first entry, the follow-up, the retry.
        assert sorted((o["side"], int(o["quantity"]), o["status"]) for o in w.book_orders("slow", "S-1")) == \
            [("buy", 1, "filled"), ("buy", 1, "filled"), ("sell", 2, "filled")]
        assert {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity} == {}


async def test_a_flatten_exit_missed_while_the_broker_resumes_is_still_carried_out(tmp_path: Path) -> None:
    """The dispatcher finds the broker paused and journals the exit ``missed`` (an await); the operator's resume
    runs meanwhile, reads the journal (the exit is still ``new`` there: nothing owed), and un-pauses. The missed
    exit lands after it, and no later come-up or resume comes to re-issue it. The journal commit is slowed here to
    make the interleaving certain; in the fuzzer it happened with the journal's ordinary latency."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await w.submit(signal("mirror", "buy", 1, sid="open"))
        await w.settle()
        real = w.journal.order_status
        writing = asyncio.Event()

        def slow_missed(coid: str, status: str, **kw: Any) -> asyncio.Future[None]:
            if status != "missed":
                return real(coid, status, **kw)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def later() -> None:
                writing.set()
                await asyncio.sleep(0.1)  # the journal's commit, slow this once
                try:
                    await real(coid, status, **kw)
                    done.set_result(None)
                except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                    done.set_exception(exc)

            tasks.append(asyncio.create_task(later()))
            return done

        tasks: list[asyncio.Task[None]] = []
        w.journal.order_status = slow_missed  # type: ignore[method-assign]
        await w.runtime.pause_broker("fast")
        result = await w.runtime.flatten(account="f2", reason="operator")
        await asyncio.wait_for(writing.wait(), 5)  # the dispatcher found fast paused: f2's exit is being missed
        await w.runtime.resume_broker("fast")
        await asyncio.gather(*tasks)
        redo = f"{result['signal_id']}-redo-fast-1"
        await wait_until(lambda: w.journal.get_signal(redo) is not None, 5, what="the re-issue")
        await w.settle()
        assert w.statuses(result["signal_id"]) == {"f2": "missed"}
        held = {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity}
        assert ("f2", "mirror", "MESH6") not in held, (held, [s["id"] for s in w.journal.recent_signals(10)])


async def test_a_retry_closes_two_strategies_that_net_to_zero_at_the_broker(tmp_path: Path) -> None:
    """f1 follows mirror and trend: mirror long 1, trend short 1, the broker nets them to 0. A flatten of f1 sends a
    sell for mirror and a buy for trend, and the broker rejects both. The retry (``_clamp_to_broker``) counts no
    other strategy outside the batch, takes the broker's 0 as what may be closed, and clamps the first exit to 0,
    then the second: "nothing left to close". Sent together the two exits keep the broker at 0 and close both
    books; what the batch may not do is move the broker past flat as a whole."""
    async with world(tmp_path, rules_dir=rules_dir(tmp_path, {}), clock=Clock(NOON)) as w:
        w.runtime.flatten_retry_delays_s = (0.05, 0.1)
        await w.submit(signal("mirror", "buy", 1, sid="long"))
        await w.submit(signal("trend", "sell", 1, sid="short"))
        await w.settle()
        books = {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity and k[0] == "f1"}
        assert books == {("f1", "mirror", "MESH6"): 1, ("f1", "trend", "MESH6"): -1}
        w.connector("fast").reject_next(2)
        result = await w.runtime.flatten(account="f1", reason="operator")
        await wait_until(lambda: w.journal.get_signal(f"{result['signal_id']}-retry-fast-1") is not None, 5)
        await w.settle()
        await asyncio.sleep(0.5)  # every retry due, and the give-up
        await w.settle()
        assert w.statuses(result["signal_id"]) == {"f1": "rejected"}
        failed = [e for e in w.journal.risk_events(50) if e["kind"] == "flatten_failed"]
        held = {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity and k[0] == "f1"}
        assert held == {} or [e["name"] for e in failed] == ["f1"], (held, failed)


async def test_an_exit_decided_while_a_flattened_line_waits_for_its_follow_up_does_not_reverse_it(
        tmp_path: Path) -> None:
    """s1 is short 2. A reversal to long 1 sends buy 2 (exit, rejected by the broker) and buy 1 (entry, fills); the
    flatten counts both as filling (-2 + 2 + 1) and sells 1. When the follow-up waited for every counted order, the
    engine saw the line at -2 once the exit was rejected; an exit signal in that window bought 2, then the follow-up
    bought the same 2, and s1 ended long 2 (fuzz seed 319). The follow-up of each order is now held the moment it
    settles."""
    async with world(tmp_path, rules={"slow_ms": 50, "fill_ms": 50}, clock=Clock(NOON)) as w:
        await w.submit(signal("mirror", "sell", 2, sid="short"))
        await w.settle()
        w.connector("slow").reject_next(1)  # s1's exit of the reversal below
        reversal = await w.submit(signal("mirror", "buy", 1, sid="long", position="long", position_size=1))
        assert [(o.side, o.quantity, o.intent) for o in reversal.orders if o.account == "s1"] == \
            [("buy", 2, "exit"), ("buy", 1, "entry")]
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert ("s1", "sell", 1) in [(o["account"], o["side"], o["quantity"]) for o in result["orders"]]
        await wait_until(lambda: any(o["account"] == "s1" and o["status"] == "rejected"
                                     for o in w.journal.orders(signal_id="long")), 5)
        after = await w.submit(signal("mirror", "exit", sid="after"))
        # The rejected exit's follow-up (buy 2) was held the moment it settled: the engine sees the line flat.
        assert [(o.side, o.quantity) for o in after.orders if o.account == "s1"] == []
        await w.settle()
        held = {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity and k[0] == "s1"}
        assert held == {}, (held, [s["id"] for s in w.journal.recent_signals(10)])


async def test_a_flatten_exit_missed_during_the_resumes_catch_up_is_still_carried_out(tmp_path: Path) -> None:
    """The risk flatten of s2 (fuzz crash seed 593, final check: "s2 still holds {('trend', 'MESH6'): -2}") was
    issued while slow was paused, and the operator's resume ran meanwhile. The resume reads what the flattens owe
    (the exit is still ``new`` in the journal: nothing), then runs the catch-up a come-up while paused left to it:
    trend's catch-up decides s2 at its flat target (the flatten voided the target, and its exit, still in flight,
    counts as closing s2) and journals bs's order; the exit's ``missed`` lands meanwhile, when slow is not open
    yet, so ``_on_status`` does not redo it either, and nothing closes s2. The interleaving is made certain here by holding the two journal writes; in the fuzzer it happened with
    the journal's ordinary latency."""
    async with world(tmp_path, rules_dir=rules_dir(tmp_path, {}), clock=Clock(NOON)) as w:
        assert w.runtime.pool is not None
        await w.submit(signal("mirror", "buy", 1, sid="m", position="long", position_size=1))
        await w.submit(signal("trend", "buy", 1, sid="t", position="long", position_size=1))
        await w.settle()
        await w.runtime.pause_broker("slow")
        w.connector("slow").disconnect("drop")
        await wait_until(lambda: w.runtime.pool["slow"].down, what="slow down")
        await w.submit(signal("trend", "buy", 2, sid="t2", position="long", position_size=2))  # s2, bs: missed
        await w.connector("slow").reconnect()  # a come-up while paused: its catch-up is owed to the resume
        slot = w.runtime.pool["slow"]
        await wait_until(lambda: not slot.down and not slot.recovering, what="slow back, paused")

        loop = asyncio.get_running_loop()
        catching_up, missed_done = asyncio.Event(), asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        real_status, real_signal = w.journal.order_status, w.journal.record_signal

        def held_missed(coid: str, status: str, **kw: Any) -> Any:
            if status != "missed":
                return real_status(coid, status, **kw)
            done: asyncio.Future[None] = loop.create_future()

            async def later() -> None:
                await catching_up.wait()  # lands while the resume's catch-up journals
                try:
                    await real_status(coid, status, **kw)
                    done.set_result(None)
                except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                    done.set_exception(exc)
                missed_done.set()

            tasks.append(asyncio.create_task(later()))
            return done

        async def catch_up_after_the_miss(**kw: Any) -> Any:
            if (kw.get("signal") or {}).get("catch_up"):
                catching_up.set()
                await missed_done.wait()
                await wait_until(lambda: "missed" in w.statuses(result["signal_id"]).values())
                for _ in range(3):
                    await asyncio.sleep(0)  # the tracker believes it and runs its hooks, slow still paused
            return await real_signal(**kw)

        w.journal.order_status = held_missed  # type: ignore[method-assign]
        w.journal.record_signal = catch_up_after_the_miss  # type: ignore[method-assign]
        result = await w.runtime.flatten(account="s2", reason="operator")
        assert [(o["account"], o["side"], o["quantity"]) for o in result["orders"]] == [("s2", "sell", 1)]
        await w.runtime.resume_broker("slow")
        await asyncio.gather(*tasks)
        await w.settle()
        assert w.statuses(result["signal_id"]) == {"s2": "missed"}
        assert [s["id"] for s in w.journal.recent_signals(20) if "-catchup-" in s["id"]], "the catch-up ran"
        held = {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity and k[0] == "s2"}
        assert held == {} and not [p for p in w.connector("slow").book.positions("S-2") if int(p["quantity"])], \
            (held, [s["id"] for s in w.journal.recent_signals(20)])


async def test_a_flatten_exit_missed_during_a_come_ups_catch_up_is_carried_out_once_the_broker_opens(
        tmp_path: Path) -> None:
    """The come-up's twin of the test above: slow comes back (no pause) and, while its catch-up journals (after the
    come-up's redo read the journal), an operator flattens s2; slow is not open yet, so the exit is missed at once.
    Before, nothing re-issued it (``_on_status`` redid only at a broker already open); now the redo waits for the
    come-up to end and carries it out."""
    async with world(tmp_path, rules_dir=rules_dir(tmp_path, {}), clock=Clock(NOON)) as w:
        assert w.runtime.pool is not None
        await w.submit(signal("trend", "buy", 1, sid="t", position="long", position_size=1))
        await w.settle()
        w.connector("slow").disconnect("drop")
        await wait_until(lambda: w.runtime.pool["slow"].down, what="slow down")
        await w.submit(signal("trend", "buy", 2, sid="t2", position="long", position_size=2))  # s2: missed
        real_signal = w.journal.record_signal
        flattened: dict[str, Any] = {}

        async def flatten_during_the_catch_up(**kw: Any) -> Any:
            if (kw.get("signal") or {}).get("catch_up") and not flattened:
                flattened.update(await w.runtime.flatten(account="s2", reason="operator"))
                await wait_until(lambda: "missed" in w.statuses(flattened["signal_id"]).values())
            return await real_signal(**kw)

        w.journal.record_signal = flatten_during_the_catch_up  # type: ignore[method-assign]
        await w.connector("slow").reconnect()
        slot = w.runtime.pool["slow"]
        await wait_until(lambda: w.runtime.pool is not None and w.runtime.pool.available("slow"), what="slow open")
        await wait_until(lambda: not w.runtime.redo_tasks, what="the redo ran")
        await w.settle()
        assert flattened and w.statuses(flattened["signal_id"]) == {"s2": "missed"}
        assert w.journal.get_signal(f"{flattened['signal_id']}-redo-slow-1") is not None, "re-issued"
        held = {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity and k[0] == "s2"}
        assert held == {} and not [p for p in w.connector("slow").book.positions("S-2") if int(p["quantity"])], \
            (held, [s["id"] for s in w.journal.recent_signals(20)])
        assert not slot.recovering


async def test_an_entry_and_the_flatten_exit_counting_on_it_both_missed_leave_the_account_flat(tmp_path: Path) -> None:
    """Seed 438 (crash mode; the crash came after the damage): ft's buy 2 was journaled ``sending`` when fast
    dropped, so its request never left. A flatten of the strategy counted it as filling and sold 2 for it: missed,
    fast is down. At fast's come-up, recovery finds no such order (``missed``: never sent); the flatten's watch
    issues its follow-up, buy back 2, held; the re-issue of the missed sell counts that buy as pending but is
    clamped to the broker's position, flat: "nothing left to close". The follow-up then buys 2 back for a sale
    that never happened."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        assert w.runtime.pool is not None

        def drop_at_sending(tracked: Any, status: str) -> None:
            if status == "sending" and tracked.job.broker == "fast" and w.connector("fast").connected:
                w.connector("fast").disconnect("drop")  # the request has not left: it never will

        w.runtime.tracker.hooks.append(drop_at_sending)
        await w.submit(signal("mirror", "buy", 2, sid="open"))
        await wait_until(lambda: w.runtime.pool is not None and w.runtime.pool["fast"].down, what="fast down")
        w.runtime.tracker.hooks.remove(drop_at_sending)
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert sorted((o["account"], o["side"], o["quantity"]) for o in result["orders"]) == \
            [("f1", "sell", 2), ("f2", "sell", 2), ("s1", "sell", 2)]
        await w.connector("fast").reconnect()
        slot = w.runtime.pool["fast"]
        await wait_until(lambda: not slot.down and not slot.recovering, what="fast back")
        await w.settle()
        assert w.statuses("open") == {"f1": "missed", "f2": "missed", "s1": "filled"}
        held = {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity}
        at_fast = {a: [p for p in w.connector("fast").book.positions(a) if int(p["quantity"])] for a in ("F-1", "F-2")}
        assert held == {} and at_fast == {"F-1": [], "F-2": []}, \
            (held, at_fast, [s["id"] for s in w.journal.recent_signals(20)])


async def test_the_same_across_a_restart_reads_the_flattens_failed_exit_from_the_journal(tmp_path: Path) -> None:
    """As above with a restart between the flatten and fast's return: the new process's recovery resends the
    entries (not found at the broker) and the broker rejects them; the rebuilt watch sees them settle unfilled
    where the flatten's own exit (missed before the restart) is not tracked any more. The journal says it failed,
    so no follow-up either, and the re-issue of the exit finds nothing to close."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        assert w.runtime.pool is not None

        def drop_at_sending(tracked: Any, status: str) -> None:
            if status == "sending" and tracked.job.broker == "fast" and w.connector("fast").connected:
                w.connector("fast").disconnect("drop")

        w.runtime.tracker.hooks.append(drop_at_sending)
        await w.submit(signal("mirror", "buy", 2, sid="open"))
        await wait_until(lambda: w.runtime.pool is not None and w.runtime.pool["fast"].down, what="fast down")
        w.runtime.tracker.hooks.remove(drop_at_sending)
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        fid = result["signal_id"]
        await wait_until(lambda: w.statuses(fid).get("f1") == "missed", what="the exit missed")
    async with world(tmp_path, clock=Clock(NOON), start=False) as w:
        w.connector("fast").reject_next(2)  # the recovery's resend of the two entries: they end unfilled
        await w.runtime.start()
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert w.statuses("open") == {"f1": "rejected", "f2": "rejected", "s1": "filled"}
        assert not [r for r in w.journal.recent_signals(50) if (r.get("signal") or {}).get("follow_of") == fid]
        held = {k: b.quantity for k, b in w.runtime.ledger.items() if b.quantity}
        at_fast = {a: [p for p in w.connector("fast").book.positions(a) if int(p["quantity"])] for a in ("F-1", "F-2")}
        assert held == {} and at_fast == {"F-1": [], "F-2": []}, \
            (held, at_fast, [s["id"] for s in w.journal.recent_signals(20)])


# -- crashes (kill -9 in the test process: ``Runner._kill``) ------------------------------------------------------

async def _crash_runner(tmp_path: Path, **options: Any) -> Runner:
    """A started crash-mode Runner at NOON with no steps: a test drives it by hand (``_post``, ``_kill``, ``_bury``,
    ``_open``) and closes it with ``_close``."""
    scenario = Scenario(None, {"fast_ms": 0, "slow_ms": 0, "fill_ms": 0, "schedule": False,
                               "start": NOON.isoformat(), "crash": True, **options}, [])
    runner = Runner(tmp_path, scenario)
    runner._rules = rules_dir(tmp_path, scenario.options)
    runner.clock = Clock(NOON)
    me = asyncio.current_task()
    assert me is not None
    runner._keep = {me}
    await runner._open()
    return runner


async def test_a_crash_before_a_flattens_follow_up_is_journaled_does_not_leave_the_line_reversed(
        tmp_path: Path) -> None:
    """s1's entry (buy 1) is in flight at slow when an operator flattens mirror: the flatten counts it as filling
    and sells 1 for it. The broker rejects the entry; the flatten owes a follow-up (buy back the 1 it sold). The
    process dies the moment the rejection is journaled, before the follow-up is (kill -9 between two commits). The
    restart recovers the flatten's sell (journaled in flight, not at the broker: sent) and nothing else knows the
    flatten counted on the entry: s1 ended short 1 at the broker and in the ledger, a position nobody decided (fuzz
    crash seed 198, when the watch lived in memory only: ``Runtime._netted``). Passes since the flatten's watch is
    journaled and rebuilt at start (tests/test_flatten_watch_restart.py)."""
    runner = await _crash_runner(tmp_path, slow_ms=30)
    try:
        w = runner.w
        assert w is not None
        w.connector("slow").reject_next(1)  # s1's entry
        await runner._post(signal("mirror", "buy", 1, sid="open"))
        assert runner.answers[-1].status == 202

        def kill_at_rejection(tracked: Any, status: str) -> None:
            if status == "rejected" and not runner._killed:
                runner._kill()

        w.runtime.tracker.hooks.append(kill_at_rejection)
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert ("s1", "sell", 1) in [(o["account"], o["side"], o["quantity"]) for o in result["orders"]]
        await wait_until(lambda: runner._killed, 5, what="the rejection of s1's entry")
        await runner._bury([])
        await runner._open()
        await runner.soft_settle()
        assert runner.w is not None
        await runner.w.settle()
        held = {k: q for k, q in runner.ledger_lines().items() if k[0] == "s1"}
        assert held == {} and runner.broker_positions("s1") == {}, (held, runner.broker_positions("s1"))
    finally:
        await runner._close()


# -- manual trades at the broker (``manual`` steps) -----------------------------------------------------------------

async def test_a_strategy_that_reopens_after_a_manual_close_is_closed_by_its_exit(tmp_path: Path) -> None:
    """Fuzz seed 10 under MB_FUZZ_MANUAL_STRICT (f2): mirror is short 2 at f1; the trader buys 2 back by hand (a
    manual close: mirror's next exit must send nothing, and does). mirror then goes long 2 (its own view: flat, so
    it buys 2), and its exit sells those 2. Netted against the strategies' books at every read (as it was), the hand
    buy ate mirror's new long: its exit sent nothing and f1 stayed long 2 that nobody would close."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        opened = await w.submit(signal("mirror", "sell", 2, sid="short", position="short", position_size=2))
        await w.settle()
        contract = opened.orders[0].contract
        fill = w.connector("fast").manual_trade("F-1", contract, Side.BUY, 2, "manual-1")  # closed by hand
        await wait_until(lambda: f"fast:{fill.fill_id}" in w.runtime.ledger.seen_fills, what="the manual fill")
        long = await w.submit(signal("mirror", "buy", 2, sid="long", position="long", position_size=2))
        assert [(o.side, o.quantity) for o in long.orders if o.account == "f1"] == [("buy", 2)]
        await w.settle()
        closing = await w.submit(signal("mirror", "exit", sid="exit"))
        await w.settle()
        at_f1 = {p.contract: p.quantity for p in await w.connector("fast").positions("F-1") if p.quantity}
        assert [(o.side, o.quantity) for o in closing.orders if o.account == "f1"] == [("sell", 2)] and at_f1 == {}, \
            (closing.orders, at_f1, w.runtime.ledger.strategy_lines())


def test_the_fuzzer_reads_who_holds_what_from_the_brokers_fills_netting_each_manual_trade_when_it_is_made(
        tmp_path: Path) -> None:
    """``model_lines``: a manual close nets what the strategy held then; the strategy's later trades are its own;
    a position opened by hand is netted first by a later trade by hand, never by a strategy's trade. The journal
    says which strategy each of our fills is; the ``manual-`` client order ids are the trader's."""
    runner = Runner(tmp_path, generate(0))
    fills = [("mb-1", "sell", 2, "mirror"), ("manual-1", "buy", 2, None), ("mb-2", "buy", 2, "mirror"),
             ("manual-2", "sell", 1, None), ("mb-3", "buy", 1, "trend"), ("manual-3", "sell", 3, None)]
    rows = [(i + 1, f"F{i}", coid, "MESH6", side, qty) for i, (coid, side, qty, _s) in enumerate(fills)]
    journal = [{"broker": "fast", "account": "f1", "fill_id": f"F{i}", "strategy": s}
               for i, (_c, _side, _q, s) in enumerate(fills) if s]

    class Db:
        def execute(self, sql: str, params: Any = ()) -> Any:
            return SimpleNamespace(fetchall=lambda: rows)

    connector = SimpleNamespace(book=SimpleNamespace(db=Db()))
    runner.w = SimpleNamespace(journal=SimpleNamespace(fills=lambda: journal,  # type: ignore[assignment]
                                                       _query=lambda sql, params: []),
                               connector=lambda broker: connector)
    # mirror -2, closed by hand (nothing left to nobody), then +2 of its own; the hand sell 1 closes 1 of it
    # (mirror 1); trend +1; the hand sell 3 closes mirror's 1 and trend's 1 (by name), and 1 is nobody's.
    assert runner.model_lines("f1") == {("(external)", "MESH6"): -1}
    rows[:] = rows[:3]
    assert runner.model_lines("f1") == {("mirror", "MESH6"): 2}
