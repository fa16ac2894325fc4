"""When Schedule rules fire and which of them blocks entries right now, on the Eastern wall clock.

Semantics (rules-format.md, with the choices the document leaves open):

- ``at: "15:55"`` fires at that Eastern wall-clock time on each listed weekday (``days``, default every day),
  holidays included: it is a clock rule, not a session rule. ``before_close`` is the session rule.
- ``between: [start, end]`` is the half-open window [start, end) of that day's Eastern wall clock; when end < start
  it wraps past midnight, and ``days`` names the day the window *starts*. A block window is active when its start
  has passed and its end has not; as firings it yields two events, ``block_entries`` at the start and
  ``end_block_entries`` at the end (the end of this rule's block only: another window may still be blocking).
- ``before_close: 5m`` is relative to the CME equity session close of the day it closes on (``engine.sessions``,
  early closes included) and fires only on days a session closes (never on Christmas, never on a weekend);
  ``days`` filters by the close's date. A ``block_entries`` rule with ``before_close`` blocks [close - N, close).
- Wall times that do not exist or occur twice at a DST change follow ``engine.sessions.et_datetime``: a rule
  fires once on those days (a missing time at the change itself, a repeated time at its first occurrence), and a
  window is the span between those two instants, so ``blocking_rule`` and ``firings`` always agree.
- Scopes: a rule with ``strategies`` / ``accounts`` applies only to those. When the caller passes no strategy or
  account (None), a scoped rule is considered to apply: the safe reading for "may anything enter now?".

Everything here is pure (rules and times in, answers out) and cheap on the decision path: wall times are parsed
once per string, the session calendar is a per-year dict (``engine.sessions``), and nothing touches pandas after the
first question about a year.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import Iterable, Iterator, Sequence

from engine.model import ScheduleRule
from engine.sessions import et_datetime, require_aware, session_close, to_et, trading_day, trading_day_start

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
"""Index = ``date.weekday()``."""

BLOCK = "block_entries"
END_BLOCK = "end_block_entries"
FLATTEN = "flatten"


@dataclass(frozen=True)
class Firing:
    """One moment a rule acts: ``action`` is the rule's action, or ``end_block_entries`` when a block window ends."""

    rule: ScheduleRule
    action: str
    at: datetime
    """UTC."""

    def to_json(self) -> dict[str, str]:
        """The line ``multibroker schedule`` prints: UTC with ``Z`` and the Eastern wall time with its offset."""
        return {
            "rule": self.rule.name,
            "action": self.action,
            "at": self.at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "at_et": to_et(self.at).isoformat(timespec="seconds"),
        }


