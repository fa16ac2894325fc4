"""kill -9 of a real ``multibroker serve`` mid fan-out, a restart, and the broker side checked: every order of every
acknowledged signal exists exactly once at its paper broker, and orders the dead process may have sent were looked
up by client order id instead of being sent again.

The paper brokers keep their books in SQLite files in the data directory, so what the brokers hold survives the
kill exactly as a remote broker's would. Slow acknowledgements (and one account per broker lane) keep the fan-out
in progress when the kill lands."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.runtime import write_rules
from tests.test_serve_e2e import free_port, request, wait_for

pytestmark = pytest.mark.slow

SECRET = "crash-secret-123"
TOKEN = "crash-token-456"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FINAL = {"filled", "rejected", "cancelled", "missed"}
ACCOUNTS = {"f1": ("fast", "F-1"), "f2": ("fast", "F-2"), "s1": ("slow", "S-1")}


class Serve:
    def __init__(self, tmp_path: Path, rules: Path, data: Path, tag: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{tag}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIBROKER_")}
        env.update(MULTIBROKER_WEBHOOK_SECRET=SECRET, MULTIBROKER_ADMIN_TOKEN=TOKEN)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "multibroker", "serve", "--rules", str(rules), "--data", str(data),
                 "--port", str(self.port), "--paper-tick", "0"],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        up = wait_for(lambda: self._healthy(), 20)
        assert up, f"serve did not come up:\n{self.log.read_text()}"

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            status, body = request(f"{self.url}/healthz")
            return status == 200 and body.get("starting") == []  # listening, and every broker had its first try
        except OSError:
            return False

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


def broker_book(data: Path, broker: str) -> dict[str, int]:
    """client_order_id -> how many orders the paper broker holds under it (read from its file, like a statement)."""
    path = data / f"paper-{broker}.db"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as conn:
        rows = conn.execute("select client_order_id, count(*) from orders group by client_order_id").fetchall()
    return dict(rows)


def journal_rows(data: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data / "journal.db") as conn:
        return conn.execute(sql, params).fetchall()


def test_kill_9_mid_fan_out_then_restart_sends_every_acknowledged_order_exactly_once(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", fast_ms=60, slow_ms=20, slow_rate=5)
    data = tmp_path / "data"
    first = Serve(tmp_path, rules, data, "first")
    acknowledged: list[str] = []
    try:
        for n in range(8):
            body = {"secret": SECRET, "strategy": "mirror", "ticker": "MES1!", "quantity": 1, "id": f"crash-{n}",
                    "action": "buy" if n % 2 == 0 else "sell"}
            status, answer = request(f"{first.url}/webhook", body=body)
            assert status == 202, answer
            assert len(answer["decision"]["orders"]) == 3, answer
            acknowledged.append(answer["signal_id"])
        time.sleep(0.3)  # the fast broker is ahead, the slow one has most of its lane still to send
    finally:
        first.kill()

    # What the dead process left: the journal and the brokers' books.
    at_kill = {broker: broker_book(data, broker) for broker in ("fast", "slow")}
    orders = {sid: journal_rows(data, "select client_order_id, account, status from orders where signal_id = ? "
                                      "order by seq", (sid,)) for sid in acknowledged}
    statuses_at_kill = {coid: status for rows in orders.values() for coid, _a, status in rows}
    assert all(len(rows) == 3 for rows in orders.values())
    at_broker_before = {coid for book in at_kill.values() for coid in book}
    not_sent = [coid for coid, status in statuses_at_kill.items() if coid not in at_broker_before]
    assert not_sent, f"the kill came too late to interrupt the fan-out: {statuses_at_kill}"
    assert set(statuses_at_kill.values()) - FINAL, "nothing was in flight at the kill"
    events_before = dict(journal_rows(data, "select client_order_id, count(*) from order_events "
                                            "where status = 'sending' group by client_order_id"))

    second = Serve(tmp_path, rules, data, "second")
    try:
        def settled() -> bool:
            for sid in acknowledged:
                _s, row = request(f"{second.url}/api/signals/{sid}", headers=ADMIN)
                if any(o["status"] not in FINAL for o in row["orders"]):
                    return False
            return True

        assert wait_for(settled, 20), [request(f"{second.url}/api/signals/{sid}", headers=ADMIN)[1]["orders"]
                                       for sid in acknowledged]
        _s, positions = request(f"{second.url}/api/positions", headers=ADMIN)
    finally:
        assert second.stop() == 0, second.log.read_text()

    books = {broker: broker_book(data, broker) for broker in ("fast", "slow")}
    for sid, rows in orders.items():
        for coid, account, _status in rows:
            broker, broker_account = ACCOUNTS[account]
            assert books[broker].get(coid) == 1, f"{sid}/{account}: {coid} held {books[broker].get(coid)} times"
            with sqlite3.connect(data / f"paper-{broker}.db") as conn:
                (held_by,) = conn.execute("select account from orders where client_order_id = ?", (coid,)).fetchone()
            assert held_by == broker_account
    # Nothing else reached the brokers: no order the journal does not know.
    journaled = {coid for rows in orders.values() for coid, _a, _s in rows}
    assert set(books["fast"]) | set(books["slow"]) == journaled

    # Each order reached 'filled', and one that the dead process had already placed was adopted after a lookup,
    # never sent a second time ('sending' appears no more often than before the kill).
    final = dict(journal_rows(data, "select client_order_id, status from orders"))
    assert {final[c] for c in journaled} == {"filled"}
    sending_after = dict(journal_rows(data, "select client_order_id, count(*) from order_events "
                                           "where status = 'sending' group by client_order_id"))
    for coid in at_broker_before:
        assert sending_after.get(coid, 0) == events_before.get(coid, 0), coid
    for coid in not_sent:
        assert sending_after.get(coid, 0) >= 1
    # An order journaled 'sending' that never reached the broker (it was waiting for the rate limiter) was looked
    # up, not found, and only then sent.
    for coid in (c for c in not_sent if statuses_at_kill[c] == "sending"):
        history = journal_rows(data, "select status, detail from order_events where client_order_id = ? order by id",
                               (coid,))
        assert [s for s, _d in history][:4] == ["new", "sending", "unknown", "sending"], history
        assert "not at the broker" in history[2][1]
    # The positions the restarted service reports are the brokers' (alternating buys and sells: flat or 1 long).
    assert positions["positions"] == []
