"""The journal: one SQLite file (``data_dir/journal.db``) holding everything the service has promised or observed.

The rule it exists for: **a signal acknowledged to its sender is already on disk.** Writes are grouped (group
commit): every write issued in one turn of the event loop, or while the previous COMMIT is running, joins one
transaction, and every caller's future resolves only after the COMMIT that holds its write returned. So a burst of
webhooks shares one fsync instead of paying one each, and ``await journal.record_signal(...)`` returning means the
row survives ``kill -9`` and, with ``synchronous=FULL`` in WAL mode, power loss. A write that fails (disk full,
read-only file, database closed) raises ``JournalError`` to its caller and to nobody else: each write runs inside
its own SAVEPOINT, so one bad row never sinks its batch.

Where the work runs, and why: the statements of a batch run on the event loop (tens of microseconds each), and only
the COMMIT, which waits for the disk, runs on a committer thread while the loop serves other requests. Running the
statements on a writer thread instead looked cheaper but was not: every SQLite step releases and retakes the GIL,
and while the loop is busy each retake waits for it, so a batch of ten signals with their orders waited ~10 ms for
its own statements and the service's throughput was bound by that (benchmarks/README.md).

Checkpoints (copying the WAL back into the database file) run on a thread of their own with a connection of their
own, a few times a second while there are new commits, never inside a COMMIT: SQLite's automatic checkpoint runs in
the COMMIT that fills the WAL past 1,000 pages, which made one commit in ~150 take 5 ms (the database file's fsync)
and every answer waiting for it too. A checkpoint does not block the writer; once it has copied everything, the next
transaction starts the WAL over from its beginning, so the file stays small. "Everything" is the catch: a
checkpoint copies the frames there were when it began, and under a steady stream of commits new ones always arrive
meanwhile, so the WAL was never started over. It grew without bound (700 MB in a benchmark run), and a commit that
appends to a growing file costs about twice one that overwrites the WAL in place (0.40 against 0.25 ms p50 on the
reference disk). So once the WAL holds 16 MiB, a round copies beside the writer until little is left (at most
four passes, each taking what came during the one before), then copies that rest on the committer thread, between
two commits, where no new frame can arrive: a 1-2 ms pause of the writer (~5 ms under heavy load) once per 16 MiB
of commits, against ~0.15 ms saved on every commit.

Reads are synchronous and run on the caller's thread over a per-thread read connection; WAL lets them proceed while
the writer commits, and they only ever see committed rows.

Tables (created and migrated by ``MIGRATIONS``, ordered and transactional, tracked in ``schema_version``)::

    signals            id, received_at, remote, status, reason, key, strategy, raw, signal, decision
    orders             client_order_id, signal_id, account, broker, contract, side, quantity, intent, status,
                       strategy (only when not the signal's: a flatten's exits), ...
    order_events       the status history of every order, with UTC times
    fills              (broker, fill_id) unique: a fill reported twice is recorded once; ``kind`` ``adopted``: a
                       position change reconciliation adopted with no fill to show for it
    position_snapshots, reconciliations, reloads, risk_events   time-stamped rows with their full record as JSON

Times are stored as UTC ISO-8601 strings ending in ``Z`` (fixed width, so they sort as text); money as ``Decimal``
strings. Secrets never reach this module: the webhook strips them before calling ``record_signal``.

Signal statuses: ``accepted`` (the decision has orders), ``decided`` (a valid signal whose decision has no
orders), ``duplicate`` (a repeat, answered with the original), ``rejected`` (a 4xx). Order statuses follow the one
state machine the runtime enforces (``ORDER_STATUSES``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import sqlite_utils

from service.ledger import ADOPTED

logger = logging.getLogger(__name__)

ORDER_STATUSES = ("new", "sending", "acknowledged", "partially_filled", "filled", "rejected", "cancelled",
                  "unknown", "missed")
FINAL_ORDER_STATUSES = frozenset({"filled", "rejected", "cancelled", "missed"})
"""No further broker event can change these; every other status means the order may still be in flight."""
SIGNAL_STATUSES = ("accepted", "decided", "duplicate", "rejected")

KEY_INDEX_MAX = 500_000
"""Idempotency keys kept in memory at most (~100 bytes each); past it, lookups read the database."""

CHECKPOINT_EVERY_S = 0.2
"""How often the checkpointer looks for new commits to copy into the database file."""
RESTART_AT_FRAMES = 4096
"""A WAL this long (16 MiB) is started over at the next round: not every round, because the pass in step with the
writer pauses it 1-2 ms, and the file needs only to stop growing (a WAL started over is overwritten in place)."""
TAIL_FRAMES = 64
"""A pass beside the writer that found at most this many new frames leaves the rest to the pass in step with it."""

MAX_BATCH = 256
"""Writes committed together at most: bounds how long one batch's statements hold the event loop (~90 us per signal
with 10 orders, ~10 us per order status) and the latency a large burst adds to its first caller."""


class JournalError(RuntimeError):
    """A journal write did not reach the disk (or the journal is not running): nothing may be acknowledged."""


class JournalConflict(JournalError):
    """The write collides with a row already journaled (a signal id or client order id used twice)."""


# -- values ---------------------------------------------------------------------------------------------------------


def utc_iso(at: datetime | None = None) -> str:
    """``2026-03-09T14:30:00.000000Z``: fixed width so that text order is time order. Naive times are refused.

    Formatted field by field rather than with ``strftime``, which cost a fifth of every order transition's work
    (every order status and fill row carries a time); the text is the same."""
    if at is None:
        at = datetime.now(timezone.utc)
    elif at.tzinfo is not timezone.utc:
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"naive datetime {at.isoformat()} given to the journal; use an aware UTC time")
        at = at.astimezone(timezone.utc)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (at.year, at.month, at.day, at.hour, at.minute, at.second,
                                                   at.microsecond)


def parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def _stands(column: str = "signal") -> str:
    """SQL: the journaled signal body in ``column`` says where its strategy's position stands (a target, or an
    exit: flat)."""
    return f"(json_extract({column}, '$.position') IS NOT NULL OR json_extract({column}, '$.action') = 'exit')"


def new_signal_id(at: datetime | None = None) -> str:
    """A journal-unique signal id, time-ordered: ``s-20260309T143000123456-9f2c4b1a``.

    Client order ids derive from it (``engine.decision.client_order_id``), so it must never repeat: the sender's
    own ``id`` only serves as the idempotency key, because a sender may reuse it after the window.
    """
    stamp = utc_iso(at).replace("-", "").replace(":", "").replace(".", "")[:-1]
    return f"s-{stamp}-{secrets.token_hex(4)}"


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return utc_iso(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    to_json = getattr(value, "to_json", None) or getattr(value, "as_dict", None)
    if callable(to_json):
        return to_json()
    raise TypeError(f"cannot store {type(value).__name__} in the journal")


_encode = json.JSONEncoder(default=_default, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
"""One encoder for every call (``json.dumps`` with options builds a new one each time)."""


def dumps(value: Any) -> str:
    """JSON as the journal stores it: Decimal as strings, times as UTC ``Z`` strings, keys sorted."""
    return _encode(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        raise TypeError(f"money value {value!r} is a float; convert with Decimal(str(x)) at the broker edge")
    return str(value)


def _wall_clock() -> datetime:
    return datetime.now(timezone.utc)


def _at(value: Any) -> str:
    """A time given as an aware datetime or an ISO-8601 string with an offset, as the journal stores it."""
    if value is None:
        return utc_iso()
    if isinstance(value, datetime):
        return utc_iso(value)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError(f"time {value!r} has no UTC offset")
        return utc_iso(parsed)
    raise TypeError(f"expected a UTC datetime, got {type(value).__name__}")


# -- schema ---------------------------------------------------------------------------------------------------------

Migration = Callable[[sqlite_utils.Database], None]


def _m1_initial(db: sqlite_utils.Database) -> None:
    db.table("signals").create({
        "id": str, "received_at": str, "remote": str, "status": str, "reason": str, "key": str,
        "strategy": str, "raw": str, "signal": str, "decision": str,
    }, pk="id", not_null={"received_at", "status"})
    db.table("signals").create_index(["key", "received_at"], index_name="signals_key")
    db.table("signals").create_index(["status", "received_at"], index_name="signals_status")
    db.table("orders").create({
        "client_order_id": str, "signal_id": str, "seq": int, "account": str, "broker": str, "contract": str,
        "side": str, "quantity": int, "intent": str, "order_type": str, "price": str, "margin_usd": str,
        "status": str, "broker_order_id": str, "detail": str, "created_at": str, "updated_at": str,
    }, pk="client_order_id", not_null={"signal_id", "status", "created_at", "updated_at"},
        foreign_keys=[("signal_id", "signals", "id")])
    db.table("orders").create_index(["signal_id", "seq"], index_name="orders_signal")
    db.table("orders").create_index(["status"], index_name="orders_status")
    db.table("order_events").create({
        "id": int, "client_order_id": str, "status": str, "at": str, "broker_order_id": str, "detail": str,
    }, pk="id", not_null={"client_order_id", "status", "at"})
    db.table("order_events").create_index(["client_order_id", "id"], index_name="order_events_order")
    db.table("fills").create({
        "broker": str, "fill_id": str, "account": str, "contract": str, "side": str, "quantity": int,
        "price": str, "commission": str, "at": str, "client_order_id": str, "broker_order_id": str,
        "strategy": str, "recorded_at": str, "data": str,
    }, pk=("broker", "fill_id"), not_null={"recorded_at"})
    db.table("fills").create_index(["account", "at"], index_name="fills_account")
    db.table("fills").create_index(["at"], index_name="fills_at")
    for table, extra in (("position_snapshots", {"broker": str, "account": str}),
                         ("reconciliations", {"broker": str, "account": str, "ok": int}),
                         ("reloads", {"generation": int, "ok": int, "outcome": str}),
                         ("risk_events", {"scope": str, "name": str, "kind": str})):
        db.table(table).create({"id": int, "at": str, **extra, "data": str}, pk="id", not_null={"at", "data"})
        db.table(table).create_index(["at"], index_name=f"{table}_at")


def _m2_daily_marks(db: sqlite_utils.Database) -> None:
    # One row per account per CME trading day, all taken at the same instant (17:00 ET, the end of the trading
    # day), so that equity curves and daily statements compare like with like across brokers.
    db.table("daily_marks").create({
        "trading_day": str, "account": str, "at": str, "broker": str, "cash": str, "equity": str,
        "realized": str, "unrealized": str, "commissions": str, "margin_used": str, "marks": str, "data": str,
    }, pk=("trading_day", "account"), not_null={"at"})
    db.table("daily_marks").create_index(["at"], index_name="daily_marks_at")


def _m3_order_strategy(db: sqlite_utils.Database) -> None:
    # The strategy an order trades for, when it is not its signal's: a flatten's exits close the positions of
    # several strategies at once, and a restart must book their fills back to those strategies (NULL: the signal's).
    db.execute("ALTER TABLE orders ADD COLUMN strategy TEXT")


def _m4_fill_kind(db: sqlite_utils.Database) -> None:
    # What a fills row is: NULL, a fill the broker reported; ``adopted``, a position change reconciliation adopted
    # from the broker with no fill to show for it (a trade made by hand that the broker reports as a position only).
    # Kept with the fills so that a restart books both back in the order they were booked (``Ledger._book_manual``
    # nets a trade by hand against what the strategies held when it was booked).
    db.execute("ALTER TABLE fills ADD COLUMN kind TEXT")


MIGRATIONS: Sequence[tuple[str, Migration]] = (
    ("initial", _m1_initial),
    ("daily_marks", _m2_daily_marks),
    ("order_strategy", _m3_order_strategy),
    ("fill_kind", _m4_fill_kind),
)
"""Append only: version N is ``MIGRATIONS[N-1]``; each runs in its own transaction with its ``schema_version`` row."""


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the schema to the latest version, one transaction per migration; returns the version reached."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                 "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
    current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
    if current > len(MIGRATIONS):
        raise JournalError(f"journal schema version {current} is newer than this program knows "
                           f"({len(MIGRATIONS)}); upgrade multibroker")
    for version in range(current + 1, len(MIGRATIONS) + 1):
        name, step = MIGRATIONS[version - 1]
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            conn.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                         (version, name, utc_iso()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        logger.info("journal schema migrated to version %d (%s)", version, name)
    return len(MIGRATIONS)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a COMMIT returns only after the WAL is fsynced, so "acknowledged" survives power loss, not just
    # kill -9 (NORMAL would be enough for the latter). Group commit keeps the fsync count per batch, not per row.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it, outside any COMMIT
    # 64 MiB of page cache instead of 2: the indexes every order transition updates stay in memory (a transition's
    # statements measured 9.0 -> 7.8 us).
    conn.execute("PRAGMA cache_size=-65536")
    return conn


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Copy what the WAL holds into the database file (PASSIVE: never waits for the writer or a reader); returns
    SQLite's (busy, frames in the WAL when it began, frames copied). On the checkpointer thread beside the writer,
    or on the committer thread in step with it (``Journal._checkpoints``)."""
    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(row[0]), int(row[1]), int(row[2])


