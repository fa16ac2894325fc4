"""A Tradovate stand-in on 127.0.0.1 that speaks the real wire format, with the faults the real one has.

Why an emulator rather than mocks: the connector's hard parts are on the wire — a failed login that is still
HTTP 200, a penalty ticket hidden in a 200 answer, an empty-bodied 429, a TCP reset after the order was accepted,
SockJS-style WebSocket frames and heartbeats. Only a real server exercises them. It is also what
``multibroker brokers check`` can be pointed at.

What it models (see ``broker-apis.md``):

- ``POST /v1/auth/accesstokenrequest`` (bad login: 200 with ``errorText``), ``GET /v1/auth/renewaccesstoken``;
  every other endpoint needs ``Authorization: Bearer`` with a live token (401 otherwise). ``token_life_s`` is
  configurable so renewal can be tested in seconds.
- Accounts, contracts (``MESZ6`` with numeric ids), orders, order versions, commands (which carry ``clOrdId``),
  fills, positions (signed ``netPos``) and cash balances. Like the real API, an order entity carries no quantity
  or price: those live on its ``orderVersion``; fills carry no account: their order does.
- Market orders fill at the price set per contract; limit and stop orders rest and fill when ``set_price``
  crosses them. Commissions are charged per contract per side.
- The user-data WebSocket ``/v1/websocket``: ``o`` on open, ``h`` heartbeats, ``a[...]`` messages, ``c[...]`` on
  close; requests are ``endpoint\\nid\\nquery\\nbody``; ``authorize``, ``user/syncrequest`` and pushed ``props``.
- Fees: each fill has a ``FillFee`` (same id as the fill) with ``commission`` and optionally ``clearingFee``,
  ``exchangeFee``, ``nfaFee``... (``fee_schedule`` per root, per contract per side; by default all of it is
  ``commission``); ``/fillFee/list``, ``/fillFee/deps?masterid=<fill id>``, ``/fillFee/ldeps``, ``/fillFee/item``.
  ``fill_fees=False`` reports none. Cash is charged the fees; ``realizedPnL`` stays gross, as fees are booked apart.
- A socket lives on the token it was authorized with: once that token expires it is 401 for requests and, with
  ``expired_socket="silent"`` (default), gets heartbeats but no more events (``withheld_pushes`` counts them),
  or with ``"close"`` a ``c[...]`` frame and a close. Renewing the token does not extend an authorized socket.

Fault hooks: ``set_latency``, ``reject_next`` (``failureReason``), ``partial_fill_next``, ``rate_limit_next``
(penalty ticket for POSTs, empty 429 otherwise, or 429 for everything), ``ticket_next_sync`` (a penalty ticket
as the socket's ``user/syncrequest`` answer), ``captcha_next``, ``lose_next_place_response``
(accept and fill, then reset the TCP connection before answering), ``drop_connection``/``restore_connection`` (stop
listening and reset every connection including WebSockets), ``mute_heartbeats`` (a socket that goes silent without
closing), ``expire_tokens``; ``trade_by_hand`` (an order another client of the account places and fills) and
``move_position`` (a position change with no fill), for what the trader does outside the API.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Awaitable, Callable, Iterable, Mapping
from zoneinfo import ZoneInfo

from aiohttp import WSMsgType, web

from brokers.emulators.common import EmulatorServer, check_parts, serve_forever, wire_decimal, wire_number
from engine.catalog import BUILTIN, MONTH_CODES

log = logging.getLogger(__name__)

EASTERN = ZoneInfo("America/New_York")
NO_AUTH_PATHS = {"/v1/auth/accesstokenrequest", "/v1/websocket"}
WORKING_STATUSES = {"Working", "PendingNew", "PendingReplace", "PendingCancel", "Suspended"}
FEE_FIELDS = ("commission", "clearingFee", "exchangeFee", "nfaFee", "brokerageFee", "ipFee", "orderRoutingFee")
"""The money fields of Tradovate's FillFee entity (each with a ``...CurrencyId`` beside it)."""
USD_CURRENCY_ID = 1
DEFAULT_ROOTS = ("MES", "ES", "MNQ", "NQ", "MYM", "M2K", "MCL", "MGC")
DEFAULT_COMMISSIONS = {"MES": Decimal("0.35"), "MNQ": Decimal("0.35"), "default": Decimal("1.29")}
DEFAULT_MARGINS = {"MES": Decimal(50), "MNQ": Decimal(100), "ES": Decimal(500), "default": Decimal(1000)}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wire_time(dt: datetime) -> str:
    """Tradovate's timestamp shape: ISO-8601 UTC with milliseconds and ``Z``."""
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trade_date(dt: datetime) -> date:
    """The CME trading day a moment belongs to: it starts at 18:00 New York the evening before."""
    local = dt.astimezone(EASTERN)
    return local.date() + timedelta(days=1) if local.hour >= 18 else local.date()


def _wire_trade_date(dt: datetime) -> dict[str, int]:
    day = trade_date(dt)
    return {"year": day.year, "month": day.month, "day": day.day}


_num = wire_number
_dec = wire_decimal


def listed_contracts(today: datetime, roots: Iterable[str] = DEFAULT_ROOTS) -> list[str]:
    """CME codes (``MESZ6``) of every listed month of this year and the next, from this month on."""
    names = []
    for root in roots:
        for year in (today.year, today.year + 1):
            for month in BUILTIN[root].month_numbers():
                if (year, month) >= (today.year, today.month):
                    names.append(f"{root}{MONTH_CODES[month - 1]}{year % 10}")
    return names