@lru_cache(maxsize=1024)
def _wall(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def _seconds(text: str) -> int:
    wall = _wall(text)
    return wall.hour * 3600 + wall.minute * 60


def _on(rule: ScheduleRule, day: date) -> bool:
    return WEEKDAYS[day.weekday()] in rule.days


def _in_scope(rule: ScheduleRule, strategy: str | None, account: str | None) -> bool:
    if rule.strategies is not None and strategy is not None and strategy not in rule.strategies:
        return False
    if rule.accounts is not None and account is not None and account not in rule.accounts:
        return False
    return True


@lru_cache(maxsize=4096)
def _between_instants(start: str, end: str, day: date) -> tuple[datetime, datetime]:
    """UTC [start, end) of the window that starts on ``day``; an end before the start is on the next day."""
    end_day = day if _seconds(end) > _seconds(start) else day + timedelta(days=1)
    return (et_datetime(day, _wall(start)).astimezone(timezone.utc),
            et_datetime(end_day, _wall(end)).astimezone(timezone.utc))


def _window_contains(rule: ScheduleRule, at: datetime, local: datetime) -> bool:
    if rule.between is not None:
        # Only a window starting today or (wrapping) yesterday can hold ``at``. Comparing instants, not wall times,
        # keeps this in exact agreement with ``firings`` even on DST Sundays.
        for day in (local.date(), local.date() - timedelta(days=1)):
            if _on(rule, day):
                opened, closed = _between_instants(rule.between[0], rule.between[1], day)
                if opened <= at < closed:
                    return True
        return False
    if rule.before_close_minutes is not None:
        lead = timedelta(minutes=rule.before_close_minutes)
        # The window may begin the calendar day before its close (before_close up to 23h).
        for day in (local.date(), local.date() + timedelta(days=1)):
            close = session_close(day)
            if close is not None and _on(rule, day) and close - lead <= at < close:
                return True
    return False


def blocking_rule(rules: Iterable[ScheduleRule], at: datetime, *, strategy: str | None = None,
                  account: str | None = None) -> ScheduleRule | None:
    """The first ``block_entries`` rule (in rule order) whose window contains ``at`` for this strategy/account."""
    require_aware(at, "blocking_rule time")
    local = to_et(at)
    for rule in rules:
        if rule.action == BLOCK and _in_scope(rule, strategy, account) and _window_contains(rule, at, local):
            return rule
    return None


def _rule_firings(rule: ScheduleRule, first_day: date, last_day: date) -> Iterator[Firing]:
    """Every firing of ``rule`` on the ET dates first_day..last_day (dates a window starts or a close falls on)."""
    day = first_day
    while day <= last_day:
        if _on(rule, day):
            if rule.at is not None:
                yield Firing(rule, rule.action, et_datetime(day, _wall(rule.at)).astimezone(timezone.utc))
            elif rule.between is not None:
                opened, closed = _between_instants(rule.between[0], rule.between[1], day)
                if opened < closed:  # [02:00, 02:30) on the March DST Sunday never happens
                    yield Firing(rule, rule.action, opened)
                    if rule.action == BLOCK:
                        yield Firing(rule, END_BLOCK, closed)
            elif rule.before_close_minutes is not None:
                close = session_close(day)
                if close is not None:
                    yield Firing(rule, rule.action, close - timedelta(minutes=rule.before_close_minutes))
                    if rule.action == BLOCK:
                        yield Firing(rule, END_BLOCK, close)
        day += timedelta(days=1)


def firings(rules: Sequence[ScheduleRule], start: datetime, end: datetime) -> list[Firing]:
    """Every firing in [start, end), in time order (ties: window ends first, then rule order)."""
    require_aware(start, "start")
    require_aware(end, "end")
    if end <= start:
        return []
    # A firing dated one day can land on the next (wrapping windows, before_close up to 23h): scan a day each side.
    first_day = to_et(start).date() - timedelta(days=1)
    last_day = to_et(end).date() + timedelta(days=1)
    found: list[tuple[datetime, int, int, Firing]] = []
    for index, rule in enumerate(rules):
        for firing in _rule_firings(rule, first_day, last_day):
            if start <= firing.at < end:
                found.append((firing.at, 0 if firing.action == END_BLOCK else 1, index, firing))
    found.sort(key=lambda item: item[:3])
    return [item[3] for item in found]


def next_firing(rules: Sequence[ScheduleRule], after: datetime, *, horizon: timedelta = timedelta(days=8),
                actions: Sequence[str] | None = None) -> Firing | None:
    """The first firing strictly after ``after`` (within ``horizon``), optionally only of some actions."""
    for firing in firings(rules, after + timedelta(microseconds=1), after + horizon):
        if actions is None or firing.action in actions:
            return firing
    return None


def flatten_due(rules: Sequence[ScheduleRule], now: datetime, last_checked: datetime | None = None) -> list[Firing]:
    """Flatten firings the executor owes at ``now``, having run everything up to ``last_checked``.

    That is every flatten in (last_checked, now]. A flatten missed while the service was down (or the loop was late)
    is still owed while ``now`` is in the same trading day as the firing and that day's session has not closed
    since the firing: the positions it meant to close are still the same session's. A flatten from an earlier
    trading day, or one whose session closed in between, is dropped: flattening a new session's positions for an
    old rule would be wrong.
    ``last_checked=None`` (first run after a start) looks back to the start of the current trading day.
    """
    require_aware(now, "now")
    if last_checked is not None:
        require_aware(last_checked, "last_checked")
    today = trading_day(now)
    day_start = trading_day_start(now)
    since = day_start - timedelta(microseconds=1)
    if last_checked is not None:
        since = max(since, last_checked)
    if since >= now:
        return []
    close = session_close(today)
    due = []
    for firing in firings(rules, since + timedelta(microseconds=1), now + timedelta(microseconds=1)):
        if firing.action != FLATTEN:
            continue
        if trading_day(firing.at) != today:
            continue
        if close is not None and firing.at < close <= now:
            continue  # the session it was meant for has closed since
        due.append(firing)
    return due
