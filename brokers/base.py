"""One normalized, async interface in front of every broker.

The engine and the service speak only these types. Each connector converts its broker's wire format at the edge:
times become aware UTC ``datetime``s, prices and money become ``Decimal``, positions become signed quantities,
and contracts are named by their CME code (``MESZ6``).

Exceptions form one tree, so callers can tell "the broker said no" from "we do not know what happened"::

    BrokerError
    +-- AuthError            login refused or token rejected; retrying with the same credentials will not help
    +-- OrderRejected        the broker refused the order; it does not exist at the broker
    +-- RateLimited          the broker asked us to wait ``retry_after_s`` seconds; nothing was done
    +-- BrokerUnavailable    not connected (paused, dropped, never connected); nothing was sent
    +-- OutcomeUnknown       the request may or may not have reached the broker (timeout, drop mid-request):
                             look the order up by client_order_id before doing anything else

Placement is idempotent by construction (``Connector.place_order``): after any ``OutcomeUnknown`` the connector
looks the order up by ``client_order_id`` and only resends when the broker has no such order. Connectors implement
the small ``_submit``/``_lookup`` primitives; the retry policy lives here once, for all of them.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, ClassVar, Mapping, Union

if TYPE_CHECKING:
    from engine.model import Broker

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """The one clock connectors read (aware UTC); tests may monkeypatch it."""
    return datetime.now(timezone.utc)


def require_utc(value: datetime, what: str) -> datetime:
    """Reject naive datetimes at construction: a naive time anywhere is a bug."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got naive {value!r}")
    return value.astimezone(timezone.utc)


class Side(str, enum.Enum):
    BUY = "buy"
    SELL = "sell"

    @property
    def sign(self) -> int:
        return 1 if self is Side.BUY else -1


class OrderType(str, enum.Enum):
    MARKET = "market"
    LIMIT = "limit"
    STOP = "stop"


class OrderStatus(str, enum.Enum):
    """The broker's view of an order, normalized."""

    PENDING = "pending"                    # received by the broker, not yet working
    WORKING = "working"                    # acknowledged and resting
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    EXPIRED = "expired"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        return self in (OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED, OrderStatus.EXPIRED)


@dataclass(frozen=True)
class OrderRequest:
    """What we ask a broker to do. ``account`` is the broker's own account id (``broker_account``)."""

    client_order_id: str
    account: str
    contract: str
    side: Side
    quantity: int
    order_type: OrderType = OrderType.MARKET
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    time_in_force: str = "day"

    def __post_init__(self) -> None:
        if self.quantity <= 0:
            raise ValueError(f"quantity must be > 0, got {self.quantity}")
        if self.order_type is OrderType.LIMIT and self.limit_price is None:
            raise ValueError("a limit order needs limit_price")
        if self.order_type is OrderType.STOP and self.stop_price is None:
            raise ValueError("a stop order needs stop_price")


