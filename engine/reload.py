"""Hot reload of the rules directory: apply a fully valid rule set, keep the last good one otherwise.

Behaviour follows Prometheus' config reload: an edit is validated as a *whole set* (``engine.loader.load_rules``);
only a set with no diagnostic at all becomes a new generation, and an invalid edit leaves the live rules running
while its ``file:line:col`` diagnostics are recorded in the reload history for the service to show.

Concurrency model (all swaps happen on the event loop thread):

* ``RulesWatcher.acquire()`` pins the live ``Generation`` for one evaluation. A swap only replaces the pointer, so
  evaluations in flight finish on the rules they started with and the next ones see the new rules.
* The replaced generation is *retired*: its engine is closed as soon as nobody holds it any more (reference
  count), never while an evaluation could still be using it.
* ``RulesWatcher.current`` is the unpinned shortcut for code that reads it and decides in one synchronous step
  (no ``await`` in between): a swap cannot interleave there because it runs on the same loop thread.

Editors rarely write in place: vim writes a ``4913`` probe and ``.x.swp``, others write a temp file and rename it
over the target; deployment tools swap the whole directory, or (Kubernetes ConfigMaps) re-point a ``..data``
symlink. Change events are therefore only a hint that the set *may*
have changed; bursts are debounced, the whole directory is re-read, and a content hash equal to the live one is a
recorded no-op rather than a rebuild.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import stat
import threading
from collections import deque
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator, Literal

from watchfiles import Change, awatch

from engine.loader import LoadResult, load_rules
from engine.model import RuleSet
from engine.yamlsource import RULE_SUFFIXES

logger = logging.getLogger(__name__)

Outcome = Literal["applied", "unchanged", "invalid", "build_failed"]
Trigger = Literal["start", "watch", "manual"]


BuildEngine = Callable[[RuleSet], Any]
"""Makes the engine of one generation; the watcher calls its ``close()`` (if any) when the generation retires."""
ReloadCallback = Callable[["Reload"], "Awaitable[None] | None"]


def build_engine(ruleset: RuleSet) -> Any:
    """The production engine builder (``engine.decide.build_engine``), imported when first needed.

    Imported lazily so that loading and watching rules does not pull in durable-rules' C extension for callers
    (the CLI's ``validate``, tests) that never evaluate anything.
    """
    from engine.decide import build_engine as build  # noqa: PLC0415

    return build(ruleset)


class RulesLoadError(ValueError):
    """The rules directory is invalid at start-up, so there is no last good rule set to fall back on."""

    def __init__(self, rules_dir: Path, errors: Iterable[str]):
        self.errors = tuple(errors)
        listing = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"rules in {rules_dir} are invalid ({len(self.errors)} errors):\n{listing}")


@dataclass(frozen=True)
class Reload:
    """One entry of the reload history (what the service journals and exposes)."""

    time: datetime
    """When the attempt finished (aware UTC)."""
    content_hash: str
    """Hash of the files read by this attempt (``LoadResult.content_hash``); empty only if nothing could be read."""
    ok: bool
    errors: tuple[str, ...]
    """``file:line:col: Kind/name: message`` diagnostics, or the build failure, when not ok."""
    outcome: Outcome
    trigger: Trigger
    generation: int
    """The live generation after this attempt (unchanged by a failed or no-op reload)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time.isoformat(),
            "content_hash": self.content_hash,
            "ok": self.ok,
            "errors": list(self.errors),
            "outcome": self.outcome,
            "trigger": self.trigger,
            "generation": self.generation,
        }


@dataclass(eq=False)
class Generation:
    """One live-or-retired pair of (rule set, engine) with the count of evaluations holding it."""

    number: int
    ruleset: RuleSet
    engine: Any
    loaded_at: datetime
    holders: int = 0
    retired: bool = False
    """Replaced by a newer generation (or the watcher stopped): close once ``holders`` drops to zero."""
    closed: bool = False


