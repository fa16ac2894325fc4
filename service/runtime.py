"""Everything behind the HTTP layer: brokers, dispatch, ledger, reconciliation, failover, risk and the schedule.

The webhook journals a signal with its orders (status ``new``) and answers; only then does it call ``dispatch``,
which hands the orders to per-broker queues (``service.dispatch``) without blocking. From there every state change
is journaled before it is acted on, fills feed the ledger (``service.ledger``) and the day book of the risk monitor
(``service.risk``), and ``engine_state`` serves the next decision from a cached view instead of a database query.

The runtime is one class assembled from mixins, one per concern, each in its own module with the part of this
description that concerns it: restoring the state at start from the journal (``service.restore``); a broker's
come-up, with recovery of orders in flight, reconciliation and catch-up (``service.recovery``); flattens, with the
held orders they supersede, their follow-ups, the re-issue of missed exits and the retry of rejected ones
(``service.flatten``); a signal's exits that counted on orders in flight which then did not fill, made good
(``service.exits``). The state they share is declared in ``service.runtime_state``. Here: the lifecycle, holds
and dispatch, broker events and fills, risk, the admin levers and the engine's view.

Exposure: an entry reserves its margin from the moment it is dispatched until the broker resolves it *and* a
later account snapshot reflects the fill, so the free margin the engine sees never looks better than it is, even
when one broker confirms in 15 ms and another in 200 ms. Positions the engine sees include orders still in flight
and fills a broker confirmed but has not reported yet (``OrderTracker.unsettled``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from dataclasses import replace
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from brokers.base import AccountSnapshot, BrokerError, BrokerEvent, Fill, FillEvent, OrderEvent
from brokers.feed import PriceFeed
from engine.decision import Decision
from engine.model import Account, RuleSet
from engine.sessions import trading_day, trading_day_start
from engine.signal import parse_signal
from engine.state import AccountState, EngineState
from service.dispatch import (
    CANCELLED,
    FILLED,
    MISSED,
    PARTIALLY_FILLED,
    REJECTED,
    Dispatcher,
    Job,
    OrderTracker,
    Tracked,
    add_to_book,
    add_to_strategy_book,
)
# Re-exported (``X as X``): callers and tests import these from here, as before the runtime was split.
from service.flatten import FLATTEN_FAILED as FLATTEN_FAILED
from service.flatten import FLATTEN_RETRY_DELAYS_S as FLATTEN_RETRY_DELAYS_S
from service.flatten import REDO_LOOKBACK as REDO_LOOKBACK
from service.flatten import FlattenMixin, _Netted, _Owed, _Withheld
from service.exits import ExitsMixin, _ExitWatch
from service.overtaken import OvertakenMixin, _Overtaken
from service.flatten import _clamp_to_broker as _clamp_to_broker
from service.ledger import ADOPTED, EXTERNAL_STRATEGY, Arrivals, Ledger, is_manual, replay
from service.notify import notifier_for
from service.pool import BrokerPool
from service.recovery import RecoveryMixin
from service.restore import DAY_START as DAY_START
from service.restore import RestoreMixin
from service.risk import PORTFOLIO, Breach, RiskMonitor, parse_halt_key
from service.runtime_state import SIGNAL_FIELDS as SIGNAL_FIELDS
from service.runtime_state import _Hold, _Reservation
from service.scheduler import ScheduleExecutor

log = logging.getLogger(__name__)

RISK_TICK_S = 0.5
BROKER_START_WAIT_S = 10.0
"""How long the schedule's owed flattens and the risk monitor wait at start for brokers still connecting."""
MISSED_BY = frozenset({"connection", "paused"})
"""Skip reasons that make a mirror order ``missed``: the account wanted it, its broker was not there."""
SNAPSHOT_DEBOUNCE_S = 0.05