@dataclass(frozen=True)
class Order:
    broker_order_id: str
    client_order_id: str | None
    account: str
    contract: str
    side: Side
    quantity: int
    filled_quantity: int
    status: OrderStatus
    order_type: OrderType
    created_at: datetime
    updated_at: datetime
    avg_fill_price: Decimal | None = None
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    reason: str | None = None
    """The broker's words when it rejected or cancelled the order."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "created_at", require_utc(self.created_at, "Order.created_at"))
        object.__setattr__(self, "updated_at", require_utc(self.updated_at, "Order.updated_at"))

    @property
    def remaining(self) -> int:
        return self.quantity - self.filled_quantity


@dataclass(frozen=True)
class Fill:
    fill_id: str
    broker_order_id: str
    client_order_id: str | None
    account: str
    contract: str
    side: Side
    quantity: int
    price: Decimal
    commission: Decimal
    time: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "time", require_utc(self.time, "Fill.time"))


@dataclass(frozen=True)
class Position:
    account: str
    contract: str
    quantity: int
    """Signed: long > 0, short < 0."""
    avg_price: Decimal
    unrealized_pnl: Decimal | None = None


@dataclass(frozen=True)
class AccountSnapshot:
    account: str
    cash_balance: Decimal
    margin_used: Decimal
    free_margin: Decimal
    realized_pnl: Decimal
    unrealized_pnl: Decimal
    time: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "time", require_utc(self.time, "AccountSnapshot.time"))


@dataclass(frozen=True)
class OrderEvent:
    order: Order


@dataclass(frozen=True)
class FillEvent:
    fill: Fill


@dataclass(frozen=True)
class ConnectionEvent:
    connected: bool
    reason: str
    time: datetime = field(default_factory=utcnow)


BrokerEvent = Union[OrderEvent, FillEvent, ConnectionEvent]


class BrokerError(Exception):
    """Base of every error a connector raises."""


class AuthError(BrokerError):
    pass


class OrderRejected(BrokerError):
    def __init__(self, reason: str, order: Order | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.order = order


class RateLimited(BrokerError):
    def __init__(self, retry_after_s: float, detail: str = "") -> None:
        super().__init__(f"rate limited, retry after {retry_after_s:g}s {detail}".strip())
        self.retry_after_s = retry_after_s


class BrokerUnavailable(BrokerError):
    pass


class OutcomeUnknown(BrokerError):
    pass


class Connector(abc.ABC):
    """An async connection to one broker (one Broker document), serving any of its accounts.

    Use as ``async with connector:`` or call ``connect()``/``close()``. Subclasses set ``type`` (the Broker
    document's ``type``) and implement the abstract primitives; ``place_order`` is final.
    """

    type: ClassVar[str]
    place_attempts: ClassVar[int] = 3

    def __init__(self, broker: "Broker", *, env: Mapping[str, str] | None = None, **options: Any) -> None:
        self.broker = broker
        self.env = os.environ if env is None else env
        self.options = options
        self._subscribers: list[asyncio.Queue[BrokerEvent]] = []

    def credential(self, field_name: str) -> str:
        """The value of a credential, read from the environment variable the Broker document names."""
        var = self.broker.credentials.get(field_name)
        if var is None:
            raise AuthError(f"broker {self.broker.name}: no credential {field_name!r} configured")
        value = self.env.get(var)
        if value is None:
            raise AuthError(f"broker {self.broker.name}: environment variable {var} is not set")
        return value

    async def __aenter__(self) -> "Connector":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- lifecycle -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    # -- orders ----------------------------------------------------------------------------------------------
    async def place_order(self, request: OrderRequest) -> Order:
        """Place ``request`` at most once, whatever the network does.

        Before every resend the broker is asked whether it already has ``client_order_id``; an order that
        reached the broker (even one that filled while we were disconnected) is returned, never sent again.
        ``RateLimited`` waits as the broker asks and retries the same request.
        """
        last: BrokerError | None = None
        for attempt in range(self.place_attempts):
            if attempt:
                existing = await self._lookup_after(last, request)
                if existing is not None:
                    return existing
            try:
                return await self._submit(request)
            except RateLimited as exc:
                last = exc
                log.warning("%s: %s; waiting before retrying %s", self.broker.name, exc, request.client_order_id)
                await asyncio.sleep(exc.retry_after_s)
            except OutcomeUnknown as exc:
                last = exc
                log.warning("%s: outcome of %s unknown (%s); looking it up", self.broker.name,
                            request.client_order_id, exc)
                await self._await_reachable()
        existing = await self._lookup_after(last, request)
        if existing is not None:
            return existing
        assert last is not None
        raise last

    async def _lookup_after(self, last: BrokerError | None, request: OrderRequest) -> Order | None:
        """Look ``request`` up after a failed attempt.

        If the earlier attempt's outcome was unknown, a lookup that fails too must not turn into
        ``BrokerUnavailable`` ("nothing was sent"): the order may exist, so the outcome stays unknown.
        """
        try:
            return await self.find_order(request.account, request.client_order_id)
        except OutcomeUnknown:
            raise
        except BrokerError as exc:
            if isinstance(last, OutcomeUnknown):
                raise OutcomeUnknown(f"{request.client_order_id}: sent, then the lookup failed ({exc})") from exc
            raise

    async def _await_reachable(self) -> None:
        """Hook: wait (briefly) until lookups can work again after a drop. Default: reconnect if needed."""
        if not self.connected:
            await self.connect()

    @abc.abstractmethod
    async def _submit(self, request: OrderRequest) -> Order:
        """Send ``request`` once. Raise OrderRejected, RateLimited, BrokerUnavailable or OutcomeUnknown."""

    @abc.abstractmethod
    async def find_order(self, account: str, client_order_id: str) -> Order | None:
        """The broker's order carrying ``client_order_id`` (or its equivalent tag), if any."""

    @abc.abstractmethod
    async def cancel_order(self, account: str, broker_order_id: str) -> Order: ...

    @abc.abstractmethod
    async def working_orders(self, account: str) -> list[Order]: ...

    # -- account state ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def positions(self, account: str) -> list[Position]: ...

    @abc.abstractmethod
    async def account_snapshot(self, account: str) -> AccountSnapshot: ...

    @abc.abstractmethod
    async def fills_since(self, account: str, since: datetime) -> list[Fill]: ...

    # -- events ----------------------------------------------------------------------------------------------
    def rate_limit_headroom(self) -> float:
        """Fraction (0..1) of the request budget still available right now; 1.0 when unlimited."""
        return 1.0

    async def events(self) -> AsyncIterator[BrokerEvent]:
        """Order updates, fills and connection changes, in the order the connector learned of them."""
        queue: asyncio.Queue[BrokerEvent] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    def subscribe(self) -> "asyncio.Queue[BrokerEvent]":
        """A queue that receives every future event (for consumers that prefer queues to async iteration)."""
        queue: asyncio.Queue[BrokerEvent] = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def _emit(self, event: BrokerEvent) -> None:
        for queue in list(self._subscribers):
            queue.put_nowait(event)


ConnectorFactory = Callable[..., Connector]
_REGISTRY: dict[str, type[Connector]] = {}


def register(cls: type[Connector]) -> type[Connector]:
    """Class decorator: make ``cls`` the connector for Broker documents of type ``cls.type``."""
    _REGISTRY[cls.type] = cls
    return cls


def connector_class(broker_type: str) -> type[Connector]:
    import brokers  # noqa: F401  (importing the package registers the built-in connectors)

    try:
        return _REGISTRY[broker_type]
    except KeyError:
        raise KeyError(f"no connector for broker type {broker_type!r}; known: {sorted(_REGISTRY)}") from None


def registered_types() -> list[str]:
    import brokers  # noqa: F401

    return sorted(_REGISTRY)


def make_connector(broker: "Broker", **kwargs: Any) -> Connector:
    """The connector for a Broker document, by its ``type``."""
    return connector_class(broker.type)(broker, **kwargs)
