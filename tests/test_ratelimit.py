"""The per-broker request budget: orders and cancels before polls, penalties block everyone, honest headroom."""

from __future__ import annotations

import asyncio
import time

import pytest

from brokers.ratelimit import BrokerRateLimiter
from engine.model import RateLimit


async def spend(limiter: BrokerRateLimiter, kind: str, n: int) -> None:
    for _ in range(n):
        async with limiter.slot(kind):
            pass


async def test_full_budget_is_available_in_a_burst() -> None:
    limiter = BrokerRateLimiter(10, 60)
    await spend(limiter, "order", 10)
    assert limiter.waits == 0
    assert limiter.headroom() == pytest.approx(0.0, abs=0.01)


async def test_headroom_tracks_spending() -> None:
    limiter = BrokerRateLimiter(10, 60)
    assert limiter.headroom() == 1.0
    await spend(limiter, "cancel", 5)
    assert limiter.headroom() == pytest.approx(0.5, abs=0.01)


async def test_polls_leave_the_reserve_for_orders() -> None:
    limiter = BrokerRateLimiter(10, 0.5)  # reserve: 2 requests
    assert limiter.reserve == 2
    await spend(limiter, "poll", 8)        # polls may take the budget down to the reserve...
    assert limiter.waits == 0
    order_done = asyncio.Event()

    async def order() -> None:
        async with limiter.slot("order"):
            order_done.set()

    async def poll() -> bool:
        async with limiter.slot("poll"):
            return order_done.is_set()

    poll_task = asyncio.create_task(poll())  # ...but not into it: this one must wait
    await asyncio.sleep(0)
    await order()                            # the order gets the reserve at once
    assert order_done.is_set()
    assert await poll_task is True           # the poll ran after the order
    assert limiter.waits == 1


async def test_queued_orders_go_before_queued_polls() -> None:
    limiter = BrokerRateLimiter(5, 0.25)
    await spend(limiter, "order", 5)         # bucket full: everyone must wait
    finished: list[str] = []

    async def use(kind: str) -> None:
        async with limiter.slot(kind):
            finished.append(kind)

    tasks = [asyncio.create_task(use("poll")), asyncio.create_task(use("poll"))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(use("order")), asyncio.create_task(use("cancel"))]
    await asyncio.gather(*tasks)
    assert finished[:2] == ["order", "cancel"]
    assert sorted(finished[2:]) == ["poll", "poll"]
    assert limiter.waits == 4


async def test_penalty_blocks_every_kind_until_over() -> None:
    limiter = BrokerRateLimiter(100, 60)
    limiter.penalize(0.2)
    assert limiter.penalties == 1
    assert limiter.headroom() == 0.0
    assert limiter.penalty_remaining() > 0.1
    started = time.monotonic()
    await asyncio.gather(spend(limiter, "order", 1), spend(limiter, "poll", 1))
    assert time.monotonic() - started >= 0.19
    assert limiter.waits == 2
    assert limiter.penalty_remaining() == 0
    assert limiter.headroom() > 0.9


async def test_penalty_arriving_while_queued_still_applies() -> None:
    limiter = BrokerRateLimiter(1, 0.1)
    await spend(limiter, "order", 1)
    waiter = asyncio.create_task(spend(limiter, "order", 1))
    await asyncio.sleep(0)
    limiter.penalize(0.3)
    started = time.monotonic()
    await waiter
    assert time.monotonic() - started >= 0.25


async def test_longest_penalty_wins() -> None:
    limiter = BrokerRateLimiter.unlimited()
    limiter.penalize(0.3)
    limiter.penalize(0.05)
    assert limiter.penalties == 2
    assert limiter.penalty_remaining() > 0.2


async def test_unlimited_never_waits_but_honours_penalties() -> None:
    limiter = BrokerRateLimiter.for_broker(None)
    assert not limiter.limited
    await spend(limiter, "poll", 500)
    assert limiter.waits == 0
    assert limiter.headroom() == 1.0
    limiter.penalize(0.05)
    await spend(limiter, "order", 1)
    assert limiter.waits == 1


async def test_built_from_a_broker_document_rate_limit() -> None:
    limiter = BrokerRateLimiter.for_broker(RateLimit(requests=3, per_seconds=1.0))
    assert (limiter.requests, limiter.per_seconds, limiter.reserve) == (3, 1.0, 1)
    await spend(limiter, "order", 3)
    assert limiter.waits == 0


async def test_single_request_budget_lets_polls_through() -> None:
    limiter = BrokerRateLimiter(1, 0.05)
    assert limiter.reserve == 0
    await spend(limiter, "poll", 2)
    assert limiter.waits == 1


async def test_unknown_kind_and_bad_limits_are_errors() -> None:
    limiter = BrokerRateLimiter(5, 1)
    with pytest.raises(ValueError, match="unknown rate-limit slot kind"):
        async with limiter.slot("login"):
            pass
    with pytest.raises(ValueError, match="requests"):
        BrokerRateLimiter(0, 1)
    with pytest.raises(ValueError, match="per_seconds"):
        BrokerRateLimiter(5, 0)
    with pytest.raises(ValueError, match="penalty"):
        limiter.penalize(-1)


def test_headroom_outside_a_loop_is_full() -> None:
    assert BrokerRateLimiter(5, 1).headroom() == 1.0
