"""/metrics and /api/dashboard over real HTTP, through the real runtime and paper brokers.

/metrics is parsed with the Prometheus text parser (prometheus_client.parser), and its figures are checked against
what happened: one accepted signal fanned out to three accounts, a rejected one, a failed rules reload.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import JOURNAL, RUNTIME, WATCHER, create_app
from service.config import ServiceConfig
from tests.test_admin_api import AUTH, TOKEN, call
from tests.test_webhook import NOW, SECRET, scalper


@pytest.fixture
async def service(aiohttp_client: Any, tmp_path: Path, rules_dir: Path) -> Any:
    from service.runtime import Runtime

    config = ServiceConfig(rules_dir=rules_dir, data_dir=tmp_path / "data", webhook_secret=SECRET,
                           admin_token=TOKEN, paper_tick_s=0)
    app = create_app(replace(config), runtime_factory=lambda c, j, w: Runtime(c, j, w, clock=lambda: NOW))
    client = await aiohttp_client(app)
    assert await app[RUNTIME].ready(10.0)  # the service listens before its brokers are up; this test wants them up
    return client, app


async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with client.get("/metrics") as r:  # no token: Prometheus scrapes it as is
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def filled(client: Any, signal_id: str) -> dict[str, Any]:
    for _ in range(300):
        _s, body = await call(client, "GET", f"/api/signals/{signal_id}")
        if body["orders"] and all(o["status"] == "filled" for o in body["orders"]):
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(body)


async def test_metrics_count_what_happened_and_parse_as_prometheus_text(service: Any, rules_dir: Path) -> None:
    client, app = service
    async with client.post("/webhook", data=json.dumps(scalper())) as r:
        assert r.status == 202
        signal_id = (await r.json())["signal_id"]
    async with client.post("/webhook", data=json.dumps(scalper(secret="wrong"))) as r:
        assert r.status == 401
    await filled(client, signal_id)

    m = await scrape(client)
    assert value(m, "multibroker_signals_total", outcome="accepted") == 1
    assert value(m, "multibroker_signals_total", outcome="rejected") == 1
    assert value(m, "multibroker_orders_total", broker="paper-fast", status="filled") == 2  # apex-1, apex-2
    assert value(m, "multibroker_orders_total", broker="paper-slow", status="filled") == 1  # topstep-1
    assert value(m, "multibroker_orders_total", broker="paper-fast", status="sending") == 2
    assert value(m, "multibroker_webhook_latency_seconds_count") == 2
    sent = sum(value(m, "multibroker_dispatch_latency_seconds_count", broker=b) for b in ("paper-fast", "paper-slow"))
    assert sent == 3
    assert value(m, "multibroker_rules_last_reload_successful") == 1
    for broker in ("paper-fast", "paper-slow", "paper-cheap"):
        assert value(m, "multibroker_rate_limit_waits_total", broker=broker) >= 0
    accounts = {dict(k[1])["account"] for k in m if k[0] == "multibroker_account_margin_buffer_usd"}
    assert accounts == {"apex-1", "apex-2", "topstep-1", "micro-a", "micro-b", "micro-c", "swing-1"}

    # The same figures as the dashboard (one computation, two views).
    status, dash = await call(client, "GET", "/api/dashboard")
    assert status == 200
    a1 = next(a for a in dash["portfolio"]["accounts"] if a["name"] == "apex-1")
    assert value(m, "multibroker_account_margin_buffer_usd", account="apex-1", broker="paper-fast") == \
        float(a1["buffer_left"])
    assert [(p["contract"], p["quantity"]) for p in a1["positions"]] == [("MESH6", 2)]
    shown = {sig["signal_id"]: sig for sig in dash["signals"]}
    assert shown[signal_id]["decision"]["accepted"] and len(shown) == 2  # the rejected one shows too
    assert dash["attention"] == []  # every order went as decided (a refused webhook has no orders)

    # A second scrape does not count the same rows again; a failed reload shows at once.
    (rules_dir / "zz-broken.yaml").write_text("kind: Account\nname: ghost\nbroker: nowhere\n")
    await app[WATCHER].reload_now()
    m = await scrape(client)
    assert value(m, "multibroker_signals_total", outcome="accepted") == 1
    assert value(m, "multibroker_rules_last_reload_successful") == 0
    assert value(m, "multibroker_rule_reloads_total", result="invalid") == 1
    status, dash = await call(client, "GET", "/api/dashboard")
    assert dash["rules"]["last_reload"]["ok"] is False
    assert any("zz-broken.yaml:1:1: Account/ghost" in e for e in dash["rules"]["last_reload"]["errors"]), dash["rules"]


async def test_the_dashboard_stream_pushes_a_new_snapshot_when_something_changes(service: Any) -> None:
    client, _app = service
    async with client.get("/api/dashboard/stream") as r:
        assert r.status == 401
    async with client.get("/api/dashboard/stream", headers=AUTH) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        first = await next_snapshot(r)
        assert first["signals"] == []
        async with client.post("/webhook", data=json.dumps(scalper())) as w:
            assert w.status == 202
            signal_id = (await w.json())["signal_id"]
        while True:
            snap = await asyncio.wait_for(next_snapshot(r), 10)
            if snap["signals"] and any(a["positions"] for a in snap["portfolio"]["accounts"]):
                break
        assert snap["signals"][0]["signal_id"] == signal_id


async def next_snapshot(response: Any) -> dict[str, Any]:
    buffer = b""
    while b"\n\n" not in buffer:
        buffer += await response.content.readline()
    frame = buffer.decode()
    assert frame.startswith("event: snapshot\n"), frame
    return json.loads(frame.split("data: ", 1)[1])


async def test_the_dashboard_puts_orders_that_missed_their_broker_on_top(service: Any) -> None:
    """A paused broker's mirror order is journaled ``missed``: the page lists it with what it means, and nothing
    that went as decided."""
    client, _app = service
    status, _body = await call(client, "POST", "/api/brokers/paper-slow/pause", headers=AUTH)
    assert status == 200
    async with client.post("/webhook", data=json.dumps(scalper())) as r:
        assert r.status == 202
        signal_id = (await r.json())["signal_id"]
    for _ in range(300):
        _s, dash = await call(client, "GET", "/api/dashboard")
        if dash["attention"]:
            break
        await asyncio.sleep(0.02)
    rows = dash["attention"]
    assert [(o["account"], o["broker"], o["status"], o["intent"], o["signal_id"]) for o in rows] == \
        [("topstep-1", "paper-slow", "missed", "entry", signal_id)], rows
    assert "behind its strategy" in rows[0]["meaning"] and "paused" in rows[0]["detail"]


async def test_the_dashboard_lists_the_days_alerts_and_not_bookkeeping(service: Any) -> None:
    """Risk events of the trading day that a trader must see (a flatten that could not close, a halt) are listed;
    bookkeeping (day-start marks) and earlier days are not."""
    client, app = service
    journal = app[JOURNAL]
    base = {"scope": "account", "name": "apex-1", "source": "test"}
    await journal.record_risk_event({**base, "kind": "flatten_failed", "reason": "flatten f1 could not close apex-1",
                                     "at": NOW})
    await journal.record_risk_event({**base, "kind": "day_start", "reason": "marks", "at": NOW})
    await journal.record_risk_event({**base, "kind": "halt", "reason": "yesterday's halt",
                                     "at": NOW - timedelta(days=1)})
    _s, dash = await call(client, "GET", "/api/dashboard")
    assert [(a["kind"], a["name"], a["reason"]) for a in dash["alerts"]] == \
        [("flatten_failed", "apex-1", "flatten f1 could not close apex-1")]
