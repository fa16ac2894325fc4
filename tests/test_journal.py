"""The journal: migrations, one transaction per signal, group commit, "acknowledged means on disk", the order
state history, idempotent fills and the recovery query."""

from __future__ import annotations

import asyncio
import signal as signals
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from service import journal as journal_module
from service.journal import Journal, JournalConflict, JournalError, migrate, new_signal_id, utc_iso

T0 = datetime(2026, 3, 10, 15, 0, tzinfo=timezone.utc)


@pytest.fixture
async def journal(tmp_path: Path) -> Any:
    j = Journal(tmp_path / "journal.db")
    await j.start()
    yield j
    await j.close()


def order(coid: str, account: str = "apex-1", **extra: Any) -> dict[str, Any]:
    return {"client_order_id": coid, "account": account, "broker": "paper-fast", "contract": "MESH6",
            "side": "buy", "quantity": 2, "intent": "entry", **extra}


async def accepted(j: Journal, *coids: str, key: str | None = None, at: datetime | None = None) -> str:
    return await j.record_signal(raw=b'{"strategy":"es-scalper"}', remote="127.0.0.1", status="accepted",
                                 reason="mirror", key=key, signal={"strategy": "es-scalper"},
                                 decision={"orders": list(coids)}, orders=[order(c) for c in coids], at=at)


