"""A flatten's retry overtaken by a trade by hand reported after the retry's own fills (``service.overtaken``).

Fuzz crash seed 518: a flatten's exit was rejected and its retry sold 5 (``<fid>-retry-fast-1``); the trader sold 2
by hand while the retry worked, and the restart's come-up booked the retry's fills before its reconciliation read
the trader's, made earlier. The ledger was rebuilt in the broker's order (the trade by hand closed 2 of the long,
the retry sold into a short), but the watch took what the retry had filled when the trade by hand was *booked* as
what it had filled when the trade was *made*: nothing closed twice, no follow-up, the account short 2 after a
flatten and no ``flatten_failed``.

Here the same order of reports is made by events, not by a crash or timing: the paper broker ``fast`` (``trend`` at
``m1``, account ``M-1``) holds the retry's request until the trader has sold, fills the retry in two parts (4, 1),
and its stream is held back and released in the order of a come-up: the retry's first fill, then the trader's,
then the rest. Every position is read from the paper broker's own book.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from brokers.base import FillEvent, OrderEvent, Side
from service import runtime as runtime_module
from service.dispatch import FILLED, REJECTED
from service.overtaken import BASIS_PREFIX
from tests.harness.runtime import World, wait_until
from tests.test_overtaken import follow_ups
from tests.test_strategy_positions import at_broker, books, open_world, target


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "FLATTEN_RETRY_DELAYS_S", (0.05, 0.05, 0.05), raising=False)


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(tmp_path) as started:
        yield started


class HeldStream:
    """``fast``'s events to the runtime, held back from ``hold()`` on and handed on by ``release``."""

    def __init__(self, w: World) -> None:
        self.connector = w.connector("fast")
        self.emit = self.connector._emit
        self.held: list[Any] = []
        self.holding = False
        self.connector._emit = self._intercept  # type: ignore[method-assign]

    def _intercept(self, event: Any) -> None:
        if self.holding and isinstance(event, (FillEvent, OrderEvent)):
            self.held.append(event)
        else:
            self.emit(event)

    def release(self, until: Callable[[Any], bool] | None = None, *, which: Callable[[Any], bool]) -> None:
        """Hand on the held events ``which`` selects, in order, up to and including the first ``until`` names."""
        for event in [e for e in self.held if which(e)]:
            self.held.remove(event)
            self.emit(event)
            if until is not None and until(event):
                return


def coid_of(event: Any) -> str:
    return str((event.fill if isinstance(event, FillEvent) else event.order).client_order_id or "")


def gate_next_sell(w: World) -> asyncio.Event:
    """The next sell of ours waits at ``fast`` (its request arrived, nothing placed) until the gate opens."""
    fast = w.connector("fast")
    submit, gate = fast._submit, asyncio.Event()

    async def held_back(request: Any) -> Any:
        if request.client_order_id.startswith("mb-") and request.side == Side.SELL and not gate.is_set():
            await gate.wait()
        return await submit(request)

    fast._submit = held_back  # type: ignore[method-assign]
    return gate


async def test_a_retry_overtaken_by_a_trade_by_hand_reported_after_its_fills_is_bought_back(w: World) -> None:
    """trend long 5; the flatten's sell 5 is rejected, its retry sells 5; the trader sells 2 by hand first (the
    broker fills both: short 2). The trader's fill is reported after the retry's first 4: the 2 closed twice are
    bought back, and the account ends flat, as the flatten meant it."""
    await w.submit(target("trend", "t-long", "long", 5))
    await w.settle()
    assert at_broker(w) == {"MESH6": 5} and books(w) == {"trend": {"MESH6": 5}}
    fast = w.connector("fast")
    fast.reject_next(1)
    result = await w.runtime.flatten(account="m1", strategy="trend", reason="operator")
    fid = str(result["signal_id"])
    await wait_until(lambda: w.statuses(fid) == {"m1": REJECTED}, what="the flatten's exit rejected")
    gate, stream = gate_next_sell(w), HeldStream(w)
    retry = f"{fid}-retry-fast-1"
    await wait_until(lambda: any(t.job.signal_id == retry for t in w.runtime.tracker.unsettled()),
                     what="the retry sent")
    [tracked] = [t for t in w.runtime.tracker.unsettled() if t.job.signal_id == retry]
    exit_id = tracked.job.client_order_id
    assert (tracked.job.side, tracked.job.quantity) == ("sell", 5)

    stream.holding = True
    hand = fast.manual_trade("M-1", "MESH6", Side.SELL, 2, "manual-1")  # at the broker before the retry fills
    fast.partial_fill_next([4, 1])
    gate.set()
    await wait_until(lambda: sum(1 for e in stream.held if isinstance(e, FillEvent) and coid_of(e) == exit_id) == 2,
                     what="the retry filled at the broker")
    assert at_broker(w) == {"MESH6": -2}

    ours = lambda e: coid_of(e) != "manual-1"  # noqa: E731
    stream.release(lambda e: isinstance(e, FillEvent), which=ours)  # the retry's first fill (4)
    await wait_until(lambda: tracked.filled == 4, what="the retry's first fill booked")
    stream.release(which=lambda e: coid_of(e) == "manual-1")  # the trader's, made before it
    await wait_until(lambda: f"fast:{hand.fill_id}" in w.runtime.ledger.seen_fills, what="the trade by hand booked")
    assert tracked.job.client_order_id in w.runtime._overtaking  # not final yet: its last contract is to come
    stream.holding = False
    stream.release(which=ours)
    await w.settle()

    assert (w.journal.get_order(exit_id) or {})["status"] == FILLED
    assert follow_ups(w, retry) == [("buy", 2, FILLED, BASIS_PREFIX + exit_id)]
    assert at_broker(w) == {} and books(w) == {}  # not short 2 (old code), nor short 1
