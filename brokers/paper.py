"""The paper broker: a simulated futures broker behind the same ``Connector`` interface as the real ones.

It exists so demos, tests and dry runs exercise the same code paths as live trading, including the unpleasant ones:
acknowledgement and fill latency, partial fills, rejections, the broker's own rate limit, dropped connections and
answers lost in flight, and timestamps in the broker's odd convention (normalized at the connector's edge exactly
as a real connector does). Costs come from the Broker document (commissions per side, margin per contract) and
prices from the shared ``PriceFeed``, so routing between paper brokers compares what it would compare live.

Two halves, kept apart on purpose:

- ``PaperBook`` is the broker: accounts, orders, fills and positions in SQLite (``paper-<broker>.db`` in
  ``data_dir``, so state survives a restart; in memory without one). Synchronous and deterministic given a seed.
  It speaks "wire" records (plain dicts with broker-format timestamps), like an HTTP API would.
- ``PaperConnector`` is our side: connection state, client-side rate limiting, latency, and the conversion of wire
  records into ``Order``/``Fill``/``Position`` values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import sqlite_utils

from brokers.base import (
    AccountSnapshot,
    BrokerUnavailable,
    ConnectionEvent,
    Connector,
    Fill,
    FillEvent,
    Order,
    OrderEvent,
    OrderRejected,
    OrderRequest,
    OrderStatus,
    OrderType,
    OutcomeUnknown,
    Position,
    RateLimited,
    Side,
    register,
    utcnow,
)
from brokers.feed import PriceFeed, root_of
from brokers.ratelimit import BrokerRateLimiter
from brokers.timeconv import CONVENTIONS, format_broker_time, parse_broker_time, trading_day_start

log = logging.getLogger(__name__)

OPEN_STATUSES = (OrderStatus.PENDING.value, OrderStatus.WORKING.value, OrderStatus.PARTIALLY_FILLED.value)

# Columns named, not ``select *``: rows become dicts by zipping with a fixed tuple instead of reading the cursor's
# description per query, and an order row can be kept in memory after a write instead of being selected again.
ORDER_COLUMNS = ("broker_order_id", "client_order_id", "account", "contract", "side", "quantity", "filled_quantity",
                 "status", "order_type", "limit_price", "stop_price", "avg_fill_price", "reason", "created_at",
                 "updated_at")
FILL_COLUMNS = ("fill_id", "broker_order_id", "client_order_id", "account", "contract", "side", "quantity", "price",
                "commission", "pnl", "time")
_SELECT_ORDER = f"select {', '.join(ORDER_COLUMNS)} from orders"
_INSERT_ORDER = f"insert into orders ({', '.join(ORDER_COLUMNS)}) values ({', '.join('?' * len(ORDER_COLUMNS))})"
_INSERT_FILL = f"insert into fills ({', '.join(FILL_COLUMNS)}) values ({', '.join('?' * len(FILL_COLUMNS))})"
_NEXT_ID = ("insert into counters (name, value) values (?, 1) "
            "on conflict (name) do update set value = value + 1 returning value")
_WIRE_CACHE_SIZE = 4096
_UNREAD: Any = object()


@dataclass(frozen=True)
class PaperQuirks:
    """The Broker document's ``paper:`` section, with the schema's defaults."""

    seed: int | None = None
    ack_latency_ms: float = 0.0
    fill_latency_ms: float = 0.0
    partial_fill_rate: float = 0.0
    reject_rate: float = 0.0
    timestamps: str = "utc_iso"
    starting_cash: Decimal = Decimal(50000)
    price_feed: str = "default"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "PaperQuirks":
        opts = dict(options or {})
        unknown = set(opts) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown paper option(s): {', '.join(sorted(unknown))}")
        quirks = cls(
            seed=None if opts.get("seed") is None else int(opts["seed"]),
            ack_latency_ms=float(opts.get("ack_latency_ms", 0)),
            fill_latency_ms=float(opts.get("fill_latency_ms", 0)),
            partial_fill_rate=float(opts.get("partial_fill_rate", 0)),
            reject_rate=float(opts.get("reject_rate", 0)),
            timestamps=str(opts.get("timestamps", "utc_iso")),
            starting_cash=Decimal(str(opts.get("starting_cash", 50000))),
            price_feed=str(opts.get("price_feed", "default")),
        )
        if quirks.timestamps not in CONVENTIONS:
            raise ValueError(f"paper timestamps must be one of {', '.join(CONVENTIONS)}, got {quirks.timestamps!r}")
        for name in ("partial_fill_rate", "reject_rate"):
            if not 0 <= getattr(quirks, name) <= 1:
                raise ValueError(f"paper {name} must be within 0..1, got {getattr(quirks, name)}")
        return quirks


class DuplicateOrder(Exception):
    """The book already holds an order with this client_order_id for this account."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record["client_order_id"])
        self.record = record


def _iso(dt: datetime) -> str:
    """The book's storage format: fixed-width UTC ISO, so string order is time order in SQL."""
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


