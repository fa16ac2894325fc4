"""Daily P&L per account and for the portfolio, and the halts a loss limit breach triggers.

The day is the CME trading day (it begins 18:00 America/New_York, ``engine.sessions``): at its start the monitor
rebases its day book on the positions held and the marks of that moment, so a position carried overnight counts
only what it made or lost since 18:00 ET. Marks come from the one shared price feed, the same prices paper brokers
fill at. P&L is realized + unrealized - commissions, in Decimal.

A breach (``daily_pnl <= -limit``; the limit in USD, or a percentage of the account's capital, or of all accounts'
capital for the portfolio) produces a ``Breach``; the runtime journals it, halts entries, and for
``flatten_and_halt`` flattens. A halt lasts until the next trading day or an explicit ``clear``. Pure apart from
the mark source: no I/O, no clock (the caller passes ``now``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Callable, Iterable, Mapping

from engine.model import Account, Limit
from engine.sessions import trading_day
from service.ledger import Ledger

PORTFOLIO = "portfolio"
"""The halt key of a portfolio-wide halt (it blocks every account's entries)."""


@dataclass(frozen=True)
class Halt:
    name: str
    """Account name, or ``portfolio``."""
    reason: str
    source: str
    """``risk:<limit>``, ``reconciliation`` or ``operator``."""
    day: date | None
    """Trading day it lifts after (None: until cleared)."""
    since: datetime

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "reason": self.reason, "source": self.source,
                "day": None if self.day is None else self.day.isoformat(),
                "since": self.since.isoformat().replace("+00:00", "Z")}


@dataclass(frozen=True)
class Breach:
    limit: Limit
    scope_name: str
    """Account name, or ``portfolio``."""
    daily_pnl: Decimal
    threshold: Decimal
    accounts: tuple[str, ...]
    """Accounts whose entries stop (and that are flattened for ``flatten_and_halt``)."""

    @property
    def reason(self) -> str:
        return (f"{self.limit.name}: daily P&L {self.daily_pnl:.2f} USD reached the loss limit of "
                f"-{self.threshold:.2f} USD ({self.limit.on_breach})")


def loss_threshold(limit: Limit, capital: Decimal) -> Decimal | None:
    """The USD loss that breaches ``limit`` for ``capital`` (the tighter of USD and percentage when both are set)."""
    found = []
    if limit.max_daily_loss is not None:
        found.append(Decimal(limit.max_daily_loss))
    if limit.max_daily_loss_pct is not None:
        found.append(capital * Decimal(limit.max_daily_loss_pct) / 100)
    return min(found) if found else None


class RiskMonitor:
    """Day book, daily P&L and halts. Call ``roll(now, ledger)`` before reading; ``apply_fill`` for each new fill."""

    def __init__(self, marks: Callable[[str], Decimal | None], point_value: Callable[[str], Decimal]) -> None:
        self.marks = marks
        self.point_value = point_value
        self.day: date | None = None
        self.book = Ledger()
        self.halts: dict[str, Halt] = {}
        self._pnl: dict[str, Decimal] = {}

    # -- the day ---------------------------------------------------------------------------------------------
    def roll(self, now: datetime, ledger: Ledger) -> bool:
        """Start a new day book when ``now`` is in a new trading day; day-bound halts lift. True when rolled."""
        today = trading_day(now)
        if today == self.day:
            return False
        contracts = {key[2] for key, book in ledger.books.items() if book.quantity}
        self.book = ledger.rebased({c: m for c in contracts if (m := self.marks(c)) is not None})
        self.day = today
        self.halts = {k: h for k, h in self.halts.items() if h.day is None or h.day >= today}
        self._pnl.clear()
        return True

    def apply_fill(self, *, fill_id: str, account: str, strategy: str, contract: str, signed_qty: int,
                   price: Decimal, commission: Decimal, at: datetime) -> None:
        """Book a fill of the current trading day (an older one is already in the day-start positions)."""
        if self.day is not None and trading_day(at) < self.day:
            return
        self.book.apply(fill_id=fill_id, account=account, strategy=strategy, contract=contract,
                        signed_qty=signed_qty, price=price, commission=commission,
                        point_value=self.point_value(contract))
        self._pnl.pop(account, None)

    def adjust(self, account: str, contract: str, to_quantity: int) -> None:
        """Follow an adopted broker position (reconciliation), measured from the current mark."""
        mark = self.marks(contract)
        if mark is not None:
            self.book.adjust(account=account, contract=contract, to_quantity=to_quantity, price=mark)
            self._pnl.pop(account, None)

    # -- P&L -------------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-mark every account (the marks moved)."""
        self._pnl.clear()

    def daily_pnl(self, account: str) -> Decimal:
        found = self._pnl.get(account)
        if found is None:
            marks: dict[str, Decimal] = {}
            values: dict[str, Decimal] = {}
            for (a, _, contract), _book in self.book.books.items():
                if a == account and contract not in marks:
                    mark = self.marks(contract)
                    if mark is not None:
                        marks[contract] = mark
                    values[contract] = self.point_value(contract)
            found = self._pnl[account] = self.book.net_pnl(account, marks, values)
        return found

    def portfolio_pnl(self, accounts: Iterable[str]) -> Decimal:
        return sum((self.daily_pnl(a) for a in accounts), Decimal(0))

    # -- limits ----------------------------------------------------------------------------------------------
    def breaches(self, limits: Iterable[Limit], accounts: Mapping[str, Account]) -> list[Breach]:
        """Loss limits breached now that have not halted their scope yet."""
        found: list[Breach] = []
        for limit in limits:
            if limit.max_daily_loss is None and limit.max_daily_loss_pct is None:
                continue
            scoped = [a for a in accounts if limit.accounts is None or a in limit.accounts]
            if limit.scope == PORTFOLIO:
                if PORTFOLIO in self.halts:
                    continue
                threshold = loss_threshold(limit, sum((accounts[a].capital for a in scoped), Decimal(0)))
                pnl = self.portfolio_pnl(scoped)
                if threshold is not None and pnl <= -threshold:
                    found.append(Breach(limit, PORTFOLIO, pnl, threshold, tuple(sorted(accounts))))
                continue
            for name in scoped:
                if name in self.halts:
                    continue
                threshold = loss_threshold(limit, accounts[name].capital)
                pnl = self.daily_pnl(name)
                if threshold is not None and pnl <= -threshold:
                    found.append(Breach(limit, name, pnl, threshold, (name,)))
        return found

    def halt(self, name: str, reason: str, source: str, now: datetime, *, until_day_end: bool = True) -> Halt:
        halt = Halt(name, reason, source, trading_day(now) if until_day_end else None, now)
        self.halts[name] = halt
        return halt

    def clear(self, name: str) -> Halt | None:
        return self.halts.pop(name, None)

    def halted(self, account: str) -> str | None:
        """Why ``account``'s entries are halted (its own halt first, then the portfolio's), or None."""
        own = self.halts.get(account)
        if own is not None:
            return own.reason
        portfolio = self.halts.get(PORTFOLIO)
        return None if portfolio is None else portfolio.reason