def _root(contract_name: str) -> str:
    return contract_name[:-2]


@dataclass
class _Account:
    id: int
    name: str
    user_id: int
    starting_cash: Decimal
    realized: Decimal = Decimal(0)
    fees: Decimal = Decimal(0)

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "userId": self.user_id, "accountType": "Customer",
                "active": True, "clearingHouseId": 2, "riskCategoryId": 2, "autoLiqProfileId": 2,
                "marginAccountType": "Speculator", "legalStatus": "Individual", "archived": False,
                "timestamp": wire_time(datetime(2024, 1, 2, tzinfo=timezone.utc))}


@dataclass
class _Contract:
    id: int
    name: str

    def wire(self) -> dict[str, Any]:
        instrument = BUILTIN.get(_root(self.name))
        tick = instrument.tick_size if instrument else Decimal("0.25")
        return {"id": self.id, "name": self.name, "contractMaturityId": self.id + 10_000, "status": "Verified",
                "providerTickSize": float(tick)}


@dataclass
class _Order:
    id: int
    account_id: int
    contract_id: int
    action: str
    qty: int
    order_type: str
    price: Decimal | None
    stop_price: Decimal | None
    time_in_force: str
    cl_ord_id: str | None
    created: datetime
    status: str = "PendingNew"
    filled: int = 0
    command_id: int = 0
    version_id: int = 0
    fills: list[int] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "accountId": self.account_id, "contractId": self.contract_id,
                "timestamp": wire_time(self.created), "action": self.action, "ordStatus": self.status,
                "commandId": self.command_id, "isAutomated": True, "admin": False}

    def wire_version(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.version_id, "orderId": self.id, "orderQty": self.qty,
                               "orderType": self.order_type, "timeInForce": self.time_in_force}
        if self.price is not None:
            out["price"] = _num(self.price)
        if self.stop_price is not None:
            out["stopPrice"] = _num(self.stop_price)
        return out

    def wire_command(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.command_id, "orderId": self.id, "timestamp": wire_time(self.created),
                               "commandType": "New", "commandStatus": "ExecutionReported", "senderId": 1,
                               "isAutomated": True}
        if self.cl_ord_id is not None:
            out["clOrdId"] = self.cl_ord_id
        return out


@dataclass
class _Fill:
    id: int
    order_id: int
    contract_id: int
    action: str
    qty: int
    price: Decimal
    time: datetime
    fees: dict[str, Decimal] = field(default_factory=dict)
    """FillFee amounts for the whole fill (per contract times qty)."""

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "orderId": self.order_id, "contractId": self.contract_id,
                "timestamp": wire_time(self.time), "tradeDate": _wire_trade_date(self.time), "action": self.action,
                "qty": self.qty, "price": _num(self.price), "active": True, "finallyPaired": 0}

    def wire_fee(self) -> dict[str, Any]:
        """The FillFee entity: the fill's 1:1 dependent, so it shares the fill's id (it has no fillId field)."""
        out: dict[str, Any] = {"id": self.id}
        for name, amount in self.fees.items():
            out[name] = _num(amount)
            out[name.removesuffix("Fee") + "CurrencyId"] = USD_CURRENCY_ID  # clearingFee -> clearingCurrencyId
        return out


@dataclass
class _Position:
    id: int
    account_id: int
    contract_id: int
    net_pos: int = 0
    net_price: Decimal | None = None
    bought: int = 0
    bought_value: Decimal = Decimal(0)
    sold: int = 0
    sold_value: Decimal = Decimal(0)
    updated: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "accountId": self.account_id, "contractId": self.contract_id,
                "timestamp": wire_time(self.updated), "tradeDate": _wire_trade_date(self.updated),
                "netPos": self.net_pos, "netPrice": _num(self.net_price), "bought": self.bought,
                "boughtValue": _num(self.bought_value), "sold": self.sold, "soldValue": _num(self.sold_value),
                "prevPos": 0, "prevPrice": None}


