"""One view of every account: per account, per strategy, per broker and for the whole portfolio.

Pure: the service hands in what it knows (broker snapshots, the positions ledger, daily P&L) and the rules; this
module only adds up and compares. Margin is *never pooled across brokers*: an account's free margin exists only at
its own broker, so the portfolio shows margin per broker and never one combined "free margin" a trader could
mistake for buying power.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable, Mapping

from engine.model import Limit, RuleSet

ZERO = Decimal(0)
CENT = Decimal("0.01")


@dataclass(frozen=True)
class PositionView:
    account: str
    strategy: str
    contract: str
    quantity: int
    avg_price: Decimal
    mark: Decimal | None
    unrealized: Decimal | None


@dataclass(frozen=True)
class AccountInput:
    """What the service knows about one account right now."""

    name: str
    cash: Decimal
    margin_used: Decimal
    free_margin: Decimal
    realized: Decimal
    """Realized P&L of the current trading day, net of commissions."""
    commissions: Decimal
    """Commissions charged in the current trading day."""
    positions: tuple[PositionView, ...] = ()
    connected: bool = True
    halted: str | None = None


@dataclass(frozen=True)
class LimitStatus:
    limit: str
    limit_usd: Decimal
    daily_pnl: Decimal
    headroom: Decimal
    """How much more can be lost today before the limit breaches (<= 0 means breached)."""
    breached: bool


@dataclass(frozen=True)
class AccountView:
    name: str
    broker: str
    strategies: tuple[str, ...]
    capital: Decimal
    cash: Decimal
    margin_used: Decimal
    free_margin: Decimal
    buffer_required: Decimal
    """Margin cushion the Risk document asks for on the open positions (margin used x buffer %)."""
    buffer_left: Decimal
    """free margin - buffer required: what can still be lost or committed before the buffer is eaten."""
    unrealized: Decimal
    realized: Decimal
    commissions: Decimal
    daily_pnl: Decimal
    limits: tuple[LimitStatus, ...]
    positions: tuple[PositionView, ...]
    connected: bool
    halted: str | None


@dataclass(frozen=True)
class GroupView:
    name: str
    accounts: tuple[str, ...]
    daily_pnl: Decimal
    realized: Decimal
    unrealized: Decimal
    commissions: Decimal
    open_contracts: int
    margin_used_by_broker: Mapping[str, Decimal]
    free_margin_by_broker: Mapping[str, Decimal]


@dataclass(frozen=True)
class PortfolioView:
    accounts: tuple[AccountView, ...]
    by_strategy: tuple[GroupView, ...]
    by_broker: tuple[GroupView, ...]
    total: GroupView
    limits: tuple[LimitStatus, ...]
    breached: tuple[str, ...] = field(default=())


def _limit_usd(limit: Limit, capital: Decimal) -> Decimal | None:
    if limit.max_daily_loss is not None:
        return limit.max_daily_loss
    if limit.max_daily_loss_pct is not None:
        return (capital * limit.max_daily_loss_pct / 100).quantize(CENT)
    return None


def _status(limit: Limit, capital: Decimal, daily_pnl: Decimal) -> LimitStatus | None:
    usd = _limit_usd(limit, capital)
    if usd is None:
        return None
    # Breached when the loss *reaches* the limit: daily_pnl <= -limit.
    return LimitStatus(limit.name, usd, daily_pnl, daily_pnl + usd, daily_pnl <= -usd)


def account_view(rules: RuleSet, data: AccountInput) -> AccountView:
    account = rules.accounts[data.name]
    unrealized = sum((p.unrealized for p in data.positions if p.unrealized is not None), ZERO)
    daily = data.realized + unrealized
    buffer_required = (data.margin_used * rules.margin_buffer_pct / 100).quantize(CENT)
    statuses = []
    for limit in rules.limits:
        if limit.scope != "account" or (limit.accounts and data.name not in limit.accounts):
            continue
        status = _status(limit, account.capital, daily)
        if status is not None:
            statuses.append(status)
    return AccountView(
        name=data.name, broker=account.broker, strategies=account.strategies, capital=account.capital,
        cash=data.cash, margin_used=data.margin_used, free_margin=data.free_margin,
        buffer_required=buffer_required, buffer_left=data.free_margin - buffer_required,
        unrealized=unrealized, realized=data.realized, commissions=data.commissions, daily_pnl=daily,
        limits=tuple(statuses), positions=data.positions, connected=data.connected, halted=data.halted,
    )


def _group(name: str, views: Iterable[AccountView], positions: Iterable[PositionView] | None = None,
           realized_override: Decimal | None = None) -> GroupView:
    views = list(views)
    margin: dict[str, Decimal] = defaultdict(lambda: ZERO)
    free: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for v in views:
        margin[v.broker] += v.margin_used
        free[v.broker] += v.free_margin
    pos = list(positions) if positions is not None else [p for v in views for p in v.positions]
    unrealized = sum((p.unrealized for p in pos if p.unrealized is not None), ZERO)
    realized = realized_override if realized_override is not None else sum((v.realized for v in views), ZERO)
    return GroupView(
        name=name, accounts=tuple(v.name for v in views),
        daily_pnl=realized + unrealized, realized=realized, unrealized=unrealized,
        commissions=sum((v.commissions for v in views), ZERO),
        open_contracts=sum(abs(p.quantity) for p in pos),
        margin_used_by_broker=dict(sorted(margin.items())), free_margin_by_broker=dict(sorted(free.items())),
    )


def portfolio_view(rules: RuleSet, inputs: Iterable[AccountInput],
                   realized_by_strategy: Mapping[str, Decimal] | None = None) -> PortfolioView:
    """Aggregate accounts into strategy, broker and portfolio views and check the portfolio limits.

    Per-strategy realized P&L needs the ledger's split (an account may follow several strategies); pass it as
    ``realized_by_strategy``. Without it, an account's realized P&L is attributed to its first strategy.
    """
    views = [account_view(rules, data) for data in sorted(inputs, key=lambda d: d.name)]
    by_broker = [_group(b, [v for v in views if v.broker == b]) for b in sorted({v.broker for v in views})]
    strategies = sorted({p.strategy for v in views for p in v.positions} | {s for v in views for s in v.strategies})
    by_strategy = []
    for s in strategies:
        members = [v for v in views if s in v.strategies or any(p.strategy == s for p in v.positions)]
        positions = [p for v in members for p in v.positions if p.strategy == s]
        if realized_by_strategy is not None:
            realized = realized_by_strategy.get(s, ZERO)
        else:
            realized = sum((v.realized for v in members if v.strategies and v.strategies[0] == s), ZERO)
        by_strategy.append(_group(s, members, positions, realized))
    total = _group("portfolio", views)
    capital = sum((rules.accounts[v.name].capital for v in views), ZERO)
    limits = []
    for limit in rules.limits:
        if limit.scope == "portfolio":
            status = _status(limit, capital, total.daily_pnl)
            if status is not None:
                limits.append(status)
    breached = tuple(s.limit for s in limits if s.breached) + tuple(
        f"{v.name}:{s.limit}" for v in views for s in v.limits if s.breached)
    return PortfolioView(tuple(views), tuple(by_strategy), tuple(by_broker), total, tuple(limits), breached)


def to_jsonable(value: object) -> object:
    """Dataclass views as JSON-ready dicts (Decimals as strings, so no float ever touches money)."""
    from dataclasses import fields, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value
