"""Orders out: the order state machine, and one lane per (broker, account) that sends its orders in order.

Every order the service sends goes through ``Dispatcher``: it is journaled as ``sending`` (committed) before the
request leaves, and every later state the broker reports is journaled before anything acts on it. A restart can
therefore always tell "never sent" (``new``) from "may have been sent" (``sending``/``unknown``), and the second kind
is looked up at the broker by client order id before anything is resent.

Each account at each broker has its own lane (one task while it has orders waiting), so a broker that takes 200 ms to
acknowledge never delays one that takes 15 ms, and one account's orders never wait for another's. A lane sends its
orders in the order they were decided, each after the broker answered the previous one: an exit and the entry that
follows it never swap. At most ``concurrency`` requests are at one broker at once (a slot is held from the request to
the broker's answer, not while the answer is journaled); the connector's rate limiter paces them.

Pipelining: while an account's order is on its way to the broker, the orders waiting behind it (at most ``ahead``
per account) have their ``sending`` committed already ("journaled ahead", group commits shared), so that each
request can leave as soon as the previous answer arrives instead of after one more fsync: otherwise an account's
orders leave at most one per commit latency, which is what bounded dispatch under load (benchmarks/README.md). An
answer is journaled while the lane goes on with the next order (``OrderTracker.adopt_soon``).
Until its request is allowed, such an order stays ``new`` in memory (``Tracked.ahead`` holds the journaled state), so
everything in this process treats it exactly as an order not yet sent (a reconnect's recovery sends it, a paused broker
makes it ``missed``); the journal is only ever ahead of memory, never behind: a crash leaves it ``sending``, which a
restart looks up at the broker before sending it once. ``sending`` followed by ``missed`` on disk is therefore an
order whose request never left this process.

Cost: this is the service's busiest path (every order passes through it at least three times), so it spends no task,
lock or callback per order where it can do without: the lanes are the tasks; an order's transitions wait for each
other only while one is being journaled (``Tracked.busy``); a write ahead is looked at by the order's next transition
instead of calling back when it commits (``Tracked.ahead_write``); the answers journaled in one turn of the loop are
believed by one callback once the last of them is committed (the journal commits in order). The journal's
``order_status`` queues its write at the call and returns the future, which is what lets a lane journal several
orders ahead, and answer one order while sending the next, without a task each.

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
from collections import deque
from dataclasses import dataclass, field
from functools import partial
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
    def order_status(self, client_order_id: str, status: str, *, broker_order_id: str | None = None,
                     detail: str | None = None, at: Any = None) -> Awaitable[None]: ...


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

    @property
    def sign(self) -> int:
        """+1 for a buy, -1 for a sell: what one contract of the order does to a position."""
        return 1 if self.side == "buy" else -1

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
    previous order is at the broker); the next transition to it costs no write, any other transition clears it.
    While ``ahead_write`` is set, its commit is not confirmed yet."""
    ahead_write: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)
    """The write of ``ahead``, until a transition of the order looks at it (``OrderTracker._confirm``): nothing is
    called back when it commits, the order's next transition waits for it and confirms it, or forgets ``ahead`` if it
    failed."""
    busy: bool = field(default=False, repr=False, compare=False)
    """A transition of this order is being journaled: the next one waits its turn (``OrderTracker._take``), so that
    each is checked against the state the one before it left."""
    waiting: deque[asyncio.Future[None]] | None = field(default=None, repr=False, compare=False)
    """Transitions waiting for their turn, first come first served."""


StatusHook = Callable[[Tracked, str], Awaitable[None] | None]
_NO_EXPOSURE: Mapping[str, int] = MappingProxyType({})
_NO_STRATEGY_EXPOSURE: Mapping[str, Mapping[str, int]] = MappingProxyType({})


def _written(result: Awaitable[None]) -> asyncio.Future[None]:
    """The journal's write as a future: the journal returns one; a stand-in's coroutine (tests) is made one."""
    return result if asyncio.isfuture(result) else asyncio.ensure_future(result)  # type: ignore[return-value]


