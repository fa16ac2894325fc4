"""ProjectX harness for the shared broker contract suite: the real connector against ``ProjectXEmulator``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, ClassVar

from brokers.emulators.projectx import DEFAULT_FEES, ProjectXEmulator
from brokers.projectx import ProjectXConnector
from engine.catalog import BUILTIN
from engine.model import Broker, Location, RateLimit
from tests.harness.emulated import EmulatedHarness

ACCOUNT = "PRAC-V2-EMU-1"
ENV = {"PX_TEST_USER": "trader", "PX_TEST_KEY": "emulator-key"}
FAST = {
    "poll_interval_s": 0.05,
    "reconnect_backoff_s": 0.05,
    "reconnect_backoff_max_s": 0.2,
    "reconnect_wait_s": 5.0,
    "request_timeout_s": 5.0,
}


def broker_doc(emulator: ProjectXEmulator | None, *, name: str = "px-emulator", rate_limit: RateLimit | None = None,
               options: dict[str, Any] | None = None) -> Broker:
    """A Broker document pointing at ``emulator`` (what a rules file would say, minus the YAML); ``None``
    leaves the endpoints to the connector's defaults."""
    fees = DEFAULT_FEES if emulator is None else emulator.fees
    endpoints = {} if emulator is None else {"rest": emulator.base_url, "hub": emulator.hub_url}
    return Broker(
        name=name,
        type="projectx",
        environment="demo",
        credentials={"username": "PX_TEST_USER", "api_key": "PX_TEST_KEY"},
        rate_limit=rate_limit or RateLimit(200, 60.0),
        commissions={"MES": fees["MES"], "default": fees["default"]},
        margins={"MES": Decimal(50), "default": Decimal(500)},
        reconcile_every_seconds=60,
        endpoints=endpoints,
        options=options or {},
        source=Location("tests/harness/projectx.py", 1, 1),
    )


@dataclass
class ProjectXHarness(EmulatedHarness):
    connector: ProjectXConnector
    emulator: ProjectXEmulator

    broker_label: ClassVar[str] = "ProjectX"
    remote: ClassVar[str] = "gateway"

    async def broker_order_count(self, client_order_id: str) -> int:
        return self.emulator.order_count(self.emulator.account_id(self.account), client_order_id)


@contextlib.asynccontextmanager
async def make_harness(tmp_path: Path, **connector_options: Any) -> AsyncIterator[ProjectXHarness]:
    emulator = ProjectXEmulator(username=ENV["PX_TEST_USER"], api_key=ENV["PX_TEST_KEY"],
                                accounts={ACCOUNT: Decimal(50000)})
    await emulator.start()
    connector = ProjectXConnector(broker_doc(emulator), env=ENV, **{**FAST, **connector_options})
    try:
        await connector.connect()
        contract = next(c for c in emulator.contracts.values() if c.root == "MES" and c.active)
        yield ProjectXHarness(
            connector=connector,
            emulator=emulator,
            account=ACCOUNT,
            contract=contract.code,
            commission_per_side=emulator.fees["MES"],
            point_value=BUILTIN["MES"].point_value,
        )
    finally:
        await connector.close()
        await emulator.stop()
