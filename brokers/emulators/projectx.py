"""A ProjectX Gateway (TopstepX and other prop firms) on 127.0.0.1, speaking the real wire format.

Why an emulator rather than mocks: the connector's hardest duties (token expiry and re-login, envelope errors that
arrive with HTTP 200, 429 answers, a connection that dies after the order was accepted, ``customTag`` uniqueness)
only show up on a real socket. The emulator keeps a small but honest book: market orders fill at the price set per
contract, limit and stop orders rest until the price crosses them, positions net per contract, closing trades
carry ``profitAndLoss`` and every trade carries ``fees``.

Wire details reproduced on purpose:

- every endpoint is ``POST`` with a JSON body except ``GET /api/Status/ping``;
- every answer is ``{success, errorCode, errorMessage, ...}`` with HTTP 200 even when it failed; 401 (empty body)
  for a missing, unknown or expired token; 429 (empty body) over the request budget, with no ``Retry-After``
  (the rate-limit page names none; ``send_retry_after=True`` or ``rate_limit_next`` add one);
- ``customTag`` is unique per account (documented); the errorCode of a repeat is not documented, so it is a
  constructor argument (``duplicate_tag_error_code``, 2 by default, the code of any other refusal);
- times are ISO-8601 UTC with an offset; the gateway pages show six fractional digits, its SignalR pages seven
  (.NET ticks); we send seven (``2026-11-24T16:27:11.1234560+00:00``), the harder case;
- contract ids are ``CON.F.US.<product>.<month><yy>`` with the firms' product codes (ES is ``EP``, NQ ``ENQ``,
  MGC ``GMET``), found through ``/api/Contract/search``, whose names are the product code plus month and two-digit
  year (``ENQH25``), as in the documented example (``name_style="cme"`` gives ``NQH5`` instead);
- ``order_fields="legacy"``: orders as the first published ``Order/search`` example shows them, without
  ``fillVolume``, ``filledPrice``, ``customTag`` and ``symbolId``, and with ``updateTimestamp`` null;
- optionally the SignalR user hub at ``/hubs/user`` (JSON protocol, ``\\x1e``-terminated records).

Fault hooks (see ``brokers-shared.md``): ``reject_next``, ``partial_fill_next``, ``rate_limit_next``,
``lose_next_place_response``, ``drop_connection``/``restore_connection``, ``expire_tokens``,
``push_trade_before_answer_next`` (a trade pushed before anything that names its order's ``customTag``);
``trade_by_hand`` (an order another client of the account places and fills) and ``move_position`` (a position
change with no trade), for what the trader does outside the API.
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
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Awaitable, Callable, Iterable, Mapping

from aiohttp import WSMsgType, web

from brokers.emulators.common import EmulatorServer, check_parts, serve_forever, wire_decimal, wire_number
from brokers.timeconv import format_broker_time, parse_broker_time
from engine.catalog import BUILTIN, MONTH_CODES, Instrument

log = logging.getLogger(__name__)

RECORD_SEPARATOR = "\x1e"

PRODUCT_CODES: Mapping[str, str] = {
    "ES": "EP", "MES": "MES", "NQ": "ENQ", "MNQ": "MNQ", "YM": "YM", "MYM": "MYM", "RTY": "RTY", "M2K": "M2K",
    "CL": "CLE", "MCL": "MCLE", "GC": "GCE", "MGC": "GMET",
}
"""CME root -> the product code ProjectX firms put in contract ids (as seen in public gateway answers)."""

DEFAULT_FEES: Mapping[str, Decimal] = {
    "MES": Decimal("0.37"), "MNQ": Decimal("0.37"), "MYM": Decimal("0.37"), "M2K": Decimal("0.37"),
    "MCL": Decimal("0.52"), "MGC": Decimal("0.52"), "default": Decimal("1.40"),
}
"""Fees per contract per side, the order of magnitude prop firms charge."""

DEFAULT_PRICES: Mapping[str, Decimal] = {
    "ES": Decimal("6000"), "MES": Decimal("6000"), "NQ": Decimal("21000"), "MNQ": Decimal("21000"),
    "YM": Decimal("44000"), "MYM": Decimal("44000"), "RTY": Decimal("2300"), "M2K": Decimal("2300"),
    "CL": Decimal("70"), "MCL": Decimal("70"), "GC": Decimal("2600"), "MGC": Decimal("2600"),
}

# ProjectX enums (gateway documentation).
ORDER_LIMIT, ORDER_MARKET, ORDER_STOP_LIMIT, ORDER_STOP = 1, 2, 3, 4
SIDE_BUY, SIDE_SELL = 0, 1
STATUS_OPEN, STATUS_FILLED, STATUS_CANCELLED, STATUS_REJECTED, STATUS_PENDING = 1, 2, 3, 5, 6
POSITION_LONG, POSITION_SHORT = 1, 2

# Order/place error codes.
PLACE_ACCOUNT_NOT_FOUND, PLACE_ORDER_REJECTED, PLACE_CONTRACT_NOT_FOUND = 1, 2, 8
# Order/cancel error codes.
CANCEL_ACCOUNT_NOT_FOUND, CANCEL_ORDER_NOT_FOUND, CANCEL_REJECTED = 1, 2, 3

NO_AUTH_PATHS = frozenset({"/api/Auth/loginKey", "/api/Status/ping", "/hubs/user"})


def wire_time(value: datetime) -> str:
    """ProjectX's timestamp shape: UTC, seven fractional digits (100 ns ticks), ``+00:00``."""
    text = str(format_broker_time(value, "utc_iso"))
    base = value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if not text.startswith(base):  # pragma: no cover - guards against a change in timeconv's output
        raise ValueError(f"unexpected utc_iso rendering {text!r} of {value!r}")
    return f"{base}.{value.astimezone(timezone.utc).microsecond:06d}0+00:00"


