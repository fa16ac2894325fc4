"""ProjectX Gateway connector (TopstepX and the other prop firms on ProjectX).

What makes ProjectX different from the other brokers, and how this module copes:

- **Success is in the body.** Every answer is ``{success, errorCode, errorMessage, ...}`` with HTTP 200 even when the
  request failed; only a bad token (401) and the rate limit (429) use HTTP statuses. ``_call`` checks both layers.
- **customTag is unique per account** (documented on ``Order/place``). We send our ``client_order_id`` as
  ``customTag``, so the broker itself refuses a second order with the same id. The errorCode of that refusal is
  not documented, so after *any* refusal we look the tag up with ``Order/search`` and return the order when it
  exists; a failed lookup makes the outcome unknown, never "rejected". An ``Order/search`` answer whose orders
  carry no ``customTag`` field (the first published example had none) cannot prove an order absent: the lookup
  then fails rather than answer "not found", so nothing is resent.
- **Accounts and contracts are ids.** ``OrderRequest.account`` is the account *name* (``Account/search`` gives the
  numeric id); contracts are ``CON.F.US.<product>.<month><yy>`` where the product code differs from the CME root
  (ES is ``EP``, NQ ``ENQ``, MGC ``GMET``) and between firms, so ``Contract/search`` resolves them, cached.
- **Positions are unsigned.** ``type`` 1 long / 2 short with a positive ``size`` become a signed quantity.
- **Tokens live 24 h.** ``Auth/validate`` renews them well before that; a 401 triggers one fresh login.
- **Events.** The SignalR user hub (``endpoints["hub"]``) pushes orders and trades; when it is off or down the
  connector polls ``Order/search`` and ``Trade/search`` (option ``poll_interval_s``). Both paths feed one
  de-duplicating state, so an update seen twice is emitted once.
- **A trade names its order, not our id.** Only the order carries ``customTag``, and a pushed trade can overtake
  both the answer to its ``Order/place`` and the order's own event. A trade whose order we cannot yet tell ours or
  not (its ``Order/search`` failed or took longer than ``lookup_wait_s``; or the answer omits ``customTag`` while
  one of our placements still awaits its answer) is *not* reported: reported without its id, the service would
  book our own fill as a trade made by hand, and the order's own fill would later be a duplicate it drops. It
  waits, unreported, for its order's next event, the ``Order/place`` answer, or the next poll (every
  ``poll_interval_s`` while such a trade waits, even with the hub live). Once the search answers that the order
  carries no tag, the trade is reported as not ours (a trade by hand), as before.

Options (keyword arguments of the connector): ``poll_interval_s`` (2.0), ``use_hub`` (True), ``request_timeout_s``
(10), ``token_refresh_s`` (20 h), ``order_lookback_days`` (7), ``reconnect_backoff_s`` (0.5, doubling to
``reconnect_backoff_max_s`` 10), ``reconnect_wait_s`` (10: how long an unknown outcome waits for the broker to come
back before giving up the lookup), ``safety_poll_s`` (30: a poll even while the hub is live, in case it lost an
event), ``lookup_wait_s`` (2: how long a pushed trade of an order we do not know waits for ``Order/search``; it runs
inside the hub's event handling, and after a 429 every request waits out the penalty, up to a minute: past this
the trade waits unreported, see above), ``catalog`` (an ``engine.catalog.Catalog``), ``products`` (root -> product code
where a firm's ``Contract/search`` answer is ambiguous).

ProjectX has no time-in-force field: ``OrderRequest.time_in_force`` is not sent (the gateway's orders are good
until cancelled or the session ends, per firm).

Checked against the Gateway documentation (https://gateway.docs.projectx.com/docs/...): ``Order/place`` fields and
enums (type 1 Limit, 2 Market, 4 Stop, 5 TrailingStop, 6 JoinBid, 7 JoinAsk; side 0 buy, 1 sell; answer
``orderId``); order status 0 None .. 6 Pending and position type 1 long / 2 short (realtime enum definitions);
``Trade/search`` fields, ``profitAndLoss`` null on a half-turn, ``fees`` per trade, i.e. per side (1.40 on both the
opening and the closing ES trade of the example); ``Auth/loginKey`` (``userName``, ``apiKey``), tokens valid 24 h,
``Auth/validate`` answering ``newToken``; the rate limits (200 requests / 60 s, ``History/retrieveBars`` 30 / 30 s,
over them HTTP 429); ``Contract/search`` (``searchText``, ``live``; names like ``ENQH25``); the user hub
(``/hubs/user?access_token=``, ``SubscribeAccounts()``, ``SubscribeOrders|Positions|Trades(accountId)``, events
``GatewayUserAccount|Order|Position|Trade``).

Unverified (the documentation is silent; the safest reading is implemented):

- the errorCode of a repeated ``customTag`` (every refusal is looked up, see above);
- whether a risk refusal is an ``Order/place`` failure or an order with status 5 (both are handled);
- statuses 7 (taken as pending cancellation: still working) and 8 (taken as pending): not in the enum page;
- ``Retry-After`` on 429 (none documented: without it we wait our own doubling backoff);
- hub payloads: wrapped as ``{action, data}`` or bare (both are read); whether the hub closes when its token
  expires (we reconnect with a fresh token whenever it drops, and poll meanwhile);
- a trade voided after we reported it: voided trades are never reported or booked, but one already reported is
  not taken back;
- whether ``Contract/search`` lists months other than the active one (a month it does not list is refused, never
  guessed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Mapping

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
    Side,
    register,
    utcnow,
)
from brokers.http import Attempts, Backoff, HttpConnector, Known, Throttle, accepted_order, dec
from brokers.ratelimit import BrokerRateLimiter
from brokers.timeconv import format_broker_time, parse_broker_time
from engine.catalog import Catalog
from engine.sessions import trading_day_start

if TYPE_CHECKING:
    from engine.model import Broker

log = logging.getLogger(__name__)

DEFAULT_REST = "https://gateway-api-demo.s2f.projectx.com"
DEFAULT_HUB = "https://gateway-rtc-demo.s2f.projectx.com/hubs/user"
DOCUMENTED_RATE_LIMIT = (200, 60.0)
"""ProjectX's documented budget, used when the Broker document sets no ``rate_limit``."""

