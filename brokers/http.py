"""What the connectors to real brokers over HTTP (ProjectX, Tradovate) share, so that both keep one set of promises.

The promises that matter most live here once: a request the broker may have executed is never reported as "not
sent" (``OutcomeUnknown``, so that the idempotent ``place_order`` looks before it resends); a refused token costs
one fresh login shared by every request refused with it; a lost connection is noticed by whichever request meets
it first and announced once (``ConnectionEvent``), and a background loop brings it back with capped exponential
backoff. Each broker's own protocol (envelopes, penalty tickets, token renewal, push channels) stays in its module,
behind the hooks ``_request_token``, ``_token_due``, ``_renew``, ``_load_accounts``, ``_reconnect_once``,
``_on_reconnected``, ``_start_background``, ``_while_connected``, ``_poll_once`` and ``_close_streams``, and the
numbers its documentation gives (``throttle``, ``limiter``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping

import aiohttp

from brokers.base import (
    AuthError,
    BrokerError,
    BrokerUnavailable,
    ConnectionEvent,
    Connector,
    Order,
    OrderRequest,
    OrderStatus,
    OutcomeUnknown,
    RateLimited,
    utcnow,
)
from brokers.ratelimit import BrokerRateLimiter

if TYPE_CHECKING:
    from engine.model import Broker

def dec(value: Any) -> Decimal | None:
    """A broker number as Decimal, through its decimal text so that 6065.25 stays 6065.25."""
    return None if value is None else Decimal(str(value))


def retry_after_s(header: str | None, *, default_s: float) -> float:
    """Seconds from a ``Retry-After`` header, else ``default_s``: neither broker documents the header, and
    Tradovate's 429 usually has none."""
    if header:
        with contextlib.suppress(ValueError):
            return max(float(header), 0.0)
    return default_s


def accepted_order(request: OrderRequest, order_id: int) -> Order:
    """The order as placed, for when the broker gave its id but reading it back failed: the placement stands
    (never resend it), and reconciliation and events bring the real state."""
    now = utcnow()
    return Order(str(order_id), request.client_order_id, request.account, request.contract, request.side,
                 request.quantity, 0, OrderStatus.PENDING, request.order_type, now, now,
                 limit_price=request.limit_price, stop_price=request.stop_price)


@dataclass
class Known:
    """What we last told subscribers about an order, to emit each change once whichever path (push or poll)
    saw it."""

    status: OrderStatus
    filled: int