class _Socket:
    """One user-data WebSocket client."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.ws = ws
        self.authorized = False
        self.token: str | None = None
        """The access token this socket was authorized with: the socket lives on it, not on later renewals."""
        self.synced = False
        self.heartbeats_received = 0

    async def send(self, frame: str) -> None:
        if not self.ws.closed:
            try:
                await self.ws.send_str(frame)
            except (ConnectionError, RuntimeError):
                pass

    async def send_messages(self, *messages: Mapping[str, Any]) -> None:
        await self.send("a" + json.dumps(list(messages)))

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()


class TradovateEmulator(EmulatorServer):
    """A Tradovate REST + user-data WebSocket server for one user, with fault hooks.

    ``accounts`` maps account names to starting cash. ``start()`` returns the REST base URL (``.../v1``);
    ``ws_url`` is the WebSocket URL. Prices, commissions and margins are Decimal.
    """

    def __init__(self, *, username: str = "trader", password: str = "secret", sec: str | None = None,
                 accounts: Mapping[str, Decimal] | None = None, contracts: Iterable[str] | None = None,
                 commissions: Mapping[str, Decimal] | None = None, margins: Mapping[str, Decimal] | None = None,
                 token_life_s: float = 80 * 60, server_heartbeat_s: float = 2.5, port: int = 0,
                 today: datetime | None = None, fee_schedule: Mapping[str, Mapping[str, Decimal]] | None = None,
                 fill_fees: bool = True, expired_socket: str = "silent") -> None:
        super().__init__(port=port)
        self.username = username
        self.password = password
        self.sec = sec
        self.user_id = 7001
        self.token_life_s = token_life_s
        self.server_heartbeat_s = server_heartbeat_s
        self.commissions = dict(commissions or DEFAULT_COMMISSIONS)
        self.fee_schedule = {root: {k: Decimal(v) for k, v in parts.items()}
                             for root, parts in (fee_schedule or {}).items()}
        unknown = {k for parts in self.fee_schedule.values() for k in parts} - set(FEE_FIELDS)
        if unknown:
            raise ValueError(f"fee_schedule has unknown FillFee fields {sorted(unknown)}; known: {FEE_FIELDS}")
        self.fill_fees = fill_fees
        if expired_socket not in ("silent", "close"):
            raise ValueError(f"expired_socket must be 'silent' or 'close', got {expired_socket!r}")
        self.expired_socket = expired_socket
        self.margins = dict(margins or DEFAULT_MARGINS)
        self._ids = itertools.count(1001)
        self.accounts: dict[int, _Account] = {}
        for i, (name, cash) in enumerate((accounts or {"DEMO0001": Decimal(50000)}).items()):
            self.accounts[500_001 + i] = _Account(500_001 + i, name, self.user_id, Decimal(cash))
        self.contracts: dict[int, _Contract] = {}
        names = listed_contracts(today or datetime.now(timezone.utc)) if contracts is None else contracts
        for i, name in enumerate(names):
            self.contracts[3_000_001 + i] = _Contract(3_000_001 + i, name)
        self.prices: dict[int, Decimal] = {cid: Decimal("5000.00") for cid in self.contracts}
        self.orders: dict[int, _Order] = {}
        self.fills: dict[int, _Fill] = {}
        self.positions: dict[tuple[int, int], _Position] = {}
        self.tokens: dict[str, datetime] = {}
        # Observability for tests.
        self.logins = 0
        self.renewals = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.tickets_honoured = 0
        self.withheld_pushes = 0
        """Pushes not delivered because the socket's token had expired (see ``expired_socket``)."""
        # Faults.
        self.latency_s = 0.0
        self._reject: list[tuple[str, str]] = []
        self._partial: list[list[int]] = []
        self._rate_limit: list[tuple[str, float]] = []
        self._tickets: dict[str, float] = {}
        self._captcha = 0
        self._sync_tickets: list[tuple[float, bool]] = []
        self._muted = False
        # Server plumbing.
        self._sockets: set[_Socket] = set()
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/auth/accesstokenrequest"): self._access_token_request,
            ("GET", "/v1/auth/renewaccesstoken"): self._renew,
            ("GET", "/v1/account/list"): self._account_list,
            ("GET", "/v1/contract/find"): self._contract_find,
            ("GET", "/v1/contract/item"): self._contract_item,
            ("POST", "/v1/order/placeorder"): self._place_order,
            ("POST", "/v1/order/cancelorder"): self._cancel_order,
            ("POST", "/v1/order/liquidateposition"): self._liquidate,
            ("GET", "/v1/order/list"): self._order_list,
            ("GET", "/v1/order/item"): self._order_item,
            ("GET", "/v1/orderVersion/deps"): self._order_version_deps,
            ("GET", "/v1/command/deps"): self._command_deps,
            ("GET", "/v1/position/list"): self._position_list,
            ("GET", "/v1/fill/list"): self._fill_list,
            ("GET", "/v1/fill/deps"): self._fill_deps,
            ("GET", "/v1/fillFee/list"): self._fill_fee_list,
            ("GET", "/v1/fillFee/deps"): self._fill_fee_deps,
            ("GET", "/v1/fillFee/ldeps"): self._fill_fee_ldeps,
            ("GET", "/v1/fillFee/item"): self._fill_fee_item,
            ("POST", "/v1/cashBalance/getcashbalancesnapshot"): self._cash_snapshot,
        }

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/websocket"

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/websocket", self._websocket)
        app.router.add_route("*", "/v1/{tail:.*}", self._dispatch)
        return app

    async def _close_streams(self) -> None:
        """Reset every WebSocket, as a network drop or a server going away does (no close frame arrives)."""
        for sock in list(self._sockets):
            sock.abort()
        self._sockets.clear()

    # -- fault hooks and knobs ------------------------------------------------------------------------------------
    def contract_id(self, name: str) -> int:
        for contract in self.contracts.values():
            if contract.name == name:
                return contract.id
        raise KeyError(f"emulator has no contract {name!r}")

    def account_id(self, name: str) -> int:
        for account in self.accounts.values():
            if account.name == name:
                return account.id
        raise KeyError(f"emulator has no account {name!r}")

    def commission(self, contract_name: str) -> Decimal:
        """What one contract is charged per side: the fee schedule's total for its root, else ``commissions``."""
        parts = self.fee_schedule.get(_root(contract_name))
        if parts is not None:
            return sum(parts.values(), Decimal(0))
        return self.commissions.get(_root(contract_name), self.commissions.get("default", Decimal(0)))

    def fee_parts(self, contract_name: str) -> dict[str, Decimal]:
        """The FillFee breakdown of one contract per side (all of it ``commission`` without a schedule)."""
        parts = self.fee_schedule.get(_root(contract_name))
        return dict(parts) if parts is not None else {"commission": self.commission(contract_name)}

    def set_price(self, contract_name: str, price: Decimal) -> None:
        """Market orders fill at ``price`` from now on; resting limit/stop orders it crosses fill now."""
        cid = self.contract_id(contract_name)
        self.prices[cid] = Decimal(price)
        self._spawn(self._cross_resting(cid))

    def set_latency(self, seconds: float) -> None:
        """Every REST answer is delayed by ``seconds`` (after the request took effect)."""
        self.latency_s = seconds

    def reject_next(self, n: int = 1, reason: str = "MaxPosLimitReached",
                    text: str = "Max position limit reached for this account") -> None:
        self._reject.extend([(reason, text)] * n)

    def partial_fill_next(self, parts: list[int]) -> None:
        """The next market order fills in these parts; if they sum to less than its quantity the rest rests."""
        self._partial.append(check_parts(parts))

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2, kind: str = "ticket") -> None:
        """The next ``n`` requests are throttled: ``ticket`` answers POSTs with a penalty ticket (HTTP 200) and
        GETs with an empty 429; ``429`` answers everything with an empty 429."""
        if kind not in ("ticket", "429"):
            raise ValueError(f"rate-limit kind must be 'ticket' or '429', got {kind!r}")
        self._rate_limit.extend([(kind, retry_after_s)] * n)

    def ticket_next_sync(self, n: int = 1, wait_s: float = 0.2, *, captcha: bool = False) -> None:
        """The next ``n`` socket ``user/syncrequest`` answers are a penalty ticket (``s`` 200, ``d`` the ticket),
        as every Tradovate request may be throttled; a resend whose body carries the ticket after its wait is
        served."""
        self._sync_tickets.extend([(wait_s, captcha)] * n)

    def captcha_next(self, n: int = 1) -> None:
        """The next ``n`` requests get a penalty ticket that demands a captcha (no automated retry possible)."""
        self._captcha += n

    def expire_tokens(self) -> None:
        past = datetime.now(timezone.utc) - timedelta(seconds=1)
        for token in self.tokens:
            self.tokens[token] = past

    def mute_heartbeats(self, muted: bool = True) -> None:
        """Stop sending ``h`` frames without closing: the connection looks alive to TCP but is dead."""
        self._muted = muted

    def order_count(self, account_name: str, cl_ord_id: str) -> int:
        """Broker-side truth: how many orders carry ``cl_ord_id`` in this account."""
        aid = self.account_id(account_name)
        return sum(1 for o in self.orders.values() if o.account_id == aid and o.cl_ord_id == cl_ord_id)

    async def trade_by_hand(self, account_name: str, contract_name: str, action: str, qty: int,
                            cl_ord_id: str | None = None) -> int:
        """A market order placed and filled by another client of the account (the trader on the platform): it
        reaches every socket as any order does, and ``/fill/list`` and ``/position/list``, but none of the faults
        injected for the API client (rejections, partial fills, throttling, lost answers) apply to it. Returns
        the fill id."""
        if action not in ("Buy", "Sell") or qty <= 0:
            raise ValueError(f"a trade by hand needs action Buy or Sell and a positive quantity, got {action} {qty}")
        now = datetime.now(timezone.utc)
        order = _Order(id=next(self._ids), account_id=self.account_id(account_name),
                       contract_id=self.contract_id(contract_name), action=action, qty=qty, order_type="Market",
                       price=None, stop_price=None, time_in_force="Day", cl_ord_id=cl_ord_id, created=now,
                       command_id=next(self._ids), version_id=next(self._ids))
        await self._enter(order, None)
        return order.fills[-1]

    def net_position(self, account_name: str, contract_name: str) -> int:
        """Broker-side truth: the account's signed position in the contract."""
        position = self.positions.get((self.account_id(account_name), self.contract_id(contract_name)))
        return 0 if position is None else position.net_pos

    def move_position(self, account_name: str, contract_name: str, signed: int) -> None:
        """The position changes by ``signed`` contracts with no order and no fill (a back-office correction, a
        transfer): ``/position/list`` shows it, nothing is pushed, only a reconciliation can notice."""
        key = (self.account_id(account_name), self.contract_id(contract_name))
        position = self.positions.get(key)
        if position is None:
            position = self.positions[key] = _Position(next(self._ids), key[0], key[1])
        if position.net_pos == 0 or (position.net_pos > 0) != (position.net_pos + signed > 0):
            position.net_price = self.prices[key[1]]
        position.net_pos += signed
        if position.net_pos == 0:
            position.net_price = None
        position.updated = datetime.now(timezone.utc)

    # -- read-outs in plain values (they cross a process boundary: tests that run the emulator in a process of
    # its own, as the broker is, read its book through these) ---------------------------------------------------
    def contract_names(self) -> list[str]:
        """Every contract the emulator lists, by name (``MESZ6``)."""
        return [c.name for c in self.contracts.values()]

    def order_book(self) -> list[dict[str, Any]]:
        """Every order the broker holds: ``id``, ``account`` (name), ``cl_ord_id``, ``status`` (``ordStatus``)."""
        return [{"id": o.id, "account": self.accounts[o.account_id].name, "cl_ord_id": o.cl_ord_id,
                 "status": o.status} for o in self.orders.values()]

    def fills_of(self, account_name: str) -> list[dict[str, Any]]:
        """Every fill of the account, in the order the broker made them: ``seq`` (1-based among all its fills),
        ``id``, ``cl_ord_id`` of its order, ``contract`` (name), ``action`` (Buy / Sell), ``qty``."""
        aid = self.account_id(account_name)
        out = []
        for seq, fill in enumerate(self.fills.values(), start=1):
            order = self.orders[fill.order_id]
            if order.account_id == aid:
                out.append({"seq": seq, "id": fill.id, "cl_ord_id": order.cl_ord_id,
                            "contract": self.contracts[fill.contract_id].name, "action": fill.action,
                            "qty": fill.qty})
        return out

    def positions_of(self, account_name: str) -> dict[str, int]:
        """The account's open positions: contract name -> signed quantity."""
        aid = self.account_id(account_name)
        return {self.contracts[cid].name: p.net_pos for (a, cid), p in self.positions.items() if a == aid and p.net_pos}

    def fill_count(self) -> int:
        """How many fills the broker has made (any account): a mark to tell later fills by."""
        return len(self.fills)

    @property
    def heartbeats_received(self) -> int:
        return sum(s.heartbeats_received for s in self._sockets)

    @property
    def socket_count(self) -> int:
        return len(self._sockets)

    # -- HTTP plumbing --------------------------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._refuse_if_down(request)
        self.requests[request.path] += 1
        if request.path == "/v1/websocket":
            return await handler(request)
        body: dict[str, Any] = {}
        if request.method == "POST":
            try:
                parsed = await request.json()
            except json.JSONDecodeError:
                return web.json_response({"errorText": "Request body is not valid JSON"}, status=400)
            body = parsed if isinstance(parsed, dict) else {}
        throttled = self._throttle(request, body)
        if throttled is not None:
            return throttled
        if request.path not in NO_AUTH_PATHS and self._token_of(request) is None:
            return web.Response(status=401, text="Access is denied")
        return await handler(request)

    def _throttle(self, request: web.Request, body: Mapping[str, Any]) -> web.StreamResponse | None:
        ticket = body.get("p-ticket")
        if ticket is not None and ticket in self._tickets:
            ready_at = self._tickets.pop(ticket)
            wait = ready_at - time.monotonic()
            if wait > 0:  # resent too early: the penalty stands
                return self._ticket_response(wait, captcha=False)
            self.tickets_honoured += 1
            return None
        if self._captcha:
            self._captcha -= 1
            return self._ticket_response(3600, captcha=True)
        if self._rate_limit:
            kind, wait = self._rate_limit.pop(0)
            if kind == "ticket" and request.method == "POST":
                return self._ticket_response(wait, captcha=False)
            return web.Response(status=429)
        return None

    def _ticket_response(self, wait_s: float, *, captcha: bool) -> web.Response:
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = time.monotonic() + wait_s
        p_time: float = int(wait_s) if float(wait_s).is_integer() else round(wait_s, 3)
        return web.json_response({"p-ticket": ticket, "p-time": p_time, "p-captcha": captcha})

    def _token_of(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        return token if self._token_valid(token) else None

    def _token_valid(self, token: str) -> bool:
        expiry = self.tokens.get(token)
        return expiry is not None and expiry > datetime.now(timezone.utc)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            return web.Response(status=404, text=f"Unknown operation {request.method} {request.path}")
        response = await handler(request)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return response

    async def _body(self, request: web.Request) -> dict[str, Any]:
        parsed = await request.json()
        return parsed if isinstance(parsed, dict) else {}

    # -- auth -----------------------------------------------------------------------------------------------------
    def _issue_token(self) -> dict[str, Any]:
        token = secrets.token_urlsafe(32)
        expiry = datetime.now(timezone.utc) + timedelta(seconds=self.token_life_s)
        self.tokens[token] = expiry
        return {"accessToken": token, "mdAccessToken": secrets.token_urlsafe(32), "expirationTime": wire_time(expiry),
                "userStatus": "Active", "userId": self.user_id, "name": self.username, "hasLive": False}

    async def _access_token_request(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body.get("name") != self.username or body.get("password") != self.password or (
                self.sec is not None and body.get("sec") != self.sec):
            return web.json_response({"errorText": "Incorrect username or password. Please try again, noting that "
                                                   "passwords are case-sensitive."})
        self.logins += 1
        return web.json_response(self._issue_token())

    async def _renew(self, request: web.Request) -> web.Response:
        self.renewals += 1
        return web.json_response(self._issue_token())

    # -- reference data -------------------------------------------------------------------------------------------
    async def _account_list(self, request: web.Request) -> web.Response:
        return web.json_response([a.wire() for a in self.accounts.values()])

    async def _contract_find(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        for contract in self.contracts.values():
            if contract.name == name:
                return web.json_response(contract.wire())
        return web.Response(status=404, text=f"Contract {name} not found")

    async def _contract_item(self, request: web.Request) -> web.Response:
        contract = self.contracts.get(_int(request.query.get("id")))
        if contract is None:
            return web.Response(status=404, text="Contract not found")
        return web.json_response(contract.wire())

    # -- orders ---------------------------------------------------------------------------------------------------
    async def _place_order(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        answer = await self._place(body)
        if "orderId" in answer:
            lost = self._lose_this_answer(request)  # the order is in the book (and filled); its answer is not
            if lost is not None:
                return lost
        return web.json_response(answer)

    async def _place(self, body: Mapping[str, Any]) -> dict[str, Any]:
        account = self.accounts.get(_int(body.get("accountId")))
        if account is None or (body.get("accountSpec") not in (None, account.name)):
            return _failure("UnknownReason", "Account not found or does not match accountSpec")
        contract = next((c for c in self.contracts.values() if c.name == body.get("symbol")), None)
        if contract is None:
            return _failure("InvalidContract", f"Unknown symbol {body.get('symbol')!r}")
        action, qty, order_type = body.get("action"), _int(body.get("orderQty")), body.get("orderType")
        if action not in ("Buy", "Sell") or qty <= 0 or order_type not in ("Market", "Limit", "Stop", "StopLimit"):
            return _failure("UnknownReason", "Invalid action, orderQty or orderType")
        price, stop = _dec(body.get("price")), _dec(body.get("stopPrice"))
        if (order_type in ("Limit", "StopLimit") and price is None) or (
                order_type in ("Stop", "StopLimit") and stop is None):
            return _failure("InvalidPrice", "Missing price for this order type")
        if self._reject:
            reason, text = self._reject.pop(0)
            return _failure(reason, text)
        now = datetime.now(timezone.utc)
        order = _Order(id=next(self._ids), account_id=account.id, contract_id=contract.id, action=action, qty=qty,
                       order_type=order_type, price=price, stop_price=stop,
                       time_in_force=str(body.get("timeInForce") or "Day"),
                       cl_ord_id=None if body.get("clOrdId") is None else str(body["clOrdId"]), created=now,
                       command_id=next(self._ids), version_id=next(self._ids))
        await self._enter(order, self._partial.pop(0) if self._partial and order_type == "Market" else None)
        return {"orderId": order.id}

    async def _enter(self, order: _Order, parts: list[int] | None) -> None:
        """A new order at the broker, from our API client or from the trader's platform alike: kept, pushed to every
        socket, and filled (a market order, in ``parts`` when given, else at once) or left working."""
        self.orders[order.id] = order
        await self._push("command", "Created", order.wire_command())
        await self._push("orderVersion", "Created", order.wire_version())
        await self._push("order", "Created", order.wire())
        order.status = "Working"
        if order.order_type == "Market":
            for part in parts or [order.qty]:
                part = min(part, order.qty - order.filled)
                if part > 0:
                    await self._fill(order, part, self.prices[order.contract_id])
            if order.filled == order.qty:
                order.status = "Filled"
            await self._push("order", "Updated", order.wire())
        else:
            await self._push("order", "Updated", order.wire())
            await self._cross_resting(order.contract_id)

    async def _cross_resting(self, contract_id: int) -> None:
        price = self.prices[contract_id]
        for order in list(self.orders.values()):
            if order.contract_id != contract_id or order.status != "Working" or order.order_type == "Market":
                continue
            buy = order.action == "Buy"
            if order.order_type == "Limit":
                crossed = order.price is not None and (price <= order.price if buy else price >= order.price)
            else:
                crossed = order.stop_price is not None and (price >= order.stop_price if buy
                                                            else price <= order.stop_price)
            if crossed:
                await self._fill(order, order.qty - order.filled, price)
                order.status = "Filled"
                await self._push("order", "Updated", order.wire())

    async def _fill(self, order: _Order, qty: int, price: Decimal) -> None:
        now = datetime.now(timezone.utc)
        contract = self.contracts[order.contract_id]
        fees = {name: per_contract * qty for name, per_contract in self.fee_parts(contract.name).items()}
        fill = _Fill(next(self._ids), order.id, order.contract_id, order.action, qty, price, now, fees)
        self.fills[fill.id] = fill
        order.fills.append(fill.id)
        order.filled += qty
        account = self.accounts[order.account_id]
        account.fees += sum(fees.values(), Decimal(0))
        position = self.positions.get((order.account_id, order.contract_id))
        if position is None:
            position = _Position(next(self._ids), order.account_id, order.contract_id)
            self.positions[(order.account_id, order.contract_id)] = position
        signed = qty if order.action == "Buy" else -qty
        if order.action == "Buy":
            position.bought += qty
            position.bought_value += price * qty
        else:
            position.sold += qty
            position.sold_value += price * qty
        account.realized += self._apply(position, signed, price, contract.name)
        position.updated = now
        await self._push("fill", "Created", fill.wire())
        await self._push("position", "Updated", position.wire())
        await self._push("cashBalance", "Updated", self._cash_balance(account))

    def _apply(self, position: _Position, signed: int, price: Decimal, contract_name: str) -> Decimal:
        """Move ``position`` by ``signed`` contracts at ``price``; return the realized P&L (average-price method)."""
        point_value = _point_value(contract_name)
        old, avg = position.net_pos, position.net_price or Decimal(0)
        realized = Decimal(0)
        if old == 0 or (old > 0) == (signed > 0):
            new = old + signed
            position.net_price = (avg * abs(old) + price * abs(signed)) / abs(new)
        else:
            closing = min(abs(old), abs(signed))
            realized = (price - avg) * closing * point_value * (1 if old > 0 else -1)
            new = old + signed
            if new == 0:
                position.net_price = None
            elif (new > 0) != (old > 0):
                position.net_price = price
        position.net_pos = new
        return realized

    async def _cancel_order(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        order = self.orders.get(_int(body.get("orderId")))
        if order is None:
            return web.json_response(_failure("UnknownReason", "Order not found"))
        if order.status not in WORKING_STATUSES:
            return web.json_response(_failure("TooLate", f"Order {order.id} is {order.status}"))
        order.status = "Canceled"
        await self._push("order", "Updated", order.wire())
        return web.json_response({"commandId": next(self._ids)})

    async def _liquidate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        account_id, contract_id = _int(body.get("accountId")), _int(body.get("contractId"))
        for order in self.orders.values():
            if order.account_id == account_id and order.contract_id == contract_id and \
                    order.status in WORKING_STATUSES:
                order.status = "Canceled"
                await self._push("order", "Updated", order.wire())
        position = self.positions.get((account_id, contract_id))
        if position is None or position.net_pos == 0:
            return web.json_response(_failure("UnknownReason", "No position to liquidate"))
        account, contract = self.accounts.get(account_id), self.contracts.get(contract_id)
        if account is None or contract is None:
            return web.json_response(_failure("UnknownReason", "Unknown account or contract"))
        return web.json_response(await self._place({
            "accountId": account_id, "accountSpec": account.name, "symbol": contract.name,
            "action": "Sell" if position.net_pos > 0 else "Buy", "orderQty": abs(position.net_pos),
            "orderType": "Market", "timeInForce": "Day"}))

    async def _order_list(self, request: web.Request) -> web.Response:
        return web.json_response([o.wire() for o in self.orders.values()])

    async def _order_item(self, request: web.Request) -> web.Response:
        order = self.orders.get(_int(request.query.get("id")))
        if order is None:
            return web.Response(status=404, text="Order not found")
        return web.json_response(order.wire())

    async def _order_version_deps(self, request: web.Request) -> web.Response:
        order = self.orders.get(_int(request.query.get("masterid")))
        return web.json_response([] if order is None else [order.wire_version()])

    async def _command_deps(self, request: web.Request) -> web.Response:
        order = self.orders.get(_int(request.query.get("masterid")))
        return web.json_response([] if order is None else [order.wire_command()])

    # -- positions, fills, cash -----------------------------------------------------------------------------------
    async def _position_list(self, request: web.Request) -> web.Response:
        return web.json_response([p.wire() for p in self.positions.values()])

    async def _fill_list(self, request: web.Request) -> web.Response:
        return web.json_response([f.wire() for f in self.fills.values()])

    async def _fill_deps(self, request: web.Request) -> web.Response:
        order_id = _int(request.query.get("masterid"))
        return web.json_response([f.wire() for f in self.fills.values() if f.order_id == order_id])

    def _fill_fees_of(self, fill_ids: Iterable[int]) -> list[dict[str, Any]]:
        if not self.fill_fees:  # a broker (or clearing firm) that reports no per-fill fees
            return []
        return [self.fills[i].wire_fee() for i in fill_ids if i in self.fills]

    async def _fill_fee_list(self, request: web.Request) -> web.Response:
        return web.json_response(self._fill_fees_of(self.fills))

    async def _fill_fee_deps(self, request: web.Request) -> web.Response:
        return web.json_response(self._fill_fees_of([_int(request.query.get("masterid"))]))

    async def _fill_fee_ldeps(self, request: web.Request) -> web.Response:
        ids = [_int(part) for part in request.query.get("masterids", "").split(",") if part.strip()]
        return web.json_response(self._fill_fees_of(ids))

    async def _fill_fee_item(self, request: web.Request) -> web.StreamResponse:
        found = self._fill_fees_of([_int(request.query.get("id"))])
        if not found:
            return web.Response(status=404, text="FillFee not found")
        return web.json_response(found[0])

    def _open_pnl(self, account_id: int) -> Decimal:
        total = Decimal(0)
        for (aid, cid), position in self.positions.items():
            if aid == account_id and position.net_pos and position.net_price is not None:
                name = self.contracts[cid].name
                total += (self.prices[cid] - position.net_price) * position.net_pos * _point_value(name)
        return total

    def _initial_margin(self, account_id: int) -> Decimal:
        total = Decimal(0)
        for (aid, cid), position in self.positions.items():
            if aid == account_id and position.net_pos:
                root = _root(self.contracts[cid].name)
                total += self.margins.get(root, self.margins.get("default", Decimal(0))) * abs(position.net_pos)
        return total

    def _cash_balance(self, account: _Account) -> dict[str, Any]:
        now = datetime.now(timezone.utc)
        return {"id": account.id, "accountId": account.id, "timestamp": wire_time(now),
                "tradeDate": _wire_trade_date(now), "currencyId": 1,
                "amount": _num(account.starting_cash + account.realized - account.fees),
                "realizedPnL": _num(account.realized), "weekRealizedPnL": _num(account.realized)}

    async def _cash_snapshot(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        account = self.accounts.get(_int(body.get("accountId")))
        if account is None:
            return web.json_response({"errorText": f"Account {body.get('accountId')} not found"})
        cash = account.starting_cash + account.realized - account.fees
        open_pnl = self._open_pnl(account.id)
        margin = self._initial_margin(account.id)
        return web.json_response({
            "errorCode": "Success", "totalCashValue": _num(cash), "totalPnL": _num(account.realized + open_pnl),
            "initialMargin": _num(margin), "maintenanceMargin": _num(margin * Decimal("0.9")),
            "netLiq": _num(cash + open_pnl), "openPnL": _num(open_pnl), "realizedPnL": _num(account.realized),
            "weekRealizedPnL": _num(account.realized)})

    # -- WebSocket ------------------------------------------------------------------------------------------------
    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        sock = _Socket(request, ws)
        self._sockets.add(sock)
        beat = asyncio.ensure_future(self._heartbeat(sock))
        try:
            await sock.send("o")
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                await self._ws_request(sock, msg.data)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            self._sockets.discard(sock)
        return ws

    async def _heartbeat(self, sock: _Socket) -> None:
        while not sock.ws.closed:
            await asyncio.sleep(self.server_heartbeat_s)
            if sock.authorized and not self._socket_token_valid(sock) and self.expired_socket == "close":
                await self._close_expired(sock)
                return
            if not self._muted:
                await sock.send("h")

    def _socket_token_valid(self, sock: _Socket) -> bool:
        """A socket lives on the token it was authorized with; renewing that token later does not extend it."""
        return sock.token is not None and self._token_valid(sock.token)

    async def _close_expired(self, sock: _Socket) -> None:
        await sock.send('c[1008,"Access token expired"]')
        if not sock.ws.closed:
            await sock.ws.close()

    async def _ws_request(self, sock: _Socket, text: str) -> None:
        if text.strip() == "[]":
            sock.heartbeats_received += 1
            return
        parts = text.split("\n", 3)
        if len(parts) < 2:
            return
        endpoint, raw_id = parts[0], parts[1]
        body = parts[3] if len(parts) > 3 else ""
        try:
            request_id = int(raw_id)
        except ValueError:
            return
        if endpoint == "authorize":
            token = body.strip()
            sock.authorized = self._token_valid(token)
            sock.token = token if sock.authorized else None
            if sock.authorized:
                await sock.send_messages({"s": 200, "i": request_id})
            else:
                await sock.send_messages({"s": 401, "i": request_id, "d": "Access is denied"})
            return
        if not sock.authorized or not self._socket_token_valid(sock):
            await sock.send_messages({"s": 401, "i": request_id, "d": "Not authorized"})
            return
        if endpoint == "user/syncrequest":
            try:
                parsed = json.loads(body) if body.strip() else {}
            except json.JSONDecodeError:
                parsed = {}
            ticket = parsed.get("p-ticket") if isinstance(parsed, dict) else None
            penalty: tuple[float, bool] | None = None
            if ticket is not None and ticket in self._tickets:
                wait = self._tickets.pop(ticket) - time.monotonic()
                if wait > 0:  # resent too early: the penalty stands
                    penalty = (wait, False)
                else:
                    self.tickets_honoured += 1
            elif self._sync_tickets:
                penalty = self._sync_tickets.pop(0)
            if penalty is not None:
                ticket_id = secrets.token_urlsafe(24)
                self._tickets[ticket_id] = time.monotonic() + penalty[0]
                await sock.send_messages({"s": 200, "i": request_id, "d": {
                    "p-ticket": ticket_id, "p-time": round(penalty[0], 3), "p-captcha": penalty[1]}})
                return
            sock.synced = True
            await sock.send_messages({"s": 200, "i": request_id, "d": self._snapshot()})
            return
        await sock.send_messages({"s": 404, "i": request_id, "d": f"Unknown operation {endpoint}"})

    def _snapshot(self) -> dict[str, Any]:
        return {
            "users": [{"id": self.user_id, "name": self.username, "status": "Active"}],
            "accounts": [a.wire() for a in self.accounts.values()],
            "contracts": [c.wire() for c in self.contracts.values()],
            "orders": [o.wire() for o in self.orders.values()],
            "orderVersions": [o.wire_version() for o in self.orders.values()],
            "commands": [o.wire_command() for o in self.orders.values()],
            "fills": [f.wire() for f in self.fills.values()],
            "positions": [p.wire() for p in self.positions.values()],
            "cashBalances": [self._cash_balance(a) for a in self.accounts.values()],
        }

    async def _push(self, entity_type: str, event_type: str, entity: Mapping[str, Any]) -> None:
        message = {"e": "props", "d": {"entityType": entity_type, "eventType": event_type, "entity": entity}}
        for sock in list(self._sockets):
            if not sock.synced:
                continue
            if not self._socket_token_valid(sock):
                self.withheld_pushes += 1
                if self.expired_socket == "close":
                    await self._close_expired(sock)
                continue  # "silent": heartbeats go on, events do not (the failure nobody notices)
            await sock.send_messages(message)


def _failure(reason: str, text: str) -> dict[str, Any]:
    return {"failureReason": reason, "failureText": text}


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _point_value(contract_name: str) -> Decimal:
    instrument = BUILTIN.get(_root(contract_name))
    return instrument.point_value if instrument else Decimal(1)


__all__ = ["TradovateEmulator", "DEFAULT_COMMISSIONS", "DEFAULT_MARGINS", "listed_contracts", "trade_date",
           "wire_time"]


def main(argv: list[str] | None = None) -> None:
    """Run the emulator by hand, e.g. for ``multibroker brokers check`` against it.

    Example: python -m brokers.emulators.tradovate --port 8098 --username trader --password secret
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m brokers.emulators.tradovate", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--username", default="trader")
    parser.add_argument("--password", default="secret")
    parser.add_argument("--sec", default=None, help="API secret the login must carry (default: not checked)")
    args = parser.parse_args(argv)
    emulator = TradovateEmulator(port=args.port, username=args.username, password=args.password, sec=args.sec)
    banner = lambda: (f"Tradovate emulator: rest {emulator.base_url}  websocket {emulator.ws_url}  accounts "  # noqa: E731
                      f"{', '.join(a.name for a in emulator.accounts.values())}")
    try:
        asyncio.run(serve_forever(emulator, banner))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
