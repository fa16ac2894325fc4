"""Tradovate harness for the shared broker contract suite: the real connector against ``TradovateEmulator``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

from brokers.emulators.tradovate import DEFAULT_COMMISSIONS, TradovateEmulator
from brokers.tradovate import TradovateConnector
from engine.catalog import BUILTIN
from engine.model import Broker, Location, RateLimit
from engine.symbols import front_contract

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
class TradovateHarness:
    connector: TradovateConnector
    emulator: TradovateEmulator
    account: str
    contract: str
    commission_per_side: Decimal
    point_value: Decimal

    def set_price(self, price: Decimal) -> None:
        self.emulator.set_price(self.contract, price)

    def reject_next(self, n: int = 1) -> None:
        self.emulator.reject_next(n)

    def partial_fill_next(self, parts: list[int]) -> None:
        self.emulator.partial_fill_next(parts)

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2) -> None:
        self.emulator.rate_limit_next(n, retry_after_s)

    def lose_next_place_response(self) -> None:
        self.emulator.lose_next_place_response()

    async def drop_connection(self) -> None:
        await self.emulator.drop_connection()

    async def restore_connection(self) -> None:
        """Bring the broker back and wait (bounded) until the connector has reconnected by itself."""
        await self.emulator.restore_connection()
        deadline = time.monotonic() + 5.0
        while not self.connector.connected:
            if time.monotonic() > deadline:
                raise TimeoutError("Tradovate connector did not reconnect within 5 s of the broker coming back")
            await asyncio.sleep(0.02)

    async def broker_order_count(self, client_order_id: str) -> int:
        return self.emulator.order_count(self.account, client_order_id)


async def wait_until(predicate: Any, timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate()`` (bounded) — for state the connector reaches in the background."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:g}s")
        await asyncio.sleep(0.01)


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