_num = wire_number


@dataclass
class EmulatedContract:
    id: str
    code: str
    """CME code, e.g. ``MESZ6``."""
    root: str
    product: str
    instrument: Instrument
    active: bool
    description: str

    def wire(self, name_style: str) -> dict[str, Any]:
        month_year = self.id.rsplit(".", 1)[1]
        name = self.code if name_style == "cme" else f"{self.product}{month_year}"
        return {
            "id": self.id,
            "name": name,
            "description": self.description,
            "tickSize": _num(self.instrument.tick_size),
            "tickValue": _num(self.instrument.tick_value),
            "activeContract": self.active,
            "symbolId": f"F.US.{self.product}",
        }


@dataclass
class EmulatedOrder:
    id: int
    account_id: int
    contract_id: str
    type: int
    side: int
    size: int
    limit_price: Decimal | None
    stop_price: Decimal | None
    custom_tag: str | None
    created: datetime
    updated: datetime
    status: int = STATUS_OPEN
    fill_volume: int = 0
    filled_notional: Decimal = Decimal(0)
    pending_parts: list[int] = field(default_factory=list)

    @property
    def filled_price(self) -> Decimal | None:
        return None if not self.fill_volume else self.filled_notional / self.fill_volume

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "accountId": self.account_id,
            "contractId": self.contract_id,
            "symbolId": self.contract_id.removeprefix("CON.").rsplit(".", 1)[0],
            "creationTimestamp": wire_time(self.created),
            "updateTimestamp": wire_time(self.updated),
            "status": self.status,
            "type": self.type,
            "side": self.side,
            "size": self.size,
            "limitPrice": _num(self.limit_price),
            "stopPrice": _num(self.stop_price),
            "fillVolume": self.fill_volume,
            "filledPrice": _num(self.filled_price),
            "customTag": self.custom_tag,
        }


@dataclass
class EmulatedTrade:
    id: int
    account_id: int
    contract_id: str
    order_id: int
    price: Decimal
    profit_and_loss: Decimal | None
    fees: Decimal
    side: int
    size: int
    created: datetime
    voided: bool = False

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "accountId": self.account_id,
            "contractId": self.contract_id,
            "creationTimestamp": wire_time(self.created),
            "price": _num(self.price),
            "profitAndLoss": _num(self.profit_and_loss),
            "fees": _num(self.fees),
            "side": self.side,
            "size": self.size,
            "voided": self.voided,
            "orderId": self.order_id,
        }


@dataclass
class EmulatedPosition:
    id: int
    account_id: int
    contract_id: str
    quantity: int
    """Signed internally; the wire carries ``type`` 1/2 and a positive ``size``."""
    average_price: Decimal
    created: datetime

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "accountId": self.account_id,
            "contractId": self.contract_id,
            "creationTimestamp": wire_time(self.created),
            "type": POSITION_LONG if self.quantity > 0 else POSITION_SHORT,
            "size": abs(self.quantity),
            "averagePrice": _num(self.average_price),
        }


@dataclass
class EmulatedAccount:
    id: int
    name: str
    balance: Decimal
    can_trade: bool = True
    positions: dict[str, EmulatedPosition] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "balance": _num(self.balance), "canTrade": self.can_trade,
                "isVisible": True, "simulated": True}


