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

**The day book survives a restart.** The runtime journals the marks each day book was opened at (a ``day_start``
risk event) and, at start, rebuilds the book as it would be had the process never stopped: the positions held
before the day began, valued at those marks (``open_day``), then every fill of the day (``apply_fill``). A fill of
an earlier day that is reported after the day began (a late report) changes the day-start position at the day-start
mark, without P&L, exactly as it would have had it been in the ledger at 18:00.

**A hard limit flattens even when a softer one halted first.** ``halt_entries`` only stops entries, so it must not
stand in the way of a ``flatten_and_halt`` limit on the same scope reaching its own (larger) loss: a limit that
breaches flattens unless *it* already flattened that scope (its halt key) on this trading day, whatever halt holds
the key (a softer limit's, the portfolio's, reconciliation's). Its halt then replaces the one held under the key,
so the halt names the harder limit, and keeps the longer life of the two (a reconciliation halt lasts until cleared).
A ``halt_entries`` breach on a key already halted does nothing new.

A ``flatten_and_halt`` limit flattens at most once per limit and scope per trading day, with one exception below:
``fired`` remembers it for the rest of the day (restored after a restart from the journaled halt events, source
``risk:<limit>``). An operator who clears its halt while the day's P&L is still past the limit sees the halt come
back at the next check (as for every loss limit: the breach is a fact of the day, and the engine refuses entries past
a limit anyway) but no second flatten: clearing never makes it flatten again. The exception is the trader who clears
a halt and loses again: they expect the hard limit to protect them a second time, so a fired limit re-arms
(``rearm``, journaled) once its halt is gone *and* the day's P&L is back above the limit (the only way anyone trades
again after a clear), and the next crossing flattens again (a flatten of its own id). Without a clear it never
re-arms, so a P&L hovering around the limit while the halt holds (other roots moving, for a limit restricted to
roots; a flatten that could not reach a broker) never flattens twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Callable, Iterable, Iterator, Mapping

from engine.model import Account, Limit
from engine.sessions import trading_day
from service.ledger import Ledger

PORTFOLIO = "portfolio"
"""The halt key of a portfolio-wide halt (it blocks every account's entries)."""
FLATTEN_AND_HALT = "flatten_and_halt"


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
    flatten: bool = False
    """Close the positions in scope: a ``flatten_and_halt`` limit that has not flattened this scope yet today
    (False for ``halt_entries``, and for a hard limit that already flattened and only halts again)."""

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
        again = "" if self.flatten or self.limit.on_breach != FLATTEN_AND_HALT else "; flattened earlier today"
        return (f"{self.limit.name}{where}: daily P&L {self.daily_pnl:.2f} USD reached the loss limit of "
                f"-{self.threshold:.2f} USD ({self.limit.on_breach}{again})")


