"""Spend a broker's request budget on what matters: orders and cancels first, polling with what is left.

Brokers throttle per user or per app (Tradovate answers with a penalty ticket and a wait; ProjectX with HTTP 429).
Being throttled while a stop-out cancel is pending is the failure to avoid, so polls (positions, fills, snapshots)
only run while a reserve of the budget stays free, and once the broker says "wait", every request waits —
hammering a penalized broker only lengthens the penalty.

The bucket itself is ``aiolimiter.AsyncLimiter`` (a maintained leaky bucket); this module adds priority, the
penalty box and counters on top.
"""

from __future__ import annotations

import asyncio
import math
from contextlib import asynccontextmanager
from typing import AsyncIterator

from aiolimiter import AsyncLimiter

SLOT_KINDS = ("order", "cancel", "poll")
PRIORITY_KINDS = ("order", "cancel")
POLL_RESERVE = 0.2
"""Share of the budget polls leave untouched for orders and cancels."""


def _level(bucket: AsyncLimiter) -> float:
    """How full the bucket is right now. aiolimiter has no public accessor (pinned <2, tested here); leaking
    first via the public ``has_capacity`` brings the level up to date."""
    bucket.has_capacity(0)
    return float(bucket._level)


class BrokerRateLimiter:
    """Request budget of one broker connection: ``requests`` per ``per_seconds``, with priorities and penalties.

    Use ``async with limiter.slot("order"):`` around each request. ``penalize(s)`` when the broker itself says to
    wait. ``headroom()`` is what the health check and the router read.
    """

    def __init__(self, requests: int | None, per_seconds: float | None) -> None:
        if requests is not None:
            if requests < 1:
                raise ValueError(f"rate limit requests must be >= 1, got {requests}")
            if per_seconds is None or per_seconds <= 0:
                raise ValueError(f"rate limit per_seconds must be > 0, got {per_seconds}")
        self.requests = requests
        self.per_seconds = per_seconds
        self.reserve = 0 if requests is None else min(int(math.ceil(requests * POLL_RESERVE)), requests - 1)
        self.waits = 0
        self.penalties = 0
        self._limiter: AsyncLimiter | None = None
        self._limiter_loop: asyncio.AbstractEventLoop | None = None
        self._penalty_until = 0.0
        self._priority_waiting = 0

    @classmethod
    def unlimited(cls) -> "BrokerRateLimiter":
        """For brokers without a documented limit: never waits unless the broker itself penalizes us."""
        return cls(None, None)

    @classmethod
    def for_broker(cls, rate_limit: object | None) -> "BrokerRateLimiter":
        """From an ``engine.model.RateLimit`` (or None)."""
        if rate_limit is None:
            return cls.unlimited()
        return cls(int(rate_limit.requests), float(rate_limit.per_seconds))  # type: ignore[attr-defined]

    @property
    def limited(self) -> bool:
        return self.requests is not None

    def _bucket(self) -> AsyncLimiter | None:
        """The AsyncLimiter for the running loop (aiolimiter binds to one loop; tests use several)."""
        if self.requests is None:
            return None
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter_loop is not loop:
            self._limiter = AsyncLimiter(self.requests, self.per_seconds or 1.0)
            self._limiter_loop = loop
        return self._limiter

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def penalty_remaining(self) -> float:
        """Seconds until the broker's last "wait" is over (0 when not penalized)."""
        try:
            now = self._now()
        except RuntimeError:
            return 0.0
        return max(0.0, self._penalty_until - now)

    def penalize(self, seconds: float) -> None:
        """The broker said to wait ``seconds``: block every slot until then (the longest wait wins)."""
        if seconds < 0:
            raise ValueError(f"penalty must be >= 0 seconds, got {seconds}")
        self.penalties += 1
        self._penalty_until = max(self._penalty_until, self._now() + seconds)

    def headroom(self) -> float:
        """Fraction (0..1) of the budget free right now; 0 while penalized, 1 when unlimited and unpenalized."""
        if self.penalty_remaining() > 0:
            return 0.0
        if self.requests is None:
            return 1.0
        try:
            bucket = self._bucket()
        except RuntimeError:  # no running loop: nothing can have been spent in it
            return 1.0
        assert bucket is not None
        return max(0.0, min(1.0, 1.0 - _level(bucket) / bucket.max_rate))

    async def _sit_out_penalty(self) -> bool:
        waited = False
        while (remaining := self.penalty_remaining()) > 0:
            waited = True
            await asyncio.sleep(remaining)
        return waited

    async def _poll_gate(self, bucket: AsyncLimiter) -> bool:
        """Wait until a poll would leave the reserve free and no order or cancel is queued."""
        waited = False
        rate = bucket.max_rate / bucket.time_period
        while self._priority_waiting or not bucket.has_capacity(self.reserve + 1):
            waited = True
            missing = _level(bucket) + self.reserve + 1 - bucket.max_rate
            await asyncio.sleep(max(missing / rate, 0.005))
        return waited

    @asynccontextmanager
    async def slot(self, kind: str = "poll") -> AsyncIterator[None]:
        """Hold one request's worth of budget; ``kind`` is ``order``, ``cancel`` or ``poll``."""
        if kind not in SLOT_KINDS:
            raise ValueError(f"unknown rate-limit slot kind {kind!r}; known: {', '.join(SLOT_KINDS)}")
        waited = await self._sit_out_penalty()
        bucket = self._bucket()
        if bucket is not None:
            if kind in PRIORITY_KINDS:
                self._priority_waiting += 1
                try:
                    if not bucket.has_capacity(1):
                        waited = True
                    await bucket.acquire(1)
                finally:
                    self._priority_waiting -= 1
            else:
                waited = await self._poll_gate(bucket) or waited
                await bucket.acquire(1)  # the gate just saw room, with no await since: this does not block
        # A penalty that arrived while we queued applies to us too.
        waited = await self._sit_out_penalty() or waited
        if waited:
            self.waits += 1
        yield
