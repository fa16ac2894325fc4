"""A retry whose exits are capped on one line still closes the opposite line of the same account in full (fuzz seed 733).

``f1`` follows ``mirror`` and ``trend`` at ``fast``, long in one and short in the other, so that the broker nets them.
A retry of a rejected flatten exit caps each line at what the rejected exits left unfilled (``_cap_to_unfilled``): the
rest of the line is a follow-up's to close, or a signal's decided after the flatten. The broker holds that rest too.
The cap to the broker (``_clamp_to_broker``) counted it as the batch's to close, so it offset the opposite line's exit,
which was then cut as if it would take the broker past flat; the cut part was owed by nobody: the retry filled, the
flatten counted as settled, and ``trend`` stayed short with no ``flatten_failed`` (seed 733: "f1 still holds
{('trend', 'MESH6'): -1} and no flatten_failed names it").

Real runtime, real journal, paper brokers with no latency. The interleaving is made by events: every request to
``fast`` waits at the door (``Door``) until the test lets it through, and the retries wait until the test has every
rejection it wants journaled (``hold_retries``). Positions are read from the paper broker's own book.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from brokers.base import Order, OrderRequest
from service.dispatch import FILLED, FINAL, REJECTED
from tests.harness.runtime import (NOON, Clock, World, account_doc, documents, routing_doc, signal, wait_until, world,
                                   write_rules)
from tests.test_flatten_race import books, held  # f1 at the broker, f1's ledger by strategy


def rules(tmp_path: Path) -> Path:
    directory = write_rules(tmp_path / "rules")
    (directory / "accounts.yaml").write_text(documents(account_doc("f1", "fast", "F-1", "trend, mirror")))
    (directory / "routing.yaml").write_text(routing_doc("trend", "mirror"))
    return directory


def exits(w: World, sid: str) -> dict[str, tuple[str, int, str]]:
    """Signal ``sid``'s journaled orders by strategy: (side, quantity, status)."""
    row = w.journal.get_signal(sid)
    assert row is not None, f"{sid} not journaled"
    return {str(o["strategy"]): (str(o["side"]), int(o["quantity"]), str(o["status"])) for o in row["orders"]}


def failures(w: World) -> list[dict[str, Any]]:
    return [e for e in w.journal.risk_events(100) if e["kind"] == "flatten_failed"]


