"""A flatten supersedes the decisions held when it is computed; a broker the operator keeps paused does not catch up.

Held decisions: the webhook (and catch-up) counts a decision's orders from the decision on (``Runtime.hold``) and
dispatches them only after the signal's journal commit. A flatten computed in between (operator, risk
``flatten_and_halt``, schedule) closes what the ledger and the orders in flight hold; the held orders in its scope
are never sent (journaled ``missed`` with the flatten's id), so that an entry decided just before it does not stay
open and a held exit does not sell a second time next to the flatten's own exit. Held orders outside its scope go out
as usual. Real runtime, real journal, paper brokers; every position is read from the paper broker's own book.

Then: a broker that comes back while paused leaves catch-up (like the flattens it missed) to ``resume_broker``; and
``Journal.record_orders``, which journals orders that never leave in one transaction.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from brokers.feed import PriceFeed
from engine.decision import Decision
from engine.signal import parse_signal
from service.app import JOURNAL, RUNTIME, create_app
from service.config import ServiceConfig
from service.dispatch import FILLED, MISSED
from service.journal import Journal, JournalConflict, JournalError
from service.runtime import Runtime
from tests.harness.runtime import NOON, ROOT, Clock, World, app_runtime, signal, wait_until, world, write_rules

MIRROR = {"f1": ("fast", "F-1"), "f2": ("fast", "F-2"), "s1": ("slow", "S-1")}
BOOKS = {**MIRROR, "bf": ("fast", "B-F"), "bs": ("slow", "B-S")}


def held(w: World, account: str) -> int:
    """``account``'s MES position as its paper broker holds it (not what the ledger believes)."""
    broker, name = BOOKS[account]
    return sum(int(p["quantity"]) for p in w.connector(broker).book.positions(name))


def sent(w: World, account: str) -> list[tuple[str, int]]:
    """Every order the paper broker received for ``account``, in order."""
    broker, name = BOOKS[account]
    return [(o["side"], int(o["quantity"])) for o in w.book_orders(broker, name)]


async def decide_and_journal(w: World, body: dict[str, Any]) -> Decision:
    """What the webhook does up to its answer: decide, hold, journal. The caller dispatches (or not)."""
    now = w.clock()
    parsed = parse_signal(body)
    decision = w.watcher.engine.decide(parsed, w.runtime.engine_state(now), now)
    w.runtime.hold(parsed.id, decision)
    await w.journal.record_signal(
        signal_id=parsed.id, raw=json.dumps(body), remote=None, status="accepted" if decision.orders else "decided",
        reason=decision.reason, key=parsed.id,
        signal={k: v for k, v in vars(parsed).items() if v is not None and k != "id_derived"},
        decision=decision.to_json(), orders=[{**o.to_json(), "margin_usd": o.margin_usd} for o in decision.orders],
        at=now)
    return decision


def missed_by(w: World, sid: str) -> dict[str, str]:
    """Per account, the detail of each missed order of signal ``sid``."""
    row = w.journal.get_signal(sid)
    assert row is not None
    return {o["account"]: str(o["detail"]) for o in row["orders"] if o["status"] == MISSED}


async def nothing_held(w: World) -> None:
    """No hold left, and no margin reserved once the brokers' snapshots reflect the fills (a reservation of an
    order that never left would stay forever)."""
    rt = w.runtime
    assert rt._holds == {} and rt._held == {}, (rt._holds, rt._held)
    await wait_until(lambda: Decimal(rt.status()["reserved_margin_usd"]) == 0, what="no margin reserved")


async def open_mirror(w: World, quantity: int = 2) -> None:
    await w.submit(signal("mirror", "buy", quantity, sid="e1", position="long", position_size=quantity))
    await w.settle()
    assert w.statuses("e1") == {a: FILLED for a in MIRROR}


# -- gap 1: a flatten supersedes held decisions ----------------------------------------------------------------------