# -- the journal ----------------------------------------------------------------------------------------------------

class _Write:
    __slots__ = ("fn", "future", "bare")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any], bare: bool = False):
        self.fn = fn
        self.future = future
        self.bare = bare
        """Run alone, outside any transaction (PRAGMAs such as ``query_only`` that a transaction would block)."""


class Journal:
    """See the module docstring. ``await start()`` before use and ``await close()`` after, on one event loop; one
    per data directory (a lock file refuses a second process on the same journal)."""

    def __init__(self, path: str | Path, *, key_horizon_s: float = 24 * 3600,
                 clock: Callable[[], datetime] | None = None) -> None:
        """``key_horizon_s``: the longest idempotency window the caller will ask ``find_by_key`` about; the keys of
        that much history are kept in memory (``find_by_key``). ``clock``: what a row written without a time of
        its own is stamped with (an order's status change, a fill's arrival); the service gives the journal its
        one clock, so that every row of a replay or of a test with a moved clock lines up with the signals and
        decisions it belongs to."""
        self.path = Path(path)
        self.clock: Callable[[], datetime] = clock or _wall_clock
        self.key_horizon_s = key_horizon_s
        self._keys: dict[str, str] = {}
        """Idempotency key -> received_at of the first accepted or decided signal under it (``find_by_key``)."""
        self._keys_floor: str | None = None
        """Every accepted or decided signal received at or after this time has its key in ``_keys``; None: unknown
        (the index is off and every lookup reads the database)."""
        self._conn: sqlite3.Connection | None = None
        """The writer connection: used by the event loop between commits and by the committer thread during one."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._committer: ThreadPoolExecutor | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self.checkpoints = 0
        self._pending: deque[_Write] = deque()
        self._flush_scheduled = False
        self._busy = False
        """A COMMIT (or a bare statement) is running on the committer thread: the loop keeps off the connection."""
        self._quiet: list[asyncio.Future[None]] = []
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._running = False
        self.schema_version = 0
        self.batches = 0
        """Commits so far (with ``writes``: how well group commit is batching)."""
        self.writes = 0
        self._superseded: dict[str, dict[str, str]] = {}
        """Signal id -> {client order id: detail} of orders a flatten superseded before the signal was written
        (``supersede``): its own write journals them ``missed``."""
        self._exit_watch_rows: dict[str, list[dict[str, Any]]] = {}
        """Signal id -> the exit watches its decision made before it was written (``watch_exit``): its own write
        journals them in its body (``exit_watch``)."""

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (creating and migrating) the database and start the committer thread."""
        if self._running:
            raise RuntimeError("journal already started")
        await asyncio.to_thread(self._open)
        self._loop = asyncio.get_running_loop()
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-commit")
        self._running = True
        self._checkpointer = self._loop.create_task(self._checkpoints(), name="journal-checkpoints")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"{self.path} is in use by another multibroker process (lock {lock_path})") from None
        self._lock_fd = fd
        try:
            conn = _connect(self.path)
            self.schema_version = migrate(sqlite_utils.Database(conn))
        except BaseException:
            self._release_lock()
            raise
        self._conn = conn
        self._load_keys(conn)

    def _load_keys(self, conn: sqlite3.Connection) -> None:
        floor = utc_iso(self.clock() - timedelta(seconds=self.key_horizon_s))
        rows = conn.execute(
            "SELECT key, MIN(received_at) FROM signals WHERE key IS NOT NULL AND status IN ('accepted', 'decided') "
            "AND received_at >= ? GROUP BY key LIMIT ?", (floor, KEY_INDEX_MAX + 1)).fetchall()
        if len(rows) > KEY_INDEX_MAX:
            logger.warning("more than %d idempotency keys in the last %g s: looked up in the database instead",
                           KEY_INDEX_MAX, self.key_horizon_s)
            self._keys, self._keys_floor = {}, None
            return
        self._keys = {key: at for key, at in rows}
        self._keys_floor = floor

    def _remember_key(self, key: str, received_at: str) -> None:
        """After the COMMIT that holds an accepted or decided signal: its key is known from now on."""
        if self._keys_floor is None or key in self._keys:
            return
        self._keys[key] = received_at
        if len(self._keys) > KEY_INDEX_MAX:
            # Forget what no lookup can ask about any more; everything received since the new floor is still in.
            floor = utc_iso(self.clock() - timedelta(seconds=self.key_horizon_s))
            self._keys = {k: at for k, at in self._keys.items() if at >= floor}
            self._keys_floor = max(self._keys_floor, floor)
            if len(self._keys) > KEY_INDEX_MAX:
                logger.warning("more than %d idempotency keys in the last %g s: looked up in the database instead",
                               KEY_INDEX_MAX, self.key_horizon_s)
                self._keys, self._keys_floor = {}, None

    async def close(self) -> None:
        """Commit what is queued, stop the committer, close every connection. Later writes raise JournalError."""
        if not self._running:
            return
        self._running = False
        while self._pending or self._busy or self._flush_scheduled:
            assert self._loop is not None
            waiter = self._loop.create_future()
            self._quiet.append(waiter)
            await waiter
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None and checkpointer.get_loop() is asyncio.get_running_loop():
            checkpointer.cancel()  # (a journal closed from another loop than its own: that loop has ended)
            await asyncio.gather(checkpointer, return_exceptions=True)
        await self._close_connections()

    async def _close_connections(self) -> None:
        if self._committer is not None:
            await asyncio.to_thread(self._committer.shutdown)
            self._committer = None
        if self._conn is not None:
            if self._conn.in_transaction:
                self._conn.rollback()  # only after ``die``: ``close`` waits until nothing is left to commit
            self._conn.close()
            self._conn = None
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._local = threading.local()
        self._release_lock()

    # -- kill -9, in process (crash tests) ----------------------------------------------------------------------
    def die(self) -> int:
        """Stop the way ``kill -9`` stops the process, for tests that crash a service inside the test process.

        Synchronous, so that no other task runs in between, and callable from inside any hook. From now on every
        write raises (a dead process writes nothing); the writes queued and not yet run are dropped, and their
        callers never hear back (a dead process answers nobody); a COMMIT already on the committer thread still
        lands (the kill came after its fsync), and its callers are told as usual. Returns how many writes were
        dropped. ``bury`` then frees the file for the restart."""
        self._running = False
        lost = len(self._pending)
        self._pending.clear()
        return lost

    async def bury(self, timeout_s: float = 5.0) -> None:
        """After ``die``: wait (at most ``timeout_s``) for the COMMIT that was under way, stop the checkpointer,
        and close every connection without committing anything, releasing the lock file, so that a new
        ``Journal`` on the same file can start (the restarted process)."""
        if self._running:
            raise JournalError("bury() is for a journal that died (die()); close() stops a live one")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._busy:
            if loop.time() > deadline:
                raise JournalError(f"the COMMIT under way at the kill did not end within {timeout_s:g} s")
            await asyncio.sleep(0.001)
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.cancel()
            await asyncio.gather(checkpointer, return_exceptions=True)
        await self._close_connections()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def __aenter__(self) -> Journal:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def running(self) -> bool:
        return self._running

    async def _checkpoints(self) -> None:
        """Copy the WAL into the database file a few times a second while there are new commits (module docstring).

        A failed checkpoint is logged and tried again later: it loses nothing (the WAL holds every commit), it only
        lets the WAL grow. The connection is closed when the journal closes; SQLite then checkpoints what is left.
        The last pass runs as a bare write, in step with the writer, so that the WAL can start over (module
        docstring).
        """
        conn = await asyncio.to_thread(_connect, self.path)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-checkpoint")
        loop = asyncio.get_running_loop()
        seen = self.batches
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_EVERY_S)
                if self.batches == seen:
                    continue
                seen = self.batches
                try:
                    await self._checkpoint_round(lambda: loop.run_in_executor(pool, _checkpoint, conn))
                except (sqlite3.Error, JournalError) as exc:
                    logger.warning("journal checkpoint failed (retried later; the WAL keeps every commit): %s", exc)
        finally:
            pool.shutdown(wait=True)
            conn.close()

    async def _checkpoint_round(self, beside: Callable[[], Awaitable[tuple[int, int, int]]]) -> None:
        """One checkpoint beside the writer (``beside``); past ``RESTART_AT_FRAMES``, more passes until one finds
        little new, and the rest copied in step with the writer, so that the next transaction starts the WAL over."""
        seen = self.batches
        _busy, frames, copied = await beside()
        self.checkpoints += 1
        if frames < RESTART_AT_FRAMES:
            return
        for _ in range(3):
            if self.batches == seen:
                break
            seen, before = self.batches, frames
            _busy, frames, copied = await beside()
            if frames - before <= TAIL_FRAMES:
                break
        if (frames > copied or self.batches != seen) and self._running:
            await self._write(_checkpoint, bare=True)

    # -- the writer -------------------------------------------------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], Any], *, bare: bool = False) -> Any:
        """Run ``fn(conn)`` in the next batch; return its result once the batch is committed."""
        return await self._enqueue(fn, bare)

    def _enqueue(self, fn: Callable[[sqlite3.Connection], Any], bare: bool = False) -> asyncio.Future[Any]:
        """``_write`` without the coroutine: queued now, its future resolves after its COMMIT (``order_status``)."""
        if not self._running:
            raise JournalError("the journal is not running")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise JournalError("the journal is written from an event loop other than the one that started it")
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Write(fn, future, bare))
        self._schedule_flush()
        return future

    def _schedule_flush(self) -> None:
        # call_soon, not now: every write issued in this turn of the loop joins the same transaction.
        if not self._flush_scheduled and not self._busy:
            assert self._loop is not None
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Run the queued writes in one transaction on the loop, then hand its COMMIT to the committer thread."""
        self._flush_scheduled = False
        conn = self._conn
        if self._busy or not self._pending or conn is None:
            self._wake_quiet()
            return
        if self._pending[0].bare:
            write = self._pending.popleft()
            self._in_thread(write.fn, lambda result, error: self._bare_done(write, result, error))
            return
        batch: list[_Write] = []
        while self._pending and not self._pending[0].bare and len(batch) < MAX_BATCH:
            batch.append(self._pending.popleft())
        results = self._execute(conn, batch)
        if results is None:  # BEGIN failed or SQLite rolled the transaction back: the batch has its error
            self._schedule_flush()
        elif not conn.in_transaction:  # a lone write failed and was rolled back: nothing to commit
            self._settle_all(results)
            self._schedule_flush()
        else:
            self._in_thread(_commit, lambda _none, error: self._committed(batch, results, error))

    def _in_thread(self, fn: Callable[[sqlite3.Connection], Any],
                   done: Callable[[Any, BaseException | None], None]) -> None:
        assert self._loop is not None and self._committer is not None and self._conn is not None
        self._busy = True
        future = self._loop.run_in_executor(self._committer, fn, self._conn)

        def finished(f: asyncio.Future[Any]) -> None:
            self._busy = False
            error = f.exception()
            done(None if error is not None else f.result(), error)
            self._schedule_flush()

        future.add_done_callback(finished)

    def _execute(self, conn: sqlite3.Connection,
                 batch: list[_Write]) -> list[tuple[_Write, Any, BaseException | None]] | None:
        """BEGIN and every write of ``batch`` (each in its own SAVEPOINT, so one bad row never sinks the rest).

        Runs on the event loop: the statements are short, and running them here rather than on a thread saves a
        GIL hand-over per statement, which is what made a busy service wait milliseconds for its own commits.
        """
        if len(batch) > 1:
            fast = self._execute_plain(conn, batch)
            if fast is not None:
                return fast
        results: list[tuple[_Write, Any, BaseException | None]] = []
        alone = len(batch) == 1  # alone in its transaction: no savepoint needed, a failure rolls back only itself
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in batch:
                if not alone:
                    conn.execute("SAVEPOINT w")
                try:
                    result = write.fn(conn)
                except Exception as exc:  # noqa: BLE001 - the error goes to that caller, the batch goes on
                    if not conn.in_transaction:
                        raise  # SQLite rolled the whole transaction back (disk full, I/O error): batch lost
                    conn.execute("ROLLBACK" if alone else "ROLLBACK TO w")
                    if not alone:
                        conn.execute("RELEASE w")
                    results.append((write, None, exc))
                else:
                    if not alone:
                        conn.execute("RELEASE w")
                    results.append((write, result, None))
        except Exception as exc:  # noqa: BLE001 - nothing of the batch will reach the disk
            self._failed(conn, batch, exc)
            return None
        return results

    def _execute_plain(self, conn: sqlite3.Connection,
                       batch: list[_Write]) -> list[tuple[_Write, Any, BaseException | None]] | None:
        """The batch without a savepoint per write, or None (rolled back) if any write failed.

        A write almost never fails, and a savepoint around each costs two statements (a busy runtime journals ~30
        writes per signal). Writes are functions of the connection only, so after a failure the caller runs the
        whole batch again, each write in its savepoint, and the failure goes to its own caller alone. The order
        transitions of the batch are merged (``_run_merged``): one statement per table for all of them.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = _run_merged(conn, batch)
        except Exception:  # noqa: BLE001 - retried write by write, where each error finds its caller
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the retry's BEGIN meets the same trouble and fails the batch with its error
            return None
        return results

    def _committed(self, batch: list[_Write], results: list[tuple[_Write, Any, BaseException | None]],
                   error: BaseException | None) -> None:
        if error is not None:
            assert self._conn is not None
            self._failed(self._conn, batch, error)
            return
        self._settle_all(results)

    def _failed(self, conn: sqlite3.Connection, batch: list[_Write], exc: BaseException) -> None:
        logger.error("journal commit of %d writes failed: %s", len(batch), exc)
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        error = JournalError(f"journal write failed ({self.path}): {exc}")
        for write in batch:
            _settle(write.future, None, error)

    def _settle_all(self, results: list[tuple[_Write, Any, BaseException | None]]) -> None:
        self.batches += 1
        self.writes += len(results)
        for write, result, error in results:
            if error is None:
                _settle(write.future, result, None)
            else:
                if isinstance(error, (JournalError, KeyError, ValueError, TypeError)):
                    wrapped = error
                elif isinstance(error, sqlite3.IntegrityError):
                    wrapped = JournalConflict(f"journal write refused ({self.path}): {error}")
                else:
                    wrapped = JournalError(f"journal write failed ({self.path}): {error}")
                _settle(write.future, None, wrapped)

    def _bare_done(self, write: _Write, result: Any, error: BaseException | None) -> None:
        if error is None:
            _settle(write.future, result, None)
        else:
            _settle(write.future, None, JournalError(f"journal statement failed ({self.path}): {error}"))

    def _wake_quiet(self) -> None:
        if not self._pending and not self._busy and not self._flush_scheduled:
            waiters, self._quiet = self._quiet, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


    # -- the reader -------------------------------------------------------------------------------------------

    def _reader(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            if not self._running:
                raise JournalError("the journal is not running")
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False, timeout=5.0)
            with self._readers_lock:
                self._readers.append(conn)
            db = sqlite_utils.Database(conn)
            self._local.db = db
        return db

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return list(self._reader().query(sql, params))

    # -- signals ----------------------------------------------------------------------------------------------

    async def record_signal(self, *, raw: bytes | str | None, remote: str | None, status: str, reason: str | None,
                            key: str | None, signal: Mapping[str, Any] | None,
                            decision: Mapping[str, Any] | str | None,
                            orders: Iterable[Mapping[str, Any]] = (), signal_id: str | None = None,
                            at: datetime | None = None,
                            missed: Sequence[tuple[str, Sequence[Mapping[str, Any]], str]] = ()) -> str:
        """Journal one signal with its decision and its orders (status ``new``) in one transaction.

        Returns the signal id (``signal_id`` when given, as the webhook does so that client order ids derive from
        it, otherwise a new one) once the transaction is committed. ``raw`` must already be free of secrets.
        ``decision`` may come already serialized (JSON text), when the caller needs the text too; its orders then
        carry their own ``order_type`` and ``price``.

        ``missed``: (signal id, orders, detail) of other signals' orders that never leave, journaled ``missed`` in
        the same transaction exactly as ``record_orders`` does: a flatten and the held orders it superseded reach
        the disk together or not at all. An order of this signal that a flatten declared superseded before this
        write (``supersede``) is written ``missed`` instead of ``new``. The exit watches declared for this signal
        (``watch_exit``) are written in its body, in the same transaction.
        """
        if status not in SIGNAL_STATUSES:
            raise ValueError(f"signal status {status!r} is not one of {', '.join(SIGNAL_STATUSES)}")
        sid = signal_id or new_signal_id(at)
        when = utc_iso(at or self.clock())
        raw_text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        strategy = (signal or {}).get("strategy") if signal else None
        watched = self._exit_watch_rows.pop(sid, None) if self._exit_watch_rows else None
        if watched:
            signal = {**(signal or {}), "exit_watch": watched}
        decision_text = decision if decision is None or isinstance(decision, str) else dumps(decision)
        common = decision if isinstance(decision, Mapping) else {}
        signal_row = (sid, when, remote, status, reason, key, strategy, raw_text,
                      None if signal is None else dumps(signal), decision_text)
        order_rows = []
        event_rows = []
        for seq, order in enumerate(orders):
            coid = order["client_order_id"]
            order_rows.append((
                coid, sid, seq, order["account"], order["broker"], order["contract"], order["side"],
                int(order["quantity"]), order.get("intent"), order.get("order_type") or common.get("order_type"),
                _text(order.get("price", common.get("price"))),
                _text(order.get("margin_usd")), "new", when, when, order.get("strategy")))
            event_rows.append((coid, "new", when))
        others = [(other, _final_rows(rows, detail), when) for other, rows, detail in missed]

        def write(conn: sqlite3.Connection) -> str:
            for other, rows, stamp in others:
                _write_final(conn, other, rows, "missed", stamp)
            conn.execute("INSERT INTO signals (id, received_at, remote, status, reason, key, strategy, raw, signal, "
                         "decision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", signal_row)
            if order_rows:
                conn.executemany(
                    "INSERT INTO orders (client_order_id, signal_id, seq, account, broker, contract, side, quantity, "
                    "intent, order_type, price, margin_usd, status, created_at, updated_at, strategy) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", order_rows)
                conn.executemany("INSERT INTO order_events (client_order_id, status, at) VALUES (?, ?, ?)",
                                 event_rows)
                # Read when the write runs, not when it was queued: a flatten may supersede these orders meanwhile.
                voided = self._superseded.get(sid)
                if voided:
                    for coid, text in voided.items():
                        if conn.execute("UPDATE orders SET status = 'missed', detail = ?, updated_at = ? "
                                        "WHERE client_order_id = ? AND signal_id = ? AND status = 'new'",
                                        (text, when, coid, sid)).rowcount:
                            conn.execute("INSERT INTO order_events (client_order_id, status, at, detail) "
                                         "VALUES (?, 'missed', ?, ?)", (coid, when, text))
            return sid

        try:
            result: str = await self._write(write)
        finally:
            self._superseded.pop(sid, None)  # written (its orders are final now) or not acknowledged: done either way
        if key is not None and status in ("accepted", "decided"):
            self._remember_key(key, when)
        return result

    def find_by_key(self, key: str, since: datetime) -> dict[str, Any] | None:
        """The first signal journaled under ``key`` since ``since`` that counted (accepted or decided), or None.

        Every signal pays this lookup and almost every one misses: the keys of the last ``key_horizon_s`` are kept
        in memory (loaded at start, added after each commit), so a miss reads no database; a hit, or a question
        older than what memory covers, reads the database (only the matching id through a plain cursor, then the
        row).
        """
        since_text = utc_iso(since)
        floor = self._keys_floor
        if floor is not None and since_text >= floor and key not in self._keys:
            return None
        conn = self._reader().conn
        found = conn.execute(
            "SELECT id FROM signals WHERE key = ? AND received_at >= ? AND status IN ('accepted', 'decided') "
            "ORDER BY received_at LIMIT 1", (key, since_text)).fetchone()
        if found is None:
            return None
        rows = self._query("SELECT * FROM signals WHERE id = ?", (found[0],))
        return _signal(rows[0]) if rows else None

    def get_signal(self, signal_id: str) -> dict[str, Any] | None:
        """The signal with its decision record and its orders (each with its status history)."""
        rows = self._query("SELECT * FROM signals WHERE id = ?", (signal_id,))
        if not rows:
            return None
        out = _signal(rows[0])
        out["orders"] = self.orders(signal_id=signal_id, history=True)
        return out

    def recent_signals(self, limit: int = 100, *, status: str | None = None) -> list[dict[str, Any]]:
        # Newest first; signals received at the same instant (a clock that stands still in a replay) in the order
        # they were written.
        if status is None:
            rows = self._query("SELECT * FROM signals ORDER BY received_at DESC, rowid DESC LIMIT ?", (limit,))
        else:
            rows = self._query("SELECT * FROM signals WHERE status = ? ORDER BY received_at DESC, rowid DESC "
                               "LIMIT ?", (status, limit))
        return [_signal(r) for r in rows]

    def pending_signals(self) -> list[dict[str, Any]]:
        """Accepted signals with at least one order not in a final status, oldest first, each with its orders.

        This is what a restart must finish: orders still ``new`` were never sent; any other non-final status may
        be at the broker and must be looked up by client order id before anything is resent.
        """
        finals = tuple(sorted(FINAL_ORDER_STATUSES))
        marks = ", ".join("?" for _ in finals)
        rows = self._query(
            "SELECT * FROM signals WHERE status = 'accepted' AND id IN (SELECT DISTINCT signal_id FROM orders "
            f"WHERE status NOT IN ({marks})) ORDER BY received_at", finals)
        out = []
        for row in rows:
            sig = _signal(row)
            sig["orders"] = self.orders(signal_id=sig["id"])
            out.append(sig)
        return out

    # -- orders -----------------------------------------------------------------------------------------------

    def order_status(self, client_order_id: str, status: str, *, broker_order_id: str | None = None,
                     detail: Any = None, at: datetime | None = None) -> asyncio.Future[None]:
        """Move an order to ``status`` (the runtime checks the transition) and append it to its history.

        Await the result: it resolves once the transition is committed. The write is queued at the call, not at
        the first await, so that a caller can issue several orders' transitions in one step (the dispatcher
        journals an account's next orders ahead together) and wait for them after; the batch executor writes the
        transitions of one batch with one statement per table (``_run_merged``). The time is the call's.

        The future raises KeyError for an unknown client order id (that caller only). ``broker_order_id`` is kept
        once known. A bad status or a naive ``at`` raises ValueError at the call.
        """
        if status not in ORDER_STATUSES:
            raise ValueError(f"order status {status!r} is not one of {', '.join(ORDER_STATUSES)}")
        detail_text = None if detail is None else (detail if isinstance(detail, str) else dumps(detail))
        return self._enqueue(_StatusRow(client_order_id, status, broker_order_id, detail_text, utc_iso(at or self.clock())))

    def get_order(self, client_order_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM orders WHERE client_order_id = ?", (client_order_id,))
        if not rows:
            return None
        order = _order(rows[0])
        order["history"] = self.order_events(client_order_id)
        return order

    def order_events(self, client_order_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT status, at, broker_order_id, detail FROM order_events WHERE client_order_id = ? "
                           "ORDER BY id", (client_order_id,))
        return [{**r, "detail": _maybe_json(r["detail"])} for r in rows]

    def orders(self, *, status: Iterable[str] | None = None, signal_id: str | None = None,
               account: str | None = None, limit: int | None = None, history: bool = False,
               updated_since: datetime | None = None) -> list[dict[str, Any]]:
        """Orders, newest first (in their signal's leg order when ``signal_id`` is given)."""
        where: list[str] = []
        params: list[Any] = []
        if updated_since is not None:
            where.append("updated_at >= ?")
            params.append(utc_iso(updated_since))
        if status is not None:
            statuses = list(status)
            where.append(f"status IN ({', '.join('?' for _ in statuses)})")
            params.extend(statuses)
        if signal_id is not None:
            where.append("signal_id = ?")
            params.append(signal_id)
        if account is not None:
            where.append("account = ?")
            params.append(account)
        sql = "SELECT * FROM orders"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq" if signal_id is not None else " ORDER BY created_at DESC, seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        out = [_order(r) for r in self._query(sql, params)]
        if history:
            for order in out:
                order["history"] = self.order_events(order["client_order_id"])
        return out

    async def record_orders(self, signal_id: str, orders: Sequence[Mapping[str, Any]], status: str,
                            detail: Any = None, at: datetime | None = None) -> list[str]:
        """Journal orders of signal ``signal_id`` that never leave, in the final ``status`` (``missed``), each with
        its event, in one transaction; returns the client order ids written.

        An order not in the journal yet is inserted (``INSERT OR IGNORE``: what an account at a down broker would
        have received). One journaled ``new`` (decided, never sent: a flatten superseded it) moves to ``status``,
        so that a restart does not send it. One in any other status is left alone: it left already, or was
        settled, so a repeat writes nothing. Nothing is written when the signal is not in the journal (it was not
        acknowledged: its orders would hang on nothing). ``detail``: the reason, unless an order carries its own
        ``detail``. An order's own ``strategy``, ``order_type``, ``price`` and ``margin_usd`` are kept.
        """
        if status not in FINAL_ORDER_STATUSES:
            raise ValueError(f"record_orders journals orders that never leave; {status!r} is not one of "
                             f"{', '.join(sorted(FINAL_ORDER_STATUSES))}")
        when = utc_iso(at or self.clock())
        rows = _final_rows(orders, detail)

        def write(conn: sqlite3.Connection) -> list[str]:
            return _write_final(conn, signal_id, rows, status, when)

        result: list[str] = await self._write(write)
        return result

    def supersede(self, signal_id: str, orders: Mapping[str, str]) -> None:
        """Declare orders of ``signal_id`` (client order id -> detail) superseded by a flatten: if the signal is
        written after this (its write may be queued already), they are written ``missed``, in its own transaction.

        The flatten journals them ``missed`` in its own transaction too (``record_signal``'s ``missed``), which
        finds them only if the signal was written first; between the two, whichever order the writes land in,
        no superseded order is ever on disk as ``new`` next to the flatten (a restart would send it). Synchronous:
        call it in the step that supersedes them, before anything else can write the signal."""
        self._superseded.setdefault(signal_id, {}).update(orders)

    def watch_exit(self, signal_id: str, watch: Mapping[str, Any]) -> None:
        """Declare an exit watch of ``signal_id`` (``service.exits``: the exit's client order id, its line, the
        orders in flight it counted on and what it counted on closing), to be journaled in the signal's body
        (``exit_watch``) by its own write, so that the watch reaches the disk with the exit it watches or not at
        all. Synchronous: call it in the step that decided the signal, before anything can write it."""
        self._exit_watch_rows.setdefault(signal_id, []).append(dict(watch))

    def withdraw_exit_watch(self, signal_id: str, exit_id: str) -> None:
        """Undo ``watch_exit`` for an exit whose watch ended before its signal was written (the signal was not
        acknowledged, or a flatten took the watch over): its body says what is watched, nothing more."""
        parked = self._exit_watch_rows.get(signal_id)
        if parked is not None:
            parked[:] = [w for w in parked if w.get("exit") != exit_id]
            if not parked:
                del self._exit_watch_rows[signal_id]

    def withdraw_superseded(self, signal_id: str, client_order_ids: Iterable[str]) -> None:
        """Undo ``supersede`` for orders whose flatten was not journaled (its write failed)."""
        found = self._superseded.get(signal_id)
        if found is None:
            return
        for coid in client_order_ids:
            found.pop(coid, None)
        if not found:
            del self._superseded[signal_id]

    # -- fills ------------------------------------------------------------------------------------------------

    async def record_fill(self, fill: Mapping[str, Any]) -> bool:
        """Record a fill once per (broker, fill_id); False when it was already known (a fill reported twice).

        The ``data`` column holds the whole fill as ``dumps`` writes it. Its time and money are put in as the text
        the columns hold, which is the text ``dumps`` writes for them, and encoded by one cached encoder: ``dumps``
        builds an encoder per call and calls back for each Decimal and time, most of this method's cost."""
        for required in ("broker", "fill_id"):
            if not fill.get(required):
                raise ValueError(f"a fill needs '{required}'")
        data = dict(fill)
        at, price, commission, quantity = data.get("at"), data.get("price"), data.get("commission"), \
            data.get("quantity")
        at_text, price_text, commission_text = None if at is None else _at(at), _text(price), _text(commission)
        if isinstance(at, datetime):
            data["at"] = at_text
        if isinstance(price, Decimal):
            data["price"] = price_text
        if isinstance(commission, Decimal):
            data["commission"] = commission_text
        row = (data["broker"], str(data["fill_id"]), data.get("account"), data.get("contract"), data.get("side"),
               None if quantity is None else int(quantity), price_text, commission_text, at_text,
               data.get("client_order_id"), data.get("broker_order_id"), data.get("strategy"), utc_iso(self.clock()),
               _encode(data), data.get("kind"))
        result: bool = await self._enqueue(_FillRow(row))
        return result

    async def record_adoption(self, *, broker: str, account: str, contract: str, quantity: int,
                              price: Decimal | None, at: datetime) -> str:
        """Journal a position change reconciliation adopted from the broker (``quantity`` signed, at ``price``,
        the mark it was booked at: None when none was known) as a fills row of kind ``adopted``; returns its fill
        id. A restart books it back where the live ledger did, in its place among the fills
        (``service.ledger.replay``): re-adopting the broker's position at start-up instead would net it against
        whatever the strategies hold by then."""
        fill_id = f"adopted-{secrets.token_hex(8)}"
        await self.record_fill({"broker": broker, "fill_id": fill_id, "account": account, "contract": contract,
                                "side": "buy" if quantity > 0 else "sell", "quantity": abs(quantity),
                                "price": price, "commission": Decimal(0), "at": at, "kind": ADOPTED})
        return fill_id

    def fills(self, *, account: str | None = None, since: datetime | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
        """Fills in time order (oldest first)."""
        where: list[str] = []
        params: list[Any] = []
        if account is not None:
            where.append("account = ?")
            params.append(account)
        if since is not None:
            where.append("at >= ?")
            params.append(utc_iso(since))
        sql = "SELECT * FROM fills" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY at, recorded_at"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [{**r, "data": _loads(r["data"])} for r in self._query(sql, params)]

    def filled_quantities(self, account: str, since: datetime, client_order_ids: Iterable[str]) -> dict[str, int]:
        """Contracts filled per client order id among ``account``'s fills at or after ``since`` (the orders'
        creation: no fill of theirs is older), 0 for an id with none. What a cancelled order left unfilled is its
        quantity less this: the order row keeps the status, the fills table the quantities."""
        ids = sorted(set(client_order_ids))
        out = dict.fromkeys(ids, 0)
        if not ids:
            return out
        marks = ", ".join("?" for _ in ids)
        for row in self._query(f"SELECT client_order_id, SUM(quantity) AS q FROM fills WHERE account = ? AND at >= ? "
                               f"AND client_order_id IN ({marks}) GROUP BY client_order_id",
                               (account, utc_iso(since), *ids)):
            out[str(row["client_order_id"])] = int(row["q"] or 0)
        return out

    # -- time-stamped records ---------------------------------------------------------------------------------

    async def _record_rows(self, table: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        values = []
        for row in rows:
            extra = []
            for col in columns:
                value = row.get(col)
                extra.append(None if value is None else int(value) if isinstance(value, bool) else value)
            values.append((_at(row.get("at") or self.clock()), *extra, dumps(dict(row))))
        cols = ", ".join(("at", *columns, "data"))
        marks = ", ".join("?" for _ in range(len(columns) + 2))

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", values)

        await self._write(write)

    def _recent_rows(self, table: str, limit: int) -> list[dict[str, Any]]:
        rows = self._query(f"SELECT id, at, data FROM {table} ORDER BY at DESC, id DESC LIMIT ?", (limit,))
        return [{**_loads(r["data"]), "id": r["id"], "at": r["at"]} for r in rows]

    async def record_reconciliation(self, row: Mapping[str, Any]) -> None:
        """One comparison of ledger and broker (keys ``broker``, ``account``, ``ok`` indexed; all kept as JSON)."""
        await self._record_rows("reconciliations", ("broker", "account", "ok"), [row])

    def reconciliations(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._recent_rows("reconciliations", limit)

    async def record_reload(self, row: Mapping[str, Any]) -> None:
        """One rules reload attempt (``engine.reload.Reload.as_dict()``), at its own ``time``."""
        await self._record_rows("reloads", ("generation", "ok", "outcome"),
                                [{**row, "at": row.get("at") or row.get("time")}])

    def reloads(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._recent_rows("reloads", limit)

    def last_generation(self) -> int:
        """The highest rules generation any process recorded in this journal (0: none yet)."""
        row = self._query("SELECT MAX(generation) AS n FROM reloads")
        return int(row[0]["n"] or 0)

    async def record_risk_event(self, row: Mapping[str, Any]) -> None:
        """A breach, halt, flatten or halt clearance (``scope``, ``name``, ``kind`` indexed)."""
        await self._record_rows("risk_events", ("scope", "name", "kind"), [row])

    def risk_events(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._recent_rows("risk_events", limit)

    def risk_events_since(self, at: datetime, *, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Every risk event recorded at or after ``at``, newest first, shaped as ``risk_events`` rows.

        What a restart restores of the current trading day (its day-start marks, halts, limits fired, schedule
        firings) must not depend on how many other events the day wrote: the newest N can miss them on a busy
        day. ``kinds``: only events of these kinds."""
        sql, params = "SELECT id, at, data FROM risk_events WHERE at >= ?", [utc_iso(at)]
        if kinds is not None:
            wanted = list(kinds)
            sql += f" AND kind IN ({', '.join('?' for _ in wanted)})"
            params.extend(wanted)
        rows = self._query(sql + " ORDER BY at DESC, id DESC", params)
        return [{**_loads(r["data"]), "id": r["id"], "at": r["at"]} for r in rows]

    def last_targets_since(self, at: datetime) -> dict[str, dict[str, Any]]:
        """Per strategy, its latest signal that says where its position stands, received at or after ``at``,
        accepted or decided, and not a catch-up's own: what a broker's come-up converges ``catch_up`` accounts to.
        That is a target-position signal (``position`` set) or an ``exit`` (the strategy is flat after it: an exit
        after a target voids the target, as a flatten does; crash fuzz seed 1035 caught up a best-mode target its
        strategy had exited, opening it at a second account, and a missed exit was never caught up at all).
        Read by query, however many other signals came since (a scan of the most recent N would quietly skip a
        quiet strategy behind busy ones)."""
        rows = self._query(
            "SELECT * FROM signals WHERE received_at >= ? AND status IN ('accepted', 'decided') AND "
            f"{_stands()} AND COALESCE(json_extract(signal, '$.catch_up'), 0) = 0 "
            "ORDER BY received_at DESC, rowid DESC", (utc_iso(at),))
        found: dict[str, dict[str, Any]] = {}
        for row in rows:
            signal = _signal(row)
            strategy = (signal.get("signal") or {}).get("strategy")
            if strategy and strategy not in found:
                found[str(strategy)] = signal
        return found

    def moves_since(self, strategy: str, after: datetime) -> list[dict[str, Any]]:
        """``strategy``'s plain ``buy``/``sell`` signals (no ``position``: a change of the strategy's position, not
        where it stands) received after ``after``, accepted or decided, oldest first: what catch-up adds to the
        strategy's last target (``last_targets_since``), which alone would be stale."""
        rows = self._query(
            "SELECT * FROM signals WHERE strategy = ? AND received_at > ? AND status IN ('accepted', 'decided') AND "
            "json_extract(signal, '$.action') IN ('buy', 'sell') AND json_extract(signal, '$.position') IS NULL "
            "AND json_extract(signal, '$.flatten') IS NULL AND COALESCE(json_extract(signal, '$.catch_up'), 0) = 0 "
            "ORDER BY received_at, rowid", (strategy, utc_iso(after)))
        return [_signal(row) for row in rows]

    def catch_up_owed_since(self, broker: str, accounts: Iterable[str], at: datetime) -> datetime | None:
        """When the earliest target still owed a catch-up at ``broker`` was received (received at or after ``at``),
        or None when none is owed: what a process that starts owes for what an earlier one journaled missed.

        Owed: a target-position signal or an exit (``last_targets_since``; not a flatten's, not a catch-up's own)
        with an order for one of
        ``accounts`` at ``broker`` journaled ``missed``, and no catch-up of its strategy at ``broker`` (a signal
        ``catch_up`` naming that ``broker``, or with an order there: older rows name none; one that decided nothing
        is journaled ``decided``) received at or after it: a catch-up converges to the strategy's last
        target, so one received later covers every earlier miss of that strategy there. A flatten's missed exits
        are the redo's (``_redo_missed_flattens``), not catch-up's.

        Cheap: two passes over the signals received since ``at`` (one trading day, by the ``signals_status`` index
        on (status, received_at)), each row's orders read by the ``orders_signal`` index; read once per broker at
        a start, as each catch-up reads ``last_targets_since`` over the same rows. ``+o.status`` keeps SQLite on
        ``orders_signal`` (a signal's few orders) rather than ``orders_status`` (every order ever missed)."""
        names = sorted(set(accounts))
        if not names:
            return None
        floor = utc_iso(at)
        covered = {row["strategy"]: row["at"] for row in self._query(
            "SELECT c.strategy AS strategy, MAX(c.received_at) AS at FROM signals c WHERE c.status IN ('accepted', "
            "'decided') AND c.received_at >= ? AND json_extract(c.signal, '$.catch_up') = 1 AND "
            "(json_extract(c.signal, '$.broker') = ? OR EXISTS (SELECT 1 FROM orders o WHERE o.signal_id = c.id "
            "AND o.broker = ?)) GROUP BY c.strategy", (floor, broker, broker))}
        marks = ", ".join("?" for _ in names)
        missed = self._query(
            "SELECT s.strategy AS strategy, s.received_at AS at FROM signals s WHERE s.status IN ('accepted', "
            f"'decided') AND s.received_at >= ? AND {_stands('s.signal')} AND "
            "json_extract(s.signal, '$.flatten') IS NULL AND COALESCE(json_extract(s.signal, '$.catch_up'), 0) = 0 "
            "AND EXISTS (SELECT 1 FROM orders o WHERE o.signal_id = s.id AND +o.status = 'missed' AND o.broker = ? "
            f"AND o.account IN ({marks}))", (floor, broker, *names))
        owed = [row["at"] for row in missed if row["at"] > covered.get(row["strategy"], "")]
        return parse_utc(min(owed)) if owed else None

    def flattens_between(self, after: datetime, until: datetime) -> list[dict[str, Any]]:
        """The flatten signals received after ``after`` and at or before ``until``, newest first (``id``,
        ``received_at``, the parsed ``signal`` body): every one of them, not the most recent N of all signals."""
        rows = self._query(
            "SELECT id, received_at, signal FROM signals WHERE received_at > ? AND received_at <= ? AND "
            "json_extract(signal, '$.flatten') IS NOT NULL ORDER BY received_at DESC, rowid DESC",
            (utc_iso(after), utc_iso(until)))
        return self._bodies(rows)

    def _bodies(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``id``, ``received_at`` and the parsed ``signal`` body of signal rows (what the runtime's restores read)."""
        return [{"id": r["id"], "received_at": r["received_at"], "signal": _loads(r["signal"]) or {}} for r in rows]

    def flattens_away_since(self, at: datetime) -> list[dict[str, Any]]:
        """The flatten signals received at or after ``at`` that were computed while a broker in their scope was
        away (their body's ``away``: by broker, the accounts there), oldest first: ``id``, ``received_at`` and
        the parsed ``signal`` body. Few, so that reading what a come-up owes does not parse every flatten."""
        rows = self._query(
            "SELECT id, received_at, signal FROM signals WHERE received_at >= ? AND "
            "json_extract(signal, '$.away') IS NOT NULL ORDER BY received_at, rowid", (utc_iso(at),))
        return self._bodies(rows)

    def flatten_watches_since(self, at: datetime) -> list[dict[str, Any]]:
        """The flatten signals received at or after ``at`` that journaled a watch over orders they counted on
        (``watch``), and the follow-ups journaled for them (``follow_of``), oldest first: ``id``, ``received_at``
        and the parsed ``signal`` body. What a restart rebuilds the watch from (``service.restore``)."""
        rows = self._query(
            "SELECT id, received_at, signal FROM signals WHERE received_at >= ? AND "
            "(json_extract(signal, '$.watch') IS NOT NULL OR json_extract(signal, '$.follow_of') IS NOT NULL) "
            "ORDER BY received_at, rowid", (utc_iso(at),))
        return self._bodies(rows)

    def covered_since(self, at: datetime) -> set[str]:
        """What the follow-ups journaled at or after ``at`` cover (their body's ``covers``: a counted order's id, an
        exit's, an exit's with the orders it counted on that it made good, ``<exit id>:<id>,<id>``, or
        ``overtaken:<exit id>``): what a start or a retry must not make good a second time."""
        rows = self._query("SELECT json_extract(signal, '$.covers') AS covers FROM signals WHERE received_at >= ? "
                           "AND json_extract(signal, '$.follow_of') IS NOT NULL "
                           "AND json_extract(signal, '$.covers') IS NOT NULL", (utc_iso(at),))
        return {str(r["covers"]) for r in rows}

    def exit_watches_since(self, at: datetime) -> list[dict[str, Any]]:
        """The signals received at or after ``at`` that journaled an exit watch (``exit_watch``) and every flatten
        signal (a follow-up names the exit it covers; any other may have taken a watch over), in the order they
        were written: ``id``, ``received_at`` and the parsed ``signal`` body. What a restart rebuilds the exit
        watches from (``ExitsMixin._restore_exit_watches``)."""
        rows = self._query(
            "SELECT id, received_at, signal FROM signals WHERE received_at >= ? AND "
            "(json_extract(signal, '$.exit_watch') IS NOT NULL OR json_extract(signal, '$.flatten') IS NOT NULL) "
            "ORDER BY rowid", (utc_iso(at),))
        return self._bodies(rows)

    async def record_position_snapshot(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Positions as seen at one instant (one row per account/contract), all in one transaction."""
        if rows:
            await self._record_rows("position_snapshots", ("broker", "account"), rows)

    def position_snapshots(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._recent_rows("position_snapshots", limit)

    async def record_daily_marks(self, trading_day: date, at: datetime, rows: Sequence[Mapping[str, Any]],
                                 marks: Mapping[str, Decimal]) -> int:
        """The end-of-day mark of every account, in one transaction; a day already marked is kept, not overwritten.

        Keeping the first mark makes the 17:00 ET job safe to re-run after a restart: the statement a trader saw
        for a day never changes. Returns how many accounts were newly marked.
        """
        day = trading_day.isoformat()
        when = _at(at or self.clock())
        prices = dumps({k: str(v) for k, v in sorted(marks.items())})
        money = ("cash", "equity", "realized", "unrealized", "commissions", "margin_used")
        values = [(day, row["account"], when, row.get("broker"), *(_text(row.get(k)) for k in money), prices,
                   dumps(dict(row))) for row in rows]

        def write(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO daily_marks (trading_day, account, at, broker, cash, equity, "
                             "realized, unrealized, commissions, margin_used, marks, data) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
            return conn.total_changes - before

        written: int = await self._write(write)
        return written

    def daily_marks(self, *, account: str | None = None, since: date | None = None) -> list[dict[str, Any]]:
        """Marks in day order (oldest first), for equity curves."""
        sql = "SELECT * FROM daily_marks WHERE 1=1"
        params: list[Any] = []
        if account is not None:
            sql += " AND account = ?"
            params.append(account)
        if since is not None:
            sql += " AND trading_day >= ?"
            params.append(since.isoformat())
        rows = self._query(sql + " ORDER BY trading_day, account", params)
        return [{**{k: v for k, v in r.items() if k != "data"}, "marks": _loads(r["marks"]),
                 "late": bool((_loads(r["data"]) or {}).get("late"))} for r in rows]

    # -- metrics: what happened since the last scrape (reads only; ids are the cursors) ------------------------

    def signal_outcomes_after(self, rowid: int) -> list[dict[str, Any]]:
        """``rowid``, ``status`` of signals recorded after ``rowid`` (statuses never change once recorded)."""
        return self._query("SELECT rowid AS rowid, status FROM signals WHERE rowid > ? ORDER BY rowid", (rowid,))

    def order_transitions_after(self, event_id: int) -> list[dict[str, Any]]:
        """Order status changes after ``event_id``, with the broker and when their signal was received."""
        return self._query(
            "SELECT e.id, e.status, e.at, o.broker, s.received_at FROM order_events e "
            "JOIN orders o ON o.client_order_id = e.client_order_id LEFT JOIN signals s ON s.id = o.signal_id "
            "WHERE e.id > ? ORDER BY e.id", (event_id,))

    def reconciliation_mismatches_after(self, row_id: int) -> list[dict[str, Any]]:
        """``id``, ``broker`` and the number of mismatches of each reconciliation after ``row_id``."""
        return self._query(
            "SELECT id, broker, COALESCE(json_array_length(json_extract(data, '$.mismatches')), 0) AS mismatches "
            "FROM reconciliations WHERE id > ? ORDER BY id", (row_id,))

    def reload_outcomes_after(self, row_id: int) -> list[dict[str, Any]]:
        return self._query("SELECT id, ok, outcome FROM reloads WHERE id > ? ORDER BY id", (row_id,))

    # -- maintenance ------------------------------------------------------------------------------------------

    async def execute(self, sql: str, params: Sequence[Any] = (), *, transaction: bool = True) -> int:
        """Run one parameterized statement on the writer connection (maintenance and tests); returns the row count.

        ``transaction=False`` runs it alone between batches, for PRAGMAs that cannot run inside a transaction.
        """
        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        result: int = await self._write(write, bare=not transaction)
        return result

    # -- what is journaled with an exit ------------------------------------------------------------------------

    def note_with_exit(self, signal_id: str, client_order_id: str, entry: Mapping[str, Any]) -> None:
        """Journal ``entry`` with the exit ``client_order_id`` of ``signal_id``, in its signal's body
        (``exit_watch``), so that it is on disk no later than the exit can leave: when the exit is not journaled
        yet, parked for the signal's own write (``watch_exit``, withdrawn by ``withdraw_exit_watch``); when it is
        journaled and still ``new`` (decided after its signal's commit: a come-up's re-issue), appended to the
        body by a write queued now, ahead of the exit's ``sending``; when it is journaled in any other status, not
        at all (it left already: what a restart loads is not re-noted). Synchronous; one read by primary key."""
        found = self._query("SELECT status FROM orders WHERE client_order_id = ?", (client_order_id,))
        if not found:
            self.watch_exit(signal_id, entry)
            return
        if found[0]["status"] != "new":
            return
        item = dict(entry)

        def write(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT signal FROM signals WHERE id = ?", (signal_id,)).fetchone()
            if row is None:
                return
            body = _loads(row[0]) or {}
            body["exit_watch"] = [*(body.get("exit_watch") or []), item]
            conn.execute("UPDATE signals SET signal = ? WHERE id = ?", (dumps(body), signal_id))

        def done(future: asyncio.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is not None:
                logger.error("%s: %r not journaled with exit %s: %s", signal_id, item, client_order_id,
                             future.exception())

        self._enqueue(write).add_done_callback(done)

    def exit_watch_entries_since(self, at: datetime, field: str) -> list[dict[str, Any]]:
        """The entries with ``field`` of the ``exit_watch`` bodies of the signals received at or after ``at``, in
        the order they were written (``note_with_exit``): few, and only those signals' bodies are parsed."""
        rows = self._query(
            "SELECT j.value AS entry FROM signals AS s, json_each(s.signal, '$.exit_watch') AS j "
            "WHERE s.received_at >= ? AND json_extract(s.signal, '$.exit_watch') IS NOT NULL "
            "AND json_extract(j.value, '$.' || ?) IS NOT NULL ORDER BY s.rowid, j.key", (utc_iso(at), field))
        return [entry for r in rows if isinstance(entry := _loads(r["entry"]), dict)]

    def exits_since(self, at: datetime) -> list[dict[str, Any]]:
        """Our exits (client order ids ``mb-``) created at or after ``at``, oldest first, each with the strategy of
        its line (``line_strategy``: its own, a flatten's exit, else its signal's) and whether its signal is a
        come-up's re-issue of a flatten (``reissued``: its basis is appended after the signal's commit, not written
        in it, ``note_with_exit``)."""
        rows = self._query(
            "SELECT o.*, COALESCE(o.strategy, s.strategy) AS line_strategy, "
            "json_extract(s.signal, '$.redo_of') IS NOT NULL AS reissued FROM orders AS o "
            "LEFT JOIN signals AS s ON s.id = o.signal_id WHERE o.intent = 'exit' AND o.created_at >= ? "
            "AND o.client_order_id LIKE 'mb-%' ORDER BY o.created_at, o.seq", (utc_iso(at),))
        return [_order(r) for r in rows]

    def reconciled_since(self, at: datetime) -> dict[str, str]:
        """By account, when the last reconciliation pass journaled for it at or after ``at`` began (its row's
        ``at``, journaled once the pass read the account's fills): what tells a start which exits a come-up pass
        ended the overtaken watch of (``OvertakenMixin._restore_overtaken``)."""
        rows = self._query("SELECT account, MAX(at) AS last FROM reconciliations WHERE at >= ? GROUP BY account",
                           (utc_iso(at),))
        return {str(r["account"]): str(r["last"]) for r in rows}


def _final_rows(orders: Iterable[Mapping[str, Any]], detail: Any) -> list[tuple[Any, ...]]:
    """The rows ``_write_final`` takes, built when the write is queued (an order's own ``detail`` first)."""
    rows = []
    for order in orders:
        text = order.get("detail", detail)
        rows.append((str(order["client_order_id"]), order["account"], order["broker"], order["contract"],
                     order["side"], int(order["quantity"]), order.get("intent"), order.get("order_type"),
                     _text(order.get("price")), _text(order.get("margin_usd")), order.get("strategy"),
                     None if text is None else text if isinstance(text, str) else dumps(text)))
    return rows


def _write_final(conn: sqlite3.Connection, signal_id: str, rows: Sequence[tuple[Any, ...]], status: str,
                 when: str) -> list[str]:
    """The statements of ``Journal.record_orders`` (see there), inside the caller's transaction."""
    if conn.execute("SELECT 1 FROM signals WHERE id = ?", (signal_id,)).fetchone() is None:
        return []
    seq = conn.execute("SELECT COALESCE(MAX(seq), -1) FROM orders WHERE signal_id = ?", (signal_id,)).fetchone()[0]
    written = []
    for coid, account, broker, contract, side, quantity, intent, order_type, price, margin, strategy, text in rows:
        inserted = conn.execute(
            "INSERT OR IGNORE INTO orders (client_order_id, signal_id, seq, account, broker, contract, side, "
            "quantity, intent, order_type, price, margin_usd, status, detail, created_at, updated_at, "
            "strategy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (coid, signal_id, seq + 1, account, broker, contract, side, quantity, intent, order_type, price,
             margin, status, text, when, when, strategy)).rowcount
        if inserted:
            seq += 1
        elif not conn.execute("UPDATE orders SET status = ?, detail = ?, updated_at = ? "
                              "WHERE client_order_id = ? AND signal_id = ? AND status = 'new'",
                              (status, text, when, coid, signal_id)).rowcount:
            continue
        conn.execute("INSERT INTO order_events (client_order_id, status, at, detail) VALUES (?, ?, ?, ?)",
                     (coid, status, when, text))
        written.append(coid)
    return written


def _commit(conn: sqlite3.Connection) -> None:
    """On the committer thread: the fsync that makes a batch durable, while the loop serves other requests."""
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Resolve a caller's future unless the caller stopped waiting (cancelled); the write stands either way."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _maybe_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _signal(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["signal"] = _loads(out["signal"])
    out["decision"] = _loads(out["decision"])
    return out


def _order(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["detail"] = _maybe_json(out["detail"])
    return out


# -- order transitions and fills as the batch executor merges them ---------------------------------------------

_UPDATE_ORDER = ("UPDATE orders SET status = ?, broker_order_id = COALESCE(?, broker_order_id), detail = ?, "
                 "updated_at = ? WHERE client_order_id = ?")
_INSERT_EVENT = "INSERT INTO order_events (client_order_id, status, at, broker_order_id, detail) VALUES (?, ?, ?, ?, ?)"
_INSERT_FILL = ("INSERT OR IGNORE INTO fills (broker, fill_id, account, contract, side, quantity, price, commission, "
                "at, client_order_id, broker_order_id, strategy, recorded_at, data, kind) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class _StatusRow:
    """One ``order_status`` write: alone (a batch run write by write), or merged with the batch's others."""

    __slots__ = ("client_order_id", "status", "broker_order_id", "detail", "at")

    def __init__(self, client_order_id: str, status: str, broker_order_id: str | None, detail: str | None,
                 at: str) -> None:
        self.client_order_id = client_order_id
        self.status = status
        self.broker_order_id = broker_order_id
        self.detail = detail
        self.at = at

    def __call__(self, conn: sqlite3.Connection) -> None:
        cur = conn.execute(_UPDATE_ORDER, (self.status, self.broker_order_id, self.detail, self.at,
                                           self.client_order_id))
        if cur.rowcount == 0:
            raise KeyError(f"no order {self.client_order_id} in the journal")
        conn.execute(_INSERT_EVENT, (self.client_order_id, self.status, self.at, self.broker_order_id, self.detail))


class _FillRow:
    """One ``record_fill`` write (True: recorded now; False: the fill was known). It touches only ``fills``, so
    the order transitions around it in a batch may be merged across it, and it across them."""

    __slots__ = ("row",)

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row

    def __call__(self, conn: sqlite3.Connection) -> bool:
        return conn.execute(_INSERT_FILL, self.row).rowcount == 1


class _Unmatched(Exception):
    """A merged transition named an order the journal does not hold, or a merged fill was known already: the batch
    is run again write by write, where that transition's KeyError reaches its own caller and that fill's record
    answers False."""


def _run_merged(conn: sqlite3.Connection, batch: list[_Write]) -> list[tuple[_Write, Any, BaseException | None]]:
    """Run ``batch`` in order, except that its order transitions (``_StatusRow``) are written together, one UPDATE
    of ``orders`` and one INSERT into ``order_events`` (``executemany``) for each run of them, in their order,
    instead of two statements each (a tenth of a busy runtime's event loop); and its fills (``_FillRow``) likewise.

    Transitions and fills touch different tables, so a run of either goes on across the other; both end before any
    other write, which might create or read an order (a signal's orders, ``record_orders``): every write still sees
    the effects of those queued before it. Raises on any failure (``_Unmatched`` when a transition's order is
    unknown or a fill was known): the caller then runs the batch write by write, each in its savepoint, and each
    caller gets its own outcome.
    """
    results: list[tuple[_Write, Any, BaseException | None]] = []
    rows: list[_StatusRow] = []
    fills: list[_FillRow] = []
    for write in batch:
        fn = write.fn
        kind = type(fn)
        if kind is _StatusRow:
            rows.append(fn)  # type: ignore[arg-type]
            results.append((write, None, None))
            continue
        if kind is _FillRow:
            fills.append(fn)  # type: ignore[arg-type]
            results.append((write, True, None))  # recorded now: a known fill makes the batch run write by write
            continue
        if rows:
            _write_statuses(conn, rows)
            rows = []
        if fills:
            _write_fills(conn, fills)
            fills = []
        results.append((write, fn(conn), None))
    if rows:
        _write_statuses(conn, rows)
    if fills:
        _write_fills(conn, fills)
    return results


def _write_fills(conn: sqlite3.Connection, fills: list[_FillRow]) -> None:
    inserted = conn.executemany(_INSERT_FILL, [f.row for f in fills]).rowcount
    if inserted != len(fills):  # (broker, fill_id) is the key: each new fill inserts one row, a known one none
        raise _Unmatched(f"{len(fills) - inserted} of {len(fills)} fills were known already")


def _write_statuses(conn: sqlite3.Connection, rows: list[_StatusRow]) -> None:
    if len(rows) == 1:
        rows[0](conn)
        return
    updated = conn.executemany(_UPDATE_ORDER, [(r.status, r.broker_order_id, r.detail, r.at, r.client_order_id)
                                               for r in rows]).rowcount
    if updated != len(rows):  # client_order_id is the key: each transition updates one row or none
        raise _Unmatched(f"{len(rows) - updated} of {len(rows)} order transitions name no order")
    conn.executemany(_INSERT_EVENT, [(r.client_order_id, r.status, r.at, r.broker_order_id, r.detail) for r in rows])
