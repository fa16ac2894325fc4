"""``multibroker serve`` as a newcomer runs it: a real process on 127.0.0.1, no secrets in the environment, the
example rules on paper brokers; then a signal, a hot reload, a clean stop and a restart on the same journal."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(url: str, *, body: Any = None, headers: dict[str, str] | None = None,
            method: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})} if data is not None else headers or {}
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Server:
    """``multibroker serve`` in a subprocess; ``brokers``: also wait until every broker had its first connect (the
    service listens before that)."""

    def __init__(self, tmp_path: Path, rules_dir: Path, *, brokers: bool = True, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tmp_path / "data"
        self.log = tmp_path / f"serve-{self.port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MULTIBROKER_")}
        environ.update(env or {})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "multibroker", "serve", "--rules", str(rules_dir), "--data", str(self.data),
                 "--port", str(self.port), "--paper-tick", "0.2", *args],
                cwd=tmp_path, env=environ, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                status, body = request(f"{self.url}/healthz")
                if status == 200 and (not brokers or body.get("starting") == []):
                    self.health = body
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"serve did not come up:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


def wait_for(check: Any, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_serve_with_no_secrets_set_runs_the_example_rules_and_survives_a_restart(tmp_path: Path,
                                                                                 rules_dir: Path) -> None:
    server = Server(tmp_path, rules_dir)
    try:
        secret_file, token_file = server.data / "webhook-secret", server.data / "admin-token"
        for path in (secret_file, token_file):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        secret, token = secret_file.read_text().strip(), token_file.read_text().strip()
        admin = {"Authorization": f"Bearer {token}"}

        body = {"secret": secret, "strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 2,
                "id": "e2e-1"}
        assert request(f"{server.url}/webhook", body={**body, "secret": "wrong"})[0] == 401
        status, answer = request(f"{server.url}/webhook", body=body, headers={"Content-Type": "text/plain"})
        assert status == 202, answer
        signal_id = answer["signal_id"]
        accounts = [o["account"] for o in answer["decision"]["orders"]]
        # Outside a schedule block the three followers trade; inside one (15:50-18:00 ET) none does.
        assert accounts in (["apex-1", "apex-2", "topstep-1"], [])

        def settled() -> Any:
            _s, row = request(f"{server.url}/api/signals/{signal_id}", headers=admin)
            final = all(o["status"] in ("filled", "rejected", "missed") for o in row["orders"])
            return row if final else None

        row = wait_for(settled)
        assert row, "orders did not settle"
        assert [o["account"] for o in row["orders"]] == accounts
        assert all(o["status"] == "filled" for o in row["orders"])
        assert "secret" not in row["raw"]

        # The pre-flight broker check ran beside the service and its report is in the log.
        assert wait_for(lambda: "broker(s) checked" in server.log.read_text(), 20), server.log.read_text()
        log_text = server.log.read_text()
        assert "brokers check: 3 broker(s) checked: 3 ok, 0 failed" in log_text, log_text
        assert secret not in log_text and token not in log_text

        # The newcomer's demo finds the generated secret and token in the data directory.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIBROKER_")}
        demo = subprocess.run([sys.executable, "-m", "multibroker", "demo", "--url", server.url, "--count", "3",
                               "--interval", "0", "--data", str(server.data)], capture_output=True, text=True,
                              timeout=30, env=env)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        lines = demo.stdout.splitlines()
        assert [line.split("-> ")[1][:3] for line in lines[:3]] == ["202"] * 3
        assert "accounts (daily P&L, USD):" in demo.stdout and secret not in demo.stdout
        # Inside a schedule block the demo says why nothing moved; outside one it has no such excuse to print.
        hint = "no signal made an order: the rules block entries right now"
        if answer["decision"]["blocked_by"]:
            assert hint in demo.stdout and answer["decision"]["blocked_by"] in demo.stdout, demo.stdout
        if accounts:
            assert hint not in demo.stdout, demo.stdout

        # Hot reload: a bad edit is refused and shown with its place; the live rules keep running.
        (rules_dir / "zz-broken.yaml").write_text("kind: Account\nname: ghost\nbroker: nowhere\n")
        status_of = lambda: request(f"{server.url}/api/status", headers=admin)[1]  # noqa: E731
        last = wait_for(lambda: (s := status_of())["rules"]["last_reload"]["outcome"] == "invalid" and s)
        assert last, status_of()
        assert any("zz-broken.yaml:" in e for e in last["rules"]["last_reload"]["errors"])
        assert last["rules"]["generation"] == 1
        (rules_dir / "zz-broken.yaml").unlink()
        (rules_dir / "accounts.yaml").write_text((rules_dir / "accounts.yaml").read_text() + "\n# edited\n")
        assert wait_for(lambda: status_of()["rules"]["generation"] == 2), status_of()
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()
    log = server.log.read_text()
    assert str(secret_file.name) in log and secret not in log and token not in log

    again = Server(tmp_path, rules_dir)
    try:
        assert (server.data / "webhook-secret").read_text().strip() == secret
        status, answer = request(f"{again.url}/webhook", body=body)
        assert (status, answer["signal_id"], answer["duplicate"]) == (200, signal_id, True)
    finally:
        assert again.stop() == 0


def test_serve_refuses_invalid_rules_with_their_place(tmp_path: Path, rules_dir: Path) -> None:
    (rules_dir / "zz-broken.yaml").write_text("kind: Account\nname: ghost\nbroker: nowhere\n")
    proc = subprocess.run([sys.executable, "-m", "multibroker", "serve", "--rules", str(rules_dir), "--data",
                           str(tmp_path / "data"), "--port", str(free_port())], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 1
    assert "zz-broken.yaml:" in proc.stderr


def test_serve_listens_while_a_broker_hangs_in_its_login(tmp_path: Path) -> None:
    """A ProjectX broker whose gateway accepts the connection and never answers (its login waits for the request
    timeout, 10 s): the port opens at once, webhooks are answered, the paper broker trades and the hanging broker's
    mirror account is journaled missed; SIGTERM still stops the service cleanly."""
    from tests.harness.runtime import write_rules  # noqa: PLC0415 - the crash-safety rules, one broker more

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the handshakes; nobody ever reads or answers
    gateway = f"http://127.0.0.1:{silent.getsockname()[1]}"
    rules = write_rules(tmp_path / "rules")
    with open(rules / "brokers.yaml", "a") as fh:
        fh.write(f"""---
