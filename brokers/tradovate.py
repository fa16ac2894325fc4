"""Tradovate connector (REST + user-data WebSocket).

What makes Tradovate different, and how this module copes:

- **Failures hide in HTTP 200.** A refused login is ``{"errorText": ...}``; a refused order is ``{failureReason,
  failureText}``; a throttled request is a *penalty ticket* ``{"p-ticket", "p-time", "p-captcha"}``: we wait
  ``p-time`` seconds (every request waits: the limiter is penalized) and resend the same body with ``p-ticket``
  added as a body field (Tradovate's request-limit FAQ; for a GET it goes in the query: unverified), which is safe
  because a ticketed request was not executed. ``p-captcha: true`` means no automated retry (Tradovate says: try
  again in an hour): we stop with ``CaptchaRequired``. HTTP 429 (empty body) is the lock-out on a rolling hour,
  423 its warning: we wait (``Retry-After`` if present, else ``throttle_wait_s`` doubling) and a placement
  surfaces ``RateLimited`` to the idempotent ``place_order``.
- **Tokens expire** (``expirationTime``; about 80 minutes, 90 in the partner docs): the token is renewed with
  ``GET /auth/renewaccesstoken`` shortly before it, which extends the session without a new login (logins are
  limited and a new session can kick out the old one), in the background even when idle. A 401 triggers one
  fresh login and a resend (nothing was done).
- **The user-data socket lives on the token it was authorized with.** Tradovate does not say whether a renewal
  carries over to a socket authorized earlier, and a socket outliving its token has been seen to stop delivering
  events without closing (no ``c`` frame, heartbeats continue). So after every renewal (or fresh login) the socket
  is replaced by one authorized with the current token, and at the latest a heartbeat before its token expires.
  Only documented steps are used (open, ``authorize``, ``user/syncrequest``); the sync snapshot of the new socket
  covers the moments between the two, and fills already reported are not reported again.
- **clOrdId is not deduplicated by Tradovate and lives on the Command**, not the order. We send our
  ``client_order_id`` as ``clOrdId``; ``find_order`` reads ``/order/list`` and, for orders we have not seen,
  ``/command/deps?masterid=``. Any doubt about a placement (timeout, reset) is ``OutcomeUnknown`` so the base class
  looks before it resends.
- **An order carries no quantity or price**: those live on its ``orderVersion``; filled quantity and average price
  come from its fills. Fills carry no account (their order does) and no fees: the fees of a fill are its
  ``FillFee`` (``commission``, ``clearingFee``, ``exchangeFee``, ``nfaFee``, ``brokerageFee``, ``ipFee``,
  ``orderRoutingFee``), and ``Fill.commission`` is their sum. Events ask ``/fillFee/deps?masterid=<fill id>``
  once per fill; ``fills_since`` reads ``/fillFee/list`` once. When Tradovate reports no fees for a fill, or the
  ask fails (a fill is never held back for its fees), the Broker document's ``commissions`` stand in
  (``broker.commission(root)`` per contract per side).
- **Realized P&L**: ``realizedPnL`` of ``/cashBalance/getcashbalancesnapshot`` is taken as gross of fees (fees
  are cash changes of their own, apart from the ``TradePaired`` change that carries the P&L), so today's
  ``Fill.commission`` figures are subtracted: the same numbers ``fills_since`` reports.
- **Events** come over the WebSocket (frames ``o``/``h``/``a[...]``/``c[...]``): ``authorize``, then
  ``user/syncrequest`` (a snapshot that also catches up after a reconnect; a penalty ticket as its answer is waited
  out and the request resent with the ticket), then pushed ``props``. We send ``[]``
  every 2.5 s and treat a socket silent for ``ws_timeout_s`` as dead. When the socket is down the connector polls
  ``/order/list`` and ``/fill/list`` instead; both paths feed one de-duplicating state.
- **Times** are ISO-8601 UTC with ``Z`` (milliseconds in the docs' examples, none in some); ``tradeDate`` is
  ``{year, month, day}``.

Unverified (the documentation is silent; the safest reading is kept): whether ``realizedPnL`` is gross (taken as
gross, as above); whether ``FillFee.id`` equals its fill's id (the entity has no ``fillId``; assumed, as its
fill's 1:1 dependent, for ``/fillFee/list``; ``/fillFee/deps`` needs no such assumption); the fee currencies (all
taken to be the account's); whether fees exist at the moment a fill is pushed (if not, the event carries the
Broker document's figure and ``fills_since`` the broker's later; so does an event whose fee lookup failed);
whether renewal extends an authorized socket (we never rely on it); whether the renewed token replaces the old one
at once (we switch at once); ``clOrdId`` deduplication (none assumed); the exact 429 wait (none documented:
``throttle_wait_s``, doubling to an hour).

Options (keyword arguments): ``request_timeout_s`` (10), ``renew_before_s`` (600: renew that long before expiry,
at most a quarter of the token's life), ``throttle_wait_s`` (60), ``heartbeat_s`` (2.5), ``ws_timeout_s`` (10),
``use_websocket`` (True), ``poll_interval_s`` (2), ``reconnect_backoff_s`` (0.5, doubling to
``reconnect_backoff_max_s`` 10), ``reconnect_wait_s`` (10: how long an unknown outcome waits for the broker before
giving up the lookup), ``order_lookback_days`` (7), ``safety_poll_s`` (30: a poll even while the socket is live,
in case it lost an event), ``fee_wait_s`` (2: how long a pushed fill waits for its fees before the Broker
document's commission stands in).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Mapping, overload

import aiohttp

from brokers.base import (
    AccountSnapshot,
    AuthError,
    BrokerError,
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
from brokers.http import Attempts, Backoff, HttpConnector, Known, Throttle, accepted_order, dec
from brokers.ratelimit import BrokerRateLimiter
from brokers.timeconv import parse_broker_time, trading_day_start

if TYPE_CHECKING:
    from engine.model import Broker

log = logging.getLogger(__name__)

DEFAULT_REST = {"demo": "https://demo.tradovateapi.com/v1", "live": "https://live.tradovateapi.com/v1"}
DEFAULT_WEBSOCKET = {"demo": "wss://demo.tradovateapi.com/v1/websocket",
                     "live": "wss://live.tradovateapi.com/v1/websocket"}
PLACE_PATH = "/order/placeorder"
MAX_TICKETS = 5
"""Penalty tickets honoured in a row for one request before we give up and report RateLimited."""

WIRE_ORDER_TYPES = {OrderType.MARKET: "Market", OrderType.LIMIT: "Limit", OrderType.STOP: "Stop"}
FROM_WIRE_ORDER_TYPE = {"Market": OrderType.MARKET, "Limit": OrderType.LIMIT, "Stop": OrderType.STOP,
                        "StopLimit": OrderType.STOP, "TrailingStop": OrderType.STOP,
                        "TrailingStopLimit": OrderType.STOP, "MIT": OrderType.STOP, "QTS": OrderType.MARKET}
"""Everything that waits for a trigger is a stop in the normalized model."""
WIRE_TIME_IN_FORCE = {"day": "Day", "gtc": "GTC", "ioc": "IOC", "fok": "FOK"}
FEE_FIELDS = ("commission", "clearingFee", "exchangeFee", "nfaFee", "brokerageFee", "ipFee", "orderRoutingFee")
"""The money fields of a ``FillFee``; together they are what a fill cost."""
WIRE_ACTION = {Side.BUY: "Buy", Side.SELL: "Sell"}
FROM_WIRE_ACTION = {"Buy": Side.BUY, "Sell": Side.SELL}


class CaptchaRequired(BrokerError):
    """Tradovate wants a person to solve a captcha (``p-captcha``): no automated retry may follow."""


# -- pure wire logic ---------------------------------------------------------------------------------------------
def order_status(ord_status: str, filled: int) -> OrderStatus:
    """Tradovate ``ordStatus`` to ours. Orders pending a cancel or replace are still live (working);
    ``Completed`` (done for the day) is filled when something filled, else cancelled."""
    if ord_status in ("Working", "PendingCancel", "PendingReplace"):
        return OrderStatus.PARTIALLY_FILLED if filled > 0 else OrderStatus.WORKING
    if ord_status == "Completed":
        return OrderStatus.FILLED if filled > 0 else OrderStatus.CANCELLED
    return {
        "PendingNew": OrderStatus.PENDING, "Suspended": OrderStatus.PENDING, "Filled": OrderStatus.FILLED,
        "Canceled": OrderStatus.CANCELLED, "Expired": OrderStatus.EXPIRED, "Rejected": OrderStatus.REJECTED,
    }.get(ord_status, OrderStatus.UNKNOWN)


def place_body(request: OrderRequest, account_id: int) -> dict[str, Any]:
    """The ``/order/placeorder`` body for ``request``; ``clOrdId`` carries our client order id."""
    tif = WIRE_TIME_IN_FORCE.get(request.time_in_force.lower())
    if tif is None:
        raise ValueError(f"Tradovate has no time in force {request.time_in_force!r}; "
                         f"known: {', '.join(WIRE_TIME_IN_FORCE)}")
    body: dict[str, Any] = {
        "accountSpec": request.account,
        "accountId": account_id,
        "action": WIRE_ACTION[request.side],
        "symbol": request.contract,
        "orderQty": request.quantity,
        "orderType": WIRE_ORDER_TYPES[request.order_type],
        "timeInForce": tif,
        "isAutomated": True,
        "clOrdId": request.client_order_id,
    }
    if request.limit_price is not None:
        body["price"] = float(request.limit_price)
    if request.stop_price is not None:
        body["stopPrice"] = float(request.stop_price)
    return body


def fill_fee_total(wire: Mapping[str, Any]) -> Decimal | None:
    """Everything a ``FillFee`` charges (commission, clearing, exchange, NFA, brokerage, IP, routing fees), or
    None when it states none of them (then the Broker document's figure stands in)."""
    amounts = [dec(wire.get(name)) for name in FEE_FIELDS]
    present = [a for a in amounts if a is not None]
    return sum(present, Decimal(0)) if present else None


def rejection_reason(payload: Mapping[str, Any]) -> str:
    """``failureReason: failureText`` of a refused order, in the broker's words."""
    reason = str(payload.get("failureReason") or "UnknownReason")
    text = payload.get("failureText")
    return f"{reason}: {text}" if text else reason


@dataclass(frozen=True)
class Frame:
    """One SockJS-like WebSocket frame: ``kind`` is open, heartbeat, messages or close."""

    kind: str
    data: Any = None


def parse_frame(text: str) -> Frame:
    """``o`` / ``h`` / ``a[...]`` (a JSON array of messages) / ``c[code, "reason"]``."""
    if text == "o":
        return Frame("open")
    if text == "h":
        return Frame("heartbeat")
    if text[:1] in ("a", "c"):
        try:
            data = json.loads(text[1:])
        except json.JSONDecodeError as exc:
            raise ValueError(f"malformed Tradovate frame {text[:80]!r}: {exc}") from None
        if not isinstance(data, list):
            raise ValueError(f"malformed Tradovate frame {text[:80]!r}: not an array")
        return Frame("messages" if text[0] == "a" else "close", data)
    raise ValueError(f"unknown Tradovate frame {text[:80]!r}")


def encode_request(endpoint: str, request_id: int, body: str = "", query: str = "") -> str:
    """A WebSocket request: ``endpoint\\nid\\nquery\\nbody``."""
    return f"{endpoint}\n{request_id}\n{query}\n{body}"


def penalty_ticket(payload: Any) -> tuple[str, float, bool] | None:
    """``(ticket, wait seconds, captcha)`` when ``payload`` is a penalty ticket, else None."""
    if not isinstance(payload, dict) or "p-ticket" not in payload:
        return None
    try:
        wait = max(float(payload.get("p-time") or 0), 0.0)
    except (TypeError, ValueError):
        wait = 0.0
    return str(payload["p-ticket"]), wait, bool(payload.get("p-captcha"))


@register
class TradovateConnector(HttpConnector):
    type = "tradovate"
    label = "Tradovate"

    def __init__(self, broker: "Broker", *, env: Mapping[str, str] | None = None, **options: Any) -> None:
        super().__init__(broker, env=env, **options)
        endpoints = broker.endpoints or {}
        environment = broker.environment if broker.environment in DEFAULT_REST else "demo"
        self.base_url = str(endpoints.get("rest") or DEFAULT_REST[environment]).rstrip("/")
        self.ws_url = str(endpoints.get("websocket") or DEFAULT_WEBSOCKET[environment])
        self.app: Mapping[str, Any] = dict((broker.options or {}).get("app") or {})
        self.renew_before_s = float(options.get("renew_before_s", 600.0))
        self.throttle_wait_s = float(options.get("throttle_wait_s", 60.0))
        self.heartbeat_s = float(options.get("heartbeat_s", 2.5))
        self.fee_wait_s = float(options.get("fee_wait_s", 2.0))
        """Bounds the fee ask of a pushed fill, which runs inside the socket's reader: after a 429 every request
        waits out the broker's penalty (``throttle_wait_s``, 60 s doubling), and every event behind the fill with
        it."""
        self.ws_timeout_s = float(options.get("ws_timeout_s", 10.0))
        self.use_websocket = bool(options.get("use_websocket", True))
        self.limiter = BrokerRateLimiter.for_broker(broker.rate_limit)
        self.throttle = Throttle(self.throttle_wait_s, 3600.0, 3)
        self._token_expiry: datetime | None = None
        self._token_life_s = 0.0
        self._user_id: int | None = None
        self._contract_ids: dict[str, int] = {}
        self._contract_names: dict[int, str] = {}
        self._cl_ord_ids: dict[int, str | None] = {}
        self._versions: dict[int, dict[str, Any]] = {}
        self._order_accounts: dict[int, int] = {}
        self._fills: dict[int, dict[int, dict[str, Any]]] = {}
        """order id -> fill id -> fill, as pushed or polled (for events; REST answers read fills afresh)."""
        self._seen_fills: set[int] = set()
        self._fill_fees: dict[int, Decimal | None] = {}
        """fill id -> its FillFee total (None: asked, the broker had none yet)."""
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ws_live = asyncio.Event()
        self._ws_token: str | None = None
        """The token the live socket was authorized with (it lives on that token, not on later renewals)."""
        self._ws_token_expiry: datetime | None = None
        self.ws_rotations = 0
        self._ws_ids = itertools.count(2)
        self._last_frame = 0.0
        self._last_sent = 0.0
        self.renewals = 0
        self.heartbeats_sent = 0

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def websocket_live(self) -> bool:
        """True while the user-data WebSocket is authorized, synced and delivering events."""
        return self._ws_live.is_set()

    def _start_background(self) -> list[asyncio.Task[None]]:
        name = self.broker.name
        return [asyncio.create_task(self._keep_connected(), name=f"tradovate-events-{name}"),
                asyncio.create_task(self._keep_token(), name=f"tradovate-token-{name}")]

    async def _close_streams(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        self._ws_live.clear()

    async def close(self) -> None:
        await super().close()
        self._token_expiry = None

    # -- transport --------------------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                       body: Mapping[str, Any] | None = None, kind: str = "poll", auth: bool = True,
                       force: bool = False) -> Any:
        """Send one REST request and return its JSON answer, having dealt with what Tradovate asks.

        401 -> one fresh login and a resend; penalty ticket -> wait ``p-time`` and resend with the ticket (the
        ticketed request was not executed), captcha -> ``CaptchaRequired``; 429 -> the limiter is penalized and
        the request resent, except a placement, which raises ``RateLimited`` so that the idempotent
        ``place_order`` decides. A connection refused is ``BrokerUnavailable`` (nothing sent); a connection lost
        after sending is ``OutcomeUnknown`` for a placement (the order may exist).
        """
        self._require_connection(path, force=force)
        placing = path == PLACE_PATH
        body = None if body is None else dict(body)
        query = {k: str(v) for k, v in (params or {}).items()}
        attempts = Attempts()
        tickets = 0
        while True:
            text = await self._exchange(method, path, params=query or None, body=body, kind=kind, auth=auth,
                                        placing=placing, attempts=attempts)
            if text is None:
                continue
            try:
                payload = json.loads(text) if text else None
            except json.JSONDecodeError:
                if placing:
                    raise OutcomeUnknown(f"Tradovate {self.broker.name}: {path} answered {text[:200]!r}") from None
                raise BrokerError(f"Tradovate {self.broker.name}: {path} answered {text[:200]!r}, not JSON") from None
            ticket = penalty_ticket(payload)
            if ticket is None:
                return payload
            ticket_id, wait_s, captcha = ticket
            self.limiter.penalize(wait_s)
            if captcha:
                raise CaptchaRequired(
                    f"Tradovate {self.broker.name}: {path} needs a captcha (penalty of {wait_s:g}s): automated "
                    f"requests must stop; log in once through Tradovate's own site or app, then restart")
            tickets += 1
            if tickets > MAX_TICKETS:
                raise RateLimited(wait_s, f"(Tradovate {self.broker.name} {path}: {MAX_TICKETS} penalty tickets)")
            log.warning("Tradovate %s: penalty ticket on %s; resending in %.1fs", self.broker.name, path, wait_s)
            if body is not None:
                body["p-ticket"] = ticket_id
            else:
                query["p-ticket"] = ticket_id

    async def _reconnect_once(self) -> bool:
        """One attempt to come back: accounts (with a fresh token if it lapsed). True when connected again."""
        if self._session is None:
            return False
        try:
            await self._load_accounts()
        except BrokerError as exc:
            log.debug("Tradovate %s: reconnect failed: %s", self.broker.name, exc)
            return False
        self._mark_reconnected()
        return True

    # -- auth -------------------------------------------------------------------------------------------------
    def _login_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.credential("username"), "password": self.credential("password")}
        if "sec" in self.broker.credentials:
            body["sec"] = self.credential("sec")
        for wire_name, field_name in (("appId", "app_id"), ("appVersion", "app_version"), ("cid", "cid"),
                                      ("deviceId", "device_id")):
            if self.app.get(field_name) is not None:
                body[wire_name] = self.app[field_name]
        return body

    async def _request_token(self) -> None:
        payload = await self._request("POST", "/auth/accesstokenrequest", body=self._login_body(),
                                      kind="order", auth=False, force=True)
        if not isinstance(payload, dict) or payload.get("errorText") or not payload.get("accessToken"):
            reason = payload.get("errorText") if isinstance(payload, dict) else None
            raise AuthError(f"Tradovate {self.broker.name}: login refused: {reason or 'no access token'}")
        self._take_token(payload)
        if payload.get("userId") is not None:
            self._user_id = int(payload["userId"])

    def _take_token(self, payload: Mapping[str, Any]) -> None:
        self._token = str(payload["accessToken"])
        now = utcnow()
        try:
            expiry = parse_broker_time(payload["expirationTime"], "utc_iso")
        except (KeyError, TypeError, ValueError):
            expiry = now + timedelta(minutes=80)  # the documented life, when the answer does not say
        self._token_expiry = expiry
        self._token_life_s = max((expiry - now).total_seconds(), 0.0)

    def _token_due(self) -> bool:
        """Shortly before ``expirationTime`` (at most a quarter of the token's life before it)."""
        if self._token is None or self._token_expiry is None:
            return True
        margin = min(self.renew_before_s, self._token_life_s / 4)
        return (self._token_expiry - utcnow()).total_seconds() <= margin

    async def _renew(self, token: str) -> bool:
        """Renew ``token`` with ``/auth/renewaccesstoken``."""
        assert self._session is not None
        try:
            async with self.limiter.slot("order"), self._session.get(
                    self.base_url + "/auth/renewaccesstoken", headers={"Authorization": f"Bearer {token}"}) as resp:
                payload = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, ValueError):
            payload = None
        if isinstance(payload, dict) and payload.get("accessToken") and not payload.get("errorText"):
            self._take_token(payload)
            self.renewals += 1
            return True
        log.info("Tradovate %s: token renewal refused; logging in again", self.broker.name)
        return False

    async def _keep_token(self) -> None:
        """Renew the token on time even while nothing else is sent (an expired token costs a login)."""
        while True:
            await asyncio.sleep(max(min(self.heartbeat_s, self._token_life_s / 8 or self.heartbeat_s), 0.05))
            if self._connected and self._token_due():
                try:
                    await self._fresh_token()
                except BrokerError as exc:
                    log.warning("Tradovate %s: keeping the token alive failed: %s", self.broker.name, exc)

    # -- ids --------------------------------------------------------------------------------------------------
    async def _load_accounts(self) -> None:
        payload = await self._request("GET", "/account/list", force=True)
        if not isinstance(payload, list):
            raise BrokerError(f"Tradovate {self.broker.name}: /account/list answered {str(payload)[:200]}")
        self._remember_accounts(payload)

    async def contract_id(self, name: str) -> int:
        """The numeric id of contract ``name`` (``MESZ6``), cached."""
        if name not in self._contract_ids:
            payload = await self._request("GET", "/contract/find", params={"name": name})
            if not isinstance(payload, dict) or payload.get("id") is None:
                raise BrokerError(f"Tradovate {self.broker.name}: no contract {name!r}")
            self._remember_contract(int(payload["id"]), str(payload.get("name") or name))
        return self._contract_ids[name]

    async def contract_name(self, contract_id: int) -> str:
        """The name (``MESZ6``) of a numeric contract id, cached."""
        if contract_id not in self._contract_names:
            payload = await self._request("GET", "/contract/item", params={"id": contract_id})
            if not isinstance(payload, dict) or not payload.get("name"):
                raise BrokerError(f"Tradovate {self.broker.name}: no contract with id {contract_id}")
            self._remember_contract(contract_id, str(payload["name"]))
        return self._contract_names[contract_id]

    def _remember_contract(self, contract_id: int, name: str) -> None:
        self._contract_ids[name] = contract_id
        self._contract_names[contract_id] = name

    async def _cl_ord_id(self, order_id: int, *, kind: str = "poll") -> str | None:
        """The ``clOrdId`` of an order: from what we placed or were pushed, else its commands (asked once)."""
        if order_id not in self._cl_ord_ids:
            commands = await self._request("GET", "/command/deps", params={"masterid": order_id}, kind=kind)
            for command in commands if isinstance(commands, list) else []:
                self._absorb_command(command)
            self._cl_ord_ids.setdefault(order_id, None)
        return self._cl_ord_ids[order_id]

    # -- orders -----------------------------------------------------------------------------------------------
    async def _submit(self, request: OrderRequest) -> Order:
        account_id = await self._account_id(request.account)
        payload = await self._request("POST", PLACE_PATH, body=place_body(request, account_id), kind="order")
        if isinstance(payload, dict) and payload.get("orderId") is not None:
            order_id = int(payload["orderId"])
            self._cl_ord_ids[order_id] = request.client_order_id
            self._order_accounts[order_id] = account_id
            found: Order | None = None
            with contextlib.suppress(BrokerError):
                found = await self._order_by_id(order_id)
            if found is not None:
                if found.status is OrderStatus.REJECTED:
                    raise OrderRejected(found.reason or "Tradovate rejected the order after accepting it", found)
                return found
            return accepted_order(request, order_id)
        if isinstance(payload, dict) and (payload.get("failureReason") or payload.get("failureText")):
            raise OrderRejected(f"Tradovate {rejection_reason(payload)}")
        raise OutcomeUnknown(f"Tradovate {self.broker.name}: {PLACE_PATH} answered {str(payload)[:200]!r}")

    async def _order_list(self, *, kind: str = "poll") -> list[dict[str, Any]]:
        payload = await self._request("GET", "/order/list", kind=kind)
        orders = list(payload) if isinstance(payload, list) else []
        for wire in orders:
            self._order_accounts[int(wire["id"])] = int(wire["accountId"])
        return orders

    async def find_order(self, account: str, client_order_id: str) -> Order | None:
        account_id = await self._account_id(account)
        # Order-priority requests: this lookup stands between a lost answer and the decision to resend.
        horizon = utcnow() - self.order_lookback
        candidates = [o for o in await self._order_list(kind="order") if int(o["accountId"]) == account_id
                      and parse_broker_time(o["timestamp"], "utc_iso") >= horizon]
        matches = []
        for wire in sorted(candidates, key=lambda o: int(o["id"]), reverse=True):
            if await self._cl_ord_id(int(wire["id"]), kind="order") == client_order_id:
                matches.append(wire)
        if len(matches) > 1:
            log.error("Tradovate %s: %d orders carry clOrdId %s (expected one): %s", self.broker.name,
                      len(matches), client_order_id, [o["id"] for o in matches])
        return None if not matches else await self._order(matches[-1], fresh=True, kind="order")

    async def _order_by_id(self, order_id: int, *, kind: str = "order") -> Order | None:
        payload = await self._request("GET", "/order/item", params={"id": order_id}, kind=kind)
        if not isinstance(payload, dict) or payload.get("id") is None:
            return None
        return await self._order(payload, fresh=True, kind=kind)

    async def _version(self, order_id: int, *, kind: str = "poll") -> dict[str, Any]:
        if order_id not in self._versions:
            versions = await self._request("GET", "/orderVersion/deps", params={"masterid": order_id}, kind=kind)
            if not isinstance(versions, list) or not versions:
                raise BrokerError(f"Tradovate {self.broker.name}: order {order_id} has no order version")
            for version in versions:
                self._absorb_version(version)
        return self._versions[order_id]

    async def _order_fills(self, order_id: int, *, kind: str = "poll") -> list[dict[str, Any]]:
        payload = await self._request("GET", "/fill/deps", params={"masterid": order_id}, kind=kind)
        fills = [f for f in payload if f.get("active", True)] if isinstance(payload, list) else []
        for fill in fills:
            self._fills.setdefault(order_id, {})[int(fill["id"])] = fill
        return fills

    async def _order(self, wire: Mapping[str, Any], *, fresh: bool, kind: str = "poll") -> Order:
        """A normalized Order from an order entity, its version and its fills (read afresh when ``fresh``,
        else as pushed: events must not cost a request per update)."""
        order_id = int(wire["id"])
        version = await self._version(order_id, kind=kind)
        fills = await self._order_fills(order_id, kind=kind) if fresh else list(self._fills.get(order_id, {}).values())
        filled = sum(int(f["qty"]) for f in fills)
        notional = sum(((dec(f["price"]) or Decimal(0)) * int(f["qty"]) for f in fills), Decimal(0))
        created = parse_broker_time(wire["timestamp"], "utc_iso")
        updated = max([created, *(parse_broker_time(f["timestamp"], "utc_iso") for f in fills)])
        account_id = int(wire["accountId"])
        self._order_accounts[order_id] = account_id
        return Order(
            broker_order_id=str(order_id),
            client_order_id=await self._cl_ord_id(order_id, kind=kind),
            account=self._account_name(account_id),
            contract=await self.contract_name(int(wire["contractId"])),
            side=FROM_WIRE_ACTION[str(wire["action"])],
            quantity=int(version["orderQty"]),
            filled_quantity=filled,
            status=order_status(str(wire.get("ordStatus")), filled),
            order_type=FROM_WIRE_ORDER_TYPE.get(str(version.get("orderType")), OrderType.MARKET),
            created_at=created,
            updated_at=updated,
            avg_fill_price=notional / filled if filled else None,
            limit_price=dec(version.get("price")),
            stop_price=dec(version.get("stopPrice")),
        )

    async def cancel_order(self, account: str, broker_order_id: str) -> Order:
        account_id = await self._account_id(account)
        order_id = int(broker_order_id)
        payload = await self._request("POST", "/order/cancelorder", body={"orderId": order_id}, kind="cancel")
        refused = isinstance(payload, dict) and bool(payload.get("failureReason") or payload.get("errorText"))
        order: Order | None = None
        for attempt in range(5):
            order = await self._order_by_id(order_id, kind="cancel")
            if order is None or self._order_accounts.get(order_id) != account_id:
                raise BrokerError(f"Tradovate {self.broker.name}: no order {broker_order_id} in account {account}")
            if order.status.is_final or refused:
                break
            await asyncio.sleep(0.05 * 2 ** attempt)
        assert order is not None
        if refused and not order.status.is_final:
            raise BrokerError(f"Tradovate {self.broker.name}: cancel of {broker_order_id} refused: "
                              f"{rejection_reason(payload)}")
        return order

    async def working_orders(self, account: str) -> list[Order]:
        account_id = await self._account_id(account)
        result = []
        for wire in await self._order_list():
            if int(wire["accountId"]) == account_id:
                order = await self._order(wire, fresh=True)
                if not order.status.is_final:
                    result.append(order)
        return result

    async def flatten(self, account: str, contract: str) -> None:
        """Close the whole position in ``contract`` at market (``/order/liquidateposition``)."""
        account_id = await self._account_id(account)
        payload = await self._request("POST", "/order/liquidateposition", kind="order", body={
            "accountId": account_id, "contractId": await self.contract_id(contract), "admin": False})
        if isinstance(payload, dict) and (payload.get("failureReason") or payload.get("errorText")):
            raise BrokerError(f"Tradovate {self.broker.name}: liquidation of {contract} in {account} refused: "
                              f"{payload.get('errorText') or rejection_reason(payload)}")

    # -- account state ----------------------------------------------------------------------------------------
    async def positions(self, account: str) -> list[Position]:
        account_id = await self._account_id(account)
        payload = await self._request("GET", "/position/list")
        result = []
        for wire in payload if isinstance(payload, list) else []:
            if int(wire["accountId"]) == account_id and int(wire.get("netPos") or 0):
                result.append(Position(account, await self.contract_name(int(wire["contractId"])),
                                       int(wire["netPos"]), dec(wire.get("netPrice")) or Decimal(0)))
        return result

    async def account_snapshot(self, account: str) -> AccountSnapshot:
        """From ``/cashBalance/getcashbalancesnapshot``. Tradovate books fees as cash changes of their own, apart
        from the ``TradePaired`` change that moves ``realizedPnL``, so that figure is taken as gross: today's fill
        commissions (the same ``Fill.commission`` figures ``fills_since`` reports: FillFee totals, else the Broker
        document's) are taken off, and realized P&L here is net, as for every other broker."""
        account_id = await self._account_id(account)
        payload = await self._request("POST", "/cashBalance/getcashbalancesnapshot", body={"accountId": account_id})
        if not isinstance(payload, dict) or payload.get("errorText"):
            reason = payload.get("errorText") if isinstance(payload, dict) else payload
            raise BrokerError(f"Tradovate {self.broker.name}: cash balance of {account} unavailable: {reason}")
        cash = dec(payload.get("totalCashValue")) or Decimal(0)
        open_pnl = dec(payload.get("openPnL")) or Decimal(0)
        margin = dec(payload.get("initialMargin")) or Decimal(0)
        net_liq = dec(payload.get("netLiq"))
        net_liq = cash + open_pnl if net_liq is None else net_liq
        now = utcnow()
        fees = sum((f.commission for f in await self.fills_since(account, trading_day_start(now))), Decimal(0))
        realized = (dec(payload.get("realizedPnL")) or Decimal(0)) - fees
        return AccountSnapshot(account, cash, margin, net_liq - margin, realized, open_pnl, now)

    async def fills_since(self, account: str, since: datetime) -> list[Fill]:
        account_id = await self._account_id(account)
        payload = await self._request("GET", "/fill/list")
        fills = [f for f in payload if f.get("active", True)] if isinstance(payload, list) else []
        fills = [f for f in fills if parse_broker_time(f["timestamp"], "utc_iso") >= since]
        if any(int(f["orderId"]) not in self._order_accounts for f in fills):
            await self._order_list()
        if fills:
            await self._load_fill_fees()
        return [await self._fill(f, ask_fees=False) for f in fills
                if self._order_accounts.get(int(f["orderId"])) == account_id]

    async def _load_fill_fees(self) -> None:
        """Every FillFee in one request (``/fillFee/list``); each shares its fill's id."""
        payload = await self._request("GET", "/fillFee/list")
        for wire in payload if isinstance(payload, list) else []:
            self._absorb_fill_fee(wire)

    async def _fill_fee(self, fill_id: int, *, ask: bool) -> Decimal | None:
        """The broker's own fees for a fill: cached (pushed or listed), else asked once by ``/fillFee/deps``.

        An ask that fails (throttled past its resends, REST down) or takes longer than ``fee_wait_s`` (waiting
        out a penalty) is None, not an error, and is not remembered: a pushed fill must not be held back for its
        fees (the event would wait for the next sync or safety poll, up to ``safety_poll_s``, while the ledger
        misses the position); the Broker document's figure stands in."""
        if fill_id not in self._fill_fees and ask:
            try:
                payload = await asyncio.wait_for(
                    self._request("GET", "/fillFee/deps", params={"masterid": fill_id}), self.fee_wait_s)
            except (BrokerError, TimeoutError) as exc:
                why = f"not within {self.fee_wait_s:g}s" if isinstance(exc, TimeoutError) else str(exc)
                log.info("Tradovate %s: fees of fill %s not read (%s); the Broker document's commission stands in",
                         self.broker.name, fill_id, why)
                return None
            totals = [t for t in map(fill_fee_total, payload if isinstance(payload, list) else []) if t is not None]
            self._fill_fees[fill_id] = sum(totals, Decimal(0)) if totals else None
        return self._fill_fees.get(fill_id)

    async def _fill(self, wire: Mapping[str, Any], *, ask_fees: bool = True) -> Fill:
        """A normalized Fill. Its commission is the broker's FillFee total when Tradovate reports one, else the
        Broker document's ``commissions`` (per contract per side)."""
        order_id = int(wire["orderId"])
        if order_id not in self._order_accounts:  # a pushed fill can overtake everything else we know
            await self._order_list()
        contract = await self.contract_name(int(wire["contractId"]))
        quantity = int(wire["qty"])
        fees = await self._fill_fee(int(wire["id"]), ask=ask_fees)
        if fees is None:
            fees = (self.broker.commission(contract[:-2]) or Decimal(0)) * quantity
        return Fill(
            fill_id=str(wire["id"]),
            broker_order_id=str(order_id),
            client_order_id=await self._cl_ord_id(order_id),
            account=self._account_name(self._order_accounts.get(order_id, -1)),
            contract=contract,
            side=FROM_WIRE_ACTION[str(wire["action"])],
            quantity=quantity,
            price=dec(wire["price"]) or Decimal(0),
            commission=fees,
            time=parse_broker_time(wire["timestamp"], "utc_iso"),
        )

    # -- events -----------------------------------------------------------------------------------------------
    def _absorb_command(self, wire: Mapping[str, Any]) -> None:
        if wire.get("orderId") is not None and wire.get("clOrdId") is not None:
            self._cl_ord_ids[int(wire["orderId"])] = str(wire["clOrdId"])

    def _absorb_fill_fee(self, wire: Mapping[str, Any]) -> None:
        if wire.get("id") is not None:
            self._fill_fees[int(wire["id"])] = fill_fee_total(wire)

    def _absorb_version(self, wire: Mapping[str, Any]) -> None:
        if wire.get("orderId") is not None:
            self._versions[int(wire["orderId"])] = dict(wire)

    def _recent(self, wire: Mapping[str, Any]) -> bool:
        """Whether an entity is from this session (older ones are history, not events)."""
        try:
            return parse_broker_time(wire["timestamp"], "utc_iso") >= self._session_start - timedelta(seconds=5)
        except (KeyError, TypeError, ValueError):
            return True

    async def _note_fill(self, wire: Mapping[str, Any]) -> None:
        fill_id, order_id = int(wire["id"]), int(wire["orderId"])
        if not wire.get("active", True):
            return
        self._fills.setdefault(order_id, {})[fill_id] = dict(wire)
        if fill_id in self._seen_fills:
            return
        if self._recent(wire):
            event = FillEvent(await self._fill(wire))  # may fail (REST down): then not seen, emitted later
            self._seen_fills.add(fill_id)
            self._emit(event)
        else:
            self._seen_fills.add(fill_id)

    async def _note_order(self, wire: Mapping[str, Any]) -> None:
        order_id = int(wire["id"])
        self._order_accounts[order_id] = int(wire["accountId"])
        filled = sum(int(f["qty"]) for f in self._fills.get(order_id, {}).values())
        status = order_status(str(wire.get("ordStatus")), filled)
        known = self._known.get(order_id)
        if known is None or known.status is not status or known.filled != filled:
            # Only the events task calls this (socket and poll take turns), so marking after the await is safe;
            # an order that cannot be built now (REST down) is emitted on a later pass.
            event = OrderEvent(await self._order(wire, fresh=False)) if self._recent(wire) else None
            self._known[order_id] = Known(status, filled)
            if event is not None:
                self._emit(event)

    async def _absorb(self, entity_type: str, entity: Mapping[str, Any]) -> None:
        """One pushed or polled entity into the shared state (and out as events)."""
        try:
            if entity_type == "command":
                self._absorb_command(entity)
            elif entity_type == "orderVersion":
                self._absorb_version(entity)
            elif entity_type == "fillFee":
                self._absorb_fill_fee(entity)
            elif entity_type == "contract" and entity.get("id") is not None and entity.get("name"):
                self._remember_contract(int(entity["id"]), str(entity["name"]))
            elif entity_type == "fill":
                await self._note_fill(entity)
            elif entity_type == "order":
                await self._note_order(entity)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("Tradovate %s: unreadable %s entity skipped (%s): %s", self.broker.name, entity_type,
                        exc, str(entity)[:200])
        except BrokerError as exc:
            log.info("Tradovate %s: %s %s not resolved yet (%s); retried on the next sync or poll",
                     self.broker.name, entity_type, entity.get("id"), exc)

    async def _absorb_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        """A ``user/syncrequest`` answer: reference data first, then fills before orders (an order's filled
        quantity comes from its fills)."""
        for plural, entity_type in (("contracts", "contract"), ("commands", "command"),
                                    ("orderVersions", "orderVersion"), ("fillFees", "fillFee"), ("fills", "fill"),
                                    ("orders", "order")):
            for entity in snapshot.get(plural) or []:
                await self._absorb(entity_type, entity)

    async def _poll_once(self) -> None:
        """What the WebSocket would have pushed, by REST: orders and fills of this session."""
        fills = await self._request("GET", "/fill/list")
        orders = await self._order_list()
        for fill in fills if isinstance(fills, list) else []:
            await self._absorb("fill", fill)
        for order in orders:
            await self._absorb("order", order)

    async def _while_connected(self, backoff: Backoff) -> None:
        """Keep the WebSocket open (polling while it is not); a socket that lived resets the backoff, one that
        keeps failing is retried ever more slowly."""
        if self.use_websocket:
            lived = rotated = False
            try:
                rotated = await self._ws_session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any socket failure falls back to polling
                log.info("Tradovate %s: user-data WebSocket lost (%s: %s)", self.broker.name,
                         type(exc).__name__, exc)
            finally:
                lived = self._ws_live.is_set()
                self._ws_live.clear()
                self._ws = None
            if lived:
                backoff.reset()
            if rotated:  # straight to a socket on the current token; its user/syncrequest catches up the gap
                return
        await self._poll_safely()  # also how a drop is noticed: REST fails too
        if self.use_websocket:
            await backoff.sleep()
        else:
            await asyncio.sleep(self.poll_interval_s)

    def _ws_rotation_due(self) -> bool:
        """Whether the live socket must be replaced by one authorized with the current token: the token was
        renewed (or a fresh login replaced it) since the socket was authorized, or the socket's token is about to
        expire anyway (renewal keeps failing). A socket outliving its token may go silent without closing."""
        if self._token is not None and self._token != self._ws_token:
            return True
        expiry = self._ws_token_expiry
        return expiry is not None and (expiry - utcnow()).total_seconds() <= self.heartbeat_s

    async def _ws_session(self) -> bool:
        """One WebSocket connection: open, authorize, sync, then read and heartbeat until it dies (raises) or
        its token was renewed (returns True: the caller opens the next one at once). ``_ws_live`` is set once it
        delivers events."""
        assert self._session is not None
        async with self._session.ws_connect(self.ws_url, heartbeat=None, autoping=True) as ws:
            self._last_frame = self._last_sent = time.monotonic()
            first = await self._ws_frame(ws)
            if first.kind != "open":
                raise ConnectionError(f"expected the open frame, got {first.kind}")
            self._ws = ws
            token = await self._fresh_token()
            await ws.send_str(encode_request("authorize", 0, token))
            reply = await self._ws_reply(ws, 0)
            if reply.get("s") != 200:
                raise ConnectionError(f"authorize answered {reply.get('s')}: {reply.get('d')}")
            self._ws_token, self._ws_token_expiry = token, self._token_expiry
            snapshot = await self._ws_sync(ws)
            await self._absorb_snapshot(snapshot)
            self._ws_live.set()
            self._last_poll = time.monotonic()
            while True:
                if not self._connected:
                    raise ConnectionError("REST connection lost; resyncing after the reconnect")
                if self._ws_rotation_due():
                    self.ws_rotations += 1
                    log.info("Tradovate %s: access token renewed; moving the user-data WebSocket to it",
                             self.broker.name)
                    return True
                if time.monotonic() - self._last_poll >= self.safety_poll_s:
                    self._last_poll = time.monotonic()
                    await self._poll_once()  # in case the socket lost an event; duplicates are not re-emitted
                # Wake at least every heartbeat to notice a renewed token (the renewal runs in another task).
                until = min(self._last_poll + self.safety_poll_s, time.monotonic() + self.heartbeat_s)
                frame = await self._ws_frame(ws, until=until)
                if frame is None:
                    continue
                if frame.kind == "close":
                    raise ConnectionError(f"closed by the server: {frame.data}")
                await self._ws_messages(frame)

    async def _ws_sync(self, ws: aiohttp.ClientWebSocketResponse) -> Mapping[str, Any]:
        """The ``user/syncrequest`` snapshot. Throttled, it answers ``s`` 200 with a penalty ticket as ``d``, which
        read as a snapshot would look like an account with no orders and no fills: wait ``p-time`` and resend with
        the ticket, as for REST; a captcha, or more than ``MAX_TICKETS`` tickets, gives the socket up (the caller
        polls by REST meanwhile)."""
        users = [self._user_id] if self._user_id is not None else []
        body: dict[str, Any] = {"users": users}
        for _attempt in range(MAX_TICKETS + 1):
            sync_id = next(self._ws_ids)
            await ws.send_str(encode_request("user/syncrequest", sync_id, json.dumps(body)))
            reply = await self._ws_reply(ws, sync_id)
            if reply.get("s") != 200:
                raise ConnectionError(f"user/syncrequest answered {reply.get('s')}: {reply.get('d')}")
            data = reply.get("d")
            ticket = penalty_ticket(data)
            if ticket is None:
                if not isinstance(data, dict):
                    raise ConnectionError(f"user/syncrequest answered no snapshot: {str(data)[:200]}")
                return data
            ticket_id, wait_s, captcha = ticket
            if captcha:
                raise ConnectionError(f"user/syncrequest needs a captcha (penalty of {wait_s:g}s); polling by REST")
            log.warning("Tradovate %s: penalty ticket on user/syncrequest; resending in %.1fs", self.broker.name,
                        wait_s)
            until = time.monotonic() + wait_s  # wait on the socket: heartbeats go on, pushed events are absorbed
            while (frame := await self._ws_frame(ws, until=until)) is not None:
                if frame.kind == "close":
                    raise ConnectionError(f"closed by the server: {frame.data}")
                await self._ws_messages(frame)
            body = {"users": users, "p-ticket": ticket_id}
        raise ConnectionError(f"user/syncrequest: {MAX_TICKETS} penalty tickets in a row; polling by REST")

    @overload
    async def _ws_frame(self, ws: aiohttp.ClientWebSocketResponse) -> Frame: ...

    @overload
    async def _ws_frame(self, ws: aiohttp.ClientWebSocketResponse, until: float) -> Frame | None: ...

    async def _ws_frame(self, ws: aiohttp.ClientWebSocketResponse, until: float | None = None) -> Frame | None:
        """The next frame (None if ``until``, a monotonic time, passes first); sends our ``[]`` heartbeat on
        time and gives up on a socket silent too long."""
        while True:
            now = time.monotonic()
            if until is not None and now >= until:
                return None
            if now - self._last_sent >= self.heartbeat_s:
                await ws.send_str("[]")
                self._last_sent = now
                self.heartbeats_sent += 1
            silent = now - self._last_frame
            if silent >= self.ws_timeout_s:
                raise ConnectionError(f"no frame (not even a heartbeat) for {silent:.1f}s")
            wait = min(self.heartbeat_s - (now - self._last_sent), self.ws_timeout_s - silent,
                       float("inf") if until is None else until - now)
            try:
                message = await ws.receive(timeout=max(wait, 0.01))
            except asyncio.TimeoutError:
                continue
            if message.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"WebSocket ended ({message.type.name})")
            self._last_frame = time.monotonic()
            frame = parse_frame(message.data)
            if frame.kind != "heartbeat":
                return frame

    async def _ws_reply(self, ws: aiohttp.ClientWebSocketResponse, request_id: int) -> dict[str, Any]:
        """Read until the answer to ``request_id``, absorbing events that arrive first."""
        deadline = time.monotonic() + self.request_timeout_s
        while time.monotonic() < deadline:
            frame = await self._ws_frame(ws)
            if frame.kind == "close":
                raise ConnectionError(f"closed by the server: {frame.data}")
            reply = await self._ws_messages(frame, request_id)
            if reply is not None:
                return reply
        raise ConnectionError(f"no answer to WebSocket request {request_id} within {self.request_timeout_s:g}s")

    async def _ws_messages(self, frame: Frame, request_id: int | None = None) -> dict[str, Any] | None:
        reply = None
        for message in frame.data or []:
            if not isinstance(message, dict):
                continue
            if message.get("e") == "props":
                data = message.get("d") or {}
                entity = data.get("entity")
                if isinstance(entity, dict):
                    await self._absorb(str(data.get("entityType")), entity)
            elif message.get("e") == "shutdown":
                raise ConnectionError(f"server shutdown: {message.get('d')}")
            elif request_id is not None and message.get("i") == request_id:
                reply = message
            elif message.get("s") == 429:
                self.limiter.penalize(self.throttle_wait_s)
        return reply
