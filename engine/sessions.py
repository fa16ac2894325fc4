"""CME trading days, session closes and business days, in the one place that knows about the exchange calendar.

Three different notions of "day" meet here, and mixing them up is how a flatten fires on the wrong afternoon:

- the **trading day** (Globex): it begins at 18:00 America/New_York on the previous calendar day, so Monday 18:00 ET
  already belongs to Tuesday. Daily loss limits reset when it begins. It is plain clock arithmetic (no calendar):
  the reset happens every evening at 18:00 ET whether or not a session opens, and a weekend has no fills to count.
- the **session** of a day: when the CME equity-index session labelled with that date opens and closes, holidays
  and early closes included (13:00 ET around Thanksgiving and Christmas Eve). This comes from pandas_market_calendars'
  ``CME_Equity`` calendar, never from a hand-written table.
- the **business day** used for contract expiries: pandas_market_calendars' ``CME_TradeDate`` calendar, the CME's own
  list of days that count for expiry arithmetic (MLK Day and Thanksgiving have a short Globex session but are not
  business days).

pandas is slow to import and slow per call, and the decision path asks these questions for every signal: the
calendars are read once per year into plain dicts and sets (under a lock, so concurrent first calls build them
once), and every later question is a dict lookup. ``preload`` lets the service pay that cost at start-up.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import Iterable
from zoneinfo import ZoneInfo

ET = ZoneInfo("America/New_York")
"""The zone every rule is written in and every trader thinks in."""

TRADING_DAY_START_ET = time(18, 0)
"""Globex opens the next trading day at 18:00 Eastern."""

SESSION_CALENDAR = "CME_Equity"
BUSINESS_DAY_CALENDAR = "CME_TradeDate"


def require_aware(at: datetime, what: str = "time") -> None:
    """Refuse naive datetimes: a wall-clock time without a zone means a different instant on every machine."""
    if not isinstance(at, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} {at.isoformat()} is naive; give it a UTC offset (e.g. {at.isoformat()}Z)")


def to_et(at: datetime) -> datetime:
    """``at`` on the Eastern wall clock (EST or EDT as it was on that date)."""
    require_aware(at)
    return at.astimezone(ET)


def et_datetime(day: date, wall: time) -> datetime:
    """The aware instant of Eastern wall-clock ``wall`` on ``day``.

    At a DST change a wall time can be missing (02:30 on the March Sunday) or occur twice (01:30 on the November
    Sunday). A missing time means the first instant the clock shows a later time (03:00 EDT, the moment of the
    change), so that "from 02:30" windows start when the clock passes 02:30; a repeated time means its first
    occurrence (EDT). Either way a rule fires exactly once on those days, never zero times or twice. (Globex is
    closed on Sunday mornings, so no trading decision ever hangs on this; it only has to be well defined.)
    """
    naive = datetime.combine(day, wall)
    first = naive.replace(tzinfo=ET)  # fold=0: the first occurrence of a repeated time
    if first.astimezone(timezone.utc).astimezone(ET).replace(tzinfo=None) == naive:
        return first
    # In the gap: walk forward from just before it (fold=1 reads the time with the later offset) to the change.
    instant = naive.replace(tzinfo=ET, fold=1).astimezone(timezone.utc)
    while instant.astimezone(ET).replace(tzinfo=None) < naive:
        instant += timedelta(minutes=1)
    return instant.astimezone(ET)


def trading_day(at: datetime) -> date:
    """The CME trading day ``at`` belongs to: from 18:00 ET the calendar date is already tomorrow's."""
    local = to_et(at)
    if local.time() >= TRADING_DAY_START_ET:
        return local.date() + timedelta(days=1)
    return local.date()


def trading_day_start(at: datetime) -> datetime:
    """When the trading day holding ``at`` began (UTC): 18:00 ET on the previous calendar day, always <= ``at``."""
    begun = et_datetime(trading_day(at) - timedelta(days=1), TRADING_DAY_START_ET)
    return begun.astimezone(timezone.utc)


@lru_cache(maxsize=64)
def trading_day_bounds(day: date) -> tuple[datetime, datetime]:
    """The UTC instants [start, end) of trading day ``day``: ``trading_day(at) == day`` iff start <= at < end.

    Why it exists: the decision path asks "was this P&L measured today?" for every account, and two comparisons of
    aware datetimes cost a fraction of a time-zone conversion. Exact because the Eastern wall clock only repeats or
    skips an hour at 01:00-03:00, never around 18:00, so wall times >= 18:00 are exactly the instants >= 18:00's.
    """
    return (et_datetime(day - timedelta(days=1), TRADING_DAY_START_ET).astimezone(timezone.utc),
            et_datetime(day, TRADING_DAY_START_ET).astimezone(timezone.utc))


@dataclass(frozen=True)
class Session:
    """One CME equity-index session, labelled by the date on which it closes; times are UTC."""

    day: date
    open: datetime
    close: datetime


_lock = threading.Lock()
_sessions: dict[int, dict[date, Session]] = {}
_holidays: frozenset[date] | None = None


def _calendar(name: str):  # type: ignore[no-untyped-def]
    import pandas_market_calendars as mcal  # heavy (pandas); only on the first question about a new year

    return mcal.get_calendar(name)


def _load_year(year: int) -> dict[date, Session]:
    frame = _calendar(SESSION_CALENDAR).schedule(f"{year}-01-01", f"{year}-12-31", tz="UTC")
    sessions: dict[date, Session] = {}
    for label, opened, closed in zip(frame.index, frame["market_open"], frame["market_close"]):
        day = label.date()
        sessions[day] = Session(day, opened.to_pydatetime().astimezone(timezone.utc),
                                closed.to_pydatetime().astimezone(timezone.utc))
    return sessions


def _year(year: int) -> dict[date, Session]:
    found = _sessions.get(year)
    if found is None:
        with _lock:
            found = _sessions.get(year)
            if found is None:
                found = _load_year(year)
                _sessions[year] = found
    return found


def session(day: date) -> Session | None:
    """The session that closes on ``day`` (None on weekends and full holidays such as Christmas)."""
    return _year(day.year).get(day)


def session_close(day: date) -> datetime | None:
    """When the CME equity session of ``day`` closes (UTC), early closes included; None when there is none."""
    found = _year(day.year).get(day)
    return None if found is None else found.close


def session_open(day: date) -> datetime | None:
    """When the session that closes on ``day`` opened (UTC; normally 18:00 ET the evening before)."""
    found = _year(day.year).get(day)
    return None if found is None else found.open


def cme_holidays() -> frozenset[date]:
    """Dates that are not CME business days although they are weekdays (CME_TradeDate, 1963-2200)."""
    global _holidays
    if _holidays is None:
        with _lock:
            if _holidays is None:
                listed = _calendar(BUSINESS_DAY_CALENDAR).holidays().holidays
                _holidays = frozenset(datetime.fromisoformat(str(d)[:10]).date() for d in listed)
    return _holidays


def is_business_day(day: date) -> bool:
    """A weekday that is not a CME holiday: the days that count in expiry rules."""
    return day.weekday() < 5 and day not in cme_holidays()


def preload(years: Iterable[int]) -> None:
    """Read the calendars for ``years`` now, so that no signal pays for pandas later."""
    cme_holidays()
    for year in years:
        _year(year)