class PaperBook:
    """The simulated broker's books for one Broker document. Not async: each call is one broker-side step."""

    def __init__(self, broker_name: str, db: sqlite_utils.Database, feed: PriceFeed, quirks: PaperQuirks, *,
                 commission: Callable[[str], Decimal | None], margin: Callable[[str], Decimal | None],
                 rate_limit: tuple[int, float] | None, clock: Callable[[], datetime] = utcnow) -> None:
        self.broker_name = broker_name
        self.db = db
        self.feed = feed
        self.quirks = quirks
        self.commission = commission
        self.margin = margin
        self.clock = clock
        self.rng = random.Random(quirks.seed)
        self._realized: dict[str, tuple[str, int, Decimal]] = {}
        """Account -> (trading day start, last fill rowid summed, realized net P&L so far): ``_day_realized``."""
        self.rate_limit = rate_limit
        self._window: deque[float] = deque()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        # Faults injected by tests and harnesses.
        self.reject_next = 0
        self.partial_fill_next: deque[list[int]] = deque()
        self.rate_limit_next: deque[float] = deque()
        self.lose_next_place_response = 0
        self._wire_times: dict[str, str | int] = {}
        self._roots: dict[str, str] = {}
        self._roots_catalog: Any = None
        self._written: dict[str, Any] | None = None  # the order row this book wrote last, as stored
        self._create_tables()

    # -- storage ---------------------------------------------------------------------------------------------
    # sqlite_utils creates the tables; every call after that is plain SQL on its connection (sqlite3 keeps the
    # statements prepared), because sqlite_utils' writes introspect the schema on every call and cost ~10x more.
    def _create_tables(self) -> None:
        db = self.db
        tables = set(db.table_names())
        if "accounts" not in tables:
            db.table("accounts").create({"id": str, "cash": str, "created_at": str}, pk="id")
        if "orders" not in tables:
            db.table("orders").create({
                "broker_order_id": str, "client_order_id": str, "account": str, "contract": str, "side": str,
                "quantity": int, "filled_quantity": int, "status": str, "order_type": str, "limit_price": str,
                "stop_price": str, "avg_fill_price": str, "reason": str, "created_at": str, "updated_at": str,
            }, pk="broker_order_id")
            db.table("orders").create_index(["account", "client_order_id"], unique=True)
            db.table("orders").create_index(["status"])
        if "fills" not in tables:
            db.table("fills").create({
                "fill_id": str, "broker_order_id": str, "client_order_id": str, "account": str, "contract": str,
                "side": str, "quantity": int, "price": str, "commission": str, "pnl": str, "time": str,
            }, pk="fill_id")
            db.table("fills").create_index(["account", "time"])
        if "positions" not in tables:
            db.table("positions").create({"account": str, "contract": str, "quantity": int, "avg_price": str},
                                   pk=("account", "contract"))
        if "counters" not in tables:
            db.table("counters").create({"name": str, "value": int}, pk="name")

    def _root(self, contract: str) -> str:
        """``root_of`` against the feed's catalog, remembered per contract (it runs several times per order)."""
        catalog = self.feed.catalog
        if catalog is not self._roots_catalog:
            self._roots, self._roots_catalog = {}, catalog
        root = self._roots.get(contract)
        if root is None:
            root = self._roots[contract] = root_of(contract, catalog)  # unknown ones raise, never cached
        return root

    @property
    def _conn(self) -> sqlite3.Connection:
        return self.db.conn

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self._conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def _row(self, sql: str, params: Sequence[Any]) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction for the block, or part of the caller's when one is open (writes never autocommit)."""
        if self._conn.in_transaction:
            yield
        else:
            with self.db.atomic():
                yield

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        columns = ", ".join(row)
        marks = ", ".join("?" * len(row))
        self._conn.execute(f"insert into {table} ({columns}) values ({marks})", list(row.values()))

    def _next_id(self, name: str, prefix: str) -> str:
        conn = self._conn
        if conn.in_transaction:
            (value,), = conn.execute(_NEXT_ID, (name,)).fetchall()
        else:
            with self._transaction():
                (value,), = conn.execute(_NEXT_ID, (name,)).fetchall()
        return f"{prefix}{value}"

    def _begin(self) -> bool:
        """Open a transaction unless the caller's is open; True when this step owns it (and must commit it).

        A plain BEGIN/COMMIT rather than a context manager: this runs several times per order."""
        conn = self._conn
        if conn.in_transaction:
            return False
        conn.execute("BEGIN")
        return True

    def _end(self, owned: bool, ok: bool) -> None:
        if not owned:
            return
        conn = self._conn
        if ok:
            try:
                conn.execute("COMMIT")
            except BaseException:
                conn.rollback()
                raise
        elif conn.in_transaction:
            conn.rollback()

    def _ensure_account(self, account: str) -> dict[str, Any]:
        if not account:
            raise OrderRejected("account id is empty")
        row = self._row("select * from accounts where id = ?", [account])
        if row is None:
            row = {"id": account, "cash": str(self.quirks.starting_cash), "created_at": _iso(self.clock())}
            with self._transaction():
                self._insert("accounts", row)
        return row

    def _order_row(self, broker_order_id: str) -> dict[str, Any] | None:
        row = self._conn.execute(f"{_SELECT_ORDER} where broker_order_id = ?", (broker_order_id,)).fetchone()
        return None if row is None else dict(zip(ORDER_COLUMNS, row))

    def _position_row(self, account: str, contract: str) -> dict[str, Any] | None:
        return self._row("select * from positions where account = ? and contract = ?", [account, contract])

    # -- wire format -----------------------------------------------------------------------------------------
    def _wire_time(self, stored: str) -> str | int:
        """Stored ISO -> the broker's convention. Pure, so cached: an order's times are rendered many times."""
        cache = self._wire_times
        wire = cache.get(stored)
        if wire is None:
            wire = format_broker_time(datetime.fromisoformat(stored), self.quirks.timestamps)
            if len(cache) >= _WIRE_CACHE_SIZE:
                cache.clear()
            cache[stored] = wire
        return wire

    def _wire(self, row: dict[str, Any], *time_fields: str) -> dict[str, Any]:
        out = dict(row)
        for key in time_fields:
            out[key] = self._wire_time(out[key])
        return out

    def wire_order(self, row: dict[str, Any]) -> dict[str, Any]:
        return self._wire(row, "created_at", "updated_at")

    def wire_fill(self, row: dict[str, Any]) -> dict[str, Any]:
        return self._wire(row, "time")

    def server_time(self) -> str | int:
        return format_broker_time(self.clock(), self.quirks.timestamps)

    def _publish(self, kind: str, record: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener(kind, record)

    # -- requests --------------------------------------------------------------------------------------------
    def admit(self) -> None:
        """Count one request against the broker's limit; answer as a real broker would when it is exceeded."""
        if self.rate_limit_next:
            wait = self.rate_limit_next.popleft()
            raise RateLimited(wait, f"(paper broker {self.broker_name}: request throttled)")
        if self.rate_limit is None:
            return
        requests, per_seconds = self.rate_limit
        now = time.monotonic()
        while self._window and self._window[0] <= now - per_seconds:
            self._window.popleft()
        if len(self._window) >= requests:
            wait = self._window[0] + per_seconds - now
            raise RateLimited(max(wait, 0.001),
                              f"(paper broker {self.broker_name}: {requests} requests per {per_seconds:g}s exceeded)")
        self._window.append(now)

    def take_lost_response(self) -> bool:
        if self.lose_next_place_response:
            self.lose_next_place_response -= 1
            return True
        return False

    def _rejected(self, request: OrderRequest, reason: str) -> OrderRejected:
        now = self.clock()
        row = {
            "broker_order_id": self._next_id("rejected", "R"), "client_order_id": request.client_order_id,
            "account": request.account, "contract": request.contract, "side": request.side.value,
            "quantity": request.quantity, "filled_quantity": 0, "status": OrderStatus.REJECTED.value,
            "order_type": request.order_type.value, "limit_price": _str(request.limit_price),
            "stop_price": _str(request.stop_price), "avg_fill_price": None, "reason": reason,
            "created_at": _iso(now), "updated_at": _iso(now),
        }
        wire = self.wire_order(row)
        self._publish("order", wire)
        exc = OrderRejected(f"paper broker {self.broker_name}: {reason}")
        exc.wire = wire  # type: ignore[attr-defined]
        return exc

    def accept(self, request: OrderRequest) -> dict[str, Any]:
        """Validate and book ``request``; raise OrderRejected (nothing booked) or DuplicateOrder."""
        existing = self.find(request.account, request.client_order_id)
        if existing is not None:
            raise DuplicateOrder(existing)
        try:
            instrument = self.feed.catalog[self._root(request.contract)]
        except KeyError as exc:
            raise self._rejected(request, str(exc.args[0])) from None
        for what, price in (("limit", request.limit_price), ("stop", request.stop_price)):
            if price is not None and (price <= 0 or price % instrument.tick_size):
                raise self._rejected(request, f"{what} price {price} is not a positive multiple of the "
                                              f"{instrument.root} tick {instrument.tick_size}")
        if self.reject_next:
            self.reject_next -= 1
            raise self._rejected(request, "order rejected by risk check (injected)")
        if self.quirks.reject_rate and self.rng.random() < self.quirks.reject_rate:
            raise self._rejected(request, "order rejected (simulated reject_rate)")
        cash, held_rows = self._account_state(request.account)
        held_qty = 0
        for held in held_rows:
            if held["contract"] == request.contract:
                held_qty = int(held["quantity"])
                break
        added = abs(held_qty + request.side.sign * request.quantity) - abs(held_qty)
        if added > 0:
            need = (self.margin(instrument.root) or Decimal(0)) * added
            margin_used, unrealized = self._margin_of(held_rows)
            free = cash + unrealized - margin_used
            if need > free:
                raise self._rejected(request, f"insufficient margin: {need} needed, {free} free")
        now = _iso(self.clock())
        owned = self._begin()
        ok = False
        try:
            row = {
                "broker_order_id": self._next_id("orders", "P"), "client_order_id": request.client_order_id,
                "account": request.account, "contract": request.contract.upper(), "side": request.side.value,
                "quantity": request.quantity, "filled_quantity": 0, "status": OrderStatus.WORKING.value,
                "order_type": request.order_type.value, "limit_price": _str(request.limit_price),
                "stop_price": _str(request.stop_price), "avg_fill_price": None, "reason": None,
                "created_at": now, "updated_at": now,
            }
            self._conn.execute(_INSERT_ORDER, tuple(row.values()))
            ok = True
        finally:
            self._written = None
            self._end(owned, ok)
        if owned:
            self._written = row
        wire = self.wire_order(row)
        answer = dict(wire)  # the caller's own copy, whatever a listener does with the published one
        self._publish("order", wire)
        return answer

    def fill_plan(self, broker_order_id: str) -> list[int]:
        """How a market order will fill: injected parts, a random split (partial_fill_rate), or all at once."""
        row = self._order_row(broker_order_id)
        assert row is not None
        return self._plan(row)

    def _plan(self, row: dict[str, Any]) -> list[int]:
        remaining = int(row["quantity"]) - int(row["filled_quantity"])
        if self.partial_fill_next:
            parts = [p for p in self.partial_fill_next.popleft() if p > 0]
        elif remaining > 1 and self.quirks.partial_fill_rate and self.rng.random() < self.quirks.partial_fill_rate:
            first = self.rng.randint(1, remaining - 1)
            parts = [first, remaining - first]
        else:
            parts = [remaining]
        plan: list[int] = []
        for part in parts:
            take = min(part, remaining - sum(plan))
            if take > 0:
                plan.append(take)
        if sum(plan) < remaining:
            plan.append(remaining - sum(plan))
        return plan

    def fill_market(self, broker_order_id: str) -> dict[str, Any] | None:
        """Fill a market order now, part by part as ``fill_plan`` says (``fill_plan`` + ``fill`` in one step).

        Returns the order's wire record after its last part when that part filled (None otherwise), so a caller
        that needs the order's state does not read it back."""
        written = self._written
        row = written if written is not None and written["broker_order_id"] == broker_order_id else \
            self._order_row(broker_order_id)
        assert row is not None
        plan = self._plan(row)
        last: dict[str, Any] | None = None
        for index, part in enumerate(plan):
            if index:  # a listener may have acted on the order between parts: start from the stored row
                row = self._order_row(broker_order_id)  # type: ignore[assignment]
                assert row is not None
            done = self._fill_row(row, part, None)
            last = None if done is None else done[1]
        return last

    def fill(self, broker_order_id: str, quantity: int, price: Decimal | None = None) -> dict[str, Any] | None:
        """Fill ``quantity`` of an open order at ``price`` (default: the feed). Returns the wire fill."""
        row = self._order_row(broker_order_id)
        if row is None:
            return None
        done = self._fill_row(row, quantity, price)
        return None if done is None else done[0]

    def _fill_row(self, row: dict[str, Any], quantity: int,
                  price: Decimal | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Fill the order stored as ``row`` (current); returns (wire fill, a copy of the order's new wire record)."""
        if row["status"] not in OPEN_STATUSES:
            return None
        quantity = min(quantity, int(row["quantity"]) - int(row["filled_quantity"]))
        if quantity <= 0:
            return None
        broker_order_id = row["broker_order_id"]
        contract, account, side = row["contract"], row["account"], Side(row["side"])
        root = self._root(contract)
        instrument = self.feed.catalog[root]
        price = self.feed.price(root) if price is None else price
        commission = (self.commission(instrument.root) or Decimal(0)) * quantity
        filled = int(row["filled_quantity"]) + quantity
        previous_avg = _dec(row["avg_fill_price"]) or Decimal(0)
        avg = (previous_avg * int(row["filled_quantity"]) + price * quantity) / filled
        status = OrderStatus.FILLED if filled == int(row["quantity"]) else OrderStatus.PARTIALLY_FILLED
        avg_text = str(_tidy(avg))
        now = _iso(self.clock())
        conn = self._conn
        owned = self._begin()  # position, cash, fill and order move together or not at all
        ok = False
        try:
            state = conn.execute(
                "select a.cash, p.quantity, p.avg_price from accounts a left join positions p "
                "on p.account = a.id and p.contract = ? where a.id = ?", (contract, account)).fetchone()
            if state is None:  # no account row (not opened by accept): open it as the position moves
                pnl = self._apply_position(account, contract, side.sign * quantity, price, instrument.point_value)
                cash_before = Decimal(self._ensure_account(account)["cash"])
            else:
                held = None if state[1] is None else {"quantity": state[1], "avg_price": state[2]}
                pnl = self._apply_position(account, contract, side.sign * quantity, price, instrument.point_value,
                                           held=held)
                cash_before = Decimal(state[0])
            cash = cash_before + pnl - commission
            conn.execute("update accounts set cash = ? where id = ?", (str(cash), account))
            fill = {
                "fill_id": self._next_id("fills", "F"), "broker_order_id": broker_order_id,
                "client_order_id": row["client_order_id"], "account": account, "contract": contract,
                "side": side.value, "quantity": quantity, "price": str(price), "commission": str(commission),
                "pnl": str(pnl), "time": now,
            }
            conn.execute(_INSERT_FILL, tuple(fill.values()))
            conn.execute(
                "update orders set filled_quantity = ?, avg_fill_price = ?, status = ?, updated_at = ? "
                "where broker_order_id = ?", (filled, avg_text, status.value, now, broker_order_id))
            ok = True
        finally:
            self._written = None
            self._end(owned, ok)
        # The order as just written (the same values a read-back would return).
        updated = {**row, "filled_quantity": filled, "avg_fill_price": avg_text, "status": status.value,
                   "updated_at": now}
        if owned:
            self._written = updated
        wire_fill = self.wire_fill(fill)
        answer = dict(wire_fill)
        self._publish("fill", wire_fill)
        wire_order = self.wire_order(updated)
        order_answer = dict(wire_order)
        self._publish("order", wire_order)
        return answer, order_answer

    def _apply_position(self, account: str, contract: str, signed_qty: int, price: Decimal,
                        point_value: Decimal, *, held: Any = _UNREAD) -> Decimal:
        """Net a fill into the position; returns the gross P&L it realized. ``held``: the position row when the
        caller has just read it (None: no position), else it is read here."""
        if held is _UNREAD:
            held = self._position_row(account, contract)
        qty = 0 if held is None else int(held["quantity"])
        avg = Decimal(0) if held is None else Decimal(held["avg_price"])
        realized = Decimal(0)
        if qty == 0 or (qty > 0) == (signed_qty > 0):
            new_qty = qty + signed_qty
            new_avg = (avg * abs(qty) + price * abs(signed_qty)) / abs(new_qty)
        else:
            closed = min(abs(qty), abs(signed_qty))
            direction = 1 if qty > 0 else -1
            realized = (price - avg) * closed * direction * point_value
            new_qty = qty + signed_qty
            new_avg = avg if new_qty and (new_qty > 0) == (qty > 0) else price
        if new_qty == 0:
            self._conn.execute("delete from positions where account = ? and contract = ?", [account, contract])
        else:
            self._conn.execute(
                "insert into positions (account, contract, quantity, avg_price) values (?, ?, ?, ?) "
                "on conflict (account, contract) do update set quantity = excluded.quantity, "
                "avg_price = excluded.avg_price", [account, contract, new_qty, str(_tidy(new_avg))])
        return realized

    def manual_trade(self, account: str, contract: str, side: Side, quantity: int,
                     client_order_id: str) -> dict[str, Any]:
        """A market order another client of the broker placed (the trader in the broker's own platform), filled
        at once in full at the feed's price; returns its wire fill. It is the broker's, not our session's: the
        faults injected for our connection (``reject_next``, ``reject_rate``, partial fills, the rate limit) do not
        apply to it. Its order and fill are published like any (they reach our fill stream while we are
        connected) and listed by ``fills_since`` (what reconciliation books after a drop)."""
        if quantity <= 0:
            raise ValueError(f"manual trade of {quantity} {contract}: the quantity must be positive")
        existing = self.find(account, client_order_id)
        if existing is not None:
            raise DuplicateOrder(existing)
        self._ensure_account(account)
        self._root(contract)  # an unknown contract raises here, before anything is booked
        now = _iso(self.clock())
        row = {"broker_order_id": self._next_id("orders", "P"), "client_order_id": client_order_id,
               "account": account, "contract": contract.upper(), "side": side.value, "quantity": quantity,
               "filled_quantity": 0, "status": OrderStatus.WORKING.value, "order_type": OrderType.MARKET.value,
               "limit_price": None, "stop_price": None, "avg_fill_price": None, "reason": None,
               "created_at": now, "updated_at": now}
        self._written = None
        with self._transaction():
            self._conn.execute(_INSERT_ORDER, tuple(row.values()))
        self._publish("order", self.wire_order(row))
        done = self._fill_row(row, quantity, None)
        assert done is not None
        return done[0]

    def cancel(self, account: str, broker_order_id: str) -> dict[str, Any]:
        row = self._order_row(broker_order_id)
        if row is None or row["account"] != account:
            raise OrderRejected(f"paper broker {self.broker_name}: no order {broker_order_id} in account {account}")
        if row["status"] == OrderStatus.CANCELLED.value:
            return self.wire_order(row)
        if row["status"] not in OPEN_STATUSES:
            raise OrderRejected(f"paper broker {self.broker_name}: order {broker_order_id} is already "
                                f"{row['status']}, cannot cancel")
        self._written = None
        with self._transaction():
            self._conn.execute("update orders set status = ?, reason = ?, updated_at = ? where broker_order_id = ?",
                               [OrderStatus.CANCELLED.value, "cancelled by request", _iso(self.clock()),
                                broker_order_id])
        updated = self.wire_order(self._order_row(broker_order_id) or {})
        self._publish("order", updated)
        return updated

    def check_resting(self, root: str | None = None) -> list[dict[str, Any]]:
        """Fill resting limit/stop orders the current price has crossed (all roots, or one)."""
        fills = []
        rows = self._rows(
            "select * from orders where status in (?, ?, ?) and order_type != ? order by broker_order_id",
            [*OPEN_STATUSES, OrderType.MARKET.value])
        for row in rows:
            contract = row["contract"]
            if root is not None and root_of(contract, self.feed.catalog) != root:
                continue
            price = self.feed.price(contract)
            side = Side(row["side"])
            if row["order_type"] == OrderType.LIMIT.value:
                limit = Decimal(row["limit_price"])
                triggered = price <= limit if side is Side.BUY else price >= limit
            else:
                stop = Decimal(row["stop_price"])
                triggered = price >= stop if side is Side.BUY else price <= stop
            if triggered:
                fill = self.fill(row["broker_order_id"], int(row["quantity"]) - int(row["filled_quantity"]), price)
                if fill is not None:
                    fills.append(fill)
        return fills

    def open_market_orders(self) -> list[str]:
        return [r["broker_order_id"] for r in self._rows(
            "select broker_order_id from orders where status in (?, ?, ?) and order_type = ?",
            [*OPEN_STATUSES, OrderType.MARKET.value])]

    # -- queries ---------------------------------------------------------------------------------------------
    def find(self, account: str, client_order_id: str) -> dict[str, Any] | None:
        row = self._conn.execute(f"{_SELECT_ORDER} where account = ? and client_order_id = ?",
                                 (account, client_order_id)).fetchone()
        return None if row is None else self.wire_order(dict(zip(ORDER_COLUMNS, row)))

    def order(self, broker_order_id: str) -> dict[str, Any] | None:
        row = self._order_row(broker_order_id)
        return None if row is None else self.wire_order(row)

    def order_count(self, account: str, client_order_id: str) -> int:
        return self._conn.execute("select count(*) from orders where account = ? and client_order_id = ?",
                                  [account, client_order_id]).fetchone()[0]

    def working(self, account: str) -> list[dict[str, Any]]:
        return [self.wire_order(r) for r in self._rows(
            "select * from orders where account = ? and status in (?, ?, ?) order by broker_order_id",
            [account, *OPEN_STATUSES])]

    def fills_since(self, account: str, since: datetime) -> list[dict[str, Any]]:
        return [self.wire_fill(r) for r in self._rows(
            "select * from fills where account = ? and time >= ? order by time, fill_id", [account, _iso(since)])]

    def positions(self, account: str) -> list[dict[str, Any]]:
        return self._marked(self._rows("select * from positions where account = ? order by contract", [account]))

    def _marked(self, position_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in position_rows:
            root = self._root(row["contract"])
            instrument = self.feed.catalog[root]
            mark = self.feed.price(root)
            unrealized = (mark - Decimal(row["avg_price"])) * int(row["quantity"]) * instrument.point_value
            out.append({**row, "mark": str(mark), "unrealized": str(unrealized)})
        return out

    def _account_state(self, account: str) -> tuple[Decimal, list[dict[str, Any]]]:
        """Cash and position rows (by contract) of ``account`` in one query; the account is opened if new."""
        rows = self._conn.execute(
            "select a.cash, p.contract, p.quantity, p.avg_price from accounts a left join positions p "
            "on p.account = a.id where a.id = ? order by p.contract", (account,)).fetchall()
        if not rows:
            return Decimal(self._ensure_account(account)["cash"]), []
        return Decimal(rows[0][0]), [{"account": account, "contract": contract, "quantity": quantity,
                                      "avg_price": avg_price}
                                     for _cash, contract, quantity, avg_price in rows if contract is not None]

    def _margin_of(self, position_rows: list[dict[str, Any]]) -> tuple[Decimal, Decimal]:
        """Margin used and unrealized P&L of these positions at the feed's marks."""
        unrealized = Decimal(0)
        margin_used = Decimal(0)
        for pos in self._marked(position_rows):
            unrealized += Decimal(pos["unrealized"])
            root = self._root(pos["contract"])
            margin_used += (self.margin(root) or Decimal(0)) * abs(int(pos["quantity"]))
        return margin_used, unrealized

    def _margin_state(self, account: str) -> tuple[Decimal, Decimal, Decimal]:
        """Cash, margin used and unrealized P&L: what a margin check needs, without the day's fills."""
        cash, position_rows = self._account_state(account)
        margin_used, unrealized = self._margin_of(position_rows)
        return cash, margin_used, unrealized

    def snapshot_values(self, account: str) -> dict[str, Decimal]:
        cash, margin_used, unrealized = self._margin_state(account)
        return {"cash": cash, "margin_used": margin_used, "free_margin": cash + unrealized - margin_used,
                "realized": self._day_realized(account), "unrealized": unrealized}

    def _day_realized(self, account: str) -> Decimal:
        """The account's realized P&L net of commissions since the trading day began, kept as a running sum.

        Summing the day's fills on every snapshot cost O(fills of the day) per call, and the service asks for a
        snapshot after every fill: after a burst of 20,000 fills it took half the event loop. Fills are only ever
        appended (each a larger rowid), so each call adds the rows written since the last one; a new trading day
        starts the sum over. A snapshot never runs inside a fill's transaction (each book call is one step), so
        the rows read are committed ones."""
        day_start = _iso(trading_day_start(self.clock()))
        cached = self._realized.get(account)
        if cached is None or cached[0] != day_start:
            cached = (day_start, 0, Decimal(0))
        _day, last, realized = cached
        for rowid, pnl, commission in self._conn.execute(
                "select rowid, pnl, commission from fills not indexed where rowid > ? and account = ? and time >= ? "
                "order by rowid", (last, account, day_start)).fetchall():
            realized += Decimal(pnl) - Decimal(commission)
            last = rowid
        self._realized[account] = (day_start, last, realized)
        return realized

    def snapshot(self, account: str) -> dict[str, Any]:
        values = self.snapshot_values(account)
        return {**{k: str(v) for k, v in values.items()}, "account": account, "time": self.server_time()}


def _str(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _tidy(value: Decimal) -> Decimal:
    """Averages divide; keep them readable without losing a tick's precision."""
    return value.quantize(Decimal("0.000001")).normalize()


@register
class PaperConnector(Connector):
    """Trade against ``PaperBook`` as if it were a remote broker (see the module docstring).

    Options (keyword arguments): ``data_dir`` (Path: persist state in ``paper-<broker>.db``), ``feed``
    (a ``PriceFeed``; default the shared feed the Broker document names), ``reconnect_wait_s`` (how long a
    placement whose answer was lost waits for the link to come back before giving up with OutcomeUnknown),
    ``clock`` (aware UTC ``datetime`` source, default the wall clock: the service passes its own, so that a
    simulated broker stamps its orders and fills on the same time line as the journal, the schedule and the risk
    monitor's trading day, also when a test or a replay moves that clock).
    """

    type = "paper"
    poll_attempts = 3

    def __init__(self, broker: Any, *, env: Mapping[str, str] | None = None, **options: Any) -> None:
        super().__init__(broker, env=env, **options)
        self.quirks = PaperQuirks.from_options(broker.options.get("paper", {}))
        self.feed: PriceFeed = options.get("feed") or PriceFeed.shared(self.quirks.price_feed)
        rate = broker.rate_limit
        self.limiter = BrokerRateLimiter.for_broker(rate)
        self._rate = None if rate is None else (int(rate.requests), float(rate.per_seconds))
        self.data_dir: Path | None = None if options.get("data_dir") is None else Path(options["data_dir"])
        self.reconnect_wait_s = float(options.get("reconnect_wait_s", 5.0))
        self.clock: Callable[[], datetime] = options.get("clock") or utcnow
        self._memory_db: sqlite_utils.Database | None = None
        self._book: PaperBook | None = None
        self._connected = False
        self._link_down = False
        self._fill_tasks: dict[str, asyncio.Task[None]] = {}
        self._times: dict[str | int, datetime] = {}
        self._last_event: tuple[dict[str, Any], Order] | None = None
        self._link_up = asyncio.Event()
        self._link_up.set()

    # -- the simulated broker ------------------------------------------------------------------------------
    @property
    def db_path(self) -> Path | None:
        return None if self.data_dir is None else self.data_dir / f"paper-{self.broker.name}.db"

    @property
    def book(self) -> PaperBook:
        """The broker side (for harnesses and fault injection); opened on first use."""
        if self._book is None:
            if self.db_path is not None:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite_utils.Database(self.db_path)
            else:
                if self._memory_db is None:
                    self._memory_db = sqlite_utils.Database(memory=True)
                db = self._memory_db
            self._book = PaperBook(self.broker.name, db, self.feed, self.quirks, commission=self.broker.commission,
                                   margin=self.broker.margin, rate_limit=self._rate,
                                   clock=self.clock)
            self._book.listeners.append(self._on_book_event)
        return self._book

    def reject_next(self, n: int = 1) -> None:
        self.book.reject_next += n

    def manual_trade(self, account: str, contract: str, side: Side, quantity: int, client_order_id: str) -> Fill:
        """A trade placed at the broker by hand, not through us (``PaperBook.manual_trade``): its fill reaches the
        event stream if we are connected, and ``fills_since`` either way. Works while the link is down."""
        return self._fill(self.book.manual_trade(account, contract, side, quantity, client_order_id))


    def partial_fill_next(self, parts: list[int]) -> None:
        self.book.partial_fill_next.append(list(parts))

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2) -> None:
        self.book.rate_limit_next.extend([retry_after_s] * n)

    def lose_next_place_response(self) -> None:
        self.book.lose_next_place_response += 1

    def check_resting(self, root: str | None = None) -> list[Fill]:
        """Fill resting orders the feed has crossed; called on every feed change while connected."""
        return [self._fill(w) for w in self.book.check_resting(root)]

    def _on_price(self, root: str, price: Decimal) -> None:
        self.check_resting(root)

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        if self._link_down:
            raise BrokerUnavailable(f"paper broker {self.broker.name}: unreachable (connection dropped)")
        if self._connected:
            return
        book = self.book
        self.feed.subscribe(self._on_price)
        self._connected = True
        self._emit(ConnectionEvent(True, "connected"))
        # The broker kept working while we were away: finish what it would have finished.
        for order_id in book.open_market_orders():
            self._fill_now(order_id)
        self.check_resting()

    async def close(self) -> None:
        self.feed.unsubscribe(self._on_price)
        for task in list(self._fill_tasks.values()):
            task.cancel()
        tasks = list(self._fill_tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._book is not None:
            for order_id in self._book.open_market_orders():
                self._fill_now(order_id)
        was = self._connected
        self._connected = False
        if was:
            self._emit(ConnectionEvent(False, "closed"))
        if self._book is not None and self.db_path is not None:
            self._book.db.close()
            self._book = None

    def disconnect(self, reason: str = "connection dropped") -> None:
        """Simulate a drop: the link is down until ``reconnect()``; requests fail, the broker keeps trading."""
        self._link_down = True
        self._link_up.clear()
        if self._connected:
            self._connected = False
            self._emit(ConnectionEvent(False, reason))

    def sever(self) -> None:
        """Cut the link the way a crash of our process (kill -9) or a silent network failure does: at once, and
        without a word to anyone.

        Unlike ``disconnect`` (a drop the connector notices and reports), nothing is emitted, not even a
        connection event: the event stream simply stops (whoever consumed it is dead, or never learns). Requests
        fail from here on (not connected; a placement whose answer is awaited ends ``OutcomeUnknown``), price
        updates no longer reach the connector, and the connector's own tasks (the fills it plays out after their
        latency) are cancelled where they stand, since they run in our process. The broker side survives whole:
        the book (its SQLite in ``data_dir``), the orders handed to it, which it finishes on the next connection
        (``connect`` fills every market order still open, as a broker that kept trading while nobody listened),
        and the faults it still owes (``reject_next`` and the other injections, on ``book``). Synchronous, so a
        harness can call it from inside any hook with no other task running in between; idempotent; ``reconnect``
        links the same connector again (a network failure), or a new connector on the same ``data_dir`` takes
        over (a restarted process)."""
        self._link_down = True
        self._link_up.clear()
        self._connected = False
        self.feed.unsubscribe(self._on_price)
        tasks, self._fill_tasks = list(self._fill_tasks.values()), {}
        for task in tasks:
            task.cancel()

    async def reconnect(self) -> None:
        self._link_down = False
        self._link_up.set()
        await self.connect()

    async def _await_reachable(self) -> None:
        if self._link_down:
            try:
                await asyncio.wait_for(self._link_up.wait(), self.reconnect_wait_s)
            except asyncio.TimeoutError:
                raise OutcomeUnknown(f"paper broker {self.broker.name}: still unreachable after "
                                     f"{self.reconnect_wait_s:g}s; order state unknown") from None
        if not self._connected:
            await self.connect()

    def _require_connected(self) -> None:
        if not self._connected:
            raise BrokerUnavailable(f"paper broker {self.broker.name}: not connected")

    async def _call(self, kind: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One request to the broker: client-side budget, then the broker's own limit (retried for non-orders)."""
        for attempt in range(self.poll_attempts):
            self._require_connected()
            async with self.limiter.slot(kind):
                self._require_connected()
                try:
                    self.book.admit()
                except RateLimited as exc:
                    self.limiter.penalize(exc.retry_after_s)
                    if kind == "order" or attempt == self.poll_attempts - 1:
                        raise
                    log.warning("%s: %s; waiting", self.broker.name, exc)
                    continue
                return fn(*args)
        raise AssertionError("unreachable")

    def rate_limit_headroom(self) -> float:
        return self.limiter.headroom()

    async def server_time(self) -> datetime:
        """The broker's clock, as it reports it (for clock-offset checks)."""
        return self._time(await self._call("poll", self.book.server_time))

    # -- conversion at the edge ------------------------------------------------------------------------------
    def _time(self, value: str | int) -> datetime:
        """Broker timestamp -> aware UTC. For naive Eastern times in the repeated November hour, the broker's
        report is about the past or present, so take the latest reading that is not in the future.

        Unambiguous readings are cached: one order's records repeat the same few timestamps."""
        cache = self._times
        parsed = cache.get(value)
        if parsed is not None:
            return parsed
        if self.quirks.timestamps != "eastern_naive":
            parsed = parse_broker_time(value, self.quirks.timestamps)
        else:
            first = parse_broker_time(value, "eastern_naive", fold=0)
            second = parse_broker_time(value, "eastern_naive", fold=1)
            if second != first:  # depends on the clock now: never cached
                return second if second <= self.clock() + timedelta(seconds=1) else first
            parsed = first
        if len(cache) >= _WIRE_CACHE_SIZE:
            cache.clear()
        cache[value] = parsed
        return parsed

    def _order(self, wire: Mapping[str, Any]) -> Order:
        return Order(
            broker_order_id=wire["broker_order_id"], client_order_id=wire["client_order_id"],
            account=wire["account"], contract=wire["contract"], side=Side(wire["side"]),
            quantity=int(wire["quantity"]), filled_quantity=int(wire["filled_quantity"]),
            status=OrderStatus(wire["status"]), order_type=OrderType(wire["order_type"]),
            created_at=self._time(wire["created_at"]), updated_at=self._time(wire["updated_at"]),
            avg_fill_price=_dec(wire["avg_fill_price"]), limit_price=_dec(wire["limit_price"]),
            stop_price=_dec(wire["stop_price"]), reason=wire["reason"],
        )

    def _fill(self, wire: Mapping[str, Any]) -> Fill:
        return Fill(
            fill_id=wire["fill_id"], broker_order_id=wire["broker_order_id"],
            client_order_id=wire["client_order_id"], account=wire["account"], contract=wire["contract"],
            side=Side(wire["side"]), quantity=int(wire["quantity"]), price=Decimal(wire["price"]),
            commission=Decimal(wire["commission"]), time=self._time(wire["time"]),
        )

    def _on_book_event(self, kind: str, wire: dict[str, Any]) -> None:
        if not self._connected:
            return  # a dropped link delivers nothing; reconciliation catches up
        if kind == "fill":
            self._emit(FillEvent(self._fill(wire)))
        else:
            order = self._order(wire)
            self._last_event = (dict(wire), order)
            self._emit(OrderEvent(order))

    def _order_of(self, wire: Mapping[str, Any]) -> Order:
        """``_order(wire)``, reusing the Order of the last order event when it was built from the same record."""
        last = self._last_event
        if last is not None and last[0] == wire:
            return last[1]
        return self._order(wire)

    # -- orders ----------------------------------------------------------------------------------------------
    async def _submit(self, request: OrderRequest) -> Order:
        book = self.book
        lose = False

        def send() -> dict[str, Any]:
            nonlocal lose
            lose = book.take_lost_response()
            return book.accept(request)

        try:
            wire = await self._call("order", send)
        except DuplicateOrder as dup:
            return self._order(dup.record)
        except OrderRejected as exc:
            await self._latency(self.quirks.ack_latency_ms)
            wire_rejected = getattr(exc, "wire", None)
            if wire_rejected is not None:
                exc.order = self._order(wire_rejected)
            raise
        order_id = wire["broker_order_id"]
        if lose:
            # The broker got it and traded it; the answer is lost on the way back.
            if request.order_type is OrderType.MARKET:
                self._fill_now(order_id)
            else:
                book.check_resting()
            raise OutcomeUnknown(f"paper broker {self.broker.name}: connection reset before the answer to "
                                 f"{request.client_order_id} arrived")
        final: dict[str, Any] | None = None
        if request.order_type is OrderType.MARKET:
            if self.quirks.fill_latency_ms <= 0 and self.quirks.ack_latency_ms <= 0:
                final = self._fill_now(order_id)
            else:
                self._fill_tasks[order_id] = asyncio.create_task(self._fill_later(order_id))
        else:
            book.check_resting(root_of(request.contract, self.feed.catalog))
        if self.quirks.ack_latency_ms > 0:
            await self._latency(self.quirks.ack_latency_ms)
            final = None  # the broker kept working meanwhile
        if not self._connected:
            raise OutcomeUnknown(f"paper broker {self.broker.name}: connection dropped while waiting for the "
                                 f"acknowledgement of {request.client_order_id}")
        # Zero latency and filled at once: the order as the fill left it, not read back (nothing ran in between).
        current = final if isinstance(final, dict) else book.order(order_id)
        assert current is not None
        return self._order_of(current)

    async def _latency(self, ms: float) -> None:
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    def _fill_now(self, order_id: str) -> dict[str, Any] | None:
        """Fill a market order at once; the order's wire record after its last part (None if it did not fill)."""
        return self.book.fill_market(order_id)

    async def _fill_later(self, order_id: str) -> None:
        """Fill a market order after the ack and fill latencies, part by part."""
        try:
            await self._latency(self.quirks.ack_latency_ms)
            for part in self.book.fill_plan(order_id):
                await self._latency(self.quirks.fill_latency_ms)
                self.book.fill(order_id, part)
        finally:
            self._fill_tasks.pop(order_id, None)

    async def find_order(self, account: str, client_order_id: str) -> Order | None:
        wire = await self._call("poll", self.book.find, account, client_order_id)
        return None if wire is None else self._order(wire)

    async def cancel_order(self, account: str, broker_order_id: str) -> Order:
        wire = await self._call("cancel", self.book.cancel, account, broker_order_id)
        await self._latency(self.quirks.ack_latency_ms)
        return self._order(wire)

    async def working_orders(self, account: str) -> list[Order]:
        return [self._order(w) for w in await self._call("poll", self.book.working, account)]

    # -- account state ---------------------------------------------------------------------------------------
    async def positions(self, account: str) -> list[Position]:
        rows = await self._call("poll", self.book.positions, account)
        return [Position(r["account"], r["contract"], int(r["quantity"]), Decimal(r["avg_price"]),
                         Decimal(r["unrealized"])) for r in rows]

    async def account_snapshot(self, account: str) -> AccountSnapshot:
        snap = await self._call("poll", self.book.snapshot, account)
        return AccountSnapshot(
            account=account, cash_balance=Decimal(snap["cash"]), margin_used=Decimal(snap["margin_used"]),
            free_margin=Decimal(snap["free_margin"]), realized_pnl=Decimal(snap["realized"]),
            unrealized_pnl=Decimal(snap["unrealized"]), time=self._time(snap["time"]),
        )

    async def fills_since(self, account: str, since: datetime) -> list[Fill]:
        if since.tzinfo is None:
            raise ValueError(f"fills_since needs an aware datetime, got naive {since!r}")
        return [self._fill(w) for w in await self._call("poll", self.book.fills_since, account, since)]


__all__ = ["DuplicateOrder", "PaperBook", "PaperConnector", "PaperQuirks"]
