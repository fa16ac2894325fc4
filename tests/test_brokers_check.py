"""``multibroker brokers check``: measures, flags and fails as a person at 08:00 needs it to."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from brokers.check import BrokerCheck, check_broker, render_json, render_text
from brokers.feed import PriceFeed
from brokers.paper import PaperConnector
from multibroker.cli import cli
from tests.harness.paper import broker_doc


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["brokers", "check", *args])


def test_example_rules_all_paper_brokers_pass(rules_dir: Path) -> None:
    result = run("--rules", str(rules_dir), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    by_name = {b["broker"]: b for b in report["brokers"]}
    assert set(by_name) == {"paper-fast", "paper-slow", "paper-cheap"}
    for entry in by_name.values():
        assert entry["ok"] and entry["error"] is None
        assert entry["account"] and entry["contract"].startswith("MES")
        for key in ("login_ms", "ack_ms", "cancel_ms", "fill_ms", "clock_offset_ms"):
            assert entry[key] is not None, key
        assert 0 <= entry["headroom"] <= 1
    # The configured latencies are what gets measured (lower bounds only: this is not a benchmark).
    assert by_name["paper-slow"]["ack_ms"] >= 190
    assert by_name["paper-slow"]["fill_ms"] >= 240
    assert by_name["paper-fast"]["ack_ms"] >= 14


def test_text_report_and_only_one_broker(rules_dir: Path) -> None:
    result = run("--rules", str(rules_dir), "--broker", "paper-fast")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["broker", "type", "status", "login", "ack", "cancel", "fill", "headroom", "clock"]
    assert lines[1].startswith("paper-fast") and " ok " in lines[1]
    assert lines[-1] == "1 broker(s) checked: 1 ok, 0 failed, 0 flagged (> 500 ms)"


def test_a_failing_broker_exits_1_and_says_why(rules_dir: Path) -> None:
    path = rules_dir / "brokers.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("  seed: 3\n", "  seed: 3\n  reject_rate: 1\n"),
                    encoding="utf-8")
    result = run("--rules", str(rules_dir))
    assert result.exit_code == 1, result.output
    assert "paper-cheap  paper  FAILED" in result.output
    assert "paper-cheap: OrderRejected: paper broker paper-cheap: order rejected (simulated reject_rate)" \
        in result.output
    assert "2 ok, 1 failed" in result.output


def test_rules_that_do_not_load_exit_2(rules_dir: Path) -> None:
    path = rules_dir / "brokers.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("\ntype: paper", "\ntype: papr", 1), encoding="utf-8")
    result = run("--rules", str(rules_dir))
    assert result.exit_code == 2
    assert "do not load" in result.output


def test_unknown_broker_name_is_a_usage_error(rules_dir: Path) -> None:
    result = run("--rules", str(rules_dir), "--broker", "nope")
    assert result.exit_code == 2
    assert "no broker named nope" in result.output


def test_data_dir_keeps_probe_state_for_paper(rules_dir: Path, tmp_path: Path) -> None:
    result = run("--rules", str(rules_dir), "--broker", "paper-fast", "--data-dir", str(tmp_path / "state"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "state" / "paper-paper-fast.db").exists()


async def test_without_an_account_only_the_login_is_checked() -> None:
    broker = broker_doc("lonely")
    result = await check_broker(broker, None, connector_options={"feed": PriceFeed(seed=0)})
    assert result.ok and result.login_ms is not None
    assert result.ack_ms is None and result.fill_ms is None
    assert result.notes == ["no Account uses this broker: login checked, order probe skipped"]


def _ruleset(broker_name: str, account: str, instruments: tuple[str, ...] | None = None) -> Any:
    """Just what the probe reads from a RuleSet: the accounts and the catalog."""
    from engine.catalog import Catalog

    acct = SimpleNamespace(broker=broker_name, broker_account=account, instruments=instruments)
    return SimpleNamespace(accounts={"a": acct}, catalog=Catalog())


async def test_a_broker_that_does_not_answer_times_out() -> None:
    broker = broker_doc("sleepy", paper={"ack_latency_ms": 5000})
    result = await check_broker(broker, _ruleset("sleepy", "ACC"), timeout_s=0.2,
                                connector_options={"feed": PriceFeed(seed=0)})
    assert not result.ok
    assert result.error == "no answer within 0.2s"


async def test_a_skewed_broker_clock_is_flagged_but_not_failed() -> None:
    class SkewedPaper(PaperConnector):
        async def server_time(self) -> datetime:
            return datetime.now(timezone.utc) + timedelta(seconds=2)

    broker = broker_doc("skewed")
    result = await check_broker(broker, _ruleset("skewed", "ACC", ("ES",)), factory=SkewedPaper,
                                connector_options={"feed": PriceFeed(seed=0)})
    assert result.ok
    assert result.contract is not None and result.contract.startswith("ES")
    assert result.clock_offset_ms is not None and 1900 < result.clock_offset_ms < 2500
    assert result.flags == [f"clock offset {result.clock_offset_ms:+.0f} ms beyond ±500 ms"]


async def test_the_probe_leaves_no_working_order_and_a_flat_position(tmp_path: Path) -> None:
    feed = PriceFeed(seed=0)
    feed.set_price("MES", Decimal("6000"))
    broker = broker_doc("tidy")
    result = await check_broker(broker, _ruleset("tidy", "ACC"),
                                connector_options={"feed": feed, "data_dir": tmp_path})
    assert result.ok, result.error
    async with PaperConnector(broker, feed=feed, data_dir=tmp_path) as conn:
        assert await conn.working_orders("ACC") == []
        assert await conn.positions("ACC") == []
        fills = await conn.fills_since("ACC", datetime.now(timezone.utc) - timedelta(minutes=1))
        assert sorted(f.side.value for f in fills) == ["buy", "sell"]
        cancelled = [o for o in [await conn.find_order("ACC", f"{f.client_order_id[:-2]}-L") for f in fills] if o]
        assert cancelled and all(o.status.value == "cancelled" and o.limit_price == Decimal("3000.00")
                                 for o in cancelled)


def test_slow_values_are_flagged_and_marked() -> None:
    slow = BrokerCheck("slowpoke", "paper", ok=True, login_ms=20.0, ack_ms=612.0, fill_ms=80.0, headroom=0.5,
                       clock_offset_ms=-30.0)
    slow.flag_slow()
    assert slow.flags == ["ack latency 612 ms > 500 ms"]
    text = render_text([slow])
    assert "612 ms!" in text and "-30 ms" in text and "50%" in text
    assert "slowpoke: ack latency 612 ms > 500 ms" in text
    assert text.splitlines()[-1] == "1 broker(s) checked: 1 ok, 0 failed, 1 flagged (> 500 ms)"
    assert json.loads(render_json([slow]))["brokers"][0]["flags"] == slow.flags


async def test_against_the_projectx_emulator() -> None:
    emulator_module = pytest.importorskip("brokers.emulators.projectx", reason="ProjectX emulator not in tree yet")
    harness = pytest.importorskip("tests.harness.projectx", reason="ProjectX harness not in tree yet")
    emulator = emulator_module.ProjectXEmulator(username=harness.ENV["PX_TEST_USER"],
                                                api_key=harness.ENV["PX_TEST_KEY"],
                                                accounts={harness.ACCOUNT: Decimal(50000)})
    await emulator.start()
    try:
        broker = harness.broker_doc(emulator)
        result = await check_broker(broker, _ruleset(broker.name, harness.ACCOUNT), timeout_s=10,
                                    connector_options={"env": harness.ENV, **harness.FAST})
        assert result.ok, result.error
        assert result.ack_ms is not None and result.cancel_ms is not None
        assert result.fill_ms is None  # no market orders at a real broker
        assert result.clock_offset_ms is not None and abs(result.clock_offset_ms) < 500
        probes = [o for o in emulator.orders.values() if (o.custom_tag or "").startswith("check-")]
        assert [o.status for o in probes] == [emulator_module.STATUS_CANCELLED]
    finally:
        await emulator.stop()