kind: Broker
name: px
type: projectx
credentials: {{username: "${{PX_E2E_USER}}", api_key: "${{PX_E2E_KEY}}"}}
endpoints: {{rest: "{gateway}", hub: "{gateway}/hubs/user"}}
commissions: {{MES: 0.10, default: 0.50}}
margins: {{MES: 50, default: 500}}
reconcile_every_seconds: 3600
""")
    with open(rules / "accounts.yaml", "a") as fh:
        fh.write("---\nkind: Account\nname: x1\nbroker: px\nbroker_account: PX-1\ncapital: 50000\n"
                 "strategies: [mirror]\ninstruments: [MES]\ncatch_up: true\n")
    secret, token = "hang-secret", "hang-token"
    env = {"PX_E2E_USER": "trader", "PX_E2E_KEY": "px-key", "MULTIBROKER_WEBHOOK_SECRET": secret,
           "MULTIBROKER_ADMIN_TOKEN": token}
    spawned = time.monotonic()
    server = Server(tmp_path, rules, brokers=False, env=env, args=("--no-startup-check",))
    try:
        # Well inside the login's 10 s timeout, which the old start-up waited for before opening the port.
        assert time.monotonic() - spawned < 8, "the port opened only after the hanging login gave up"
        assert server.health["status"] == "ok" and "px" in server.health["starting"], server.health
        admin = {"Authorization": f"Bearer {token}"}
        assert wait_for(lambda: request(f"{server.url}/healthz")[1]["starting"] == ["px"]), server.log.read_text()
        _s, status = request(f"{server.url}/api/status", headers=admin)
        assert {b["name"]: b["state"] for b in status["brokers"]} == {"fast": "up", "slow": "up", "px": "starting"}

        body = {"secret": secret, "strategy": "mirror", "ticker": "MES1!", "action": "buy", "quantity": 1,
                "position": "long", "position_size": 1, "id": "hang-1"}
        code, answer = request(f"{server.url}/webhook", body=body)
        assert code == 202, answer
        assert sorted(o["account"] for o in answer["decision"]["orders"]) == ["f1", "f2", "s1"]

        def settled() -> Any:
            _c, row = request(f"{server.url}/api/signals/{answer['signal_id']}", headers=admin)
            got = {o["account"]: o["status"] for o in row["orders"]}
            return got if got == {"f1": "filled", "f2": "filled", "s1": "filled", "x1": "missed"} else None

        assert wait_for(settled), request(f"{server.url}/api/signals/{answer['signal_id']}", headers=admin)[1]
        log = server.log.read_text()
        listening = [line for line in log.splitlines() if "multibroker listening on http://127.0.0.1:" in line]
        assert len(listening) == 1 and "brokers still coming up:" in listening[0], log
        assert "px (starting)" in listening[0], log
        assert "px-key" not in log
    finally:
        code = server.stop()
        silent.close()
    assert code == 0, server.log.read_text()
