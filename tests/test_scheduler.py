"""The schedule executor with an injected clock and sleep: flattens and block windows fire at their instants, a
restart fires a flatten it missed while still in the same session, and nothing fires twice. Then the same through
the runtime against paper brokers: the positions of the flattened strategy close."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from engine.loader import load_rules
from engine.schedule import Firing
from service.dispatch import FILLED
from service.journal import Journal
from service.scheduler import KIND, ScheduleExecutor
from tests.harness.runtime import Clock, signal, world, write_rules

ET = ZoneInfo("America/New_York")


def et(day: int, hh: int, mm: int, ss: int = 0) -> datetime:
    """March 2026, Eastern wall clock (EDT from March 8) -> aware UTC."""
    return datetime(2026, 3, day, hh, mm, ss, tzinfo=ET).astimezone(ZoneInfo("UTC"))


@pytest.fixture
def rules(tmp_path: Path) -> Any:
    result = load_rules(write_rules(tmp_path / "rules", schedule=True))
    assert result.ok
    return result.ruleset.schedule_rules


@pytest.fixture
async def journal(tmp_path: Path) -> Any:
    j = Journal(tmp_path / "journal.db")
    await j.start()
    yield j
    await j.close()


class Fired:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, datetime, datetime]] = []

    async def __call__(self, firing: Firing) -> None:
        self.calls.append((firing.rule.name, firing.at, self.clock()))


def executor(rules: Any, journal: Journal, clock: Clock, fired: Fired, **kw: Any) -> ScheduleExecutor:
    return ScheduleExecutor(lambda: rules, fired, journal, clock=clock, **kw)


def frozen(at: datetime) -> Clock:
    clock = Clock()
    clock.frozen = at
    return clock


async def test_a_flatten_fires_at_its_instant_and_once(rules: Any, journal: Journal) -> None:
    clock = frozen(et(11, 15, 54, 59))
    fired = Fired(clock)
    ex = executor(rules, journal, clock, fired)
    await ex.start()
    await ex.stop()
    assert fired.calls == []
    clock.set(et(11, 15, 55))
    assert [f.rule.name for f in await ex.tick()] == ["flatten-mirror"]
    assert fired.calls == [("flatten-mirror", et(11, 15, 55), et(11, 15, 55))]
    clock.set(et(11, 15, 56))
    assert await ex.tick() == []
    assert len(fired.calls) == 1
    events = [e for e in journal.risk_events(10) if e["kind"] == KIND]
    assert [(e["name"], e["action"]) for e in events] == [("flatten-mirror", "flatten")]


async def test_block_entries_firings_are_journaled_and_act_on_nothing(rules: Any, journal: Journal) -> None:
    clock = frozen(et(11, 15, 49, 59))
    fired = Fired(clock)
    ex = executor(rules, journal, clock, fired)
    ex.last_checked = clock()
    clock.set(et(11, 15, 50))
    due = await ex.tick()
    assert [(f.rule.name, f.action) for f in due] == [("no-late-entries", "block_entries")]
    assert fired.calls == []  # the engine consults the window itself
    assert [e["name"] for e in journal.risk_events(10) if e["kind"] == KIND] == ["no-late-entries"]


async def test_the_loop_sleeps_until_the_next_firing_instead_of_polling(rules: Any, journal: Journal) -> None:
    clock = frozen(et(11, 15, 54, 50))
    fired = Fired(clock)
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock.set(clock() + timedelta(seconds=seconds))
        if len(naps) >= 3:
            raise SystemExit  # ends the loop (not an Exception: the loop only logs those)

    ex = executor(rules, journal, clock, fired, sleep=sleep)
    ex.last_checked = clock()
    with pytest.raises(SystemExit):
        await ex._loop()
    assert naps[0] == 10.0  # exactly to 15:55:00
    assert fired.calls == [("flatten-mirror", et(11, 15, 55), et(11, 15, 55))]


async def test_a_restart_fires_a_missed_flatten_in_the_same_session_and_never_twice(rules: Any,
                                                                                  journal: Journal) -> None:
    clock = frozen(et(11, 15, 0))
    fired = Fired(clock)
    first = executor(rules, journal, clock, fired)
    await first.start()
    await first.stop()
    # Down from 15:00 to 16:10: the 15:55 flatten was missed; still the same session.
    clock.set(et(11, 16, 10))
    second = executor(rules, journal, clock, fired)
    await second.start()
    await second.stop()
    assert fired.calls == [("flatten-mirror", et(11, 15, 55), et(11, 16, 10))]
    late = [e for e in journal.risk_events(10) if e["kind"] == KIND and e["name"] == "flatten-mirror"]
    assert len(late) == 1 and late[0]["late"] is True
    clock.set(et(11, 16, 20))
    third = executor(rules, journal, clock, fired)
    await third.start()
    assert await third.tick() == []
    await third.stop()
    assert len(fired.calls) == 1


async def test_a_flatten_of_a_closed_session_is_not_fired_after_a_restart(rules: Any, journal: Journal) -> None:
    clock = frozen(et(11, 15, 0))
    fired = Fired(clock)
    first = executor(rules, journal, clock, fired)
    await first.start()
    await first.stop()
    clock.set(et(12, 9, 30))  # the next trading day
    second = executor(rules, journal, clock, fired)
    await second.start()
    await second.stop()
    assert fired.calls == []


async def test_a_loop_that_wakes_after_the_session_closed_drops_the_flatten(rules: Any, journal: Journal) -> None:
    clock = frozen(et(11, 15, 50, 30))
    fired = Fired(clock)
    ex = executor(rules, journal, clock, fired)
    ex.last_checked = clock()
    clock.set(et(12, 10, 0))  # the machine slept through 15:55 and the 17:00 close
    due = await ex.tick()
    assert fired.calls == [] and all(f.action != "flatten" for f in due)


# -- through the runtime -----------------------------------------------------------------------------------------

async def test_the_schedule_flattens_the_strategy_through_the_runtime_once_across_a_restart(tmp_path: Path) -> None:
    clock = Clock(et(11, 15, 0))
    async with world(tmp_path, clock=clock, rules={"schedule": True}) as w:
        entry = await w.submit(signal("mirror", "buy", 2, sid="e1"))
        other = await w.submit(signal("best", "buy", 1, sid="b1"))
        await w.settle()
        assert set(w.statuses("e1").values()) == {FILLED}
        contract = entry.orders[0].contract
    clock.set(et(11, 16, 10))  # restarted after the 15:55 flatten time, same session
    async with world(tmp_path, clock=clock, rules={"schedule": True}) as w:
        await w.settle()
        state = w.runtime.engine_state(clock())
        assert all(state.accounts[a].positions == {} for a in ("f1", "f2", "s1"))
        held = other.orders[0].account
        assert state.accounts[held].positions == {contract: 1}  # not the flattened strategy: untouched
        flattens = [s for s in w.journal.recent_signals(50) if s["id"].startswith("flatten-flatten-mirror")]
        assert len(flattens) == 1 and set(w.statuses(flattens[0]["id"]).values()) == {FILLED}
    async with world(tmp_path, clock=clock, rules={"schedule": True}) as w:
        await w.settle()
        assert len([s for s in w.journal.recent_signals(50) if s["id"].startswith("flatten-")]) == 1


async def test_a_restart_after_a_busy_day_still_knows_the_flatten_already_fired(rules: Any, journal: Journal) -> None:
    clock = frozen(et(11, 15, 50))
    fired = Fired(clock)
    first = executor(rules, journal, clock, fired)
    first.last_checked = clock()
    clock.set(et(11, 15, 55))
    assert [f.rule.name for f in await first.tick()] == ["flatten-mirror"]
    # A thousand and more risk events after the firing (reconciliations adopting, halts...): the firing is not
    # among the newest thousand any more.
    clock.set(et(11, 16, 0))
    await asyncio.gather(*(journal.record_risk_event({"scope": "account", "name": "f1", "kind": "adopt",
                                                      "reason": f"noise {n}", "source": "reconciliation"})
                           for n in range(1100)))
    clock.set(et(11, 16, 10))
    second = executor(rules, journal, clock, fired)
    await second.start()
    await second.stop()
    assert [name for name, _at, _now in fired.calls] == ["flatten-mirror"]  # not fired a second time