def build_contracts(today: datetime, roots: Iterable[str] = PRODUCT_CODES) -> list[EmulatedContract]:
    """Listed months of this year and the next for every root; the nearest not-yet-past month is the active one."""
    contracts: list[EmulatedContract] = []
    for root in roots:
        inst = BUILTIN[root]
        product = PRODUCT_CODES.get(root, root)
        first = True
        for year in (today.year, today.year + 1):
            for month in inst.month_numbers():
                if (year, month) < (today.year, today.month):
                    continue
                letter = MONTH_CODES[month - 1]
                contracts.append(EmulatedContract(
                    id=f"CON.F.US.{product}.{letter}{year % 100:02d}",
                    code=f"{root}{letter}{year % 10}",
                    root=root,
                    product=product,
                    instrument=inst,
                    active=first,
                    description=f"{inst.description}: {datetime(year, month, 1).strftime('%B %Y')}",
                ))
                first = False
    return contracts


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ProjectXEmulator(EmulatorServer):
    """A ProjectX Gateway with one user, a few accounts, and a price per contract that tests set."""

    def __init__(
        self,
        *,
        port: int = 0,
        username: str = "trader",
        api_key: str = "emulator-key",
        accounts: Mapping[str, Decimal] | None = None,
        rate_limit: tuple[int, float] = (200, 60.0),
        fees: Mapping[str, Decimal] | None = None,
        token_lifetime_s: float = 24 * 3600,
        name_style: str = "product",
        partial_fill_interval_s: float = 0.05,
        today: datetime | None = None,
        duplicate_tag_error_code: int = 2,
        order_fields: str = "current",
        send_retry_after: bool = False,
    ) -> None:
        if name_style not in ("cme", "product"):
            raise ValueError(f"name_style must be 'cme' or 'product', got {name_style!r}")
        if order_fields not in ("current", "legacy"):
            raise ValueError(f"order_fields must be 'current' or 'legacy', got {order_fields!r}")
        super().__init__(port=port)
        self.username = username
        self.api_key = api_key
        self.rate_limit = rate_limit
        self.fees = dict(fees or DEFAULT_FEES)
        self.token_lifetime_s = token_lifetime_s
        self.name_style = name_style
        self.duplicate_tag_error_code = duplicate_tag_error_code
        self.order_fields = order_fields
        self.send_retry_after = send_retry_after
        self.partial_fill_interval_s = partial_fill_interval_s
        self.contracts = {c.id: c for c in build_contracts(today or datetime.now(timezone.utc))}
        self._ids = itertools.count(1000)
        self.accounts: dict[int, EmulatedAccount] = {}
        for name, balance in (accounts or {"PRAC-V2-EMU-1": Decimal(50000)}).items():
            account_id = next(self._ids)
            self.accounts[account_id] = EmulatedAccount(account_id, name, Decimal(balance))
        self.orders: dict[int, EmulatedOrder] = {}
        self.trades: list[EmulatedTrade] = []
        self.prices: dict[str, Decimal] = {}
        self.tokens: dict[str, float] = {}
        """Token -> expiry on the monotonic clock."""
        self.requests: collections.Counter[str] = collections.Counter()
        """Requests served per path (the tests' view of what the connector sent)."""
        self.logins = 0
        self.throttled = 0
        """Requests answered 429."""
        self._window: collections.deque[float] = collections.deque()
        self._reject_next: list[str] = []
        self._partial_next: list[list[int]] = []
        self._rate_limit_next: list[float | None] = []
        self._trade_first_next: list[tuple[float, int, float | None]] = []
        self._held: dict[int, tuple[float, list[dict[str, Any]]]] = {}
        """Order id -> (hold, its GatewayUserOrder events held back), for ``push_trade_before_answer_next``."""
        self._hubs: set[_HubClient] = set()
        self._routes: dict[str, Handler] = {
            "/api/Auth/loginKey": self._login_key,
            "/api/Auth/validate": self._validate,
            "/api/Account/search": self._account_search,
            "/api/Contract/search": self._contract_search,
            "/api/Contract/searchById": self._contract_search_by_id,
            "/api/Order/place": self._order_place,
            "/api/Order/cancel": self._order_cancel,
            "/api/Order/searchOpen": self._order_search_open,
            "/api/Order/search": self._order_search,
            "/api/Position/searchOpen": self._position_search_open,
            "/api/Position/closeContract": self._position_close,
            "/api/Trade/search": self._trade_search,
        }

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.origin

    @property
    def hub_url(self) -> str:
        return f"{self.base_url}/hubs/user"

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/api/{group}/{action}", self._dispatch)
        app.router.add_get("/api/Status/ping", self._ping)
        app.router.add_get("/hubs/user", self._hub)
        return app

    # -- test controls ----------------------------------------------------------------------------------------
    def contract(self, code_or_id: str) -> EmulatedContract:
        """The emulated contract by CME code (``MESZ6``) or gateway id."""
        if code_or_id in self.contracts:
            return self.contracts[code_or_id]
        for contract in self.contracts.values():
            if contract.code == code_or_id:
                return contract
        raise KeyError(f"emulator lists no contract {code_or_id!r}")

    def account_id(self, name: str) -> int:
        for account in self.accounts.values():
            if account.name == name:
                return account.id
        raise KeyError(f"emulator has no account {name!r}")

    def price(self, contract_id: str) -> Decimal:
        contract = self.contracts[contract_id]
        return self.prices.get(contract_id, DEFAULT_PRICES.get(contract.root, Decimal(100)))

    def set_price(self, code_or_id: str, price: Decimal) -> None:
        """Market orders fill at ``price`` from now on; resting orders the move crosses fill now."""
        contract = self.contract(code_or_id)
        self.prices[contract.id] = Decimal(price)
        self._check_resting(contract.id)

    def reject_next(self, n: int = 1, reason: str = "Order rejected: maximum position size exceeded") -> None:
        self._reject_next.extend([reason] * n)

    def partial_fill_next(self, parts: list[int]) -> None:
        self._partial_next.append(check_parts(parts))

    def rate_limit_next(self, n: int = 1, retry_after_s: float | None = 0.2) -> None:
        """The next ``n`` requests get 429; with ``Retry-After: retry_after_s`` unless it is None."""
        self._rate_limit_next.extend([retry_after_s] * n)

    def push_trade_before_answer_next(self, hold_s: float = 0.3, *, then_rate_limit: int = 0,
                                      retry_after_s: float | None = 0.2) -> None:
        """The next order placed through the API keeps its ``Order/place`` answer and its ``GatewayUserOrder``
        events back for ``hold_s`` while its trades (a market order fills at once) are pushed on the hub: a trade
        that overtakes everything its order's ``customTag`` could be learned from. The gateway documents no order
        among its pushes and answers, so a client must cope with this one.

        ``then_rate_limit``: the next that many requests after the placement get 429 (with ``retry_after_s``), so
        that the client's lookup of the trade's order fails: the place request itself is not among them."""
        self._trade_first_next.append((hold_s, then_rate_limit, retry_after_s))

    def _hold_order_events(self, order: EmulatedOrder) -> None:
        if self._trade_first_next:
            hold_s, then_rate_limit, retry_after_s = self._trade_first_next.pop(0)
            self._held[order.id] = (hold_s, [])
            self.rate_limit_next(then_rate_limit, retry_after_s)

    async def _release_held(self, order_id: Any) -> None:
        """After the hold, the held order's events go out (in order), then its answer."""
        if order_id not in self._held:
            return
        await asyncio.sleep(self._held[order_id][0])
        _, events = self._held.pop(order_id)
        for data in events:
            self._publish("GatewayUserOrder", data)

    def void_trade(self, trade_id: int) -> None:
        """Mark a trade voided (busted), as the gateway's ``voided`` flag reports; the book is not unwound."""
        next(t for t in self.trades if t.id == trade_id).voided = True

    def expire_tokens(self) -> None:
        """Every issued token is now past its life: the next authenticated request gets 401."""
        for token in self.tokens:
            self.tokens[token] = 0.0

    def trade_by_hand(self, account_name: str, contract: str, side: int, size: int,
                      custom_tag: str | None = None) -> int:
        """A market order placed and filled by another client of the account (the trader on the platform): the
        hub and ``Trade/search`` report it as any trade, but none of the faults injected for the API client
        (rejections, partial fills, throttling, lost answers) apply to it. ``contract``: CME code or id.
        Returns the trade id."""
        if side not in (SIDE_BUY, SIDE_SELL) or size <= 0:
            raise ValueError(f"a trade by hand needs side 0 or 1 and a positive size, got {side} {size}")
        now = datetime.now(timezone.utc)
        order = EmulatedOrder(next(self._ids), self.account_id(account_name), self.contract(contract).id,
                              ORDER_MARKET, side, size, None, None, custom_tag, now, now)
        self._enter(order)
        return self.trades[-1].id

    def net_position(self, account_name: str, contract: str) -> int:
        """Broker-side truth: the account's signed position in ``contract`` (CME code or id)."""
        position = self.accounts[self.account_id(account_name)].positions.get(self.contract(contract).id)
        return 0 if position is None else position.quantity

    def move_position(self, account_name: str, contract: str, signed: int) -> None:
        """The position changes by ``signed`` contracts with no order and no trade (a back-office correction, a
        transfer): ``Position/searchOpen`` shows it, nothing is pushed, only a reconciliation can notice."""
        account = self.accounts[self.account_id(account_name)]
        contract_id = self.contract(contract).id
        position = account.positions.get(contract_id)
        now = datetime.now(timezone.utc)
        if position is None or not position.quantity:
            account.positions[contract_id] = EmulatedPosition(next(self._ids), account.id, contract_id, signed,
                                                              self.price(contract_id), now)
            return
        if (position.quantity + signed > 0) != (position.quantity > 0):
            position.average_price, position.created = self.price(contract_id), now
        position.quantity += signed

    def order_count(self, account_id: int, custom_tag: str) -> int:
        return sum(1 for o in self.orders.values() if o.account_id == account_id and o.custom_tag == custom_tag)

    # -- read-outs in plain values (they cross a process boundary: tests that run the emulator in a process of
    # its own, as the broker is, read its book through these) ---------------------------------------------------
    def contract_names(self) -> list[str]:
        """Every contract the emulator lists, by CME code (``MESZ6``)."""
        return [c.code for c in self.contracts.values()]

    def order_book(self) -> list[dict[str, Any]]:
        """Every order the gateway holds: ``id``, ``account`` (name), ``custom_tag``, ``status`` (its number)."""
        return [{"id": o.id, "account": self.accounts[o.account_id].name, "custom_tag": o.custom_tag,
                 "status": o.status} for o in self.orders.values()]

    def fills_of(self, account_name: str) -> list[dict[str, Any]]:
        """Every trade of the account not voided, in the order the gateway made them: ``seq`` (1-based among all
        its trades), ``id``, ``custom_tag`` of its order, ``contract`` (CME code), ``side`` (0 buy, 1 sell),
        ``size``."""
        aid = self.account_id(account_name)
        return [{"seq": seq, "id": t.id, "custom_tag": self.orders[t.order_id].custom_tag,
                 "contract": self.contracts[t.contract_id].code, "side": t.side, "size": t.size}
                for seq, t in enumerate(self.trades, start=1) if t.account_id == aid and not t.voided]

    def positions_of(self, account_name: str) -> dict[str, int]:
        """The account's open positions: CME code -> signed quantity."""
        account = self.accounts[self.account_id(account_name)]
        return {self.contracts[cid].code: p.quantity for cid, p in account.positions.items() if p.quantity}

    def fill_count(self) -> int:
        """How many trades the gateway has made (any account, voided too): a mark to tell later trades by."""
        return len(self.trades)

    # -- HTTP plumbing ----------------------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        self._refuse_if_down(request)
        self.requests[request.path] += 1
        if request.path != "/hubs/user":
            if self._rate_limit_next:
                self.throttled += 1
                return _too_many(self._rate_limit_next.pop(0))
            now = time.monotonic()
            limit, window_s = self.rate_limit
            while self._window and self._window[0] <= now - window_s:
                self._window.popleft()
            if len(self._window) >= limit:
                self.throttled += 1
                return _too_many(self._window[0] + window_s - now if self.send_retry_after else None)
            self._window.append(now)
        if request.path not in NO_AUTH_PATHS and self._token_of(request) is None:
            return web.Response(status=401)
        return await handler(request)

    def _token_of(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else request.query.get("access_token", "")
        expiry = self.tokens.get(token)
        return token if expiry is not None and expiry > time.monotonic() else None

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="pong")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        handler = self._routes.get(request.path)
        if handler is None:
            raise web.HTTPNotFound()
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response(_fail(1, "The request body is not valid JSON."), status=400)
        if not isinstance(body, dict):
            return web.json_response(_fail(1, "The request body must be a JSON object."), status=400)
        if request.path == "/api/Auth/validate":
            body = {**body, "_token": self._token_of(request)}
        answer = await handler(body)
        await self._release_held(answer.get("orderId") if request.path == "/api/Order/place" else None)
        if request.path == "/api/Order/place" and answer.get("success"):
            lost = self._lose_this_answer(request)  # the order is in the book (and filled); its answer is not
            if lost is not None:
                return lost
        return web.json_response(answer)

    # -- endpoints --------------------------------------------------------------------------------------------
    async def _login_key(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("userName") != self.username or body.get("apiKey") != self.api_key:
            return {**_fail(3, "Invalid credentials."), "token": None}
        self.logins += 1
        token = secrets.token_urlsafe(32)
        self.tokens[token] = time.monotonic() + self.token_lifetime_s
        return {**_ok(), "token": token}

    async def _validate(self, body: dict[str, Any]) -> dict[str, Any]:
        old = body["_token"]
        token = secrets.token_urlsafe(32)
        self.tokens[token] = time.monotonic() + self.token_lifetime_s
        self.tokens.pop(old, None)
        return {**_ok(), "newToken": token}

    async def _account_search(self, body: dict[str, Any]) -> dict[str, Any]:
        only_active = bool(body.get("onlyActiveAccounts", True))
        accounts = [a.wire() for a in self.accounts.values() if a.can_trade or not only_active]
        return {**_ok(), "accounts": accounts}

    async def _contract_search(self, body: dict[str, Any]) -> dict[str, Any]:
        text = str(body.get("searchText") or "").upper()
        found = [c.wire(self.name_style) for c in self.contracts.values()
                 if text and (text in c.wire(self.name_style)["name"] or text in c.root or text in c.product)]
        return {**_ok(), "contracts": found[:20]}

    async def _contract_search_by_id(self, body: dict[str, Any]) -> dict[str, Any]:
        contract = self.contracts.get(str(body.get("contractId")))
        return {**_ok(), "contracts": [] if contract is None else [contract.wire(self.name_style)]}

    def _account_of(self, body: dict[str, Any]) -> EmulatedAccount | None:
        account_id = _int(body.get("accountId"))
        return None if account_id is None else self.accounts.get(account_id)

    async def _order_place(self, body: dict[str, Any]) -> dict[str, Any]:
        account = self._account_of(body)
        if account is None or not account.can_trade:
            return {**_fail(PLACE_ACCOUNT_NOT_FOUND, "Account not found."), "orderId": None}
        contract = self.contracts.get(str(body.get("contractId")))
        if contract is None:
            return {**_fail(PLACE_CONTRACT_NOT_FOUND, f"Contract {body.get('contractId')} not found."),
                    "orderId": None}
        tag = body.get("customTag")
        if tag is not None and self.order_count(account.id, str(tag)):
            return {**_fail(self.duplicate_tag_error_code, "Custom tag is not unique for this account."),
                    "orderId": None}
        order_type, side, size = _int(body.get("type")), _int(body.get("side")), _int(body.get("size"))
        if order_type not in (ORDER_LIMIT, ORDER_MARKET, ORDER_STOP) or side not in (SIDE_BUY, SIDE_SELL) \
                or size is None or size <= 0:
            return {**_fail(PLACE_ORDER_REJECTED, "Invalid order type, side or size."), "orderId": None}
        limit_price = _dec(body.get("limitPrice"))
        stop_price = _dec(body.get("stopPrice"))
        if (order_type == ORDER_LIMIT and limit_price is None) or (order_type == ORDER_STOP and stop_price is None):
            return {**_fail(PLACE_ORDER_REJECTED, "Missing limit or stop price."), "orderId": None}
        if self._reject_next:
            return {**_fail(PLACE_ORDER_REJECTED, self._reject_next.pop(0)), "orderId": None}
        now = datetime.now(timezone.utc)
        order = EmulatedOrder(next(self._ids), account.id, contract.id, order_type, side, size, limit_price,
                              stop_price, None if tag is None else str(tag), now, now)
        if order_type == ORDER_MARKET and self._partial_next:
            order.pending_parts = self._partial_next.pop(0)
        self._hold_order_events(order)
        self._enter(order)
        return {**_ok(), "orderId": order.id}

    def _enter(self, order: EmulatedOrder) -> None:
        """A new order at the gateway, from our API client or from the trader's platform alike: kept, published on
        the user hub, and filled (a market order, in its ``pending_parts`` when set) or left working."""
        self.orders[order.id] = order
        self._publish("GatewayUserOrder", self._order_wire(order))
        if order.type == ORDER_MARKET:
            self._fill_market(order)
        else:
            self._check_resting(order.contract_id)

    async def _order_cancel(self, body: dict[str, Any]) -> dict[str, Any]:
        if _int(body.get("accountId")) not in self.accounts:
            return _fail(CANCEL_ACCOUNT_NOT_FOUND, "Account not found.")
        order = self.orders.get(_int(body.get("orderId")) or -1)
        if order is None or order.account_id != _int(body.get("accountId")):
            return _fail(CANCEL_ORDER_NOT_FOUND, "Order not found.")
        if order.status != STATUS_OPEN:
            return _fail(CANCEL_REJECTED, "Order is not open.")
        order.status = STATUS_CANCELLED
        order.pending_parts = []
        order.updated = datetime.now(timezone.utc)
        self._publish("GatewayUserOrder", self._order_wire(order))
        return _ok()

    async def _order_search_open(self, body: dict[str, Any]) -> dict[str, Any]:
        account_id = _int(body.get("accountId"))
        orders = [self._order_wire(o) for o in self.orders.values()
                  if o.account_id == account_id and o.status == STATUS_OPEN]
        return {**_ok(), "orders": orders}

    async def _order_search(self, body: dict[str, Any]) -> dict[str, Any]:
        account_id = _int(body.get("accountId"))
        try:
            start, end = _window(body)
        except (KeyError, TypeError, ValueError) as exc:
            return {**_fail(1, f"Invalid timestamp filter: {exc}"), "orders": []}
        orders = [self._order_wire(o) for o in self.orders.values()
                  if o.account_id == account_id and start <= o.created and (end is None or o.created <= end)]
        return {**_ok(), "orders": orders}

    async def _position_search_open(self, body: dict[str, Any]) -> dict[str, Any]:
        account = self._account_of(body)
        positions = [] if account is None else [p.wire() for p in account.positions.values() if p.quantity]
        return {**_ok(), "positions": positions}

    async def _position_close(self, body: dict[str, Any]) -> dict[str, Any]:
        account = self._account_of(body)
        if account is None:
            return _fail(1, "Account not found.")
        position = account.positions.get(str(body.get("contractId")))
        if position is None or not position.quantity:
            return _fail(2, "Position not found.")
        now = datetime.now(timezone.utc)
        side = SIDE_SELL if position.quantity > 0 else SIDE_BUY
        order = EmulatedOrder(next(self._ids), account.id, position.contract_id, ORDER_MARKET, side,
                              abs(position.quantity), None, None, None, now, now)
        self.orders[order.id] = order
        self._fill_market(order)
        return _ok()

    async def _trade_search(self, body: dict[str, Any]) -> dict[str, Any]:
        account_id = _int(body.get("accountId"))
        try:
            start, end = _window(body)
        except (KeyError, TypeError, ValueError) as exc:
            return {**_fail(1, f"Invalid timestamp filter: {exc}"), "trades": []}
        trades = [t.wire() for t in self.trades
                  if t.account_id == account_id and start <= t.created and (end is None or t.created <= end)]
        return {**_ok(), "trades": trades}

    def _order_wire(self, order: EmulatedOrder) -> dict[str, Any]:
        wire = order.wire()
        if self.order_fields == "legacy":
            for key in ("fillVolume", "filledPrice", "customTag", "symbolId"):
                wire.pop(key, None)
            wire["updateTimestamp"] = None
        return wire

    # -- the book ---------------------------------------------------------------------------------------------
    def _fill_market(self, order: EmulatedOrder) -> None:
        if not order.pending_parts:
            self._execute(order, order.size, self.price(order.contract_id))
            return
        first = min(order.pending_parts.pop(0), order.size)
        self._execute(order, first, self.price(order.contract_id))
        if order.status == STATUS_OPEN:
            self._spawn(self._fill_rest(order))

    async def _fill_rest(self, order: EmulatedOrder) -> None:
        while order.status == STATUS_OPEN:
            await asyncio.sleep(self.partial_fill_interval_s)
            if order.status != STATUS_OPEN:
                return
            part = order.pending_parts.pop(0) if order.pending_parts else order.size - order.fill_volume
            self._execute(order, min(part, order.size - order.fill_volume), self.price(order.contract_id))

    def _check_resting(self, contract_id: str) -> None:
        price = self.price(contract_id)
        for order in list(self.orders.values()):
            if order.contract_id != contract_id or order.status != STATUS_OPEN or order.type == ORDER_MARKET:
                continue
            buy = order.side == SIDE_BUY
            if order.type == ORDER_LIMIT:
                assert order.limit_price is not None
                if (buy and price <= order.limit_price) or (not buy and price >= order.limit_price):
                    self._execute(order, order.size - order.fill_volume, order.limit_price)
            elif order.type == ORDER_STOP:
                assert order.stop_price is not None
                if (buy and price >= order.stop_price) or (not buy and price <= order.stop_price):
                    self._execute(order, order.size - order.fill_volume, price)

    def _execute(self, order: EmulatedOrder, quantity: int, price: Decimal) -> None:
        """Fill ``quantity`` of ``order`` at ``price``: trade, position, balance, order state, hub events."""
        if quantity <= 0:
            return
        now = datetime.now(timezone.utc)
        account = self.accounts[order.account_id]
        contract = self.contracts[order.contract_id]
        signed = quantity if order.side == SIDE_BUY else -quantity
        fees = self.fees.get(contract.root, self.fees["default"]) * quantity
        pnl: Decimal | None = None
        position = account.positions.get(order.contract_id)
        if position is None or not position.quantity:
            position = EmulatedPosition(next(self._ids), account.id, order.contract_id, signed, price, now)
            account.positions[order.contract_id] = position
        elif (position.quantity > 0) == (signed > 0):
            total = position.quantity + signed
            position.average_price = (position.average_price * position.quantity + price * signed) / total
            position.quantity = total
        else:
            closed = min(abs(signed), abs(position.quantity))
            direction = 1 if position.quantity > 0 else -1
            pnl = (price - position.average_price) * closed * direction * contract.instrument.point_value
            remaining = position.quantity + signed
            if remaining and (remaining > 0) != (position.quantity > 0):
                position.average_price = price  # reversed through flat: the rest opens at this price
                position.created = now
            position.quantity = remaining
        account.balance += (pnl or Decimal(0)) - fees
        trade = EmulatedTrade(next(self._ids), account.id, order.contract_id, order.id, price, pnl, fees,
                              order.side, quantity, now)
        self.trades.append(trade)
        order.fill_volume += quantity
        order.filled_notional += price * quantity
        order.updated = now
        if order.fill_volume >= order.size:
            order.status = STATUS_FILLED
        self._publish("GatewayUserTrade", trade.wire())
        self._publish("GatewayUserOrder", self._order_wire(order))
        self._publish("GatewayUserPosition", position.wire() if position.quantity else
                      {**position.wire(), "size": 0})
        self._publish("GatewayUserAccount", account.wire())

    # -- SignalR user hub -------------------------------------------------------------------------------------
    async def _hub(self, request: web.Request) -> web.StreamResponse:
        if self._token_of(request) is None:
            return web.Response(status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        client = _HubClient(ws)
        self._hubs.add(client)
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    break
                for record in message.data.split(RECORD_SEPARATOR):
                    if record:
                        await self._hub_record(client, json.loads(record))
        finally:
            self._hubs.discard(client)
        return ws

    async def _hub_record(self, client: "_HubClient", record: dict[str, Any]) -> None:
        if not client.handshaken:
            if record.get("protocol") != "json":
                await client.send({"error": "Only the json protocol is supported."})
                await client.ws.close()
                return
            client.handshaken = True
            await client.send({})
            return
        kind = record.get("type")
        if kind == 6:
            await client.send({"type": 6})
        elif kind == 7:
            await client.ws.close()
        elif kind == 1:
            target = str(record.get("target"))
            args = record.get("arguments") or []
            error = None
            if target == "SubscribeAccounts":
                client.accounts_all = True
            elif target in ("SubscribeOrders", "SubscribePositions", "SubscribeTrades") and args:
                client.subscriptions.add((target.removeprefix("Subscribe").rstrip("s"), _int(args[0]) or -1))
            else:
                error = f"Unknown hub method {target!r}."
            if record.get("invocationId") is not None:
                reply: dict[str, Any] = {"type": 3, "invocationId": record["invocationId"]}
                if error:
                    reply["error"] = error
                await client.send(reply)

    def _publish(self, target: str, data: dict[str, Any]) -> None:
        if target == "GatewayUserOrder" and data.get("id") in self._held:
            self._held[data["id"]][1].append(data)
            return
        kind = target.removeprefix("GatewayUser")
        for client in list(self._hubs):
            if kind == "Account":
                wanted = client.accounts_all
            else:
                wanted = (kind, data.get("accountId")) in client.subscriptions
            if wanted:
                self._spawn(client.send({"type": 1, "target": target,
                                         "arguments": [{"action": 1, "data": data}]}))

    async def _close_streams(self) -> None:
        for client in list(self._hubs):
            await client.ws.close()
        self._hubs.clear()


@dataclass(eq=False)
class _HubClient:
    ws: web.WebSocketResponse
    handshaken: bool = False
    accounts_all: bool = False
    subscriptions: set[tuple[str, int]] = field(default_factory=set)

    async def send(self, record: dict[str, Any]) -> None:
        if not self.ws.closed:
            try:
                await self.ws.send_str(json.dumps(record) + RECORD_SEPARATOR)
            except ConnectionError:
                pass


def _ok() -> dict[str, Any]:
    return {"success": True, "errorCode": 0, "errorMessage": None}


def _fail(code: int, message: str) -> dict[str, Any]:
    return {"success": False, "errorCode": code, "errorMessage": message}


def _too_many(retry_after_s: float | None) -> web.Response:
    if retry_after_s is None:
        return web.Response(status=429)
    return web.Response(status=429, headers={"Retry-After": f"{max(retry_after_s, 0):g}"})


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_dec = wire_decimal


def _window(body: Mapping[str, Any]) -> tuple[datetime, datetime | None]:
    start = parse_broker_time(body["startTimestamp"], "utc_iso")
    end_text = body.get("endTimestamp")
    return start, None if end_text is None else parse_broker_time(end_text, "utc_iso")


__all__ = ["ProjectXEmulator", "PRODUCT_CODES", "DEFAULT_FEES", "build_contracts", "wire_time"]


async def _serve(port: int, username: str, api_key: str) -> None:
    emulator = ProjectXEmulator(port=port, username=username, api_key=api_key)
    await serve_forever(emulator, lambda: (
        f"ProjectX emulator: rest {emulator.base_url}  hub {emulator.hub_url}  accounts "
        f"{', '.join(a.name for a in emulator.accounts.values())}"))


def main(argv: list[str] | None = None) -> None:
    """Run the emulator by hand, e.g. for ``multibroker brokers check`` against it.

    Example: python -m brokers.emulators.projectx --port 8099 --username trader --api-key emulator-key
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m brokers.emulators.projectx", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--username", default="trader")
    parser.add_argument("--api-key", default="emulator-key")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.port, args.username, args.api_key))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