class OrderTracker:
    """The state machine over every order this process knows, journaled before it is believed."""

    def __init__(self, journal: JournalLike) -> None:
        self.journal = journal
        self.orders: dict[str, Tracked] = {}
        self.by_broker_id: dict[tuple[str, str], str] = {}
        self.hooks: list[StatusHook] = []
        self.settled_hooks: list[Callable[[Tracked], None]] = []
        """Called once per order, synchronously, when it settles: final, and all it filled booked in the ledger
        (a broker's "filled" answer may come before its fill reports; this waits for both)."""
        self._unsettled: dict[str, Tracked] = {}
        self._exposure: dict[str, dict[str, int]] = {}
        """Signed quantity of the unsettled orders not yet in the ledger, by account and contract: kept as orders
        are tracked, filled and settled so that the engine's view costs O(accounts), not O(orders in flight)."""
        self._strategy_exposure: dict[str, dict[str, dict[str, int]]] = {}
        """The same by account, strategy and contract, kept in the same step: each strategy trades its own
        position in an account, so the engine reads what each strategy has in flight (``strategy_exposure``)."""
        self._counted: dict[str, int] = {}
        """What each unsettled order contributes to ``_exposure`` now (client order id -> signed quantity)."""
        self._tasks: set[asyncio.Future[Any]] = set()
        """Hooks' and late adoptions' tasks started from a callback (kept until done)."""
        self._answers: list[Any] | None = None
        """Answers journaled in this turn of the loop, believed together once written (``_seal_answers``)."""

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

    # -- one transition at a time per order ---------------------------------------------------------------------

    async def _take(self, tracked: Tracked) -> None:
        """Wait for the order's turn (another transition of it is being journaled); FIFO."""
        if not tracked.busy:
            tracked.busy = True
            return
        waiter = asyncio.get_running_loop().create_future()
        if tracked.waiting is None:
            tracked.waiting = deque()
        tracked.waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give(tracked)  # handed the turn as it was cancelled: pass it on
            raise

    def _give(self, tracked: Tracked) -> None:
        """End a turn: hand it to the first transition still waiting, or free the order."""
        waiting = tracked.waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        tracked.busy = False

    async def settled(self, tracked: Tracked) -> None:
        """Until no transition of the order is being journaled (nor waiting before this call), nor its write ahead."""
        if tracked.busy:
            await self._take(tracked)
            self._give(tracked)
        written = tracked.ahead_write
        if written is not None and not written.done():
            await _after(written)

    def _confirm(self, tracked: Tracked) -> None:
        """Look at the committed (or failed) write ahead: ``ahead`` stands, or is forgotten (logged)."""
        written, tracked.ahead_write = tracked.ahead_write, None
        assert written is not None and written.done()
        error = asyncio.CancelledError() if written.cancelled() else written.exception()
        if error is not None:
            log.warning("order %s: could not journal %r ahead (%s: %s); journaling it at its turn",
                        tracked.job.client_order_id, tracked.ahead, type(error).__name__, error)
            tracked.ahead = None

    async def _confirmed(self, tracked: Tracked) -> None:
        written = tracked.ahead_write
        if written is not None and not written.done():
            await _after(written)
        if tracked.ahead_write is written and written is not None:
            self._confirm(tracked)

    # -- transitions ----------------------------------------------------------------------------------------------

    async def transition(self, client_order_id: str, status: str, *, broker_order_id: str | None = None,
                         detail: str | None = None) -> bool:
        """Move an order to ``status`` if the machine allows it; journal first. False when refused (a stale or
        out-of-order report, e.g. "acknowledged" arriving after "filled")."""
        tracked = self.orders[client_order_id]
        if tracked.busy:
            await self._take(tracked)
        else:
            tracked.busy = True
        try:
            if tracked.ahead_write is not None:
                await self._confirmed(tracked)
            same = status == tracked.status and status != PARTIALLY_FILLED
            if same or not allowed(tracked.status, status):
                if broker_order_id and not tracked.broker_order_id:
                    self._remember(tracked, broker_order_id)
                return False
            if tracked.ahead != status or broker_order_id or detail:
                await self.journal.order_status(client_order_id, status, broker_order_id=broker_order_id,
                                                detail=detail)
            self._believe(tracked, status, broker_order_id, detail)
        finally:
            self._give(tracked)
        for hook in self.hooks:
            result = hook(tracked, status)
            if result is not None:
                await result
        return True

    def _believe(self, tracked: Tracked, status: str, broker_order_id: str | None, detail: str | None) -> None:
        tracked.ahead = None
        tracked.status = status
        tracked.detail = detail
        if status in FINAL:  # only a final state can settle an order (what it filled is booked by ``book_fill``)
            self._settle(tracked)
        if broker_order_id:
            self._remember(tracked, broker_order_id)

    def _hooks_now(self, tracked: Tracked, status: str) -> None:
        """The hooks, from a callback: one that returns an awaitable runs as a task."""
        for hook in self.hooks:
            result = hook(tracked, status)
            if result is not None:
                self._keep(asyncio.ensure_future(result))

    def _keep(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def believe_ahead(self, tracked: Tracked, status: str) -> bool:
        """The transition to a state journaled ahead, at once (it writes nothing): True when done; False when it
        needs ``transition`` (nothing is ahead, a transition of the order is under way, or the machine refuses)."""
        if tracked.busy or tracked.ahead != status:
            return False
        if tracked.ahead_write is not None:
            if not tracked.ahead_write.done():
                return False
            self._confirm(tracked)
            if tracked.ahead != status:
                return False
        if status == tracked.status or not allowed(tracked.status, status):
            return False
        self._believe(tracked, status, None, None)
        self._hooks_now(tracked, status)
        return True

    def journal_ahead_soon(self, tracked: Tracked, status: str) -> bool:
        """Journal ``status`` ahead, without believing it yet (see the module docstring): the write is queued now;
        the order's next transition waits for its commit and confirms it (``Tracked.ahead_write``), then writes
        nothing. False (nothing
        queued) when the machine would not allow it now, something is journaled ahead already, or a transition of
        the order is under way. A write that fails is logged then and only loses the head start: the order
        journals ``sending`` itself at its turn."""
        if tracked.busy or tracked.ahead is not None or status == tracked.status or \
                not allowed(tracked.status, status):
            return False
        tracked.ahead_write = _written(self.journal.order_status(tracked.job.client_order_id, status))
        tracked.ahead = status
        return True

    def _remember(self, tracked: Tracked, broker_order_id: str) -> None:
        tracked.broker_order_id = broker_order_id
        self.by_broker_id[(tracked.job.broker, broker_order_id)] = tracked.job.client_order_id

    def _adoption(self, tracked: Tracked, order: Order) -> str | None:
        """The state ``adopt`` moves the order to, or None when the broker's view is no news."""
        if order.broker_order_id and not tracked.broker_order_id:
            self._remember(tracked, order.broker_order_id)
        status = status_of(order)
        if status == UNKNOWN:
            return None
        if status == PARTIALLY_FILLED and order.filled_quantity <= tracked.filled and tracked.status == status:
            return None
        return status

    async def adopt(self, client_order_id: str, order: Order) -> None:
        """Take the broker's view of an order (after a lookup or an order event)."""
        status = self._adoption(self.orders[client_order_id], order)
        if status is not None:
            await self.transition(client_order_id, status, broker_order_id=order.broker_order_id,
                                  detail=order.reason)

    def adopt_soon(self, client_order_id: str, order: Order, done: Callable[[], None]) -> None:
        """``adopt`` without waiting for the journal (the dispatcher's answers: the account's next order leaves
        meanwhile). Believed exactly as ``adopt`` believes it, once committed; ``done()`` is called once it is
        settled (believed, refused, or not journaled: logged, not believed). Raises, without calling ``done``,
        only when the journal refuses the write at once (not running)."""
        tracked = self.orders[client_order_id]
        status = self._adoption(tracked, order)
        if status is None:
            done()
            return
        written = tracked.ahead_write
        if tracked.busy or (written is not None and not written.done()):
            # A transition of this order is being journaled: wait for it as ``adopt`` does.
            self._keep(asyncio.ensure_future(self._adopt_later(client_order_id, order, done)))
            return
        if written is not None:
            self._confirm(tracked)
        broker_order_id, detail = order.broker_order_id, order.reason
        if (status == tracked.status and status != PARTIALLY_FILLED) or not allowed(tracked.status, status):
            if broker_order_id and not tracked.broker_order_id:
                self._remember(tracked, broker_order_id)
            done()
            return
        if tracked.ahead == status and not broker_order_id and not detail:
            self._believe(tracked, status, None, None)
            self._hooks_now(tracked, status)
            done()
            return
        written = _written(self.journal.order_status(client_order_id, status, broker_order_id=broker_order_id,
                                                     detail=detail))
        tracked.busy = True
        answer = (tracked, status, broker_order_id, detail, done, written)
        if self._answers is None:
            self._answers = [answer]
            asyncio.get_running_loop().call_soon(self._seal_answers)
        else:
            self._answers.append(answer)

    def _seal_answers(self) -> None:
        """After the loop turn that journaled them: one callback for the turn's answers, on the last one's write.

        The journal commits its writes in the order they were queued, so once the last is committed all are (a
        callback per write cost a loop turn each); a write that is not done then (a stand-in journal) gets its own.
        """
        answers, self._answers = self._answers, None
        if answers:
            answers[-1][5].add_done_callback(partial(self._answers_written, answers))

    def _answers_written(self, answers: list[Any], _last: asyncio.Future[None]) -> None:
        for answer in answers:
            written = answer[5]
            if written.done():
                self._adopted(*answer)
            else:
                written.add_done_callback(partial(self._adopted, *answer[:5]))

    def _adopted(self, tracked: Tracked, status: str, broker_order_id: str | None, detail: str | None,
                 done: Callable[[], None], written: asyncio.Future[None]) -> None:
        error: BaseException | None = None
        try:
            error = asyncio.CancelledError() if written.cancelled() else written.exception()
            if error is None:
                self._believe(tracked, status, broker_order_id, detail)
            else:
                log.error("order %s: the broker's answer (%s) could not be journaled (%s: %s); not believed",
                          tracked.job.client_order_id, status, type(error).__name__, error)
        finally:
            self._give(tracked)
        try:
            if error is None:
                self._hooks_now(tracked, status)
        finally:
            done()

    async def _adopt_later(self, client_order_id: str, order: Order, done: Callable[[], None]) -> None:
        try:
            await self.adopt(client_order_id, order)
        except Exception:
            log.exception("order %s: the broker's answer could not be adopted", client_order_id)
        finally:
            done()

    # -- reading ---------------------------------------------------------------------------------------------------

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

    def strategy_exposure(self, account: str) -> Mapping[str, Mapping[str, int]]:
        """``exposure`` split by strategy: strategy -> contract -> signed contracts in flight or not yet booked
        (non-zero only; a strategy with none is absent). Read-only view, kept incrementally."""
        books = self._strategy_exposure.get(account)
        return _NO_STRATEGY_EXPOSURE if books is None else MappingProxyType(books)

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
        status = tracked.status
        if status in _DONE or (status == FILLED and tracked.filled >= job.quantity):
            if self._unsettled.pop(coid, None) is not None:
                for settled in self.settled_hooks:
                    settled(tracked)
            now = 0
            before = self._counted.pop(coid, 0)
        elif self._unsettled.get(coid) is tracked:
            now = (job.quantity - tracked.filled) * job.sign
            before = self._counted.get(coid, 0)
            if now == before:
                return
            self._counted[coid] = now
        else:
            now = 0
            before = self._counted.pop(coid, 0)
        if now != before:
            add_to_book(self._exposure, job.account, job.contract, now - before)
            add_to_strategy_book(self._strategy_exposure, job.account, job.strategy, job.contract, now - before)


def add_to_book(books: dict[str, dict[str, int]], account: str, contract: str, delta: int) -> None:
    """Add a signed quantity to ``books[account][contract]``, keeping no zero entries (an account without any is
    dropped): the shape the engine reads positions and exposure in."""
    book = books.setdefault(account, {})
    total = book.get(contract, 0) + delta
    if total:
        book[contract] = total
    else:
        book.pop(contract, None)
        if not book:
            del books[account]


def add_to_strategy_book(books: dict[str, dict[str, dict[str, int]]], account: str, strategy: str, contract: str,
                         delta: int) -> None:
    """``add_to_book`` one level deeper: ``books[account][strategy][contract]``, no zero entries, no empty levels."""
    by_strategy = books.setdefault(account, {})
    add_to_book(by_strategy, strategy, contract, delta)
    if not by_strategy:
        del books[account]


_DONE = frozenset({REJECTED, CANCELLED, MISSED})
"""Final states that settle an order whatever it filled (``filled`` settles it once its fills are booked)."""


async def _after(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done without ever cancelling it (cancelling this wait must not cancel the write or
    answer it stands for) and without raising its error."""
    waiter = asyncio.get_running_loop().create_future()

    def wake(_done: asyncio.Future[Any]) -> None:
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
    async def unresolved(self, name: str, client_order_id: str, exc: BaseException) -> None: ...
    def report_success(self, name: str) -> None: ...


class _Slots:
    """A broker's request slots: a semaphore taken without a coroutine when one is free (nearly always)."""

    __slots__ = ("free", "waiting")

    def __init__(self, count: int) -> None:
        self.free = count
        self.waiting: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot, first come first served (after ``take_now`` said none is free)."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as it was cancelled: pass it on
            raise

    def release(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it
                return
        self.free += 1


class _Lane:
    """One account's orders at one broker, in decision order, and the task sending them (None when idle)."""

    __slots__ = ("broker", "account", "jobs", "considered", "task", "offer_due")

    def __init__(self, broker: str, account: str) -> None:
        self.broker = broker
        self.account = account
        self.jobs: deque[Job] = deque()
        """Waiting: not taken by the lane's task yet."""
        self.considered = 0
        """How many of the first ``jobs`` were offered a journal-ahead already (each is offered once)."""
        self.task: asyncio.Task[None] | None = None
        self.offer_due = False
        """Orders were added while the task runs: they are offered a journal-ahead after this step."""


class Dispatcher:
    """Per-(broker, account) lanes that move journaled orders to their brokers, in order, a few per broker at once."""

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
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._slots: dict[str, _Slots] = {}
        self._running: set[Any] = set()
        """Work under way: lane tasks, and the client order ids of answers being journaled (empty: idle)."""
        self.placing: dict[str, asyncio.Future[None]] = {}
        """Client order id -> done once its ``_place`` has ended: orders whose request this process has under way
        (being journaled ``sending``, at the broker, waiting out a rate limit). A come-up's recovery waits for
        them before it looks them up (``Recovery._recover``): a request sent before a drop, or retried after a
        429, may reach the broker after the reconnect, so "not at the broker" is no proof it never will be."""
        self.sent = 0

    def submit(self, job: Job, *, resend: bool = False) -> None:
        """Queue ``job`` behind its account's orders at its broker (non-blocking). ``resend``: the job was looked
        up and not found."""
        self.tracker.track(job)
        key = (job.broker, job.account)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(job.broker, job.account)
        lane.jobs.append(job)
        if lane.task is not None:  # an order of the account is on its way: this one may be journaled ahead
            if not lane.offer_due:  # once per lane and step, after the step (as the lane itself would)
                lane.offer_due = True
                asyncio.get_running_loop().call_soon(self._offer_ahead, lane)
            return
        if job.broker not in self._slots:
            self._slots[job.broker] = _Slots(self.concurrency)
        lane.task = asyncio.create_task(self._lane(lane), name=f"dispatch-{job.broker}-{job.account}")
        self._running.add(lane.task)

    def submit_all(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.submit(job)

    def queued(self) -> dict[str, int]:
        """Orders waiting for their lane, by broker."""
        out = dict.fromkeys(self._slots, 0)
        for (broker, _), lane in self._lanes.items():
            out[broker] = out.get(broker, 0) + len(lane.jobs)
        return out

    async def drain(self) -> None:
        """Wait until every queued order has been handled and its answer journaled (tests, shutdown)."""
        while self._running or any(lane.jobs for lane in self._lanes.values()):
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lanes.clear()
        self._running.clear()

    async def _lane(self, lane: _Lane) -> None:
        """Send the lane's orders one after another, each once the broker answered the one before (its answer is
        journaled meanwhile); journal the next ones' ``sending`` ahead as each is taken."""
        slots = self._slots[lane.broker]
        jobs = lane.jobs
        try:
            while jobs:
                job = jobs.popleft()
                if lane.considered:
                    lane.considered -= 1
                try:
                    if jobs:
                        self._journal_ahead(lane)
                    tracked = self.tracker.track(job)
                    written = tracked.ahead_write
                    if tracked.busy or (written is not None and not written.done()):
                        await self.tracker.settled(tracked)  # its ``sending`` is being journaled ahead
                    order = await self._place(job, slots=slots)
                    if order is not None:
                        self._answered(job, order)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("order %s: unexpected error while dispatching", job.client_order_id)
        finally:
            lane.task = None
            self._running.discard(asyncio.current_task())
            if not jobs and self._lanes.get((lane.broker, lane.account)) is lane:
                del self._lanes[(lane.broker, lane.account)]

    def _offer_ahead(self, lane: _Lane) -> None:
        lane.offer_due = False
        if lane.task is not None and lane.jobs:
            self._journal_ahead(lane)

    def _journal_ahead(self, lane: _Lane) -> None:
        """Queue the ``sending`` of the lane's next waiting orders (up to ``ahead``) that were not offered yet: one
        step, so they share the journal's batch. Skipped while the broker is not open (the order's turn decides, as
        for any order); a failed write only loses the head start (``send`` journals ``sending`` itself, and sends
        nothing if that fails too)."""
        jobs = lane.jobs
        reach = min(self.ahead, len(jobs))
        if lane.considered >= reach:
            return
        open_ = self.pool.available(lane.broker)
        orders = self.tracker.orders
        for i in range(lane.considered, reach):
            job = jobs[i]
            tracked = orders.get(job.client_order_id)
            if open_ and tracked is not None and tracked.status == NEW:
                try:
                    self.tracker.journal_ahead_soon(tracked, SENDING)
                except Exception as exc:
                    log.warning("order %s: could not journal 'sending' ahead (%s: %s); journaling it at its turn",
                                job.client_order_id, type(exc).__name__, exc)
        lane.considered = reach

    def _answered(self, job: Job, order: Order) -> None:
        """Journal the broker's answer while the lane goes on (``_running`` holds it until it is settled)."""
        coid = job.client_order_id
        self._running.add(coid)
        try:
            self.tracker.adopt_soon(coid, order, partial(self._running.discard, coid))
        except Exception:
            self._running.discard(coid)
            log.exception("order %s: the broker's answer could not be journaled", coid)

    async def send(self, job: Job, *, recovering: bool = False) -> None:
        """Send one order at most once, outside any lane, and journal the broker's answer (recovery).

        ``recovering``: the runtime's recovery sends an order it just looked up and did not find, while the broker
        is connected but not yet open to new orders; only a lost connection makes such an order miss.
        """
        order = await self._place(job, recovering=recovering)
        if order is not None:
            await self.tracker.adopt(job.client_order_id, order)

    async def _place(self, job: Job, *, recovering: bool = False,
                     slots: _Slots | None = None) -> Order | None:
        """Journal ``sending`` and place the order; the broker's order when it took it (its answer is not journaled
        yet), None otherwise (every other outcome is journaled before this returns).

        An order journaled ``sending`` ahead (``Tracked.ahead``) is still ``new`` here: if the broker is not open
        it becomes ``missed`` (``sending`` -> ``missed`` on disk: its request never left), otherwise its ``sending``
        transition writes nothing and the request leaves at once. ``slots``: the broker's request slots, one held
        from the request to the broker's answer.
        """
        tracked = self.tracker.track(job)
        if tracked.status not in (NEW, UNKNOWN):
            return None
        coid = job.client_order_id
        if coid in self.placing:
            return None  # its request is under way already (a recovery's send and the lane's turn, say)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.placing[coid] = done
        try:
            return await self._place_once(job, tracked, recovering=recovering, slots=slots)
        finally:
            del self.placing[coid]
            done.set_result(None)

    async def _place_once(self, job: Job, tracked: Tracked, *, recovering: bool,
                          slots: _Slots | None) -> Order | None:
        coid = job.client_order_id
        if recovering and not self.pool.connector(job.broker).connected:
            raise BrokerUnavailable(f"broker {job.broker} dropped during recovery; {coid} stays unresolved")
        if not recovering and not self.pool.available(job.broker):
            await self.tracker.transition(coid, MISSED, detail=f"broker {job.broker} paused or down at dispatch")
            return None
        if not (self.tracker.believe_ahead(tracked, SENDING) or await self.tracker.transition(coid, SENDING)):
            return None
        connector = self.pool.connector(job.broker)
        request = job.request()
        order: Order | None = None
        error: BrokerError | None = None
        if slots is not None and not slots.take_now():
            await slots.take()
        try:
            for attempt in range(self.rate_limit_retries + 1):
                try:
                    order = await connector.place_order(request)
                except RateLimited as exc:
                    # Nothing was placed (place_order looked it up); wait as the broker asks, then try again.
                    if attempt < self.rate_limit_retries:
                        await asyncio.sleep(exc.retry_after_s)
                        continue
                    error = exc
                except BrokerError as exc:
                    error = exc
                break
        finally:
            if slots is not None:
                slots.release()
        if order is not None:
            self.sent += 1
            self.pool.report_success(job.broker)
            return order
        if isinstance(error, OrderRejected):
            await self.tracker.transition(coid, REJECTED, detail=error.reason,
                                          broker_order_id=error.order.broker_order_id if error.order else None)
            self.pool.report_success(job.broker)
            return None
        # Whatever else ended the request (lost answer and failed lookups, dropped connection, rate limits past every
        # retry, an error of another kind), the order is now in flight with nothing under way to resolve it. A
        # recovery's own send leaves that to the recovery (``Recovery._recover`` fails the come-up, which is
        # retried); any other is resolved by a come-up at once (``unresolved``), not at the next drop, which may
        # never come: until then an exit counts as filling while the position stays open.
        assert error is not None
        detail = f"still rate limited: {error}" if isinstance(error, RateLimited) else f"{type(error).__name__}: {error}"
        await self.tracker.transition(coid, UNKNOWN, detail=detail)
        if recovering:
            if isinstance(error, (OutcomeUnknown, BrokerUnavailable)):
                await self.pool.report_failure(job.broker, error)
        else:
            await self.pool.unresolved(job.broker, coid, error)
        return None
