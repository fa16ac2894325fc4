"""Typed, validated rule documents: what the loader hands to the engine, the brokers and the service.

Every value here has passed the JSON Schemas and the cross-checks in ``engine.validate``, so consumers may trust
names to resolve and numbers to be in range. Money is ``Decimal``; credentials hold environment-variable *names*,
never their values. Each document remembers where it came from (``Location``) so that any later explanation can
point a trader at the line to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Mapping

from engine.catalog import Catalog

DEFAULT_MARGIN_BUFFER_PCT = Decimal(30)


@dataclass(frozen=True)
class Location:
    """A place in a rule file; ``line`` and ``column`` are 1-based, as editors show them."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class RateLimit:
    requests: int
    per_seconds: float


@dataclass(frozen=True)
class Broker:
    name: str
    type: str
    environment: str
    credentials: Mapping[str, str]
    """Credential field -> environment variable name (``username -> TRADOVATE_USER``)."""
    rate_limit: RateLimit | None
    commissions: Mapping[str, Decimal]
    """USD per contract per side by root; key ``default`` for the rest."""
    margins: Mapping[str, Decimal]
    """USD intraday initial margin per contract by root; key ``default`` for the rest."""
    reconcile_every_seconds: int
    endpoints: Mapping[str, str]
    """Base URLs (``rest``, ``websocket``, ``hub``) overriding the connector's defaults."""
    options: Mapping[str, Any]
    """Connector-specific settings (the paper broker's latency, fill and timestamp quirks)."""
    source: Location

    def commission(self, root: str) -> Decimal | None:
        """Per-side commission for ``root``, falling back to ``default``; None when neither is set."""
        return self.commissions.get(root, self.commissions.get("default"))

    def margin(self, root: str) -> Decimal | None:
        """Margin per contract for ``root``, falling back to ``default``; None when neither is set."""
        return self.margins.get(root, self.margins.get("default"))


@dataclass(frozen=True)
class Account:
    name: str
    broker: str
    broker_account: str
    capital: Decimal
    strategies: tuple[str, ...]
    size_multiplier: Decimal
    instruments: tuple[str, ...] | None
    """Allowed roots; None allows every root."""
    catch_up: bool
    """After a reconnect, converge to the strategies' current targets."""
    on_mismatch: str
    """Reconciliation policy: ``adopt`` the broker's truth and alert, or ``halt`` entries until resolved."""
    source: Location


@dataclass(frozen=True)
class RoutingRule:
    name: str
    strategies: tuple[str, ...] | None
    """``match.strategy``; None matches every strategy."""
    instruments: tuple[str, ...] | None
    """``match.instrument`` (roots); None matches every instrument."""
    mode: str
    """``mirror`` (every eligible target) or ``best`` (exactly one eligible target gets an entry)."""
    select: tuple[str, ...]
    accounts: tuple[str, ...] | None
    brokers: tuple[str, ...] | None
    routing: str
    """Name of the Routing document that holds this rule."""
    source: Location


@dataclass(frozen=True)
class Routing:
    name: str
    rules: tuple[RoutingRule, ...]
    strategy_secrets: Mapping[str, str]
    """Strategy -> environment variable holding that strategy's webhook secret."""
    source: Location


@dataclass(frozen=True)
class Limit:
    name: str
    scope: str
    """``account`` or ``portfolio``."""
    max_daily_loss: Decimal | None
    max_daily_loss_pct: Decimal | None
    max_contracts: int | None
    instruments: tuple[str, ...] | None
    accounts: tuple[str, ...] | None
    on_breach: str
    """``halt_entries`` or ``flatten_and_halt``."""
    risk: str
    source: Location


@dataclass(frozen=True)
class Risk:
    name: str
    margin_buffer_pct: Decimal | None
    limits: tuple[Limit, ...]
    source: Location


@dataclass(frozen=True)
class ScheduleRule:
    name: str
    action: str
    """``flatten`` or ``block_entries``."""
    at: str | None
    """``HH:MM`` Eastern wall clock."""
    between: tuple[str, str] | None
    """``[start, end)`` Eastern wall clock; wraps past midnight when end < start."""
    before_close_minutes: int | None
    days: tuple[str, ...]
    """Lower-case weekday abbreviations (``mon`` .. ``sun``)."""
    strategies: tuple[str, ...] | None
    accounts: tuple[str, ...] | None
    schedule: str
    source: Location


@dataclass(frozen=True)
class Schedule:
    name: str
    timezone: str
    rules: tuple[ScheduleRule, ...]
    source: Location


@dataclass(frozen=True)
class RuleSet:
    """One generation of validated rules: everything a decision may depend on besides state and the signal."""

    brokers: Mapping[str, Broker]
    accounts: Mapping[str, Account]
    routing: tuple[Routing, ...]
    """In load order (files sorted by path, documents in file order): the first matching rule wins."""
    risks: tuple[Risk, ...]
    schedules: tuple[Schedule, ...]
    catalog: Catalog
    content_hash: str
    """SHA-256 over the files' paths and bytes: identifies a generation in the reload history."""
    files: tuple[str, ...] = field(default=())

    @property
    def routing_rules(self) -> tuple[RoutingRule, ...]:
        return tuple(rule for doc in self.routing for rule in doc.rules)

    @property
    def limits(self) -> tuple[Limit, ...]:
        return tuple(limit for doc in self.risks for limit in doc.limits)

    @property
    def schedule_rules(self) -> tuple[ScheduleRule, ...]:
        return tuple(rule for doc in self.schedules for rule in doc.rules)

    @property
    def margin_buffer_pct(self) -> Decimal:
        """The Risk documents' margin buffer (30 when unset); the loader rejects conflicting values."""
        for doc in self.risks:
            if doc.margin_buffer_pct is not None:
                return doc.margin_buffer_pct
        return DEFAULT_MARGIN_BUFFER_PCT

    def strategy_secret_env(self, strategy: str) -> str | None:
        for doc in self.routing:
            if strategy in doc.strategy_secrets:
                return doc.strategy_secrets[strategy]
        return None
