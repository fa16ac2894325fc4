"""Everything behind the HTTP layer: brokers, dispatch, ledger, reconciliation, failover, risk and the schedule.

The webhook journals a signal with its orders (status ``new``) and answers; only then does it call ``dispatch``,
which hands the orders to per-broker queues (``service.dispatch``) without blocking. From there every state change
is journaled before it is acted on, fills feed the ledger (``service.ledger``) and the day book of the risk monitor
(``service.risk``), and ``engine_state`` serves the next decision from a cached view instead of a database query.

Recovery is the same code path at start-up and after a reconnect (``_recover``): orders the journal holds as in
flight are looked up at the broker by client order id; found, their state is adopted; not found, an order that
never left (``new``) or whose fate is unknown after a crash is sent (the broker holds none, so this cannot
duplicate), while an order whose request failed during a drop in this run becomes ``missed`` (catch-up converges
accounts that want it). Then the broker is reconciled, accounts with ``catch_up`` converge to their strategies'
last targets (or to flat, when a flatten fired meanwhile), and only then does the broker take new orders. Mirror
entries the engine skipped because their broker was down or paused are journaled as ``missed`` orders too (what
the account would have received), so the journal shows which accounts fell behind their strategy.

Missed flattens: a flatten (schedule, risk ``flatten_and_halt``, operator) sends its exits to every account holding
a position in scope; an exit whose broker was down or paused becomes ``missed`` (also one whose request failed in a
drop and that recovery then did not find at the broker). When that broker comes back (``_on_up``: after recovery
and reconciliation, before catch-up), every flatten of the current trading day with an exit missed there is carried
out now for those accounts, whatever their ``catch_up``: a flatten signal of its own, ``<flatten id>-redo-<broker>-
<n>``, with exits only (never blocked by risk or schedule: exits never are) for the positions in the original's
scope (account, strategy, roots) the account still holds after reconciliation, net of orders in flight, and never
more than the broker holds where the two disagree. The journaled id makes a second come-up a no-op; only when the
re-issue's own exits are missed again (the broker dropped once more) does the next come-up issue ``n + 1``. A broker
that comes back while an operator keeps it paused gets nothing, neither re-issued flattens nor catch-up, until
``resume_broker``, which does both, in that order, before it un-pauses. A pause is an operator's drop: what is
decided while it lasts is missed there, so the resume catches up from the moment of the pause, drop or no drop. An exit the broker *rejected* is not
re-issued by a come-up (a reconnect says nothing about why the broker refused): it is retried, below. A flatten of
an earlier trading day is not carried out, only warned about naming each position: the day it belonged to is over
(a schedule flatten guarded that session's close, a risk flatten that day's loss, whose halts lifted at 18:00 ET),
positions carried into the new day are part of its book, and closing them now would act at a time and price nobody
chose. Catch-up treats any journaled flatten after a strategy's last target (not only the schedule's) as voiding
that target (``_flattened_since``), so it never re-opens what a risk or operator flatten closed.

Rejected flatten exits: an exit of a flatten (any of the above, a re-issue, or a retry) that the broker rejects, or
cancels with quantity unfilled, is retried after a backoff (``FLATTEN_RETRY_DELAYS_S``: five attempts over about
two minutes), while the broker is connected and not paused, and only within the original's CME trading day: many
rejections are transient (Tradovate's TooLate or SessionClosed, a broker-side risk check timing out, a rate limit
answered as a reject), and a flatten left open is a position nobody meant to hold. A retry is a flatten signal of
its own, ``<flatten id>-retry-<broker>-<n>`` (``retry_of``), journaled before it is sent, its exits never blocked by
risk or schedule and sent through the dispatcher like the original's (held and superseding what is held in scope,
as any flatten). It never trusts the ledger alone: it reconciles the broker first, computes the exits for the
accounts owed in the original's scope as the redo does (net of orders in flight and of other flattens' held
exits), and never exits more than the broker holds, in any contract (``_clamp_to_broker``: a position closed by
hand at the broker is booked to no strategy, so the strategy's book alone would sell into a short). Nothing left to
close settles it with no order. What is owed is read from the journal (``_flatten_debts``): per account, the latest
of the original, its re-issues and its retries decides, so an account is owed a redo (missed exits: the come-up)
or a retry (rejected ones), never both; the two run under one lock and each nets out the other's exits in flight,
and a retry whose own exit is lost in a drop is redone by the come-up instead of retried as well. A broker that is
down or paused when a retry comes due gets it after its come-up (recovery, reconciliation, redo first) or resume;
a restart resumes the retries it owes the same way, their backoff counted from the come-up. When the retries run
out, or the trading day ends first, with something still held, the account's entries halt (exits never do): a
``flatten_failed`` risk event names the account, broker, contracts, quantities left and the last rejection, the
service logs it at ERROR, and the halt lasts like any other (restored after a restart, lifted by
``POST /api/halts/{name}/clear`` or the next trading day).

Decisions held when a flatten is computed: a webhook's (or catch-up's) orders count from their decision on
(``hold``) and leave only after the signal's journal commit (``dispatch``). A flatten (operator, risk, schedule)
supersedes every held order in its scope (account, strategy, roots): it is never sent and is journaled ``missed``
naming the flatten, in the flatten's own transaction when its signal is on disk already, else in the signal's own
transaction (``Journal.supersede``), so that no restart sends it either: a superseded order is never on disk as
``new`` next to the flatten, whatever order the two commits land in and whether or not a later write fails.
Without that, an entry decided just before the flatten would stay open after it, and a held exit would sell next
to the flatten's own exit (the account ends short). The flatten computes its exits from the ledger, the orders in
flight and the exits of other flattens still being journaled, and its own exits count (held) from that moment, so
that a signal or a flatten decided during its journal commit does not exit the same position again. Held orders
outside its scope go out as usual, and the answer the webhook gave stays as it was.

Orders in flight when a flatten is computed: the flatten counts them as if they will fill, also on a line the
ledger holds flat (an entry sent a moment ago), and exits the result at once, as the engine counts them too: from
that instant every decision sees the line flat, and no signal exits it a second time. An order that then does not
do what was counted (the broker rejects it, a paused or down broker makes it ``missed``, it fills in part) leaves
the line off flat by the difference: once the last order the flatten counted on a line settles (final, fills
booked), a follow-up exit for that difference, ``<flatten id>-follow-<n>``, is held in that same step (the engine's
view stays flat) and journaled and sent like the flatten's own exits (retried when rejected, re-issued when
missed). When the flatten's own exit on the line does not fill either, there is no follow-up: the retry or re-issue
of that exit recomputes the line from the ledger and the broker, which by then include what the orders in flight
really did. Orders decided after the flatten are not part of it: a new signal may open the line again. The watch is in
memory: a restart in the milliseconds between a flatten and the settling of what it counted on loses the
follow-up (reconciliation then shows the position).

Exposure: an entry reserves its margin from the moment it is dispatched until the broker resolves it *and* a
later account snapshot reflects the fill, so the free margin the engine sees never looks better than it is, even
when one broker confirms in 15 ms and another in 200 ms. Positions the engine sees include orders still in flight
and fills a broker confirmed but has not reported yet (``OrderTracker.unsettled``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Mapping

from brokers.base import AccountSnapshot, BrokerError, BrokerEvent, Fill, FillEvent, OrderEvent
from brokers.feed import PriceFeed
from engine.decision import Decision, client_order_id
from engine.model import Account, RuleSet
from engine.schedule import FLATTEN, Firing, firings
from engine.sessions import session, trading_day, trading_day_start
from engine.signal import parse_signal
from engine.state import AccountState, EngineState, contract_root
from engine.symbols import SymbolError, resolve
from service import reconcile
from service.dispatch import (
    CANCELLED,
    FILLED,
    FINAL,
    IN_FLIGHT,
    MISSED,
    NEW,
    PARTIALLY_FILLED,
    REJECTED,
    SENDING,
    UNKNOWN,
    WORKING,
    Dispatcher,
    Job,
    OrderTracker,
    Tracked,
    add_to_book,
    add_to_strategy_book,
)
from service.journal import parse_utc
from service.ledger import EXTERNAL_STRATEGY, Ledger, replay
from service.pool import BrokerPool
from service.risk import FLATTEN_AND_HALT, PORTFOLIO, Breach, RiskMonitor, halt_key, parse_halt_key
from service.scheduler import ScheduleExecutor

log = logging.getLogger(__name__)

RISK_TICK_S = 0.5
BROKER_START_WAIT_S = 10.0
"""How long the schedule's owed flattens and the risk monitor wait at start for brokers still connecting."""
MISSED_BY = frozenset({"connection", "paused"})
"""Skip reasons that make a mirror order ``missed``: the account wanted it, its broker was not there."""
SIGNAL_FIELDS = ("strategy", "ticker", "action", "quantity", "order_type", "price", "position", "position_size",
                 "comment")
SNAPSHOT_DEBOUNCE_S = 0.05
DAY_START = "day_start"
"""Risk event kind: the marks a trading day's book was opened at (``Runtime._open_day_book``)."""
REDO_LOOKBACK = timedelta(days=7)
"""How far back a broker's come-up looks for flattens it missed: enough to warn about one of the previous session
across a weekend or a holiday (only the current trading day's are carried out), without rereading all history."""
FLATTEN_RETRY_DELAYS_S: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0, 60.0)
"""Seconds from a flatten exit's rejection to each retry (``Runtime.flatten_retry_delays_s``; tests shorten it):
five attempts over about two minutes, long enough for a broker-side hiccup (a risk check timing out, a rate limit
answered as a reject) to pass, short enough that the position does not drift far past its flatten."""
FLATTEN_FAILED = "flatten_failed"
"""Risk event kind: a flatten's exits were rejected until its retries ran out (or its trading day ended); the
account's entries are halted (a halt like any other: restored after a restart, lifted by an operator or the next
trading day)."""