def is_rule_change(change: Change, path: str, root: Path) -> bool:
    """Whether a file-system event may change the rule set the loader would read.

    Mirrors ``engine.yamlsource.discover``: hidden entries are never rules, so editor swap/lock files
    (``.x.yaml.swp``, ``.#x.yaml``) and hidden temp files are ignored, as are backups such as ``x.yaml~``.
    A directory appearing or vanishing (a folder of rules moved in or out) may carry rule files, and the root
    itself being deleted must be noticed, so those count too. So does Kubernetes' ``..data`` symlink: a mounted
    ConfigMap's visible files point through it, and an update only renames a new ``..data`` into place.
    """
    p = Path(path)
    if p.name == "..data":
        return True
    try:
        parts = p.relative_to(root).parts
    except ValueError:
        parts = (p.name,)
    if any(part.startswith(".") for part in parts):
        return False
    if p.suffix in RULE_SUFFIXES:
        return True
    if change == Change.deleted:
        return p.suffix == ""  # possibly a directory (we cannot stat what is gone); a no-op reload is cheap
    return p.is_dir()


class RulesWatcher:
    """Watches a rules directory and keeps one live, fully valid generation of rules and its engine.

    Usage (in the service)::

        watcher = RulesWatcher(Path("rules"))
        await watcher.start()             # raises RulesLoadError if the rules are invalid at start-up
        with watcher.acquire() as gen:    # pin the generation for one evaluation
            decision = gen.engine.decide(signal, state, now)
        await watcher.stop()
    """

    def __init__(
        self,
        rules_dir: str | Path,
        build: BuildEngine = build_engine,
        *,
        debounce_s: float = 0.2,
        max_delay_s: float = 0.6,
        history_size: int = 100,
        first_generation: int = 1,
    ):
        """``debounce_s`` is the quiet time awaited after the last change of a burst; ``max_delay_s`` bounds
        the wait under a never-ending stream of writes so that new rules still apply within about a second.
        ``first_generation``: the number the first applied set gets; the service continues from what its journal
        last recorded, so that a number names one rule set for the life of the journal, across restarts (a
        decision record says "generation 3": an auditor must not find two different generations 3)."""
        if first_generation < 1:
            raise ValueError(f"first_generation must be >= 1, not {first_generation}")
        self.rules_dir = Path(rules_dir)
        self._root = self.rules_dir.absolute()  # not resolve(): a re-pointed symlink is a new directory
        self._build = build
        self.debounce_s = debounce_s
        self.max_delay_s = max(max_delay_s, debounce_s)
        self._history: deque[Reload] = deque(maxlen=history_size)
        self._callbacks: list[ReloadCallback] = []
        self._live: Generation | None = None
        self._generation = 0
        self._next_generation = first_generation
        self._lock = threading.Lock()  # holders/retired flags: release() may run on a worker thread
        self._reload_lock = asyncio.Lock()  # one load-validate-swap at a time (watcher and admin trigger)
        self._dirty = asyncio.Event()
        self._first_change = 0.0
        self._last_change = 0.0
        self._stop_event: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False  # between start() and stop(): only then may a generation be built

    # -- reading the live rules -------------------------------------------------------------------------------

    @property
    def current(self) -> tuple[RuleSet, Any]:
        """(ruleset, engine) of the live generation; see the module docstring for when ``acquire`` is needed."""
        live = self._require_live()
        return live.ruleset, live.engine

    @property
    def generation(self) -> int:
        """Number of the live generation: ``first_generation`` after start, +1 on every applied reload; 0 before
        start."""
        return self._generation

    @property
    def history(self) -> list[Reload]:
        """The last ``history_size`` reload attempts, oldest first."""
        return list(self._history)

    @property
    def watching(self) -> bool:
        return any(not t.done() for t in self._tasks)

    @contextmanager
    def acquire(self) -> Iterator[Generation]:
        """Pin the live generation for one evaluation; its engine is not closed before the block exits."""
        with self._lock:
            live = self._require_live()
            live.holders += 1
        try:
            yield live
        finally:
            with self._lock:
                live.holders -= 1
                close = live.retired and live.holders == 0 and not live.closed
                if close:
                    live.closed = True
            if close:
                _close(live)

    def on_reload(self, callback: ReloadCallback) -> Callable[[], None]:
        """Call ``callback(reload)`` after every swap and every failed reload (not after no-ops).

        Callbacks may be coroutines; they run after the swap, so a failing journal or metric never blocks or
        undoes a reload (their exceptions are logged). Returns a function that unsubscribes.
        """
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching, then load the initial generation; raise ``RulesLoadError`` if it is invalid.

        Watching starts first so that an edit made while the initial set is being read is not lost: it shows
        up as a change and triggers a (possibly no-op) reload.
        """
        if self._tasks:
            raise RuntimeError("RulesWatcher already started")
        if not self._root.is_dir():
            raise RulesLoadError(self.rules_dir, [f"{self.rules_dir}:1:1: YAML/file: rules directory not found"])
        self._stop_event = asyncio.Event()
        self._dirty.clear()
        self._running = True
        self._tasks = [
            asyncio.create_task(self._watch_loop(self._stop_event), name="rules-watch"),
            asyncio.create_task(self._reload_loop(), name="rules-reload"),
        ]
        await asyncio.sleep(0)  # let awatch create its notifier (synchronously, on its first step)
        record = await self.reload_now(trigger="start")
        if not record.ok:
            await self.stop()
            raise RulesLoadError(self.rules_dir, record.errors)

    async def stop(self) -> None:
        """Stop watching and retire the live generation (closed once the last evaluation releases it)."""
        self._running = False
        if self._stop_event is not None:
            self._stop_event.set()  # the notifier thread notices within one step and ends awatch cleanly
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            if task.get_name() == "rules-reload":
                task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        async with self._reload_lock:
            with self._lock:
                live, self._live = self._live, None
            if live is not None:
                self._retire(live)

    async def __aenter__(self) -> RulesWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- reloading ----------------------------------------------------------------------------------------------

    async def reload_now(self, trigger: Trigger = "manual") -> Reload:
        """Re-read and validate the whole directory now; swap if valid and different. Returns the record."""
        async with self._reload_lock:
            if not self._running:  # a generation built now would never be retired
                raise RuntimeError("RulesWatcher is not started (or was stopped): nothing to reload")
            # Reading and validating is pure file work: off the loop so webhooks keep flowing meanwhile.
            try:
                result: LoadResult = await asyncio.to_thread(load_rules, [self.rules_dir])
            except Exception as exc:  # noqa: BLE001 - e.g. the tree changing under rglob: retried on next event
                logger.exception("reading %s failed", self.rules_dir)
                reason = f"{self.rules_dir}: cannot read rules: {type(exc).__name__}: {exc}"
                return await self._record("", "invalid", trigger, (reason,))
            if not self._running:
                raise RuntimeError("RulesWatcher was stopped during the reload: nothing applied")
            live = self._live
            if not result.ok or result.ruleset is None:
                errors = tuple(str(d) for d in result.diagnostics) or ("rule set is invalid",)
                return await self._record(result.content_hash, "invalid", trigger, errors)
            if live is not None and result.content_hash == live.ruleset.content_hash:
                return await self._record(result.content_hash, "unchanged", trigger, ())
            try:
                # Built on the loop thread, between evaluations: durable-rules' C core is process-wide state we do
                # not rely on being safe to mutate from a second thread; a build of the example rules takes ~3 ms.
                engine = self._build(result.ruleset)
            except Exception as exc:  # noqa: BLE001 - any build failure must keep the old rules running
                logger.exception("building rules generation %s failed", result.content_hash[:12])
                reason = f"{self.rules_dir}: engine build failed: {type(exc).__name__}: {exc}"
                return await self._record(result.content_hash, "build_failed", trigger, (reason,))
            self._generation = self._next_generation
            self._next_generation += 1
            new = Generation(self._generation, result.ruleset, engine, datetime.now(timezone.utc))
            with self._lock:
                old, self._live = self._live, new
            if old is not None:
                self._retire(old)
            return await self._record(result.content_hash, "applied", trigger, ())

    async def _record(
        self, content_hash: str, outcome: Outcome, trigger: Trigger, errors: tuple[str, ...]
    ) -> Reload:
        ok = outcome in ("applied", "unchanged")
        record = Reload(datetime.now(timezone.utc), content_hash, ok, errors, outcome, trigger, self._generation)
        self._history.append(record)
        if outcome == "applied":
            logger.info("rules generation %d applied (%s, %s)", record.generation, content_hash[:12], trigger)
        elif not ok:
            logger.warning("rules reload rejected (%s), generation %d stays live:\n%s",
                           outcome, record.generation, "\n".join(errors))
        if outcome != "unchanged":
            await self._notify(record)
        return record

    async def _notify(self, record: Reload) -> None:
        for callback in list(self._callbacks):
            try:
                result = callback(record)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - a broken listener must not undo or block a reload
                logger.exception("reload listener %r failed", callback)

    def _retire(self, gen: Generation) -> None:
        with self._lock:
            gen.retired = True
            close = gen.holders == 0 and not gen.closed
            if close:
                gen.closed = True
        if close:
            _close(gen)

    def _require_live(self) -> Generation:
        live = self._live
        if live is None:
            raise RuntimeError("no live rules generation: RulesWatcher is not started (or was stopped)")
        return live

    # -- watching -----------------------------------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        now = asyncio.get_running_loop().time()
        if not self._dirty.is_set():
            self._first_change = now
            self._dirty.set()
        self._last_change = now

    async def _watch_loop(self, stop_event: asyncio.Event) -> None:
        """Feed change hints to the reload loop until stopped, re-watching the directory whenever it is replaced.

        An OS watch follows the directory's inode: after ``rm -r rules && cp -r new rules`` or a ``mv`` swap it
        would silently watch nothing (or the old copy). So the identity of the directory is re-checked after every
        batch and at least once a second, and the watch is re-established (with a reload check) when it changed.
        """

        def relevant(change: Change, path: str) -> bool:
            return is_rule_change(change, path, self._root)

        first = True
        while not stop_event.is_set():
            watched = _identity(self._root)
            if watched is None:  # gone: wait for it to come back (a reload already recorded the failure)
                await _wait(stop_event, 0.5)
                continue
            if not first:
                self._mark_dirty()  # changes may have been missed while not watching
            first = False
            try:
                async with aclosing(awatch(
                    self._root,
                    watch_filter=relevant,
                    stop_event=stop_event,
                    step=50,  # ms of quiet before the notifier hands over a batch; our debounce comes on top
                    debounce=int(self.debounce_s * 1000),
                    rust_timeout=1000,
                    yield_on_timeout=True,  # an empty batch each second: time to re-check the directory
                )) as batches:
                    async for changes in batches:
                        if changes:
                            self._mark_dirty()
                        if _identity(self._root) != watched:
                            logger.warning("rules directory %s was replaced or removed; re-watching", self.rules_dir)
                            break
            except Exception:  # noqa: BLE001 - the notifier failed: retry rather than silently stop watching
                logger.exception("watching %s failed; retrying in 1 s", self.rules_dir)
                await _wait(stop_event, 1.0)

    async def _reload_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            while True:
                wake = min(self._last_change + self.debounce_s, self._first_change + self.max_delay_s)
                if loop.time() >= wake:
                    break
                await asyncio.sleep(wake - loop.time())
            self._dirty.clear()  # changes from here on trigger another pass after this one
            try:
                await self.reload_now(trigger="watch")
            except Exception:  # noqa: BLE001 - keep watching; the live rules are untouched
                logger.exception("reloading %s failed unexpectedly", self.rules_dir)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass


def _close(gen: Generation) -> None:
    close = getattr(gen.engine, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:  # noqa: BLE001 - a retired engine failing to close must not affect the live one
        logger.exception("closing rules generation %d failed", gen.number)
