"""``multibroker validate`` as a pre-commit hook and CI step would run it: a real process, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multibroker", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_default_is_rules_dir_and_valid() -> None:
    proc = run("validate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("ok: 13 documents in 5 files")


def test_errors_then_summary_exit_1(rules_dir: Path) -> None:
    (rules_dir / "zz.yaml").write_text("kind: Account\nname: a\nbroker: none\nbroker_account: A\ncapital: 5\n"
                                       "---\nkind: Broker\nname: b\ntype: papr\n")
    proc = run("validate", "rules", cwd=rules_dir.parent)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("rules/zz.yaml:3:9: Account/a: broker: unknown broker 'none'")
    assert lines[1].startswith("rules/zz.yaml:9:7: Broker/b: type:")
    assert lines[-1] == "2 errors in 1 of 6 files (15 documents checked)"
    assert "Traceback" not in proc.stderr


def test_json_format(rules_dir: Path) -> None:
    (rules_dir / "zz.yaml").write_text("kind: Broker\nname: b\ntype: paper\nbogus: 1\n")
    proc = run("validate", str(rules_dir), "--format", "json")
    assert proc.returncode == 1
    [entry] = json.loads(proc.stdout)
    assert entry["line"] == 4 and entry["column"] == 1 and entry["kind"] == "Broker" and entry["name"] == "b"


def test_github_format(rules_dir: Path) -> None:
    (rules_dir / "zz.yaml").write_text("kind: Broker\nname: b\ntype: paper\nbogus: 1\n")
    proc = run("validate", "rules", "--format", "github", cwd=rules_dir.parent)
    assert proc.returncode == 1
    assert proc.stdout.strip() == ("::error file=rules/zz.yaml,line=4,col=1::Broker/b: unknown field 'bogus' "
                                   "(allowed: kind, name, description, type, environment, credentials, rate_limit, "
                                   "commissions, margins, reconcile_every_seconds, endpoints, app, paper, projectx)")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("validate", "--format", "xml").returncode == 2
    assert run("validate", str(tmp_path / "missing")).returncode == 2


def test_every_command_has_help_with_an_example() -> None:
    from multibroker.cli import cli

    import click

    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    assert {"validate", "serve"} <= set(names)
    for name in names:
        command = cli.get_command(ctx, name)
        assert command is not None and command.help, name
        if not hasattr(command, "commands"):
            assert "Example:" in command.help, name


def test_validate_stays_light_for_pre_commit() -> None:
    """The hook runs on every commit: the CLI must not pull in pandas (the calendar) or the engine runtime."""
    code = ("import sys; from multibroker.cli import cli; import click; cli.get_command(click.Context(cli), 'validate'); "
            "heavy = [m for m in ('pandas', 'pandas_market_calendars', 'durable', 'aiohttp') if m in sys.modules]; "
            "print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