def _hardness(breach: Breach) -> tuple[bool, bool, Decimal]:
    return breach.flatten, breach.limit.on_breach == FLATTEN_AND_HALT, breach.threshold


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
        self.day_marks: dict[str, Decimal] = {}
        """Contract -> the price the positions carried into the day were valued at (what the runtime journals)."""
        self.halts: dict[str, Halt] = {}
        self.fired: set[tuple[str, str]] = set()
        """(limit name, halt key) of the ``flatten_and_halt`` limits that flattened that scope today, not re-armed."""
        self.fire_count: dict[tuple[str, str], int] = {}
        """How often each (limit name, halt key) flattened today (a re-armed limit's flatten needs its own id)."""
        self._pnl: dict[str, Decimal] = {}
        self._in_day: datetime | None = None
        """The earliest time seen that lies in ``day`` (``_earlier_day``); reset when the day changes."""

    # -- the day ---------------------------------------------------------------------------------------------
    def roll(self, now: datetime, ledger: Ledger) -> bool:
        """Start a new day book when ``now`` is in a new trading day, its carried positions at the current marks
        (a restart opens the day with ``open_day`` and the journaled marks instead); day-bound halts lift. True
        when rolled."""
        today = trading_day(now)
        if today == self.day:
            return False
        self.open_day(today, ledger)
        return True

    def open_day(self, day: date, ledger: Ledger, day_marks: Mapping[str, Decimal] | None = None) -> None:
        """The day book of ``day``: ``ledger``'s positions (those held when the day began) at ``day_marks``, or
        the current mark for a contract it lacks (its average price when there is no mark at all)."""
        contracts = {key[2] for key, book in ledger.books.items() if book.quantity}
        given = dict(day_marks or {})
        marks: dict[str, Decimal] = {}
        for contract in sorted(contracts):
            mark = given.get(contract)
            if mark is None:
                mark = self.marks(contract)
            if mark is not None:
                marks[contract] = mark
        self.book = ledger.rebased(marks)
        self.day_marks = marks
        if day != self.day:
            self.fired = set()
            self.fire_count = {}
        self.day = day
        self._in_day = None
        self.halts = {k: h for k, h in self.halts.items() if h.day is None or h.day >= day}
        self._pnl.clear()

    def apply_fill(self, *, fill_id: str, account: str, strategy: str, contract: str, signed_qty: int,
                   price: Decimal, commission: Decimal, at: datetime, manual: bool = False) -> None:
        """Book a fill of the current trading day.

        A fill of an earlier day belongs to the day-start positions: one reported only after the day began (a
        late report) moves that position at the day-start mark (its own price if the contract was not held), with
        neither P&L nor commission today, which is what it would be had it been booked before the day began."""
        if self.day is not None and (self._in_day is None or at < self._in_day) and self._earlier_day(at):
            if fill_id in self.book.seen_fills:
                return
            mark = self.day_marks.get(contract)
            if mark is None:
                mark = self.day_marks[contract] = price
            self.book.apply(fill_id=fill_id, account=account, strategy=strategy, contract=contract,
                            signed_qty=signed_qty, price=mark, commission=Decimal(0), point_value=Decimal(0),
                            manual=manual)
            self._pnl.pop(account, None)
            return
        self.book.apply(fill_id=fill_id, account=account, strategy=strategy, contract=contract,
                        signed_qty=signed_qty, price=price, commission=commission,
                        point_value=self.point_value(contract), manual=manual)
        self._pnl.pop(account, None)

    def _earlier_day(self, at: datetime) -> bool:
        """Is ``at`` in a trading day before the current one? Remembers the earliest time seen in the current day:
        any later time cannot be earlier (saves the time zone conversion of ``trading_day`` for most fills)."""
        day = trading_day(at)
        if day == self.day and (self._in_day is None or at < self._in_day):
            self._in_day = at
        return self.day is not None and day < self.day

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
    def _measured(self, limits: Iterable[Limit], accounts: Mapping[str, Account]
                  ) -> Iterator[tuple[Limit, str, Decimal, Decimal, tuple[str, ...]]]:
        """(limit, scope name, daily P&L, loss threshold, accounts affected) for every loss limit and scope."""
        for limit in limits:
            if limit.max_daily_loss is None and limit.max_daily_loss_pct is None:
                continue
            scoped = [a for a in accounts if limit.accounts is None or a in limit.accounts]
            if limit.scope == PORTFOLIO:
                threshold = loss_threshold(limit, sum((accounts[a].capital for a in scoped), Decimal(0)))
                if threshold is not None:
                    yield limit, PORTFOLIO, self.portfolio_pnl(scoped), threshold, tuple(sorted(accounts))
                continue
            for name in scoped:
                threshold = loss_threshold(limit, accounts[name].capital)
                if threshold is not None:
                    yield limit, name, self.daily_pnl(name), threshold, (name,)

    def breaches(self, limits: Iterable[Limit], accounts: Mapping[str, Account]) -> list[Breach]:
        """Loss limits breached now that have something left to do; halt-only breaches before flattening ones.

        A ``flatten_and_halt`` limit that has not flattened its scope today breaches whatever halt holds its key
        (``flatten``); once it has, and any ``halt_entries`` limit, breaches only when its key is not halted.
        "Its key" is the halt key: an account-wide halt does not suppress the breach of a limit restricted to
        roots, nor does one root set suppress another. Breaches of one check that share a key are reduced to the
        hardest (``_hardness``), so the halt left behind names the harder limit."""
        found: list[Breach] = []
        for limit, scope, pnl, threshold, affected in self._measured(limits, accounts):
            if pnl > -threshold:
                continue
            key = halt_key(scope, limit.instruments)
            if limit.on_breach == FLATTEN_AND_HALT and (limit.name, key) not in self.fired:
                found.append(Breach(limit, scope, pnl, threshold, affected, flatten=True))
            elif key not in self.halts:
                found.append(Breach(limit, scope, pnl, threshold, affected))
        # One breach per key: its halt replaces any other's, so the one kept is the hardest (a flattening one, else
        # a flatten_and_halt limit halting again, else the largest loss), whatever order the rules list them in.
        best: dict[str, Breach] = {}
        for breach in found:
            held = best.get(breach.key)
            if held is None or _hardness(breach) > _hardness(held):
                best[breach.key] = breach
        kept = list(best.values())
        return [b for b in kept if not b.flatten] + [b for b in kept if b.flatten]

    def rearm(self, limits: Iterable[Limit], accounts: Mapping[str, Account]) -> list[tuple[str, str]]:
        """Re-arm the fired ``flatten_and_halt`` limits whose halt was cleared and whose P&L is back above the
        limit (see the module docstring); returns the (limit name, halt key) re-armed, for the journal."""
        if not self.fired:
            return []
        found = []
        for limit, scope, pnl, threshold, _ in self._measured(limits, accounts):
            key = halt_key(scope, limit.instruments)
            if (limit.name, key) in self.fired and key not in self.halts and pnl > -threshold:
                self.fired.discard((limit.name, key))
                found.append((limit.name, key))
        return found

    def act(self, breach: Breach, now: datetime) -> Halt:
        """Halt for ``breach``, replacing the halt under its key but keeping the longer life of the two (a
        reconciliation halt lasts until cleared). A flattening breach is marked fired (``mark_fired``) by the
        caller once its flatten is journaled: a crash in between must leave it to fire again, not forgotten."""
        held = self.halts.get(breach.key)
        return self.halt(breach.scope_name, breach.reason, f"risk:{breach.limit.name}", now,
                         until_day_end=held is None or held.day is not None, instruments=breach.instruments)

    def fire_number(self, breach: Breach) -> int:
        """Which flatten of its limit and key today ``breach`` would be (1 the first time; more after a re-arm)."""
        return self.fire_count.get((breach.limit.name, breach.key), 0) + 1

    def mark_fired(self, limit: str, key: str) -> None:
        """Remember that ``limit`` flattened ``key`` today (``fired``, ``fire_count``)."""
        self.fired.add((limit, key))
        self.fire_count[(limit, key)] = self.fire_count.get((limit, key), 0) + 1

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
