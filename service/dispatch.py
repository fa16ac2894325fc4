"""Orders out: the order state machine, and one queue and one worker per broker.

Every order the service sends goes through ``Dispatcher``: it is journaled as ``sending`` (committed) before the
request leaves, and every later state the broker reports is journaled before anything acts on it. A restart can
therefore always tell "never sent" (``new``) from "may have been sent" (``sending``/``unknown``), and the second kind
is looked up at the broker by client order id before anything is resent.

Each broker has its own queue and worker, so a broker that takes 200 ms to acknowledge never delays one that takes
15 ms. Within a broker several orders may be in flight at once (the connector's rate limiter paces them), but the
orders of one account go out in the order they were decided: an exit and the entry that follows it never swap, and an
order's request leaves only after the broker answered the account's previous one.

Pipelining: while an account's previous order is still at its broker, the orders waiting behind it (at most
``ahead`` per account) have their ``sending`` committed already ("journaled ahead", group commits shared), so that each
request can leave as soon as the previous answer arrives instead of after one more fsync: otherwise an account's
orders leave at most one per commit latency, which is what bounded dispatch under load (benchmarks/README.md).
Until its request is allowed, such an order stays ``new`` in memory (``Tracked.ahead`` holds the journaled state), so
everything in this process treats it exactly as an order not yet sent (a reconnect's recovery sends it, a paused broker
makes it ``missed``); the journal is only ever ahead of memory, never behind: a crash leaves it ``sending``, which a
restart looks up at the broker before sending it once. ``sending`` followed by ``missed`` on disk is therefore an
order whose request never left this process.

State machine (``TRANSITIONS``)::

    new -> sending -> acknowledged -> partially_filled -> filled
      |        |            |                  +-------> cancelled
      |        |            +-> filled | cancelled | rejected
      |        +-> rejected | cancelled | filled | partially_filled
      |        +-> unknown (drop mid-request) -> looked up: adopted, or sent again, or missed
      +-> missed (broker paused or down when the order's turn came)
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Awaitable, Callable, Iterable, Mapping, Protocol

from brokers.base import (
    BrokerError,
    BrokerUnavailable,
    Order,
    OrderRejected,
    OrderRequest,
    OrderStatus,
    OutcomeUnknown,
    RateLimited,
    Side,
)

log = logging.getLogger(__name__)

NEW, SENDING, ACKNOWLEDGED, PARTIALLY_FILLED, FILLED = "new", "sending", "acknowledged", "partially_filled", "filled"
REJECTED, CANCELLED, UNKNOWN, MISSED = "rejected", "cancelled", "unknown", "missed"

FINAL = frozenset({FILLED, REJECTED, CANCELLED, MISSED})
IN_FLIGHT = frozenset({NEW, SENDING, UNKNOWN})
"""States a restart must resolve at the broker before anything else."""
WORKING = frozenset({ACKNOWLEDGED, PARTIALLY_FILLED})

TRANSITIONS: Mapping[str, frozenset[str]] = {
    NEW: frozenset({SENDING, MISSED, ACKNOWLEDGED, PARTIALLY_FILLED, FILLED, REJECTED, CANCELLED}),
    SENDING: frozenset({ACKNOWLEDGED, PARTIALLY_FILLED, FILLED, REJECTED, CANCELLED, UNKNOWN, MISSED}),
    UNKNOWN: frozenset({SENDING, ACKNOWLEDGED, PARTIALLY_FILLED, FILLED, REJECTED, CANCELLED, MISSED}),
    ACKNOWLEDGED: frozenset({PARTIALLY_FILLED, FILLED, REJECTED, CANCELLED}),
    PARTIALLY_FILLED: frozenset({PARTIALLY_FILLED, FILLED, CANCELLED}),
    FILLED: frozenset(), REJECTED: frozenset(), CANCELLED: frozenset(), MISSED: frozenset(),
}

_FROM_BROKER = {
    OrderStatus.PENDING: ACKNOWLEDGED,
    OrderStatus.WORKING: ACKNOWLEDGED,
    OrderStatus.PARTIALLY_FILLED: PARTIALLY_FILLED,
    OrderStatus.FILLED: FILLED,
    OrderStatus.CANCELLED: CANCELLED,
    OrderStatus.EXPIRED: CANCELLED,
    OrderStatus.REJECTED: REJECTED,
    OrderStatus.UNKNOWN: UNKNOWN,
}


def status_of(order: Order) -> str:
    """Our state for the broker's view of an order."""
    return _FROM_BROKER[order.status]


