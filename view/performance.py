"""Performance from fills and daily marks: round turns, trades, win rate, profit factor, drawdown, equity curve.

Pure functions over plain records so the report command, the dashboard and the tests compute the same numbers.
Every amount is ``Decimal``. Lots are matched first-in, first-out per (account, strategy, contract), which is how
futures statements compute realized P&L.

Definitions (what a trader reads on a statement):
- *round turn*: one contract opened and closed; ``round_turns`` counts closed contracts.
- *trade*: a position from flat back to flat in one (account, strategy, contract); win rate and profit factor are
  over trades, net of commissions (a scratch trade that loses its commissions is a loss).
- *gross* P&L excludes commissions, *net* includes them.
- *max drawdown*: the largest fall of the equity curve from a previous peak (the start counts as one), in USD.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Callable, Iterable, Mapping, Sequence

from engine.catalog import Catalog
from engine.sessions import trading_day

ZERO = Decimal(0)


@dataclass(frozen=True)
class FillRecord:
    account: str
    strategy: str
    broker: str
    contract: str
    side: str
    """``buy`` or ``sell``."""
    quantity: int
    price: Decimal
    commission: Decimal
    """Total commission charged for this fill (all contracts), USD."""
    time: datetime

    def __post_init__(self) -> None:
        if self.time.tzinfo is None:
            raise ValueError("FillRecord.time must be aware (UTC)")
        if self.side not in ("buy", "sell") or self.quantity <= 0:
            raise ValueError(f"bad fill: side={self.side!r} quantity={self.quantity}")

    @property
    def root(self) -> str:
        return self.contract[:-2]

    @property
    def signed_quantity(self) -> int:
        return self.quantity if self.side == "buy" else -self.quantity


@dataclass
class Trade:
    """One flat-to-flat trade in one (account, strategy, contract)."""

    account: str
    strategy: str
    broker: str
    contract: str
    opened: datetime
    closed: datetime | None = None
    round_turns: int = 0
    gross: Decimal = ZERO
    commission: Decimal = ZERO

    @property
    def net(self) -> Decimal:
        return self.gross - self.commission


@dataclass
class Book:
    """Replays fills FIFO; knows the open lots (for unrealized P&L) and every trade so far."""

    catalog: Catalog
    trades: list[Trade] = field(default_factory=list)
    lots: dict[tuple[str, str, str], deque[list]] = field(default_factory=lambda: defaultdict(deque))
    """(account, strategy, contract) -> deque of [signed qty, price] open lots."""
    open_trades: dict[tuple[str, str, str], Trade] = field(default_factory=dict)

    def apply(self, fill: FillRecord) -> Decimal:
        """Apply one fill; returns the gross P&L it realized."""
        key = (fill.account, fill.strategy, fill.contract)
        point = self.catalog[fill.root].point_value
        lots = self.lots[key]
        trade = self.open_trades.get(key)
        if trade is None:
            trade = Trade(fill.account, fill.strategy, fill.broker, fill.contract, opened=fill.time)
            self.open_trades[key] = trade
        trade.commission += fill.commission
        remaining = fill.signed_quantity
        realized = ZERO
        while remaining and lots and (lots[0][0] > 0) != (remaining > 0):
            lot = lots[0]
            closing = min(abs(remaining), abs(lot[0]))
            direction = 1 if lot[0] > 0 else -1  # a long lot gains when the exit price is higher
            realized += (fill.price - lot[1]) * closing * point * direction
            trade.round_turns += closing
            lot[0] -= closing * direction
            remaining += closing * direction
            if lot[0] == 0:
                lots.popleft()
        if remaining:
            lots.append([remaining, fill.price])
        trade.gross += realized
        if not lots:
            trade.closed = fill.time
            self.trades.append(trade)
            del self.open_trades[key]
        return realized

    def position(self, key: tuple[str, str, str]) -> int:
        return sum(lot[0] for lot in self.lots.get(key, ()))

    def unrealized(self, marks: Mapping[str, Decimal], select: Callable[[tuple[str, str, str]], bool] = lambda k: True) -> Decimal:
        total = ZERO
        for key, lots in self.lots.items():
            if not lots or not select(key):
                continue
            contract = key[2]
            mark = marks.get(contract)
            if mark is None:
                continue  # no mark: cannot value it; the caller shows the position without P&L
            point = self.catalog[contract[:-2]].point_value
            total += sum(((mark - price) * qty * point for qty, price in lots), ZERO)
        return total


@dataclass(frozen=True)
class Performance:
    gross: Decimal
    commissions: Decimal
    net: Decimal
    round_turns: int
    trades: int
    wins: int
    losses: int
    win_rate: Decimal | None
    """Winning trades / closed trades; None with no closed trade."""
    profit_factor: Decimal | None
    """Sum of winning trades' net / |sum of losing trades' net|; None when there is no losing trade."""
    max_drawdown: Decimal
    equity_curve: tuple[tuple[date, Decimal], ...]
    """Cumulative net P&L (realized + unrealized at the daily mark) at each day's mark."""

    def as_dict(self) -> dict:
        return {
            "gross": str(self.gross), "commissions": str(self.commissions), "net": str(self.net),
            "round_turns": self.round_turns, "trades": self.trades, "wins": self.wins, "losses": self.losses,
            "win_rate": None if self.win_rate is None else str(self.win_rate),
            "profit_factor": None if self.profit_factor is None else str(self.profit_factor),
            "max_drawdown": str(self.max_drawdown),
            "equity_curve": [[d.isoformat(), str(v)] for d, v in self.equity_curve],
        }


