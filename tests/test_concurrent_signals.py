"""Decided orders count as exposure from the instant they are decided, not from their dispatch.

The webhook decides, awaits its journal commit, answers, and only then dispatches; catch-up decides and awaits its
commit too. A signal decided in between must see the orders before it, or two concurrent "buy 3" both pass
``max_contracts: 4``, free margin is spent twice, and best mode opens a strategy's position at two accounts. Each test
runs the whole app on 127.0.0.1 with paper brokers and holds one commit open (the journal's ``record_signal`` waits
on an event) while another signal is decided; every end state is read from the paper brokers' own books.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from brokers.feed import PriceFeed
from service.app import JOURNAL, RUNTIME, create_app
from service.config import ServiceConfig
from service.journal import JournalError
from service.runtime import Runtime
from tests.harness.runtime import ROOT, account_doc, app_runtime, documents, routing_doc, wait_until

SECRET = "concurrent-secret"

BROKERS = """
kind: Broker
name: fast
type: paper
commissions: {MES: 0.25, default: 0.79}
margins: {MES: 50, default: 1000}
reconcile_every_seconds: 3600
paper: {seed: 1, ack_latency_ms: 0, fill_latency_ms: 0, starting_cash: 50000}
---
kind: Broker
name: slow
type: paper
commissions: {MES: 0.20, default: 0.60}
margins: {MES: 40, default: 800}
reconcile_every_seconds: 3600
paper: {seed: 2, ack_latency_ms: 0, fill_latency_ms: 0, starting_cash: 50000}
---
kind: Broker
name: thin
type: paper
commissions: {MES: 0.25, default: 0.79}
margins: {MES: 400, default: 4000}
reconcile_every_seconds: 3600
paper: {seed: 3, ack_latency_ms: 0, fill_latency_ms: 0, starting_cash: 1000}
"""

ACCOUNTS = documents(
    account_doc("cap", "fast", "C-1", "capped"),
    account_doc("bf", "fast", "B-F", "best"),
    account_doc("bs", "slow", "B-S", "best", catch_up=True),
    account_doc("t1", "thin", "T-1", "margin", capital=1000),
)

ROUTING = routing_doc("capped", "margin", "best", best_select="cheapest_commission")

RISK = """
kind: Risk
name: limits
margin_buffer_pct: 0
limits:
  - name: cap-size
    scope: account
    accounts: [cap]
    instrument: MES
    max_contracts: 4
