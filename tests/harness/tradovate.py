"""Tradovate harness for the shared broker contract suite: the real connector against ``TradovateEmulator``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, ClassVar

from brokers.emulators.tradovate import DEFAULT_COMMISSIONS, TradovateEmulator
from brokers.tradovate import TradovateConnector
from engine.catalog import BUILTIN
from engine.model import Broker, Location, RateLimit
from engine.symbols import front_contract
from tests.harness.emulated import EmulatedHarness, wait_until

ACCOUNT = "DEMO0001"
ENV = {"TV_TEST_USER": "trader", "TV_TEST_PASS": "secret", "TV_TEST_SEC": "emulator-sec"}
APP = {"app_id": "multibroker-tests", "app_version": "1.0", "cid": 8, "device_id": "harness-device"}
FAST = {
    "poll_interval_s": 0.05,
    "reconnect_backoff_s": 0.05,
    "reconnect_backoff_max_s": 0.2,
    "reconnect_wait_s": 1.0,
    "request_timeout_s": 5.0,
    "throttle_wait_s": 0.2,
}


def broker_doc(emulator: TradovateEmulator | None, *, name: str = "tv-emulator",
               rate_limit: RateLimit | None = None, app: dict[str, Any] | None = None,
               credentials: dict[str, str] | None = None) -> Broker:
    """A Broker document pointing at ``emulator`` (what a rules file would say, minus the YAML); ``None``
    leaves the endpoints to the connector's defaults."""
    commissions = DEFAULT_COMMISSIONS if emulator is None else emulator.commissions
    endpoints = {} if emulator is None else {"rest": emulator.base_url, "websocket": emulator.ws_url}
    return Broker(
        name=name,
        type="tradovate",
        environment="demo",
        credentials=credentials or {"username": "TV_TEST_USER", "password": "TV_TEST_PASS", "sec": "TV_TEST_SEC"},
        rate_limit=rate_limit or RateLimit(80, 60.0),
        commissions={"MES": commissions["MES"], "default": commissions["default"]},
        margins={"MES": Decimal(50), "default": Decimal(500)},
        reconcile_every_seconds=60,
        endpoints=endpoints,
        options={"app": dict(APP if app is None else app)},
        source=Location("tests/harness/tradovate.py", 1, 1),
    )


def make_emulator(**kwargs: Any) -> TradovateEmulator:
    return TradovateEmulator(username=ENV["TV_TEST_USER"], password=ENV["TV_TEST_PASS"], sec=ENV["TV_TEST_SEC"],
                             accounts={ACCOUNT: Decimal(50000)}, **kwargs)


@dataclass
class TradovateHarness(EmulatedHarness):
    connector: TradovateConnector
    emulator: TradovateEmulator

    broker_label: ClassVar[str] = "Tradovate"

    async def broker_order_count(self, client_order_id: str) -> int:
        return self.emulator.order_count(self.account, client_order_id)


@contextlib.asynccontextmanager
async def make_harness(tmp_path: Path, *, emulator_options: dict[str, Any] | None = None,
                       **connector_options: Any) -> AsyncIterator[TradovateHarness]:
    emulator = make_emulator(**(emulator_options or {}))
    await emulator.start()
    connector = TradovateConnector(broker_doc(emulator), env=ENV, **{**FAST, **connector_options})
    try:
        await connector.connect()
        if connector.use_websocket:  # events flow from here on: the suite's event test relies on it
            await wait_until(lambda: connector.websocket_live, what="Tradovate WebSocket sync")
        contract = front_contract(BUILTIN["MES"], datetime.now(timezone.utc))
        yield TradovateHarness(
            connector=connector,
            emulator=emulator,
            account=ACCOUNT,
            contract=contract,
            commission_per_side=emulator.commission(contract),
            point_value=BUILTIN["MES"].point_value,
        )
    finally:
        await connector.close()
        await emulator.stop()
