"""``multibroker decide`` as a trader runs it: real files in a temp dir, a real process, exit code and output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.loader import load_rules
from tests.conftest import REPO
from tests.test_decide_fixtures import write_rules

STATE_YAML = """\
now: 2026-03-10T10:00:00-04:00
accounts:
  a1: {connected: true, free_margin: 130.00, daily_pnl: 0, positions: {MESH6: 1}}
  a2: {connected: true, free_margin: 5000, daily_pnl: -10.5}
"""


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multibroker", "decide", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    write_rules(tmp_path / "rules")
    (tmp_path / "state.yaml").write_text(STATE_YAML)
    (tmp_path / "signal.json").write_text(json.dumps(
        {"strategy": "scalp", "ticker": "MES1!", "action": "buy", "quantity": 2, "secret": "hunter2"}))
    return tmp_path


def decide(files: Path, state: str = "state.yaml", signal: str = "signal.json") -> subprocess.CompletedProcess[str]:
    return run("--rules", str(files / "rules"), "--state", str(files / state), "--signal", str(files / signal))


def test_prints_the_decision_record(files: Path) -> None:
    proc = decide(files)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["rule"] == "mirror-scalp" and record["accepted"] is True
    assert [(o["account"], o["contract"], o["quantity"]) for o in record["orders"]] == [("a2", "MESH6", 1)]
    assert record["skipped"][0] == {
        "account": "a1", "by": "margin",
        "reason": "free margin 130.00 < required 260.00 (2 x MES @ 100.00 + 30% buffer)"}
    assert record["signal_id"].startswith("sig-") and len(record["signal_id"]) == 20
    assert "hunter2" not in proc.stdout + proc.stderr


def test_a_rejected_signal_still_exits_0(files: Path) -> None:
    (files / "signal.json").write_text(json.dumps({"strategy": "nobody", "ticker": "ES1!", "action": "buy",
                                                   "quantity": 1}))
    proc = decide(files)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["accepted"] is False


def test_the_derived_signal_id_is_stable(files: Path) -> None:
    assert json.loads(decide(files).stdout)["signal_id"] == json.loads(decide(files).stdout)["signal_id"]


@pytest.mark.parametrize("state,signal,message", [
    ("now: 2026-03-10T10:00:00\naccounts: {}\n", None, "now: 2026-03-10 10:00:00 has no UTC offset"),
    ("accounts: {}\n", None, "now: required"),
    ("now: 2026-03-10T10:00:00Z\naccounts: {a1: {connected: yes please, free_margin: 1}}\n", None,
     "accounts.a1.connected: expected true or false"),
    ("now: 2026-03-10T10:00:00Z\naccounts: {a1: {connected: true, free_margin: lots}}\n", None,
     "accounts.a1.free_margin: 'lots' is not a number"),
    ("now: 2026-03-10T10:00:00Z\naccounts: {zz: {connected: true, free_margin: 1}}\n", None,
     "accounts.zz: no such account in the rules"),
    ("now: [unclosed\n", None, "invalid YAML"),
    (None, {"strategy": "scalp", "ticker": "MES1!", "action": "buy"}, "$: 'quantity' is a required property"),
    (None, {"strategy": "scalp", "ticker": "MES1!", "action": "hold", "quantity": 1}, "$.action: 'hold' is not one"),
    (None, {"strategy": "scalp", "ticker": "ZZ1!", "action": "buy", "quantity": 1},
     "$.ticker: ticker 'ZZ1!': unknown instrument"),
    (None, {"strategy": "scalp", "ticker": "MES1!", "action": "buy", "quantity": 1, "extra": 1},
     "$: Additional properties are not allowed ('extra' was unexpected)"),
])
def test_invalid_input_exits_2_with_a_clear_message(files: Path, state: str | None, signal: dict | None,
                                                    message: str) -> None:
    if state is not None:
        (files / "state.yaml").write_text(state)
    if signal is not None:
        (files / "signal.json").write_text(json.dumps(signal))
    proc = decide(files)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_invalid_rules_exit_2_with_their_locations(files: Path) -> None:
    (files / "rules" / "zz.yaml").write_text("kind: Account\nname: x\nbroker: none\nbroker_account: X\ncapital: 1\n")
    proc = decide(files)
    assert proc.returncode == 2
    assert "invalid rules" in proc.stderr and "zz.yaml:3:9" in proc.stderr


def test_broken_json_signal_points_at_the_line(files: Path) -> None:
    (files / "signal.json").write_text('{"strategy": "scalp",\n "ticker": }')
    proc = decide(files)
    assert proc.returncode == 2 and "signal.json:2:" in proc.stderr and "invalid JSON" in proc.stderr


def test_state_as_json_with_paused_and_halted(files: Path) -> None:
    (files / "state.json").write_text(json.dumps({
        "now": "2026-03-10T14:00:00Z", "paused": ["fast"], "halted": {"a2": "manual"},
        "accounts": {"a1": {"connected": True, "free_margin": 5000}, "a2": {"connected": True, "free_margin": 5000}}}))
    proc = decide(files, state="state.json")
    assert proc.returncode == 0, proc.stderr
    assert [(s["account"], s["by"]) for s in json.loads(proc.stdout)["skipped"]][:2] == [
        ("a1", "paused"), ("a2", "paused")]


def test_help_has_an_example() -> None:
    proc = run("--help")
    assert proc.returncode == 0 and "Example: multibroker decide" in proc.stdout


def test_the_record_names_the_rules_it_was_decided_by(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # where ``run`` starts the CLI: the hash covers the rule files' paths as shown from there
    record = json.loads(decide(files).stdout)
    rules = str(files / "rules")
    # The content hash the service's reload records and journaled decisions carry for these files; no generation:
    # only a running service numbers its reloads.
    assert record["ruleset"] == {"content_hash": load_rules([rules]).content_hash, "generation": None}
    edit = sorted((files / "rules").glob("*.yaml"))[0]
    edit.write_text(edit.read_text() + "\n# edited\n")
    edited = json.loads(decide(files).stdout)
    assert edited["ruleset"]["content_hash"] == load_rules([rules]).content_hash != record["ruleset"]["content_hash"]


def test_the_rules_content_hash_does_not_depend_on_where_they_are_read_from(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "deploy" / "rules"
    shutil.copytree(REPO / "rules", rules)
    monkeypatch.chdir(tmp_path)
    relative = load_rules("deploy/rules").content_hash
    monkeypatch.chdir(rules)
    assert load_rules(".").content_hash == relative == load_rules(str(rules)).content_hash
    (rules / "accounts.yaml").write_text((rules / "accounts.yaml").read_text() + "\n# edited\n")
    assert load_rules(str(rules)).content_hash != relative  # the content still counts
