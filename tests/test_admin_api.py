"""The admin API over real HTTP: bearer auth, reads, levers, the OpenAPI description kept in step with the routes,
and one run through the real runtime with paper brokers (signal in, orders filled, positions out)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from service.app import JOURNAL, RUNTIME, WATCHER, create_app
from service.config import ServiceConfig
from service.journal import MIGRATIONS
from tests.test_webhook import ENGINE_BUILDER, NOW, SECRET, StubRuntime, scalper

REPO = Path(__file__).resolve().parent.parent
TOKEN = "admin-token-789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def config(tmp_path: Path, rules_dir: Path) -> ServiceConfig:
    return ServiceConfig(rules_dir=rules_dir, data_dir=tmp_path / "data", webhook_secret=SECRET, admin_token=TOKEN,
                         paper_tick_s=0)


@pytest.fixture
def serve(aiohttp_client: Any, config: ServiceConfig) -> Any:
    async def start(runtime_factory: Any = StubRuntime, **changes: Any) -> Any:
        app = create_app(replace(config, **changes), runtime_factory=runtime_factory, engine_builder=ENGINE_BUILDER)
        return await aiohttp_client(app), app
    return start


async def call(client: Any, method: str, path: str, *, headers: dict[str, str] | None = None,
               body: Any = None) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    async with client.request(method, path, headers=AUTH if headers is None else headers, data=data) as r:
        return r.status, await r.json()


# -- the OpenAPI description --------------------------------------------------------------------------------------


def spec() -> dict[str, Any]:
    return YAML(typ="safe").load((REPO / "docs" / "openapi.yaml").read_text(encoding="utf-8"))


def test_every_route_is_in_the_openapi_description_and_vice_versa(config: ServiceConfig) -> None:
    app = create_app(config, runtime_factory=StubRuntime)
    served = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    described = {(method.upper(), path) for path, item in spec()["paths"].items() for method in item
                 if method in ("get", "post", "put", "patch", "delete")}
    assert served == described


def test_the_openapi_description_is_3_x_and_its_local_references_resolve() -> None:
    doc = spec()
    assert str(doc["openapi"]).startswith("3.")
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    refs.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for ref in refs:
        if ref.startswith("#/"):
            target: Any = doc
            for part in ref[2:].split("/"):
                target = target[part]
        else:
            assert (REPO / "docs" / ref).resolve().is_file(), ref


# -- auth ---------------------------------------------------------------------------------------------------------

ROUTES = [("GET", "/api/status"), ("GET", "/api/accounts"), ("GET", "/api/positions"), ("GET", "/api/orders"),
          ("GET", "/api/signals"), ("GET", "/api/signals/x"), ("GET", "/api/reconciliations"),
          ("POST", "/api/flatten"), ("POST", "/api/brokers/paper-fast/pause"),
          ("POST", "/api/brokers/paper-fast/resume"), ("POST", "/api/halts/apex-1/clear")]


async def test_every_admin_route_needs_the_bearer_token(serve: Any) -> None:
    client, app = await serve()
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}):
            async with client.request(method, path, headers=headers) as r:
                assert r.status == 401, (method, path, headers)
                assert (await r.json())["error"]["code"] == "unauthorized"
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
    runtime = app[RUNTIME]
    assert runtime.flattened == [] and runtime.paused == set() and runtime.halts


async def test_without_a_configured_token_the_admin_api_answers_503(serve: Any) -> None:
    client, _app = await serve(admin_token=None)
    status, body = await call(client, "GET", "/api/status")
    assert status == 503 and body["error"]["message"].startswith("admin token not configured")
    async with client.get("/healthz") as r:
        assert r.status == 200


# -- reads --------------------------------------------------------------------------------------------------------


async def test_a_restart_numbers_its_rules_generation_on_from_the_journal(serve: Any, rules_dir: Path) -> None:
    """Two processes in a row on one journal: the second's first generation is the first's last + 1, so that a
    decision record's ``ruleset.generation`` names one rule set for the life of the journal."""
    client, app = await serve()
    accounts = rules_dir / "accounts.yaml"
    accounts.write_text(accounts.read_text(encoding="utf-8").replace("capital: 50000", "capital: 60000", 1),
                        encoding="utf-8")
    assert (await app[WATCHER].reload_now()).generation == 2
    await client.close()

    client, app = await serve()
    _s, body = await call(client, "GET", "/api/status")
    assert body["rules"]["generation"] == 3
    assert [(r["generation"], r["outcome"]) for r in app[JOURNAL].reloads(10)] == [(3, "applied"), (2, "applied"),
                                                                                  (1, "applied")]


