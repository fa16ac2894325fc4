"""Broker connections and failover: a real socket drop (the ProjectX emulator) pauses the broker, best routing
moves to another broker, mirror orders for its accounts are journaled missed, positions stay; the connection comes
back with backoff, is reconciled first, and catch-up accounts converge to their strategy's last target."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from brokers.emulators.projectx import ProjectXEmulator
from service.dispatch import FILLED, MISSED
from service.pool import BrokerPool
from tests.harness.paper import broker_doc
from tests.harness.runtime import ACCOUNTS, BROKERS, ROUTING, Clock, signal, wait_until, world

PX_FAST = {"poll_interval_s": 0.05, "reconnect_backoff_s": 0.05, "reconnect_backoff_max_s": 0.2,
           "reconnect_wait_s": 2.0, "request_timeout_s": 2.0}


def px_rules(directory: Path, emulator: ProjectXEmulator) -> Path:
    """fast (paper) and px (the emulator): p1 at px and f1 at fast mirror; bp (px, cheaper) and bf compete."""
    directory.mkdir(parents=True)
    brokers = BROKERS.format(fast_ms=0, slow_ms=0, fill_ms=0, slow_rate=1000, reconcile=3600)
    (directory / "brokers.yaml").write_text(brokers + f"""
---
kind: Broker
name: px
type: projectx
credentials: {{username: "${{PX_USER}}", api_key: "${{PX_KEY}}"}}
endpoints: {{rest: "{emulator.base_url}", hub: "{emulator.hub_url}"}}
rate_limit: {{requests: 1000, per_seconds: 1}}
commissions: {{MES: 0.10, default: 0.50}}
margins: {{MES: 50, default: 500}}
reconcile_every_seconds: 3600
""")
    accounts = ACCOUNTS.replace("broker: slow\nbroker_account: S-1", "broker: px\nbroker_account: PX-1") \
        .replace("broker: slow\nbroker_account: B-S", "broker: px\nbroker_account: PX-B")
    (directory / "accounts.yaml").write_text(accounts)
    (directory / "routing.yaml").write_text(ROUTING)
    return directory


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PX_USER", "trader")
    monkeypatch.setenv("PX_KEY", "emulator-key")
    emu = ProjectXEmulator(username="trader", api_key="emulator-key",
                           accounts={"PX-1": Decimal(50000), "PX-B": Decimal(50000)})
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


async def test_a_dropped_broker_is_paused_routed_around_reconciled_and_caught_up(tmp_path: Path,
                                                                               emulator: ProjectXEmulator) -> None:
    rules = px_rules(tmp_path / "rules", emulator)
    async with world(tmp_path, rules_dir=rules, connector_options=PX_FAST) as w:
        first = await w.submit(signal("mirror", "buy", 1, sid="t1", position="long", position_size=1))
        contract = first.orders[0].contract
        emulator.set_price(contract, Decimal(5000))
        await w.settle()
        assert w.statuses("t1") == {"f1": FILLED, "f2": FILLED, "s1": FILLED}
        best = await w.submit(signal("best", "buy", 1, sid="b1"))
        assert [o.account for o in best.orders] == ["bs"]  # px is the cheaper broker
        await w.settle()

        # A real drop: the emulator stops listening and closes its streams.
        await emulator.drop_connection()
        await wait_until(lambda: not w.runtime.pool.available("px"), what="px paused")
        state = w.runtime.engine_state(w.clock())
        assert state.accounts["s1"].connected is False and "px" in state.paused
        assert state.accounts["s1"].positions == {contract: 1}  # positions stay where they are

        moved = await w.submit(signal("best", "buy", 1, sid="b2"))
        assert [o.account for o in moved.orders] == ["bf"]  # best routing picks the broker that is up
        target = await w.submit(signal("mirror", "buy", 1, sid="t2", position="long", position_size=2))
        assert sorted(o.account for o in target.orders) == ["f1", "f2"]
        await wait_until(lambda: w.statuses("t2").get("s1") == MISSED, what="s1 journaled missed")
        missed = w.journal.get_signal("t2")["orders"][-1]
        assert (missed["account"], missed["side"], missed["quantity"], missed["contract"]) == ("s1", "buy", 1, contract)
        assert [e["status"] for e in missed["history"]] == [MISSED]
        before = len(w.journal.reconciliations(100))

        await emulator.restore_connection()
        await wait_until(lambda: w.runtime.pool.available("px"), 10, what="px back")
        # Reconciled first (journaled with reason 'reconnect'), then caught up: s1 converges to long 2.
        reconciled = [r for r in w.journal.reconciliations(100)[: len(w.journal.reconciliations(100)) - before]
                      if r.get("broker") == "px"]
        assert reconciled and all(r["reason"] == "reconnect" for r in reconciled), reconciled
        await w.settle()
        catchups = [c for c in w.runtime.catchups if c.get("orders")]
        assert [(o["account"], o["side"], o["quantity"]) for c in catchups for o in c["orders"]] == [("s1", "buy", 1)]
        caught_up = w.journal.get_signal(catchups[0]["signal"])
        assert max(r["at"] for r in reconciled) <= caught_up["received_at"]  # reconciled first
        assert w.runtime.engine_state(w.clock()).accounts["s1"].positions == {contract: 2}
        await w.runtime.reconcile_broker("px", reason="check")
        assert all(r["ok"] for r in w.journal.reconciliations(2))


# -- the pool on its own (paper connectors) -----------------------------------------------------------------------

async def test_reconnects_back_off_exponentially_and_recover_before_taking_orders(tmp_path: Path) -> None:
    delays: list[float] = []
    up_seen: list[tuple[str, bool]] = []
    down_seen: list[str] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0)

    pool = BrokerPool({"p": broker_doc("p")}, connector_options={"data_dir": tmp_path}, backoff_s=0.05,
                      backoff_max_s=0.2, sleep=sleep)

    async def on_up(name: str) -> None:
        up_seen.append((name, pool.available(name)))  # recovery runs while routing still skips the broker

    async def on_down(name: str) -> None:
        down_seen.append(name)

    pool.on_up, pool.on_down = on_up, on_down
    await pool.start()
    assert await pool.ready(5.0)
    try:
        assert pool.available("p") and up_seen == [("p", False)]
        connector = pool.connector("p")
        connector.disconnect("cable pulled")
        await wait_until(lambda: len(delays) >= 5, what="reconnect attempts")
        assert not pool.available("p") and pool.unavailable() == {"p"} and down_seen == ["p"]
        assert delays[:5] == [0.05, 0.1, 0.2, 0.2, 0.2]
        assert "unreachable" in (pool["p"].last_error or "")
        connector._link_down = False  # the network is back; the pool's next attempt connects
        connector._link_up.set()
        await wait_until(lambda: pool.available("p"), what="p available again")
        assert up_seen == [("p", False), ("p", False)] and pool["p"].reconnects == 1
        assert pool.status()[0]["available"] is True
    finally:
        await pool.stop()


async def test_an_operator_pause_holds_until_resumed_and_survives_a_reconnect(tmp_path: Path) -> None:
    pool = BrokerPool({"p": broker_doc("p")}, connector_options={"data_dir": tmp_path}, backoff_s=0.01)
    await pool.start()
    assert await pool.ready(5.0)
    try:
        pool.pause("p")
        assert not pool.available("p") and pool.status()[0]["paused"] is True
        await pool.mark_down("p", "test drop")
        await wait_until(lambda: not pool["p"].down, what="reconnected")
        assert not pool.available("p")  # still paused by the operator
        pool.resume("p")
        assert pool.available("p")
        with pytest.raises(KeyError, match="no broker named 'nope'"):
            pool.pause("nope")
    finally:
        await pool.stop()


async def test_repeated_failures_pause_a_broker_that_still_looks_connected(tmp_path: Path) -> None:
    pool = BrokerPool({"p": broker_doc("p")}, connector_options={"data_dir": tmp_path}, backoff_s=0.01)
    await pool.start()
    assert await pool.ready(5.0)
    try:
        for _ in range(2):
            await pool.report_failure("p", TimeoutError("slow answer"))
        assert pool.available("p")
        pool.report_success("p")
        for _ in range(2):
            await pool.report_failure("p", TimeoutError("slow answer"))
        assert pool.available("p")  # a success in between resets the count
        await pool.report_failure("p", TimeoutError("slow answer"))
        assert not pool.available("p") or pool["p"].reconnects >= 1
    finally:
        await pool.stop()


# -- catch-up after a reconnect (paper brokers, injected clock) -----------------------------------------------------

def et(hh: int, mm: int) -> datetime:
    """Wednesday 2026-03-11, Eastern wall clock, as aware UTC."""
    return datetime(2026, 3, 11, hh, mm, tzinfo=ZoneInfo("America/New_York")).astimezone(timezone.utc)


async def drop_and_miss(w: Any, clock: Any) -> str:
    """s1 (slow, catch_up) holds the strategy's target of long 1, drops, and misses the new target long 2."""
    first = await w.submit(signal("mirror", "buy", 1, sid="t1", position="long", position_size=1))
    await w.settle()
    w.connector("slow").disconnect("drop")
    await wait_until(lambda: w.runtime.pool["slow"].down, what="slow paused")
    clock.set(et(15, 10))
    await w.submit(signal("mirror", "buy", 1, sid="t2", position="long", position_size=2))
    await wait_until(lambda: w.statuses("t2").get("s1") == MISSED, what="s1 missed")
    await w.settle()
    return first.orders[0].contract


