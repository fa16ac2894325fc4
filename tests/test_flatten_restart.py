"""A flatten's exit still in flight when the process dies is booked, after the restart, to the strategy it closes.

A flatten journals one signal (strategy "(flatten)" when it spans strategies) whose exits close the positions of
several strategies; each order row keeps its own strategy, so that the restarted runtime does not book the fill to
"(flatten)" and leave the real strategy long (a later flatten of that strategy would then sell a second time)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.harness.runtime import signal, wait_until, world


async def test_a_flatten_exit_resent_after_a_crash_is_booked_to_its_strategy_not_to_the_flatten(
        tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        opened = await w.submit(signal("mirror", "buy", 1, sid="open"))
        await w.settle()
        assert {o.account for o in opened.orders} == {"f1", "f2", "s1"}
        slow = w.connector("slow")
        arrived = asyncio.Event()
        never = asyncio.Event()

        async def lost(request: Any) -> Any:  # the process dies before this request leaves
            arrived.set()
            await never.wait()

        slow._submit = lost
        flat = await w.runtime.flatten(reason="operator: everything")
        assert {o["account"] for o in flat["orders"]} == {"f1", "f2", "s1"}
        await asyncio.wait_for(arrived.wait(), 5)
        exit_s1 = next(o["client_order_id"] for o in flat["orders"] if o["account"] == "s1")
        assert w.journal.orders(signal_id=flat["signal_id"], account="s1")[0]["strategy"] == "mirror"
    async with world(tmp_path) as w:
        await wait_until(lambda: w.runtime.pool is not None and w.runtime.pool.available("slow"), what="slow up")
        await w.settle()
        assert w.statuses(flat["signal_id"])["s1"] == "filled"
        assert [o["client_order_id"] for o in w.book_orders("slow", "S-1")].count(exit_s1) == 1
        held = {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}
        assert held == {}, held  # s1's exit closed "mirror"; nothing booked to "(flatten)"
        again = await w.runtime.flatten(strategy="mirror", reason="operator: mirror again")
        assert again["orders"] == []  # nothing left to sell: no second exit, no reversed position
        positions = await w.connector("slow").positions("S-1")
        assert positions == []