async def test_status_shows_brokers_rules_generation_and_the_last_reload(serve: Any, rules_dir: Path) -> None:
    client, app = await serve()
    status, body = await call(client, "GET", "/api/status")
    assert status == 200
    assert body["brokers"][0]["rate_limit_headroom"] == 1.0
    assert body["rules"]["generation"] == 1 and body["rules"]["last_reload"]["outcome"] == "applied"
    assert body["journal"]["schema_version"] == len(MIGRATIONS)

    (rules_dir / "broken.yaml").write_text("kind: Account\nname: x\nbroker: nowhere\n", encoding="utf-8")
    await app[WATCHER].reload_now()
    _s, body = await call(client, "GET", "/api/status")
    last = body["rules"]["last_reload"]
    assert last["ok"] is False and body["rules"]["generation"] == 1
    assert any("broken.yaml:" in e for e in last["errors"])
    assert body["rules"]["last_applied"]["generation"] == 1
    assert [r["outcome"] for r in app[JOURNAL].reloads(10)] == ["invalid", "applied"]


async def test_signals_orders_accounts_positions_and_reconciliations(serve: Any) -> None:
    client, app = await serve()
    async with client.post("/webhook", json=scalper()) as r:
        signal_id = (await r.json())["signal_id"]
    status, body = await call(client, "GET", f"/api/signals/{signal_id}")
    assert status == 200 and body["decision"]["signal_id"] == signal_id and len(body["orders"]) == 3
    assert body["orders"][0]["history"][0]["status"] == "new" and "secret" not in body["raw"]
    assert (await call(client, "GET", "/api/signals/nope"))[0] == 404
    _s, body = await call(client, "GET", "/api/signals?status=accepted&limit=5")
    assert [s["id"] for s in body["signals"]] == [signal_id]
    _s, body = await call(client, "GET", "/api/orders?status=new,sending&account=apex-2")
    assert [(o["account"], o["quantity"]) for o in body["orders"]] == [("apex-2", 1)]
    assert (await call(client, "GET", "/api/orders?limit=0"))[0] == 400
    assert (await call(client, "GET", "/api/orders?limit=ten"))[0] == 400
    assert (await call(client, "GET", "/api/accounts"))[1] == {"accounts": [{"name": "apex-1",
                                                                            "free_margin": "100000.00"}]}
    assert (await call(client, "GET", "/api/positions"))[1]["positions"][0]["quantity"] == 2
    await app[JOURNAL].record_reconciliation({"broker": "paper-fast", "account": "apex-1", "ok": True})
    _s, body = await call(client, "GET", "/api/reconciliations")
    assert body["reconciliations"][0]["broker"] == "paper-fast"


# -- levers -------------------------------------------------------------------------------------------------------


async def test_flatten_pause_resume_and_clear_halt(serve: Any) -> None:
    client, app = await serve()
    runtime = app[RUNTIME]
    assert (await call(client, "POST", "/api/flatten"))[0] == 200
    assert (await call(client, "POST", "/api/flatten", body={"account": "apex-1", "reason": "going home"}))[0] == 200
    assert runtime.flattened == [{"account": None, "strategy": None, "reason": "flatten requested by operator"},
                                 {"account": "apex-1", "strategy": None, "reason": "going home"}]
    status, body = await call(client, "POST", "/api/flatten", body={"account": "nobody"})
    assert status == 404 and "nobody" in body["error"]["message"]
    status, body = await call(client, "POST", "/api/flatten", body={"acount": "apex-1"})
    assert status == 400 and "acount" in body["error"]["message"]
    assert (await call(client, "POST", "/api/flatten", body="{not json"))[0] == 400
    assert len(runtime.flattened) == 2

    assert (await call(client, "POST", "/api/brokers/paper-fast/pause"))[1] == {"name": "paper-fast", "paused": True}
    assert runtime.paused == {"paper-fast"}
    assert (await call(client, "POST", "/api/brokers/nowhere/pause"))[0] == 404
    assert (await call(client, "POST", "/api/brokers/paper-fast/resume"))[0] == 200
    assert runtime.paused == set()
    assert (await call(client, "POST", "/api/halts/apex-1/clear"))[1] == {"cleared": "apex-1"}
    status, body = await call(client, "POST", "/api/halts/apex-1/clear")
    assert status == 404 and "no halt named" in body["error"]["message"]


# -- through the real runtime -------------------------------------------------------------------------------------