def allowed(current: str, new: str) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


class JournalLike(Protocol):
    async def order_status(self, client_order_id: str, status: str, *, broker_order_id: str | None = None,
                           detail: str | None = None, at: Any = None) -> None: ...


@dataclass
class Job:
    """One order of a decision, with what the broker needs (``broker_account``) and what the ledger needs."""

    client_order_id: str
    signal_id: str
    strategy: str
    account: str
    broker: str
    broker_account: str
    contract: str
    side: str
    quantity: int
    intent: str
    margin_usd: Decimal = Decimal(0)

    def request(self) -> OrderRequest:
        return OrderRequest(client_order_id=self.client_order_id, account=self.broker_account,
                            contract=self.contract, side=Side(self.side), quantity=self.quantity)


@dataclass
class Tracked:
    job: Job
    status: str = NEW
    broker_order_id: str | None = None
    filled: int = 0
    detail: str | None = None
    ahead: str | None = None
    """A state already committed to the journal but not yet believed (only ``sending``, journaled while the account's
    previous order is at the broker); the next transition to it costs no write, any other transition clears it."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


StatusHook = Callable[[Tracked, str], Awaitable[None] | None]
_NO_EXPOSURE: Mapping[str, int] = MappingProxyType({})


class OrderTracker:
    """The state machine over every order this process knows, journaled before it is believed."""

    def __init__(self, journal: JournalLike) -> None:
        self.journal = journal
        self.orders: dict[str, Tracked] = {}
        self.by_broker_id: dict[tuple[str, str], str] = {}
        self.hooks: list[StatusHook] = []
        self._unsettled: dict[str, Tracked] = {}
        self._exposure: dict[str, dict[str, int]] = {}
        """Signed quantity of the unsettled orders not yet in the ledger, by account and contract: kept as orders
        are tracked, filled and settled so that the engine's view costs O(accounts), not O(orders in flight)."""
        self._counted: dict[str, int] = {}
        """What each unsettled order contributes to ``_exposure`` now (client order id -> signed quantity)."""

    def track(self, job: Job, status: str = NEW, broker_order_id: str | None = None, filled: int = 0) -> Tracked:
        found = self.orders.get(job.client_order_id)
        if found is None:
            found = self.orders[job.client_order_id] = Tracked(job, status, filled=filled)
            self._unsettled[job.client_order_id] = found
            self._settle(found)
        if broker_order_id:
            found.broker_order_id = broker_order_id
            self.by_broker_id[(job.broker, broker_order_id)] = job.client_order_id
        return found

    def get(self, client_order_id: str | None) -> Tracked | None:
        return None if client_order_id is None else self.orders.get(client_order_id)

    def find(self, broker: str, client_order_id: str | None, broker_order_id: str | None) -> Tracked | None:
        tracked = self.get(client_order_id)
        if tracked is None and broker_order_id is not None:
            tracked = self.get(self.by_broker_id.get((broker, broker_order_id)))
        return tracked

    async def transition(self, client_order_id: str, status: str, *, broker_order_id: str | None = None,
                         detail: str | None = None) -> bool:
        """Move an order to ``status`` if the machine allows it; journal first. False when refused (a stale or
        out-of-order report, e.g. "acknowledged" arriving after "filled")."""
        tracked = self.orders[client_order_id]
        async with tracked.lock:
            same = status == tracked.status and status != PARTIALLY_FILLED
            if same or not allowed(tracked.status, status):
                if broker_order_id and not tracked.broker_order_id:
                    self._remember(tracked, broker_order_id)
                return False
            if tracked.ahead != status or broker_order_id or detail:
                await self.journal.order_status(client_order_id, status, broker_order_id=broker_order_id,
                                                detail=detail)
            tracked.ahead = None
            tracked.status = status
            tracked.detail = detail
            self._settle(tracked)
            if broker_order_id:
                self._remember(tracked, broker_order_id)
        for hook in self.hooks:
            result = hook(tracked, status)
            if result is not None:
                await result
        return True

    async def journal_ahead(self, client_order_id: str, status: str) -> bool:
        """Commit ``status`` to the journal without believing it yet (see the module docstring): the order stays in
        its state here until ``transition`` moves it there, which then writes nothing. False (nothing written) when
        the machine would not allow it now or something is already journaled ahead."""
        tracked = self.orders[client_order_id]
        async with tracked.lock:
            if tracked.ahead is not None or status == tracked.status or not allowed(tracked.status, status):
                return False
            await self.journal.order_status(client_order_id, status)
            tracked.ahead = status
        return True

    def _remember(self, tracked: Tracked, broker_order_id: str) -> None:
        tracked.broker_order_id = broker_order_id
        self.by_broker_id[(tracked.job.broker, broker_order_id)] = tracked.job.client_order_id

    async def adopt(self, client_order_id: str, order: Order) -> None:
        """Take the broker's view of an order (after a lookup or an order event)."""
        tracked = self.orders[client_order_id]
        if order.broker_order_id and not tracked.broker_order_id:
            self._remember(tracked, order.broker_order_id)
        status = status_of(order)
        if status == UNKNOWN:
            return
        if status == PARTIALLY_FILLED and order.filled_quantity <= tracked.filled and tracked.status == status:
            return
        await self.transition(client_order_id, status, broker_order_id=order.broker_order_id,
                              detail=order.reason)

    def in_flight(self) -> list[Tracked]:
        return [t for t in self._unsettled.values() if t.status not in FINAL]

    def book_fill(self, client_order_id: str, quantity: int) -> Tracked:
        """``quantity`` more of the order is booked in the ledger."""
        tracked = self.orders[client_order_id]
        tracked.filled += quantity
        self._settle(tracked)
        return tracked

    def exposure(self, account: str) -> Mapping[str, int]:
        """Signed contracts of ``account`` still in flight or not yet booked, by contract (non-zero only); the
        sum over ``unsettled()`` of (quantity - filled) signed by side, kept incrementally. Read-only view."""
        book = self._exposure.get(account)
        return _NO_EXPOSURE if book is None else MappingProxyType(book)

    def unsettled(self) -> list[Tracked]:
        """Orders whose quantity is not all in the ledger yet and may still be: in flight, working, or filled at
        the broker with fills still on their way. A broker's "filled" answer can arrive before its fill reports;
        counting only non-final orders would make the position look smaller in between."""
        return list(self._unsettled.values())

    def _settle(self, tracked: Tracked) -> None:
        """Drop a settled order from ``_unsettled`` and bring its share of ``_exposure`` up to date; every change
        of ``status`` or ``filled`` comes through here."""
        job = tracked.job
        coid = job.client_order_id
        done = tracked.status in (REJECTED, CANCELLED, MISSED) or \
            (tracked.status == FILLED and tracked.filled >= job.quantity)
        if done:
            self._unsettled.pop(coid, None)
        if self._unsettled.get(coid) is tracked:
            now = (job.quantity - tracked.filled) * (1 if job.side == "buy" else -1)
            before = self._counted.get(coid, 0)
            self._counted[coid] = now
        else:
            now = 0
            before = self._counted.pop(coid, 0)
        if now != before:
            book = self._exposure.setdefault(job.account, {})
            total = book.get(job.contract, 0) + now - before
            if total:
                book[job.contract] = total
            else:
                book.pop(job.contract, None)
                if not book:
                    del self._exposure[job.account]


