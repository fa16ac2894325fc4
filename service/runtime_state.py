"""What the runtime's parts share: the state ``Runtime.__init__`` sets, declared once for the type checker.

``Runtime`` (``service.runtime``) is one object assembled from mixins, one per concern (``service.restore``,
``service.recovery``, ``service.flatten``, ``service.exits``, ``service.overtaken``), because its concerns act on
one state under one event loop: a flatten nets out the holds a webhook made, a come-up redoes the flattens a drop
made miss. Each mixin inherits ``RuntimeState``, whose annotations type the attributes it reads and whose stubs
type the methods it calls that live in another part; the class holding each method overrides the stub.
``RuntimeState`` itself holds no value and runs nothing: ``Runtime.__init__`` sets every attribute, and the type
checker holds the two to one type."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from brokers.base import AccountSnapshot, Fill
from engine.decision import Decision
from engine.model import Account, RuleSet
from engine.state import EngineState
from service.dispatch import Dispatcher, Job, OrderTracker
from service.ledger import Ledger
from service.pool import BrokerPool
from service.risk import RiskMonitor

if TYPE_CHECKING:
    from service.flatten import _Netted, _Owed, _Withheld
    from service.overtaken import _Overtaken
    from service.notify import Notifier


SIGNAL_FIELDS = ("strategy", "ticker", "action", "quantity", "order_type", "price", "position", "position_size",
                 "comment")


def _utc(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


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
    unsent: list[str] = field(default_factory=list)
    """Client order ids decided for a broker that was down or paused at the decision: never held, never sent,
    journaled ``missed`` with the signal (``Runtime.hold``)."""


class RuntimeState:
    """The attributes and cross-part methods of ``Runtime`` that its mixins use (see the module docstring)."""

    journal: Any
    watcher: Any
    """The rules watcher: its live generation is what a runtime-made decision record names (``ruleset``)."""
    clock: Any
    ledger: Ledger
    tracker: OrderTracker
    pool: BrokerPool | None
    dispatcher: Dispatcher | None
    risk: RiskMonitor
    alerts: list[dict[str, Any]]
    notifier: Notifier
    """Pushes alerts to the trader's chat (``service.notify``); a no-op unless configured."""
    catchups: list[dict[str, Any]]
    running: bool
    flatten_retry_delays_s: tuple[float, ...]
    _started_at: datetime | None
    _first_up: set[str]
    _recovering_at_start: set[str]
    _day_start_journaled: date | None
    _tasks: list[asyncio.Task[None]]
    _holds: dict[str, _Hold]
    _held_by_strategy: dict[str, dict[str, dict[str, int]]]
    _catch_up_guard: asyncio.Lock
    _catch_up_owed: dict[str, datetime | None]
    _redo_guard: asyncio.Lock
    _retry_runners: dict[str, asyncio.Task[None]]
    _retry_wake: dict[str, asyncio.Event]
    _retry_seen: dict[tuple[Any, ...], datetime]
    _netted: dict[str, list[_Netted]]
    _follow_ups: dict[str, int]
    _owed_follow_ups: dict[str, list[_Owed]]
    _withheld: dict[tuple[str, str], _Withheld] | None
    _withheld_pending: set[str]
    redo_tasks: set[asyncio.Task[Any]]
    _unreconciled: dict[str, dict[str, tuple[int, int]]]
    """Account (``on_mismatch: halt``) -> contract -> (ledger, broker) where its last reconciliation pass found the two
    disagreeing; an account leaves it when a pass finds them agreeing (``reconcile_broker``)."""

    def _rules_generation(self) -> int | None:
        """The live rules generation's number, what a runtime-made decision record names next to the content hash
        (None for a watcher without generations: tests' static rules)."""
        generation: int | None = getattr(self.watcher, "generation", None)
        return generation

    def _booked_rows(self, account: str, contract: str, also: str | None = None) -> list[dict[str, Any]]:
        """The journaled fills rows (adoptions among them) of ``account``'s ``contract`` that the ledger has booked,
        and ``also`` (a fill id being booked now), in time order: what ``Ledger.rebuild`` books again in the
        broker's order, and what an overtaken exit's fills are counted from (``_filled_when_overtaken``)."""
        seen = self.ledger.seen_fills
        return [row for row in self.journal.fills(account=account) if row["contract"] == contract
                and (f"{row['broker']}:{row['fill_id']}" in seen or f"{row['broker']}:{row['fill_id']}" == also)]

    # -- held in service.runtime -------------------------------------------------------------------------------
    @property
    def ruleset(self) -> RuleSet:
        raise NotImplementedError

    @property
    def engine(self) -> Any:
        raise NotImplementedError

    def _account(self, name: str) -> Account | None:
        raise NotImplementedError

    def _point_value(self, contract: str) -> Decimal:
        raise NotImplementedError

    def _mark(self, contract: str) -> Decimal | None:
        raise NotImplementedError

    def _job(self, order: dict[str, Any], strategy: str, signal_id: str, margin: Decimal | None = None) -> Job | None:
        raise NotImplementedError

    def hold(self, signal_id: str, decision: Decision, *, unavailable_missed: bool = True) -> None:
        raise NotImplementedError

    def release(self, signal_id: str) -> None:
        raise NotImplementedError

    def _take_hold(self, signal_id: str) -> list[Job] | None:
        raise NotImplementedError

    def _count_held(self, job: Job, sign: int) -> None:
        raise NotImplementedError

    def _state_with_up(self, now: datetime, brokers: set[str]) -> EngineState:
        raise NotImplementedError

    def _add_reservation(self, coid: str, reservation: _Reservation) -> None:
        raise NotImplementedError

    def _drop_reservation(self, coid: str) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Any) -> None:
        raise NotImplementedError

    def book_entry(self, *, fill_id: str, account: str, strategy: str, contract: str, signed_qty: int,
                   price: Decimal, commission: Decimal, at: datetime, manual: bool,
                   point_value: Decimal | None = None, day_book: bool = True) -> bool:
        raise NotImplementedError

    async def ingest_fill(self, broker: str, fill: Fill) -> bool:
        raise NotImplementedError

    def _set_snapshot(self, account: str, snapshot: AccountSnapshot) -> None:
        raise NotImplementedError

    async def _risk_event(self, name: str, kind: str, reason: str, source: str, now: datetime,
                          **extra: Any) -> None:
        raise NotImplementedError

    def _invalidate(self) -> None:
        raise NotImplementedError

    def _redo_once_open(self, broker: str) -> None:
        raise NotImplementedError

    # -- held in service.recovery ------------------------------------------------------------------------------
    async def reconcile_broker(self, broker: str, *, reason: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def _send_recovered(self, job: Job) -> None:
        raise NotImplementedError

    # -- held in service.restore -------------------------------------------------------------------------------
    def _restore_withheld(self) -> dict[tuple[str, str], _Withheld]:
        raise NotImplementedError

    # -- held in service.flatten -------------------------------------------------------------------------------
    async def _withheld_after_pass(self, broker: str, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    async def _redo_missed_flattens(self, broker: str, reconciled: list[dict[str, Any]] | None = None, *,
                                    why: str) -> list[str]:
        raise NotImplementedError

    def _wake_retries(self, broker: str) -> None:
        raise NotImplementedError

    def _follow_up(self, line: _Netted, left: int, what: str, *, covers: str) -> None:
        raise NotImplementedError

    def _hold_closing(self, key: str, account: str, strategy: str, contract: str, left: int) -> None:
        raise NotImplementedError

    def _line_stands(self, account: str, strategy: str, contract: str) -> int:
        raise NotImplementedError

    def _flatten_takes_over(self, accounts: set[str] | None, strategy: str | None,
                            roots: frozenset[str] | None) -> None:
        raise NotImplementedError

    def _standin_void(self, job: Job) -> bool:
        raise NotImplementedError

    def _unwatch_exit(self, client_order_id: str) -> None:
        raise NotImplementedError

    def _hold_owed(self, debt: _Owed) -> None:
        raise NotImplementedError

    # -- held in service.overtaken -----------------------------------------------------------------------------
    def _overtaken_window(self, broker: str) -> list[_Overtaken]:
        raise NotImplementedError

    def _overtaken_window_ends(self, ending: list[_Overtaken]) -> None:
        raise NotImplementedError
