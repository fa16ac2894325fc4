"""Broker timestamps to aware UTC, across the 2026 DST changes (March 8 spring forward, November 1 fall back)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from brokers.timeconv import (
    CONVENTIONS,
    EasternTimeDecoder,
    format_broker_time,
    is_ambiguous_eastern,
    parse_broker_time,
    trading_day_start,
)

UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("text, expected", [
    ("2026-03-09T13:30:00Z", utc(2026, 3, 9, 13, 30)),
    ("2026-03-09T13:30:00.1234567Z", utc(2026, 3, 9, 13, 30, 0, 123456)),  # .NET's 7 digits truncate
    ("2026-03-09T13:30:00.5+00:00", utc(2026, 3, 9, 13, 30, 0, 500000)),
    ("2026-03-09T09:30:00-04:00", utc(2026, 3, 9, 13, 30)),
    ("2026-03-09 13:30:00.000+00:00", utc(2026, 3, 9, 13, 30)),
])
def test_utc_iso(text: str, expected: datetime) -> None:
    parsed = parse_broker_time(text, "utc_iso")
    assert parsed == expected
    assert parsed.tzinfo is UTC


def test_utc_iso_without_offset_is_an_error() -> None:
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_broker_time("2026-03-09T13:30:00", "utc_iso")


@pytest.mark.parametrize("text, expected", [
    ("2026-03-06 09:30:00", utc(2026, 3, 6, 14, 30)),        # EST before the change
    ("2026-03-08 01:59:59", utc(2026, 3, 8, 6, 59, 59)),     # last EST second
    ("2026-03-08 03:00:00", utc(2026, 3, 8, 7, 0)),          # first EDT second
    ("2026-03-09T09:30:00.123", utc(2026, 3, 9, 13, 30, 0, 123000)),
    ("2026-11-01 00:59:00", utc(2026, 11, 1, 4, 59)),
    ("2026-11-01 02:00:00", utc(2026, 11, 1, 7, 0)),         # EST after the change
    ("2026-11-02 09:30:00", utc(2026, 11, 2, 14, 30)),
])
def test_eastern_naive_around_dst(text: str, expected: datetime) -> None:
    assert parse_broker_time(text, "eastern_naive") == expected


def test_spring_forward_gap_does_not_exist() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        parse_broker_time("2026-03-08 02:30:00", "eastern_naive")
    with pytest.raises(ValueError, match="does not exist"):
        parse_broker_time("2026-03-08T02:00:00", "eastern_naive", fold=1)


def test_fall_back_hour_is_ambiguous_and_fold_picks_the_occurrence() -> None:
    assert parse_broker_time("2026-11-01 01:30:00", "eastern_naive") == utc(2026, 11, 1, 5, 30)  # EDT
    assert parse_broker_time("2026-11-01 01:30:00", "eastern_naive", fold=0) == utc(2026, 11, 1, 5, 30)
    assert parse_broker_time("2026-11-01 01:30:00", "eastern_naive", fold=1) == utc(2026, 11, 1, 6, 30)  # EST
    assert is_ambiguous_eastern(datetime(2026, 11, 1, 1, 30))
    assert not is_ambiguous_eastern(datetime(2026, 11, 1, 2, 30))
    assert not is_ambiguous_eastern(datetime(2026, 3, 8, 2, 30))  # the gap is not "ambiguous", it is absent


def test_eastern_value_with_explicit_offset_trusts_the_offset() -> None:
    assert parse_broker_time("2026-11-01T01:30:00-05:00", "eastern_naive") == utc(2026, 11, 1, 6, 30)


@pytest.mark.parametrize("value", [1793514600000, "1793514600000", 1793514600000.0])
def test_epoch_ms(value: object) -> None:
    assert parse_broker_time(value, "epoch_ms") == utc(2026, 11, 1, 6, 30)


def test_epoch_ms_keeps_sub_millisecond_digits_exactly() -> None:
    assert parse_broker_time("1793514600000.25", "epoch_ms") == utc(2026, 11, 1, 6, 30, 0, 250)


@pytest.mark.parametrize("value", ["soon", None, True, float("nan")])
def test_epoch_ms_rejects_non_numbers(value: object) -> None:
    with pytest.raises(ValueError):
        parse_broker_time(value, "epoch_ms")


def test_datetime_input() -> None:
    eastern = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York"))
    assert parse_broker_time(eastern, "epoch_ms") == utc(2026, 11, 1, 6, 30)
    with pytest.raises(ValueError, match="naive"):
        parse_broker_time(datetime(2026, 11, 1, 6, 30), "utc_iso")


def test_unknown_convention() -> None:
    with pytest.raises(ValueError, match="unknown timestamp convention"):
        parse_broker_time("2026-01-01T00:00:00Z", "local")


def test_format_is_what_each_convention_looks_like() -> None:
    moment = utc(2026, 11, 1, 6, 30, 0, 123456)
    assert format_broker_time(moment, "utc_iso") == "2026-11-01T06:30:00.123456Z"
    assert format_broker_time(moment, "eastern_naive") == "2026-11-01 01:30:00.123"
    assert format_broker_time(moment, "epoch_ms") == 1793514600123
    with pytest.raises(ValueError, match="naive"):
        format_broker_time(datetime(2026, 1, 1), "utc_iso")


# Milliseconds, because eastern_naive and epoch_ms carry no finer precision.
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)).map(
    lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))


@given(moments, st.sampled_from(CONVENTIONS))
def test_format_then_parse_round_trips(moment: datetime, convention: str) -> None:
    text = format_broker_time(moment, convention)
    # Only the repeated November hour needs the fold; the second occurrence is the EST one.
    fold = 1 if moment.astimezone(ZoneInfo("America/New_York")).utcoffset() == timedelta(hours=-5) else 0
    assert parse_broker_time(text, convention, fold=fold) == moment


def test_decoder_walks_through_the_fall_back_hour() -> None:
    decoder = EasternTimeDecoder()
    stream = ["2026-11-01 00:50:00", "2026-11-01 01:10:00", "2026-11-01 01:55:00",  # EDT
              "2026-11-01 01:05:00", "2026-11-01 01:40:00",                          # clocks fell back: EST
              "2026-11-01 02:10:00"]
    decoded = [decoder.decode(t) for t in stream]
    assert decoded == [utc(2026, 11, 1, 4, 50), utc(2026, 11, 1, 5, 10), utc(2026, 11, 1, 5, 55),
                       utc(2026, 11, 1, 6, 5), utc(2026, 11, 1, 6, 40), utc(2026, 11, 1, 7, 10)]
    assert decoded == sorted(decoded)


def test_decoder_tolerates_slightly_out_of_order_reports_in_the_first_occurrence() -> None:
    decoder = EasternTimeDecoder()
    assert decoder.decode("2026-11-01 01:20:00") == utc(2026, 11, 1, 5, 20)
    # Two fills reported a few seconds out of order must not jump an hour ahead.
    assert decoder.decode("2026-11-01 01:19:58") == utc(2026, 11, 1, 5, 19, 58)


def test_decoder_outside_the_ambiguous_hour_is_plain_parsing() -> None:
    decoder = EasternTimeDecoder()
    assert decoder.decode("2026-03-09 09:30:00") == utc(2026, 3, 9, 13, 30)
    assert decoder.decode("2026-03-09 09:00:00") == utc(2026, 3, 9, 13, 0)  # earlier report, still literal
    with pytest.raises(ValueError, match="does not exist"):
        decoder.decode("2026-03-08 02:30:00")


@pytest.mark.parametrize("now, start", [
    (utc(2026, 3, 9, 13, 30), utc(2026, 3, 8, 22, 0)),    # Monday morning: Sunday 18:00 EDT
    (utc(2026, 3, 9, 22, 0), utc(2026, 3, 9, 22, 0)),     # exactly 18:00 EDT starts the next day
    (utc(2026, 3, 6, 22, 59), utc(2026, 3, 5, 23, 0)),    # Friday 17:59 EST belongs to Thursday evening's day
    (utc(2026, 11, 2, 14, 30), utc(2026, 11, 1, 23, 0)),  # first EST day
])
def test_trading_day_start(now: datetime, start: datetime) -> None:
    assert trading_day_start(now) == start