async def _after(future: asyncio.Future[None]) -> None:
    """Wait until ``future`` is done without ever cancelling it (another order's: cancelling this wait must not
    resolve it for the orders behind); a lighter ``asyncio.wait([future])``, paid by most orders of a busy account."""
    waiter = asyncio.get_running_loop().create_future()

    def wake(_done: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        future.remove_done_callback(wake)


class BrokerGate(Protocol):
    """What the dispatcher needs from the broker pool."""

    def available(self, name: str) -> bool: ...
    def connector(self, name: str) -> Any: ...
    async def report_failure(self, name: str, exc: BaseException) -> None: ...
    def report_success(self, name: str) -> None: ...


class Dispatcher:
    """Per-broker queues and workers that move journaled orders to their brokers."""

    def __init__(self, tracker: OrderTracker, pool: BrokerGate, *, concurrency: int = 8, ahead: int = 16,
                 rate_limit_retries: int = 5) -> None:
        self.tracker = tracker
        self.pool = pool
        self.concurrency = concurrency
        """Requests at one broker at once (a slot is held from the request until the broker's answer)."""
        self.ahead = ahead
        """How many of an account's waiting orders may have their ``sending`` journaled ahead (what a restart
        after a crash may have to look up at the broker, per account)."""
        self.rate_limit_retries = rate_limit_retries
        self._queues: dict[str, asyncio.Queue[Job]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._lanes: dict[tuple[str, str], deque[asyncio.Future[None]]] = {}
        """Per (broker, account), in decision order: one future per order not yet answered, resolved when its broker
        answered it (or its send ended otherwise). An order waits for the one before it to be answered (not for
        the journaling after it) and journals its ``sending`` ahead once the one ``ahead + 1`` places before it
        was: so besides the order at the broker, at most ``ahead`` of the account's orders are journaled ahead."""
        self._running: set[asyncio.Task[None]] = set()
        self._idle: dict[str, int] = defaultdict(int)
        self.sent = 0

    def submit(self, job: Job, *, resend: bool = False) -> None:
        """Queue ``job`` for its broker (non-blocking). ``resend``: the job was looked up and not found."""
        self.tracker.track(job)
        queue = self._queues.get(job.broker)
        if queue is None:
            queue = self._queues[job.broker] = asyncio.Queue()
            self._slots[job.broker] = asyncio.Semaphore(self.concurrency)
            self._workers[job.broker] = asyncio.create_task(self._worker(job.broker, queue),
                                                            name=f"dispatch-{job.broker}")
        queue.put_nowait(job)

    def submit_all(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.submit(job)

    def queued(self) -> dict[str, int]:
        return {name: q.qsize() for name, q in self._queues.items()}

    async def drain(self) -> None:
        """Wait until every queued order has been handled (tests, shutdown)."""
        while any(q.qsize() for q in self._queues.values()) or self._running:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        tasks = list(self._workers.values()) + list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()
        self._queues.clear()
        self._lanes.clear()

    async def _worker(self, broker: str, queue: "asyncio.Queue[Job]") -> None:
        """Chains each order behind its account's previous one; the slots are taken later, by ``_run``, so that
        an order waiting for its turn never keeps another account's order from its broker."""
        slots = self._slots[broker]
        while True:
            job = await queue.get()
            chain = self._lanes.setdefault((broker, job.account), deque())
            while chain and chain[0].done():
                chain.popleft()
            previous = chain[-1] if chain else None
            gate = chain[-self.ahead - 1] if len(chain) > self.ahead else None
            answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            chain.append(answered)
            task = asyncio.create_task(self._run(job, previous, gate, answered, slots),
                                       name=f"order-{job.client_order_id}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, job: Job, previous: asyncio.Future[None] | None, gate: asyncio.Future[None] | None,
                   answered: asyncio.Future[None], slots: asyncio.Semaphore) -> None:
        try:
            if previous is not None and not previous.done():
                if gate is not None and not gate.done():
                    await _after(gate)
                if not previous.done():
                    await self._journal_ahead(job)
                if not previous.done():
                    await _after(previous)
            await slots.acquire()
            # Released when the broker answered (``answered`` resolves exactly once, at the latest below): the
            # commit of that answer must not hold a request slot.
            answered.add_done_callback(lambda _answered: slots.release())
            await self.send(job, answered=answered)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("order %s: unexpected error while dispatching", job.client_order_id)
        finally:
            if not answered.done():
                answered.set_result(None)
            chain = self._lanes.get((job.broker, job.account))
            while chain and chain[0].done():
                chain.popleft()
            if chain is not None and not chain:
                del self._lanes[(job.broker, job.account)]

    async def _journal_ahead(self, job: Job) -> None:
        """Commit the order's ``sending`` while the account's previous order is at the broker. Skipped when the
        broker is not open now (the order's turn decides, as for any order); a failed write only loses the head
        start: ``send`` journals ``sending`` itself, and sends nothing if that fails too."""
        tracked = self.tracker.track(job)
        if tracked.status != NEW or not self.pool.available(job.broker):
            return
        try:
            await self.tracker.journal_ahead(job.client_order_id, SENDING)
        except Exception as exc:
            log.warning("order %s: could not journal 'sending' ahead (%s: %s); journaling it at its turn",
                        job.client_order_id, type(exc).__name__, exc)

    async def send(self, job: Job, *, recovering: bool = False, answered: asyncio.Future[None] | None = None) -> None:
        """Send one order at most once: 'sending' is on disk before the request leaves.

        ``recovering``: the runtime's recovery sends an order it just looked up and did not find, while the broker
        is connected but not yet open to new orders; only a lost connection makes such an order miss.
        An order journaled ``sending`` ahead (``Tracked.ahead``) is still ``new`` here: if the broker is not open it
        becomes ``missed`` (``sending`` -> ``missed`` on disk: its request never left), otherwise its ``sending``
        transition writes nothing and the request leaves at once.
        ``answered``: resolved as soon as the broker accepted the order, before its answer is journaled, so that
        the account's next order may leave (the broker has this one; order per account is kept) without waiting
        for that commit. Every other outcome resolves it when ``send`` ends (the caller's duty).
        """
        tracked = self.tracker.track(job)
        if tracked.status not in (NEW, UNKNOWN):
            return
        coid = job.client_order_id
        if recovering and not self.pool.connector(job.broker).connected:
            raise BrokerUnavailable(f"broker {job.broker} dropped during recovery; {coid} stays unresolved")
        if not recovering and not self.pool.available(job.broker):
            await self.tracker.transition(coid, MISSED, detail=f"broker {job.broker} paused or down at dispatch")
            return
        if not await self.tracker.transition(coid, SENDING):
            return
        connector = self.pool.connector(job.broker)
        for attempt in range(self.rate_limit_retries + 1):
            try:
                order = await connector.place_order(job.request())
            except OrderRejected as exc:
                await self.tracker.transition(coid, REJECTED, detail=exc.reason,
                                              broker_order_id=exc.order.broker_order_id if exc.order else None)
                self.pool.report_success(job.broker)
                return
            except RateLimited as exc:
                # Nothing was placed (place_order looked it up); wait as the broker asks, then try again.
                if attempt < self.rate_limit_retries:
                    await asyncio.sleep(exc.retry_after_s)
                    continue
                await self.tracker.transition(coid, UNKNOWN, detail=f"still rate limited: {exc}")
                return
            except (OutcomeUnknown, BrokerUnavailable) as exc:
                await self.tracker.transition(coid, UNKNOWN, detail=f"{type(exc).__name__}: {exc}")
                await self.pool.report_failure(job.broker, exc)
                return
            except BrokerError as exc:
                await self.tracker.transition(coid, UNKNOWN, detail=f"{type(exc).__name__}: {exc}")
                return
            self.sent += 1
            self.pool.report_success(job.broker)
            if answered is not None and not answered.done():
                answered.set_result(None)
            await self.tracker.adopt(coid, order)
            return