async def test_an_entry_held_when_a_flatten_is_computed_is_never_sent(tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        decision = await decide_and_journal(w, signal("mirror", "buy", 2, sid="e1"))
        assert {o.account for o in decision.orders} == set(MIRROR)
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert result["orders"] == []  # nothing filled yet: nothing to close
        w.runtime.dispatch("e1", decision)
        await w.settle()

        assert {a: sent(w, a) for a in MIRROR} == {a: [] for a in MIRROR}
        assert w.statuses("e1") == {a: MISSED for a in MIRROR}
        assert all(result["signal_id"] in detail for detail in missed_by(w, "e1").values()), missed_by(w, "e1")
        await nothing_held(w)
        assert all(w.runtime.engine_state(w.clock()).accounts[a].positions == {} for a in MIRROR)
        # The accounts trade normally afterwards.
        await w.submit(signal("mirror", "buy", 1, sid="e2"))
        await w.settle()
        assert {a: held(w, a) for a in MIRROR} == {a: 1 for a in MIRROR}


@pytest.mark.parametrize("body", [
    signal("mirror", "exit", sid="x1"),
    signal("mirror", "sell", 4, sid="x1", position="short", position_size=2),  # a reversal: sell 2 + 2
], ids=["exit", "reversal"])
async def test_an_exit_held_when_a_flatten_is_computed_does_not_sell_a_second_time(tmp_path: Path,
                                                                                   body: dict[str, Any]) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await open_mirror(w)
        decision = await decide_and_journal(w, body)
        assert {(o.account, o.side) for o in decision.orders} == {(a, "sell") for a in MIRROR}
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert sorted((o["account"], o["side"], o["quantity"]) for o in result["orders"]) == [
            (a, "sell", 2) for a in sorted(MIRROR)]
        w.runtime.dispatch("x1", decision)
        await w.settle()

        # Flat, not short: the flatten's exit went out, the held one never did.
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}
        assert {a: sent(w, a) for a in MIRROR} == {a: [("buy", 2), ("sell", 2)] for a in MIRROR}
        assert w.statuses(result["signal_id"]) == {a: FILLED for a in MIRROR}
        assert w.statuses("x1") == {a: MISSED for a in MIRROR}
        await nothing_held(w)
        assert w.runtime.positions() == []


