"""Alerts pushed to a chat webhook (service/notify.py): against a real HTTP endpoint on 127.0.0.1 that records what
it receives and answers as told, then from the running service (broker drops, halts, missed orders, operator
pauses) and through `create_app` with the settings read from the environment."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from service.config import ConfigError, ServiceConfig
from service.notify import DISCORD_MAX, Alert, Notifier, infer_format, render
from tests.harness.runtime import Clock, signal, wait_until, world
from tests.test_risk_monitor import et

TOKEN = "T0KEN-s3cret-path"
AT = datetime(2026, 3, 11, 15, 30, tzinfo=timezone.utc)  # 11:30 ET (EDT)


class Endpoint:
    """A chat webhook stand-in: records every request (time, path, JSON body) and answers from ``script``
    ((status, headers) per request in turn, then 204)."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, str, Any]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((time.monotonic(), request.path_qs, await request.json()))
        status, headers = self.script.pop(0) if self.script else (204, {})
        return web.Response(status=status, headers=headers)

    def bodies(self) -> list[Any]:
        return [body for _t, _p, body in self.requests]


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint()
    app = web.Application()
    app.router.add_post("/{tail:.*}", ep.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    ep.url = f"http://127.0.0.1:{port}/hooks/{TOKEN}"
    try:
        yield ep
    finally:
        await runner.cleanup()


def quick(url: str, **options: Any) -> Notifier:
    return Notifier(url=url, batch_s=options.pop("batch_s", 0.05), retry_delays_s=options.pop("retry", (0.05,)),
                    **options)


# -- settings -------------------------------------------------------------------------------------------------------

def test_the_format_follows_the_url_and_the_url_is_never_shown() -> None:
    assert infer_format("https://discord.com/api/webhooks/1/abc") == "discord"
    assert infer_format("https://ptb.discord.com/api/webhooks/1/abc") == "discord"
    assert infer_format("https://hooks.slack.com/services/T/B/x") == "slack"
    assert infer_format("https://api.telegram.org/bot1:x/sendMessage?chat_id=5") == "telegram"
    assert infer_format("https://example.net/alerts") == "json"
    n = Notifier(url=f"https://hooks.slack.com/services/{TOKEN}")
    assert n.fmt == "slack" and n.status()["target"] == "https://hooks.slack.com"
    assert TOKEN not in repr(n) and TOKEN not in json.dumps(n.status())
    assert Notifier(url="https://example.net/x", fmt="discord").fmt == "discord"  # an explicit format wins
    off = Notifier()
    assert not off.enabled and off.status()["target"] is None
    off.notify("halt", "nobody listens", at=AT)  # a no-op, not an error
    assert off.status()["queued"] == 0


@pytest.mark.parametrize(("env", "needle"), [
    ({"MULTIBROKER_NOTIFY_URL": f"ftp://example.net/{TOKEN}"}, "MULTIBROKER_NOTIFY_URL"),
    ({"MULTIBROKER_NOTIFY_URL": f"https://api.telegram.org/bot{TOKEN}/sendMessage"}, "chat_id"),
    ({"MULTIBROKER_NOTIFY_URL": "https://example.net/x", "MULTIBROKER_NOTIFY_FORMAT": "email"},
     "MULTIBROKER_NOTIFY_FORMAT"),
    ({"MULTIBROKER_NOTIFY_MIN_SEVERITY": "loud"}, "MULTIBROKER_NOTIFY_MIN_SEVERITY"),
])
def test_settings_that_cannot_work_stop_the_start_naming_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServiceConfig.from_env(env)
    assert needle in str(caught.value) and TOKEN not in str(caught.value)


# -- formats --------------------------------------------------------------------------------------------------------

def test_each_format_says_what_where_and_when_in_eastern_time() -> None:
    alerts = [Alert("halt", "daily loss 150 reached limit 100", AT, account="f1", broker="fast"),
              Alert("broker_down", "connection lost", AT, broker="slow")]
    generic = render("json", alerts)
    assert generic == {"source": "multibroker", "alerts": [
        {"kind": "halt", "severity": "critical", "message": "daily loss 150 reached limit 100",
         "at": "2026-03-11T15:30:00Z", "account": "f1", "broker": "fast"},
        {"kind": "broker_down", "severity": "warning", "message": "connection lost", "at": "2026-03-11T15:30:00Z",
         "broker": "slow"}]}
    text = render("discord", alerts)["content"]
    assert text.splitlines() == [
        "[critical] halt broker fast account f1: daily loss 150 reached limit 100 (11:30:00 ET)",
        "[warning] broker_down broker slow: connection lost (11:30:00 ET)"]
    assert render("slack", alerts) == {"text": text}
    assert render("telegram", alerts, chat_id="42") == {"chat_id": "42", "text": text}


def test_a_long_batch_is_cut_to_fit_a_chat_message_and_says_how_many_more() -> None:
    alerts = [Alert("missed", f"s-{n}: f1 buy 1 MESH6 not sent (broker away)", AT, broker="slow") for n in range(100)]
    text = render("discord", alerts)["content"]
    lines = text.splitlines()
    assert len(text) <= DISCORD_MAX
    shown = len(lines) - 1
    assert 10 < shown < 100 and lines[-1].startswith(f"... and {100 - shown} more")
    assert lines[:shown] == [a.line() for a in alerts[:shown]]
    assert len(render("json", alerts)["alerts"]) == 100  # JSON endpoints get every alert


# -- delivery -------------------------------------------------------------------------------------------------------

async def test_alerts_raised_together_go_out_as_one_message(endpoint: Endpoint) -> None:
    n = quick(endpoint.url)
    await n.start()
    try:
        n.notify("broker_down", "connection lost", at=AT, broker="slow")
        n.notify("missed", "s-1: 3 orders not sent", at=AT, broker="slow")
        n.notify("day_start", "routine, never sent", at=AT)
        await wait_until(lambda: n.status()["sent"] == 2, what="one batch delivered")
        await asyncio.sleep(0.1)
    finally:
        await n.stop()
    assert len(endpoint.requests) == 1 and endpoint.requests[0][1] == f"/hooks/{TOKEN}"
    assert [a["kind"] for a in endpoint.bodies()[0]["alerts"]] == ["broker_down", "missed"]
    status = n.status()
    assert status["failed"] == status["dropped"] == status["queued"] == 0 and status["last_sent_at"] is not None


async def test_a_failed_post_is_retried_and_a_429_waits_as_long_as_asked(endpoint: Endpoint) -> None:
    endpoint.script = [(500, {}), (429, {"Retry-After": "0.3"})]
    n = quick(endpoint.url, retry=(0.01, 0.01, 0.01))
    await n.start()
    try:
        n.notify("halt", "daily loss reached", at=AT, account="f1")
        await wait_until(lambda: n.status()["sent"] == 1, what="delivered after two failures")
    finally:
        await n.stop()
    times = [t for t, _p, _b in endpoint.requests]
    assert len(times) == 3 and endpoint.bodies()[0] == endpoint.bodies()[2]
    assert times[2] - times[1] >= 0.29  # Retry-After, not the 0.01 s of its own schedule
    assert n.status()["last_error"] is None and n.status()["failed"] == 0


async def test_a_refused_url_is_not_retried_and_a_dead_endpoint_never_blocks_the_caller(endpoint: Endpoint) -> None:
    endpoint.script = [(404, {})]
    n = quick(endpoint.url, retry=(0.01, 0.01))
    await n.start()
    try:
        n.notify("halt", "x", at=AT, account="f1")
        await wait_until(lambda: n.status()["failed"] == 1, what="given up")
    finally:
        await n.stop()
    assert len(endpoint.requests) == 1 and n.status()["last_error"] == "HTTP 404"

    dead = quick(f"http://127.0.0.1:9/hooks/{TOKEN}", retry=(0.01, 0.01))  # port 9 (discard): nobody listens
    await dead.start()
    try:
        started = time.monotonic()
        for k in range(50):
            dead.notify("missed", f"s-{k}", at=AT, broker="slow")
        assert time.monotonic() - started < 0.05  # queued, not sent, by the caller
        await wait_until(lambda: dead.status()["failed"] == 50, what="three attempts, then given up")
    finally:
        await dead.stop()
    assert dead.status()["last_error"] in ("ClientConnectorError", "ClientOSError")
    assert TOKEN not in json.dumps(dead.status())


async def test_while_the_endpoint_is_away_the_newest_alerts_are_kept(endpoint: Endpoint) -> None:
    n = quick(endpoint.url, max_queued=3)
    for k in range(5):
        n.notify("missed", f"s-{k}", at=AT)
    assert n.status()["dropped"] == 2 and n.status()["queued"] == 3
    await n.start()
    try:
        await wait_until(lambda: n.status()["sent"] == 3, what="the kept ones delivered")
    finally:
        await n.stop()
    assert [a["message"] for a in endpoint.bodies()[0]["alerts"]] == ["s-2", "s-3", "s-4"]


async def test_a_minimum_severity_keeps_the_rest_off_the_phone(endpoint: Endpoint) -> None:
    n = quick(endpoint.url, min_severity="critical")
    await n.start()
    try:
        n.notify("broker_up", "reconnected", at=AT, broker="slow")
        n.notify("broker_down", "lost", at=AT, broker="slow")
        n.notify("flatten_failed", "retries ran out", at=AT, account="f1")
        await wait_until(lambda: n.status()["sent"] == 1)
    finally:
        await n.stop()
    assert [a["kind"] for a in endpoint.bodies()[0]["alerts"]] == ["flatten_failed"]


async def test_stopping_sends_what_is_queued(endpoint: Endpoint) -> None:
    n = quick(endpoint.url, batch_s=5.0)  # the batch window would hold it past the stop
    await n.start()
    n.notify("halt", "at shutdown", at=AT, account="f1")
    await n.stop()
    assert [a["message"] for a in endpoint.bodies()[0]["alerts"]] == ["at shutdown"]


# -- from the running service ---------------------------------------------------------------------------------------

async def test_the_service_tells_of_drops_halts_missed_orders_and_operator_pauses(tmp_path: Path,
                                                                                   endpoint: Endpoint) -> None:
    clock = Clock(et(11, 11, 0))
    async with world(tmp_path, clock=clock, rules={"account_loss": 100}) as w:
        rt = w.runtime
        rt.notifier = quick(endpoint.url, batch_s=0.02)
        await rt.notifier.start()

        def kinds() -> list[tuple[str, str | None, str | None]]:
            return [(a["kind"], a.get("broker"), a.get("account")) for b in endpoint.bodies() for a in b["alerts"]]

        w.connector("slow").disconnect("test drop")
        await wait_until(lambda: rt.pool["slow"].down, what="slow down")
        await w.submit(signal("mirror", "buy", 1, sid="while-down"))  # s1 (slow) misses it
        await wait_until(lambda: ("missed", "slow", None) in kinds(), what="missed alert")
        assert ("broker_down", "slow", None) in kinds()
        missed = next(a for b in endpoint.bodies() for a in b["alerts"] if a["kind"] == "missed")
        assert "s1 buy 1" in missed["message"]

        await w.connector("slow").reconnect()
        await wait_until(lambda: ("broker_up", "slow", None) in kinds(), what="back")
        await w.settle()

        w.feed.set_price("MES", Decimal("4900"))  # 1 x -100 x 5 = -500: every holder breaches 100
        await rt.check_risk()
        await wait_until(lambda: ("halt", "fast", "f1") in kinds(), what="halt alert")
        halt = next(a for b in endpoint.bodies() for a in b["alerts"] if a["kind"] == "halt")
        assert halt["severity"] == "critical" and "account-loss" in halt["message"]

        await rt.pause_broker("fast")
        await rt.resume_broker("fast")
        await wait_until(lambda: ("broker_resumed", "fast", None) in kinds(), what="operator levers")
        assert ("broker_paused", "fast", None) in kinds()
        assert rt.status()["notifications"]["failed"] == 0
    # Stopping the service closes its connections: that is no drop to tell anyone about.
    assert sum(1 for k in kinds() if k[0] == "broker_down") == 1


async def test_the_served_app_reads_the_endpoint_from_the_environment(aiohttp_client: Any, tmp_path: Path,
                                                                       rules_dir: Path, endpoint: Endpoint) -> None:
    from service.app import RUNTIME, create_app
    from service.runtime import Runtime

    env = {"MULTIBROKER_NOTIFY_URL": endpoint.url, "MULTIBROKER_NOTIFY_FORMAT": "slack"}
    config = replace(ServiceConfig.from_env(env, rules_dir=rules_dir, data_dir=tmp_path / "data", paper_tick_s=0),
                     webhook_secret="s", admin_token="admin")
    app = create_app(config, runtime_factory=lambda c, j, w: Runtime(c, j, w))
    client = await aiohttp_client(app)
    assert await app[RUNTIME].ready(10.0)
    app[RUNTIME].notifier.batch_s = 0.02
    async with client.post("/api/brokers/paper-fast/pause", headers={"Authorization": "Bearer admin"}) as r:
        assert r.status == 200
    await wait_until(lambda: any("broker_paused" in b["text"] for b in endpoint.bodies()), timeout_s=5.0)
    async with client.get("/api/status", headers={"Authorization": "Bearer admin"}) as r:
        status = (await r.json())["notifications"]
    assert status["enabled"] and status["format"] == "slack" and status["target"].startswith("http://127.0.0.1:")
    assert TOKEN not in json.dumps(status)
