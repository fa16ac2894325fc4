"""Alerts pushed to where the trader is: a chat webhook (Discord, Slack, Telegram) or any endpoint taking JSON.

The service runs unattended. An account halted by a loss limit, a flatten whose retries ran out, a broker that
dropped with positions open: each must reach the trader's phone, not wait in a dashboard tab nobody has open. The
journal keeps the record of every one of them (``risk_events``, ``orders``, ``reconciliations``); this module
only tells someone.

Configured from the environment, because the URL is a secret (Discord's and Slack's carry their token, Telegram's
the bot token): ``MULTIBROKER_NOTIFY_URL``; ``MULTIBROKER_NOTIFY_FORMAT`` (``auto`` by default: the URL's host
picks ``discord``, ``slack`` or ``telegram``, anything else gets ``json``); ``MULTIBROKER_NOTIFY_MIN_SEVERITY``
(``info`` by default: everything). The URL is never logged or shown; the status names its host only.

Delivery never touches trading: ``notify`` appends to a bounded in-memory queue and returns; one task sends.
- Alerts raised within ``batch_s`` of each other go out as one message: a broker that drops with ten accounts is
  one message, not ten, which also keeps a chat webhook's rate limit (Discord: 30 a minute) out of reach. A
  limiter (aiolimiter, as for the brokers) bounds the messages a minute all the same.
- A failed post (connection error, 5xx, 429) is retried after ``retry_delays_s``, or after the ``Retry-After``
  the endpoint asked for when longer; then the batch is dropped and counted as failed. A 4xx other than 429
  means the URL or its token is wrong: retrying cannot help, so the batch is dropped at once, with the status
  (never the URL) in the log and in ``status()``.
- The queue keeps the newest ``max_queued`` alerts while the endpoint is away; older ones are counted as dropped.
  Retries are written here rather than with a retry library: they must honour ``Retry-After``, share the batching
  queue, and give up per batch, which is a dozen lines either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import aiohttp
from aiolimiter import AsyncLimiter

from service.config import NOTIFY_FORMAT_ENV, NOTIFY_MIN_SEVERITY_ENV, NOTIFY_URL_ENV, ConfigError

log = logging.getLogger(__name__)


FORMATS = ("auto", "json", "discord", "slack", "telegram")
SEVERITIES = ("info", "warning", "critical")
SEVERITY: Mapping[str, str] = {
    "flatten_failed": "critical",  # a flatten's retries ran out: an account holds what it should not
    "halt": "critical",            # entries stopped (loss limit, reconciliation mismatch)
    "flatten_redone": "warning",   # a flatten withheld for a ledger/broker mismatch was carried out once they agreed
    "adopt": "warning",            # the ledger took the broker's positions: something traded outside multibroker
    "broker_down": "warning",
    "missed": "warning",           # orders decided for an account whose broker was away
    "broker_up": "info",
    "broker_paused": "info",
    "broker_resumed": "info",
    "clear": "info",               # a halt lifted (a matching reconciliation, or an operator)
    "rearm": "info",
}
"""Every kind the service raises, with its severity; a kind not listed is not sent (``day_start`` is routine)."""

DISCORD_MAX = 2000
"""Discord refuses a message longer than this; Slack's and Telegram's limits are higher but a phone shows less."""
ET = ZoneInfo("America/New_York")


class NotifyConfigError(ConfigError):
    """The notification settings cannot work; raised at start-up (``ServiceConfig``), naming the variable."""


@dataclass(frozen=True)
class Alert:
    kind: str
    message: str
    at: datetime
    account: str | None = None
    broker: str | None = None

    @property
    def severity(self) -> str:
        return SEVERITY[self.kind]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "severity": self.severity, "message": self.message,
                               "at": self.at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")}
        if self.account is not None:
            out["account"] = self.account
        if self.broker is not None:
            out["broker"] = self.broker
        return out

    def line(self) -> str:
        """One line for a chat: severity, what, where, and the Eastern-time clock the trader reads."""
        where = " ".join(x for x in (self.broker and f"broker {self.broker}",
                                     self.account and f"account {self.account}") if x)
        stamp = self.at.astimezone(ET).strftime("%H:%M:%S ET")
        return f"[{self.severity}] {self.kind}{' ' + where if where else ''}: {self.message} ({stamp})"


def infer_format(url: str) -> str:
    host = (urlsplit(url).hostname or "").lower()
    if host in ("discord.com", "discordapp.com") or host.endswith((".discord.com", ".discordapp.com")):
        return "discord"
    if host == "hooks.slack.com":
        return "slack"
    if host == "api.telegram.org":
        return "telegram"
    return "json"


def render(fmt: str, alerts: Sequence[Alert], *, chat_id: str | None = None) -> dict[str, Any]:
    """The request body for one batch. Chat formats get text, newest last, cut to fit with a count of the rest."""
    if fmt == "json":
        return {"source": "multibroker", "alerts": [a.as_dict() for a in alerts]}
    lines = [a.line() for a in alerts]
    text = "\n".join(lines)
    if len(text) > DISCORD_MAX:
        kept: list[str] = []
        for n, line in enumerate(lines):
            tail = f"... and {len(lines) - n} more (see the journal: /api/status, risk events)"
            if len("\n".join([*kept, line, tail])) > DISCORD_MAX:
                text = "\n".join([*kept, tail])[:DISCORD_MAX]
                break
            kept.append(line)
    if fmt == "discord":
        return {"content": text}
    if fmt == "slack":
        return {"text": text}
    return {"chat_id": chat_id, "text": text}


@dataclass
class Notifier:
    """One endpoint; ``url`` None makes every call a no-op (the default: nothing configured)."""

    url: str | None = field(default=None, repr=False)
    fmt: str = "auto"
    min_severity: str = "info"
    batch_s: float = 1.0
    retry_delays_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)
    max_queued: int = 1000
    per_minute: int = 20
    timeout_s: float = 10.0
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    last_error: str | None = None
    last_sent_at: datetime | None = None
    _queue: deque[Alert] = field(default_factory=deque, repr=False)
    _wake: asyncio.Event | None = field(default=None, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)
    _chat_id: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise NotifyConfigError(f"{NOTIFY_FORMAT_ENV}={self.fmt!r}: expected one of {', '.join(FORMATS)}")
        if self.min_severity not in SEVERITIES:
            raise NotifyConfigError(f"{NOTIFY_MIN_SEVERITY_ENV}={self.min_severity!r}: expected one of "
                                    f"{', '.join(SEVERITIES)}")
        if self.url is None:
            return
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise NotifyConfigError(f"{NOTIFY_URL_ENV}: expected an http(s) URL with a host (the value is a secret "
                                    "and is not shown)")
        if self.fmt == "auto":
            self.fmt = infer_format(self.url)
        if self.fmt == "telegram":
            self._chat_id = next(iter(parse_qs(parts.query).get("chat_id") or ()), None)
            if not self._chat_id:
                raise NotifyConfigError(f"{NOTIFY_URL_ENV}: a Telegram URL needs ?chat_id=<chat> "
                                        "(https://api.telegram.org/bot<token>/sendMessage?chat_id=<chat>)")

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def target(self) -> str | None:
        """What may be shown of the URL: scheme and host (the path and query carry the token)."""
        if self.url is None:
            return None
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{'' if parts.port is None else f':{parts.port}'}"

    # -- raising ----------------------------------------------------------------------------------------------
    def notify(self, kind: str, message: str, *, at: datetime, account: str | None = None,
               broker: str | None = None) -> None:
        """Queue one alert; never blocks and never raises for the endpoint's sake (callers are trading paths)."""
        if self.url is None or kind not in SEVERITY:
            return
        if at.tzinfo is None:
            raise ValueError(f"alert {kind}: naive datetime {at!r}")
        alert = Alert(kind, message, at, account, broker)
        if SEVERITIES.index(alert.severity) < SEVERITIES.index(self.min_severity):
            return
        self._queue.append(alert)
        while len(self._queue) > self.max_queued:
            self._queue.popleft()
            self.dropped += 1
        if self._wake is not None:
            self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.url is None or self._task is not None:
            return
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._task = asyncio.create_task(self._run(), name="notifier")
        log.info("notifications: %s to %s", self.fmt, self.target)
        if self._queue:
            self._wake.set()

    async def stop(self, flush_s: float = 2.0) -> None:
        """Send what is queued, for at most ``flush_s`` (a stopping service should still say why it stopped)."""
        task, self._task = self._task, None
        if task is not None:
            if self._queue:
                try:
                    await asyncio.wait_for(self._drain(), flush_s)
                except Exception:  # noqa: BLE001 - best effort at shutdown (a timeout included)
                    pass
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "format": self.fmt if self.enabled else None, "target": self.target,
                "min_severity": self.min_severity, "sent": self.sent, "failed": self.failed,
                "dropped": self.dropped, "queued": len(self._queue), "last_error": self.last_error,
                "last_sent_at": None if self.last_sent_at is None
                else self.last_sent_at.isoformat().replace("+00:00", "Z")}

    # -- sending ------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None
        limiter = AsyncLimiter(self.per_minute, 60)
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.batch_s)  # what arrives meanwhile joins this message
            while self._queue:
                async with limiter:
                    await self._send_batch()

    async def _drain(self) -> None:
        while self._queue:
            await self._send_batch(retry=False)

    def _take_batch(self) -> list[Alert]:
        batch = list(self._queue)
        self._queue.clear()
        return batch

    async def _send_batch(self, *, retry: bool = True) -> None:
        batch = self._take_batch()
        if not batch:
            return
        body = render(self.fmt, batch, chat_id=self._chat_id)
        delays = list(self.retry_delays_s) if retry else []
        while True:
            wait = await self._post(body)
            if wait is None:
                self.sent += len(batch)
                self.last_sent_at = datetime.now(timezone.utc)
                return
            if wait < 0 or not delays:
                self.failed += len(batch)
                log.error("notifications: %d alert(s) not delivered to %s: %s", len(batch), self.target,
                          self.last_error)
                return
            await asyncio.sleep(max(delays.pop(0), wait))

    async def _post(self, body: dict[str, Any]) -> float | None:
        """None when delivered; seconds to wait before a retry (0: the default delay); -1: retrying cannot help."""
        assert self._session is not None and self.url is not None
        try:
            async with self._session.post(self.url, json=body) as response:
                if response.status < 300:
                    self.last_error = None
                    return None
                self.last_error = f"HTTP {response.status}"
                if response.status == 429:
                    return _retry_after(response.headers.get("Retry-After"))
                return 0.0 if response.status >= 500 else -1.0
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.last_error = type(exc).__name__  # the message may quote the URL, which is a secret
            return 0.0


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def notifier_for(config: Any, **options: Any) -> Notifier:
    """The service's notifier from its settings (``ServiceConfig.notify_*``, read from the environment)."""
    return Notifier(url=getattr(config, "notify_url", None), fmt=getattr(config, "notify_format", "auto"),
                    min_severity=getattr(config, "notify_min_severity", "info"), **options)
