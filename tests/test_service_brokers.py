"""The whole service over real HTTP against the Tradovate and ProjectX emulators (real sockets on 127.0.0.1).

One strategy mirrored to an account at each broker: a target-position signal fans out to both; a repeat of it
answers with the original and sends nothing; Tradovate drops (a real socket drop), so the next signal fills at
ProjectX and is recorded as missed for the Tradovate account; Tradovate comes back, is reconciled, and its
``catch_up`` account converges to the strategy's current target. Every order exists exactly once at its broker.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from brokers.emulators.projectx import ProjectXEmulator
from service.app import RUNTIME, create_app
from service.config import ServiceConfig
from tests.harness import projectx as px_harness
from tests.harness import tradovate as tv_harness
from tests.test_admin_api import TOKEN, call

SECRET = "emulated-secret"
FAST = {"poll_interval_s": 0.05, "reconnect_backoff_s": 0.05, "reconnect_backoff_max_s": 0.2,
        "reconnect_wait_s": 2.0, "request_timeout_s": 2.0, "throttle_wait_s": 0.2}


def write_rules(directory: Path, tv: Any, px: ProjectXEmulator) -> Path:
    directory.mkdir()
    (directory / "rules.yaml").write_text(f"""
kind: Broker
name: tv
type: tradovate
credentials: {{username: "${{TV_TEST_USER}}", password: "${{TV_TEST_PASS}}", sec: "${{TV_TEST_SEC}}"}}
app: {{app_id: multibroker-tests, app_version: "1.0", cid: 8, device_id: e2e}}
endpoints: {{rest: "{tv.base_url}", websocket: "{tv.ws_url}"}}
rate_limit: {{requests: 1000, per_seconds: 60}}
commissions: {{MES: 0.35, default: 0.79}}
margins: {{MES: 50, default: 500}}
reconcile_every_seconds: 3600
---
kind: Broker
name: px
type: projectx
credentials: {{username: "${{PX_TEST_USER}}", api_key: "${{PX_TEST_KEY}}"}}
endpoints: {{rest: "{px.base_url}", hub: "{px.hub_url}"}}
rate_limit: {{requests: 1000, per_seconds: 60}}
commissions: {{MES: 0.37, default: 0.79}}
margins: {{MES: 50, default: 500}}
reconcile_every_seconds: 3600
---
kind: Account
name: tv-1
broker: tv
broker_account: {tv_harness.ACCOUNT}
capital: 50000
strategies: [es-scalper]
instruments: [MES]
catch_up: true
---
kind: Account
name: px-1
broker: px
broker_account: {px_harness.ACCOUNT}
capital: 50000
strategies: [es-scalper]
instruments: [MES]
---
kind: Routing
name: main
rules:
  - name: mirror-scalper
    match: {{strategy: es-scalper}}
    mode: mirror
""")
    return directory


@pytest.fixture
async def service(aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from service.runtime import Runtime

    for name, value in {**tv_harness.ENV, **px_harness.ENV}.items():
        monkeypatch.setenv(name, value)
    tv = tv_harness.make_emulator()
    px = ProjectXEmulator(username=px_harness.ENV["PX_TEST_USER"], api_key=px_harness.ENV["PX_TEST_KEY"],
                          accounts={px_harness.ACCOUNT: Decimal(50000)})
    await tv.start()
    await px.start()
    try:
        rules = write_rules(tmp_path / "rules", tv, px)
        config = ServiceConfig(rules_dir=rules, data_dir=tmp_path / "data", webhook_secret=SECRET,
                               admin_token=TOKEN, paper_tick_s=0)
        app = create_app(config, runtime_factory=lambda c, j, w: Runtime(c, j, w, connector_options=FAST))
        client = await aiohttp_client(app)
        assert await app[RUNTIME].ready(10.0)  # the service listens before its brokers are up; this test wants them
        yield client, tv, px
        await client.close()
    finally:
        await tv.stop()
        await px.stop()


async def post(client: Any, **fields: Any) -> tuple[int, dict[str, Any]]:
    body = {"secret": SECRET, "strategy": "es-scalper", "ticker": "MES1!", **fields}
    async with client.post("/webhook", data=json.dumps(body), headers={"Content-Type": "text/plain"}) as r:
        return r.status, await r.json()


async def settled(client: Any, signal_id: str, final: set[str]) -> list[dict[str, Any]]:
    for _ in range(400):
        _s, body = await call(client, "GET", f"/api/signals/{signal_id}")
        if body["orders"] and all(o["status"] in final for o in body["orders"]):
            return body["orders"]
        await asyncio.sleep(0.025)
    raise AssertionError(body)


async def positions(client: Any) -> dict[str, int]:
    _s, body = await call(client, "GET", "/api/positions")
    return {p["account"]: p["quantity"] for p in body["positions"] if p["quantity"]}


async def test_fan_out_duplicate_drop_missed_reconnect_and_catch_up_across_two_real_broker_apis(service: Any) -> None:
    client, tv, px = service
    status, first = await post(client, action="buy", quantity=1, position="long", position_size=1, id="e2e-1")
    assert status == 202 and first["decision"]["accepted"], first
    orders = await settled(client, first["signal_id"], {"filled"})
    assert sorted((o["account"], o["broker"], o["quantity"]) for o in orders) == [("px-1", "px", 1), ("tv-1", "tv", 1)]

    status, again = await post(client, action="buy", quantity=1, position="long", position_size=1, id="e2e-1")
    assert status == 200 and again["duplicate"] and again["signal_id"] == first["signal_id"]

    await tv.drop_connection()
    for _ in range(200):
        _s, st = await call(client, "GET", "/api/status")
        if not next(b for b in st["brokers"] if b["name"] == "tv")["connected"]:
            break
        await asyncio.sleep(0.025)
    else:
        raise AssertionError(st)
    status, second = await post(client, action="buy", quantity=1, position="long", position_size=2, id="e2e-2")
    assert status == 202
    assert [o["account"] for o in second["decision"]["orders"]] == ["px-1"]
    assert [(s["account"], s["by"] or s["reason"]) for s in second["decision"]["skipped"]][0][0] == "tv-1"
    orders = await settled(client, second["signal_id"], {"filled", "missed"})
    assert {o["account"]: o["status"] for o in orders} == {"px-1": "filled", "tv-1": "missed"}
    assert await positions(client) == {"px-1": 2, "tv-1": 1}  # tv-1's position stays while its broker is down

    await tv.restore_connection()
    for _ in range(400):  # reconnect with backoff, reconcile, then converge tv-1 to the strategy's target (2)
        if await positions(client) == {"px-1": 2, "tv-1": 2}:
            break
        await asyncio.sleep(0.025)
    assert await positions(client) == {"px-1": 2, "tv-1": 2}
    _s, recon = await call(client, "GET", "/api/reconciliations")
    assert any(r["broker"] == "tv" and r["reason"] == "reconnect" for r in recon["reconciliations"]), recon

    # The broker side: every order the service journaled exists exactly once at its broker.
    _s, listed = await call(client, "GET", "/api/orders")
    sent = [o for o in listed["orders"] if o["status"] != "missed"]
    assert len(sent) == 4  # 2 + 1 + the catch-up order
    for order in sent:
        if order["broker"] == "tv":
            assert tv.order_count(tv_harness.ACCOUNT, order["client_order_id"]) == 1, order
        else:
            assert px.order_count(px.account_id(px_harness.ACCOUNT), order["client_order_id"]) == 1, order
