"""The service listens before its brokers are up: a restart must not refuse webhooks while a broker logs in.

A broker whose connect (or recovery) hangs keeps neither the port closed nor ``/healthz`` red. A signal answered
meanwhile is handled as if that broker were down: other brokers trade, best routing picks one that is up, mirror
orders for its accounts are journaled missed, and once it is up its ``catch_up`` accounts converge. In-flight orders
of a previous process are looked up (and resent only when absent) before that broker receives anything new.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from brokers.feed import PriceFeed
from service.app import RUNTIME, create_app
from service.config import ServiceConfig
from service.dispatch import FILLED, MISSED, SENDING
from service.pool import BrokerPool
from service.runtime import Runtime
from tests.harness.paper import broker_doc
from tests.harness.runtime import NOON, ROOT, Clock, signal, wait_until, world, write_rules
from tests.test_admin_api import TOKEN, call
from tests.test_runtime import front_contract, journal_orders

SECRET = "startup-secret"
HANG_LIMIT_S = 5.0
"""Generous bound on start-up with a broker that never connects: the old code never finished at all."""


def gate_connect(connector: Any, gate: asyncio.Event) -> None:
    """``connector.connect`` waits for ``gate`` first: a broker slow to log in (or unreachable, no timeout yet)."""
    connect = connector.connect

    async def hanging() -> None:
        await gate.wait()
        await connect()

    connector.connect = hanging


async def post(client: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with client.post("/webhook", data=json.dumps({"secret": SECRET, **body}),
                           headers={"Content-Type": "text/plain"}) as r:
        return r.status, await r.json()


async def orders_of(client: Any, signal_id: str) -> dict[str, dict[str, Any]]:
    _s, body = await call(client, "GET", f"/api/signals/{signal_id}")
    return {o["account"]: o for o in body["orders"]}


# -- the whole app on a real socket ------------------------------------------------------------------------------

async def test_webhooks_are_answered_while_a_broker_hangs_in_connect_and_it_catches_up_later(
        aiohttp_client: Any, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules")
    gate = asyncio.Event()
    holder: dict[str, Runtime] = {}
    feed = PriceFeed(seed=0)
    feed.set_price(ROOT, Decimal("5000"))

    def factory(config: Any, journal: Any, watcher: Any) -> Runtime:
        runtime = Runtime(config, journal, watcher, clock=Clock(NOON), feed=feed,
                          connector_options={"reconnect_wait_s": 0.2})
        gate_connect(runtime.prepare().connector("slow"), gate)
        holder["runtime"] = runtime
        return runtime

    config = ServiceConfig(rules_dir=rules, data_dir=tmp_path / "data", webhook_secret=SECRET, admin_token=TOKEN,
                           paper_tick_s=0)
    app = create_app(config, runtime_factory=factory)
    try:
        # The test server listens on 127.0.0.1 only once start-up is over: with the old start-up this never ends.
        client = await asyncio.wait_for(aiohttp_client(app), HANG_LIMIT_S)
        async with client.get("/healthz") as r:
            assert r.status == 200
            health = await r.json()
        assert health["status"] == "ok" and "slow" in health["starting"]
        assert health["brokers"]["slow"] == "starting"
        runtime = holder["runtime"]
        assert app[RUNTIME] is runtime and not await runtime.ready(0.05)
        await wait_until(lambda: runtime.pool.available("fast"), what="fast up")
        assert runtime.starting() == ["slow"]
        _s, status = await call(client, "GET", "/api/status")
        assert {b["name"]: b["state"] for b in status["brokers"]} == {"fast": "up", "slow": "starting"}

        # A target signal: fast's accounts trade, slow's mirror account is journaled missed.
        code, answer = await post(client, signal("mirror", "buy", 1, sid="t1", position="long", position_size=1))
        assert code == 202, answer
        assert sorted(o["account"] for o in answer["decision"]["orders"]) == ["f1", "f2"]
        assert {s["account"]: s["by"] for s in answer["decision"]["skipped"]} == {"s1": "connection"}
        # Best routing picks the broker that is up, although slow's account would be cheaper.
        code, best = await post(client, signal("best", "buy", 1, sid="b1"))
        assert code == 202 and [o["account"] for o in best["decision"]["orders"]] == ["bf"], best

        async def statuses() -> dict[str, str]:
            return {a: o["status"] for a, o in (await orders_of(client, answer["signal_id"])).items()}

        for _ in range(400):
            if await statuses() == {"f1": FILLED, "f2": FILLED, "s1": MISSED}:
                break
            await asyncio.sleep(0.01)
        assert await statuses() == {"f1": FILLED, "f2": FILLED, "s1": MISSED}
        missed = (await orders_of(client, answer["signal_id"]))["s1"]
        assert (missed["side"], missed["quantity"], missed["broker"]) == ("buy", 1, "slow")
        slow = runtime.pool.connector("slow")
        assert not slow.connected

        # The broker finally connects: recovered, reconciled, and its catch_up account converges, once.
        gate.set()
        assert await runtime.ready(HANG_LIMIT_S)
        assert runtime.pool.available("slow") and runtime.starting() == []
        for _ in range(400):
            if runtime.catchups and not runtime.tracker.unsettled():
                break
            await asyncio.sleep(0.01)
        assert [[(o["account"], o["side"], o["quantity"]) for o in c["orders"]] for c in runtime.catchups] == [
            [("s1", "buy", 1)]]
        s1 = list(slow.book.db.query("select client_order_id, side, quantity from orders where account = 'S-1'"))
        assert [(o["side"], o["quantity"]) for o in s1] == [("buy", 1)]
        assert s1[0]["client_order_id"] != missed["client_order_id"]  # the missed order itself was never sent
        fast = runtime.pool.connector("fast")
        coids = [o["client_order_id"] for o in fast.book.db.query("select client_order_id from orders")]
        assert len(coids) == len(set(coids)) == 3  # f1, f2, bf: nothing sent twice
        async with client.get("/healthz") as r:
            health = await r.json()
        assert health["starting"] == [] and health["brokers"] == {"fast": "up", "slow": "up"}
        # A second pass (a reconnect) finds nothing left to do.
        slow.disconnect("drop")
        await wait_until(lambda: runtime.pool["slow"].down, what="slow down")
        await slow.reconnect()
        await wait_until(lambda: runtime.pool.available("slow"), what="slow back")
        assert [c["orders"] for c in runtime.catchups][1:] == [[]]
    finally:
        gate.set()


async def test_a_broker_that_never_connects_does_not_hold_up_stop(aiohttp_client: Any, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules")
    holder: dict[str, Runtime] = {}

    def factory(config: Any, journal: Any, watcher: Any) -> Runtime:
        runtime = Runtime(config, journal, watcher, clock=Clock(NOON), feed=PriceFeed(seed=0))
        gate_connect(runtime.prepare().connector("slow"), asyncio.Event())  # never set
        holder["runtime"] = runtime
        return runtime

    config = ServiceConfig(rules_dir=rules, data_dir=tmp_path / "data", webhook_secret=SECRET, admin_token=TOKEN,
                           paper_tick_s=0)
    client = await asyncio.wait_for(aiohttp_client(create_app(config, runtime_factory=factory)), HANG_LIMIT_S)
    runtime = holder["runtime"]
    assert "slow" in runtime.starting() and runtime.broker_states()["slow"] == "starting"
    await asyncio.wait_for(client.close(), HANG_LIMIT_S)  # the hanging connect is cancelled, not awaited
    assert not runtime.running


# -- in-flight orders of a previous process while a broker recovers slowly ----------------------------------------

async def test_a_signal_during_a_slow_recovery_sends_nothing_to_that_broker_before_recovery(tmp_path: Path) -> None:
    contract = await front_contract(tmp_path)
    # The last process died with s1's order journaled 'sending' (its request never reached the broker).
    coids = await journal_orders(tmp_path, "crashed", {"s1": SENDING}, contract)
    async with world(tmp_path, start=False) as w:
        slow = w.connector("slow")
        sent: list[str] = []
        submit, find_order = slow._submit, slow.find_order
        lookup_started, release = asyncio.Event(), asyncio.Event()

        async def watched(request: Any) -> Any:
            sent.append(request.client_order_id)
            return await submit(request)

        async def slow_lookup(account: str, client_order_id: str) -> Any:
            lookup_started.set()
            await release.wait()
            return await find_order(account, client_order_id)

        slow._submit, slow.find_order = watched, slow_lookup
        await asyncio.wait_for(w.runtime.start(), HANG_LIMIT_S)
        await asyncio.wait_for(lookup_started.wait(), HANG_LIMIT_S)
        await wait_until(lambda: w.runtime.pool.available("fast"), what="fast up")
        assert w.runtime.broker_states() == {"fast": "up", "slow": "recovering"}
        assert w.runtime.starting() == ["slow"]

        # A signal while slow recovers: nothing for slow now, and the engine saw s1 disconnected.
        decision = await w.submit(signal("mirror", "buy", 1, sid="during", position="long", position_size=2))
        assert sorted(o.account for o in decision.orders) == ["f1", "f2"]
        await wait_until(lambda: w.statuses("during").get("s1") == MISSED, what="s1 journaled missed")
        await wait_until(lambda: set(w.statuses("during").values()) == {FILLED, MISSED}, what="fast filled")
        assert sent == []  # nothing went to slow ahead of its recovery

        release.set()
        assert await w.runtime.ready(HANG_LIMIT_S)
        await w.settle()
        assert sent[0] == coids["s1"]  # the crashed order first, looked up and then sent once
        assert sent.count(coids["s1"]) == 1
        assert w.statuses("crashed") == {"s1": FILLED}
        book = [o["client_order_id"] for o in w.book_orders("slow", "S-1")]
        assert book.count(coids["s1"]) == 1 and len(book) == len(set(book))
        missed = {o["account"]: o["client_order_id"] for o in w.journal.get_signal("during")["orders"]}
        assert missed["s1"] not in book  # the missed order itself never left


# -- the pool on its own -----------------------------------------------------------------------------------------

async def test_pool_start_returns_at_once_and_ready_waits_for_every_first_attempt(tmp_path: Path) -> None:
    pool = BrokerPool({"p": broker_doc("p"), "q": broker_doc("q")}, connector_options={"data_dir": tmp_path},
                      backoff_s=0.01, backoff_max_s=0.02)
    gate = asyncio.Event()
    gate_connect(pool.connector("p"), gate)
    pool.connector("q").disconnect("unreachable at start")
    await asyncio.wait_for(pool.start(), HANG_LIMIT_S)
    try:
        assert pool["p"].state == "starting" and not pool.available("p")
        assert not await pool.ready(0.05)  # p still hangs
        assert pool.starting() == ["p"]
        assert pool["q"].state == "down" and "could not connect at start" in pool["q"].reason
        assert pool.unavailable() == {"p", "q"} and pool.disconnected() == {"p", "q"}
        gate.set()
        assert await pool.ready(HANG_LIMIT_S)
        assert pool["p"].state == "up" and pool.status()[0]["state"] == "up"
        pool.pause("p")
        assert pool["p"].state == "paused"
        await pool.connector("q").reconnect()  # back; the pool's backoff loop notices and recovers it
        await wait_until(lambda: pool.available("q"), what="q up")
        assert pool["q"].state == "up"
    finally:
        await pool.stop()
    assert not await pool.ready(0)
