"""Hot reload of rules/: real files in a temp directory, the real watcher, the real loader.

Most tests use a small stand-in engine that counts ``close()`` calls, because what is under test is when
generations are built, swapped and closed; the last test runs the same swap with ``engine.decide.build_engine``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import AsyncIterator

import pytest
from watchfiles import Change

from engine.decide import EngineError, durable_available
from engine.model import RuleSet
from engine.reload import Generation, Reload, RulesLoadError, RulesWatcher, is_rule_change
from engine.signal import parse_signal
from engine.state import AccountState, EngineState

EXAMPLE_RULES = Path(__file__).resolve().parent.parent / "rules"

QUIET_S = 0.5
"""How long to watch for a reload that must *not* happen (debounce 0.2 s + notifier steps, with margin)."""


class StandInEngine:
    """Enough of an engine to see which rules an evaluation ran on and whether it was used after close()."""

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        self.close_calls = 0

    @property
    def closed(self) -> bool:
        return self.close_calls > 0

    def decide(self) -> Decimal:
        if self.closed:
            raise RuntimeError("evaluation on a closed generation")
        return self.ruleset.accounts["apex-1"].capital

    def close(self) -> None:
        self.close_calls += 1


class Builds:
    """The build callable: keeps every engine it made, can be told to fail."""

    def __init__(self) -> None:
        self.engines: list[StandInEngine] = []
        self.fail_next = False

    def __call__(self, ruleset: RuleSet) -> StandInEngine:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("cannot compile rule 'mirror-scalper'")
        engine = StandInEngine(ruleset)
        self.engines.append(engine)
        return engine


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def capital(watcher: RulesWatcher) -> Decimal:
    ruleset, _ = watcher.current
    return ruleset.accounts["apex-1"].capital


@pytest.fixture
def builds() -> Builds:
    return Builds()


@pytest.fixture
async def watcher(rules_dir: Path, builds: Builds) -> AsyncIterator[RulesWatcher]:
    w = RulesWatcher(rules_dir, build=builds)
    await w.start()
    yield w
    await w.stop()
    # Every generation ever built is retired exactly once: none leaked, none closed twice.
    assert [e.close_calls for e in builds.engines] == [1] * len(builds.engines)


@pytest.fixture
def reloads(watcher: RulesWatcher) -> asyncio.Queue[Reload]:
    """Every reload the watcher notifies, in order."""
    queue: asyncio.Queue[Reload] = asyncio.Queue()
    watcher.on_reload(queue.put_nowait)
    return queue


async def next_reload(queue: asyncio.Queue[Reload], timeout_s: float = 1.0) -> Reload:
    return await asyncio.wait_for(queue.get(), timeout_s)


# -- which file-system events matter -------------------------------------------------------------------------

ROOT = Path("/srv/rules")


@pytest.mark.parametrize(
    ("change", "path", "relevant"),
    [
        (Change.modified, "/srv/rules/routing.yaml", True),
        (Change.added, "/srv/rules/extra/limits.yml", True),
        (Change.deleted, "/srv/rules/schedule.yaml", True),
        (Change.added, "/srv/rules/.routing.yaml.swp", False),  # vim swap file
        (Change.modified, "/srv/rules/routing.yaml~", False),  # backup copy
        (Change.added, "/srv/rules/.#routing.yaml", False),  # emacs lock
        (Change.added, "/srv/rules/.routing.yaml.tmp", False),  # hidden temp file, renamed over the target later
        (Change.added, "/srv/rules/routing.yaml.tmp", False),
        (Change.modified, "/srv/rules/.git/config.yaml", False),  # hidden directories are not rules
        (Change.added, "/srv/rules/README.md", False),
        (Change.added, "/srv/rules/4913", False),  # vim's probe file: created (a file, not a directory)...
        (Change.deleted, "/srv/rules/extra", True),  # ...but a vanished suffix-less entry may be a rules folder
        (Change.added, "/srv/rules/..data", True),  # a ConfigMap update re-points this symlink
        (Change.added, "/srv/rules/..data_tmp", False),
    ],
)
def test_only_rule_files_and_folders_matter(change: Change, path: str, relevant: bool) -> None:
    assert is_rule_change(change, path, ROOT) is relevant


def test_a_folder_moved_into_the_rules_matters(tmp_path: Path) -> None:
    (tmp_path / "extra").mkdir()
    assert is_rule_change(Change.added, str(tmp_path / "extra"), tmp_path)


# -- start-up ------------------------------------------------------------------------------------------------

async def test_start_loads_generation_one(watcher: RulesWatcher, builds: Builds, rules_dir: Path) -> None:
    assert watcher.generation == 1
    ruleset, engine = watcher.current
    assert engine is builds.engines[0]
    assert sorted(ruleset.accounts) == ["apex-1", "apex-2", "micro-a", "micro-b", "micro-c", "swing-1", "topstep-1"]
    [start] = watcher.history
    assert (start.ok, start.outcome, start.trigger, start.generation) == (True, "applied", "start", 1)
    assert start.content_hash == ruleset.content_hash
    assert start.time.tzinfo is timezone.utc
    assert watcher.watching


async def test_numbering_starts_where_the_caller_says_and_goes_on(rules_dir: Path, builds: Builds) -> None:
    w = RulesWatcher(rules_dir, build=builds, first_generation=7)
    assert w.generation == 0
    await w.start()
    try:
        assert w.generation == 7 and w.history[-1].generation == 7
        replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
        record = await w.reload_now()
        assert (record.outcome, record.generation, w.generation) == ("applied", 8, 8)
    finally:
        await w.stop()
    with pytest.raises(ValueError, match="first_generation"):
        RulesWatcher(rules_dir, build=builds, first_generation=0)


async def test_invalid_rules_at_start_refuse_to_start(rules_dir: Path, builds: Builds) -> None:
    replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: lots")
    w = RulesWatcher(rules_dir, build=builds)
    with pytest.raises(RulesLoadError) as err:
        await w.start()
    assert f"{rules_dir / 'accounts.yaml'}:7:10: Account/apex-1: capital: expected a number" in str(err.value)
    assert builds.engines == []
    assert not w.watching
    with pytest.raises(RuntimeError, match="not started"):
        _ = w.current


async def test_missing_rules_directory_refuses_to_start(tmp_path: Path, builds: Builds) -> None:
    with pytest.raises(RulesLoadError, match="rules directory not found"):
        await RulesWatcher(tmp_path / "nope", build=builds).start()


# -- edits through the real watcher --------------------------------------------------------------------------

async def test_valid_edit_is_applied_within_one_second(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], rules_dir: Path
) -> None:
    replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
    record = await next_reload(reloads, timeout_s=1.0)
    assert (record.ok, record.outcome, record.trigger, record.generation) == (True, "applied", "watch", 2)
    assert watcher.generation == 2
    assert capital(watcher) == Decimal("60000")
    assert watcher.current[0].content_hash == record.content_hash


async def test_invalid_edit_keeps_the_old_rules_and_records_where(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], builds: Builds, rules_dir: Path
) -> None:
    accounts = rules_dir / "accounts.yaml"
    replace_in(accounts, "capital: 50000", "capital: lots")
    line = accounts.read_text().splitlines().index("capital: lots") + 1
    record = await next_reload(reloads)
    assert (record.ok, record.outcome, record.generation) == (False, "invalid", 1)
    assert f"{accounts}:{line}:10: Account/apex-1: capital: expected a number, got string \"lots\"" in record.errors
    assert watcher.generation == 1
    assert capital(watcher) == Decimal("50000")
    assert not builds.engines[0].closed
    assert watcher.history[-1] == record

    replace_in(accounts, "capital: lots", "capital: 55000")  # the fix is picked up like any edit
    fixed = await next_reload(reloads)
    assert (fixed.ok, fixed.generation) == (True, 2)
    assert capital(watcher) == Decimal("55000")


async def test_a_burst_of_edits_yields_few_reloads_ending_on_the_last_content(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], rules_dir: Path
) -> None:
    accounts = rules_dir / "accounts.yaml"
    original = accounts.read_text()
    for i in range(1, 11):  # 10 writes in ~100 ms, as an editor's auto-save or a sync tool might do
        accounts.write_text(original.replace("capital: 50000", f"capital: {50000 + i}", 1))
        await asyncio.sleep(0.01)
    first = await next_reload(reloads, timeout_s=2.0)
    await asyncio.sleep(QUIET_S)
    records = [first] + [reloads.get_nowait() for _ in range(reloads.qsize())]
    assert 1 <= len(records) <= 2, records
    assert all(r.ok for r in records)
    assert capital(watcher) == Decimal("50010")


async def test_edits_spread_over_half_a_second_are_still_grouped(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], rules_dir: Path
) -> None:
    # Slower than the notifier's own 50 ms batching, so only the watcher's debounce can group these.
    accounts = rules_dir / "accounts.yaml"
    original = accounts.read_text()
    for i in range(1, 11):
        accounts.write_text(original.replace("capital: 50000", f"capital: {50000 + i}", 1))
        await asyncio.sleep(0.05)
    await next_reload(reloads, timeout_s=2.0)
    await asyncio.sleep(QUIET_S)
    assert reloads.qsize() <= 1
    assert capital(watcher) == Decimal("50010")


async def test_editor_writing_a_temp_file_then_renaming_it(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], rules_dir: Path
) -> None:
    accounts = rules_dir / "accounts.yaml"
    temp = rules_dir / ".accounts.yaml.tmp"
    temp.write_text(accounts.read_text().replace("capital: 50000", "capital: 70000", 1))
    os.replace(temp, accounts)
    record = await next_reload(reloads)
    assert record.ok and record.generation == 2
    assert capital(watcher) == Decimal("70000")


async def test_swap_and_backup_files_do_not_trigger_a_reload(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], rules_dir: Path
) -> None:
    (rules_dir / ".accounts.yaml.swp").write_text("kind: [broken")
    (rules_dir / "accounts.yaml~").write_text("kind: [broken")
    (rules_dir / "notes.txt").write_text("remember to raise the size")
    await asyncio.sleep(QUIET_S)
    assert reloads.empty()
    assert len(watcher.history) == 1


async def test_deleting_a_file_reloads_the_remaining_set(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], rules_dir: Path
) -> None:
    assert watcher.current[0].schedule_rules
    (rules_dir / "schedule.yaml").unlink()
    record = await next_reload(reloads)
    assert record.ok and record.generation == 2
    assert watcher.current[0].schedule_rules == ()


async def test_deleting_a_file_others_depend_on_keeps_the_old_rules(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], rules_dir: Path
) -> None:
    (rules_dir / "brokers.yaml").unlink()
    record = await next_reload(reloads)
    assert not record.ok and record.generation == 1
    assert any("Account/apex-1: broker: unknown broker 'paper-fast'" in e for e in record.errors)
    assert sorted(watcher.current[0].brokers) == ["paper-cheap", "paper-fast", "paper-slow"]


async def test_rules_directory_swapped_for_a_new_copy_is_loaded_and_watched(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], rules_dir: Path
) -> None:
    # Deployment tools replace the whole folder; the OS watch would otherwise follow the old one.
    staged = rules_dir.with_name("rules.new")
    shutil.copytree(rules_dir, staged)
    replace_in(staged / "accounts.yaml", "capital: 50000", "capital: 70000")
    rules_dir.rename(rules_dir.with_name("rules.old"))
    staged.rename(rules_dir)
    swapped = await next_reload(reloads, timeout_s=2.5)
    assert swapped.ok and capital(watcher) == Decimal("70000")
    replace_in(rules_dir / "accounts.yaml", "capital: 70000", "capital: 80000")  # the new folder is watched
    edited = await next_reload(reloads)
    assert edited.ok and capital(watcher) == Decimal("80000")


async def test_configmap_style_update_through_the_data_symlink(tmp_path: Path, builds: Builds) -> None:
    # Kubernetes mounts rules/x.yaml -> ..data/x.yaml, ..data -> ..v1, and updates by renaming a new ..data link.
    rules = tmp_path / "rules"
    shutil.copytree(EXAMPLE_RULES, rules / "..v1")
    (rules / "..data").symlink_to("..v1")
    for name in os.listdir(rules / "..v1"):
        (rules / name).symlink_to(Path("..data") / name)
    async with RulesWatcher(rules, build=builds) as w:
        reloads: asyncio.Queue[Reload] = asyncio.Queue()
        w.on_reload(reloads.put_nowait)
        shutil.copytree(rules / "..v1", rules / "..v2")
        replace_in(rules / "..v2" / "accounts.yaml", "capital: 50000", "capital: 90000")
        (rules / "..data_tmp").symlink_to("..v2")
        os.replace(rules / "..data_tmp", rules / "..data")
        record = await next_reload(reloads)
        assert record.ok and capital(w) == Decimal("90000")


async def test_rewriting_identical_content_is_a_recorded_no_op(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], builds: Builds, rules_dir: Path
) -> None:
    routing = rules_dir / "routing.yaml"
    routing.write_text(routing.read_text())
    await asyncio.sleep(QUIET_S)
    assert [r.outcome for r in watcher.history] == ["applied", "unchanged"]
    assert watcher.history[-1].trigger == "watch"
    assert reloads.empty()  # listeners hear about swaps and failures only
    assert len(builds.engines) == 1 and watcher.generation == 1


# -- generations: swap, pinning, retirement ------------------------------------------------------------------

async def test_evaluation_in_flight_finishes_on_its_generation(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], builds: Builds, rules_dir: Path
) -> None:
    with watcher.acquire() as held:
        replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
        await next_reload(reloads)  # the swap happens while this evaluation is suspended
        assert watcher.current[1] is builds.engines[1]
        assert held.engine is builds.engines[0]
        assert held.engine.decide() == Decimal("50000")
        assert not held.engine.closed and held.retired
        with watcher.acquire() as fresh:  # the next evaluation sees the new rules
            assert fresh.number == 2 and fresh.engine.decide() == Decimal("60000")
    assert held.engine.closed
    assert not builds.engines[1].closed


async def test_a_generation_nobody_holds_is_closed_at_the_swap(
    watcher: RulesWatcher, builds: Builds, rules_dir: Path
) -> None:
    replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
    await watcher.reload_now()
    assert builds.engines[0].closed and not builds.engines[1].closed


async def test_two_evaluations_pin_until_the_last_releases(
    watcher: RulesWatcher, builds: Builds, rules_dir: Path
) -> None:
    released = asyncio.Event()

    async def slow_evaluation() -> Decimal:
        with watcher.acquire() as gen:
            await released.wait()
            return gen.engine.decide()

    first, second = asyncio.create_task(slow_evaluation()), asyncio.create_task(slow_evaluation())
    await asyncio.sleep(0)
    replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
    await watcher.reload_now()
    assert not builds.engines[0].closed
    released.set()
    assert await asyncio.gather(first, second) == [Decimal("50000"), Decimal("50000")]
    assert builds.engines[0].closed


async def test_an_evaluation_on_a_worker_thread_pins_its_generation_too(
    watcher: RulesWatcher, builds: Builds, rules_dir: Path
) -> None:
    pinned, go_on = threading.Event(), threading.Event()

    def evaluate_in_thread() -> Decimal:
        with watcher.acquire() as gen:
            pinned.set()
            go_on.wait(5)
            return gen.engine.decide()

    evaluation = asyncio.create_task(asyncio.to_thread(evaluate_in_thread))
    assert await asyncio.to_thread(pinned.wait, 5)
    replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
    await watcher.reload_now()
    assert capital(watcher) == Decimal("60000") and not builds.engines[0].closed
    go_on.set()
    assert await evaluation == Decimal("50000")
    assert builds.engines[0].closed  # closed by the releasing thread


async def test_build_failure_keeps_the_old_rules(
    watcher: RulesWatcher, reloads: asyncio.Queue[Reload], builds: Builds, rules_dir: Path
) -> None:
    replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
    builds.fail_next = True
    record = await watcher.reload_now()
    assert (record.ok, record.outcome, record.generation) == (False, "build_failed", 1)
    assert "cannot compile rule 'mirror-scalper'" in record.errors[0]
    assert capital(watcher) == Decimal("50000") and not builds.engines[0].closed
    assert await next_reload(reloads) == record


# -- explicit trigger, history, listeners, stop --------------------------------------------------------------

async def test_reload_now_without_changes_is_a_no_op(watcher: RulesWatcher, builds: Builds) -> None:
    record = await watcher.reload_now()
    assert (record.ok, record.outcome, record.trigger, record.generation) == (True, "unchanged", "manual", 1)
    assert record.content_hash == watcher.current[0].content_hash
    assert len(builds.engines) == 1


async def test_history_keeps_the_last_n_attempts(rules_dir: Path, builds: Builds) -> None:
    accounts = rules_dir / "accounts.yaml"
    original = accounts.read_text()
    async with RulesWatcher(rules_dir, build=builds, history_size=3) as w:
        for amount in (51000, 52000, 53000, 54000):
            accounts.write_text(original.replace("capital: 50000", f"capital: {amount}", 1))
            await w.reload_now()
        assert [r.generation for r in w.history] == [3, 4, 5]
        assert w.history[-1].as_dict()["generation"] == 5
        assert w.history[-1].as_dict()["time"].endswith("+00:00")


async def test_listeners_may_be_async_and_a_failing_one_does_not_block_others(
    watcher: RulesWatcher, rules_dir: Path
) -> None:
    seen: list[tuple[str, int]] = []

    def broken(record: Reload) -> None:
        raise RuntimeError("journal is read-only")

    async def journal(record: Reload) -> None:
        await asyncio.sleep(0)
        seen.append((record.outcome, record.generation))

    watcher.on_reload(broken)
    unsubscribe = watcher.on_reload(journal)
    replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
    await watcher.reload_now()
    replace_in(rules_dir / "accounts.yaml", "capital: 60000", "capital: lots")
    await watcher.reload_now()
    unsubscribe()
    replace_in(rules_dir / "accounts.yaml", "capital: lots", "capital: 65000")
    await watcher.reload_now()
    assert seen == [("applied", 2), ("invalid", 2)]
    assert watcher.generation == 3


async def test_stop_retires_the_live_generation_and_stops_watching(rules_dir: Path, builds: Builds) -> None:
    w = RulesWatcher(rules_dir, build=builds)
    await w.start()
    with w.acquire() as held:
        await w.stop()
        assert not w.watching
        assert not held.engine.closed  # still evaluating
    assert builds.engines[0].closed
    replace_in(rules_dir / "accounts.yaml", "capital: 50000", "capital: 60000")
    await asyncio.sleep(QUIET_S)
    assert len(w.history) == 1 and len(builds.engines) == 1
    with pytest.raises(RuntimeError, match="not started"):
        await w.reload_now()


# -- with the real engine ------------------------------------------------------------------------------------

async def test_real_engine_swap_while_a_decision_holds_the_old_generation(rules_dir: Path) -> None:
    signal = parse_signal({"strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 3})
    now = datetime(2026, 11, 24, 15, 0, tzinfo=timezone.utc)  # a Tuesday, 10:00 in New York

    def order_sizes(gen: Generation) -> dict[str, int]:
        state = EngineState({name: AccountState(True, Decimal(100000), Decimal(0)) for name in gen.ruleset.accounts})
        return {order.account: order.quantity for order in gen.engine.decide(signal, state, now).orders}

    async with RulesWatcher(rules_dir) as watcher:  # the default build: engine.decide.build_engine
        reloads: asyncio.Queue[Reload] = asyncio.Queue()
        watcher.on_reload(reloads.put_nowait)
        with watcher.acquire() as old:
            replace_in(rules_dir / "accounts.yaml", "size_multiplier: 0.5", "size_multiplier: 1")
            assert (await next_reload(reloads)).generation == 2
            with watcher.acquire() as new:
                assert order_sizes(new) == {"apex-1": 3, "apex-2": 3, "topstep-1": 3}
            assert order_sizes(old) == {"apex-1": 3, "apex-2": 2, "topstep-1": 3}  # half size, as it was
        assert old.closed
        if durable_available():  # the pure-Python fallback (Python 3.13+) has nothing to delete on close
            with pytest.raises(EngineError, match="retired"):
                order_sizes(old)


async def test_each_generation_s_decisions_name_its_rules(rules_dir: Path) -> None:
    signal = parse_signal({"strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 3})
    now = datetime(2026, 11, 24, 15, 0, tzinfo=timezone.utc)  # a Tuesday, 10:00 in New York

    def record(gen: Generation) -> dict[str, object]:
        state = EngineState({name: AccountState(True, Decimal(100000), Decimal(0)) for name in gen.ruleset.accounts})
        return gen.engine.decide(signal, state, now).to_json(gen.number)["ruleset"]

    async with RulesWatcher(rules_dir) as watcher:
        with watcher.acquire() as old:
            replace_in(rules_dir / "accounts.yaml", "size_multiplier: 0.5", "size_multiplier: 1")
            assert (await watcher.reload_now()).generation == 2  # applied here or by the watch just before
            with watcher.acquire() as new:
                assert record(new) == {"content_hash": new.ruleset.content_hash, "generation": 2}
            assert record(old) == {"content_hash": old.ruleset.content_hash, "generation": 1}  # as it was
        assert old.ruleset.content_hash != new.ruleset.content_hash
        assert [(r.content_hash, r.generation) for r in watcher.history if r.outcome == "applied"] == [
            (old.ruleset.content_hash, 1), (new.ruleset.content_hash, 2)]