"""

BOOKS = {"cap": ("fast", "C-1"), "bf": ("fast", "B-F"), "bs": ("slow", "B-S"), "t1": ("thin", "T-1")}


class App:
    """The running app: its client on 127.0.0.1, its runtime and its journal."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.runtime: Runtime = client.server.app[RUNTIME]
        self.journal = client.server.app[JOURNAL]
        self.commits: list[Commit] = []

    async def post(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.client.post("/webhook", data=json.dumps({"secret": SECRET, **body}),
                                    headers={"Content-Type": "text/plain"}) as r:
            return r.status, await r.json()

    def held(self, account: str) -> int:
        """``account``'s MES position as its paper broker reports it."""
        broker, name = BOOKS[account]
        return sum(int(p["quantity"]) for p in self.runtime.pool.connector(broker).book.positions(name))

    async def settle(self) -> None:
        runtime = self.runtime
        await wait_until(lambda: not runtime.tracker.unsettled() and not any(runtime.dispatcher.queued().values())
                         and not runtime.dispatcher._running, what="orders settled")

    async def drop(self, broker: str) -> None:
        self.runtime.pool.connector(broker).disconnect("test drop")
        await wait_until(lambda: self.runtime.pool[broker].down, what=f"{broker} down")

    async def come_back(self, broker: str) -> None:
        await self.runtime.pool.connector(broker).reconnect()
        await wait_until(lambda: self.runtime.pool.available(broker), what=f"{broker} back")


class Commit:
    """Holds the journal commit of the first signal ``which`` matches until ``open()``; then it commits, or raises
    ``JournalError`` when ``fail``. Every other signal commits as usual."""

    def __init__(self, app: App, which: Callable[[dict[str, Any]], bool], *, fail: bool = False) -> None:
        self.reached, self.gate, self.fail, self.used = asyncio.Event(), asyncio.Event(), fail, False
        app.commits.append(self)  # opened at the end whatever happens: the app drains its webhooks on stop
        journal = app.journal
        record = journal.record_signal

        async def held(**kwargs: Any) -> Any:
            if not self.used and which(kwargs.get("signal") or {}):
                self.used = True
                self.reached.set()
                await self.gate.wait()
                if self.fail:
                    raise JournalError("journal: disk I/O error (test)")
            return await record(**kwargs)

        journal.record_signal = held

    def open(self) -> None:
        self.gate.set()


def sender_id(sid: str) -> Callable[[dict[str, Any]], bool]:
    return lambda signal: signal.get("key") == sid


def catch_up(signal: dict[str, Any]) -> bool:
    return bool(signal.get("catch_up"))


def buy(strategy: str, quantity: int, sid: str) -> dict[str, Any]:
    return {"strategy": strategy, "ticker": "MES1!", "action": "buy", "quantity": quantity, "id": sid}


def target(sid: str, size: int) -> dict[str, Any]:
    return {"strategy": "best", "ticker": "MES1!", "action": "buy", "quantity": size, "position": "long",
            "position_size": size, "id": sid}


def legs(decision: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(o["account"], o["side"], int(o["quantity"])) for o in decision["orders"]]


async def answer(task: asyncio.Task[tuple[int, dict[str, Any]]]) -> tuple[int, dict[str, Any]]:
    return await asyncio.wait_for(task, 5)


@pytest.fixture
async def app(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[App]:
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in (("brokers", BROKERS), ("accounts", ACCOUNTS), ("routing", ROUTING), ("risk", RISK)):
        (rules / f"{name}.yaml").write_text(text)
    feed = PriceFeed(seed=0)
    feed.set_price(ROOT, Decimal("5000"))

    config = ServiceConfig(rules_dir=rules, data_dir=tmp_path / "data", webhook_secret=SECRET, paper_tick_s=0)
    client = await aiohttp_client(create_app(config, runtime_factory=app_runtime(feed)))
    running = App(client)
    assert await running.runtime.ready(10.0), running.runtime.starting()
    try:
        yield running
    finally:
        for commit in running.commits:
            commit.open()


# -- webhook vs webhook ----------------------------------------------------------------------------------------

async def test_a_second_entry_decided_during_the_first_ones_commit_counts_it_against_max_contracts(app: App) -> None:
    commit = Commit(app, sender_id("c1"))
    first = asyncio.create_task(app.post(buy("capped", 3, "c1")))
    await asyncio.wait_for(commit.reached.wait(), 5)

    code, second = await app.post(buy("capped", 3, "c2"))
    assert code == 202 and legs(second["decision"]) == [], second
    [skip] = second["decision"]["skipped"]
    assert skip["account"] == "cap"
    assert "position after the order would be 6 MES > max_contracts 4" in skip["reason"], skip

    commit.open()
    code, body = await answer(first)
    assert code == 202 and legs(body["decision"]) == [("cap", "buy", 3)]
    await app.settle()
    assert app.held("cap") == 3
    # Dispatched, the first order counts once (held, then tracked, never both): one more fits, two do not.
    code, third = await app.post(buy("capped", 2, "c3"))
    assert legs(third["decision"]) == []
    code, fourth = await app.post(buy("capped", 1, "c4"))
    assert legs(fourth["decision"]) == [("cap", "buy", 1)]
    await app.settle()
    assert app.held("cap") == 4


async def test_a_second_best_target_during_the_first_ones_commit_does_not_open_the_position_again(app: App) -> None:
    commit = Commit(app, sender_id("b1"))
    first = asyncio.create_task(app.post(target("b1", 2)))
    await asyncio.wait_for(commit.reached.wait(), 5)

    code, second = await app.post(target("b2", 2))
    assert code == 202 and legs(second["decision"]) == [], second
    assert [(s["account"], s["reason"]) for s in second["decision"]["skipped"]
            if s["account"] == "bs"] == [("bs", "already at target +2 MES")], second

    commit.open()
    code, body = await answer(first)
    assert code == 202 and legs(body["decision"]) == [("bs", "buy", 2)]  # slow is cheaper
    await app.settle()
    assert (app.held("bs"), app.held("bf")) == (2, 0)


async def test_a_second_entry_during_the_first_ones_commit_is_refused_when_both_exceed_free_margin(app: App) -> None:
    # thin: 1,000 USD free, 400 USD per MES, no buffer: 2 contracts fit (800), 4 do not.
    commit = Commit(app, sender_id("m1"))
    first = asyncio.create_task(app.post(buy("margin", 2, "m1")))
    await asyncio.wait_for(commit.reached.wait(), 5)
    assert app.runtime.status()["reserved_margin_usd"] == "800"

    code, second = await app.post(buy("margin", 2, "m2"))
    assert code == 202 and legs(second["decision"]) == [], second
    [skip] = second["decision"]["skipped"]
    assert skip["account"] == "t1" and "free margin 200" in skip["reason"] and "required 800" in skip["reason"], skip

    commit.open()
    code, body = await answer(first)
    assert code == 202 and legs(body["decision"]) == [("t1", "buy", 2)]
    await app.settle()
    assert app.held("t1") == 2


async def test_a_signal_the_journal_refuses_is_released_and_a_later_one_is_decided_as_if_it_never_was(
        app: App) -> None:
    commit = Commit(app, sender_id("c1"), fail=True)
    first = asyncio.create_task(app.post(buy("capped", 3, "c1")))
    await asyncio.wait_for(commit.reached.wait(), 5)
    # While its commit is pending, the first counts: 3 + 3 > 4.
    code, second = await app.post(buy("capped", 3, "c2"))
    assert legs(second["decision"]) == [], second

    commit.open()
    code, body = await answer(first)
    assert code == 503 and body["error"]["code"] == "journal_unavailable"
    # Not acknowledged: nothing of it stays counted, not as a position, not as reserved margin.
    [cap] = [a for a in app.runtime.accounts() if a["name"] == "cap"]
    assert cap["positions"] == {} and Decimal(cap["reserved_margin"]) == 0
    assert Decimal(app.runtime.status()["reserved_margin_usd"]) == 0

    code, third = await app.post(buy("capped", 3, "c3"))
    assert code == 202 and legs(third["decision"]) == [("cap", "buy", 3)], third
    await app.settle()
    assert app.held("cap") == 3
    assert [o["client_order_id"] for o in app.runtime.pool.connector("fast").book.db.query(
        "select client_order_id from orders where account = 'C-1'")] == [third["decision"]["orders"][0][
            "client_order_id"]]


# -- catch-up vs webhook ---------------------------------------------------------------------------------------

async def nobody_holds_the_target(app: App) -> None:
    """A best target arrives while both brokers are down (nobody eligible: decided, no orders); fast comes back
    (its account is not ``catch_up``); slow stays down."""
    await app.drop("fast")
    await app.drop("slow")
    code, t0 = await app.post(target("t0", 2))
    assert code == 202 and legs(t0["decision"]) == [], t0
    await app.come_back("fast")


async def test_a_catch_up_deciding_while_a_webhook_entry_awaits_its_commit_sees_it(app: App) -> None:
    await nobody_holds_the_target(app)
    commit = Commit(app, sender_id("t1"))
    webhook = asyncio.create_task(app.post(target("t1", 2)))
    await asyncio.wait_for(commit.reached.wait(), 5)

    # slow comes back while t1 (at bf) is decided but not on disk: catch-up re-decides t0 and must see bf's entry.
    before = len(app.runtime.catchups)
    await app.come_back("slow")
    caught = [c for c in app.runtime.catchups[before:] if c["strategy"] == "best"]
    assert [c["orders"] for c in caught] == [[]], caught

    commit.open()
    code, body = await answer(webhook)
    assert code == 202 and legs(body["decision"]) == [("bf", "buy", 2)]
    await app.settle()
    assert (app.held("bf"), app.held("bs")) == (2, 0)


async def test_a_webhook_deciding_while_a_catch_up_entry_awaits_its_commit_sees_it(app: App) -> None:
    await nobody_holds_the_target(app)
    commit = Commit(app, catch_up)
    before = len(app.runtime.catchups)
    back = asyncio.create_task(app.come_back("slow"))
    await asyncio.wait_for(commit.reached.wait(), 5)
    caught = [c for c in app.runtime.catchups[before:] if c["strategy"] == "best"]
    assert [[(o["account"], o["quantity"]) for o in c["orders"]] for c in caught] == [[("bs", 2)]]

    # A repeat of the target while the catch-up's entry at bs awaits its commit: bs holds it, nothing opens at bf.
    code, t1 = await app.post(target("t1", 2))
    assert code == 202 and legs(t1["decision"]) == [], t1

    commit.open()
    await asyncio.wait_for(back, 5)
    await app.settle()
    assert (app.held("bs"), app.held("bf")) == (2, 0)