async def test_a_signal_through_the_real_runtime_fills_on_paper_brokers(serve: Any) -> None:
    from service.runtime import Runtime

    client, app = await serve(runtime_factory=lambda c, j, w: Runtime(c, j, w, clock=lambda: NOW))
    assert await app[RUNTIME].ready(10.0)  # the service listens before its brokers are up; this test wants them up
    async with client.post("/webhook", data=json.dumps(scalper()), headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 202
        signal_id = (await r.json())["signal_id"]
    for _ in range(200):
        _s, body = await call(client, "GET", f"/api/signals/{signal_id}")
        if all(o["status"] == "filled" for o in body["orders"]):
            break
        await asyncio.sleep(0.02)
    assert [(o["account"], o["status"]) for o in body["orders"]] == [
        ("apex-1", "filled"), ("apex-2", "filled"), ("topstep-1", "filled")]
    assert [h["status"] for h in body["orders"][0]["history"]][0] == "new"
    _s, positions = await call(client, "GET", "/api/positions")
    assert sorted((p["account"], p["contract"], p["quantity"]) for p in positions["positions"]) == [
        ("apex-1", "MESH6", 2), ("apex-2", "MESH6", 1), ("topstep-1", "MESH6", 2)]
    _s, status = await call(client, "GET", "/api/status")
    assert {b["name"] for b in status["brokers"]} == {"paper-fast", "paper-slow", "paper-cheap"}


# -- which rules decided ------------------------------------------------------------------------------------------


def _edit_multiplier(rules_dir: Path) -> None:
    path = rules_dir / "accounts.yaml"
    text = path.read_text(encoding="utf-8")
    assert "size_multiplier: 0.5" in text
    path.write_text(text.replace("size_multiplier: 0.5", "size_multiplier: 1"), encoding="utf-8")


async def test_each_record_keeps_naming_the_rules_that_decided_it_across_a_reload(serve: Any,
                                                                                 rules_dir: Path) -> None:
    client, app = await serve()
    watcher, journal = app[WATCHER], app[JOURNAL]
    async with client.post("/webhook", json=scalper(id="before")) as r:
        before = (await r.json())["signal_id"]
    old_hash = watcher.current[0].content_hash
    _edit_multiplier(rules_dir)
    assert (await watcher.reload_now()).outcome == "applied"
    new_hash = watcher.current[0].content_hash
    assert new_hash != old_hash and watcher.generation == 2
    async with client.post("/webhook", json=scalper(id="after")) as r:
        after = (await r.json())["signal_id"]

    _s, old = await call(client, "GET", f"/api/signals/{before}")
    _s, new = await call(client, "GET", f"/api/signals/{after}")
    assert old["decision"]["ruleset"] == {"content_hash": old_hash, "generation": 1}
    assert new["decision"]["ruleset"] == {"content_hash": new_hash, "generation": 2}
    # The reload records the journal keeps are what the two point at; the decisions differ as their rules do.
    assert {(r["content_hash"], r["generation"]) for r in journal.reloads(10)} == {(old_hash, 1), (new_hash, 2)}
    assert [o["quantity"] for o in old["decision"]["orders"] if o["account"] == "apex-2"] == [1]
    assert [o["quantity"] for o in new["decision"]["orders"] if o["account"] == "apex-2"] == [2]
    _s, listed = await call(client, "GET", "/api/signals?limit=5")
    assert [(s["id"], s["decision"]["ruleset"]["generation"]) for s in listed["signals"]] == [(after, 2),
                                                                                               (before, 1)]


async def test_a_record_journaled_before_decisions_named_their_rules_is_still_served(serve: Any) -> None:
    client, app = await serve()
    old = {"signal_id": "s-old", "strategy": "es-scalper", "accepted": False, "rule": None, "blocked_by": None,
           "reason": "no orders", "order_type": "market", "price": None, "orders": [], "skipped": [], "cancel": []}
    await app[JOURNAL].record_signal(raw="{}", remote=None, status="decided", reason="no orders", key=None,
                                     signal={"strategy": "es-scalper"}, decision=old, signal_id="s-old")
    status, body = await call(client, "GET", "/api/signals/s-old")
    assert status == 200 and body["decision"] == old
    status, body = await call(client, "GET", "/api/signals")
    assert status == 200 and [s["decision"] for s in body["signals"]] == [old]


async def test_a_runtime_flatten_names_the_rules_live_when_it_was_made(serve: Any, rules_dir: Path) -> None:
    from service.runtime import Runtime

    client, app = await serve(runtime_factory=lambda c, j, w: Runtime(c, j, w, clock=lambda: NOW))
    assert await app[RUNTIME].ready(10.0)
    watcher = app[WATCHER]
    status, first = await call(client, "POST", "/api/flatten", body={"account": "apex-1", "reason": "first"})
    assert status == 200
    _edit_multiplier(rules_dir)
    assert (await watcher.reload_now()).outcome == "applied"
    status, second = await call(client, "POST", "/api/flatten", body={"account": "apex-2", "reason": "second"})
    assert status == 200

    records = {}
    for answer in (first, second):
        _s, row = await call(client, "GET", f"/api/signals/{answer['signal_id']}")
        records[row["decision"]["reason"]] = row["decision"]["ruleset"]
    old_hash = next(r["content_hash"] for r in app[JOURNAL].reloads(10) if r["generation"] == 1)
    assert records == {"first": {"content_hash": old_hash, "generation": 1},
                       "second": {"content_hash": watcher.current[0].content_hash, "generation": 2}}