def _utc(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class _FlattenScope:
    """What a journaled flatten signal covered: None means every account / strategy / root."""

    account: str | None
    strategy: str | None
    roots: frozenset[str] | None
    redo_of: str | None
    """The original flatten's id when this one re-issues a missed flatten at a broker that came back."""
    retry_of: str | None = None
    """The original flatten's id when this one retries exits a broker rejected."""

    @property
    def origin(self) -> str | None:
        """The original flatten this one carries out again (None: it is an original)."""
        return self.redo_of or self.retry_of


def _flatten_scope(row: dict[str, Any]) -> _FlattenScope | None:
    """The scope of a journaled signal row if it is a flatten, else None."""
    body = row.get("signal") or {}
    if not isinstance(body, dict) or not body.get("flatten"):
        return None
    strategy = body.get("strategy")
    roots = body.get("instruments")
    return _FlattenScope(account=body.get("account") or None,
                         strategy=None if strategy in (None, "", "(flatten)") else str(strategy),
                         roots=None if roots is None else frozenset(str(r) for r in roots),
                         redo_of=body.get("redo_of") or None, retry_of=body.get("retry_of") or None)


def _redo_id(origin: str, broker: str, attempt: int) -> str:
    """The id of the ``attempt``-th re-issue of flatten ``origin`` at ``broker``: derived, so that a second come-up
    finds it journaled instead of flattening again."""
    return f"{origin}-redo-{broker}-{attempt}"


def _retry_id(origin: str, broker: str, attempt: int) -> str:
    """The id of the ``attempt``-th retry of flatten ``origin``'s rejected exits at ``broker`` (derived, like
    ``_redo_id``: the journal, not memory, says how many ran)."""
    return f"{origin}-retry-{broker}-{attempt}"


_MISSED_EXIT, _REJECTED_EXIT, _PENDING_EXIT, _SETTLED_EXIT = "missed", "rejected", "pending", "settled"


def _exit_outcome(orders: Iterable[dict[str, Any]]) -> str:
    """What one flatten signal's exits for one account at one broker came to (journaled order rows).

    Missed first: a redo closes everything in scope, the rejected exits' positions too. Then rejected (or
    cancelled with quantity unfilled, which is what a cancelled order is: a full fill ends ``filled``). Then still
    pending (the broker has not answered yet). Otherwise settled: filled, or nothing was left to close."""
    statuses = {str(o["status"]) for o in orders}
    if MISSED in statuses:
        return _MISSED_EXIT
    if statuses & {REJECTED, CANCELLED}:
        return _REJECTED_EXIT
    if statuses - FINAL:
        return _PENDING_EXIT
    return _SETTLED_EXIT


@dataclass
class _Debt:
    """What a broker's accounts are still owed of one flatten (``Runtime._flatten_debts``)."""

    origin: str
    row: dict[str, Any]
    """The original flatten's journaled signal row (its scope and time)."""
    missed: set[str] = field(default_factory=set)
    """Accounts whose latest exits there were missed: a redo owes them (``_redo_missed_flattens``)."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Account -> the id of the flatten signal whose exits there the broker rejected (or cancelled unfilled) and
    that no retry, redo or ``flatten_failed`` settled since: a retry owes them."""
    redos: int = 0
    retries: int = 0
    """How many re-issues and retries of the original are journaled at this broker."""
    reason: str | None = None
    """The last rejection's reason, as the broker gave it."""

    def state(self, broker: str) -> tuple[Any, ...]:
        """Changes with every attempt: what a retry's backoff counts from (``Runtime._retry_due``)."""
        return broker, self.origin, self.retries, tuple(sorted(self.rejected.items()))


def _outside(orders: list[dict[str, Any]],
             books: Mapping[tuple[str, str], Mapping[str, int]]) -> dict[tuple[str, str], int]:
    """Per (account, contract) of ``orders``: what the strategies that are NOT exiting it in this batch hold there
    (``books``: by account and contract, strategy -> signed quantity, lines booked to no strategy left out). The
    broker nets every strategy of an account; the part of its position the exiting strategies may close is its
    position less that (a strategy never closes another's; a manual trade, booked to no strategy, still caps)."""
    exiting: dict[tuple[str, str], set[str]] = {}
    for order in orders:
        exiting.setdefault((str(order["account"]), str(order["contract"])), set()).add(str(order["strategy"]))
    return {key: sum(q for strat, q in books.get(key, {}).items() if strat not in strategies)
            for key, strategies in exiting.items()}


def _clamp_exits(orders: list[dict[str, Any]], reconciled: dict[str, dict[str, Any]],
                 books: Mapping[tuple[str, str], Mapping[str, int]] | None = None) -> list[dict[str, Any]]:
    """Exits never larger than what the broker holds, on its side, in a contract where the reconciliation just run
    found the ledger and the broker disagreeing (an ``on_mismatch: halt`` account keeps its ledger): a flatten
    must close, never open or reverse. ``reconciled``: reconciliation rows by account. Other contracts agree with
    the broker (or have orders in flight, which the exits already net out) and pass unchanged. The broker's
    position there is first less what the account's strategies outside this batch hold (``_outside``)."""
    outside = _outside(orders, books or {})
    out = []
    left: dict[tuple[str, str], int] = {}
    for order in orders:
        account, contract = str(order["account"]), str(order["contract"])
        row = reconciled.get(account)
        if row is None or contract not in {m["contract"] for m in row.get("mismatches") or ()}:
            out.append(order)
            continue
        key = (account, contract)
        held = left.get(key, int((row.get("broker_positions") or {}).get(contract, 0)) - outside.get(key, 0))
        closable = held if order["side"] == "sell" else -held
        quantity = min(int(order["quantity"]), max(closable, 0))
        if quantity < int(order["quantity"]):
            log.error("%s %s: the ledger wants %s %s to close it, the broker holds %+d; exiting %d only",
                      account, contract, order["side"], order["quantity"], held, quantity)
        if quantity <= 0:
            continue
        left[key] = held - quantity if order["side"] == "sell" else held + quantity
        out.append({**order, "quantity": quantity})
    return out


def _clamp_to_broker(orders: list[dict[str, Any]], reconciled: dict[str, dict[str, Any]],
                     pending: dict[tuple[str, str], int],
                     books: Mapping[tuple[str, str], Mapping[str, int]] | None = None) -> list[dict[str, Any]]:
    """A retry's exits, each no larger than what the broker holds on its side in every contract, net of our orders
    there still in flight (``pending``: signed quantity left to fill, by account and contract), in exit order.

    Stricter than ``_clamp_exits``, which trusts the ledger where it agrees with the broker: a retry comes seconds
    to minutes after the rejection, time enough for someone to close the position at the broker by hand. Such a
    close is booked to no strategy (``EXTERNAL_STRATEGY``), so the account's total agrees with the broker while the
    strategy's book still shows the position; a sell computed from that book would open a short. ``reconciled``:
    rows of the reconciliation just run, by account; an account without one is not exited at all. The broker's
    position is first less what the account's strategies outside this batch hold, their orders in flight included
    (``_outside``: in an account that follows several strategies, each closes only its own)."""
    outside = _outside(orders, books or {})
    out = []
    left: dict[tuple[str, str], int] = {}
    for order in orders:
        account, contract = str(order["account"]), str(order["contract"])
        row = reconciled.get(account)
        key = (account, contract)
        if row is None:
            log.error("%s %s: not reconciled, so what the broker holds is unknown; not exited", account, contract)
            continue
        held = left.get(key, int((row.get("broker_positions") or {}).get(contract, 0)) + pending.get(key, 0)
                        - outside.get(key, 0))
        closable = held if order["side"] == "sell" else -held
        quantity = min(int(order["quantity"]), max(closable, 0))
        if quantity < int(order["quantity"]):
            log.warning("%s %s: the ledger wants %s %s to close it, the broker holds %+d (orders in flight "
                        "included); exiting %d only", account, contract, order["side"], order["quantity"], held,
                        quantity)
        if quantity <= 0:
            continue
        left[key] = held - quantity if order["side"] == "sell" else held + quantity
        out.append({**order, "quantity": quantity})
    return out


@dataclass
class _Netted:
    """A line (account, strategy, contract) a flatten closed while orders were still in flight on it.

    The flatten's own exit counted on them to fill what they had left (``Runtime._flatten_orders``), but an order in
    flight may yet fill in part, or never leave (rejected, or ``missed`` at a broker that is down or paused). Once
    every one of them has settled, what they filled since (``moved``) minus what was counted (``-base``) is what the
    flatten left open: a follow-up exit closes it (``Runtime._follow_up``). Orders decided after the flatten are not
    watched: a new signal may open the line again."""

    fid: str
    account: str
    strategy: str
    contract: str
    base: int
    """Minus the signed quantity the flatten counted the watched orders would still fill."""
    waiting: dict[str, int]
    """Client order id -> its filled quantity when the flatten computed; removed once the order is final."""
    moved: int = 0
    """Signed quantity the watched orders filled since the flatten."""
    own: str | None = None
    """The flatten's own exit on the line, if it has one: the follow-up is for what the orders in flight did
    differently, which assumes that exit filled. One that did not (rejected, cancelled, missed) is retried or
    re-issued from the ledger and the broker, which then include what the watched orders really did: no
    follow-up as well, or the two would close the same difference twice."""
    own_filled: bool | None = None


@dataclass
class _Reservation:
    account: str
    margin: Decimal
    resolved_at: datetime | None = None


@dataclass
class _Hold:
    """One signal's decided orders, counted as exposure until they are dispatched or the signal is dropped."""

    jobs: list[Job]
    reserved: list[str]
    """Client order ids whose margin reservation the hold made (an entry's, kept when it is dispatched)."""
    flatten: bool = False
    """A flatten's own exits, held while it is journaled: never superseded, and netted out by other flattens."""


class Runtime:
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
        self.pool: BrokerPool | None = None
        self.dispatcher: Dispatcher | None = None
        self.risk = RiskMonitor(self._mark, self._point_value)
        self._day_start_journaled: date | None = None
        """The trading day whose day-start marks are in the journal (``_journal_day_start``)."""
        self.scheduler: ScheduleExecutor | None = None
        self._snapshots: dict[str, AccountSnapshot] = {}
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
        self._started_at: datetime | None = None
        self._first_up: set[str] = set()
        self._recovering_at_start: set[str] = set()
        self._after_brokers: asyncio.Task[None] | None = None
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
        self._netted: dict[str, list[_Netted]] = {}
        """Client order id -> the flattened lines waiting for it to be final (``_Netted``)."""
        self._follow_ups: dict[str, int] = {}
        """Flatten id -> follow-ups issued so far (their ids: ``<flatten id>-follow-<n>``)."""
        """Orders decided and not handed to the dispatcher yet, by signal id (``hold``)."""
        self._held: dict[str, dict[str, int]] = {}
        """Per account and contract: the signed quantity of every held order (kept as holds come and go)."""
        self._held_by_strategy: dict[str, dict[str, dict[str, int]]] = {}
        """The same per account, strategy and contract (each strategy's decided orders, for its own position)."""
        self.alerts: list[dict[str, Any]] = []
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
        ruleset = self.ruleset
        fills = self.journal.fills()
        self.ledger = replay(fills, self._point_value)
        # Newest first, every one of the current trading day however busy it was: what start-up restores is of
        # today only (its day-start marks, the halts and the limits fired journaled with today's ``day``; every
        # halt the runtime journals carries its day, and one without a day never was restored).
        events = self.journal.risk_events_since(trading_day_start(self._started_at))
        await self._open_day_book(fills, self._started_at, events)
        booked: dict[Any, int] = {}
        for fill in fills:
            # A broker may leave the client order id off its fill reports: count by its own order id as well.
            key = fill.get("client_order_id") or (fill.get("broker"), fill.get("broker_order_id"))
            booked[key] = booked.get(key, 0) + int(fill["quantity"])
        self._load_open_orders(booked)
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
        tasks = self._tasks + list(self._snapshot_due.values()) + list(self._event_tasks)
        self._tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.pool is not None:
            await self.pool.stop()

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
        return Job(client_order_id=order["client_order_id"], signal_id=signal_id, strategy=strategy,
                   account=account.name, broker=order.get("broker") or account.broker,
                   broker_account=account.broker_account, contract=order["contract"], side=order["side"],
                   quantity=int(order["quantity"]), intent=order.get("intent") or "entry", margin_usd=margin)

    def _load_open_orders(self, booked: dict[Any, int]) -> None:
        """Every order not final in the journal becomes tracked again (in flight ones recover when their broker
        comes up); their strategies (the order's own, for a flatten's exits, else its signal's) attribute the fills
        still to come. ``booked``: contracts per client order id already in the ledger (replayed from the
        journal's fills)."""
        strategies: dict[str, str] = {}
        assert self._started_at is not None, "start() sets it first"
        rows = self.journal.orders(status=["new", "sending", "unknown", "acknowledged", "partially_filled"])
        # A broker's "filled" can be journaled before its fill report (they arrive as separate events): a crash in
        # between leaves a filled order whose fill is not in the ledger. Tracked again, the fill still to come (an
        # event, or reconciliation's fills_since) is booked to it instead of waiting forever as not ours yet.
        rows += [row for row in self.journal.orders(status=["filled"],
                                                    updated_since=self._started_at - timedelta(days=7))
                 if booked.get(row["client_order_id"], 0)
                 + booked.get((row.get("broker"), row.get("broker_order_id")), 0) < int(row["quantity"])]
        for row in rows:
            sid = row["signal_id"]
            if sid not in strategies:
                signal = self.journal.get_signal(sid) or {}
                strategies[sid] = signal.get("strategy") or (signal.get("decision") or {}).get("strategy") or \
                    EXTERNAL_STRATEGY
            job = self._job(row, row.get("strategy") or strategies[sid], sid)  # a flatten's exit: its own
            if job is None:
                continue
            filled = booked.get(job.client_order_id, 0) + booked.get((job.broker, row.get("broker_order_id")), 0)
            self.tracker.track(job, row["status"], row.get("broker_order_id"), filled=filled)
            if job.margin_usd > 0 and row["status"] not in FINAL:
                self._add_reservation(job.client_order_id, _Reservation(job.account, job.margin_usd))
            if row["status"] in IN_FLIGHT:
                self._recovering_at_start.add(job.client_order_id)

    def _restore_halts(self, events: list[dict[str, Any]]) -> None:
        """Halts of today survive a restart (they lift at the next trading day or by an operator), and so does
        which ``flatten_and_halt`` limits already flattened their scope today (``RiskMonitor.fired``), so that a
        restart neither flattens a scope twice nor forgets that a softer limit's halt must not stop a harder one.

        A halt restricted to roots comes back with its roots (the event row's JSON ``instruments``) under the same
        key (``key``; rows written before roots existed have neither and mean the bare name). A halt event
        flattened when it says so (``flattened``; rows written before that field: when its action was
        ``flatten_and_halt``); a later ``rearm`` event of the same limit and key undoes it. A ``flatten_failed``
        event halts its account like a ``halt`` event."""
        now = self.clock()
        today = trading_day(now).isoformat()
        cleared: set[str] = set()
        decided: set[tuple[str, str]] = set()
        for row in events:  # newest first
            name, kind = row.get("name"), row.get("kind")
            roots = row.get("instruments") or None
            key = str(row.get("key") or halt_key(str(name), roots))
            source, limit = str(row.get("source") or ""), row.get("limit")
            mine = str(row.get("day")) == today and bool(limit) and source == f"risk:{limit}"
            pair = (str(limit), key)
            if mine and kind == "rearm" and pair not in decided:
                decided.add(pair)
            elif mine and kind == "halt" and row.get("flattened", row.get("action") == FLATTEN_AND_HALT):
                self.risk.fire_count[pair] = self.risk.fire_count.get(pair, 0) + 1
                if pair not in decided:
                    decided.add(pair)
                    self.risk.fired.add(pair)
            if kind == "clear":
                cleared.add(key)
            elif kind in ("halt", FLATTEN_FAILED) and key not in cleared and key not in self.risk.halts \
                    and row.get("day"):
                if str(row["day"]) == today:
                    self.risk.halt(str(name), str(row.get("reason")), str(row.get("source")), now,
                                   instruments=roots)

    async def _open_day_book(self, fills: list[dict[str, Any]], now: datetime,
                             events: list[dict[str, Any]]) -> None:
        """Rebuild the risk monitor's day book as it would be had the process never stopped: the positions held
        when this trading day began, valued at the marks of that moment, then every fill of the day (realized P&L
        and commissions). Rebasing on the positions and marks of *now* instead would forget every loss taken
        earlier in the day, and a loss limit would allow it a second time.

        The day-start mark of a carried contract is the first of:

        - the one journaled when this day's book was opened (``day_start`` risk event): what the process that was
          running at 18:00 ET used;
        - the 17:00 ET daily mark of the previous session (``service.marks``), when the service was down at 18:00:
          the last price taken before the day began, and the market is closed in between, so it is the day's
          opening value but for a rare settlement adjustment;
        - the earliest fill price of the day in that contract: the price nearest to the day start we know;
        - the current mark, logged as a warning: the position's P&L between the day start and now is then lost
          (the service was down at 17:00 and at 18:00, and nothing in that contract filled since).

        The marks used are journaled as the day's (when none were), so that a later restart finds the same ones.
        """
        today = trading_day(now)
        before: list[dict[str, Any]] = []
        during: list[dict[str, Any]] = []
        for fill in fills:
            (before if trading_day(self._fill_time(fill)) < today else during).append(fill)
        opening = replay(before, self._point_value)
        held = sorted({key[2] for key, book in opening.books.items() if book.quantity})
        journaled = self._journaled_day_marks(today, events)
        marks: dict[str, Decimal] = {}
        basis: dict[str, str] = {}
        daily: dict[str, Decimal] | None = None
        for contract in held:
            if journaled is not None and contract in journaled:
                marks[contract], basis[contract] = journaled[contract], "journaled day start"
                continue
            if daily is None:
                daily = self._previous_daily_marks(today)
            first = next((f for f in during if f.get("contract") == contract and f.get("price") not in (None, "")),
                         None)
            current = self._mark(contract)
            if contract in daily:
                marks[contract], basis[contract] = daily[contract], "17:00 ET daily mark"
            elif first is not None:
                marks[contract], basis[contract] = Decimal(str(first["price"])), "earliest fill of the day"
            elif current is not None:
                marks[contract], basis[contract] = current, "current mark"
            else:
                basis[contract] = "average price (no mark known)"
            level = logging.INFO if contract in daily else logging.WARNING
            log.log(level, "risk: day-start mark of %s for %s: %s (%s)%s", contract, today,
                    marks.get(contract, "-"), basis[contract],
                    "; its P&L since the day began is not counted" if basis[contract].startswith(("current",
                                                                                                  "average")) else "")
        self.risk.open_day(today, opening, marks)
        for fill in during:
            contract = str(fill["contract"])
            qty = int(fill["quantity"])
            self.risk.apply_fill(fill_id=f"{fill['broker']}:{fill['fill_id']}", account=str(fill["account"]),
                                 strategy=str(fill.get("strategy") or EXTERNAL_STRATEGY), contract=contract,
                                 signed_qty=qty if str(fill["side"]) == "buy" else -qty,
                                 price=Decimal(str(fill["price"])),
                                 commission=Decimal(str(fill.get("commission") or 0)), at=self._fill_time(fill))
        if journaled is not None and set(held) <= set(journaled):
            self._day_start_journaled = today
        else:
            await self._journal_day_start(basis)

    @staticmethod
    def _fill_time(fill: dict[str, Any]) -> datetime:
        return parse_utc(str(fill.get("at") or fill.get("recorded_at")))

    @staticmethod
    def _journaled_day_marks(day: date, events: list[dict[str, Any]]) -> dict[str, Decimal] | None:
        """The day-start marks journaled for ``day`` (the newest ``day_start`` of ``events``), or None."""
        for row in events:  # newest first
            if row.get("kind") == DAY_START and str(row.get("day")) == day.isoformat():
                found = {}
                for contract, price in (row.get("marks") or {}).items():
                    try:
                        found[str(contract)] = Decimal(str(price))
                    except ArithmeticError:
                        log.warning("risk: journaled day-start mark %r of %s for %s unreadable", price, contract, day)
                return found
        return None

    def _previous_daily_marks(self, day: date) -> dict[str, Decimal]:
        """Contract prices of the 17:00 ET daily mark of the last session before trading day ``day`` began (a
        mark of an older session is stale: the prices moved in the sessions the service missed)."""
        previous = next((d for d in (day - timedelta(days=n) for n in range(1, 11)) if session(d) is not None),
                        None)
        if previous is None:
            return {}
        found: dict[str, Decimal] = {}
        for row in self.journal.daily_marks(since=previous):
            if row.get("trading_day") == previous.isoformat():
                for contract, price in (row.get("marks") or {}).items():
                    try:
                        found.setdefault(str(contract), Decimal(str(price)))
                    except ArithmeticError:
                        log.warning("risk: daily mark %r of %s on %s unreadable", price, contract, previous)
        return found

    async def _journal_day_start(self, basis: dict[str, str]) -> None:
        """Journal the marks the current day book was opened at, for a restart later in the day."""
        day = self.risk.day
        if day is None:
            return
        await self._risk_event(PORTFOLIO, DAY_START, f"trading day {day.isoformat()} began: positions carried in "
                               "are valued at these marks", "risk", self.clock(), day=day.isoformat(),
                               marks={c: str(m) for c, m in sorted(self.risk.day_marks.items())}, basis=basis)
        self._day_start_journaled = day

    # -- dispatch ----------------------------------------------------------------------------------------------
    def dispatch(self, signal_id: str, decision: Decision) -> None:
        """Hand the journaled orders of ``decision`` to their brokers' queues (returns at once). The signal's hold,
        if any, ends here: in the same step its orders become tracked, so they never stop counting. Orders a
        flatten superseded while they were held are not sent (``_supersede_holds``)."""
        assert self.dispatcher is not None, "Runtime.start() first"
        if signal_id not in self._holds:
            self.hold(signal_id, decision)  # a caller that did not hold (the engine's orders, reserved the same)
        self.dispatcher.submit_all(self._take_hold(signal_id) or [])
        missed = {s.account for s in decision.skipped if s.by in MISSED_BY}
        if missed and self._rule_mode(decision.rule) == "mirror":
            self._spawn(self._journal_missed(signal_id, missed))
        for cancel in decision.cancel:
            self._spawn(self._cancel_working(cancel.account, cancel.broker, cancel.instrument))
        self._invalidate()

    def hold(self, signal_id: str, decision: Decision) -> None:
        """Count ``decision``'s orders as exposure from now on, before their signal is journaled.

        Call it in the same synchronous step as the ``engine_state`` and ``decide`` that made them. The webhook
        awaits its journal commit before it dispatches, and catch-up too: a signal decided in between must see
        these orders, as positions (``max_contracts``, the portfolio's contracts, best mode's holders) and as
        reserved margin, or two concurrent "buy 3" pass a limit of 4 and two best-mode targets open the position at
        two accounts. The orders are not tracked yet: recovery sends the tracker's ``new`` orders, and an order
        must never leave before its signal is on disk. ``dispatch`` ends the hold; ``release`` drops it when the
        signal is not acknowledged. O(orders of the signal)."""
        if not decision.orders or signal_id in self._holds:
            return
        jobs, reserved = [], []
        for order in decision.orders:
            job = self._job(order.to_json(), decision.strategy, signal_id, order.margin_usd)
            if job is None:
                continue
            jobs.append(job)
            self._count_held(job, 1)
            if job.client_order_id not in self._reservations:
                self._reserve(job)
                if job.client_order_id in self._reservations:
                    reserved.append(job.client_order_id)
        self._holds[signal_id] = _Hold(jobs, reserved)
        self._invalidate()

    def release(self, signal_id: str) -> None:
        """Drop a hold whose orders will not be dispatched (the signal could not be journaled); no-op without one."""
        held = self._holds.get(signal_id)
        if held is None:
            return
        self._take_hold(signal_id)
        for coid in held.reserved:
            self._drop_reservation(coid)
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

    def _supersede_holds(self, fid: str, *, accounts: set[str] | None, strategy: str | None,
                         roots: frozenset[str] | None) -> dict[str, list[tuple[str, Job]]]:
        """Take the held orders in a flatten's scope out of their holds: they are never sent.

        A decision held now was made before the flatten (its signal awaits its journal commit, or its answer is
        being written); dispatched after it, its entry would reopen what the flatten closes, and its exit would
        sell a second time next to the flatten's own (a double exit: the account ends short). The flatten
        computes from the ledger and the orders in flight, never from held orders, so dropping them leaves it
        exact. Held orders outside the scope (other accounts, strategies or roots) go out as usual; the hold
        itself stays until ``dispatch`` or ``release`` ends it, or the dispatch would hold the decision anew.
        Returns the superseded orders by signal id (the flatten journals them ``missed`` with itself)."""
        superseded: dict[str, list[tuple[str, Job]]] = {}
        for sid, held in self._holds.items():
            if held.flatten:
                continue  # another flatten's exits: they close, and this flatten nets them out
            keep = []
            for job in held.jobs:
                if (accounts is not None and job.account not in accounts) or \
                        (strategy is not None and job.strategy != strategy) or \
                        (roots is not None and contract_root(job.contract) not in roots):
                    keep.append(job)
                    continue
                self._count_held(job, -1)
                if job.client_order_id in held.reserved:
                    held.reserved.remove(job.client_order_id)
                    self._drop_reservation(job.client_order_id)
                superseded.setdefault(sid, []).append((fid, job))
                log.warning("%s: %s %s %d %s superseded by flatten %s before it was sent; never sent", sid,
                            job.account, job.side, job.quantity, job.contract, fid)
            held.jobs = keep
        if superseded:
            self._invalidate()
        return superseded

    @staticmethod
    def _missed_row(job: Job) -> dict[str, Any]:
        """A superseded order as ``Journal.record_orders`` takes it."""
        return {"client_order_id": job.client_order_id, "account": job.account, "broker": job.broker,
                "contract": job.contract, "side": job.side, "quantity": job.quantity, "intent": job.intent,
                "margin_usd": job.margin_usd}

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
        self._invalidate()

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
        booked = self.ledger.apply(fill_id=fid, account=account, strategy=strategy, contract=fill.contract,
                                   signed_qty=signed, price=fill.price, commission=fill.commission,
                                   point_value=self._point_value(fill.contract))
        if booked:
            self.risk.apply_fill(fill_id=fid, account=account, strategy=strategy, contract=fill.contract,
                                 signed_qty=signed, price=fill.price, commission=fill.commission, at=fill.time)
        if tracked is not None and booked:
            self.tracker.book_fill(tracked.job.client_order_id, fill.quantity)
            status = FILLED if tracked.filled >= tracked.job.quantity else PARTIALLY_FILLED
            await self.tracker.transition(tracked.job.client_order_id, status,
                                          broker_order_id=fill.broker_order_id)
        self._refresh_snapshot_soon(broker, account)
        self._invalidate()
        return bool(new)

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

    # -- failover ----------------------------------------------------------------------------------------------
    async def _on_down(self, broker: str) -> None:
        self._invalidate()

    async def _on_up(self, broker: str) -> None:
        """The broker (re)connected: recover in-flight orders, reconcile, carry out the flattens it missed, catch
        up; then it takes orders again. While an operator keeps it paused, recovery and reconciliation run but the
        flattens and the catch-up wait for ``resume_broker``: the pause means "send nothing new there"."""
        first = broker not in self._first_up
        self._first_up.add(broker)
        await self._recover(broker)
        reconciled = await self.reconcile_broker(broker, reason="start-up" if first else "reconnect")
        # The first come-up after a start catches up what arrived while it was connecting (the service listened
        # meanwhile), not what an earlier process already handled; a reconnect catches up the whole day.
        catch_up = not first or self._started_at is not None
        since = self._started_at if first else None
        if self.pool is not None and self.pool[broker].admin_paused:
            log.info("broker %s is back but paused: the flattens it missed and its catch-up wait for its resume",
                     broker)
            if catch_up:
                self._owe_catch_up(broker, since)
        else:
            await self._redo_missed_flattens(broker, reconciled, why="start-up" if first else "reconnect")
            if catch_up:
                await self._catch_up(broker, since=self._owed_since(broker, since))
            self._wake_retries(broker)  # rejected flatten exits: retried once the broker is open again
        self._invalidate()

    def _owe_catch_up(self, broker: str, since: datetime | None) -> None:
        """Remember a catch-up a paused come-up skipped; two of them owe the wider of the two."""
        if broker in self._catch_up_owed:
            earlier = self._catch_up_owed[broker]
            since = None if earlier is None or since is None else min(earlier, since)
        self._catch_up_owed[broker] = since

    def _owed_since(self, broker: str, since: datetime | None) -> datetime | None:
        """The ``since`` of a catch-up about to run, widened by one a paused come-up left owed (now settled)."""
        if broker not in self._catch_up_owed:
            return since
        earlier = self._catch_up_owed.pop(broker)
        return None if earlier is None or since is None else min(earlier, since)

    async def _recover(self, broker: str) -> None:
        assert self.pool is not None and self.dispatcher is not None
        connector = self.pool.connector(broker)
        for tracked in list(self.tracker.orders.values()):
            job = tracked.job
            if job.broker != broker or tracked.status not in IN_FLIGHT:
                continue
            coid = job.client_order_id
            found = await connector.find_order(job.broker_account, coid)
            if found is not None:
                log.info("recovery: %s found at %s (%s); adopting", coid, broker, found.status.value)
                self._recovering_at_start.discard(coid)
                if tracked.status == NEW:
                    await self.tracker.transition(coid, SENDING, detail="recovery: found at the broker")
                await self.tracker.adopt(coid, found)
                continue
            # In flight when the last process died (its request may or may not have left): the lookup just said
            # the broker has none, so sending it now cannot duplicate it. It stays "crashed" until resolved, so a
            # drop during this very resend does not turn an acknowledged signal's order into "missed".
            crashed = coid in self._recovering_at_start
            if tracked.status == NEW or crashed:
                if tracked.status == SENDING:
                    await self.tracker.transition(coid, UNKNOWN, detail="recovery: not at the broker; resending")
                await self._send_recovered(job)
                if tracked.status not in IN_FLIGHT:
                    self._recovering_at_start.discard(coid)
            else:
                await self.tracker.transition(coid, MISSED, detail=(
                    f"not at broker {broker} after the connection came back; never sent"))

    async def _send_recovered(self, job: Job) -> None:
        """Send during recovery, before the broker is open to new orders (the lookup just found none)."""
        assert self.dispatcher is not None
        await self.dispatcher.send(job, recovering=True)

    # -- reconciliation ----------------------------------------------------------------------------------------
    async def _reconcile_loop(self, broker: str) -> None:
        while True:
            doc = self.ruleset.brokers.get(broker)
            await asyncio.sleep(doc.reconcile_every_seconds if doc else 60)
            if self.pool is None or not self.pool.available(broker):
                continue
            try:
                await self.reconcile_broker(broker, reason="periodic")
            except asyncio.CancelledError:
                raise
            except BrokerError as exc:
                log.warning("reconciliation of %s failed: %s", broker, exc)
            except Exception:
                log.exception("reconciliation of %s failed", broker)

    async def reconcile_broker(self, broker: str, *, reason: str) -> list[dict[str, Any]]:
        """Compare the ledger with the broker for each of its accounts; apply each account's policy."""
        assert self.pool is not None
        connector = self.pool.connector(broker)
        now = self.clock()
        since = trading_day_start(now) - timedelta(days=1)
        rows = []
        for account in sorted(self.ruleset.accounts.values(), key=lambda a: a.name):
            if account.broker != broker:
                continue
            for fill in await connector.fills_since(account.broker_account, since):
                await self.ingest_fill(broker, fill)
            for order in await connector.working_orders(account.broker_account):
                tracked = self.tracker.find(broker, order.client_order_id, order.broker_order_id)
                if tracked is not None:
                    await self.tracker.adopt(tracked.job.client_order_id, order)
            for tracked in list(self.tracker.orders.values()):
                if tracked.job.account == account.name and tracked.status in WORKING:
                    found = await connector.find_order(account.broker_account, tracked.job.client_order_id)
                    if found is not None:
                        await self.tracker.adopt(tracked.job.client_order_id, found)
            held = {p.contract: p.quantity for p in await connector.positions(account.broker_account) if p.quantity}
            self._set_snapshot(account.name, await connector.account_snapshot(account.broker_account))
            in_flux = {t.job.contract for t in self.tracker.unsettled() if t.job.account == account.name}
            mismatches = reconcile.compare_positions(self.ledger.account_positions(account.name), held, in_flux)
            row = {"broker": broker, "account": account.name, "ok": not mismatches, "reason": reason,
                   "policy": account.on_mismatch, "mismatches": [m.as_dict() for m in mismatches],
                   "broker_positions": held, "at": now}
            await self.journal.record_reconciliation(row)
            rows.append(row)
            await self._apply_policy(account, mismatches, now)
        self._invalidate()
        return rows

    async def _apply_policy(self, account: Account, mismatches: list[reconcile.Mismatch], now: datetime) -> None:
        halt = self.risk.halts.get(account.name)
        if not mismatches:
            if halt is not None and halt.source == "reconciliation":
                self.risk.clear(account.name)
                await self._risk_event(account.name, "clear", "reconciliation matches again", "reconciliation", now)
            return
        text = reconcile.describe(mismatches)
        if account.on_mismatch == reconcile.HALT:
            if halt is None:
                self.risk.halt(account.name, f"reconciliation mismatch: {text}", "reconciliation", now,
                               until_day_end=False)
                await self._risk_event(account.name, "halt", f"reconciliation mismatch: {text}", "reconciliation",
                                       now)
            return
        for m in mismatches:
            mark = self._mark(m.contract) or Decimal(0)
            self.ledger.adjust(account=account.name, contract=m.contract, to_quantity=m.broker, price=mark)
            self.risk.adjust(account.name, m.contract, m.broker)
        alert = {"account": account.name, "kind": "reconciliation_adopted", "detail": text, "at": _utc(now)}
        self.alerts.append(alert)
        log.warning("reconciliation: %s adopted the broker's positions (%s)", account.name, text)
        await self._risk_event(account.name, "adopt", f"adopted broker positions: {text}", "reconciliation", now)

    async def _risk_event(self, name: str, kind: str, reason: str, source: str, now: datetime,
                          **extra: Any) -> None:
        await self.journal.record_risk_event({"scope": "portfolio" if name == PORTFOLIO else "account",
                                              "name": name, "kind": kind, "reason": reason, "source": source,
                                              "day": trading_day(now).isoformat(), "at": now, **extra})

    # -- catch-up ----------------------------------------------------------------------------------------------
    def _last_targets(self) -> dict[str, dict[str, Any]]:
        """The last target-position signal per strategy, from the journal."""
        found: dict[str, dict[str, Any]] = {}
        for row in self.journal.recent_signals(1000):
            signal = row.get("signal") or {}
            strategy = signal.get("strategy")
            if row.get("status") in ("accepted", "decided") and strategy and strategy not in found \
                    and signal.get("position") is not None and not signal.get("catch_up"):
                found[strategy] = row
        return found

    async def _catch_up(self, broker: str, *, since: datetime | None = None) -> None:
        """Converge ``catch_up`` accounts at ``broker`` to their strategies' last targets of this trading day.

        Never into a position after a flatten time: when a flatten of the strategy fired since its last target
        (while the broker was away, so its exit was missed), the target is void and the accounts converge to flat
        instead. Entries the rules block now (schedule windows, halts) stay blocked: the engine decides.
        ``since``: only targets received from then on (a broker's first come-up after a start catches up what
        arrived while it was connecting, not what an earlier process already handled).
        """
        now = self.clock()
        accounts = [a for a in self.ruleset.accounts.values() if a.broker == broker and a.catch_up]
        if not accounts:
            return
        targets = self._last_targets()
        for strategy, row in targets.items():
            followers = [a for a in accounts if strategy in a.strategies]
            if not followers:
                continue
            received = parse_utc(str(row["received_at"]))
            if trading_day(received) != trading_day(now) or (since is not None and received < since):
                continue
            body = {k: v for k, v in (row.get("signal") or {}).items() if k in SIGNAL_FIELDS}
            flat = self._flattened_since(strategy, followers, received, now, ticker=body.get("ticker"))
            if flat:
                body.update(position="flat", position_size=0)
            sid = f"{row['id']}-catchup-{broker}-{self.pool[broker].reconnects if self.pool else 0}"
            if self.journal.get_signal(sid) is not None:
                continue
            try:
                signal = parse_signal({**body, "id": sid})
            except ValueError as exc:
                log.warning("catch-up of %s: stored signal no longer parses: %s", strategy, exc)
                continue
            # Decide, journal and track under one lock: two brokers coming back together (one network blip) must
            # not both decide before either's orders are in view, or best mode opens the position at each. The
            # sends happen after the lock, once the orders count as in flight.
            async with self._catch_up_guard:
                # The broker is connected but not yet open to new orders (its recovery): decide as if it were.
                decision = self.engine.decide(signal, self._state_with_up(now, {broker}), now)
                names = {a.name for a in followers}
                orders = tuple(o for o in decision.orders if o.account in names)
                self.catchups.append({"strategy": strategy, "signal": sid, "flat": flat,
                                      "orders": [o.to_json() for o in orders]})
                if not orders:
                    continue
                decision = Decision(signal_id=sid, strategy=strategy, rule=decision.rule,
                                    blocked_by=decision.blocked_by,
                                    reason=f"catch-up after {broker} reconnected: {decision.reason}", orders=orders)
                # Counted from the decision on (no await since it): a webhook deciding while this commits sees it.
                self.hold(sid, decision)
                try:
                    await self.journal.record_signal(
                        raw=json.dumps({**body, "catch_up": True}), remote=None, status="accepted",
                        reason="catch-up", key=None, signal={**body, "catch_up": True}, decision=decision.to_json(),
                        orders=[{**o.to_json(), "margin_usd": o.margin_usd} for o in orders], signal_id=sid, at=now)
                except BaseException:
                    self.release(sid)
                    raise
                # Held -> tracked in one step: the orders never stop counting; recovery sends them below.
                jobs = self._take_hold(sid) or []
                for job in jobs:
                    self.tracker.track(job)
                self._invalidate()
            for job in jobs:
                await self._send_recovered(job)

    def _flattened_since(self, strategy: str, accounts: Iterable[Account], since: datetime, now: datetime, *,
                         ticker: str | None = None) -> bool:
        """Did a flatten covering ``strategy`` at any of ``accounts`` happen after ``since`` (a target's arrival)?

        Any flatten counts, not only the schedule's: a risk ``flatten_and_halt`` or an operator's flatten voids the
        strategy's earlier target just as much, and catch-up must not put the position back. Both the schedule's
        firings (a flatten time passed even if no process fired it) and the journaled flatten signals are read;
        a redo of a missed flatten (``-redo-``) is not a flatten of its own (its original's time counts, or a
        target received between the two would be voided), nor is a retry of rejected exits (``-retry-``).
        ``ticker``: the target's, so that a flatten restricted to other roots does not void it (unknown: it does,
        the safe side)."""
        names = {a.name for a in accounts}
        for firing in firings(self.ruleset.schedule_rules, since + timedelta(microseconds=1),
                              now + timedelta(microseconds=1)):
            rule = firing.rule
            if firing.action != FLATTEN:
                continue
            if rule.strategies is not None and strategy not in rule.strategies:
                continue
            if rule.accounts is not None and not names & set(rule.accounts):
                continue
            return True
        root = None
        if ticker:
            try:
                root = resolve(ticker, now, self.ruleset.catalog).root
            except SymbolError:
                root = None
        for row in self.journal.recent_signals(1000):  # newest first
            received = parse_utc(str(row["received_at"]))
            if received <= since:
                break
            scope = _flatten_scope(row)
            if scope is None or received > now or scope.origin is not None:
                continue
            if scope.strategy is not None and scope.strategy != strategy:
                continue
            if scope.account is not None and scope.account not in names:
                continue
            if scope.roots is not None and root is not None and root not in scope.roots:
                continue
            return True
        return False

    # -- flatten -----------------------------------------------------------------------------------------------
    async def flatten(self, *, account: str | None = None, strategy: str | None = None, reason: str,
                      flatten_id: str | None = None, instruments: Iterable[str] | None = None) -> dict[str, Any]:
        """Close positions in scope with market orders (journaled first, like any order). Exits are never blocked;
        a broker that is down records its orders as missed and keeps its positions. ``instruments``: only
        positions in these roots (a loss limit restricted to roots breached), None for all. Orders in scope decided
        before and not dispatched yet (held) are superseded: never sent (``_supersede_holds``)."""
        roots = None if instruments is None else frozenset(instruments)
        now = self.clock()
        if account is not None and account not in self.ruleset.accounts:
            raise KeyError(f"no account named {account!r}")
        fid = flatten_id or f"flatten-{_utc(now)}-{account or '*'}-{strategy or '*'}"
        if self.journal.get_signal(fid) is not None:
            return {"signal_id": fid, "orders": [], "duplicate": True}
        accounts = None if account is None else {account}
        body: dict[str, Any] = {"flatten": True, "account": account, "strategy": strategy, "reason": reason}
        if roots is not None:
            body["instruments"] = sorted(roots)
        netted: list[_Netted] = []
        orders = self._flatten_orders(fid, accounts=accounts, strategy=strategy, roots=roots, netted=netted)
        for line in netted:  # before the first await: an order may become final at any moment after it
            for coid in [*line.waiting, *([line.own] if line.own else [])]:
                self._netted.setdefault(coid, []).append(line)
        try:
            decision = await self._issue_flatten(fid, body, orders, accounts=accounts, strategy=strategy,
                                                 roots=roots, now=now)
        except BaseException:
            for line in netted:
                for coid in [*line.waiting, *([line.own] if line.own else [])]:
                    watching = self._netted.get(coid, [])
                    if line in watching:
                        watching.remove(line)
                    if not watching:
                        self._netted.pop(coid, None)
            raise
        return {"signal_id": fid, "orders": decision["orders"], "reason": reason}

    async def _issue_flatten(self, fid: str, body: dict[str, Any], orders: list[dict[str, Any]], *,
                             accounts: set[str] | None, strategy: str | None, roots: frozenset[str] | None,
                             now: datetime, supersede: bool = True) -> dict[str, Any]:
        """Journal flatten ``fid`` (``body``: its scope) with ``orders`` (its exits, just computed) and hand them to
        the dispatcher; returns the decision record. The operator's, the risk monitor's and the schedule's flattens
        come here, and so does a retry of rejected exits.

        Call it in the step that computed ``orders`` (``_flatten_orders``): up to its first await it supersedes
        the held orders in scope and holds its own exits, so that a signal or another flatten decided while this
        one is journaled does not exit the same positions a second time, and nothing held in scope leaves.

        The superseded orders reach the disk ``missed`` in the flatten's own transaction when their signal is on
        disk already, and in the signal's transaction when it is written later (``Journal.supersede``): either way
        never ``new`` next to the flatten, where a restart's recovery would send them (an entry reopening what the
        flatten closed), and without waiting for a commit the flatten cannot see coming."""
        superseded = self._hold_flatten(fid, orders, accounts=accounts, strategy=strategy, roots=roots,
                                        supersede=supersede)
        return await self._send_flatten(fid, body, orders, superseded, now)

    def _hold_flatten(self, fid: str, orders: list[dict[str, Any]], *, accounts: set[str] | None,
                      strategy: str | None, roots: frozenset[str] | None,
                      supersede: bool) -> dict[str, list[tuple[str, Job]]]:
        """The synchronous half of ``_issue_flatten``: supersede what is held in scope, hold the exits."""
        superseded = self._supersede_holds(fid, accounts=accounts, strategy=strategy, roots=roots) \
            if supersede else {}
        jobs = [job for job in (self._job(o, str(o["strategy"]), fid, Decimal(0)) for o in orders) if job is not None]
        self._holds[fid] = _Hold(jobs, [], flatten=True)
        for job in jobs:
            self._count_held(job, 1)
        detail = f"superseded by flatten {fid}, computed while this order was held: never sent"
        for sid, voided in superseded.items():
            self.journal.supersede(sid, {job.client_order_id: detail for _fid, job in voided})
        self._invalidate()
        return superseded

    async def _send_flatten(self, fid: str, body: dict[str, Any], orders: list[dict[str, Any]],
                            superseded: dict[str, list[tuple[str, Job]]], now: datetime) -> dict[str, Any]:
        """The asynchronous half of ``_issue_flatten``: journal the flatten with what it superseded, then hand its
        held exits to the dispatcher."""
        detail = f"superseded by flatten {fid}, computed while this order was held: never sent"
        try:
            decision = await self._journal_flatten(fid, body, orders, now, superseded=[
                (sid, [self._missed_row(job) for _fid, job in voided], detail) for sid, voided in superseded.items()])
        except BaseException:
            for sid, voided in superseded.items():
                self.journal.withdraw_superseded(sid, [job.client_order_id for _fid, job in voided])
            self.release(fid)
            raise
        assert self.dispatcher is not None
        self.dispatcher.submit_all(self._take_hold(fid) or [])  # held -> tracked in one step
        self._invalidate()
        return decision

    def _flatten_orders(self, fid: str, *, accounts: set[str] | None, strategy: str | None,
                        roots: frozenset[str] | None, netted: list[_Netted] | None = None) -> list[dict[str, Any]]:
        """One market exit per (account, strategy, contract) held in scope, net of orders still in flight and of the
        exits of other flattens being journaled (held). Other held orders do not count: those in scope are
        superseded by this flatten (``_supersede_holds``), and the redo of a missed flatten runs for a broker that
        takes no new orders yet.

        Orders in flight count as if they will fill, also on a line the ledger holds flat (an entry the broker has
        not filled yet): that is what the engine counts too, so from this instant every decision sees the line
        flat, and no signal decided meanwhile exits it a second time. ``netted``, when given, receives every line
        with orders in flight: an order that then does not fill as counted (rejected, or ``missed`` at a broker that
        is down or paused) leaves the line off flat by its difference, which a follow-up exit closes, held in the
        step the last of them settles, so that the engine's view stays flat throughout (``_Netted``)."""
        pending: dict[tuple[str, str, str], int] = {}
        for held in self._holds.values():
            if held.flatten:
                for job in held.jobs:
                    key = (job.account, job.strategy, job.contract)
                    pending[key] = pending.get(key, 0) + job.quantity * job.sign
        in_flight: dict[tuple[str, str, str], list[Tracked]] = {}
        for t in self.tracker.unsettled():
            in_flight.setdefault((t.job.account, t.job.strategy, t.job.contract), []).append(t)
        lines = {key: book.quantity for key, book in self.ledger.items() if book.quantity}
        for key in in_flight:
            lines.setdefault(key, 0)
        orders = []
        for (acct, strat, contract), quantity in lines.items():
            if accounts is not None and acct not in accounts:
                continue
            if strategy is not None and strat != strategy:
                continue
            if roots is not None and contract_root(contract) not in roots:
                continue
            doc = self._account(acct)
            if doc is None:
                continue
            key = (acct, strat, contract)
            flying = in_flight.get(key, [])
            counted = sum((t.job.quantity - t.filled) * t.job.sign for t in flying)
            remaining = quantity + pending.get(key, 0) + counted
            coid = client_order_id(fid, acct, f"{strat}:{contract}")
            if netted is not None and flying:
                netted.append(_Netted(fid, acct, strat, contract, base=-counted,
                                      waiting={t.job.client_order_id: t.filled for t in flying},
                                      own=coid if remaining else None))
            if remaining == 0:
                continue
            orders.append({"account": acct, "broker": doc.broker, "contract": contract,
                           "side": "sell" if remaining > 0 else "buy", "quantity": abs(remaining), "intent": "exit",
                           "client_order_id": coid, "strategy": strat})
        return orders

    def _netted_settled(self, tracked: Tracked) -> None:
        """An order settled (``OrderTracker.settled_hooks``). One a flatten counted on: book what it filled since;
        the line's last one issues the follow-up if the line is not where the flatten left it to be (flat)."""
        coid = tracked.job.client_order_id
        if coid not in self._netted:
            return
        for line in self._netted.pop(coid, []):
            if coid == line.own:
                line.own_filled = tracked.status == FILLED
            else:
                line.moved += (tracked.filled - line.waiting.pop(coid, tracked.filled)) * tracked.job.sign
            if line.waiting or (line.own is not None and line.own_filled is None):
                continue
            if line.own_filled is False:
                log.info("%s: its exit on %s %s did not fill: retried or re-issued from the ledger, no follow-up",
                         line.fid, line.account, line.contract)
            elif line.base + line.moved != 0:
                self._follow_up(line)

    def _follow_up(self, line: _Netted) -> None:
        """Close what a flatten left open on ``line`` because orders in flight did not do what it counted on (an
        exit rejected or missed, an entry that filled after it): a flatten signal of its own, ``<flatten
        id>-follow-<n>``, scoped to the line, journaled and sent like the flatten's exits (a rejected or missed one
        is retried or re-issued like theirs). It supersedes nothing: orders held now were decided after the
        flatten, and a new signal may open the line again."""
        left = line.base + line.moved
        doc = self._account(line.account)
        if doc is None or left == 0:
            return
        n = self._follow_ups[line.fid] = self._follow_ups.get(line.fid, 0) + 1
        fid = f"{line.fid}-follow-{n}"
        root = contract_root(line.contract)
        reason = (f"follow-up of {line.fid}: orders in flight on {line.account} {line.contract} ({line.strategy}) "
                  f"ended {line.moved:+d} where the flatten counted on {-line.base:+d}; "
                  f"closing {left:+d}")
        body: dict[str, Any] = {"flatten": True, "account": line.account, "strategy": line.strategy,
                                "instruments": [root], "reason": reason, "follow_of": line.fid}
        order = {"account": line.account, "broker": doc.broker, "contract": line.contract,
                 "side": "sell" if left > 0 else "buy", "quantity": abs(left), "intent": "exit",
                 "client_order_id": client_order_id(fid, line.account, f"{line.strategy}:{line.contract}"),
                 "strategy": line.strategy}
        log.warning("%s: %s", fid, reason)
        # Held now, in the step that settled the line's last order: the engine sees the exit from this instant.
        self._hold_flatten(fid, [order], accounts={line.account}, strategy=line.strategy, roots=frozenset({root}),
                           supersede=False)

        async def send() -> None:
            try:
                await self._send_flatten(fid, body, [order], {}, self.clock())
            except Exception:
                log.exception("%s: follow-up of flatten %s not journaled; %s %s still holds %+d", fid, line.fid,
                              line.account, line.contract, left)

        self._spawn(send())

    async def _journal_flatten(self, fid: str, body: dict[str, Any], orders: list[dict[str, Any]],
                               now: datetime, *,
                               superseded: Iterable[tuple[str, list[dict[str, Any]], str]] = ()) -> dict[str, Any]:
        """Journal a flatten signal (``body``: its scope) with its exits; a flatten with none is journaled too
        (``decided``): its id is what makes a repeat of the same flatten a no-op. ``superseded``: (signal id,
        orders, detail) of held orders it superseded, journaled ``missed`` in the same transaction."""
        strategy, reason = body.get("strategy"), str(body.get("reason"))
        legs = [{k: v for k, v in o.items() if k != "strategy"} for o in orders]
        decision = {"signal_id": fid, "strategy": strategy or "(flatten)", "accepted": bool(orders), "rule": None,
                    "blocked_by": None, "reason": reason, "order_type": "market", "price": None,
                    "orders": legs, "skipped": [], "cancel": []}
        # The journaled orders keep each exit's strategy (the decision record's legs have no such field): a restart
        # with an exit still in flight must book its fill to the strategy it closes, not to "(flatten)".
        await self.journal.record_signal(raw=json.dumps(body), remote=None,
                                         status="accepted" if orders else "decided", reason=reason, key=None,
                                         signal={**body, "strategy": strategy or "(flatten)"}, decision=decision,
                                         orders=orders, signal_id=fid, at=now, missed=list(superseded))
        return decision

    async def _fire_schedule(self, firing: Firing) -> None:
        rule = firing.rule
        stamp = _utc(firing.at)
        accounts = list(rule.accounts) if rule.accounts else [None]
        strategies = list(rule.strategies) if rule.strategies else [None]
        for account in accounts:
            for strategy in strategies:
                await self.flatten(account=account, strategy=strategy, reason=f"schedule {rule.name} at {stamp}",
                                   flatten_id=f"flatten-{rule.name}-{stamp}-{account or '*'}-{strategy or '*'}")

    # -- flattens a broker missed ------------------------------------------------------------------------------
    def _missed_flattens(self, broker: str, now: datetime) -> list[tuple[str, dict[str, Any], int, set[str]]]:
        """Flattens whose exits at ``broker`` were missed and not re-issued since, oldest first: (the original
        flatten's id, its journaled row, the next attempt number, the accounts still owed).

        A re-issue (or a retry) is itself a flatten whose exits may be missed (the broker dropped again): then its
        accounts are owed once more, by the next attempt. A re-issue that reached them, or found nothing left to
        close, settles the original at this broker for good (``_flatten_debts``)."""
        return [(debt.origin, debt.row, debt.redos + 1, debt.missed)
                for debt in self._flatten_debts(broker, now) if debt.missed]

    def _flatten_debts(self, broker: str, now: datetime) -> list[_Debt]:
        """What ``broker``'s accounts are still owed of each flatten of the last ``REDO_LOOKBACK``, oldest first,
        read from the journal (so that a restart owes exactly what the process before it did).

        A flatten's family at a broker is the original and its journaled re-issues (``-redo-``) and retries
        (``-retry-``). For each account, the latest member that covered it (had exits for it there, or listed it
        as owed and found nothing left) decides (``_exit_outcome``): missed exits owe a redo, rejected ones a retry
        unless a ``flatten_failed`` event already gave up on that member, anything else nothing. One account is
        therefore owed a redo or a retry, never both, and never twice for the same outcome."""
        horizon = now - REDO_LOOKBACK
        sids: set[str] = set()
        for order in self.journal.orders(status=[MISSED, REJECTED, CANCELLED], updated_since=horizon):
            if order["broker"] == broker and order.get("intent") == "exit":
                sids.add(str(order["signal_id"]))
        origins: dict[str, dict[str, Any]] = {}
        for sid in sids:
            row = self.journal.get_signal(sid)
            scope = None if row is None else _flatten_scope(row)
            if row is None or scope is None:
                continue
            origin = scope.origin or sid
            if origin not in origins:
                first = row if origin == sid else self.journal.get_signal(origin)
                if first is not None:
                    origins[origin] = first
        failed = {(str(settled), str(row.get("name")))
                  for row in self.journal.risk_events_since(horizon, kinds=[FLATTEN_FAILED])
                  if row.get("broker") == broker for settled in row.get("settles") or ()}
        debts = []
        for origin, first in origins.items():
            debt = _Debt(origin, first)
            members = [(first, 0)]
            for rank, make in ((1, _redo_id), (2, _retry_id)):
                count = 0
                while (member := self.journal.get_signal(make(origin, broker, count + 1))) is not None:
                    members.append((member, rank))
                    count += 1
                if rank == 1:
                    debt.redos = count
                else:
                    debt.retries = count
            latest: dict[str, tuple[dict[str, Any], str, list[dict[str, Any]]]] = {}
            for member, _rank in sorted(members, key=lambda m: (str(m[0]["received_at"]), m[1])):
                exits: dict[str, list[dict[str, Any]]] = {}
                for order in member.get("orders") or ():
                    if order["broker"] == broker and order.get("intent") == "exit":
                        exits.setdefault(str(order["account"]), []).append(order)
                listed = (member.get("signal") or {}).get("accounts") if member is not first else None
                for account in set(exits) | {str(a) for a in listed or ()}:
                    mine = exits.get(account, [])
                    latest[account] = (member, _exit_outcome(mine), mine)
            for account, (member, outcome, mine) in sorted(latest.items()):
                if outcome == _MISSED_EXIT:
                    debt.missed.add(account)
                elif outcome == _REJECTED_EXIT and (str(member["id"]), account) not in failed:
                    debt.rejected[account] = str(member["id"])
                    last = max((o for o in mine if o["status"] in (REJECTED, CANCELLED)),
                               key=lambda o: str(o["updated_at"]))
                    debt.reason = str(last.get("detail") or last["status"])
            if debt.missed or debt.rejected:
                debts.append(debt)
        debts.sort(key=lambda d: str(d.row["received_at"]))
        return debts

    async def _redo_missed_flattens(self, broker: str, reconciled: list[dict[str, Any]] | None = None, *,
                                    why: str) -> list[str]:
        """Carry out, for ``broker``'s accounts, this trading day's flattens whose exits they missed (see the
        module docstring); returns the ids of the flatten signals journaled. The broker must be connected; its
        recovery ran (``reconciled``: the rows of the reconciliation that followed it; None: reconcile first, as
        after an operator's pause). Exits are sent as recovery sends (the broker is not open to new orders yet):
        a webhook's entry cannot slip in between and be closed by them."""
        async with self._redo_guard:
            now = self.clock()
            owed = self._missed_flattens(broker, now)
            if not owed:
                return []
            if reconciled is None:
                reconciled = await self.reconcile_broker(broker, reason=why)
            by_account = {str(row["account"]): row for row in reconciled}
            today = trading_day(now)
            journaled: list[str] = []
            jobs: list[Job] = []
            for origin, row, attempt, accounts in owed:
                scope = _flatten_scope(row)
                assert scope is not None
                received = parse_utc(str(row["received_at"]))
                if trading_day(received) != today:
                    for order in self._flatten_orders(origin, accounts=accounts, strategy=scope.strategy,
                                                      roots=scope.roots):
                        log.warning("flatten %s of trading day %s missed %s at %s, which still holds %s %+d %s "
                                    "(strategy %s); a new trading day began, so it is not carried out now: an "
                                    "operator decides", origin, trading_day(received).isoformat(),
                                    order["account"], broker, "long" if order["side"] == "sell" else "short",
                                    order["quantity"], order["contract"], order["strategy"])
                    continue
                rid = _redo_id(origin, broker, attempt)
                orders = _clamp_exits(self._flatten_orders(rid, accounts=accounts, strategy=scope.strategy,
                                                           roots=scope.roots), by_account,
                                      self._strategy_books(in_flight=False))
                reason = (f"{origin} missed at {broker} ({why}); re-issued for {', '.join(sorted(accounts))}: "
                          f"{row.get('reason') or 'flatten'}")
                body: dict[str, Any] = {"flatten": True, "account": scope.account, "strategy": scope.strategy,
                                        "reason": reason, "redo_of": origin, "broker": broker,
                                        "accounts": sorted(accounts)}
                if scope.roots is not None:
                    body["instruments"] = sorted(scope.roots)
                await self._journal_flatten(rid, body, orders, now)
                journaled.append(rid)
                log.warning("%s: %s", rid, reason if orders else f"{reason} (nothing left to close)")
                for order in orders:
                    job = self._job(order, str(order["strategy"]), rid, Decimal(0))
                    if job is not None:
                        self.tracker.track(job)  # counted as in flight before anything else decides
                        jobs.append(job)
                self._invalidate()
            for job in jobs:
                try:
                    await self._send_recovered(job)
                except BrokerError as exc:
                    # Still ``new``: the recovery of the next come-up looks it up and sends it.
                    log.warning("%s: exits not sent, %s dropped again (%s); the next come-up sends them",
                                job.signal_id, broker, exc)
                    break
            return journaled

    # -- flatten exits a broker rejected ----------------------------------------------------------------------
    def _wake_retries(self, broker: str) -> None:
        """Something may have changed what ``broker`` is owed (an exit rejected or cancelled, a come-up, a resume):
        let its retry task look again, starting one if none runs. Synchronous: status hooks call it."""
        if not self.running or self.pool is None or broker not in self.pool.slots:
            return
        wake = self._retry_wake.get(broker)
        if wake is None:
            wake = self._retry_wake[broker] = asyncio.Event()
        wake.set()
        task = self._retry_runners.get(broker)
        if task is None or task.done():
            task = asyncio.create_task(self._retry_loop(broker), name=f"flatten-retry-{broker}")
            self._retry_runners[broker] = task
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _retry_due(self, broker: str, debt: _Debt) -> datetime:
        """When the next retry of ``debt``'s rejected exits is due: its backoff after this process first saw the
        rejection (after a restart: after the broker's come-up); at once when the retries ran out
        (``_retry_flattens`` then gives up, after one more look at the broker)."""
        delays = self.flatten_retry_delays_s
        attempt = debt.retries + 1
        at = self._retry_seen.setdefault(debt.state(broker), self.clock())
        return at if attempt > len(delays) else at + timedelta(seconds=delays[attempt - 1])

    async def _retry_loop(self, broker: str) -> None:
        """Wait for the next retry due at ``broker`` and run it, until nothing is owed there. A broker that is down
        or paused ends the loop: its come-up (after recovery, reconciliation and the redo of missed exits) or its
        resume starts a new one, so a retry never races a come-up."""
        assert self.pool is not None
        slot = self.pool[broker]
        wake = self._retry_wake[broker]
        while self.running:
            wake.clear()  # before reading the journal: a rejection journaled from now on wakes the wait below
            if slot.recovering:
                await slot.settled.wait()
                continue
            if not slot.available:
                return
            try:
                now = self.clock()
                owed = [debt for debt in self._flatten_debts(broker, now) if debt.rejected]
                states = {debt.state(broker) for debt in owed}
                for state in [k for k in self._retry_seen if k[0] == broker and k not in states]:
                    del self._retry_seen[state]  # settled (or moved on to the next attempt)
                dues = [self._retry_due(broker, debt) for debt in owed]
                if not dues:
                    return
                wait = (min(dues) - now).total_seconds()
                if wait > 0:
                    try:
                        await asyncio.wait_for(wake.wait(), wait)
                    except TimeoutError:
                        pass
                    continue
                await self._retry_flattens(broker)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broker drop or a journal error: look again shortly
                pause = min(self.flatten_retry_delays_s or (1.0,))
                level = logging.WARNING if isinstance(exc, BrokerError) else logging.ERROR
                log.log(level, "flatten retries at %s failed (%s: %s); looking again in %gs", broker,
                        type(exc).__name__, exc, pause, exc_info=level == logging.ERROR)
                await asyncio.sleep(pause)

    async def _retry_flattens(self, broker: str) -> list[str]:
        """Retry, at ``broker``, the flatten exits it rejected whose backoff is over (see the module docstring);
        returns the ids of the retry signals journaled.

        Under the lock of the redo of missed flattens: the two never compute at once, and each nets out the
        other's exits in flight. The broker is reconciled first (the ledger alone may be stale: the position may
        have been closed at the broker meanwhile), and the exits never exceed what it holds (``_clamp_exits``)."""
        assert self.pool is not None
        async with self._redo_guard:
            if not self.pool.available(broker):
                return []
            now = self.clock()
            due = [d for d in self._flatten_debts(broker, now) if d.rejected and self._retry_due(broker, d) <= now]
            if not due:
                return []
            by_account = {str(row["account"]): row
                          for row in await self.reconcile_broker(broker, reason="flatten retry")}
            now = self.clock()
            journaled: list[str] = []
            for debt in due:
                scope = _flatten_scope(debt.row)
                assert scope is not None
                attempt = debt.retries + 1
                rid = _retry_id(debt.origin, broker, attempt)
                accounts = set(debt.rejected)
                orders = _clamp_to_broker(self._flatten_orders(rid, accounts=accounts, strategy=scope.strategy,
                                                               roots=scope.roots), by_account, self._in_flight_by(),
                                          self._strategy_books(in_flight=True))
                day = trading_day(parse_utc(str(debt.row["received_at"])))
                late = day != trading_day(now)
                if orders and (late or attempt > len(self.flatten_retry_delays_s)):
                    why = (f"its trading day {day.isoformat()} ended before the retries closed it" if late else
                           f"the broker rejected the exits and {attempt - 1} retries")
                    await self._flatten_failed(debt, broker, orders, now, why=why)
                    accounts -= {str(o["account"]) for o in orders}
                    if not accounts:
                        continue
                    orders = []  # the other accounts had nothing left: settled below, with no order
                body: dict[str, Any] = {
                    "flatten": True, "account": scope.account, "strategy": scope.strategy, "retry_of": debt.origin,
                    "broker": broker, "accounts": sorted(accounts),
                    "reason": (f"{debt.origin} rejected at {broker} for {', '.join(sorted(accounts))} "
                               f"({debt.reason or 'no reason given'}); retry {attempt}: "
                               f"{debt.row.get('reason') or 'flatten'}")}
                if scope.roots is not None:
                    body["instruments"] = sorted(scope.roots)
                if orders:
                    # A flatten of its own: held and superseding what is held in scope, like the original.
                    await self._issue_flatten(rid, body, orders, accounts=accounts, strategy=scope.strategy,
                                              roots=scope.roots, now=now)
                else:
                    await self._journal_flatten(rid, body, [], now)  # nothing left to close: settled, no order
                journaled.append(rid)
                log.warning("%s: %s%s", rid, body["reason"], "" if orders else " (nothing left to close)")
            return journaled

    def _strategy_books(self, *, in_flight: bool) -> dict[tuple[str, str], dict[str, int]]:
        """By (account, contract): each strategy's ledger book there (and, ``in_flight``, its orders not settled
        yet), never lines booked to no strategy: what ``_outside`` subtracts from a broker's position."""
        books: dict[tuple[str, str], dict[str, int]] = {}
        for (acct, strat, contract), book in self.ledger.books.items():
            if book.quantity and strat != EXTERNAL_STRATEGY:
                by = books.setdefault((acct, contract), {})
                by[strat] = by.get(strat, 0) + book.quantity
        if in_flight:
            for t in self.tracker.unsettled():
                job = t.job
                by = books.setdefault((job.account, job.contract), {})
                by[job.strategy] = by.get(job.strategy, 0) + (job.quantity - t.filled) * job.sign
        return books

    def _in_flight_by(self) -> dict[tuple[str, str], int]:
        """Signed quantity our orders not final yet may still fill, by account and contract (the broker's position
        does not show it yet; an order the broker reported filled is in that position already)."""
        found: dict[tuple[str, str], int] = {}
        for tracked in self.tracker.unsettled():
            if tracked.status not in FINAL:
                key = (tracked.job.account, tracked.job.contract)
                found[key] = found.get(key, 0) + (tracked.job.quantity - tracked.filled) * tracked.job.sign
        return found

    async def _flatten_failed(self, debt: _Debt, broker: str, orders: list[dict[str, Any]], now: datetime, *,
                              why: str) -> None:
        """Give up retrying ``debt``'s rejected exits for the accounts of ``orders`` (what they still hold in
        scope): journal a ``flatten_failed`` risk event each, log at ERROR, and halt their entries (exits stay
        allowed) until an operator clears the halt or the next trading day, as any halt."""
        for account in sorted({str(o["account"]) for o in orders}):
            legs = [o for o in orders if o["account"] == account]
            positions = [{"contract": o["contract"], "strategy": o["strategy"],
                          "quantity": int(o["quantity"]) if o["side"] == "sell" else -int(o["quantity"])}
                         for o in legs]
            held = ", ".join(f"{p['contract']} {p['quantity']:+d} ({p['strategy']})" for p in positions)
            text = (f"flatten {debt.origin} could not close {account} at {broker}: {why}; still held: {held}; "
                    f"last rejection: {debt.reason or 'no reason given'}")
            log.error("%s; entries halted until an operator clears the halt", text)
            halt = self.risk.halts.get(account)
            self.risk.halt(account, text, f"flatten:{debt.origin}", now,
                           until_day_end=halt is None or halt.day is not None)
            self.alerts.append({"account": account, "kind": FLATTEN_FAILED, "detail": text, "at": _utc(now)})
            self._invalidate()
            await self._risk_event(account, FLATTEN_FAILED, text, f"flatten:{debt.origin}", now, key=account,
                                   origin=debt.origin, broker=broker, settles=[debt.rejected[account]],
                                   contract=positions[0]["contract"], quantity=positions[0]["quantity"],
                                   positions=positions, last_reason=debt.reason, retries=debt.retries)

    # -- risk --------------------------------------------------------------------------------------------------
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
        slot = self.pool.resume(name)
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
        booked to no strategy (``EXTERNAL_STRATEGY``: fills we did not order, adopted by reconciliation) count in
        the net only: no strategy's target or exit is computed from them. One pass over the ledger's books, and
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