RECORD_SEPARATOR = "\x1e"
HUB_PING_S = 10.0
"""SignalR clients ping every 15 s by default and servers time out after 30 s; 10 s keeps well inside."""

# ProjectX enums.
WIRE_ORDER_TYPES = {OrderType.LIMIT: 1, OrderType.MARKET: 2, OrderType.STOP: 4}
FROM_WIRE_ORDER_TYPE = {1: OrderType.LIMIT, 2: OrderType.MARKET, 3: OrderType.STOP, 4: OrderType.STOP,
                        5: OrderType.STOP, 6: OrderType.LIMIT, 7: OrderType.LIMIT}
"""3 StopLimit, 4 Stop and 5 TrailingStop all wait for a trigger: the normalized model calls them stops; 6 JoinBid
and 7 JoinAsk rest at the best bid / ask: limits."""
WIRE_SIDE = {Side.BUY: 0, Side.SELL: 1}
FROM_WIRE_SIDE = {0: Side.BUY, 1: Side.SELL}
POSITION_LONG, POSITION_SHORT = 1, 2

CONTRACT_ID = re.compile(r"^CON\.F\.[A-Z]+\.(?P<product>[A-Z0-9]+)\.(?P<month>[FGHJKMNQUVXZ])(?P<year>\d{2})$")
CME_CODE = re.compile(r"^(?P<root>[A-Z0-9]+?)(?P<month>[FGHJKMNQUVXZ])(?P<year>\d{1,2})$")

KNOWN_PRODUCTS: Mapping[str, str] = {
    "EP": "ES", "ENQ": "NQ", "GMET": "MGC", "GCE": "GC", "CLE": "CL", "MCLE": "MCL",
}
"""Product codes seen in public gateway answers that differ from the CME root; only a fallback when the
firm's own ``Contract/search`` answer does not tell (resolution never relies on it for placing orders)."""


# -- pure wire logic ---------------------------------------------------------------------------------------------
def order_status(wire_status: int, fill_volume: int) -> OrderStatus:
    """ProjectX order status (0 None, 1 Open, 2 Filled, 3 Cancelled, 4 Expired, 5 Rejected, 6 Pending,
    7 PendingCancellation, 8 Suspended) to ours; an open order with fills is partially filled."""
    if wire_status in (1, 7):
        return OrderStatus.PARTIALLY_FILLED if fill_volume > 0 else OrderStatus.WORKING
    return {
        2: OrderStatus.FILLED, 3: OrderStatus.CANCELLED, 4: OrderStatus.EXPIRED, 5: OrderStatus.REJECTED,
        6: OrderStatus.PENDING, 8: OrderStatus.PENDING,
    }.get(wire_status, OrderStatus.UNKNOWN)


def wire_order_type(wire_type: int) -> OrderType:
    """ProjectX order type to ours; a type the gateway adds later is reported as a market order."""
    return FROM_WIRE_ORDER_TYPE.get(wire_type, OrderType.MARKET)


def filled_quantity(wire: Mapping[str, Any]) -> int:
    """Filled contracts of a gateway order; older gateway versions send no ``fillVolume``, only the status."""
    if wire.get("fillVolume") is not None:
        return int(wire["fillVolume"])
    return int(wire["size"]) if int(wire.get("status") or 0) == 2 else 0


def signed_size(position_type: int, size: int) -> int:
    """``type`` 1 long / 2 short and an unsigned ``size`` -> signed quantity."""
    if position_type == POSITION_LONG:
        return abs(size)
    if position_type == POSITION_SHORT:
        return -abs(size)
    raise BrokerError(f"ProjectX position type {position_type!r} is neither 1 (long) nor 2 (short)")


def split_code(code: str) -> tuple[str, str, int]:
    """``MESZ6`` -> (``MES``, ``Z``, 6): root, month letter, last digit of the year."""
    match = CME_CODE.match(code)
    if match is None:
        raise ValueError(f"{code!r} is not a contract code like MESZ6")
    return match["root"], match["month"], int(match["year"]) % 10


