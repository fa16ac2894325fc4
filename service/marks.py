"""The daily mark: every account valued at the same instant, 17:00 ET, the end of the CME trading day.

Statements, equity curves and the performance report need one figure per account per day, and figures taken at
different instants at different brokers would not add up. So the service takes its own mark at 17:00 ET (DST-correct
through ``zoneinfo``) on every day that has a CME session, from its own ledger and the one shared price feed, and
journals it (``daily_marks``, one row per account and trading day).

A mark is never rewritten: re-running the job (a restart at 17:05) keeps the first. A service that was down at
17:00 takes the missed mark when it comes back before the next session opens at 18:00 ET, flagged ``late``; later
than that the prices have moved on, and a mark taken then would be a wrong statement, so none is written.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Awaitable, Callable, Mapping

from engine.model import RuleSet
from engine.sessions import et_datetime, session, to_et

log = logging.getLogger(__name__)

MARK_TIME = time(17, 0)
NEXT_OPEN = time(18, 0)
CENT = Decimal("0.01")


def mark_instant(day: date) -> datetime:
    """17:00 ET of ``day`` as aware UTC."""
    return et_datetime(day, MARK_TIME)


def next_mark(after: datetime) -> datetime:
    """The first 17:00 ET strictly after ``after`` on a day with a CME session (skips weekends and holidays)."""
    day = to_et(after).date()
    for _ in range(15):
        at = mark_instant(day)
        if at > after and session(day) is not None:
            return at
        day += timedelta(days=1)
    raise RuntimeError(f"no CME session in the two weeks after {after.isoformat()}")


def owed_mark(now: datetime) -> date | None:
    """The trading day whose mark is still due at ``now``: between its 17:00 and the 18:00 ET reopen, else None."""
    local = to_et(now)
    day = local.date()
    if session(day) is None:
        return None
    if mark_instant(day) <= now < et_datetime(day, NEXT_OPEN):
        return day
    return None


def mark_rows(rules: RuleSet, ledger: Any, *, marks: Callable[[str], Decimal | None],
              point_value: Callable[[str], Decimal], snapshots: Mapping[str, Any]) -> tuple[list[dict[str, Any]],
                                                                                          dict[str, Decimal]]:
    """One row per account: equity (capital + realized - commissions + open P&L), its parts, broker cash and margin.

    Returns the rows and the contract prices used, which are journaled with them (the report re-prices open
    positions at exactly these marks).
    """
    prices: dict[str, Decimal] = {}
    rows = []
    for name, account in sorted(rules.accounts.items()):
        realized = commissions = unrealized = Decimal(0)
        for (a, _strategy, contract), book in ledger.books.items():
            if a != name:
                continue
            realized += book.realized
            commissions += book.commissions
            if book.quantity:
                mark = marks(contract)
                if mark is not None:
                    prices[contract] = mark
                    unrealized += book.unrealized(mark, point_value(contract))
        snap = snapshots.get(name)
        rows.append({
            "account": name, "broker": account.broker,
            "equity": (account.capital + realized - commissions + unrealized).quantize(CENT),
            "realized": realized.quantize(CENT), "unrealized": unrealized.quantize(CENT),
            "commissions": commissions.quantize(CENT),
            "cash": None if snap is None else snap.cash_balance,
            "margin_used": None if snap is None else snap.margin_used,
        })
    return rows, prices


class DailyMarker:
    """Takes the 17:00 ET mark every trading day while the service runs (and a missed one at start, if owed)."""

    def __init__(self, take: Callable[[], tuple[list[dict[str, Any]], dict[str, Decimal]]],
                 record: Callable[[date, datetime, list[dict[str, Any]], dict[str, Decimal]], Awaitable[int]], *,
                 clock: Callable[[], datetime] | None = None, max_sleep_s: float = 60.0) -> None:
        self.take = take
        self.record = record
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.max_sleep_s = max_sleep_s
        self._task: asyncio.Task[None] | None = None
        self.marked: list[date] = []

    async def mark(self, day: date, *, late: bool = False) -> int:
        """Take and journal the mark of ``day`` now; returns the number of accounts newly marked."""
        now = self.clock()
        rows, prices = self.take()
        if late:
            rows = [{**row, "late": True} for row in rows]
        written = await self.record(day, now, rows, prices)
        self.marked.append(day)
        log.info("daily mark of %s taken at %s%s: %d accounts", day.isoformat(), now.isoformat(),
                 " (late)" if late else "", written)
        return written

    async def start(self) -> None:
        owed = owed_mark(self.clock())
        if owed is not None:
            await self.mark(owed, late=True)
        self._task = asyncio.create_task(self._loop(), name="daily-marks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        due = next_mark(self.clock())
        while True:
            # Sleep in short steps against the wall clock: a laptop that suspends or a clock that is stepped
            # must not make us sleep past 17:00.
            remaining = (due - self.clock()).total_seconds()
            if remaining > 0:
                await asyncio.sleep(min(remaining, self.max_sleep_s))
                continue
            day = to_et(due).date()
            try:
                if self.clock() < et_datetime(day, NEXT_OPEN):
                    await self.mark(day, late=(self.clock() - due) > timedelta(minutes=1))
                else:
                    log.warning("daily mark of %s missed (woke after the 18:00 ET reopen)", day.isoformat())
            except Exception:  # noqa: BLE001 - the next day's mark must still be taken
                log.exception("daily mark of %s failed", to_et(due).date().isoformat())
            due = next_mark(due)


__all__ = ["DailyMarker", "mark_instant", "mark_rows", "next_mark", "owed_mark"]