def on_disk(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read through a connection of our own: what another process would see."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


# -- schema -----------------------------------------------------------------------------------------------------


async def test_a_new_journal_is_migrated_to_the_latest_version_in_wal_mode(journal: Journal) -> None:
    assert journal.schema_version == len(journal_module.MIGRATIONS)
    assert on_disk(journal.path, "SELECT version, name FROM schema_version") == \
        [(i, name) for i, (name, _) in enumerate(journal_module.MIGRATIONS, 1)]
    assert on_disk(journal.path, "PRAGMA journal_mode") == [("wal",)]
    tables = {r[0] for r in on_disk(journal.path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"signals", "orders", "order_events", "fills", "position_snapshots", "reconciliations", "reloads",
            "risk_events", "schema_version"} <= tables


async def test_reopening_runs_no_migration_twice_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with Journal(path) as j:
        sid = await accepted(j, "c1")
    async with Journal(path) as j:
        assert j.get_signal(sid) is not None
    assert on_disk(path, "SELECT COUNT(*) FROM schema_version") == [(len(journal_module.MIGRATIONS),)]
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', '2030-01-01T00:00:00.000000Z')")
    conn.commit()
    conn.close()
    with pytest.raises(JournalError, match="schema version 99 is newer"):
        await Journal(path).start()


def test_a_failing_migration_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite_utils

    def broken(db: sqlite_utils.Database) -> None:
        db["half_done"].create({"id": int}, pk="id")
        raise RuntimeError("the last migration failed")

    monkeypatch.setattr(journal_module, "MIGRATIONS", (*journal_module.MIGRATIONS, ("broken", broken)))
    db = sqlite_utils.Database(sqlite3.connect(tmp_path / "j.db", isolation_level=None))
    with pytest.raises(RuntimeError, match="the last migration failed"):
        migrate(db)
    good = len(journal_module.MIGRATIONS) - 1
    assert [r[0] for r in db.execute("SELECT version FROM schema_version")] == list(range(1, good + 1))
    assert "half_done" not in db.table_names()


async def test_a_second_journal_on_the_same_file_is_refused(journal: Journal) -> None:
    with pytest.raises(JournalError, match="in use by another multibroker process"):
        await Journal(journal.path).start()


# -- signals and orders -----------------------------------------------------------------------------------------


async def test_a_signal_its_decision_and_its_orders_are_one_transaction(journal: Journal) -> None:
    sid = await accepted(journal, "c1", "c2", key="tv-1", at=T0)
    row = journal.get_signal(sid)
    assert row["received_at"] == "2026-03-10T15:00:00.000000Z" and row["key"] == "tv-1"
    assert [(o["client_order_id"], o["status"], o["seq"]) for o in row["orders"]] == [("c1", "new", 0),
                                                                                      ("c2", "new", 1)]
    assert [h["status"] for h in row["orders"][0]["history"]] == ["new"]
    # A client order id that already exists sinks its whole signal, and nothing else of the batch.
    results = await asyncio.gather(accepted(journal, "c3", "c1"), accepted(journal, "c4"), return_exceptions=True)
    assert isinstance(results[0], JournalConflict) and "orders.client_order_id" in str(results[0])
    assert isinstance(results[1], str)
    assert on_disk(journal.path, "SELECT client_order_id FROM orders ORDER BY client_order_id") == [
        ("c1",), ("c2",), ("c4",)]
    assert on_disk(journal.path, "SELECT COUNT(*) FROM signals") == [(2,)]


async def test_a_batch_runs_without_savepoints_until_a_write_fails_then_write_by_write(journal: Journal) -> None:
    await accepted(journal, "dup")
    statements: list[str] = []
    assert journal._conn is not None
    journal._conn.set_trace_callback(statements.append)
    try:
        good = await asyncio.gather(*(accepted(journal, f"ok{i}") for i in range(5)))
        assert len(good) == 5 and not any("SAVEPOINT" in s for s in statements)
        statements.clear()
        # A failing write in the middle of a batch: the batch is rolled back and run again, each write in its own
        # savepoint; the failure reaches its caller only, every other write is committed exactly once.
        results = await asyncio.gather(accepted(journal, "a1"), accepted(journal, "a2"), accepted(journal, "x", "dup"),
                                       accepted(journal, "a3"), return_exceptions=True)
    finally:
        journal._conn.set_trace_callback(None)
    assert [type(r).__name__ for r in results] == ["str", "str", "JournalConflict", "str"]
    assert any("SAVEPOINT" in s for s in statements)
    assert on_disk(journal.path, "SELECT client_order_id, COUNT(*) FROM orders WHERE client_order_id IN "
                                 "('a1', 'a2', 'a3', 'x', 'dup') GROUP BY client_order_id ORDER BY 1") == [
        ("a1", 1), ("a2", 1), ("a3", 1), ("dup", 1)]
    assert on_disk(journal.path, "SELECT COUNT(*) FROM order_events WHERE client_order_id IN ('a1', 'a2', 'a3')") == [
        (3,)]


async def test_group_commit_batches_concurrent_writes_and_each_is_on_disk_when_it_returns(journal: Journal) -> None:
    async def one(i: int) -> None:
        sid = await accepted(journal, f"g{i}")
        assert on_disk(journal.path, "SELECT status FROM signals WHERE id = ?", (sid,)) == [("accepted",)]

    await asyncio.gather(*(one(i) for i in range(300)))
    assert journal.writes == 300
    assert journal.batches < 300


async def test_a_caller_that_stops_waiting_does_not_stop_the_writer(journal: Journal) -> None:
    waiting = [asyncio.ensure_future(accepted(journal, f"x{i}")) for i in range(50)]
    await asyncio.sleep(0)
    for task in waiting[::2]:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert await accepted(journal, "after") and journal.get_order("after")["status"] == "new"


def test_an_acknowledged_signal_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    script = textwrap.dedent(f"""
        import asyncio, os, signal, sys
        from service.journal import Journal
        async def main():
            j = Journal({str(path)!r})
            await j.start()
            sid = await j.record_signal(raw=b"{{}}", remote=None, status="accepted", reason=None, key="k",
                                        signal={{}}, decision={{}}, orders=[{{"client_order_id": "c1",
                                        "account": "a", "broker": "b", "contract": "MESH6", "side": "buy",
                                        "quantity": 1, "intent": "entry"}}])
            print(sid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == -signals.SIGKILL, proc.stderr
    sid = proc.stdout.strip()
    assert on_disk(path, "SELECT id FROM signals") == [(sid,)]
    assert on_disk(path, "SELECT client_order_id, status FROM orders") == [("c1", "new")]


async def test_find_by_key_only_counts_signals_that_were_taken_within_the_window(journal: Journal) -> None:
    sid = await accepted(journal, "c1", key="tv-9", at=T0)
    await journal.record_signal(raw=b"", remote=None, status="rejected", reason="422 stale", key="tv-8",
                                signal=None, decision=None, at=T0)
    assert journal.find_by_key("tv-9", T0 - timedelta(hours=1))["id"] == sid
    assert journal.find_by_key("tv-9", T0 + timedelta(seconds=1)) is None
    assert journal.find_by_key("tv-8", T0 - timedelta(hours=1)) is None


def _reads(journal: Journal) -> list[str]:
    """Statements this thread's read connection runs from now on."""
    seen: list[str] = []
    journal._reader().conn.set_trace_callback(seen.append)
    return seen


async def test_find_by_key_answers_misses_from_memory_and_remembers_keys_across_a_restart(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    path = tmp_path / "journal.db"
    async with Journal(path) as first:
        taken = await accepted(first, "k1", key="tv-recent", at=now - timedelta(hours=2))
        await accepted(first, "k2", key="tv-old", at=now - timedelta(days=3))  # before the 24 h horizon
        await first.record_signal(raw=b"", remote=None, status="duplicate", reason="dup", key="tv-dup",
                                  signal=None, decision=None, at=now)
    async with Journal(path) as journal:
        reads = _reads(journal)
        window = timedelta(hours=23)  # within the 24 h horizon the journal was opened with
        assert journal.find_by_key("tv-never", now - window) is None
        assert journal.find_by_key("tv-dup", now - window) is None  # a duplicate is not an original
        assert reads == []  # both misses answered from memory
        assert journal.find_by_key("tv-recent", now - window)["id"] == taken  # loaded at start
        assert reads  # a hit reads its row
        reads.clear()
        # Older than what memory covers: asked of the database, and found there.
        assert journal.find_by_key("tv-old", now - timedelta(days=4)) is not None
        assert reads
        fresh = await accepted(journal, "k3", key="tv-new", at=now)
        assert journal.find_by_key("tv-new", now - timedelta(minutes=5))["id"] == fresh  # remembered at commit


async def test_find_by_key_stays_right_when_memory_overflows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "KEY_INDEX_MAX", 5)
    now = datetime.now(timezone.utc)
    async with Journal(tmp_path / "journal.db") as journal:
        for i in range(8):  # all within the horizon: memory cannot hold them and gives up
            await accepted(journal, f"o{i}", key=f"tv-{i}", at=now)
        assert journal._keys_floor is None
        for i in range(8):
            assert journal.find_by_key(f"tv-{i}", now - timedelta(hours=1)) is not None
        assert journal.find_by_key("tv-none", now - timedelta(hours=1)) is None


async def test_order_status_history_broker_id_and_errors(journal: Journal) -> None:
    await accepted(journal, "c1")
    await journal.order_status("c1", "sending", at=T0)
    await journal.order_status("c1", "acknowledged", broker_order_id="B-77", at=T0 + timedelta(milliseconds=15))
    await journal.order_status("c1", "filled", detail={"price": Decimal("6001.25")}, at=T0 + timedelta(seconds=1))
    got = journal.get_order("c1")
    assert got["status"] == "filled" and got["broker_order_id"] == "B-77"
    assert got["detail"] == {"price": "6001.25"}
    assert [(h["status"], h["at"]) for h in got["history"][1:]] == [
        ("sending", "2026-03-10T15:00:00.000000Z"), ("acknowledged", "2026-03-10T15:00:00.015000Z"),
        ("filled", "2026-03-10T15:00:01.000000Z")]
    with pytest.raises(KeyError, match="no order nope"):
        await journal.order_status("nope", "sending")
    with pytest.raises(ValueError, match="not one of"):
        await journal.order_status("c1", "done")
    with pytest.raises(ValueError, match="naive"):
        await journal.order_status("c1", "filled", at=datetime(2026, 3, 10, 15, 0))
    assert [o["client_order_id"] for o in journal.orders(status=["filled"])] == ["c1"]


async def test_a_batchs_order_transitions_are_merged_and_an_unknown_order_fails_only_its_caller(
        journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    await accepted(journal, "m1", "m2", "m3")
    merged: list[list[str]] = []
    write_statuses = journal_module._write_statuses

    def watched(conn: sqlite3.Connection, rows: list[Any]) -> None:
        merged.append([f"{r.client_order_id}:{r.status}" for r in rows])
        write_statuses(conn, rows)

    monkeypatch.setattr(journal_module, "_write_statuses", watched)
    statements: list[str] = []
    assert journal._conn is not None
    journal._conn.set_trace_callback(statements.append)
    try:
        # Queued at the call (a future, not a coroutine), so all of these join one batch: transitions, a fill
        # between them, and an order created by another write of the batch, then moved: the merged run ends before
        # that write, so the move sees the order.
        def insert_m4(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO orders (client_order_id, signal_id, seq, account, broker, contract, side, "
                         "quantity, status, created_at, updated_at) SELECT 'm4', signal_id, 9, account, broker, "
                         "contract, side, quantity, 'new', created_at, updated_at FROM orders WHERE "
                         "client_order_id = 'm1'")

        writes = [journal.order_status("m1", "sending"), journal.order_status("m2", "sending"),
                  journal.record_fill({"broker": "paper-fast", "fill_id": "FM", "account": "apex-1", "side": "buy",
                                       "quantity": 2, "price": Decimal("6000"), "at": T0}),
                  journal.order_status("m1", "filled", broker_order_id="B1"),
                  journal._enqueue(insert_m4), journal.order_status("m4", "sending")]
        ok = await asyncio.gather(*writes)
        assert ok[2] is True
        assert merged == [["m1:sending", "m2:sending", "m1:filled"], ["m4:sending"]]
        assert not any("SAVEPOINT" in s for s in statements)
        statements.clear()
        results = await asyncio.gather(journal.order_status("m2", "filled"), journal.order_status("ghost", "sending"),
                                       journal.order_status("m3", "sending"), return_exceptions=True)
    finally:
        journal._conn.set_trace_callback(None)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], KeyError) and "no order ghost" in str(results[1])
    assert any("SAVEPOINT" in s for s in statements)  # run again write by write, each error to its own caller
    history = {coid: [(h["status"], h["broker_order_id"]) for h in journal.order_events(coid)]
               for coid in ("m1", "m2", "m3", "m4")}
    assert history == {"m1": [("new", None), ("sending", None), ("filled", "B1")],
                       "m2": [("new", None), ("sending", None), ("filled", None)],
                       "m3": [("new", None), ("sending", None)], "m4": [("sending", None)]}
    got = {o["client_order_id"]: (o["status"], o["broker_order_id"]) for o in journal.orders()}
    assert got == {"m1": ("filled", "B1"), "m2": ("filled", None), "m3": ("sending", None), "m4": ("sending", None)}


async def test_fills_of_a_batch_are_merged_and_a_known_one_still_answers_false(journal: Journal) -> None:
    def fill(fid: str) -> dict[str, Any]:
        return {"broker": "paper-fast", "fill_id": fid, "account": "apex-1", "contract": "MESH6", "side": "buy",
                "quantity": 1, "price": Decimal("6000"), "at": T0}

    assert await asyncio.gather(*(journal.record_fill(fill(f"K{i}")) for i in range(3))) == [True, True, True]
    # Known fills amid new ones (and one reported twice in the same batch): each caller gets its own answer.
    answers = await asyncio.gather(journal.record_fill(fill("K9")), journal.record_fill(fill("K1")),
                                   journal.record_fill(fill("K8")), journal.record_fill(fill("K8")))
    assert answers == [True, False, True, False]
    assert on_disk(journal.path, "SELECT fill_id FROM fills ORDER BY fill_id") == [
        ("K0",), ("K1",), ("K2",), ("K8",), ("K9",)]


async def test_order_status_refuses_a_bad_status_at_the_call_and_writes_the_calls_time(journal: Journal) -> None:
    await accepted(journal, "t1")
    with pytest.raises(ValueError, match="not one of"):
        journal.order_status("t1", "done")  # before anything is queued
    written = journal.order_status("t1", "sending", at=T0)
    assert asyncio.isfuture(written)
    await written
    assert [h["at"] for h in journal.order_events("t1")][1:] == ["2026-03-10T15:00:00.000000Z"]


async def test_a_fills_data_is_the_fill_as_dumps_writes_it(journal: Journal) -> None:
    fill = {"broker": "paper-fast", "fill_id": "FD", "account": "apex-1", "contract": "MESH6", "side": "buy",
            "quantity": 1, "price": Decimal("6000.25"), "commission": Decimal("0.25"),
            "at": datetime(2026, 3, 10, 10, 0, tzinfo=timezone(timedelta(hours=-4))), "client_order_id": "c1",
            "broker_order_id": "B1", "strategy": "es", "extra": {"n": Decimal("1.5")}}
    await journal.record_fill(fill)
    [(data,)] = on_disk(journal.path, "SELECT data FROM fills WHERE fill_id = 'FD'")
    assert data == journal_module.dumps(fill)
    assert fill["at"].tzinfo is not timezone.utc and isinstance(fill["price"], Decimal)  # the caller's is untouched


async def test_pending_signals_are_those_with_an_order_not_yet_final(journal: Journal) -> None:
    done = await accepted(journal, "d1", "d2", at=T0)
    open_ = await accepted(journal, "o1", "o2", at=T0 + timedelta(seconds=1))
    for coid, status in (("d1", "filled"), ("d2", "missed"), ("o1", "rejected"), ("o2", "unknown")):
        await journal.order_status(coid, status)
    fresh = await accepted(journal, "n1", at=T0 + timedelta(seconds=2))
    pending = journal.pending_signals()
    assert [p["id"] for p in pending] == [open_, fresh]
    assert [o["status"] for o in pending[0]["orders"]] == ["rejected", "unknown"]
    assert done not in {p["id"] for p in pending}


async def test_a_fill_is_recorded_once_with_decimal_money_and_utc_times(journal: Journal) -> None:
    fill = {"broker": "paper-fast", "fill_id": "F1", "account": "apex-1", "contract": "MESH6", "side": "buy",
            "quantity": 2, "price": Decimal("6000.25"), "commission": Decimal("0.50"),
            "at": datetime(2026, 3, 10, 10, 0, tzinfo=timezone(timedelta(hours=-4))), "client_order_id": "c1"}
    assert await journal.record_fill(fill) is True
    assert await journal.record_fill(fill) is False
    [row] = journal.fills(account="apex-1")
    assert (row["price"], row["commission"], row["at"]) == ("6000.25", "0.50", "2026-03-10T14:00:00.000000Z")
    assert journal.fills(since=T0) == []
    with pytest.raises(TypeError, match="float"):
        await journal.record_fill({**fill, "fill_id": "F2", "price": 6000.25})


async def test_time_stamped_records_round_trip(journal: Journal) -> None:
    await journal.record_reconciliation({"broker": "paper-fast", "account": "apex-1", "ok": False, "at": T0,
                                         "mismatches": [{"contract": "MESH6", "ledger": 2, "broker": 1}]})
    await journal.record_risk_event({"scope": "account", "name": "apex-1", "kind": "halt", "reason": "loss"})
    await journal.record_reload({"generation": 2, "ok": True, "outcome": "applied", "time": T0})
    await journal.record_position_snapshot([{"broker": "paper-fast", "account": "apex-1", "contract": "MESH6",
                                             "quantity": 2}, {"broker": "paper-fast", "account": "apex-2",
                                                              "contract": "MESH6", "quantity": 1}])
    [rec] = journal.reconciliations(10)
    assert rec["ok"] is False and rec["mismatches"][0]["broker"] == 1 and rec["at"] == utc_iso(T0)
    assert journal.risk_events(10)[0]["kind"] == "halt"
    assert journal.reloads(10)[0]["time"] == utc_iso(T0)
    assert len(journal.position_snapshots(10)) == 2


async def test_a_closed_journal_refuses_writes_and_reads(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.db")
    await j.start()
    await j.close()
    with pytest.raises(JournalError, match="not running"):
        await accepted(j, "c1")
    with pytest.raises(JournalError, match="not running"):
        j.recent_signals(1)


def test_signal_ids_are_unique_and_time_ordered() -> None:
    ids = [new_signal_id(T0 + timedelta(microseconds=i)) for i in range(1000)]
    assert len(set(ids)) == 1000 and ids == sorted(ids)
    assert ids[0].startswith("s-20260310T150000000000-")


async def test_a_failed_commit_fails_every_write_of_its_batch_and_the_journal_goes_on(
        journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    real_commit = journal_module._commit

    def disk_gone(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(journal_module, "_commit", disk_gone)
    results = await asyncio.gather(accepted(journal, "f1"), accepted(journal, "f2"), return_exceptions=True)
    assert all(isinstance(r, JournalError) and "disk I/O error" in str(r) for r in results)
    assert on_disk(journal.path, "SELECT COUNT(*) FROM signals") == [(0,)]
    monkeypatch.setattr(journal_module, "_commit", real_commit)
    sid = await accepted(journal, "f3")
    assert on_disk(journal.path, "SELECT id FROM signals") == [(sid,)]


async def test_writes_queued_before_close_are_committed_by_it(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.db")
    await j.start()
    writes = [asyncio.ensure_future(accepted(j, f"q{i}")) for i in range(20)]
    await asyncio.sleep(0)  # queued, not yet committed
    await j.close()
    assert all(isinstance(w.result(), str) for w in writes)
    assert on_disk(j.path, "SELECT COUNT(*) FROM orders") == [(20,)]


async def test_a_decision_given_as_json_text_is_stored_as_is(journal: Journal) -> None:
    text = '{"order_type":"limit","orders":[]}'
    sid = await journal.record_signal(raw="{}", remote=None, status="accepted", reason=None, key=None, signal={},
                                      decision=text, orders=[order("t1", order_type="limit", price="6000.25")])
    row = journal.get_signal(sid)
    assert row["decision"] == {"order_type": "limit", "orders": []}
    assert (row["orders"][0]["order_type"], row["orders"][0]["price"]) == ("limit", "6000.25")


def test_a_journal_is_written_only_from_the_loop_that_started_it(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.db")
    asyncio.run(j.start())
    try:
        with pytest.raises(JournalError, match="event loop other than"):
            asyncio.run(accepted(j, "elsewhere"))
    finally:
        asyncio.run(j.close())  # nothing is pending, so closing needs nothing of the first loop


async def test_checkpoints_run_off_the_commit_path_and_keep_the_wal_from_growing(journal: Journal) -> None:
    assert journal._conn is not None
    assert journal._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # never inside a COMMIT
    wal = Path(str(journal.path) + "-wal")

    async def burst(tag: str) -> int:
        done = journal.checkpoints
        await asyncio.gather(*(accepted(journal, f"{tag}{i}a", f"{tag}{i}b") for i in range(150)))
        for _ in range(100):  # the checkpointer looks every CHECKPOINT_EVERY_S
            if journal.checkpoints > done:
                break
            await asyncio.sleep(0.05)
        assert journal.checkpoints > done, "no checkpoint after new commits"
        return wal.stat().st_size

    first = await burst("one")
    second = await burst("two")
    # Copied into the database file, the WAL starts over: the second burst reuses the first one's space.
    assert second <= first * 1.25, (first, second)
    assert on_disk(journal.path, "SELECT COUNT(*) FROM orders WHERE client_order_id LIKE 'two%'") == [(300,)]


async def test_the_wal_starts_over_while_commits_never_pause(journal: Journal,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a steady stream of commits a checkpoint beside the writer never catches the WAL's end, so SQLite never
    starts the WAL over: it grew without bound and every commit appended to (and grew) the file, which costs about
    twice an in-place commit. The checkpointer copies the last frames in step with the writer, so it does."""
    monkeypatch.setattr(journal_module, "CHECKPOINT_EVERY_S", 0.02)  # read by the running checkpointer each round
    monkeypatch.setattr(journal_module, "RESTART_AT_FRAMES", 64)
    wal = Path(str(journal.path) + "-wal")

    def restarts() -> int:
        """The WAL header's checkpoint sequence number: SQLite adds one each time it starts the WAL over."""
        with wal.open("rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")

    async def writer(tag: str) -> None:
        for i in range(10_000):
            await accepted(journal, f"{tag}-{i}")

    await accepted(journal, "first")
    start = restarts()
    writers = [asyncio.ensure_future(writer(f"w{n}")) for n in range(4)]  # the next commit always queued
    try:
        for _ in range(300):
            await asyncio.sleep(0.01)
            if restarts() >= start + 3:
                break
    finally:
        for task in writers:
            task.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
    assert restarts() >= start + 3, f"the WAL started over {restarts() - start} times in 3 s of commits"


# -- die / bury: kill -9 inside the test process -----------------------------------------------------------------

async def test_a_journal_that_dies_keeps_what_it_committed_and_loses_what_was_queued(tmp_path: Path) -> None:
    """What the fuzzer's crash step relies on: ``die`` drops the writes not yet run (their callers never hear
    back), refuses every later write, and ``bury`` frees the file for a new journal that sees only the commits."""
    path = tmp_path / "journal.db"
    j = Journal(path)
    await j.start()
    kept = await accepted(j, "c-kept")
    lost = asyncio.ensure_future(accepted(j, "c-lost"))
    await asyncio.sleep(0)  # queued: the flush runs on the loop's next turn, after the kill below
    assert j.die() == 1 and not j.running
    with pytest.raises(JournalError, match="not running"):
        await accepted(j, "c-after")
    await j.bury()
    await asyncio.sleep(0.01)
    assert not lost.done()  # a dead process answers nobody
    lost.cancel()
    again = Journal(path)
    await again.start()  # the lock is free
    try:
        assert [o["client_order_id"] for o in again.orders()] == ["c-kept"]
        assert [r["id"] for r in again.recent_signals(10)] == [kept]
    finally:
        await again.close()


async def test_a_live_journal_cannot_be_buried(journal: Journal) -> None:
    with pytest.raises(JournalError, match="close\\(\\) stops a live one"):
        await journal.bury()
    assert journal.running


async def test_filled_quantities_sums_an_accounts_fills_per_order_since_a_time(journal: Journal) -> None:
    def fill(fid: str, coid: str, quantity: int, at: datetime, account: str = "apex-1") -> dict[str, Any]:
        return {"broker": "paper-fast", "fill_id": fid, "account": account, "side": "sell", "quantity": quantity,
                "price": Decimal("6000"), "commission": Decimal("0.5"), "at": at, "client_order_id": coid}

    for f in (fill("F1", "x-1", 1, T0), fill("F2", "x-1", 2, T0 + timedelta(seconds=1)),
              fill("F3", "x-2", 1, T0 - timedelta(hours=1)),  # before the window
              fill("F4", "x-3", 4, T0, account="apex-2")):  # another account's
        await journal.record_fill(f)
    assert journal.filled_quantities("apex-1", T0 - timedelta(minutes=1), ["x-1", "x-2", "x-3", "x-9"]) == \
        {"x-1": 3, "x-2": 0, "x-3": 0, "x-9": 0}
    assert journal.filled_quantities("apex-1", T0, []) == {}
