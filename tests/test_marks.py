"""The 17:00 ET daily mark: the right instant across DST and holidays, journaled once, a missed one taken late only
before the 18:00 ET reopen. The clock is injected; nothing sleeps for real minutes."""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from service.journal import Journal
from service.marks import DailyMarker, next_mark, owed_mark


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


@pytest.mark.parametrize("after, expected", [
    (utc(2026, 11, 24, 12, 0), utc(2026, 11, 24, 22, 0)),  # EST: 17:00 ET = 22:00 UTC
    (utc(2026, 7, 15, 12, 0), utc(2026, 7, 15, 21, 0)),  # EDT: 17:00 ET = 21:00 UTC
    (utc(2026, 10, 30, 21, 30), utc(2026, 11, 2, 22, 0)),  # Friday after the mark -> Monday, across the DST end
    (utc(2026, 3, 6, 23, 0), utc(2026, 3, 9, 21, 0)),  # Friday evening -> Monday, across the DST start
    (utc(2026, 12, 24, 23, 0), utc(2026, 12, 28, 22, 0)),  # Christmas (no session) and the weekend skipped
    (utc(2026, 11, 24, 22, 0), utc(2026, 11, 25, 22, 0)),  # exactly at a mark: the next one
])
def test_next_mark_is_17_00_eastern_on_session_days(after: datetime, expected: datetime) -> None:
    assert next_mark(after) == expected


def test_a_mark_is_owed_only_between_17_00_and_the_18_00_reopen() -> None:
    assert owed_mark(utc(2026, 11, 24, 21, 59)) is None
    assert owed_mark(utc(2026, 11, 24, 22, 0)) == date(2026, 11, 24)
    assert owed_mark(utc(2026, 11, 24, 22, 59)) == date(2026, 11, 24)
    assert owed_mark(utc(2026, 11, 24, 23, 0)) is None  # the next session opened: prices moved on
    assert owed_mark(utc(2026, 11, 28, 22, 30)) is None  # Saturday: no session, no mark


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def taker(equity: dict[str, str]) -> Any:
    def take() -> tuple[list[dict[str, Any]], dict[str, Decimal]]:
        rows = [{"account": a, "broker": "paper-fast", "equity": Decimal(v), "realized": Decimal(0),
                 "unrealized": Decimal(0), "commissions": Decimal(0), "cash": Decimal(v), "margin_used": Decimal(0)}
                for a, v in equity.items()]
        return rows, {"MESZ6": Decimal("6002.25")}
    return take


async def wait_until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_the_marker_fires_at_17_00_and_a_restart_keeps_the_first_mark(tmp_path: Path) -> None:
    clock = Clock(utc(2026, 11, 24, 21, 59, 59))
    values = {"apex-1": "50010.00", "apex-2": "24990.00"}
    async with Journal(tmp_path / "journal.db") as journal:
        marker = DailyMarker(taker(values), journal.record_daily_marks, clock=clock, max_sleep_s=0.005)
        await marker.start()
        try:
            await asyncio.sleep(0.03)
            assert journal.daily_marks() == []  # 16:59:59 ET: not yet
            clock.at = utc(2026, 11, 24, 22, 0, 0, 5000)
            await wait_until(lambda: marker.marked)
        finally:
            await marker.stop()
        rows = journal.daily_marks()
        assert [(r["trading_day"], r["account"], r["equity"], r["late"]) for r in rows] == [
            ("2026-11-24", "apex-1", "50010.00", False), ("2026-11-24", "apex-2", "24990.00", False)]
        assert rows[0]["marks"] == {"MESZ6": "6002.25"} and rows[0]["at"] == "2026-11-24T22:00:00.005000Z"

        # A restart at 17:20 ET owes nothing new: the day is marked, and the first mark stands.
        clock.at = utc(2026, 11, 24, 22, 20)
        values.update({"apex-1": "49000.00"})
        again = DailyMarker(taker(values), journal.record_daily_marks, clock=clock)
        await again.start()
        await again.stop()
        assert again.marked == [date(2026, 11, 24)]
        assert [r["equity"] for r in journal.daily_marks()] == ["50010.00", "24990.00"]


async def test_a_service_down_at_17_00_marks_late_before_the_reopen_and_not_after(tmp_path: Path) -> None:
    async with Journal(tmp_path / "journal.db") as journal:
        late = DailyMarker(taker({"apex-1": "50000.00"}), journal.record_daily_marks,
                           clock=Clock(utc(2026, 11, 24, 22, 40)))
        await late.start()
        await late.stop()
        assert [(r["trading_day"], r["late"]) for r in journal.daily_marks()] == [("2026-11-24", True)]

        too_late = DailyMarker(taker({"apex-1": "50000.00"}), journal.record_daily_marks,
                               clock=Clock(utc(2026, 11, 25, 23, 5)))  # 18:05 ET: Wednesday's session is over
        await too_late.start()
        await too_late.stop()
        assert too_late.marked == []
        assert [r["trading_day"] for r in journal.daily_marks()] == ["2026-11-24"]


async def test_the_marker_skips_a_mark_it_wakes_up_for_after_the_reopen(tmp_path: Path) -> None:
    clock = Clock(utc(2026, 11, 24, 21, 59))
    async with Journal(tmp_path / "journal.db") as journal:
        marker = DailyMarker(taker({"apex-1": "50000.00"}), journal.record_daily_marks, clock=clock,
                             max_sleep_s=0.005)
        await marker.start()
        clock.at = utc(2026, 11, 24, 23, 30)  # suspended through 17:00 and the 18:00 reopen
        await asyncio.sleep(0.05)
        await marker.stop()
        assert journal.daily_marks() == [] and marker.marked == []
