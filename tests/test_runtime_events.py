"""Broker events are handled off the broker's event pump: one order's fill waiting for its journal commit holds up
neither the fills of the broker's other orders nor anything else, while the events of one order are still handled
in the order they arrived, each once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from service.dispatch import FILLED
from tests.harness.runtime import signal, wait_until, world


async def test_a_fill_whose_journal_write_is_slow_does_not_hold_up_the_other_orders_fills(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        record_fill = w.journal.record_fill
        release = asyncio.Event()
        slow: list[str] = []

        async def held_for_f1(fill: Any) -> bool:
            if fill.get("account") == "f1":
                slow.append(str(fill["client_order_id"]))
                await release.wait()
            return await record_fill(fill)

        w.journal.record_fill = held_for_f1  # type: ignore[method-assign]
        decision = await w.submit(signal("mirror", "buy", 2, sid="sig-1"))
        by_account = {o.account: o for o in decision.orders}
        contract = by_account["f2"].contract
        # f1 and f2 trade at the same broker ("fast"), so their events arrive through the same pump.
        await wait_until(lambda: slow and w.runtime.ledger.account_positions("f2") == {contract: 2},
                         what="f2's fill booked while f1's is still being journaled")
        assert w.runtime.ledger.account_positions("f1") == {}
        assert w.runtime.tracker.get(by_account["f1"].client_order_id) in w.runtime.tracker.unsettled()
        release.set()
        await w.settle()
        assert w.runtime.ledger.account_positions("f1") == {contract: 2}
        assert len(w.journal.fills(account="f1")) == 1
        assert w.statuses("sig-1") == {"f1": FILLED, "f2": FILLED, "s1": FILLED}


async def test_the_events_of_one_order_are_handled_in_arrival_order_each_partial_fill_journaled_once(
        tmp_path: Path) -> None:
    async with world(tmp_path, rules={"fill_ms": 5}) as w:
        w.connector("fast").partial_fill_next([1, 1, 1])
        record_fill = w.journal.record_fill

        async def slow_fills(fill: Any) -> bool:
            await asyncio.sleep(0.01)  # each fill's commit takes long: the order's next event must wait for it
            return await record_fill(fill)

        w.journal.record_fill = slow_fills  # type: ignore[method-assign]
        decision = await w.submit(signal("mirror", "buy", 3, sid="sig-1"))
        await w.settle()
        coid = decision.orders[0].client_order_id
        history = [e["status"] for e in w.journal.order_events(coid)]
        assert history[-1] == FILLED and history.count("partially_filled") == 2, history
        assert [f["quantity"] for f in w.journal.fills(account=decision.orders[0].account)] == [1, 1, 1]