class Runtime(FlattenMixin, ExitsMixin, OvertakenMixin, RecoveryMixin, RestoreMixin):
    """See the module docstring; the public methods are the API the HTTP layer (service.app) uses."""

    def __init__(self, config: Any, journal: Any, watcher: Any, *, clock: Any = None,
                 connector_options: dict[str, Any] | None = None, feed: PriceFeed | None = None) -> None:
        self.config = config
        self.journal = journal
        self.watcher = watcher
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.feed = feed or PriceFeed.shared()
        data_dir = getattr(config, "data_dir", None)
        options: dict[str, Any] = {"feed": self.feed, "clock": self.clock}
        if data_dir is not None:
            options["data_dir"] = Path(data_dir)
        options.update(connector_options or {})
        self._connector_options = options
        self.backoff_s = float(getattr(config, "reconnect_backoff_s", 0.5))
        self.backoff_max_s = float(getattr(config, "reconnect_backoff_max_s", 30.0))
        self.ledger = Ledger()
        self.tracker = OrderTracker(journal)
        self.tracker.hooks.append(self._on_status)
        self.tracker.settled_hooks.append(self._netted_settled)
        self.tracker.settled_hooks.append(self._exit_watch_settled)
        self.tracker.settled_hooks.append(self._overtaken_settled)
        self._exit_watches: dict[str, _ExitWatch] = {}
        self._counted_by: dict[str, _ExitWatch] = {}
        self._hand_basis: dict[str, int] = {}
        self._overtaken: dict[tuple[str, str], list[_Overtaken]] = {}
        self._overtaking: dict[str, _Overtaken] = {}
        self.pool: BrokerPool | None = None
        self.dispatcher: Dispatcher | None = None
        self.risk = RiskMonitor(self._mark, self._point_value)
        self._day_start_journaled: date | None = None
        """The trading day whose day-start marks are in the journal (``_journal_day_start``)."""
        self.scheduler: ScheduleExecutor | None = None
        self._snapshots: dict[str, AccountSnapshot] = {}
        self._unreconciled: dict[str, dict[str, tuple[int, int]]] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._reserved_by: dict[str, tuple[Decimal, int]] = {}
        """Per account: the sum and the number of its reservations (kept as they come and go)."""
        self._resolved: dict[str, list[tuple[datetime, int, str, _Reservation]]] = {}
        """Per account: a heap of resolved reservations by ``resolved_at``, for the next snapshot to release."""
        self._ripe: dict[str, dict[str, _Reservation]] = {}
        """Per account: resolved reservations a snapshot already passed whose order was not filled in full yet
        (partially filled); each later snapshot checks them again."""
        self._resolved_seq = itertools.count()
        self._snapshot_due: dict[str, asyncio.Task[None]] = {}
        self._event_tasks: set[asyncio.Task[None]] = set()
        """Broker events being handled (``_on_event``)."""
        self._event_queues: dict[tuple[str, str], deque[BrokerEvent]] = {}
        """Events of an order (broker, broker order id) still to handle, the first one being handled."""
        self._state: EngineState | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.redo_tasks: set[asyncio.Task[Any]] = set()
        """Re-issues of flatten exits missed as their broker came back (``_on_status``), while they run."""
        self._redo_pending: set[str] = set()
        """Brokers with a redo waiting for them to open (``_redo_once_open``)."""
        self._started_at: datetime | None = None
        self._first_up: set[str] = set()
        self._recovering_at_start: set[str] = set()
        self._after_brokers: asyncio.Task[None] | None = None
        self.arrivals = Arrivals()
        """When the ledger's latest fills and trades by hand were made, per account and contract (``book_entry``)."""
        self._pending_fills: dict[str, tuple[str, Fill]] = {}
        """Fills of our orders that arrived before the order was tracked, by broker:fill id (reported once each)."""
        self._catch_up_guard = asyncio.Lock()
        """One lock for every broker's catch-up: two brokers back from one blip must not both decide before
        either's orders are in view."""
        self._redo_guard = asyncio.Lock()
        """One lock for every re-issue of missed flattens and every retry of rejected ones (a come-up, an
        operator's resume and a retry may overlap): one computes and journals its exits before the next looks."""
        self.flatten_retry_delays_s: tuple[float, ...] = FLATTEN_RETRY_DELAYS_S
        self._retry_runners: dict[str, asyncio.Task[None]] = {}
        """Per broker: the task that waits for and runs the retries of rejected flatten exits there."""
        self._retry_wake: dict[str, asyncio.Event] = {}
        self._retry_seen: dict[tuple[Any, ...], datetime] = {}
        """When this process first saw each owed retry (``_Debt.state``): its backoff counts from then, on the
        runtime's clock (the journal stamps order transitions with the wall clock, which a test or replay moving
        the runtime's clock would not agree with)."""
        """Per broker: set when something may have changed what is owed (a rejection, a come-up, a resume)."""
        self._catch_up_owed: dict[str, datetime | None] = {}
        """Per broker that came back while an operator kept it paused: the ``since`` of the catch-up its come-up
        left to ``resume_broker`` (None: every target of the day)."""
        self._holds: dict[str, _Hold] = {}
        """Orders decided and not handed to the dispatcher yet, by signal id (``hold``)."""
        self._netted: dict[str, list[_Netted]] = {}
        """Client order id -> the flattened lines waiting for it to be final (``_Netted``)."""
        self._follow_ups: dict[str, int] = {}
        """Flatten id -> follow-ups issued so far (their ids: ``<flatten id>-follow-<n>``)."""
        self._owed_follow_ups: dict[str, list[_Owed]] = {}
        """Broker -> follow-ups a start found owed there, issued at its come-up (``_restore_watches``)."""
        self._withheld: dict[tuple[str, str], _Withheld] | None = None
        """(flatten id, account) -> what a flatten withheld there and still owes (None: not read from the journal
        yet, ``_withheld_debts``)."""
        self._withheld_pending: set[str] = set()
        """Brokers with a redo of withheld flattens waiting for the broker or the redo's lock
        (``_withheld_after_pass``)."""
        self._held: dict[str, dict[str, int]] = {}
        """Per account and contract: the signed quantity of every held order (kept as holds come and go)."""
        self._held_by_strategy: dict[str, dict[str, dict[str, int]]] = {}
        """The same per account, strategy and contract (each strategy's decided orders, for its own position)."""
        self.alerts: list[dict[str, Any]] = []
        self.notifier = notifier_for(config)
        self.catchups: list[dict[str, Any]] = []
        self.running = False

    # -- rules -------------------------------------------------------------------------------------------------
    @property
    def ruleset(self) -> RuleSet:
        return self.watcher.current[0]

    @property
    def engine(self) -> Any:
        return self.watcher.current[1]

    def _account(self, name: str) -> Account | None:
        return self.ruleset.accounts.get(name)

    def _account_at(self, broker: str, broker_account: str) -> str | None:
        for account in self.ruleset.accounts.values():
            if account.broker == broker and account.broker_account == broker_account:
                return account.name
        return None

    def _point_value(self, contract: str) -> Decimal:
        instrument = self.ruleset.catalog.get(contract[:-2]) or self.ruleset.catalog.get(contract)
        return instrument.point_value if instrument is not None else Decimal(0)

    def _mark(self, contract: str) -> Decimal | None:
        try:
            return self.feed.price(contract)
        except KeyError:
            return None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Rebuild the ledger, open orders and halts from the journal and start the loops; brokers connect and
        recover in the background (``ready`` waits for them).

        Returning before the brokers are up lets the service listen at once: a signal that arrives meanwhile meets
        brokers that are simply not available yet (routing skips them, mirror orders for their accounts are
        journaled missed, catch-up converges them). Each broker recovers its in-flight orders in ``_on_up`` before
        the pool opens it to new orders, so nothing is sent to it ahead of its recovery.
        """
        self._started_at = self.clock()
        await self.notifier.start()
        ruleset = self.ruleset
        fills = self.journal.fills()
        self.ledger = replay(fills, self._point_value)
        for fill in fills:
            self.arrivals.note(str(fill["account"]), str(fill["contract"]), self._fill_time(fill), is_manual(fill))
        # Newest first, every one of the current trading day however busy it was: what start-up restores is of
        # today only (its day-start marks, the halts and the limits fired journaled with today's ``day``; every
        # halt the runtime journals carries its day, and one without a day never was restored).
        events = self.journal.risk_events_since(trading_day_start(self._started_at))
        await self._open_day_book(fills, self._started_at, events)
        booked: dict[Any, int] = {}
        for fill in fills:
            if fill.get("kind") == ADOPTED:
                continue  # no order's
            # A broker may leave the client order id off its fill reports: count by its own order id as well.
            key = fill.get("client_order_id") or (fill.get("broker"), fill.get("broker_order_id"))
            booked[key] = booked.get(key, 0) + int(fill["quantity"])
        self._load_open_orders(booked)
        self._restore_watches(booked)  # after the open orders: what a flatten counted on and is still in flight
        self._restore_exit_watches(booked)  # and what a signal's exit counted on (``service.exits``)
        self._restore_overtaken(booked)  # and the exits a trade by hand overtook (``service.overtaken``)
        self._restore_halts(events)
        self.prepare()
        assert self.pool is not None
        self.pool.on_event = self._on_event
        self.pool.on_up = self._on_up
        self.pool.on_down = self._on_down
        self.dispatcher = Dispatcher(self.tracker, self.pool)
        self.running = True
        await self.pool.start()
        self.scheduler = ScheduleExecutor(lambda: self.ruleset.schedule_rules, self._fire_schedule, self.journal,
                                          clock=self.clock)
        for name in ruleset.brokers:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(name), name=f"reconcile-{name}"))
        self._after_brokers = asyncio.create_task(self._start_when_brokers_tried(), name="start-schedule-and-risk")
        self._tasks.append(self._after_brokers)
        self._invalidate()

    async def _start_when_brokers_tried(self) -> None:
        """Start the schedule (with the flattens a restart owes) and the risk monitor once every broker had its
        first connect and recovery, or after ``BROKER_START_WAIT_S``.

        Both act on brokers: an owed flatten sent while its broker is still logging in would only be recorded as
        missed, an exit lost for a broker that was merely slow. A broker still not there after the wait is treated
        as down, as before.
        """
        assert self.pool is not None and self.scheduler is not None
        if not await self.pool.ready(BROKER_START_WAIT_S):
            log.warning("brokers still starting after %gs (%s): schedule and risk monitor start without them",
                        BROKER_START_WAIT_S, ", ".join(self.pool.starting()) or "none")
        if not self.running:
            return
        await self.scheduler.start()
        if self.running:
            self._tasks.append(asyncio.create_task(self._risk_loop(), name="risk-monitor"))

    async def ready(self, timeout: float | None = None) -> bool:
        """Wait until every broker had its first connect and recovery, and the schedule and risk monitor run.

        For tests, the CLI and callers that want the brokers before they act; the service itself never waits.
        False when ``timeout`` (seconds) passed first or the runtime was not started.
        """
        task = self._after_brokers
        if self.pool is None or task is None:
            return False
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if not await self.pool.ready(timeout):
            return False
        if not task.done():
            left = None if deadline is None else max(0.0, deadline - loop.time())
            done, _pending = await asyncio.wait([task], timeout=left)
            if not done:
                return False
        return not task.cancelled() and task.exception() is None

    def broker_states(self) -> dict[str, str]:
        """Each broker's state (starting, recovering, up, down, paused): ``/healthz`` shows it without a token."""
        return {} if self.pool is None else {name: slot.state for name, slot in sorted(self.pool.slots.items())}

    def starting(self) -> list[str]:
        """Brokers whose first connect and recovery have not finished yet."""
        return [] if self.pool is None else self.pool.starting()

    def prepare(self) -> BrokerPool:
        """Build the connectors (no I/O yet), so that a harness can reach a broker before ``start`` connects it."""
        if self.pool is None:
            self.pool = BrokerPool(self.ruleset.brokers, connector_options=self._connector_options,
                                   backoff_s=self.backoff_s, backoff_max_s=self.backoff_max_s)
        return self.pool

    async def stop(self) -> None:
        self.running = False
        if self.scheduler is not None:
            await self.scheduler.stop()
        tasks = self._tasks + list(self._snapshot_due.values()) + list(self._event_tasks) + list(self.redo_tasks)
        self._tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.pool is not None:
            await self.pool.stop()
        await self.notifier.stop()

    def _job(self, order: dict[str, Any], strategy: str, signal_id: str, margin: Decimal | None = None) -> Job | None:
        account = self._account(order["account"])
        if account is None:
            log.error("order %s names account %s, which the rules no longer define; not sent",
                      order["client_order_id"], order["account"])
            return None
        if margin is None:
            stored = order.get("margin_usd")
            if stored not in (None, ""):
                margin = Decimal(str(stored))
            elif order.get("intent") == "entry":
                per = self.ruleset.brokers[account.broker].margin(order["contract"][:-2]) or Decimal(0)
                margin = per * int(order["quantity"])
            else:
                margin = Decimal(0)
        job = Job(client_order_id=order["client_order_id"], signal_id=signal_id, strategy=strategy,
                  account=account.name, broker=order.get("broker") or account.broker,
                  broker_account=account.broker_account, contract=order["contract"], side=order["side"],
                  quantity=int(order["quantity"]), intent=order.get("intent") or "entry", margin_usd=margin)
        self._note_hand_basis(job)  # what trades by hand had closed on its line by now (``service.overtaken``)
        return job

    # -- dispatch ----------------------------------------------------------------------------------------------
    def dispatch(self, signal_id: str, decision: Decision) -> None:
        """Hand the journaled orders of ``decision`` to their brokers' queues (returns at once). The signal's hold,
        if any, ends here: in the same step its orders become tracked, so they never stop counting. Orders a
        flatten superseded while they were held are not sent (``_supersede_holds``)."""
        assert self.dispatcher is not None, "Runtime.start() first"
        if signal_id not in self._holds:
            self.hold(signal_id, decision)  # a caller that did not hold (the engine's orders, reserved the same)
        held = self._holds.get(signal_id)
        if held is not None and held.unsent:
            self.notifier.notify("missed", f"{signal_id}: {len(held.unsent)} order(s) not sent, their broker "
                                 "paused or down at the decision (catch_up accounts converge when it is back)",
                                 at=self.clock())
        self.dispatcher.submit_all(self._take_hold(signal_id) or [])
        missed = {s.account for s in decision.skipped if s.by in MISSED_BY}
        if missed and self._rule_mode(decision.rule) == "mirror":
            self._spawn(self._journal_missed(signal_id, missed))
        for cancel in decision.cancel:
            self._spawn(self._cancel_working(cancel.account, cancel.broker, cancel.instrument))
        self._invalidate()

    def hold(self, signal_id: str, decision: Decision, *, unavailable_missed: bool = True) -> None:
        """Count ``decision``'s orders as exposure from now on, before their signal is journaled.

        Call it in the same synchronous step as the ``engine_state`` and ``decide`` that made them. The webhook
        awaits its journal commit before it dispatches, and catch-up too: a signal decided in between must see
        these orders, as positions (``max_contracts``, the portfolio's contracts, best mode's holders) and as
        reserved margin, or two concurrent "buy 3" pass a limit of 4 and two best-mode targets open the position at
        two accounts. The orders are not tracked yet: recovery sends the tracker's ``new`` orders, and an order
        must never leave before its signal is on disk. ``dispatch`` ends the hold; ``release`` drops it when the
        signal is not acknowledged. O(orders of the signal).

        An order for a broker down or paused at this instant (the engine routes no entry there, but never blocks an
        exit) is not held and never sent: it is journaled ``missed`` with its signal (``Journal.supersede``), as it
        would have been at its turn in the dispatcher. Counted as held meanwhile, an exit would make the account
        look flat while it certainly is not: best mode would open the strategy's position at a second account, and
        the portfolio's counts would look safer than they are. ``unavailable_missed=False``: catch-up, deciding for
        a broker that is connected and not yet open (its recovery sends the orders)."""
        if not decision.orders or signal_id in self._holds:
            return
        jobs, reserved, unsent = [], [], {}
        for order in decision.orders:
            job = self._job(order.to_json(), decision.strategy, signal_id, order.margin_usd)
            if job is None:
                continue
            if unavailable_missed and self.pool is not None and not self.pool.available(job.broker):
                unsent[job.client_order_id] = f"broker {job.broker} paused or down at the decision"
                log.warning("%s: %s %s %d %s missed (broker %s down or paused at the decision)", signal_id,
                            job.account, job.side, job.quantity, job.contract, job.broker)
                continue
            jobs.append(job)
            self._count_held(job, 1)
            if job.client_order_id not in self._reservations:
                self._reserve(job)
                if job.client_order_id in self._reservations:
                    reserved.append(job.client_order_id)
        if unsent:
            self.journal.supersede(signal_id, unsent)  # before anything can write the signal
        self._watch_exits(signal_id, jobs)  # before they count: what they counted on is what was there
        self._holds[signal_id] = _Hold(jobs, reserved, unsent=list(unsent))
        self._invalidate()

    def release(self, signal_id: str) -> None:
        """Drop a hold whose orders will not be dispatched (the signal could not be journaled); no-op without one."""
        held = self._holds.get(signal_id)
        if held is None:
            return
        self._take_hold(signal_id)
        for job in held.jobs:
            self._unwatch_exit(job.client_order_id)  # never sent: nothing to make good
            self._forget_hand_basis(job)  # nor its basis, parked for the signal's write
        for coid in held.reserved:
            self._drop_reservation(coid)
        if held.unsent:
            self.journal.withdraw_superseded(signal_id, held.unsent)
        self._invalidate()

    def _take_hold(self, signal_id: str) -> list[Job] | None:
        """End a hold, keeping its margin reservations (the caller tracks its jobs now); None when none. The
        orders a flatten superseded are on disk ``missed`` already, or will be with the signal's own commit
        (``_issue_flatten``): nothing to write here."""
        held = self._holds.pop(signal_id, None)
        if held is None:
            return None
        for job in held.jobs:
            self._count_held(job, -1)
        return held.jobs

    def _count_held(self, job: Job, sign: int) -> None:
        delta = sign * job.quantity * job.sign
        add_to_book(self._held, job.account, job.contract, delta)
        add_to_strategy_book(self._held_by_strategy, job.account, job.strategy, job.contract, delta)

    def _rule_mode(self, name: str | None) -> str | None:
        return next((r.mode for r in self.ruleset.routing_rules if r.name == name), None)

    async def _journal_missed(self, signal_id: str, accounts: set[str]) -> None:
        """Journal, as ``missed``, the mirror orders that accounts at a down or paused broker did not get.

        The engine skipped them (an entry cannot go to a broker that is not there); what they would have received
        is what the same signal decides with their brokers up. Catch-up (``catch_up: true``) converges them later;
        the others stay visibly behind their strategy instead of silently.
        """
        row = self.journal.get_signal(signal_id)
        if row is None or not row.get("signal"):
            return
        body = {k: v for k, v in row["signal"].items() if k in SIGNAL_FIELDS}
        try:
            signal = parse_signal({**body, "id": signal_id})
        except ValueError as exc:
            log.warning("missed orders of %s not journaled: the stored signal no longer parses: %s", signal_id, exc)
            return
        at = self.clock()
        brokers = {self.ruleset.accounts[a].broker for a in accounts if a in self.ruleset.accounts}
        would = self.engine.decide(signal, self._state_with_up(at, brokers), at)
        orders = [o for o in would.orders if o.account in accounts]
        if not orders:
            return
        # One transaction: each order row with its history (after the signal's own legs).
        await self.journal.record_orders(
            signal_id, [{**order.to_json(), "order_type": would.order_type,
                         "detail": f"broker {order.broker} down or paused at dispatch"} for order in orders],
            MISSED, at=self.clock())
        for order in orders:
            log.warning("%s: %s %s %d %s missed (broker %s down or paused at dispatch)", signal_id, order.account,
                        order.side, order.quantity, order.contract, order.broker)
        for broker in sorted({o.broker for o in orders}):
            missed = [o for o in orders if o.broker == broker]
            self.notifier.notify("missed", f"{signal_id}: " + ", ".join(
                f"{o.account} {o.side} {o.quantity} {o.contract}" for o in missed) + " not sent (broker away)",
                at=at, broker=broker)

    def _state_with_up(self, now: datetime, brokers: set[str]) -> EngineState:
        """The engine's view with ``brokers`` connected and not paused (what they would get if they were up).

        An account whose broker has not reported yet in this process (it is still starting) has no known free
        margin; its declared capital less what is reserved stands in, so that what it missed is still recorded.

        Orders decided and not dispatched yet are in view (``engine_state`` counts the holds): a webhook's signal
        journaled and answered but not dispatched is the strategy's last target for a catch-up deciding then, and
        without its entry in view best mode would open the position a second time at the broker just back."""
        state = self.engine_state(now)
        names = {n for n, a in self.ruleset.accounts.items() if a.broker in brokers}
        up = {}
        for name, acct in state.accounts.items():
            if name in names:
                acct = replace(acct, connected=True)
                if name not in self._snapshots:
                    acct = replace(acct, free_margin=self.ruleset.accounts[name].capital - self._reserved(name))
            up[name] = acct
        return replace(state, accounts=up, paused=state.paused - brokers)

    def _reserve(self, job: Job) -> None:
        if job.intent == "entry" and job.margin_usd > 0 and job.client_order_id not in self._reservations:
            self._add_reservation(job.client_order_id, _Reservation(job.account, job.margin_usd))

    def _add_reservation(self, coid: str, reservation: _Reservation) -> None:
        self._drop_reservation(coid)
        self._reservations[coid] = reservation
        total, count = self._reserved_by.get(reservation.account, (Decimal(0), 0))
        self._reserved_by[reservation.account] = (total + reservation.margin, count + 1)

    def _drop_reservation(self, coid: str) -> None:
        """Release a reservation; its entry in the ``_resolved`` heap, if any, is skipped when it comes up."""
        reservation = self._reservations.pop(coid, None)
        if reservation is None:
            return
        account = reservation.account
        ripe = self._ripe.get(account)
        if ripe is not None:
            ripe.pop(coid, None)
        total, count = self._reserved_by[account]
        if count <= 1:
            del self._reserved_by[account]  # back to exactly Decimal(0), whatever the sum's exponent became
        else:
            self._reserved_by[account] = (total - reservation.margin, count - 1)

    def _resolve_reservation(self, coid: str, reservation: _Reservation, at: datetime) -> None:
        reservation.resolved_at = at
        heapq.heappush(self._resolved.setdefault(reservation.account, []),
                       (at, next(self._resolved_seq), coid, reservation))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _cancel_working(self, account_name: str, broker: str, instrument: str) -> None:
        account = self._account(account_name)
        if account is None or self.pool is None or not self.pool.available(broker):
            return
        connector = self.pool.connector(broker)
        try:
            for order in await connector.working_orders(account.broker_account):
                if order.contract[:-2] == instrument or order.contract == instrument:
                    cancelled = await connector.cancel_order(account.broker_account, order.broker_order_id)
                    tracked = self.tracker.find(broker, order.client_order_id, order.broker_order_id)
                    if tracked is not None:
                        await self.tracker.adopt(tracked.job.client_order_id, cancelled)
        except BrokerError as exc:
            log.warning("cancel of working %s orders in %s failed: %s", instrument, account_name, exc)

    def _on_status(self, tracked: Tracked, status: str) -> None:
        """Synchronous (no coroutine per transition): it only updates in-memory books."""
        coid = tracked.job.client_order_id
        reservation = self._reservations.get(coid)
        if reservation is not None:
            if status in (REJECTED, CANCELLED, MISSED):
                self._drop_reservation(coid)
            elif status in (FILLED, PARTIALLY_FILLED) and reservation.resolved_at is None:
                self._resolve_reservation(coid, reservation, self.clock())
                self._refresh_snapshot_soon(tracked.job.broker, tracked.job.account)
        if status in (FILLED, PARTIALLY_FILLED):
            self._retry_pending_fills()
        elif status in (REJECTED, CANCELLED) and tracked.job.intent == "exit":
            self._wake_retries(tracked.job.broker)  # a flatten's exit? the journal says (``_flatten_debts``)
        elif status == MISSED and tracked.job.intent == "exit" and self.running and self.pool is not None:
            self._redo_once_open(tracked.job.broker)
        self._invalidate()

    def _redo_once_open(self, broker: str) -> None:
        """An exit was missed at ``broker``. If the broker is back already, or coming back (its come-up runs, or an
        operator's resume), the come-up's or resume's redo may have read the journal before this ``missed``
        landed and found nothing owed: carry the flatten's exit out once the broker is open, as they would have
        (a missed exit of a signal, not of a flatten, owes nothing: ``_missed_flattens``). A broker that is down
        gets it from its next come-up; one an operator keeps paused, from its resume (which looks again after it
        un-pauses). One task per broker at a time: it reads the journal when it runs, so later misses are in it."""
        assert self.pool is not None
        slot = self.pool.slots.get(broker)
        if slot is None or not (slot.available or slot.recovering) or broker in self._redo_pending:
            return
        self._redo_pending.add(broker)

        async def redo() -> None:
            try:
                while slot.recovering:
                    await slot.settled.wait()
            finally:
                self._redo_pending.discard(broker)
            if slot.available:
                await self._redo_missed_flattens(broker, why="exit missed as the broker came back")

        task = asyncio.create_task(redo())
        self.redo_tasks.add(task)  # cancelled by ``stop``; tests wait for it to settle
        task.add_done_callback(self.redo_tasks.discard)

    # -- broker events -----------------------------------------------------------------------------------------
    async def _on_event(self, broker: str, event: BrokerEvent) -> None:
        """Handle a broker's order or fill event off the broker's event pump, so that the pump takes the next event
        at once instead of after this one's journal commit.

        Handled one after another, a broker's events were booked at most one per commit (each fill waits for its
        row's fsync, each order event for its order's lock while the answer commits), whatever the load: fills fell
        behind dispatch and every commit carried a handful of writes. The events of one order are still handled
        one after another, in arrival order, exactly as before (one queue and one task per order with events
        pending, keyed by broker order id): a fill is booked before the order event that follows it is looked at,
        so a partial fill is journaled once. Events of different orders are independent."""
        if isinstance(event, FillEvent):
            key = (broker, event.fill.broker_order_id)
        elif isinstance(event, OrderEvent):
            key = (broker, event.order.broker_order_id)
        else:
            return
        queue = self._event_queues.get(key)
        if queue is not None:
            queue.append(event)
            return
        self._event_queues[key] = deque((event,))
        task = asyncio.create_task(self._handle_events(broker, key))
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _handle_events(self, broker: str, key: tuple[str, str]) -> None:
        queue = self._event_queues[key]
        try:
            while queue:
                event = queue[0]
                try:
                    if isinstance(event, FillEvent):
                        await self.ingest_fill(broker, event.fill)
                    else:
                        order = event.order  # type: ignore[union-attr]
                        tracked = self.tracker.find(broker, order.client_order_id, order.broker_order_id)
                        if tracked is not None:
                            await self.tracker.adopt(tracked.job.client_order_id, order)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("broker %s: error while handling %r", broker, event)
                queue.popleft()
        finally:
            del self._event_queues[key]

    async def ingest_fill(self, broker: str, fill: Fill) -> bool:
        """Journal a fill (once per broker fill id) and book it in the ledger and the day book."""
        if f"{broker}:{fill.fill_id}" in self.ledger.seen_fills:
            return False  # booked already (an event and a reconciliation pass report the same fill)
        tracked = self.tracker.find(broker, fill.client_order_id, fill.broker_order_id)
        account = tracked.job.account if tracked else self._account_at(broker, fill.account)
        if account is None:
            log.warning("fill %s at %s for unknown account %s ignored", fill.fill_id, broker, fill.account)
            return False
        if tracked is None and fill.client_order_id and fill.client_order_id.startswith("mb-"):
            # Ours, but its order is not tracked yet (the answer to place_order is still on its way).
            self._pending_fills[f"{broker}:{fill.fill_id}"] = (broker, fill)
            return False
        strategy = tracked.job.strategy if tracked else EXTERNAL_STRATEGY
        new = await self.journal.record_fill({
            "broker": broker, "fill_id": fill.fill_id, "account": account, "contract": fill.contract,
            "side": fill.side.value, "quantity": fill.quantity, "price": fill.price, "commission": fill.commission,
            "at": fill.time, "client_order_id": fill.client_order_id or (tracked and tracked.job.client_order_id),
            "broker_order_id": fill.broker_order_id, "strategy": strategy,
        })
        signed = fill.quantity * fill.side.sign
        fid = f"{broker}:{fill.fill_id}"
        booked = self.book_entry(fill_id=fid, account=account, strategy=strategy, contract=fill.contract,
                                 signed_qty=signed, price=fill.price, commission=fill.commission, at=fill.time,
                                 manual=tracked is None)  # not ours: a trade made by hand at the broker
        if tracked is not None and booked:
            self.tracker.book_fill(tracked.job.client_order_id, fill.quantity)
            status = FILLED if tracked.filled >= tracked.job.quantity else PARTIALLY_FILLED
            await self.tracker.transition(tracked.job.client_order_id, status,
                                          broker_order_id=fill.broker_order_id)
        self._refresh_snapshot_soon(broker, account)
        self._invalidate()
        return bool(new)

    def book_entry(self, *, fill_id: str, account: str, strategy: str, contract: str, signed_qty: int,
                   price: Decimal, commission: Decimal, at: datetime, manual: bool,
                   point_value: Decimal | None = None, day_book: bool = True) -> bool:
        """Book a journaled fill (or adoption) in the ledger and the day book; False when it was booked before.

        In the broker's order: one that comes out of it across a trade made by hand (``Arrivals.late``) rebuilds
        the books of its account and contract from the journal, the fills booked so far and this one, as a restart
        would (``Ledger.rebuild``). The day
        book is not rebuilt: an account's P&L does not depend on which of its books a contract is booked to.
        ``day_book=False``: not in the day book (an adoption with no mark known moves no P&L)."""
        if fill_id in self.ledger.seen_fills:
            return False
        if point_value is None:
            point_value = self._point_value(contract)
        rebuilt = self.arrivals.late(account, contract, at, manual)
        if rebuilt:
            # That account and contract only: nothing else can change.
            self.ledger.rebuild(account, contract, self._booked_rows(account, contract, fill_id), self._point_value)
            log.info("ledger rebuilt from the journal in the broker's order: %s at %s came after a later %s", fill_id,
                     account, "fill" if manual else "trade made by hand")
        else:
            self.ledger.apply(fill_id=fill_id, account=account, strategy=strategy, contract=contract,
                              signed_qty=signed_qty, price=price, commission=commission, point_value=point_value,
                              manual=manual)
        self.arrivals.note(account, contract, at, manual)
        if manual or rebuilt:
            self._hand_trade_booked(account, contract)  # an exit final before it may have closed it twice
        if day_book:
            self.risk.apply_fill(fill_id=fill_id, account=account, strategy=strategy, contract=contract,
                                 signed_qty=signed_qty, price=price, commission=commission, at=at, manual=manual)
        return True

    def _retry_pending_fills(self) -> None:
        for key, (broker, fill) in list(self._pending_fills.items()):
            if self.tracker.find(broker, fill.client_order_id, fill.broker_order_id) is not None:
                del self._pending_fills[key]
                self._spawn(self.ingest_fill(broker, fill))

    def _refresh_snapshot_soon(self, broker: str, account: str) -> None:
        task = self._snapshot_due.get(account)
        if task is None or task.done():
            self._snapshot_due[account] = asyncio.create_task(self._refresh_snapshot(broker, account))

    async def _refresh_snapshot(self, broker: str, account_name: str) -> None:
        await asyncio.sleep(SNAPSHOT_DEBOUNCE_S)
        account = self._account(account_name)
        if account is None or self.pool is None or not self.pool[broker].connector.connected:
            return
        try:
            snapshot = await self.pool.connector(broker).account_snapshot(account.broker_account)
        except BrokerError as exc:
            log.debug("snapshot of %s failed: %s", account_name, exc)
            return
        self._set_snapshot(account_name, snapshot)

    def _set_snapshot(self, account: str, snapshot: AccountSnapshot) -> None:
        """Take the snapshot and release the reservations it reflects: resolved at or before its time and filled
        in full (or no longer tracked). Costs O(released + partially filled), not O(reservations)."""
        self._snapshots[account] = snapshot
        ripe = self._ripe.get(account)
        if ripe:
            for coid, res in list(ripe.items()):
                if self._releasable(coid, res, snapshot):
                    self._drop_reservation(coid)
        heap = self._resolved.get(account)
        while heap and heap[0][0] <= snapshot.time:
            _, _, coid, res = heapq.heappop(heap)
            if self._reservations.get(coid) is not res:
                continue  # released meanwhile (rejected, cancelled, missed) or replaced
            if self._releasable(coid, res, snapshot):
                self._drop_reservation(coid)
            else:
                self._ripe.setdefault(account, {})[coid] = res
        if heap is not None and not heap:
            del self._resolved[account]
        self._invalidate()

    def _releasable(self, coid: str, res: _Reservation, snapshot: AccountSnapshot) -> bool:
        if res.resolved_at is None or snapshot.time < res.resolved_at:
            return False
        tracked = self.tracker.get(coid)
        return tracked is None or tracked.status == FILLED

    # -- risk --------------------------------------------------------------------------------------------------
    async def _risk_event(self, name: str, kind: str, reason: str, source: str, now: datetime,
                          **extra: Any) -> None:
        await self.journal.record_risk_event({"scope": "portfolio" if name == PORTFOLIO else "account",
                                              "name": name, "kind": kind, "reason": reason, "source": source,
                                              "day": trading_day(now).isoformat(), "at": now, **extra})
        if name == PORTFOLIO:
            self.notifier.notify(kind, f"portfolio: {reason}", at=now)
        else:
            account = self._account(name)
            self.notifier.notify(kind, reason, at=now, account=name, broker=account.broker if account else None)

    async def _risk_loop(self) -> None:
        while True:
            await asyncio.sleep(RISK_TICK_S)
            try:
                await self.check_risk()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("risk monitor: check failed")

    async def check_risk(self) -> list[Breach]:
        """Re-mark, roll the day if it changed, and act on any new breach (``service.risk``).

        A flattening breach halts first (no entry slips in while its exits are journaled), then flattens, and is
        marked fired and journaled only after its flattens are: a crash in between fires it again after the
        restart, where the flatten's id (one per limit, day, account and firing) makes a second flatten of the
        same firing a no-op while its journaled orders recover."""
        now = self.clock()
        if self.risk.roll(now, self.ledger):
            log.info("risk: trading day %s began; day-bound halts lifted", self.risk.day)
        if self.risk.day != self._day_start_journaled:
            try:
                await self._journal_day_start({c: "mark at the day's start" for c in self.risk.day_marks})
            except Exception:  # noqa: BLE001 - the limits must still be checked; the next tick retries
                log.exception("risk: the day-start marks of %s could not be journaled", self.risk.day)
        self.risk.refresh()
        limits, accounts = self.ruleset.limits, self.ruleset.accounts
        for name, key in self.risk.rearm(limits, accounts):
            scope, roots = parse_halt_key(key)
            reason = f"{name} re-armed for {key}: its halt was cleared and the daily P&L is back above the limit"
            log.info("risk: %s", reason)
            await self._risk_event(scope, "rearm", reason, f"risk:{name}", now, limit=name, key=key,
                                   instruments=None if roots is None else list(roots))
        breaches = self.risk.breaches(limits, accounts)
        for breach in breaches:
            # A limit restricted to roots halts, and flattens, those roots only (``service.risk``).
            roots = breach.instruments
            halt = self.risk.act(breach, now)
            log.warning("risk: %s", breach.reason)
            if breach.flatten:
                number = self.risk.fire_number(breach)
                suffix = "" if number == 1 else f"-{number}"
                for account in breach.accounts:
                    await self.flatten(account=account, reason=breach.reason, instruments=roots,
                                       flatten_id=f"risk-{breach.limit.name}-{self.risk.day}-{account}{suffix}")
                self.risk.mark_fired(breach.limit.name, breach.key)
            await self._risk_event(breach.scope_name, "halt", breach.reason, f"risk:{breach.limit.name}", now,
                                   limit=breach.limit.name, daily_pnl=str(breach.daily_pnl),
                                   action=breach.limit.on_breach, flattened=breach.flatten, key=halt.key,
                                   instruments=None if roots is None else list(roots))
        self._invalidate()
        return breaches

    def clear_halt(self, name: str) -> dict[str, Any]:
        """Lift the halt kept under ``name``: an account (``apex-1``), ``portfolio``, or a halt restricted to roots
        (``apex-1:ES,MES``, as ``status()`` lists it)."""
        halt = self.risk.clear(name)
        if halt is None:
            raise KeyError(f"no halt named {name!r}; halted: {', '.join(sorted(self.risk.halts)) or 'none'}")
        now = self.clock()
        self._spawn(self._risk_event(halt.name, "clear", "cleared by operator", "operator", now, key=halt.key,
                                     instruments=None if halt.instruments is None else list(halt.instruments)))
        self._invalidate()
        return {"cleared": halt.key, "halt": halt.as_dict()}

    # -- admin -------------------------------------------------------------------------------------------------
    async def pause_broker(self, name: str) -> dict[str, Any]:
        """Send nothing new to ``name`` until ``resume_broker``. Its accounts miss what is decided meanwhile, as at
        a broker that is down, so the resume owes them a catch-up from now on (``catch_up`` accounts), as a
        come-up does; a pause of a broker already paused changes nothing."""
        assert self.pool is not None
        if not self.pool[name].admin_paused:
            self._owe_catch_up(name, self.clock())
            self.notifier.notify("broker_paused", "paused by an operator: nothing new is sent there",
                                 at=self.clock(), broker=name)
        slot = self.pool.pause(name)
        self._invalidate()
        return slot.as_dict()

    async def resume_broker(self, name: str) -> dict[str, Any]:
        """Un-pause ``name``; first, while it still takes no new orders, carry out the flattens its accounts missed,
        then the catch-up a come-up while paused left to this (in that order, as a come-up does: catch-up must see
        the flattens' exits). A broker that is down is simply un-paused: its come-up does both."""
        assert self.pool is not None
        slot = self.pool[name]
        if slot.admin_paused and slot.recovering:
            await slot.settled.wait()  # a come-up's recovery runs: it left the flattens to this resume
        if slot.admin_paused and not slot.down and slot.connector.connected:
            await self._redo_missed_flattens(name, why="resumed by an operator")
            if name in self._catch_up_owed:
                since = self._catch_up_owed.pop(name)
                try:
                    await self._catch_up(name, since=since)
                except BaseException:
                    self._owe_catch_up(name, since)  # still paused: the next come-up or resume owes it again
                    raise
        was_paused = slot.admin_paused
        slot = self.pool.resume(name)
        if was_paused:
            self.notifier.notify("broker_resumed", "resumed by an operator" if slot.available else
                                 "resumed by an operator; still down, it opens when it reconnects",
                                 at=self.clock(), broker=name)
        if slot.available:
            # Once more, open now: an exit missed while the redo above and the catch-up ran (its ``missed`` landed
            # after the redo read the journal, while the broker was still paused) is owed too.
            await self._redo_missed_flattens(name, why="resumed by an operator")
        self._wake_retries(name)
        self._invalidate()
        return slot.as_dict()

    def status(self) -> dict[str, Any]:
        return {
            "brokers": self.pool.status() if self.pool else [],
            "halts": [h.as_dict() for h in self.risk.halts.values()],
            "queued": self.dispatcher.queued() if self.dispatcher else {},
            "in_flight": len(self.tracker.in_flight()),
            "reserved_margin_usd": str(sum((r.margin for r in self._reservations.values()), Decimal(0))),
            "trading_day": None if self.risk.day is None else self.risk.day.isoformat(),
            "portfolio_daily_pnl": str(self.risk.portfolio_pnl(self.ruleset.accounts)),
            "alerts": self.alerts[-20:],
            "notifications": self.notifier.status(),
        }

    def accounts(self) -> list[dict[str, Any]]:
        state = self.engine_state(self.clock())
        out = []
        for name, account in sorted(self.ruleset.accounts.items()):
            acct = state.accounts[name]
            snap = self._snapshots.get(name)
            out.append({"name": name, "broker": account.broker, "connected": acct.connected,
                        "free_margin": str(acct.free_margin), "daily_pnl": str(acct.daily_pnl),
                        "halted": acct.halted, "halted_instruments": dict(acct.halted_instruments),
                        "positions": dict(acct.positions),
                        "cash_balance": None if snap is None else str(snap.cash_balance),
                        "reserved_margin": str(self._reserved(name))})
        return out

    def positions(self) -> list[dict[str, Any]]:
        rows = []
        for row in self.ledger.snapshot_rows():
            if row["quantity"]:
                mark = self._mark(str(row["contract"]))
                rows.append({**row, "mark": None if mark is None else str(mark)})
        return rows

    def account_snapshots(self) -> dict[str, AccountSnapshot]:
        """The latest broker snapshot per account (cash, margin), for the dashboard and the daily marks."""
        return dict(self._snapshots)

    # -- the engine's view -------------------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._state = None

    def _reserved(self, account: str) -> Decimal:
        found = self._reserved_by.get(account)
        return Decimal(0) if found is None else found[0]

    def engine_state(self, now: datetime) -> EngineState:
        """The accounts as the engine must see them; rebuilt only after something changed (cheap per webhook).
        Orders count from their decision on: held (``hold``), then in flight, then in the ledger; an entry's margin
        stays reserved throughout.

        Positions twice over: the account's net (``positions``: every line, what the broker holds and what
        account-wide limits, risk and the dashboard read) and each strategy's own (``strategy_positions``: its ledger
        books, its orders in flight and its held orders), which is what a signal of that strategy acts on. Lines
        booked to no strategy (``EXTERNAL_STRATEGY``: what trades made by hand opened) count in the net only: no
        strategy's target or exit is computed from them (a trade by hand that closed a strategy's position was
        booked to it when it was made: ``Ledger._book_manual``). One pass over the ledger's books, and
        the tracker's and the holds' views are kept per strategy as orders come and go: O(lines + accounts)."""
        if self.risk.day is not None and trading_day(now) > self.risk.day:
            self.risk.roll(now, self.ledger)
            self._state = None
        if self._state is not None:
            return self._state
        pool = self.pool
        paused = pool.unavailable() if pool is not None else frozenset(self.ruleset.brokers)
        down = pool.disconnected() if pool is not None else paused
        nets: dict[str, dict[str, int]] = {}
        own: dict[str, dict[str, dict[str, int]]] = {}
        for (acct, strategy, contract), book in self.ledger.books.items():
            qty = book.quantity
            if qty:
                net = nets.setdefault(acct, {})
                net[contract] = net.get(contract, 0) + qty
                if strategy != EXTERNAL_STRATEGY:
                    line = own.setdefault(acct, {}).setdefault(strategy, {})
                    line[contract] = line.get(contract, 0) + qty
        accounts = {}
        for name, account in self.ruleset.accounts.items():
            positions = nets.get(name, {})
            for contract, qty in self.tracker.exposure(name).items():
                positions[contract] = positions.get(contract, 0) + qty
            for contract, qty in self._held.get(name, {}).items():  # decided, not dispatched yet (``hold``)
                positions[contract] = positions.get(contract, 0) + qty
            by_strategy = own.get(name, {})
            for extra in (self.tracker.strategy_exposure(name), self._held_by_strategy.get(name, {})):
                for strategy, lines in extra.items():
                    if strategy == EXTERNAL_STRATEGY:
                        continue
                    line = by_strategy.setdefault(strategy, {})
                    for contract, qty in lines.items():
                        line[contract] = line.get(contract, 0) + qty
            snap = self._snapshots.get(name)
            free = (snap.free_margin if snap is not None else Decimal(0)) - self._reserved(name)
            accounts[name] = AccountState(
                connected=account.broker not in down, free_margin=free, daily_pnl=self.risk.daily_pnl(name),
                positions={c: q for c, q in positions.items() if q}, halted=self.risk.halted(name), daily_pnl_at=now,
                halted_instruments=self.risk.halted_instruments(name),
                strategy_positions={s: held for s, lines in by_strategy.items()
                                    if (held := {c: q for c, q in lines.items() if q})})
        self._state = EngineState(accounts=accounts, paused=paused, portfolio_daily_pnl_at=now)
        return self._state