def choose_contract(code: str, contracts: list[Mapping[str, Any]], catalog: Catalog,
                    products: Mapping[str, str] | None = None) -> Mapping[str, Any]:
    """Pick the gateway contract for ``code`` from a ``Contract/search`` answer.

    Firms differ in how they name contracts (``MESZ6``, ``MESZ26``, ``EPZ26``), so this tries, in order: a name
    equal to the code (1- or 2-digit year); the product segment of the id equal to the root or to a configured
    product (``products``: root -> product code); the single candidate of the right month whose tick size and
    tick value match the catalog's instrument. Anything else is ambiguous and refused: a wrong contract is worse
    than no order.
    """
    root, month, year_digit = split_code(code)
    candidates = []
    for contract in contracts:
        match = CONTRACT_ID.match(str(contract.get("id", "")))
        if match and match["month"] == month and int(match["year"]) % 10 == year_digit:
            candidates.append((match["product"], contract))
    two_digit = {f"{root}{month}{y:02d}" for y in range(year_digit, 100, 10)}
    for _, contract in candidates:
        if contract.get("name") == code or contract.get("name") in two_digit:
            return contract
    wanted_products = {root, (products or {}).get(root, root)}
    by_product = [c for p, c in candidates if p in wanted_products]
    if len(by_product) == 1:
        return by_product[0]
    instrument = catalog.get(root)
    if instrument is not None:
        by_spec = [c for _, c in candidates
                   if dec(c.get("tickSize")) == instrument.tick_size and dec(c.get("tickValue")) == instrument.tick_value]
        if len(by_spec) == 1:
            return by_spec[0]
    names = sorted(str(c.get("id")) for _, c in candidates)
    raise BrokerError(f"ProjectX: cannot tell which contract is {code} among {names or 'no candidates'}; "
                      f"name its product code with the connector option products={{{root!r}: ...}}")


def code_from_contract(contract: Mapping[str, Any], catalog: Catalog,
                       products: Mapping[str, str] | None = None) -> str:
    """The CME code (``MESZ6``) of a gateway contract, for contracts we did not resolve ourselves."""
    contract_id = str(contract.get("id", ""))
    match = CONTRACT_ID.match(contract_id)
    if match is None:
        return contract_id
    suffix = f"{match['month']}{int(match['year']) % 10}"
    name = str(contract.get("name") or "")
    for root in catalog.roots():
        if name.startswith(root) and CME_CODE.match(name) and split_code(name)[0] == root:
            return f"{root}{suffix}"
    reverse = {v: k for k, v in (products or {}).items()}
    product = match["product"]
    known = reverse.get(product) or (product if product in catalog else KNOWN_PRODUCTS.get(product))
    return f"{known}{suffix}" if known else contract_id