class Backoff:
    """Waits between attempts to reach a broker: ``first_s``, doubling, capped at ``max_s``; ``reset`` once an
    attempt succeeds, so that the next drop is retried quickly again."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = first_s

    def reset(self) -> None:
        self.delay_s = self.first_s

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.max_s)


@dataclass(frozen=True)
class Throttle:
    """How long to wait after an HTTP 429 that names no wait (``first_s``, doubling to ``max_s``), and how many
    times to resend a read before reporting ``RateLimited``; each broker documents its own."""

    first_s: float
    max_s: float
    max_resends: int


@dataclass
class Attempts:
    """What one logical request has already spent across its resends: each second chance is given once."""

    resent: bool = False
    """Sent again after the server had closed a keep-alive connection."""
    relogged: bool = False
    """Sent again with the token of a fresh login."""
    throttles: int = 0
    """HTTP 429 answers so far."""


class HttpConnector(Connector):
    """A broker behind a REST API with a bearer token and a background loop that keeps the connection alive."""

    label: ClassVar[str] = "HTTP"
    """The broker's name in messages and logs (``ProjectX``, ``Tradovate``)."""
    unreachable: ClassVar[str] = "unreachable"
    """How ``_await_reachable`` words a broker that stayed away."""
    missing_account: ClassVar[str] = "no account named"
    """How ``_account_id`` words an account the broker does not list."""

    base_url: str
    limiter: BrokerRateLimiter
    throttle: Throttle

    def __init__(self, broker: "Broker", *, env: Mapping[str, str] | None = None, **options: Any) -> None:
        super().__init__(broker, env=env, **options)
        self.request_timeout_s = float(options.get("request_timeout_s", 10.0))
        self.poll_interval_s = float(options.get("poll_interval_s", 2.0))
        self.backoff_s = float(options.get("reconnect_backoff_s", 0.5))
        self.backoff_max_s = float(options.get("reconnect_backoff_max_s", 10.0))
        self.reconnect_wait_s = float(options.get("reconnect_wait_s", 10.0))
        self.order_lookback = timedelta(days=float(options.get("order_lookback_days", 7)))
        self.safety_poll_s = float(options.get("safety_poll_s", 30.0))
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._login_lock = asyncio.Lock()
        self._connected = False
        self._accounts: dict[str, int] = {}
        self._account_names: dict[int, str] = {}
        self._known: dict[int, Known] = {}
        self._session_start = utcnow()
        self._last_poll = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.logins = 0
        self.reconnects = 0
        self._log = logging.getLogger(type(self).__module__)
        """The broker module's logger, so that logging can still be configured per broker."""

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.request_timeout_s))
        try:
            await self._login()
            await self._load_accounts()
        except BaseException:
            if not self._tasks:  # a first connect that failed leaves nothing open behind
                await self._session.close()
                self._session = None
            raise
        was = self._connected
        self._connected = True
        if not was:
            self._emit(ConnectionEvent(True, "connected"))
        if not self._tasks:
            self._tasks.extend(self._start_background())

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_streams()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._connected:
            self._connected = False
            self._emit(ConnectionEvent(False, "closed"))
        self._token = None

    def rate_limit_headroom(self) -> float:
        return self.limiter.headroom()

    @abc.abstractmethod
    def _start_background(self) -> list[asyncio.Task[None]]:
        """The tasks that keep the connection and its events alive, started by the first successful connect."""

    async def _close_streams(self) -> None:
        """Close push channels (WebSockets) before the HTTP session they ride on."""

    # -- connection state -------------------------------------------------------------------------------------
    def _mark_down(self, reason: str) -> None:
        if self._connected:
            self._connected = False
            self._log.warning("%s %s disconnected: %s", self.label, self.broker.name, reason)
            self._emit(ConnectionEvent(False, reason))

    def _mark_reconnected(self) -> None:
        if not self._connected:
            self._connected = True
            self.reconnects += 1
            self._on_reconnected()
            self._emit(ConnectionEvent(True, "reconnected"))

    def _on_reconnected(self) -> None:
        """Whatever a push channel must redo after a drop, decided before subscribers hear of the reconnect."""

    @abc.abstractmethod
    async def _reconnect_once(self) -> bool:
        """One attempt to come back; True when connected again."""

    async def _keep_connected(self) -> None:
        """Reconnect after drops; while connected, ``_while_connected`` does the broker's own work."""
        backoff = Backoff(self.backoff_s, self.backoff_max_s)
        while True:
            if not self._connected:
                if await self._reconnect_once():
                    backoff.reset()
                    continue
                await backoff.sleep()
                continue
            await self._while_connected(backoff)

    @abc.abstractmethod
    async def _while_connected(self, backoff: Backoff) -> None:
        """One pass of event delivery while connected (``backoff`` is the reconnect loop's, to share or reset)."""

    @abc.abstractmethod
    async def _poll_once(self) -> None:
        """Fetch by REST what the push channel would have delivered."""

    async def _poll_safely(self) -> None:
        try:
            await self._poll_once()
        except BrokerError as exc:
            self._log.debug("%s %s poll failed: %s", self.label, self.broker.name, exc)
        except Exception:  # noqa: BLE001 - a poll must never kill the loop that reconnects
            self._log.exception("%s %s: unexpected error while polling", self.label, self.broker.name)

    async def _await_reachable(self) -> None:
        """After an unknown outcome, wait (bounded) for the broker so the order can be looked up; if it stays
        away the outcome stays unknown, which is what the caller must hear (not "unavailable, nothing sent")."""
        deadline = time.monotonic() + self.reconnect_wait_s
        backoff = Backoff(self.backoff_s, self.backoff_max_s)
        while not self._connected:
            if await self._reconnect_once():
                return
            if time.monotonic() >= deadline:
                raise OutcomeUnknown(f"{self.label} {self.broker.name}: {self.unreachable} for "
                                     f"{self.reconnect_wait_s:g}s; an order may have been placed")
            await backoff.sleep()

    # -- transport --------------------------------------------------------------------------------------------
    def _require_connection(self, path: str, *, force: bool) -> None:
        """``force``: requests that build the connection (login, accounts) go out before it counts as up."""
        if self._session is None or (not self._connected and not force):
            raise BrokerUnavailable(f"{self.label} broker {self.broker.name} is not connected ({path} not sent)")

    async def _exchange(self, method: str, path: str, *, kind: str, auth: bool, placing: bool, attempts: Attempts,
                        params: Mapping[str, str] | None = None, body: Any = None) -> str | None:
        """Send one request; the text of a 200 answer, None when it must simply go again (nothing was done: a
        keep-alive the server had closed, for a read; a token refused and renewed; the broker's own 429, after
        the wait it asks of every request), else the error that says whether the request may have been executed.

        A connection refused is ``BrokerUnavailable`` (nothing sent); one lost after sending is ``OutcomeUnknown``
        when ``placing`` (the order may exist) and ``BrokerUnavailable`` otherwise; so is a 5xx to a placement.
        A 429 to a placement is ``RateLimited`` at once, so that the idempotent ``place_order`` decides.
        """
        assert self._session is not None
        headers = {"Accept": "application/json"}
        token = await self._fresh_token() if auth else None
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        name = f"{self.label} {self.broker.name}"
        try:
            async with self.limiter.slot(kind):
                async with self._session.request(method, self.base_url + path, params=params, json=body,
                                                 headers=headers) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    text = await resp.text()
        except aiohttp.ClientConnectorError as exc:
            self._mark_down(f"{path}: cannot connect ({exc.__class__.__name__})")
            raise BrokerUnavailable(f"{name}: cannot connect for {path}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if not placing and not attempts.resent and isinstance(exc, aiohttp.ServerDisconnectedError):
                attempts.resent = True  # a keep-alive connection the server had closed: a read may simply go again
                return None
            self._mark_down(f"{path}: connection lost ({exc.__class__.__name__})")
            if placing:
                raise OutcomeUnknown(f"{name}: no answer to {path}: {exc!r}") from exc
            raise BrokerUnavailable(f"{name}: no answer to {path}: {exc!r}") from exc
        if status == 401 and auth:
            if attempts.relogged:
                raise AuthError(f"{name}: {path} refused the token of a fresh login")
            attempts.relogged = True
            await self._login(stale=token)
            return None
        if status == 429:
            throttle = self.throttle
            wait_s = retry_after_s(retry_after, default_s=min(throttle.first_s * 2 ** attempts.throttles,
                                                              throttle.max_s))
            self.limiter.penalize(wait_s)
            attempts.throttles += 1
            self._log.warning("%s: HTTP 429 on %s; every request waits %.1fs", name, path, wait_s)
            if placing or attempts.throttles > throttle.max_resends:
                raise RateLimited(wait_s, f"({name} {path})")
            return None
        if status != 200:
            if placing and status >= 500:
                raise OutcomeUnknown(f"{name}: {path} answered HTTP {status}")
            raise BrokerError(f"{name}: {path} answered HTTP {status}: {text[:200]}")
        return text

    # -- auth -------------------------------------------------------------------------------------------------
    async def _login(self, *, stale: str | None = None) -> None:
        """Log in unless a valid token is there; ``stale`` is a token the broker refused (several requests
        refused at once share one new login)."""
        async with self._login_lock:
            if self._token is not None and self._token != stale:
                return
            await self._request_token()
            self.logins += 1

    @abc.abstractmethod
    async def _request_token(self) -> None:
        """Log in with the credentials and keep the new token (raises ``AuthError`` when refused)."""

    async def _fresh_token(self) -> str:
        """The session token, renewed before it lapses (a lapsed token costs a login, and logins are limited)."""
        if self._token is not None and self._token_due():
            async with self._login_lock:
                if self._token is not None and self._token_due():
                    if not await self._renew(self._token):
                        self._token = None
        if self._token is None:
            await self._login()
        assert self._token is not None
        return self._token

    @abc.abstractmethod
    def _token_due(self) -> bool:
        """Whether the token should be renewed now."""

    @abc.abstractmethod
    async def _renew(self, token: str) -> bool:
        """Renew ``token`` in place; False (the caller logs in again) when the broker refuses or is away."""

    # -- accounts ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def _load_accounts(self) -> None:
        """Read the broker's accounts (through ``_remember_accounts``)."""

    def _remember_accounts(self, accounts: Iterable[Mapping[str, Any]]) -> None:
        for account in accounts:
            self._accounts[str(account["name"])] = int(account["id"])
            self._account_names[int(account["id"])] = str(account["name"])

    async def _account_id(self, account: str) -> int:
        """The numeric id of ``account`` (its name, as in the Account document; a numeric id is accepted too)."""
        if account not in self._accounts:
            await self._load_accounts()
        if account in self._accounts:
            return self._accounts[account]
        if account.isdigit() and int(account) in self._account_names:
            return int(account)
        raise BrokerError(f"{self.label} {self.broker.name}: {self.missing_account} {account!r} "
                          f"(known: {sorted(self._accounts)})")

    def _account_name(self, account_id: int) -> str:
        return self._account_names.get(account_id, str(account_id))
