"""An order whose request ends with nothing this process can vouch for (journaled ``unknown``) is resolved by a
come-up at once, not at the next drop, which may never come.

Before: a broker that kept answering 429 past every retry left the order ``unknown`` while the connection stayed
up. Nothing looked it up again, and the runtime counted it as filling: an exit "closed" a position that stayed open
at the broker, and a flatten's exit was never redone. Now the broker is paused and recovered at once
(``BrokerPool.unresolved``): the come-up looks the order up (adopted if the broker has it, ``missed`` if not), then
redoes the flattens it missed. Real runtime, journal and paper brokers; ``rate_limit_next`` makes the paper broker
refuse every request (orders and lookups alike) until its queue of refusals is used up.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from brokers.base import RateLimited
from service.dispatch import FILLED, MISSED, NEW, SENDING, UNKNOWN, Dispatcher
from tests.harness.runtime import World, signal, wait_until, world

RATE_LIMIT_RETRIES = inspect.signature(Dispatcher).parameters["rate_limit_retries"].default
REFUSALS = 60
"""More 429s than one order's retries take (the connector's attempts, each looked up, times the dispatcher's)."""


def events(w: World, client_order_id: str) -> list[str]:
    return [e["status"] for e in w.journal.order_events(client_order_id)]


async def test_an_order_refused_past_every_retry_is_looked_up_by_a_come_up_and_journaled_missed(
        tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        pool = w.runtime.pool
        assert pool is not None
        w.connector("slow").rate_limit_next(REFUSALS, retry_after_s=0.001)
        decision = await w.submit(signal("mirror", "buy", 1, sid="sig-1"))
        s1 = next(o.client_order_id for o in decision.orders if o.account == "s1")
        await wait_until(lambda: UNKNOWN in events(w, s1), what="the order refused past its retries")
        # Not left so: the broker was paused and its come-up looked the order up, then opened again.
        await wait_until(lambda: w.statuses("sig-1")["s1"] == MISSED, what="the order resolved by a come-up")
        await wait_until(lambda: pool.available("slow"), what="the broker open again")
        assert events(w, s1) == [NEW, SENDING, UNKNOWN, MISSED]
        assert "still rate limited" in str(w.journal.order_events(s1)[2]["detail"])
        assert w.book_orders("slow", "S-1") == []  # the broker never took it: missed is the truth
        assert pool["slow"].reconnects >= 1
        await w.settle()
        assert w.statuses("sig-1") == {"f1": FILLED, "f2": FILLED, "s1": MISSED}


async def test_a_flatten_exit_refused_past_every_retry_is_redone_and_the_account_ends_flat(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        await w.submit(signal("mirror", "buy", 2, sid="sig-1"))
        await w.settle()
        assert w.book_positions("slow", "S-1") and w.statuses("sig-1")["s1"] == FILLED
        w.connector("slow").rate_limit_next(REFUSALS, retry_after_s=0.001)
        result = await w.runtime.flatten(account="s1", reason="operator")
        fid = str(result["signal_id"])
        # The exit went unknown; before, it stayed so and S-1 stayed long 2 at the broker with the flatten "done".
        await wait_until(lambda: w.book_positions("slow", "S-1") == {}, timeout_s=10.0, what="S-1 flat at the broker")
        await w.settle()
        assert w.statuses(fid) == {"s1": MISSED}
        [exit_order] = w.journal.get_signal(fid)["orders"]
        assert events(w, exit_order["client_order_id"])[-2:] == [UNKNOWN, MISSED]
        redone = [s for s in w.journal.recent_signals(100) if s["id"].startswith(f"{fid}-redo-")]
        assert len(redone) == 1 and w.statuses(redone[0]["id"]) == {"s1": FILLED}
        assert w.runtime.ledger.account_positions("s1") == {}
        assert [o["side"] for o in w.book_orders("slow", "S-1")] == ["buy", "sell"]  # one exit, never two


async def test_a_come_up_whose_own_resend_is_refused_past_every_retry_stays_closed_and_tries_again(
        tmp_path: Path) -> None:
    """A restart's recovery resends an order the broker does not have (it was ``sending`` when the process died);
    the broker refuses that resend past every retry. Before, the broker opened with the order ``unknown`` and
    nothing resolved it; now the come-up fails and is retried, looks the order up again and sends it once."""
    from tests.test_dispatch_pipeline import Wire, two_orders_of_s1

    async with world(tmp_path) as w:
        wire = Wire(w, "slow")
        n, _ = await two_orders_of_s1(w)
        wire.hold_before(n)  # the process dies while N's request is on its way, before it reaches the broker
        await wait_until(lambda: n in wire.held, what="N on its way")
    async with world(tmp_path, start=False) as w:
        connector = w.connector("slow")
        lookups: list[str] = []
        find_order, submit = connector.find_order, connector._submit
        refusals = connector.place_attempts * (RATE_LIMIT_RETRIES + 1)

        async def watched_find(account: str, coid: str) -> object:
            lookups.append(coid)
            return await find_order(account, coid)

        async def refused(request: Any) -> Any:
            nonlocal refusals
            if request.client_order_id == n and refusals:
                refusals -= 1  # every attempt of the come-up's first resend of N, and no other request
                raise RateLimited(0.001, "(test: N refused)")
            return await submit(request)

        connector.find_order, connector._submit = watched_find, refused
        await w.runtime.start()
        pool = w.runtime.pool
        assert pool is not None
        await wait_until(lambda: UNKNOWN in events(w, n)[3:], what="the resend refused past its retries")
        assert not pool.available("slow")  # not open with N unresolved
        await wait_until(lambda: w.statuses("sig-1")["s1"] == FILLED, timeout_s=10.0, what="N resolved")
        await wait_until(lambda: pool.available("slow"), what="the broker open")
        assert refusals == 0 and lookups.count(n) >= 2  # looked up again before it was sent again
        assert [o["client_order_id"] for o in w.book_orders("slow", "S-1")].count(n) == 1
