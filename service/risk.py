"""Daily P&L per account and for the portfolio, and the halts a loss limit breach triggers.

The day is the CME trading day (it begins 18:00 America/New_York, ``engine.sessions``): at its start the monitor
rebases its day book on the positions held and the marks of that moment, so a position carried overnight counts
only what it made or lost since 18:00 ET. Marks come from the one shared price feed, the same prices paper brokers
fill at. P&L is realized + unrealized - commissions, in Decimal.

A breach (``daily_pnl <= -limit``; the limit in USD, or a percentage of the account's capital, or of all accounts'
capital for the portfolio) produces a ``Breach``; the runtime journals it, halts entries, and for
``flatten_and_halt`` flattens. A halt lasts until the next trading day or an explicit ``clear``. Pure apart from
the mark source: no I/O, no clock (the caller passes ``now``).

A limit restricted to ``instrument: [ES, MES]`` measures the same P&L (the account's whole daily P&L, or the
portfolio's), because that is what the engine (``engine.decide``) compares it with: the two must agree on when it
trips. Its breach halts entries only in those roots, and ``flatten_and_halt`` closes only positions in those roots:
flattening a CL position because an ES-only limit tripped would be a wrong trade on real money. Such a halt is kept
under its own key, ``<account>:<ROOT>,<ROOT>`` (roots sorted, e.g. ``apex-1:ES,MES``; ``portfolio:ES,MES`` for a
portfolio limit), next to the account-wide halt keyed by the bare name, so both can hold at once and each is
cleared on its own.
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


def halt_key(name: str, instruments: Iterable[str] | None = None) -> str:
    """``apex-1`` for an account-wide halt, ``apex-1:ES,MES`` for one restricted to roots (sorted, so the same
    roots always give the same key, whatever order the limit lists them in). Account names cannot contain ``:``
    (schemas/account.schema.json), so the key reads back unambiguously."""
    roots = normalize_roots(instruments)
    return name if roots is None else f"{name}:{','.join(roots)}"


def normalize_roots(instruments: Iterable[str] | None) -> tuple[str, ...] | None:
    """Sorted distinct roots, or None for "every root" (None or empty)."""
    if instruments is None:
        return None
    roots = tuple(sorted({r.strip() for r in instruments if r and r.strip()}))
    return roots or None


def parse_halt_key(key: str) -> tuple[str, tuple[str, ...] | None]:
    """The scope name and roots of a halt key (roots normalized: ``apex-1:MES, ES`` reads as ``apex-1:ES,MES``)."""
    name, sep, roots = key.partition(":")
    return (key, None) if not sep else (name, normalize_roots(roots.split(",")))


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
    instruments: tuple[str, ...] | None = None
    """Roots whose entries it halts (sorted), or None: every root."""

    @property
    def key(self) -> str:
        """Where ``RiskMonitor.halts`` keeps it and what ``clear`` takes (see ``halt_key``)."""
        return halt_key(self.name, self.instruments)

    def as_dict(self) -> dict[str, object]:
        # "name" is the key an operator clears it by (the dashboard posts it back); "scope" the account/portfolio.
        return {"name": self.key, "scope": self.name,
                "instruments": None if self.instruments is None else list(self.instruments),
                "reason": self.reason, "source": self.source,
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
    """Accounts whose entries stop (and that are flattened for ``flatten_and_halt``), in ``instruments`` only
    when the limit names roots."""

    @property
    def instruments(self) -> tuple[str, ...] | None:
        """The limit's roots (sorted), or None when it covers every root."""
        return normalize_roots(self.limit.instruments)

    @property
    def key(self) -> str:
        """The key of the halt it triggers (``apex-1``, ``apex-1:ES,MES``, ``portfolio``, ``portfolio:ES``)."""
        return halt_key(self.scope_name, self.limit.instruments)

    @property
    def reason(self) -> str:
        roots = self.instruments
        where = "" if roots is None else f" [{', '.join(roots)} entries only]"
        return (f"{self.limit.name}{where}: daily P&L {self.daily_pnl:.2f} USD reached the loss limit of "
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
        """Loss limits breached now that have not halted their scope yet.

        "Their scope" is the halt key: an account-wide halt does not suppress the breach of a limit restricted to
        roots (its ``flatten_and_halt`` must still flatten those roots), nor does one root set suppress another."""
        found: list[Breach] = []
        for limit in limits:
            if limit.max_daily_loss is None and limit.max_daily_loss_pct is None:
                continue
            scoped = [a for a in accounts if limit.accounts is None or a in limit.accounts]
            if limit.scope == PORTFOLIO:
                if halt_key(PORTFOLIO, limit.instruments) in self.halts:
                    continue
                threshold = loss_threshold(limit, sum((accounts[a].capital for a in scoped), Decimal(0)))
                pnl = self.portfolio_pnl(scoped)
                if threshold is not None and pnl <= -threshold:
                    found.append(Breach(limit, PORTFOLIO, pnl, threshold, tuple(sorted(accounts))))
                continue
            for name in scoped:
                if halt_key(name, limit.instruments) in self.halts:
                    continue
                threshold = loss_threshold(limit, accounts[name].capital)
                pnl = self.daily_pnl(name)
                if threshold is not None and pnl <= -threshold:
                    found.append(Breach(limit, name, pnl, threshold, (name,)))
        return found

    def halt(self, name: str, reason: str, source: str, now: datetime, *, until_day_end: bool = True,
             instruments: Iterable[str] | None = None) -> Halt:
        """Halt ``name``'s entries (in ``instruments`` only, when given); replaces a halt with the same key."""
        halt = Halt(name, reason, source, trading_day(now) if until_day_end else None, now,
                    normalize_roots(instruments))
        self.halts[halt.key] = halt
        return halt

    def clear(self, key: str) -> Halt | None:
        """Lift the halt kept under ``key`` (roots in any order: ``apex-1:MES,ES`` is ``apex-1:ES,MES``)."""
        found = self.halts.pop(key, None)
        if found is None:
            found = self.halts.pop(halt_key(*parse_halt_key(key)), None)
        return found

    def halted(self, account: str, root: str | None = None) -> str | None:
        """Why ``account``'s entries (in ``root``, when given) are halted, or None.

        Account-wide halts first (its own, then the portfolio's), then, for ``root``, halts restricted to roots
        that include it (its own, then the portfolio's)."""
        for key in (account, PORTFOLIO):
            found = self.halts.get(key)
            if found is not None:
                return found.reason
        if root is not None:
            return self.halted_instruments(account).get(root)
        return None

    def halted_instruments(self, account: str) -> dict[str, str]:
        """Root -> why ``account``'s entries in that root are halted, from the halts restricted to roots (its own
        before the portfolio's). Account-wide halts are not in it: ``halted(account)`` reports those."""
        found: dict[str, str] = {}
        for scope in (account, PORTFOLIO):
            for halt in self.halts.values():
                if halt.name == scope and halt.instruments is not None:
                    for root in halt.instruments:
                        found.setdefault(root, halt.reason)
        return found