@register
class ProjectXConnector(HttpConnector):
    type = "projectx"
    label = "ProjectX"
    unreachable = "gateway unreachable"
    missing_account = "no active account named"

    def __init__(self, broker: "Broker", *, env: Mapping[str, str] | None = None, **options: Any) -> None:
        super().__init__(broker, env=env, **options)
        endpoints = broker.endpoints or {}
        self.base_url = str(endpoints.get("rest") or DEFAULT_REST).rstrip("/")
        self.hub_url = str(endpoints.get("hub") or DEFAULT_HUB).rstrip("/")
        self.use_hub = bool(options.get("use_hub", True))
        self.token_refresh_s = float(options.get("token_refresh_s", 20 * 3600))
        self.catalog: Catalog = options.get("catalog") or Catalog()
        # Root -> product code overrides for firms whose Contract/search answer is ambiguous. The Broker schema has
        # no field for it yet: a connector option, or a future ``projectx: {products: ...}`` section.
        self.products: Mapping[str, str] = dict(
            options.get("products") or (broker.options or {}).get("projectx", {}).get("products") or {})
        limit = broker.rate_limit
        requests, per_s = (limit.requests, limit.per_seconds) if limit else DOCUMENTED_RATE_LIMIT
        self.limiter = BrokerRateLimiter(requests, per_s)
        self.throttle = Throttle(self.backoff_s, 60.0, 5)
        self._token_at = 0.0
        self._watched: set[int] = set()
        self._contract_ids: dict[str, str] = {}
        self._contract_codes: dict[str, str] = {}
        self._tags: dict[int, str | None] = {}
        self._seen_trades: set[int] = set()
        self.lookup_wait_s = float(options.get("lookup_wait_s", 2.0))
        self._unresolved: dict[int, Mapping[str, Any]] = {}
        """Trade id -> trade not reported yet because we cannot tell whether its order is ours."""
        self._lookup_failed_at = float("-inf")
        self._placing = 0
        """``place_order`` calls under way: while one is, an order the gateway does not tag may still be ours."""
        self._hub_ws: aiohttp.ClientWebSocketResponse | None = None
        self._hub_live = asyncio.Event()
        self._resubscribe = asyncio.Event()
        self._hub_subscribed: set[int] = set()
        self._hub_pending: dict[str, asyncio.Future[None]] = {}
        self._hub_invocations = 0

    # -- lifecycle --------------------------------------------------------------------------------------------
    def _start_background(self) -> list[asyncio.Task[None]]:
        name = self.broker.name
        tasks = [asyncio.create_task(self._keep_connected(), name=f"projectx-poll-{name}")]
        if self.use_hub:
            tasks.append(asyncio.create_task(self._hub_loop(), name=f"projectx-hub-{name}"))
        return tasks

    async def _close_streams(self) -> None:
        if self._hub_ws is not None:
            await self._hub_ws.close()
            self._hub_ws = None

    # -- transport --------------------------------------------------------------------------------------------
    async def _call(self, path: str, body: Mapping[str, Any], *, kind: str = "poll", auth: bool = True,
                    force: bool = False) -> dict[str, Any]:
        """POST ``body`` to ``path`` and return the envelope (``success`` still to be checked by the caller).

        401 -> one fresh login and a resend (nothing was done); 429 -> the limiter is penalized for the broker's
        wait and the request resent, except ``Order/place`` which raises ``RateLimited`` so that the idempotent
        ``place_order`` decides. A connection failure before sending is ``BrokerUnavailable``; one after sending
        is ``OutcomeUnknown`` for ``Order/place`` (the order may exist) and ``BrokerUnavailable`` otherwise.
        """
        self._require_connection(path, force=force)
        placing = path == "/api/Order/place"
        attempts = Attempts()
        text = None
        while text is None:
            text = await self._exchange("POST", path, body=dict(body), kind=kind, auth=auth, placing=placing,
                                        attempts=attempts)
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict) or "success" not in payload:
            if placing:
                raise OutcomeUnknown(f"ProjectX {self.broker.name}: {path} answered {text[:200]!r}")
            raise BrokerError(f"ProjectX {self.broker.name}: {path} answered {text[:200]!r}, not an envelope")
        return payload

    async def _ok(self, path: str, body: Mapping[str, Any], *, kind: str = "poll") -> dict[str, Any]:
        """``_call`` for requests whose failure envelope is an error, not an answer."""
        payload = await self._call(path, body, kind=kind)
        if not payload.get("success"):
            raise BrokerError(f"ProjectX {self.broker.name}: {path} failed: errorCode {payload.get('errorCode')}: "
                              f"{payload.get('errorMessage')}")
        return payload

    async def _ping(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(self.base_url + "/api/Status/ping") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _reconnect_once(self) -> bool:
        """One attempt to come back: ping, fresh token, accounts. True when connected again."""
        if self._session is None or not await self._ping():
            return False
        try:
            await self._login()  # the token usually outlives a drop; a 401 below would renew it
            await self._load_accounts()
        except BrokerError as exc:
            log.warning("ProjectX %s: reconnect failed: %s", self.broker.name, exc)
            return False
        self._mark_reconnected()
        return True

    def _on_reconnected(self) -> None:
        self._resubscribe.set()

    # -- auth -------------------------------------------------------------------------------------------------
    async def _request_token(self) -> None:
        username, api_key = self.credential("username"), self.credential("api_key")
        payload = await self._call("/api/Auth/loginKey", {"userName": username, "apiKey": api_key},
                                   kind="order", auth=False, force=True)
        if not payload.get("success") or not payload.get("token"):
            raise AuthError(f"ProjectX {self.broker.name}: login refused (errorCode {payload.get('errorCode')}: "
                            f"{payload.get('errorMessage')})")
        self._token = str(payload["token"])
        self._token_at = time.monotonic()

    def _token_due(self) -> bool:
        """Gateway tokens live 24 h and their answer does not say when they expire: renew by age."""
        return time.monotonic() - self._token_at > self.token_refresh_s

    async def _renew(self, token: str) -> bool:
        """A new token from ``Auth/validate``."""
        assert self._session is not None
        try:
            async with self.limiter.slot("order"), self._session.post(
                    self.base_url + "/api/Auth/validate", json={}, headers={"Authorization": f"Bearer {token}"}) as resp:
                payload = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
            payload = None
        if isinstance(payload, dict) and payload.get("success") and payload.get("newToken"):
            self._token = str(payload["newToken"])
            self._token_at = time.monotonic()
            return True
        log.info("ProjectX %s: token renewal refused; logging in again", self.broker.name)
        return False

    # -- ids --------------------------------------------------------------------------------------------------
    async def _load_accounts(self) -> None:
        payload = await self._call("/api/Account/search", {"onlyActiveAccounts": True}, force=True)
        if not payload.get("success"):
            raise BrokerError(f"ProjectX {self.broker.name}: Account/search failed: {payload.get('errorMessage')}")
        self._remember_accounts(payload.get("accounts") or [])

    async def _account_id(self, account: str) -> int:
        """The numeric id of ``account``, which the hub (when live) starts watching."""
        account_id = await super()._account_id(account)
        if account_id not in self._watched:
            self._watched.add(account_id)
            if self._hub_live.is_set():
                try:
                    await self._hub_subscribe(account_id)
                except (BrokerError, asyncio.TimeoutError, ConnectionError) as exc:
                    log.info("ProjectX %s: hub subscription for %s failed (%s); polling", self.broker.name,
                             account_id, exc)
                    self._hub_live.clear()
        return account_id

    async def contract_id(self, code: str) -> str:
        """The gateway id of CME contract ``code`` (``MESZ6`` -> ``CON.F.US.MES.Z26``), cached."""
        if code in self._contract_ids:
            return self._contract_ids[code]
        root = split_code(code)[0]
        payload = await self._ok("/api/Contract/search", {"searchText": root, "live": False})
        contract = choose_contract(code, list(payload.get("contracts") or []), self.catalog, self.products)
        self._contract_ids[code] = str(contract["id"])
        self._contract_codes[str(contract["id"])] = code
        return str(contract["id"])

    async def contract_code(self, contract_id: str) -> str:
        """The CME code of a gateway contract id (reverse of ``contract_id``)."""
        if contract_id in self._contract_codes:
            return self._contract_codes[contract_id]
        try:
            payload = await self._ok("/api/Contract/searchById", {"contractId": contract_id})
            found = list(payload.get("contracts") or [])
        except BrokerError:
            found = []
        code = code_from_contract(found[0] if found else {"id": contract_id}, self.catalog, self.products)
        self._contract_codes[contract_id] = code
        if code != contract_id:
            self._contract_ids.setdefault(code, contract_id)
        return code

    # -- orders -----------------------------------------------------------------------------------------------
    async def place_order(self, request: OrderRequest) -> Order:
        """Counted while under way (answer and any lookup after a lost one): see ``_order_settled``."""
        self._placing += 1
        try:
            return await super().place_order(request)
        finally:
            self._placing -= 1

    async def _submit(self, request: OrderRequest) -> Order:
        account_id = await self._account_id(request.account)
        contract = await self.contract_id(request.contract)
        body: dict[str, Any] = {
            "accountId": account_id,
            "contractId": contract,
            "type": WIRE_ORDER_TYPES[request.order_type],
            "side": WIRE_SIDE[request.side],
            "size": request.quantity,
            "limitPrice": None if request.limit_price is None else float(request.limit_price),
            "stopPrice": None if request.stop_price is None else float(request.stop_price),
            "customTag": request.client_order_id,
        }
        payload = await self._call("/api/Order/place", body, kind="order")
        if payload.get("success") and payload.get("orderId") is not None:
            order_id = int(payload["orderId"])
            self._tags[order_id] = request.client_order_id
            await self._resolve_waiting(order_id)  # a trade that overtook this answer, now known to be ours
            with contextlib.suppress(BrokerError):
                found = await self._order_by_id(request.account, order_id)
                if found is not None:
                    return found
            return accepted_order(request, order_id)
        code, message = payload.get("errorCode"), str(payload.get("errorMessage") or "no message")
        # Any refusal may be the gateway's answer to a repeated customTag (the order placed by an earlier attempt
        # whose answer was lost): the code of that refusal is not documented, so every one is checked.
        try:
            existing = await self.find_order(request.account, request.client_order_id)
        except BrokerError as exc:
            raise OutcomeUnknown(f"ProjectX {self.broker.name} refused {request.client_order_id} (errorCode {code}: "
                                 f"{message}) and the lookup failed: {exc}") from exc
        if existing is not None:
            if existing.status is OrderStatus.REJECTED:
                raise OrderRejected(existing.reason or message, existing)
            log.info("ProjectX %s: %s was already placed as order %s", self.broker.name,
                     request.client_order_id, existing.broker_order_id)
            return existing
        raise OrderRejected(f"ProjectX errorCode {code}: {message}")

    async def _search_orders(self, account_id: int, since: datetime, *, kind: str = "poll") -> list[dict[str, Any]]:
        payload = await self._ok("/api/Order/search",
                                 {"accountId": account_id, "startTimestamp": format_broker_time(since, "utc_iso")},
                                 kind=kind)
        orders = list(payload.get("orders") or [])
        for order in orders:
            # Never forget a tag we learned from Order/place because an answer omits or nulls it; and an answer
            # without the field (the first published example) does not say the order is untagged.
            if order.get("customTag") is not None or ("customTag" in order and int(order["id"]) not in self._tags):
                self._tags[int(order["id"])] = order.get("customTag")
        return orders

    async def find_order(self, account: str, client_order_id: str) -> Order | None:
        account_id = await self._account_id(account)
        # An order-priority request: this lookup stands between a lost answer and the decision to resend.
        orders = await self._search_orders(account_id, utcnow() - self.order_lookback, kind="order")
        matches = [o for o in orders if self._tags.get(int(o["id"])) == client_order_id]
        untold = [o["id"] for o in orders if "customTag" not in o and self._tags.get(int(o["id"])) is None]
        if not matches and untold:
            # The first published Order/search answer carried no customTag: "not found" would then be a guess,
            # and a guess here is a duplicate order.
            raise BrokerError(f"ProjectX {self.broker.name}: Order/search does not say which order carries "
                              f"customTag {client_order_id} (no customTag on orders {untold[:5]})")
        if len(matches) > 1:
            log.error("ProjectX %s: %d orders carry customTag %s (expected one): %s", self.broker.name,
                      len(matches), client_order_id, [o["id"] for o in matches])
        return None if not matches else await self._order(matches[0])

    async def _order_by_id(self, account: str, order_id: int, *, kind: str = "order") -> Order | None:
        account_id = await self._account_id(account)
        for wire in await self._search_orders(account_id, utcnow() - self.order_lookback, kind=kind):
            if int(wire["id"]) == order_id:
                return await self._order(wire)
        return None

    async def cancel_order(self, account: str, broker_order_id: str) -> Order:
        account_id = await self._account_id(account)
        payload = await self._call("/api/Order/cancel", {"accountId": account_id, "orderId": int(broker_order_id)},
                                   kind="cancel")
        for attempt in range(5):
            order = await self._order_by_id(account, int(broker_order_id), kind="cancel")
            if order is None:
                raise BrokerError(f"ProjectX {self.broker.name}: no order {broker_order_id} in account {account}")
            if order.status.is_final:
                return order
            if not payload.get("success"):
                break
            await asyncio.sleep(0.05 * 2 ** attempt)
        if not payload.get("success"):
            raise BrokerError(f"ProjectX {self.broker.name}: cancel of {broker_order_id} refused: errorCode "
                              f"{payload.get('errorCode')}: {payload.get('errorMessage')}")
        assert order is not None  # every attempt above returns, raises, or found the order
        return order

    async def working_orders(self, account: str) -> list[Order]:
        account_id = await self._account_id(account)
        payload = await self._ok("/api/Order/searchOpen", {"accountId": account_id})
        return [await self._order(o) for o in payload.get("orders") or []]

    async def _order(self, wire: Mapping[str, Any]) -> Order:
        order_id = int(wire["id"])
        status_code = int(wire.get("status") or 0)
        size = int(wire["size"])
        filled = filled_quantity(wire)
        created = parse_broker_time(wire["creationTimestamp"], "utc_iso")
        updated = parse_broker_time(wire["updateTimestamp"], "utc_iso") if wire.get("updateTimestamp") else created
        tag = wire.get("customTag") or self._tags.get(order_id)
        if tag is not None:
            self._tags[order_id] = tag
        return Order(
            broker_order_id=str(order_id),
            client_order_id=tag,
            account=self._account_name(int(wire["accountId"])),
            contract=await self.contract_code(str(wire["contractId"])),
            side=FROM_WIRE_SIDE[int(wire["side"])],
            quantity=size,
            filled_quantity=filled,
            status=order_status(status_code, filled),
            order_type=wire_order_type(int(wire["type"])),
            created_at=created,
            updated_at=updated,
            avg_fill_price=dec(wire.get("filledPrice")),
            limit_price=dec(wire.get("limitPrice")),
            stop_price=dec(wire.get("stopPrice")),
        )

    async def flatten(self, account: str, contract: str) -> None:
        """Close the whole position in ``contract`` at market (``Position/closeContract``)."""
        account_id = await self._account_id(account)
        await self._ok("/api/Position/closeContract",
                       {"accountId": account_id, "contractId": await self.contract_id(contract)}, kind="order")

    # -- account state ----------------------------------------------------------------------------------------
    async def positions(self, account: str) -> list[Position]:
        account_id = await self._account_id(account)
        payload = await self._ok("/api/Position/searchOpen", {"accountId": account_id})
        result = []
        for wire in payload.get("positions") or []:
            quantity = signed_size(int(wire["type"]), int(wire["size"]))
            if quantity:
                result.append(Position(account, await self.contract_code(str(wire["contractId"])), quantity,
                                       dec(wire.get("averagePrice")) or Decimal(0)))
        return result

    async def account_snapshot(self, account: str) -> AccountSnapshot:
        """Balance from ``Account/search``; realized P&L is today's (since 18:00 New York) closed P&L net of fees.

        The gateway reports no margin and the REST API no marks: margin is the Broker document's per-contract
        margin times open contracts, and unrealized P&L is reported as 0.
        """
        account_id = await self._account_id(account)
        payload = await self._ok("/api/Account/search", {"onlyActiveAccounts": True})
        wire = next((a for a in payload.get("accounts") or [] if int(a["id"]) == account_id), None)
        if wire is None:
            raise BrokerError(f"ProjectX {self.broker.name}: account {account} is no longer active")
        balance = dec(wire.get("balance")) or Decimal(0)
        margin = Decimal(0)
        for position in await self.positions(account):
            per_contract = self.broker.margin(position.contract[:-2])
            margin += abs(position.quantity) * (per_contract or Decimal(0))
        realized = Decimal(0)
        for trade in await self._search_trades(account_id, trading_day_start(utcnow())):
            realized += (dec(trade.get("profitAndLoss")) or Decimal(0)) - (dec(trade.get("fees")) or Decimal(0))
        return AccountSnapshot(account, balance, margin, balance - margin, realized, Decimal(0), utcnow())

    async def _search_trades(self, account_id: int, since: datetime) -> list[dict[str, Any]]:
        payload = await self._ok("/api/Trade/search",
                                 {"accountId": account_id, "startTimestamp": format_broker_time(since, "utc_iso")})
        return [t for t in payload.get("trades") or [] if not t.get("voided")]

    async def fills_since(self, account: str, since: datetime) -> list[Fill]:
        account_id = await self._account_id(account)
        trades = await self._search_trades(account_id, since)
        if any(int(t["orderId"]) not in self._tags for t in trades):
            await self._search_orders(account_id, min(since, utcnow() - self.order_lookback))
        return [await self._fill(t) for t in trades]

    async def _fill(self, wire: Mapping[str, Any]) -> Fill:
        order_id = int(wire["orderId"])
        return Fill(
            fill_id=str(wire["id"]),
            broker_order_id=str(order_id),
            client_order_id=self._tags.get(order_id),
            account=self._account_name(int(wire["accountId"])),
            contract=await self.contract_code(str(wire["contractId"])),
            side=FROM_WIRE_SIDE[int(wire["side"])],
            quantity=int(wire["size"]),
            price=dec(wire["price"]) or Decimal(0),
            commission=dec(wire.get("fees")) or Decimal(0),
            time=parse_broker_time(wire["creationTimestamp"], "utc_iso"),
        )

    # -- events -----------------------------------------------------------------------------------------------
    async def _note_order(self, wire: Mapping[str, Any]) -> None:
        key = int(wire["id"])
        filled = filled_quantity(wire)
        status = order_status(int(wire.get("status") or 0), filled)
        known = self._known.get(key)
        if known is None or known.status is not status or known.filled != filled:
            self._known[key] = Known(status, filled)  # before any await: the hub and the poll race here
            self._emit(OrderEvent(await self._order(wire)))
        if key in self._tags:  # the order's event may carry the tag a waiting trade of it lacked
            await self._resolve_waiting(key)

    async def _note_trade(self, wire: Mapping[str, Any]) -> None:
        trade_id = int(wire["id"])
        if trade_id in self._seen_trades or wire.get("voided"):
            self._unresolved.pop(trade_id, None)
            return
        settled = await self._order_settled(wire)
        if trade_id in self._seen_trades:  # reported meanwhile by the other path (the hub and the poll race here)
            return
        if not settled:
            if trade_id not in self._unresolved:
                log.info("ProjectX %s: trade %s of order %s waits until we can tell whether the order is ours",
                         self.broker.name, trade_id, wire.get("orderId"))
            self._unresolved[trade_id] = wire
            return
        self._seen_trades.add(trade_id)
        self._unresolved.pop(trade_id, None)
        self._emit(FillEvent(await self._fill(wire)))

    async def _order_settled(self, wire: Mapping[str, Any]) -> bool:
        """Whether the trade's order is known to be ours (its tag) or not ours (no tag), looking it up if need be.

        The lookup is bounded by ``lookup_wait_s``: it runs inside the hub's event handling, where waiting out a
        429 penalty would hold every event behind it. A failed lookup settles nothing (the trade waits; reported
        without its tag it would be booked as a trade by hand), and for ``lookup_wait_s`` after one the next trade
        waits without asking: the REST API is throttled or away, and the poll asks for all of them at once.
        An order the answer lists without ``customTag`` (or not at all) is not ours unless one of our placements
        is still under way: its answer may yet name it.
        """
        order_id = int(wire["orderId"])
        if order_id in self._tags:
            return True
        if time.monotonic() - self._lookup_failed_at < self.lookup_wait_s:
            return False
        try:
            await asyncio.wait_for(self._search_orders(int(wire["accountId"]), utcnow() - self.order_lookback),
                                   self.lookup_wait_s)
        except (BrokerError, TimeoutError) as exc:
            self._lookup_failed_at = time.monotonic()
            log.info("ProjectX %s: order %s of trade %s not looked up (%s)", self.broker.name, order_id,
                     wire.get("id"), type(exc).__name__ if isinstance(exc, TimeoutError) else exc)
            return False
        return order_id in self._tags or not self._placing

    async def _resolve_waiting(self, order_id: int) -> None:
        """Report the waiting trades of ``order_id`` now that its tag is known."""
        for wire in [w for w in self._unresolved.values() if int(w["orderId"]) == order_id]:
            await self._note_trade(wire)

    async def _poll_once(self) -> None:
        self._last_poll = time.monotonic()
        since = self._session_start - timedelta(seconds=5)
        for account_id in sorted(self._watched):
            for wire in await self._search_orders(account_id, since):
                await self._note_order(wire)
            trades = await self._search_trades(account_id, since)
            listed = {int(t["id"]) for t in trades}
            for trade_id, waiting in list(self._unresolved.items()):
                if int(waiting["accountId"]) == account_id and trade_id not in listed:
                    self._unresolved.pop(trade_id, None)  # voided since: never to be reported
            for trade in trades:
                await self._note_trade(trade)

    async def _while_connected(self, backoff: Backoff) -> None:
        """Poll orders and trades while the hub is not delivering them (and now and then even when it is, and at
        every pass while a trade waits to be told ours or not)."""
        hub_quiet = time.monotonic() - self._last_poll < self.safety_poll_s
        if not self._hub_live.is_set() or self._resubscribe.is_set() or not hub_quiet or self._unresolved:
            await self._poll_safely()
        await asyncio.sleep(self.poll_interval_s)

    async def _hub_loop(self) -> None:
        """Keep a SignalR user-hub connection open while connected; events go through the same dedupe."""
        backoff = Backoff(self.backoff_s, self.backoff_max_s)
        while True:
            if not self._connected or self._session is None or self._token is None:
                await asyncio.sleep(self.backoff_s)
                continue
            try:
                await self._hub_session()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any hub failure falls back to polling until the next attempt
                # Not str(exc): a failed handshake's message carries the URL, and with it the access token.
                status = getattr(exc, "status", None)
                log.info("ProjectX %s user hub unavailable (%s%s); polling", self.broker.name,
                         type(exc).__name__, f" {status}" if status else "")
            finally:
                self._hub_live.clear()
                self._hub_ws = None
            await backoff.sleep()

    async def _hub_session(self) -> None:
        """One SignalR connection: handshake, subscriptions (acknowledged), then read until it drops."""
        assert self._session is not None
        url = self.hub_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        token = await self._fresh_token()
        async with self._session.ws_connect(url, params={"access_token": token}, heartbeat=None) as ws:
            await ws.send_str(json.dumps({"protocol": "json", "version": 1}) + RECORD_SEPARATOR)
            handshake = await ws.receive(timeout=self.request_timeout_s)
            if handshake.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"user hub closed during the handshake ({handshake.type.name})")
            first, _, rest = handshake.data.partition(RECORD_SEPARATOR)
            if json.loads(first).get("error"):
                raise ConnectionError(f"user hub refused the handshake: {json.loads(first)['error']}")
            self._hub_ws = ws
            self._hub_subscribed = set()
            starter = asyncio.create_task(self._hub_start())
            try:
                await self._hub_records(rest)
                while True:
                    try:
                        message = await ws.receive(timeout=HUB_PING_S)
                    except asyncio.TimeoutError:
                        await ws.send_str(json.dumps({"type": 6}) + RECORD_SEPARATOR)
                        continue
                    if message.type != aiohttp.WSMsgType.TEXT:
                        raise ConnectionError(f"user hub closed ({message.type.name})")
                    await self._hub_records(message.data)
            finally:
                starter.cancel()
                await asyncio.gather(starter, return_exceptions=True)
                for waiter in self._hub_pending.values():
                    waiter.cancel()
                self._hub_pending.clear()

    async def _hub_start(self) -> None:
        """Subscribe, then poll once for what happened before the subscriptions took hold; from then on the
        hub alone delivers events."""
        try:
            await self._hub_invoke("SubscribeAccounts")
            while missing := sorted(self._watched - self._hub_subscribed):
                for account_id in missing:
                    await self._hub_subscribe(account_id)
                await self._poll_once()
        except (BrokerError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("ProjectX %s: hub subscriptions failed (%s); polling", self.broker.name, exc)
            if self._hub_ws is not None:
                await self._hub_ws.close()
            return
        # No await between the last check of _watched and this: a newly watched account either was
        # subscribed above or will see _hub_live set and subscribe itself.
        self._resubscribe.clear()
        self._hub_live.set()

    async def _hub_subscribe(self, account_id: int) -> None:
        if account_id in self._hub_subscribed:
            return
        for target in ("SubscribeOrders", "SubscribePositions", "SubscribeTrades"):
            await self._hub_invoke(target, account_id)
        self._hub_subscribed.add(account_id)

    async def _hub_invoke(self, target: str, *arguments: Any) -> None:
        """Invoke a hub method and wait for its completion, so that no event is missed after this returns."""
        ws = self._hub_ws
        if ws is None or ws.closed:
            raise ConnectionError("user hub not connected")
        self._hub_invocations += 1
        invocation_id = str(self._hub_invocations)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hub_pending[invocation_id] = waiter
        try:
            await ws.send_str(json.dumps({"type": 1, "target": target, "arguments": list(arguments),
                                          "invocationId": invocation_id}) + RECORD_SEPARATOR)
            await asyncio.wait_for(waiter, self.request_timeout_s)
        finally:
            self._hub_pending.pop(invocation_id, None)

    async def _hub_records(self, data: str) -> None:
        for text in data.split(RECORD_SEPARATOR):
            if not text:
                continue
            record = json.loads(text)
            kind = record.get("type")
            if kind == 1:
                await self._hub_event(str(record.get("target")), record.get("arguments") or [])
            elif kind == 3:
                waiter = self._hub_pending.get(str(record.get("invocationId")))
                if waiter is not None and not waiter.done():
                    if record.get("error"):
                        waiter.set_exception(BrokerError(f"user hub: {record['error']}"))
                    else:
                        waiter.set_result(None)
            elif kind == 7:
                raise ConnectionError(f"user hub closed: {record.get('error')}")

    async def _hub_event(self, target: str, arguments: list[Any]) -> None:
        for argument in arguments:
            data = argument.get("data", argument) if isinstance(argument, dict) else None
            if not isinstance(data, dict):
                continue
            if target == "GatewayUserOrder":
                await self._note_order(data)
            elif target == "GatewayUserTrade":
                await self._note_trade(data)