class Door:
    """Every request to ``fast`` waits here, while ``closed``, until ``let_through`` names it; the broker then answers
    at once (no latency), so the test decides which request reaches the broker when."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.closed = True
        self.waiting: dict[str, asyncio.Event] = {}
        connector = w.connector("fast")
        real = connector._submit

        async def submit(request: OrderRequest) -> Order:
            if self.closed:
                gate = self.waiting[request.client_order_id] = asyncio.Event()
                await gate.wait()
            return await real(request)

        connector._submit = submit

    async def let_through(self, coid: str, status: str) -> None:
        """Once ``coid`` waits here, let it reach the broker; return once it ended ``status`` and the runtime acted
        on it (its settled hooks ran: a follow-up it owes is held)."""
        await wait_until(lambda: coid in self.waiting, what=f"{coid} at the door")
        self.waiting[coid].set()
        tracker = self.w.runtime.tracker
        await wait_until(lambda: (t := tracker.orders.get(coid)) is not None and t.status in FINAL
                         and t not in tracker.unsettled(), what=f"{coid} settled")
        assert self.w.journal.get_order(coid)["status"] == status  # type: ignore[index]


def hold_retries(w: World) -> asyncio.Event:
    """The retries of rejected flatten exits wait until the returned event is set (and then compute as usual)."""
    runtime = w.runtime
    real = runtime._retry_flattens
    go = asyncio.Event()

    async def retry(broker: str) -> list[str]:
        await go.wait()
        return await real(broker)

    runtime._retry_flattens = retry  # type: ignore[method-assign]
    return go


def coid_of(w: World, sid: str, strategy: str | None = None) -> str:
    row = w.journal.get_signal(sid)
    assert row is not None, f"{sid} not journaled"
    (order,) = [o for o in row["orders"] if strategy is None or o["strategy"] == strategy]
    return str(order["client_order_id"])


async def test_a_retry_closes_the_opposite_line_in_full_while_a_follow_up_owes_part_of_the_other(
        tmp_path: Path) -> None:
    """Seed 733's interleaving. mirror +2, trend -2 (the broker holds 0). A mirror target of long 1 sends sell 1; the
    flatten of f1, computed while it is in flight, counts it and sells mirror 1, buys trend 2. The sell is rejected
    while the flatten's exits still wait: a follow-up (sell mirror 1) closes what it left. Then the flatten's exits
    and the follow-up are rejected too. The retry caps mirror at the 1 its rejected exit left (the follow-up's retry
    owes the other 1), and must still buy trend 2: before the fix it bought 1, and trend stayed short 1."""
    async with world(tmp_path, rules_dir=rules(tmp_path), clock=Clock(NOON)) as w:
        w.runtime.flatten_retry_delays_s = (0.0, 0.0, 0.0)  # due at once: ``hold_retries`` says when
        await w.submit(signal("mirror", "buy", 2, sid="m"))
        await w.submit(signal("trend", "sell", 2, sid="t"))
        await w.settle()
        contract = str(w.journal.get_signal("m")["orders"][0]["contract"])  # type: ignore[index]
        assert books(w) == {"mirror": 2, "trend": -2} and held(w) == {}

        door, go = Door(w), hold_retries(w)
        await w.submit(signal("mirror", "buy", 1, sid="target", position="long", position_size=1))
        target = coid_of(w, "target")
        order = w.journal.get_order(target)
        assert order is not None and (order["side"], order["quantity"]) == ("sell", 1)
        fid = str((await w.runtime.flatten(account="f1", reason="operator"))["signal_id"])
        assert {s: e[:2] for s, e in exits(w, fid).items()} == {"mirror": ("sell", 1), "trend": ("buy", 2)}

        w.connector("fast").reject_next(4)  # the target, the flatten's two exits, the follow-up
        await door.let_through(target, REJECTED)
        follow = f"{fid}-follow-1"  # held as the target settled (the flatten's own exit still waited at the door)
        await wait_until(lambda: w.journal.get_signal(follow), what="the follow-up journaled")
        assert exits(w, follow)["mirror"][:2] == ("sell", 1)
        await door.let_through(coid_of(w, fid, "mirror"), REJECTED)
        await door.let_through(coid_of(w, fid, "trend"), REJECTED)
        await door.let_through(coid_of(w, follow), REJECTED)
        assert books(w) == {"mirror": 2, "trend": -2} and held(w) == {}

        door.closed = False
        go.set()
        retry, follow_retry = f"{fid}-retry-fast-1", f"{follow}-retry-fast-1"
        await wait_until(lambda: w.journal.get_signal(retry) and w.journal.get_signal(follow_retry),
                         what="both retries journaled")
        await w.settle()

        assert exits(w, retry) == {"mirror": ("sell", 1, FILLED), "trend": ("buy", 2, FILLED)}  # trend in full
        assert exits(w, follow_retry) == {"mirror": ("sell", 1, FILLED)}
        assert held(w) == {} and books(w) == {}, (held(w), books(w), contract)
        assert w.journal.get_signal(f"{fid}-retry-fast-2") is None and failures(w) == []


async def test_a_retry_closes_the_opposite_line_in_full_when_a_later_signal_added_to_the_other(
        tmp_path: Path) -> None:
    """The same cap without a follow-up. mirror +1, trend -2 (the broker holds -1). The flatten's exits (sell mirror
    1, buy trend 2) are rejected; a mirror buy 1 decided after it fills (the broker holds 0). The retry sells mirror
    1 only (the later buy is not the flatten's to close) and must buy trend 2, leaving the broker long 1, mirror's:
    before the fix it bought 1, and trend stayed short 1 with the retry counted as filled."""
    async with world(tmp_path, rules_dir=rules(tmp_path), clock=Clock(NOON)) as w:
        w.runtime.flatten_retry_delays_s = (0.0, 0.0, 0.0)
        await w.submit(signal("mirror", "buy", 1, sid="m"))
        await w.submit(signal("trend", "sell", 2, sid="t"))
        await w.settle()
        contract = str(w.journal.get_signal("m")["orders"][0]["contract"])  # type: ignore[index]
        assert books(w) == {"mirror": 1, "trend": -2} and held(w) == {contract: -1}

        door, go = Door(w), hold_retries(w)
        fid = str((await w.runtime.flatten(account="f1", reason="operator"))["signal_id"])
        assert {s: e[:2] for s, e in exits(w, fid).items()} == {"mirror": ("sell", 1), "trend": ("buy", 2)}
        w.connector("fast").reject_next(2)
        await door.let_through(coid_of(w, fid, "mirror"), REJECTED)
        await door.let_through(coid_of(w, fid, "trend"), REJECTED)

        door.closed = False
        await w.submit(signal("mirror", "buy", 1, sid="later"))
        await w.settle()
        assert books(w) == {"mirror": 2, "trend": -2} and held(w) == {}

        go.set()
        retry = f"{fid}-retry-fast-1"
        await wait_until(lambda: w.journal.get_signal(retry), what="the retry journaled")
        await w.settle()

        assert exits(w, retry) == {"mirror": ("sell", 1, FILLED), "trend": ("buy", 2, FILLED)}
        assert books(w) == {"mirror": 1} and held(w) == {contract: 1}
        assert w.journal.get_signal(f"{fid}-retry-fast-2") is None and failures(w) == []
