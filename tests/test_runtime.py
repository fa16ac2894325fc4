"""The runtime assembled over a real journal and paper brokers: recovery after a crash (in process: the journal and
the broker files are what a killed process leaves behind), engine_state, flatten, halts and the admin levers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from brokers.base import BrokerUnavailable, OrderRequest, Side
from engine.decision import client_order_id
from service.dispatch import FILLED, MISSED, NEW, SENDING, UNKNOWN
from service.journal import Journal, parse_utc
from tests.harness.runtime import NOON, Clock, signal, wait_until, world


async def journal_orders(tmp_path: Path, sid: str, statuses: dict[str, str], contract: str) -> dict[str, str]:
    """What a process killed mid fan-out leaves in its journal: a signal with orders in ``statuses``."""
    brokers = {"f1": ("fast", "F-1"), "f2": ("fast", "F-2"), "s1": ("slow", "S-1")}
    orders = [{"account": a, "broker": brokers[a][0], "contract": contract, "side": "buy", "quantity": 1,
               "intent": "entry", "client_order_id": client_order_id(sid, a, "leg"), "margin_usd": "50"}
              for a in statuses]
    journal = Journal(tmp_path / "data" / "journal.db")
    await journal.start()
    await journal.record_signal(signal_id=sid, raw="{}", remote=None, status="accepted", reason="test", key=sid,
                                signal={"strategy": "mirror", "ticker": "MES1!", "action": "buy", "quantity": 1},
                                decision={"strategy": "mirror", "orders": []}, orders=orders)
    for order in orders:
        status = statuses[order["account"]]
        if status != NEW:
            await journal.order_status(order["client_order_id"], status)
    await journal.close()
    return {o["account"]: o["client_order_id"] for o in orders}


async def front_contract(tmp_path: Path) -> str:
    async with world(tmp_path / "probe") as w:
        decision = await w.submit(signal("mirror", "buy", 1, sid="probe"))
        return decision.orders[0].contract


async def test_after_a_crash_in_flight_orders_are_looked_up_before_any_resend(tmp_path: Path) -> None:
    contract = await front_contract(tmp_path)
    coids = await journal_orders(tmp_path, "sig-1", {"f1": NEW, "f2": SENDING, "s1": SENDING}, contract)
    # f2's request reached the broker before the crash; s1's did not.
    async with world(tmp_path, start=False) as w:
        connector = w.connector("fast")
        await connector.connect()
        await connector.place_order(OrderRequest(client_order_id=coids["f2"], account="F-2", contract=contract,
                                                 side=Side.BUY, quantity=1))
        await connector.close()
        sent: list[str] = []
        for broker in ("fast", "slow"):
            submit = w.connector(broker)._submit

            async def watched(request: Any, submit: Any = submit) -> Any:
                sent.append(request.client_order_id)
                return await submit(request)

            w.connector(broker)._submit = watched
        await w.runtime.start()
        assert await w.runtime.ready(10.0)
        await w.settle()
        assert w.statuses("sig-1") == {"f1": FILLED, "f2": FILLED, "s1": FILLED}
        assert sorted(sent) == sorted([coids["f1"], coids["s1"]])  # f2 was found, not sent again
        for broker, account in (("fast", "F-1"), ("fast", "F-2"), ("slow", "S-1")):
            assert len(w.book_orders(broker, account)) == 1
        f2 = [e["status"] for e in w.journal.order_events(coids["f2"])]
        assert f2[:2] == [NEW, SENDING] and f2[-1] == FILLED and f2.count(SENDING) == 1
        s1 = w.journal.order_events(coids["s1"])
        assert [e["status"] for e in s1][:4] == [NEW, SENDING, UNKNOWN, SENDING]
        assert "not at the broker" in str(s1[2]["detail"])
        assert sum(b.quantity for b in w.runtime.ledger.books.values()) == 3
        assert w.runtime.status()["reserved_margin_usd"] in ("0", "40", "50", "90", "140")  # resolved or settling


async def test_a_drop_during_a_recovery_resend_leaves_the_order_to_the_next_recovery(tmp_path: Path) -> None:
    contract = await front_contract(tmp_path)
    coids = await journal_orders(tmp_path, "sig-1", {"f1": SENDING}, contract)
    async with world(tmp_path, start=False) as w:
        connector = w.connector("fast")
        submit = connector._submit
        calls: list[str] = []

        async def flaky(request: Any) -> Any:
            calls.append(request.client_order_id)
            if len(calls) == 1:  # the link drops as the resend goes out; nothing reaches the broker
                connector.disconnect("drop during recovery")
                raise BrokerUnavailable("paper broker fast: not connected")
            return await submit(request)

        connector._submit = flaky
        await w.runtime.start()
        assert await w.runtime.ready(10.0)
        assert w.statuses("sig-1") == {"f1": UNKNOWN} and not w.runtime.pool.available("fast")
        connector._link_down = False  # the network comes back; the pool's reconnect finds it
        connector._link_up.set()
        await wait_until(lambda: w.runtime.pool.available("fast"), what="fast recovered")
        await w.settle()
        assert w.statuses("sig-1") == {"f1": FILLED}
        assert calls == [coids["f1"], coids["f1"]]
        assert [o["client_order_id"] for o in w.book_orders("fast", "F-1")] == [coids["f1"]]


async def test_a_restart_does_not_resend_what_it_already_sent(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        decision = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        await w.settle()
    async with world(tmp_path) as w:
        await w.settle()
        assert set(w.statuses(decision.signal_id).values()) == {FILLED}
        for broker, account in (("fast", "F-1"), ("fast", "F-2"), ("slow", "S-1")):
            assert len(w.book_orders(broker, account)) == 1
        # The ledger is rebuilt from the journal's fills, once; reconciliation passes that report the same fills
        # again (their orders are final, so no longer tracked) neither book them nor keep them waiting.
        assert sum(b.quantity for b in w.runtime.ledger.books.values()) == 3
        for _ in range(2):
            await w.runtime.reconcile_broker("fast", reason="test")
        assert sum(b.quantity for b in w.runtime.ledger.books.values()) == 3
        assert w.runtime._pending_fills == {} and len(w.journal.fills()) == 3


async def test_a_broker_down_at_restart_keeps_its_orders_until_it_comes_back(tmp_path: Path) -> None:
    contract = await front_contract(tmp_path)
    coids = await journal_orders(tmp_path, "sig-1", {"f1": NEW, "s1": NEW}, contract)
    async with world(tmp_path, start=False) as w:
        w.connector("slow").disconnect("down at start")
        await w.runtime.start()
        assert await w.runtime.ready(10.0)
        await wait_until(lambda: w.statuses("sig-1")["f1"] == FILLED)
        assert w.statuses("sig-1")["s1"] == NEW
        assert w.runtime.engine_state(w.clock()).accounts["s1"].connected is False
        await w.connector("slow").reconnect()
        await w.settle()
        assert w.statuses("sig-1") == {"f1": FILLED, "s1": FILLED}
        assert [o["client_order_id"] for o in w.book_orders("slow", "S-1")] == [coids["s1"]]
        assert MISSED not in w.statuses("sig-1").values()


async def test_admin_flatten_by_account_or_strategy_closes_only_that_scope(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        mirror = await w.submit(signal("mirror", "buy", 2, sid="m1"))
        best = await w.submit(signal("best", "buy", 1, sid="b1"))
        await w.settle()
        contract, best_account = mirror.orders[0].contract, best.orders[0].account
        result = await w.runtime.flatten(account="f1", reason="operator")
        assert [(o["account"], o["side"], o["quantity"], o["intent"]) for o in result["orders"]] == \
            [("f1", "sell", 2, "exit")]
        await w.settle()
        state = w.runtime.engine_state(w.clock())
        assert state.accounts["f1"].positions == {} and state.accounts["f2"].positions == {contract: 2}
        result = await w.runtime.flatten(strategy="mirror", reason="operator")
        assert sorted(o["account"] for o in result["orders"]) == ["f2", "s1"]
        await w.settle()
        state = w.runtime.engine_state(w.clock())
        assert all(not state.accounts[a].positions for a in ("f1", "f2", "s1"))
        assert state.accounts[best_account].positions == {contract: 1}
        again = await w.runtime.flatten(account="f1", reason="operator", flatten_id=result["signal_id"])
        assert again["duplicate"] is True
        with pytest.raises(KeyError, match="no account named 'ghost'"):
            await w.runtime.flatten(account="ghost", reason="operator")


async def test_a_flatten_while_the_broker_is_down_is_missed_and_the_position_stays(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        decision = await w.submit(signal("mirror", "buy", 1, sid="m1"))
        await w.settle()
        w.connector("slow").disconnect("drop")
        await wait_until(lambda: w.runtime.pool["slow"].down, what="slow paused")
        result = await w.runtime.flatten(account="s1", reason="operator")
        await w.settle()
        assert w.statuses(result["signal_id"]) == {"s1": MISSED}
        assert w.runtime.engine_state(w.clock()).accounts["s1"].positions == {decision.orders[2].contract: 1}
        assert w.connector("slow").book.positions("S-1")[0]["quantity"] == 1


async def test_status_accounts_and_levers(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.submit(signal("mirror", "buy", 1, sid="m1"))
        await w.settle()
        status = w.runtime.status()
        assert [b["name"] for b in status["brokers"]] == ["fast", "slow"]
        assert all(b["available"] for b in status["brokers"]) and status["in_flight"] == 0
        paused = await w.runtime.pause_broker("slow")
        assert paused["paused"] is True and w.runtime.engine_state(w.clock()).paused == {"slow"}
        skipped = await w.submit(signal("mirror", "buy", 1, sid="m2"))
        assert sorted(o.account for o in skipped.orders) == ["f1", "f2"]
        assert [(s.account, s.by) for s in skipped.skipped] == [("s1", "paused")]
        await wait_until(lambda: w.statuses("m2").get("s1") == MISSED, what="s1 journaled missed")
        await w.settle()
        resumed = await w.runtime.resume_broker("slow")
        assert resumed["available"] is True and w.runtime.engine_state(w.clock()).paused == frozenset()
        rows = {a["name"]: a for a in w.runtime.accounts()}
        assert rows["f1"]["positions"] == {skipped.orders[0].contract: 2} and rows["s1"]["connected"] is True
        assert {(p["account"], p["quantity"]) for p in w.runtime.positions()} == {("f1", 2), ("f2", 2), ("s1", 1)}
        with pytest.raises(KeyError, match="no halt named 'f1'"):
            w.runtime.clear_halt("f1")


async def test_paper_fills_and_journal_rows_are_stamped_on_the_runtime_clock(tmp_path: Path) -> None:
    """A simulated broker runs on the service's time line: its fills land on the trading day the schedule and the
    risk monitor see (the test clock is March 2026), not on the wall clock's."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        start = w.clock()
        await w.submit(signal("mirror", "buy", 1, sid="m1"))
        await w.settle()
        stamps = [parse_utc(str(f["at"])) for f in w.journal.fills()]
        assert stamps and all(start <= at <= w.clock() for at in stamps), (start, stamps)
        # The journal's own stamps (an order's status changes, a fill's arrival) are on the same time line.
        journal_stamps = [parse_utc(str(o["updated_at"])) for o in w.journal.orders()] + \
            [parse_utc(str(f["recorded_at"])) for f in w.journal.fills()]
        assert all(start <= at <= w.clock() for at in journal_stamps), (start, journal_stamps)
