"""A trade of our own order, pushed on the ProjectX user hub before anything tells the connector the order's
``customTag`` (our client order id), is reported with that id, however the lookup of its order goes.

Why: a trade names its order, and only the order carries ``customTag``. When a pushed trade overtakes the answer
to its ``Order/place`` and the order's own events (the gateway documents no order among them), the connector
looks the order up with ``Order/search``. That lookup used to swallow its failure (429 past its resends, the REST
API away) and report the fill with no client order id; the service then found no order of ours for it and booked
it as a trade made by hand (strategy ``(external)``, closing the positions it opposed), and when the order's
answer came its fill id was already seen: our entry was booked as a hand trade and never as our fill. The lookup
also ran inside the hub's event handling with no bound: after a 429 it waited out the penalty, up to a minute,
holding every event behind it. An ``Order/search`` answer without ``customTag`` (the first published example) did
the same even when it succeeded: it "proved" our order untagged.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from brokers.base import FillEvent, OrderRequest, Side
from brokers.emulators.projectx import SIDE_BUY, ProjectXEmulator
from brokers.projectx import ProjectXConnector
from tests.harness.projectx import ACCOUNT, ENV, FAST, broker_doc
from tests.harness.runtime import account_doc, documents, routing_doc, signal, wait_until, world, write_rules


@contextlib.asynccontextmanager
async def hub_connected(emulator_options: dict[str, Any] | None = None,
                        **connector_options: Any) -> AsyncIterator[tuple[ProjectXEmulator, ProjectXConnector, str]]:
    """The connector with its user hub live (the safety poll 30 s away, as in production) against an emulator."""
    async with ProjectXEmulator(accounts={ACCOUNT: Decimal(50000)}, **(emulator_options or {})) as emulator:
        connector = ProjectXConnector(broker_doc(emulator), env=ENV,
                                      **{**FAST, "safety_poll_s": 30.0, **connector_options})
        await connector.connect()
        try:
            contract = next(c.code for c in emulator.contracts.values() if c.root == "MES" and c.active)
            await connector.contract_id(contract)  # resolved before the test's faults start counting requests
            await connector.positions(ACCOUNT)  # the account is watched: the hub subscribes to its events
            await asyncio.wait_for(connector._hub_live.wait(), 2.0)
            yield emulator, connector, contract
        finally:
            await connector.close()


async def first_fill(queue: "asyncio.Queue[Any]", timeout_s: float) -> FillEvent:
    async def wait() -> FillEvent:
        while True:
            event = await queue.get()
            if isinstance(event, FillEvent):
                return event
    return await asyncio.wait_for(wait(), timeout_s)


async def finish(task: "asyncio.Task[Any]") -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_our_trade_is_reported_with_our_id_when_the_lookup_of_its_order_fails() -> None:
    """The lookup is refused past its resends; the waiting trade is reported by the next poll (every
    ``poll_interval_s`` while it waits, not the 30 s safety poll), before the placement is even answered."""
    async with hub_connected() as (emulator, connector, contract):
        queue = connector.subscribe()
        emulator.push_trade_before_answer_next(hold_s=3.0, then_rate_limit=1 + connector.throttle.max_resends,
                                               retry_after_s=0.01)
        placing = asyncio.create_task(connector.place_order(OrderRequest("mb-ours-1", ACCOUNT, contract,
                                                                         Side.BUY, 1)))
        try:
            fill = (await first_fill(queue, 5.0)).fill
            assert not placing.done()  # reported while the answer (and the order's events) are still held
            assert emulator.throttled == 1 + connector.throttle.max_resends  # the lookup was made, and refused
            trade = emulator.trades[-1]
            assert (fill.fill_id, fill.broker_order_id) == (str(trade.id), str(trade.order_id))
            assert fill.client_order_id == "mb-ours-1"  # was None: booked by the service as a trade by hand
            order = await asyncio.wait_for(placing, 5.0)
            assert order.broker_order_id == fill.broker_order_id
            await asyncio.sleep(0.2)  # the held order events and further polls: the fill is not reported again
            again = []
            while not queue.empty():
                event = queue.get_nowait()
                if isinstance(event, FillEvent):
                    again.append(event)
            assert again == []
            assert connector._unresolved == {}
        finally:
            await finish(placing)


async def test_the_lookup_waits_no_longer_than_lookup_wait_s_under_a_penalty() -> None:
    """With a production-like penalty (60 s) the lookup would hold the hub, and every event behind it, for a
    minute, then report the fill without our id. Bounded, the trade waits, and its order's own event (which
    carries ``customTag``) reports it with our id at once, with no REST request needed."""
    async with hub_connected(lookup_wait_s=0.3) as (emulator, connector, contract):
        queue = connector.subscribe()
        emulator.push_trade_before_answer_next(hold_s=0.5, then_rate_limit=1, retry_after_s=60.0)
        placing = asyncio.create_task(connector.place_order(OrderRequest("mb-ours-2", ACCOUNT, contract,
                                                                         Side.SELL, 2)))
        try:
            fill = (await first_fill(queue, 5.0)).fill
            assert emulator.throttled == 1  # the lookup met the 429 and its 60 s penalty
            assert (fill.client_order_id, fill.side, fill.quantity) == ("mb-ours-2", Side.SELL, 2)
            assert fill.broker_order_id == str(emulator.trades[-1].order_id)
        finally:
            await finish(placing)  # the placement's own read-back still waits out the penalty


async def test_a_search_without_custom_tag_does_not_make_our_trade_a_trade_by_hand() -> None:
    """Orders as the first published ``Order/search`` example shows them (no ``customTag``): the lookup succeeds
    but cannot tell; while our placement is under way the trade waits for its answer."""
    async with hub_connected({"order_fields": "legacy"}) as (emulator, connector, contract):
        queue = connector.subscribe()
        emulator.push_trade_before_answer_next(hold_s=0.5)
        placing = asyncio.create_task(connector.place_order(OrderRequest("mb-ours-3", ACCOUNT, contract,
                                                                         Side.BUY, 1)))
        try:
            fill = (await first_fill(queue, 5.0)).fill
            assert emulator.requests["/api/Order/search"] >= 1 and emulator.throttled == 0  # it asked; no fault
            assert fill.client_order_id == "mb-ours-3"
            assert fill.broker_order_id == (await asyncio.wait_for(placing, 5.0)).broker_order_id
        finally:
            await finish(placing)


async def test_a_trade_by_hand_is_still_reported_at_once_as_not_ours() -> None:
    """The lookup answers and the order carries no tag: a trade by hand, reported as such without waiting."""
    async with hub_connected() as (emulator, connector, contract):
        queue = connector.subscribe()
        searches = emulator.requests["/api/Order/search"]
        trade_id = emulator.trade_by_hand(ACCOUNT, contract, SIDE_BUY, 1)
        fill = (await first_fill(queue, 2.0)).fill
        assert (fill.fill_id, fill.client_order_id) == (str(trade_id), None)
        assert emulator.requests["/api/Order/search"] == searches + 1


async def test_end_to_end_our_entry_is_booked_to_its_strategy_not_as_a_trade_by_hand(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service with broker ``fast`` on the real connector against the emulator: the entry's trade overtakes
    the answer and its lookup fails. Before, the ledger booked it as ``(external)`` and our order never filled."""
    for var, value in ENV.items():
        monkeypatch.setenv(var, value)
    async with ProjectXEmulator(accounts={"F-1": Decimal(50000)}, today=datetime.now(timezone.utc)) as emulator:
        rules = write_rules(tmp_path / "rules")
        docs = (rules / "brokers.yaml").read_text().split("---\n")
        (fast,) = [i for i, doc in enumerate(docs) if "name: fast\n" in doc]
        docs[fast] = ("kind: Broker\nname: fast\ntype: projectx\nenvironment: demo\n"
                      'credentials: {username: "${PX_TEST_USER}", api_key: "${PX_TEST_KEY}"}\n'
                      "rate_limit: {requests: 1000, per_seconds: 1}\n"
                      "commissions: {MES: 0.37, default: 1.40}\nmargins: {MES: 50, default: 1000}\n"
                      "reconcile_every_seconds: 3600\n"
                      f'endpoints: {{rest: "{emulator.base_url}", hub: "{emulator.hub_url}"}}\n')
        (rules / "brokers.yaml").write_text("---\n".join(docs))
        (rules / "accounts.yaml").write_text(documents(account_doc("f1", "fast", "F-1", "mirror"),
                                                       account_doc("s1", "slow", "S-1", "mirror")))
        (rules / "routing.yaml").write_text(routing_doc("mirror"))
        async with world(tmp_path, rules_dir=rules,
                         connector_options={**FAST, "safety_poll_s": 30.0}) as w:
            connector = w.connector("fast")
            await asyncio.wait_for(connector._hub_live.wait(), 5.0)
            emulator.push_trade_before_answer_next(hold_s=1.0, then_rate_limit=1 + connector.throttle.max_resends,
                                                   retry_after_s=0.01)
            await w.submit(signal("mirror", "buy", 1, sid="px-entry"))

            def f1_books() -> dict[str, int]:
                return {strategy: book.quantity for (account, strategy, _c), book in w.runtime.ledger.items()
                        if account == "f1" and book.quantity}

            await wait_until(f1_books, 5.0, "f1's entry booked")
            assert f1_books() == {"mirror": 1}  # was {"(external)": 1}
            await w.settle(5.0)
            assert emulator.throttled == 1 + connector.throttle.max_resends  # the lookup was refused
            assert emulator.net_position("F-1", emulator.trades[-1].contract_id) == 1
            assert f1_books() == {"mirror": 1}
            assert w.statuses("px-entry") == {"f1": "filled", "s1": "filled"}