def max_drawdown(curve: Iterable[Decimal], start: Decimal = ZERO) -> Decimal:
    """Largest fall from a previous peak. The curve starts at ``start`` (no P&L at the beginning of the period), so a
    period that opens with a losing day has that loss as a drawdown."""
    peak = start
    worst = ZERO
    for value in curve:
        peak = max(peak, value)
        worst = max(worst, peak - value)
    return worst


GroupKey = Callable[[FillRecord], str]
BY = {
    "account": lambda f: f.account,
    "strategy": lambda f: f.strategy,
    "broker": lambda f: f.broker,
    "strategy_broker": lambda f: f"{f.strategy}@{f.broker}",
    "all": lambda f: "portfolio",
}


def performance(
    fills: Sequence[FillRecord],
    catalog: Catalog,
    *,
    marks: Mapping[date, Mapping[str, Decimal]] | None = None,
    mark_times: Mapping[date, datetime] | None = None,
    by: str = "account",
) -> dict[str, Performance]:
    """Performance per group (``account``, ``strategy``, ``broker``, ``strategy_broker`` or ``all``).

    ``marks`` maps each trading day to the mark price of every contract at that day's 17:00 ET mark;
    ``mark_times`` gives the instant of each mark (UTC) so fills after the mark count for the next day.
    The equity curve has one point per trading day with a mark or a fill; open positions are valued at the day's
    mark, or at the last traded price on a day not (yet) marked.
    """
    key_of = BY[by]
    groups: dict[str, list[FillRecord]] = defaultdict(list)
    for fill in sorted(fills, key=lambda f: f.time):
        groups[key_of(fill)].append(fill)
    out: dict[str, Performance] = {}
    for group, group_fills in sorted(groups.items()):
        out[group] = _group_performance(group_fills, catalog, marks or {}, mark_times or {})
    return out


def _group_performance(fills: Sequence[FillRecord], catalog: Catalog, marks: Mapping[date, Mapping[str, Decimal]],
                       mark_times: Mapping[date, datetime]) -> Performance:
    book = Book(catalog)
    curve: list[tuple[date, Decimal]] = []
    realized_net = ZERO
    pending = list(fills)
    # One point per CME trading day that has a mark or a fill (a day not marked yet, e.g. today, still counts).
    days = sorted(set(marks) | {trading_day(f.time) for f in fills})
    last_price: dict[str, Decimal] = {}
    i = 0
    for day in days:
        cutoff = mark_times.get(day) if day in marks else None
        while i < len(pending) and (pending[i].time <= cutoff if cutoff is not None
                                    else trading_day(pending[i].time) <= day):
            fill = pending[i]
            realized_net += book.apply(fill) - fill.commission
            last_price[fill.contract] = fill.price
            i += 1
        # Open positions at the day's 17:00 ET mark; on a day without one, at the last traded price (an estimate
        # until the mark exists, and exact for positions opened at that price).
        unrealized = book.unrealized({**last_price, **marks.get(day, {})})
        curve.append((day, realized_net + unrealized))
    while i < len(pending):  # fills after the last mark still count in the totals
        fill = pending[i]
        realized_net += book.apply(fill) - fill.commission
        i += 1
    closed = book.trades
    wins = [t for t in closed if t.net > 0]
    losses = [t for t in closed if t.net <= 0]
    gross = sum((t.gross for t in closed), ZERO) + sum((t.gross for t in book.open_trades.values()), ZERO)
    commissions = sum((f.commission for f in fills), ZERO)
    win_sum = sum((t.net for t in wins), ZERO)
    loss_sum = -sum((t.net for t in losses), ZERO)
    return Performance(
        gross=gross,
        commissions=commissions,
        net=gross - commissions,
        round_turns=sum(t.round_turns for t in closed) + sum(t.round_turns for t in book.open_trades.values()),
        trades=len(closed),
        wins=len(wins),
        losses=len(losses),
        win_rate=(Decimal(len(wins)) / Decimal(len(closed))).quantize(Decimal("0.0001")) if closed else None,
        profit_factor=(win_sum / loss_sum).quantize(Decimal("0.01")) if loss_sum > 0 else None,
        max_drawdown=max_drawdown(v for _, v in curve),
        equity_curve=tuple(curve),
    )


@dataclass(frozen=True)
class CostLine:
    root: str
    broker: str
    contracts: int
    commissions: Decimal
    dearest_broker: str
    dearest_commissions: Decimal

    @property
    def saved(self) -> Decimal:
        return self.dearest_commissions - self.commissions


def cost_report(fills: Sequence[FillRecord], commission_of: Callable[[str, str], Decimal | None],
                eligible_brokers: Callable[[FillRecord], Iterable[str]]) -> list[CostLine]:
    """Commissions per (root, broker), and what the same fills would have cost at the dearest eligible broker.

    ``commission_of(broker, root)`` is the per-side, per-contract rate; ``eligible_brokers(fill)`` lists the
    brokers that could have taken that fill (the brokers of the strategy's target accounts allowing the root).
    """
    totals: dict[tuple[str, str], list] = {}
    for fill in fills:
        key = (fill.root, fill.broker)
        line = totals.setdefault(key, [0, ZERO, "", ZERO])
        line[0] += fill.quantity
        line[1] += fill.commission
        rates = [(r, b) for b in eligible_brokers(fill) if (r := commission_of(b, fill.root)) is not None]
        if rates:
            rate, broker = max(rates, key=lambda rb: (rb[0], rb[1]))
            line[2] = broker if not line[2] else line[2]
            line[3] += rate * fill.quantity
        else:
            line[3] += fill.commission
    return [CostLine(root, broker, q, c, d or broker, dc) for (root, broker), (q, c, d, dc) in sorted(totals.items())]
