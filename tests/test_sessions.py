"""Trading days start at 18:00 ET; session closes come from the CME calendar, early closes and holidays included."""

from __future__ import annotations

import threading
from datetime import date, datetime, time, timezone

import pytest

from engine import sessions
from engine.sessions import (
    et_datetime,
    is_business_day,
    session,
    session_close,
    session_open,
    trading_day,
    trading_day_start,
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("at", "day"),
    [
        # EST (UTC-5): Tuesday 2026-01-13 17:59:59 is still Tuesday's trading day, 18:00:00 is Wednesday's.
        ("2026-01-13T22:59:59Z", date(2026, 1, 13)),
        ("2026-01-13T23:00:00Z", date(2026, 1, 14)),
        # EDT (UTC-4): same wall times, an hour earlier in UTC.
        ("2026-07-14T21:59:59Z", date(2026, 7, 14)),
        ("2026-07-14T22:00:00Z", date(2026, 7, 15)),
        # Early morning ET is already the next UTC date but the same trading day as the previous evening.
        ("2026-07-15T03:30:00Z", date(2026, 7, 15)),
        # Sunday evening belongs to Monday, across both DST changes.
        ("2026-03-08T22:00:00Z", date(2026, 3, 9)),
        ("2026-03-08T21:59:59Z", date(2026, 3, 8)),
        ("2026-11-01T23:00:00Z", date(2026, 11, 2)),
        ("2026-11-01T22:59:59Z", date(2026, 11, 1)),
    ],
)
def test_trading_day_starts_at_18_et(at: str, day: date) -> None:
    assert trading_day(utc(at)) == day


@pytest.mark.parametrize(
    ("at", "start"),
    [
        ("2026-01-14T15:00:00Z", "2026-01-13T23:00:00Z"),  # EST
        ("2026-07-15T15:00:00Z", "2026-07-14T22:00:00Z"),  # EDT
        ("2026-03-09T15:00:00Z", "2026-03-08T22:00:00Z"),  # Monday after spring-forward: Sunday 18:00 EDT
        ("2026-11-02T15:00:00Z", "2026-11-01T23:00:00Z"),  # Monday after fall-back: Sunday 18:00 EST
        ("2026-07-14T22:00:00Z", "2026-07-14T22:00:00Z"),  # the first instant is its own start
    ],
)
def test_trading_day_start_is_18_et_the_evening_before(at: str, start: str) -> None:
    begun = trading_day_start(utc(at))
    assert begun == utc(start)
    assert begun.tzinfo == timezone.utc
    assert begun <= utc(at)


@pytest.mark.parametrize(
    ("day", "close"),
    [
        (date(2026, 3, 6), "2026-03-06T22:00:00Z"),  # regular close 17:00 EST
        (date(2026, 3, 9), "2026-03-09T21:00:00Z"),  # regular close 17:00 EDT, the Monday after the change
        (date(2026, 11, 2), "2026-11-02T22:00:00Z"),  # back to EST
        (date(2026, 11, 27), "2026-11-27T18:00:00Z"),  # day after Thanksgiving: 13:00 ET
        (date(2026, 12, 24), "2026-12-24T18:00:00Z"),  # Christmas Eve: 13:00 ET
        (date(2026, 12, 25), None),  # Christmas: no session
        (date(2027, 1, 1), None),  # New Year's Day, another year's calendar
        (date(2026, 3, 7), None),  # Saturday
        (date(2026, 3, 8), None),  # Sunday: the evening session belongs to Monday
    ],
)
def test_session_close(day: date, close: str | None) -> None:
    expected = None if close is None else utc(close)
    assert session_close(day) == expected
    if expected is not None:
        assert expected.tzinfo == timezone.utc


def test_session_opens_18_et_the_evening_before() -> None:
    assert session_open(date(2026, 3, 9)) == utc("2026-03-08T22:00:00Z")
    assert session_open(date(2026, 11, 30)) == utc("2026-11-29T23:00:00Z")
    assert session_open(date(2026, 12, 25)) is None
    found = session(date(2026, 11, 27))
    assert found is not None and found.day == date(2026, 11, 27) and found.open < found.close


@pytest.mark.parametrize(
    ("day", "business"),
    [
        (date(2026, 11, 26), False),  # Thanksgiving: a short Globex session, but not a business day
        (date(2026, 11, 27), True),
        (date(2026, 1, 19), False),  # MLK Day
        (date(2026, 6, 19), False),  # Juneteenth
        (date(2026, 3, 7), False),  # Saturday
        (date(2026, 3, 9), True),
    ],
)
def test_business_days(day: date, business: bool) -> None:
    assert is_business_day(day) is business


def test_wall_times_at_dst_changes_exist_exactly_once() -> None:
    # 02:30 does not exist on 2026-03-08: the clock passes it at the change itself (02:00 EST -> 03:00 EDT).
    assert et_datetime(date(2026, 3, 8), time(2, 30)).astimezone(timezone.utc) == utc("2026-03-08T07:00:00Z")
    assert et_datetime(date(2026, 3, 8), time(3, 0)).astimezone(timezone.utc) == utc("2026-03-08T07:00:00Z")
    assert et_datetime(date(2026, 3, 8), time(1, 59)).astimezone(timezone.utc) == utc("2026-03-08T06:59:00Z")
    # 01:30 occurs twice on 2026-11-01: the first occurrence (EDT).
    assert et_datetime(date(2026, 11, 1), time(1, 30)).astimezone(timezone.utc) == utc("2026-11-01T05:30:00Z")


@pytest.mark.parametrize("call", [trading_day, trading_day_start])
def test_naive_times_are_refused(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="naive"):
        call(datetime(2026, 1, 13, 18, 0))


def test_concurrent_first_lookups_build_one_calendar(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    real = sessions._load_year

    def counting(year: int):  # type: ignore[no-untyped-def]
        built.append(year)
        return real(year)

    monkeypatch.setattr(sessions, "_sessions", {})
    monkeypatch.setattr(sessions, "_load_year", counting)
    results: list[datetime | None] = []
    threads = [threading.Thread(target=lambda: results.append(session_close(date(2031, 3, 7)))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == [2031]
    assert results == [utc("2031-03-07T22:00:00Z")] * 8