async def test_held_orders_outside_the_flattens_scope_are_sent_as_usual(tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        mirror = await decide_and_journal(w, signal("mirror", "buy", 2, sid="e1"))
        best = await decide_and_journal(w, signal("best", "buy", 1, sid="b1"))
        # Another account, another strategy, other roots: none of them is the flatten's.
        result = await w.runtime.flatten(account="f1", strategy="mirror", reason="operator")
        assert (await w.runtime.flatten(account="f2", reason="risk", instruments=["ES"]))["orders"] == []
        w.runtime.dispatch("e1", mirror)
        w.runtime.dispatch("b1", best)
        await w.settle()

        assert w.statuses("e1") == {"f1": MISSED, "f2": FILLED, "s1": FILLED}
        assert result["signal_id"] in missed_by(w, "e1")["f1"]
        assert (held(w, "f1"), held(w, "f2"), held(w, "s1")) == (0, 2, 2)
        assert held(w, "bf") + held(w, "bs") == 1
        await nothing_held(w)


async def test_a_hold_released_after_a_flatten_leaves_nothing_behind(tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        now = w.clock()
        parsed = parse_signal(signal("mirror", "buy", 2, sid="e1"))
        decision = w.watcher.engine.decide(parsed, w.runtime.engine_state(now), now)
        w.runtime.hold("e1", decision)  # its journal commit will fail: never acknowledged
        assert Decimal(w.runtime.status()["reserved_margin_usd"]) > 0
        await w.runtime.flatten(strategy="mirror", reason="operator")
        w.runtime.release("e1")
        await nothing_held(w)
        assert w.journal.get_signal("e1") is None and w.journal.orders() == []
        assert all(w.runtime.engine_state(w.clock()).accounts[a].positions == {} for a in MIRROR)

        await w.submit(signal("mirror", "buy", 2, sid="e2"))
        await w.settle()
        assert {a: held(w, a) for a in MIRROR} == {a: 2 for a in MIRROR}


async def test_a_restart_after_the_flatten_sends_nothing_it_superseded(tmp_path: Path) -> None:
    clock = Clock(NOON)
    async with world(tmp_path, clock=clock) as w:
        await open_mirror(w)
        exit_ = await decide_and_journal(w, signal("mirror", "exit", sid="x1"))
        await w.runtime.flatten(strategy="mirror", reason="operator")
        w.runtime.dispatch("x1", exit_)
        await decide_and_journal(w, signal("mirror", "buy", 1, sid="e2"))
        await w.runtime.flatten(strategy="mirror", reason="operator again")
        await w.settle()
        # The process ends before e2 is dispatched (a crash right after the flatten): the journal must already say
        # that its orders never leave, or the restart's recovery sends them.
        assert w.statuses("e2") == {a: MISSED for a in MIRROR}
        w.runtime.release("e2")
    async with world(tmp_path, clock=clock) as w:
        await w.settle()
        assert {a: sent(w, a) for a in MIRROR} == {a: [("buy", 2), ("sell", 2)] for a in MIRROR}
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}
        assert w.statuses("x1") == w.statuses("e2") == {a: MISSED for a in MIRROR}
        assert w.runtime.tracker.unsettled() == []


async def test_an_exit_decided_while_the_flatten_awaits_its_commit_sees_the_flattens_exits(tmp_path: Path) -> None:
    """The converse order: the flatten is computed first, then (during its own journal commit, before its exits are
    dispatched) an exit signal and a second flatten are decided. Both must see the flatten's exits."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await open_mirror(w)
        commit = Commit(w.journal, lambda s: bool(s.get("flatten")) and s.get("reason") == "operator")
        first = asyncio.create_task(w.runtime.flatten(strategy="mirror", reason="operator"))
        await asyncio.wait_for(commit.reached.wait(), 5)
        try:
            late = await decide_and_journal(w, signal("mirror", "exit", sid="x1"))
            assert late.orders == (), late.to_json()  # nothing left to exit: the flatten's exits count
            assert (await w.runtime.flatten(strategy="mirror", reason="risk"))["orders"] == []
        finally:
            commit.gate.set()
        result = await asyncio.wait_for(first, 5)
        w.runtime.release("x1")
        await w.settle()
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}
        assert {a: sent(w, a) for a in MIRROR} == {a: [("buy", 2), ("sell", 2)] for a in MIRROR}
        assert w.statuses(result["signal_id"]) == {a: FILLED for a in MIRROR}
        await nothing_held(w)


# -- gap 1 through the webhook: the signal's commit held open over real HTTP -----------------------------------------

SECRET = "flatten-holds-secret"


class Commit:
    """Holds the journal commit of the first signal ``which`` matches until ``open()`` (as in
    tests/test_concurrent_signals.py); every other write commits as usual."""

    def __init__(self, journal: Journal, which: Callable[[dict[str, Any]], bool]) -> None:
        self.reached, self.gate, self.used = asyncio.Event(), asyncio.Event(), False
        record = journal.record_signal

        async def held_commit(**kwargs: Any) -> Any:
            if not self.used and which(kwargs.get("signal") or {}):
                self.used = True
                self.reached.set()
                await self.gate.wait()
            return await record(**kwargs)

        journal.record_signal = held_commit  # type: ignore[method-assign]


@pytest.fixture
async def app(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    rules = write_rules(tmp_path / "rules")
    feed = PriceFeed(seed=0)
    feed.set_price(ROOT, Decimal("5000"))

    config = ServiceConfig(rules_dir=rules, data_dir=tmp_path / "data", webhook_secret=SECRET, paper_tick_s=0)
    client = await aiohttp_client(create_app(config, runtime_factory=app_runtime(feed)))
    assert await client.server.app[RUNTIME].ready(10.0)
    commits: list[Commit] = []
    client.commits = commits
    try:
        yield client
    finally:
        for commit in commits:
            commit.gate.set()


async def post(client: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with client.post("/webhook", data=json.dumps({"secret": SECRET, **body}),
                           headers={"Content-Type": "text/plain"}) as r:
        return r.status, await r.json()


async def test_over_http_an_exit_answered_before_a_flatten_and_dispatched_after_it_is_not_sent(app: Any) -> None:
    runtime: Runtime = app.server.app[RUNTIME]
    journal: Journal = app.server.app[JOURNAL]

    def position(account: str) -> int:
        broker, name = MIRROR[account]
        return sum(int(p["quantity"]) for p in runtime.pool.connector(broker).book.positions(name))

    async def settle() -> None:
        await wait_until(lambda: not runtime.tracker.unsettled() and not any(runtime.dispatcher.queued().values())
                         and not runtime.dispatcher._running, what="orders settled")

    code, entry = await post(app, signal("mirror", "buy", 2, sid="e1"))
    assert code == 202 and len(entry["decision"]["orders"]) == 3
    await settle()
    assert {a: position(a) for a in MIRROR} == {a: 2 for a in MIRROR}

    commit = Commit(journal, lambda s: s.get("key") == "x1")
    app.commits.append(commit)
    pending = asyncio.create_task(post(app, signal("mirror", "exit", sid="x1")))
    await asyncio.wait_for(commit.reached.wait(), 5)
    result = await runtime.flatten(strategy="mirror", reason="operator")  # decided while x1 awaits its commit
    commit.gate.set()
    code, answer = await asyncio.wait_for(pending, 5)
    # The answer stays what was decided; the journal tells what happened to it.
    assert code == 202 and sorted((o["account"], o["side"]) for o in answer["decision"]["orders"]) == [
        (a, "sell") for a in sorted(MIRROR)]
    await settle()
    await wait_until(lambda: {o["status"] for o in journal.orders(signal_id=answer["signal_id"])} == {MISSED},
                     what="x1 journaled missed")

    assert {a: position(a) for a in MIRROR} == {a: 0 for a in MIRROR}  # flat, not short
    details = [str(o["detail"]) for o in journal.orders(signal_id=answer["signal_id"])]
    assert all(result["signal_id"] in d for d in details), details
    assert {o["status"] for o in journal.orders(signal_id=result["signal_id"])} == {FILLED}


# -- gap 2: a broker that comes back while paused waits for the resume to catch up -----------------------------------

async def come_back_paused(w: World, broker: str) -> None:
    w.connector(broker).disconnect("test drop")
    await wait_until(lambda: w.runtime.pool[broker].down, what=f"{broker} down")
    await w.connector(broker).reconnect()
    await wait_until(lambda: not w.runtime.pool[broker].down and not w.runtime.pool[broker].recovering,
                     what=f"{broker} back (paused)")
    await w.settle()


async def test_a_broker_back_while_paused_catches_up_only_when_resumed(tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await open_mirror(w)
        await w.runtime.pause_broker("slow")
        await w.submit(signal("mirror", "buy", 1, sid="e2", position="long", position_size=3))
        await w.settle()
        assert w.statuses("e2") == {"f1": FILLED, "f2": FILLED, "s1": MISSED}

        before = len(w.runtime.catchups)
        await come_back_paused(w, "slow")
        assert w.runtime.pool["slow"].admin_paused
        assert w.runtime.catchups[before:] == [] and sent(w, "s1") == [("buy", 2)]  # the pause holds

        resumed = await w.runtime.resume_broker("slow")
        assert resumed["available"] is True
        await w.settle()
        [caught] = [c for c in w.runtime.catchups[before:] if c["strategy"] == "mirror"]
        assert [(o["account"], o["side"], o["quantity"]) for o in caught["orders"]] == [("s1", "buy", 1)]
        assert held(w, "s1") == 3 and sent(w, "s1") == [("buy", 2), ("buy", 1)]
        # Resumed once more, nothing is owed.
        await w.runtime.pause_broker("slow")
        await w.runtime.resume_broker("slow")
        await w.settle()
        assert sent(w, "s1") == [("buy", 2), ("buy", 1)]


async def test_a_resume_carries_out_the_missed_flatten_before_catching_up(tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await open_mirror(w)
        await w.runtime.pause_broker("slow")
        result = await w.runtime.flatten(account="s1", reason="operator")
        await w.settle()
        assert w.statuses(result["signal_id"]) == {"s1": MISSED}

        before = len(w.runtime.catchups)
        await come_back_paused(w, "slow")
        assert w.runtime.catchups[before:] == [] and held(w, "s1") == 2

        await w.runtime.resume_broker("slow")
        await w.settle()
        redo = w.journal.get_signal(f"{result['signal_id']}-redo-slow-1")
        assert redo is not None and w.statuses(redo["id"]) == {"s1": FILLED}
        # The flatten voids e1's target and closed s1 already: catch-up finds nothing left to do.
        [caught] = [c for c in w.runtime.catchups[before:] if c["strategy"] == "mirror"]
        assert caught["flat"] is True and caught["orders"] == []
        assert held(w, "s1") == 0 and sent(w, "s1") == [("buy", 2), ("sell", 2)]


# -- gap 4: Journal.record_orders ------------------------------------------------------------------------------------

def leg(coid: str, account: str = "f1", **extra: Any) -> dict[str, Any]:
    return {"client_order_id": coid, "account": account, "broker": "fast", "contract": "MESH6", "side": "buy",
            "quantity": 1, "intent": "entry", **extra}


async def test_record_orders_inserts_moves_new_orders_and_never_touches_what_left(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    await journal.start()
    try:
        await journal.record_signal(signal_id="s1", raw="{}", remote=None, status="accepted", reason=None, key="s1",
                                    signal={"strategy": "mirror"}, decision=None,
                                    orders=[leg("mb-new"), leg("mb-sent", "f2")], at=NOON)
        await journal.order_status("mb-sent", "sending", at=NOON)

        written = await journal.record_orders("s1", [leg("mb-new"), leg("mb-sent", "f2"),
                                                     leg("mb-other", "s1", strategy="trend", margin_usd=Decimal("50"),
                                                         detail="broker slow down or paused at dispatch")],
                                              MISSED, detail="superseded by flatten-x", at=NOON)
        assert written == ["mb-new", "mb-other"]
        rows = {o["client_order_id"]: o for o in journal.orders(signal_id="s1", history=True)}
        assert [(c, o["seq"], o["status"]) for c, o in rows.items()] == [
            ("mb-new", 0, MISSED), ("mb-sent", 1, "sending"), ("mb-other", 2, MISSED)]
        assert [(e["status"], e["detail"]) for e in rows["mb-new"]["history"]] == [
            ("new", None), (MISSED, "superseded by flatten-x")]
        assert [(e["status"], e["detail"]) for e in rows["mb-other"]["history"]] == [
            (MISSED, "broker slow down or paused at dispatch")]
        assert rows["mb-other"]["strategy"] == "trend" and rows["mb-other"]["margin_usd"] == "50"
        assert [e["status"] for e in rows["mb-sent"]["history"]] == ["new", "sending"]

        # A repeat writes nothing; a signal never journaled gets no orphan orders; a status that may still leave
        # is refused.
        assert await journal.record_orders("s1", [leg("mb-new"), leg("mb-other", "s1")], MISSED) == []
        assert len(journal.order_events("mb-other")) == 1
        assert await journal.record_orders("nope", [leg("mb-orphan")], MISSED) == []
        assert journal.get_order("mb-orphan") is None
        with pytest.raises(ValueError, match="never leave"):
            await journal.record_orders("s1", [leg("mb-x")], "new")
        with pytest.raises(KeyError):
            await journal.record_orders("s1", [{"client_order_id": "mb-y"}], MISSED)
    finally:
        await journal.close()


async def test_mirror_orders_missed_at_a_paused_broker_are_journaled_once_each(tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await w.runtime.pause_broker("slow")
        await w.submit(signal("mirror", "buy", 1, sid="e1"))
        await w.settle()
        await wait_until(lambda: "s1" in w.statuses("e1"), what="s1's missed order journaled")
        assert w.statuses("e1") == {"f1": FILLED, "f2": FILLED, "s1": MISSED}
        [order] = [o for o in w.journal.get_signal("e1")["orders"] if o["account"] == "s1"]
        assert order["seq"] == 2 and order["broker"] == "slow" and order["order_type"] == "market"
        assert [(e["status"], e["detail"]) for e in order["history"]] == [
            (MISSED, "broker slow down or paused at dispatch")]


# -- a flatten and the held orders it superseded reach the disk together ----------------------------------------------

async def test_an_entry_committed_after_the_flatten_that_superseded_it_is_on_disk_missed(tmp_path: Path) -> None:
    """The entry's commit lands after the flatten's (held open here), and every write the journal is asked for
    after that fails: its orders must still be ``missed`` on disk, or the restart's recovery sends them."""
    clock = Clock(NOON)
    async with world(tmp_path, clock=clock) as w:
        commit = Commit(w.journal, lambda s: s.get("id") == "e1")
        pending = asyncio.create_task(decide_and_journal(w, signal("mirror", "buy", 2, sid="e1")))
        await asyncio.wait_for(commit.reached.wait(), 5)  # decided and held; its commit not written yet
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert result["orders"] == [] and w.journal.get_signal("e1") is None

        async def broken(*_args: Any, **_kwargs: Any) -> Any:
            raise JournalError("journal: disk I/O error (test)")

        w.journal.record_orders = broken  # type: ignore[method-assign]
        commit.gate.set()
        decision = await asyncio.wait_for(pending, 5)
        w.runtime.dispatch("e1", decision)
        await w.settle()
        await asyncio.sleep(0.05)  # anything the dispatch started in the background has run
        assert w.statuses("e1") == {a: MISSED for a in MIRROR}
        assert all(result["signal_id"] in detail for detail in missed_by(w, "e1").values()), missed_by(w, "e1")
        assert {a: sent(w, a) for a in MIRROR} == {a: [] for a in MIRROR}
        await nothing_held(w)
    async with world(tmp_path, clock=clock) as w:
        await w.settle()
        assert {a: sent(w, a) for a in MIRROR} == {a: [] for a in MIRROR}
        assert w.statuses("e1") == {a: MISSED for a in MIRROR} and w.runtime.tracker.unsettled() == []


async def test_a_flatten_and_the_orders_it_superseded_are_journaled_in_one_transaction(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    await journal.start()
    try:
        async def record(sid: str, orders: list[dict[str, Any]], **extra: Any) -> str:
            return await journal.record_signal(signal_id=sid, raw="{}", remote=None, status="accepted", reason=None,
                                               key=None, signal={"strategy": "mirror"}, decision=None,
                                               orders=orders, at=NOON, **extra)

        await record("s1", [leg("mb-a"), leg("mb-b", "f2")])
        await record("flatten-1", [])
        # The flatten's commit fails (here: its id is taken): the orders it superseded stay as they were.
        with pytest.raises(JournalConflict):
            await record("flatten-1", [], missed=[("s1", [leg("mb-a")], "superseded by flatten-1")])
        assert [e["status"] for e in journal.order_events("mb-a")] == ["new"]
        # It commits: both are on disk.
        await record("flatten-2", [], missed=[("s1", [leg("mb-a")], "superseded by flatten-2")])
        assert [(e["status"], e["detail"]) for e in journal.order_events("mb-a")] == [
            ("new", None), (MISSED, "superseded by flatten-2")]
        assert journal.get_order("mb-b")["status"] == "new"

        # Superseded before its signal is written (its commit lands after the flatten's): written missed with it.
        journal.supersede("s2", {"mb-c": "superseded by flatten-3"})
        await record("s2", [leg("mb-c"), leg("mb-d", "f2")])
        assert [(e["status"], e["detail"]) for e in journal.order_events("mb-c")] == [
            ("new", None), (MISSED, "superseded by flatten-3")]
        assert journal.get_order("mb-c")["status"] == MISSED and journal.get_order("mb-d")["status"] == "new"
        # Withdrawn (the flatten was not journaled): written as decided.
        journal.supersede("s3", {"mb-e": "superseded by flatten-4"})
        journal.withdraw_superseded("s3", ["mb-e"])
        await record("s3", [leg("mb-e")])
        assert journal.get_order("mb-e")["status"] == "new"
    finally:
        await journal.close()


async def test_one_flatten_id_issued_twice_at_once_is_one_flatten(tmp_path: Path) -> None:
    """Two risk checks of one breach (the risk loop's and a direct call) issue ``risk-...`` together: the second
    finds the first held, not yet journaled. Before, it passed the journal's check, its write failed on the id, and
    dropping its hold dropped the first's too: the first's journaled exits stayed ``new``, never sent (fuzz seed
    54)."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await open_mirror(w)
        first, second = await asyncio.gather(
            w.runtime.flatten(strategy="mirror", reason="risk", flatten_id="risk-x"),
            w.runtime.flatten(strategy="mirror", reason="risk", flatten_id="risk-x"))
        assert sorted(bool(r.get("duplicate")) for r in (first, second)) == [False, True]
        await w.settle()
        assert w.statuses("risk-x") == {a: FILLED for a in MIRROR}
        assert {a: held(w, a) for a in MIRROR} == {a: 0 for a in MIRROR}
        await nothing_held(w)
