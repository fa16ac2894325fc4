"""The schedule executor: fires the Schedule rules' flattens (and records block windows) at their instants.

Firing times come from ``engine.schedule`` (Eastern wall clock, DST and the CME calendar handled there). Each
firing is journaled (a ``schedule`` risk event keyed by rule and instant) once it has acted, so a restart knows what
already ran. Acting first is safe because the flatten a firing triggers is itself journaled under an id derived
from the rule and the instant: a crash between the two re-fires it after the restart, and the repeat finds its
flatten already on disk instead of sending it twice. On start the executor asks ``flatten_due`` for flattens owed
since the last journaled firing (or since the trading day began) and fires those still in the same session, once.
``block_entries`` needs no action here (the engine consults the schedule on every decision); its firings are
journaled so the history shows them.

The clock and sleep are injectable, so tests run a firing "now" without waiting for a wall-clock minute.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Sequence

from engine.model import ScheduleRule
from engine.schedule import FLATTEN, Firing, firings, flatten_due, next_firing
from engine.sessions import trading_day_start
from service.journal import parse_utc

log = logging.getLogger(__name__)

KIND = "schedule"
MAX_SLEEP_S = 30.0
"""Wake at least this often: a rules reload may have added an earlier firing."""


def firing_key(firing: Firing) -> str:
    return f"{firing.rule.name}@{firing.at.astimezone(timezone.utc).isoformat()}"


class ScheduleExecutor:
    def __init__(self, rules: Callable[[], Sequence[ScheduleRule]], fire: Callable[[Firing], Awaitable[Any]],
                 journal: Any, *, clock: Callable[[], datetime] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rules = rules
        self.fire = fire
        self.journal = journal
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.sleep = sleep
        self.done: set[str] = set()
        self.last_checked: datetime | None = None
        self.fired: list[Firing] = []
        self._task: asyncio.Task[None] | None = None

    def _load_done(self) -> None:
        """The firings already run and the last instant checked, from the journal: only the current trading day's
        matter (``flatten_due`` looks back no further than its start), and all of them, however many other risk
        events the day wrote."""
        for row in self.journal.risk_events_since(trading_day_start(self.clock()), kinds=[KIND]):
            if row.get("key"):
                self.done.add(str(row["key"]))
                at = row.get("checked_at")
                if at:
                    seen = parse_utc(str(at))
                    if self.last_checked is None or seen > self.last_checked:
                        self.last_checked = seen

    async def start(self) -> None:
        """Fire the flattens a restart owes, then keep firing on time."""
        self._load_done()
        await self.catch_up()
        self._task = asyncio.create_task(self._loop(), name="schedule-executor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def catch_up(self) -> list[Firing]:
        """Flattens owed at start (missed while down, same session only)."""
        now = self.clock()
        owed = [f for f in flatten_due(list(self.rules()), now, self.last_checked) if firing_key(f) not in self.done]
        for firing in owed:
            await self._run(firing, late=True)
        self.last_checked = max(now, self.last_checked or now)
        return owed

    async def tick(self) -> list[Firing]:
        """Fire everything due in (last_checked, now]. A flatten goes through ``flatten_due`` as at start: if the
        loop woke late (a suspended machine, a stalled loop) after its session closed, it is dropped, not fired
        into the next session's positions."""
        now = self.clock()
        rules = list(self.rules())
        since = self.last_checked or now - timedelta(seconds=1)
        owed = {firing_key(f) for f in flatten_due(rules, now, since)}
        due = []
        for firing in firings(rules, since + timedelta(microseconds=1), now + timedelta(microseconds=1)):
            key = firing_key(firing)
            if key in self.done:
                continue
            if firing.action == FLATTEN and key not in owed:
                log.warning("schedule: %s flatten due %s dropped: its session is over", firing.rule.name,
                            firing.at.isoformat())
                self.done.add(key)
                continue
            due.append(firing)
        for firing in due:
            await self._run(firing, late=False)
        self.last_checked = now
        return due

    async def _run(self, firing: Firing, *, late: bool) -> None:
        key = firing_key(firing)
        self.done.add(key)
        self.fired.append(firing)
        if firing.action == FLATTEN:
            log.info("schedule: %s fires flatten (due %s%s)", firing.rule.name, firing.at.isoformat(),
                     ", late" if late else "")
            await self.fire(firing)
        now = self.clock()
        await self.journal.record_risk_event({
            "scope": "schedule", "name": firing.rule.name, "kind": KIND, "key": key, "action": firing.action,
            "firing_at": firing.at, "late": late, "checked_at": now, "at": now,
        })

    async def _loop(self) -> None:
        while True:
            now = self.clock()
            upcoming = next_firing(list(self.rules()), now, horizon=timedelta(days=2))
            wait = MAX_SLEEP_S if upcoming is None else (upcoming.at - now).total_seconds()
            await self.sleep(max(0.0, min(wait, MAX_SLEEP_S)))
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("schedule executor: a firing failed")