async def test_catch_up_converges_to_the_strategys_last_target(tmp_path: Path) -> None:
    clock = Clock(et(15, 0))
    async with world(tmp_path, clock=clock, rules={"schedule": True}) as w:
        contract = await drop_and_miss(w, clock)
        clock.set(et(15, 20))
        await w.connector("slow").reconnect()
        await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
        await w.settle()
        assert [(c["flat"], [(o["account"], o["side"], o["quantity"]) for o in c["orders"]])
                for c in w.runtime.catchups] == [(False, [("s1", "buy", 1)])]
        positions = {a: w.runtime.engine_state(clock()).accounts[a].positions for a in ("f1", "f2", "s1")}
        assert positions == {"f1": {contract: 2}, "f2": {contract: 2}, "s1": {contract: 2}}
        # A second reconnect has nothing left to do.
        w.connector("slow").disconnect("drop")
        await wait_until(lambda: w.runtime.pool["slow"].down, what="slow paused")
        await w.connector("slow").reconnect()
        await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
        assert [c["orders"] for c in w.runtime.catchups][1:] == [[]]


async def test_catch_up_never_reopens_a_position_after_a_flatten_time_of_the_session(tmp_path: Path) -> None:
    clock = Clock(et(15, 0))
    async with world(tmp_path, clock=clock, rules={"schedule": True}) as w:
        contract = await drop_and_miss(w, clock)
        clock.set(et(16, 5))
        fired = await w.runtime.scheduler.tick()  # the 15:55 flatten while slow is away: s1's exit is missed
        assert "flatten-mirror" in [f.rule.name for f in fired]
        await w.settle()
        assert w.runtime.engine_state(clock()).accounts["s1"].positions == {contract: 1}
        await w.connector("slow").reconnect()
        await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
        await w.settle()
        # The missed flatten itself is carried out on the come-up (before catch-up, which then has nothing to do).
        [redo] = [s for s in w.journal.recent_signals(50) if "-redo-slow-" in s["id"]]
        assert [(o["account"], o["side"], o["quantity"]) for o in w.journal.orders(signal_id=redo["id"])] == \
            [("s1", "sell", 1)]
        assert [(c["flat"], [(o["account"], o["side"], o["quantity"]) for o in c["orders"]])
                for c in w.runtime.catchups] == [(True, [])]
        state = w.runtime.engine_state(clock())
        assert all(state.accounts[a].positions == {} for a in ("f1", "f2", "s1"))
        assert [o["side"] for o in w.book_orders("slow", "S-1")] == ["buy", "sell"]
