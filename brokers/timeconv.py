"""Broker timestamps in, aware UTC out — and back again for emulators and the paper broker.

Brokers report time three ways: ISO-8601 with an offset (often with 7 fractional digits, which
``datetime.fromisoformat`` refuses), naive America/New_York wall time (ambiguous for one hour every November and
impossible for one hour every March), and epoch milliseconds. Everything past a connector's edge is aware UTC, so
the conversion lives here once and is tested across both DST changes.

Conventions (the Broker document's ``paper.timestamps`` names them):

- ``utc_iso``: ``2026-03-09T13:30:00.1234567Z`` or ``...+00:00``; a value without an offset is an error.
- ``eastern_naive``: ``2026-03-09 09:30:00`` / ``2026-03-09T09:30:00.123``; ``fold`` picks the first (EDT, 0) or
  second (EST, 1) occurrence of the repeated November hour; a wall time skipped in March raises ``ValueError``.
- ``epoch_ms``: milliseconds since the epoch as int, float or digit string.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

EASTERN = ZoneInfo("America/New_York")
CONVENTIONS = ("utc_iso", "eastern_naive", "epoch_ms")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# Split off fractional seconds so that 7+ digits (.NET ticks) can be cut to the 6 Python accepts.
_FRACTION = re.compile(r"(?P<head>T?\d{2}:\d{2}:\d{2})\.(?P<frac>\d+)")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown timestamp convention {convention!r}; known: {', '.join(CONVENTIONS)}")


def _fromiso(text: str) -> datetime:
    """``fromisoformat`` that tolerates ``Z``, a space separator and 0..n fractional digits (truncated to 6)."""
    cleaned = text.strip()
    if cleaned.endswith(("Z", "z")):
        cleaned = cleaned[:-1] + "+00:00"
    cleaned = _FRACTION.sub(lambda m: f"{m['head']}.{(m['frac'] + '000000')[:6]}", cleaned, count=1)
    try:
        return datetime.fromisoformat(cleaned)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}") from None


def _eastern_to_utc(naive: datetime, fold: int, original: object) -> datetime:
    """Attach America/New_York to a naive wall time, refusing the March gap that zoneinfo would silently accept."""
    local = naive.replace(tzinfo=EASTERN, fold=fold)
    as_utc = local.astimezone(timezone.utc)
    if as_utc.astimezone(EASTERN).replace(tzinfo=None) != naive:
        raise ValueError(f"{original!r} does not exist in America/New_York (skipped by the spring DST change)")
    return as_utc


def is_ambiguous_eastern(naive: datetime) -> bool:
    """True for a wall time that happens twice in America/New_York (the November fall-back hour)."""
    first = naive.replace(tzinfo=EASTERN, fold=0).utcoffset()
    second = naive.replace(tzinfo=EASTERN, fold=1).utcoffset()
    return first != second and _exists_eastern(naive)


def _exists_eastern(naive: datetime) -> bool:
    local = naive.replace(tzinfo=EASTERN)
    return local.astimezone(timezone.utc).astimezone(EASTERN).replace(tzinfo=None) == naive


def parse_broker_time(value: object, convention: str = "utc_iso", *, fold: int = 0) -> datetime:
    """Normalize a broker's timestamp to an aware UTC ``datetime``.

    A ``datetime`` is accepted whatever the convention, but only when aware: a naive one has lost the information
    needed to place it in time.
    """
    _check_convention(convention)
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: cannot tell which time zone it is in")
        return value.astimezone(timezone.utc)
    if convention == "utc_iso":
        if not isinstance(value, str):
            raise ValueError(f"utc_iso timestamp must be a string, got {type(value).__name__} {value!r}")
        parsed = _fromiso(value)
        if parsed.tzinfo is None:
            raise ValueError(f"utc_iso timestamp {value!r} has no UTC offset")
        return parsed.astimezone(timezone.utc)
    if convention == "eastern_naive":
        if not isinstance(value, str):
            raise ValueError(f"eastern_naive timestamp must be a string, got {type(value).__name__} {value!r}")
        parsed = _fromiso(value)
        if parsed.tzinfo is not None:
            # An explicit offset is unambiguous; trust it rather than the convention.
            return parsed.astimezone(timezone.utc)
        if fold not in (0, 1):
            raise ValueError(f"fold must be 0 or 1, got {fold!r}")
        return _eastern_to_utc(parsed, fold, value)
    # epoch_ms
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError(f"epoch_ms timestamp must be a number, got {type(value).__name__} {value!r}")
    try:
        millis = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"epoch_ms timestamp is not a number: {value!r}") from None
    if not millis.is_finite():
        raise ValueError(f"epoch_ms timestamp is not finite: {value!r}")
    micros = int((millis * 1000).to_integral_value())
    return _EPOCH + timedelta(microseconds=micros)


def format_broker_time(dt: datetime, convention: str = "utc_iso") -> str | int:
    """The inverse of ``parse_broker_time``: render an aware time the way a broker of ``convention`` would.

    ``eastern_naive`` drops the offset on purpose (that is the quirk being simulated): the repeated November hour
    can then only be told apart by order of arrival (see ``EasternTimeDecoder``).
    """
    _check_convention(convention)
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"naive datetime {dt!r}: cannot format a time with no zone")
    utc = dt.astimezone(timezone.utc)
    if convention == "utc_iso":
        return utc.isoformat(timespec="microseconds").replace("+00:00", "Z")
    if convention == "eastern_naive":
        return utc.astimezone(EASTERN).replace(tzinfo=None).isoformat(sep=" ", timespec="milliseconds")
    delta = utc - _EPOCH
    return (delta.days * 86_400_000) + (delta.seconds * 1000) + (delta.microseconds // 1000)


TRADING_DAY_STARTS = time(18, 0)
"""CME futures trade days begin at 18:00 New York time the evening before; daily P&L resets there."""


def trading_day_start(now: datetime) -> datetime:
    """Start (aware UTC) of the CME trading day containing ``now``: the latest 18:00 New York at or before it."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: cannot tell which trading day it is in")
    local = now.astimezone(EASTERN)
    day = local.date() if local.time() >= TRADING_DAY_STARTS else local.date() - timedelta(days=1)
    return datetime.combine(day, TRADING_DAY_STARTS, tzinfo=EASTERN).astimezone(timezone.utc)


class EasternTimeDecoder:
    """Decode a stream of naive Eastern timestamps that only move forward, across the November fall-back.

    Reports from a broker arrive in time order. During the repeated hour, ``fold=0`` (EDT) is the right reading
    until the clocks fall back; after that, the same wall times mean EST. So: take the first occurrence unless it
    would put this report before the previous one, then take the second.
    """

    def __init__(self, *, slack: timedelta = timedelta(minutes=5)) -> None:
        self._last: datetime | None = None
        self._slack = slack
        """Reports may be slightly out of order (two fills in one message); tolerate that much going backwards."""

    @property
    def last(self) -> datetime | None:
        return self._last

    def decode(self, text: str) -> datetime:
        first = parse_broker_time(text, "eastern_naive", fold=0)
        result = first
        if self._last is not None and first < self._last - self._slack:
            second = parse_broker_time(text, "eastern_naive", fold=1)
            if second != first:
                result = second
        if self._last is None or result > self._last:
            self._last = result
        return result
