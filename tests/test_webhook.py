"""POST /webhook over real HTTP on 127.0.0.1: what a sender sees, what the journal keeps, when dispatch happens.

Most tests put a stand-in runtime behind the HTTP layer (``StubRuntime``: every account connected with ample margin,
a pinned clock, dispatch recorded) so that each checks the webhook alone; ``test_admin_api.py`` and
``test_serve_e2e.py`` run the real runtime with paper brokers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from engine.decision import Decision
from engine.state import AccountState, EngineState
from service.app import JOURNAL, RUNTIME, WATCHER, WEBHOOK, create_app
from service.config import ServiceConfig, parse_networks

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=timezone.utc)
"""A Tuesday, 11:00 New York: mid-session, no schedule block, MES1! is MESH6."""
SECRET = "hook-secret-123"
NQ_SECRET = "nq-only-secret-456"

ENGINE_BUILDER = None
"""The production engine (``engine.decide.build_engine``)."""


class StubRuntime:
    """Implements the runtime methods the HTTP layer calls, and records what it was asked to do."""

    def __init__(self, config: Any, journal: Any, watcher: Any) -> None:
        self.journal = journal
        self.watcher = watcher
        self.now = NOW
        self.dispatched: list[tuple[str, Decision, bool]] = []
        self.held: dict[str, Decision] = {}
        """Decisions held as exposure (``Runtime.hold``) and not dispatched or released yet."""
        self.holds: list[tuple[str, str, bool]] = []
        """("hold" | "release", signal id, whether the signal was on disk then), in order."""
        self.flattened: list[dict[str, Any]] = []
        self.paused: set[str] = set()
        self.halts = {"apex-1": "manual halt"}
        self.started = self.stopped = False

    def clock(self) -> datetime:
        return self.now

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def engine_state(self, now: datetime) -> EngineState:
        ruleset, _engine = self.watcher.current
        accounts = {name: AccountState(connected=True, free_margin=Decimal(100000), daily_pnl=Decimal(0))
                    for name in ruleset.accounts}
        return EngineState(accounts=accounts, paused=frozenset(self.paused))

    def hold(self, signal_id: str, decision: Decision) -> None:
        self.held[signal_id] = decision
        self.holds.append(("hold", signal_id, self.journal.get_signal(signal_id) is not None))

    def release(self, signal_id: str) -> None:
        if self.held.pop(signal_id, None) is not None:
            self.holds.append(("release", signal_id, self.journal.get_signal(signal_id) is not None))

    def dispatch(self, signal_id: str, decision: Decision) -> None:
        on_disk = self.journal.get_signal(signal_id) is not None
        self.dispatched.append((signal_id, decision, on_disk))
        self.held.pop(signal_id, None)  # the dispatch takes the hold over

    def status(self) -> dict[str, Any]:
        return {"brokers": [{"name": "paper-fast", "connected": True, "paused": "paper-fast" in self.paused,
                             "rate_limit_headroom": 1.0}], "halts": sorted(self.halts)}

    def accounts(self) -> list[dict[str, Any]]:
        return [{"name": "apex-1", "free_margin": Decimal("100000.00")}]

    def positions(self) -> list[dict[str, Any]]:
        return [{"account": "apex-1", "contract": "MESH6", "quantity": 2}]

    async def flatten(self, *, account: str | None = None, strategy: str | None = None, reason: str) -> dict:
        if account is not None and account != "apex-1":
            raise KeyError(f"no account named {account!r}")
        self.flattened.append({"account": account, "strategy": strategy, "reason": reason})
        return {"signal_id": "flatten-1", "orders": []}

    async def pause_broker(self, name: str) -> dict[str, Any]:
        if name != "paper-fast":
            raise KeyError(f"no broker named {name!r}")
        self.paused.add(name)
        return {"name": name, "paused": True}

    async def resume_broker(self, name: str) -> dict[str, Any]:
        self.paused.discard(name)
        return {"name": name, "paused": False}

    def clear_halt(self, name: str) -> dict[str, Any]:
        if name not in self.halts:
            raise KeyError(f"no halt named {name!r}")
        del self.halts[name]
        return {"cleared": name}


def add_strategy_secret(rules_dir: Path) -> None:
    with open(rules_dir / "routing.yaml", "a", encoding="utf-8") as fh:
        fh.write("strategy_secrets:\n  nq-swing: ${NQ_SWING_SECRET}\n")


@pytest.fixture
def config(tmp_path: Path, rules_dir: Path) -> ServiceConfig:
    add_strategy_secret(rules_dir)
    return ServiceConfig(rules_dir=rules_dir, data_dir=tmp_path / "data", webhook_secret=SECRET, admin_token="adm",
                         env={"NQ_SWING_SECRET": NQ_SECRET}, paper_tick_s=0)


@pytest.fixture
def serve(aiohttp_client: Any, config: ServiceConfig) -> Any:
    async def start(**changes: Any) -> Any:
        app = create_app(replace(config, **changes), runtime_factory=StubRuntime, engine_builder=ENGINE_BUILDER)
        client = await aiohttp_client(app)
        return client, app
    return start


def scalper(**extra: Any) -> dict[str, Any]:
    return {"secret": SECRET, "strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 2, **extra}


async def post(client: Any, body: Any, *, content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with client.post("/webhook", data=data, headers={"Content-Type": content_type, **(headers or {})}) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


def journal_text(app: web.Application) -> str:
    """Every value of every table of the journal, for "the secret is nowhere" checks."""
    conn = sqlite3.connect(app[JOURNAL].path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(repr(row) for t in tables for row in conn.execute(f"SELECT * FROM {t}"))
    finally:
        conn.close()


# -- accepted ---------------------------------------------------------------------------------------------------


async def test_signal_is_journaled_with_its_orders_before_the_answer_and_dispatched_after(serve: Any) -> None:
    client, app = await serve()
    status, body = await post(client, scalper())
    assert status == 202
    signal_id = body["signal_id"]
    decision = body["decision"]
    assert decision["signal_id"] == signal_id and decision["accepted"] is True
    assert [(o["account"], o["contract"], o["quantity"]) for o in decision["orders"]] == [
        ("apex-1", "MESH6", 2), ("apex-2", "MESH6", 1), ("topstep-1", "MESH6", 2)]

    journal = app[JOURNAL]
    row = journal.get_signal(signal_id)
    assert row["status"] == "accepted" and row["decision"] == decision and row["remote"] == "127.0.0.1"
    assert json.loads(row["raw"]) == {k: v for k, v in scalper().items() if k != "secret"}
    assert [(o["client_order_id"], o["status"]) for o in row["orders"]] == [
        (o["client_order_id"], "new") for o in decision["orders"]]
    assert row["orders"][0]["history"][0]["status"] == "new"

    await asyncio.sleep(0)
    runtime = app[RUNTIME]
    assert [(sid, on_disk) for sid, _d, on_disk in runtime.dispatched] == [(signal_id, True)]
    assert runtime.dispatched[0][1].to_json(generation=1) == decision  # the record adds the pinned generation
    # Its orders counted as exposure from the decision, before the commit; the dispatch took them over.
    assert runtime.holds == [("hold", signal_id, False)] and runtime.held == {}


async def test_the_record_and_the_answer_name_the_rules_that_decided(serve: Any) -> None:
    client, app = await serve()
    status, body = await post(client, scalper())
    assert status == 202
    # The live generation's identity (its content hash) and number, exactly as the journal's reload record has them.
    [reload] = app[JOURNAL].reloads(10)
    live = {"content_hash": app[WATCHER].current[0].content_hash, "generation": app[WATCHER].generation}
    assert live == {"content_hash": reload["content_hash"], "generation": 1} and len(live["content_hash"]) == 64
    assert body["decision"]["ruleset"] == live
    row = app[JOURNAL].get_signal(body["signal_id"])
    assert row["decision"]["ruleset"] == live
    # A record without orders names its rules too (they decided that nobody gets one).
    _status, body = await post(client, scalper(strategy="nobody"))
    assert body["decision"]["accepted"] is False and body["decision"]["ruleset"] == live
    # A repeat answers with the original's record, its rules included.
    _status, again = await post(client, scalper(id="r-1"))
    _status, repeat = await post(client, scalper(id="r-1"))
    assert repeat["duplicate"] is True and repeat["decision"]["ruleset"] == live == again["decision"]["ruleset"]


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8", "application/json", ""])
async def test_tradingview_text_plain_and_other_json_content_types_are_accepted(serve: Any, content_type: str) -> None:
    client, _app = await serve()
    status, body = await post(client, scalper(), content_type=content_type)
    assert status == 202, body


async def test_secret_in_the_header_instead_of_the_body(serve: Any) -> None:
    client, _app = await serve()
    body = {k: v for k, v in scalper().items() if k != "secret"}
    status, _answer = await post(client, body, headers={"X-Webhook-Secret": SECRET})
    assert status == 202


async def test_a_signal_no_account_follows_is_answered_and_journaled_but_not_dispatched(serve: Any) -> None:
    client, app = await serve()
    status, body = await post(client, scalper(strategy="nobody"))
    assert status == 202
    assert body["decision"]["accepted"] is False and "selects no account" in body["decision"]["reason"]
    assert app[JOURNAL].get_signal(body["signal_id"])["status"] == "decided"
    await asyncio.sleep(0)
    assert app[RUNTIME].dispatched == [] and app[RUNTIME].holds == []  # no orders: nothing to hold


# -- refused ----------------------------------------------------------------------------------------------------

BIG = json.dumps(scalper(comment="x" * 400)).encode()

BAD_INPUT = [
    # name, content type, body, status, code, text in the message, path
    ("malformed JSON", "application/json", b'{"secret": "hook-secret-123", "strategy": ', 400, "malformed_json",
     "line 1 column", None),
    ("empty body", "application/json", b"", 400, "malformed_json", "empty body", None),
    ("not UTF-8", "text/plain", b'{"strategy": "\xff\xfe"}', 400, "malformed_json", "not UTF-8", None),
    ("NaN price", "application/json", json.dumps(scalper()).replace('"quantity": 2', '"price": NaN').encode(), 400,
     "malformed_json", "NaN", None),
    ("form encoded", "application/x-www-form-urlencoded", b"strategy=es-scalper", 415, "unsupported_media_type",
     "application/x-www-form-urlencoded", None),
    ("missing secret", "application/json", json.dumps({**scalper(), "secret": ""}).encode(), 401, "unauthorized",
     "missing secret", None),
    ("no secret field", "application/json",
     json.dumps({k: v for k, v in scalper().items() if k != "secret"}).encode(), 401, "unauthorized", "missing",
     None),
    ("wrong secret", "application/json", json.dumps(scalper(secret="guess")).encode(), 401, "unauthorized",
     "wrong secret", None),
    ("buy without quantity", "application/json",
     json.dumps({k: v for k, v in scalper().items() if k != "quantity"}).encode(), 422, "invalid_signal",
     "'quantity' is a required property", "$"),
    ("unknown action", "application/json", json.dumps(scalper(action="hold")).encode(), 422, "invalid_signal",
     "'hold' is not one of", "$.action"),
    ("quantity zero", "application/json", json.dumps(scalper(quantity=0)).encode(), 422, "invalid_signal",
     "$.quantity", "$.quantity"),
    ("unknown field", "application/json", json.dumps(scalper(leverage=10)).encode(), 422, "invalid_signal",
     "leverage", "$"),
    ("limit order (not supported yet: never sent at market)", "application/json",
     json.dumps(scalper(order_type="limit", price=4990.25)).encode(), 422, "unsupported_order_type",
     "limit orders are not supported yet", "$.order_type"),
    ("stop order (not supported yet)", "application/json",
     json.dumps(scalper(order_type="STOP", price=5010)).encode(), 422, "unsupported_order_type",
     "stop orders are not supported yet", "$.order_type"),
    ("unknown instrument", "application/json", json.dumps(scalper(ticker="ZZ1!")).encode(), 422,
     "unknown_instrument", "ZZ", "$.ticker"),
    ("stale", "application/json", json.dumps(scalper(time=(NOW - timedelta(seconds=120)).isoformat())).encode(),
     422, "stale", "stale signal", "$.time"),
    ("from the future", "application/json",
     json.dumps(scalper(time=(NOW + timedelta(minutes=10)).isoformat())).encode(), 422, "stale", "future",
     "$.time"),
]


@pytest.mark.parametrize("name,ctype,raw,status,code,text,path", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
async def test_bad_input_gets_a_precise_error_and_is_journaled_as_rejected_without_the_secret(
        serve: Any, name: str, ctype: str, raw: bytes, status: int, code: str, text: str, path: str | None) -> None:
    client, app = await serve()
    got, body = await post(client, raw, content_type=ctype)
    assert got == status, body
    error = body["error"]
    assert error["status"] == status and error["code"] == code
    assert text in error["message"], error["message"]
    assert error.get("path") == path
    rows = app[JOURNAL].recent_signals(10)
    assert len(rows) == 1 and rows[0]["status"] == "rejected"
    assert rows[0]["reason"].startswith(f"{status} ") and text in rows[0]["reason"]
    assert app[JOURNAL].orders() == []
    assert SECRET not in journal_text(app)
    await asyncio.sleep(0)
    assert app[RUNTIME].dispatched == []


async def test_a_body_over_the_limit_is_refused_with_413_with_or_without_content_length(serve: Any) -> None:
    client, app = await serve(max_body_bytes=len(BIG) - 1)
    status, body = await post(client, BIG)
    assert status == 413 and body["error"]["code"] == "too_large"

    async def chunks() -> Any:
        for i in range(0, len(BIG), 100):
            yield BIG[i:i + 100]

    async with client.post("/webhook", data=chunks(), headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        assert "exceeds" in (await r.json())["error"]["message"]
    assert [r["status"] for r in app[JOURNAL].recent_signals(10)] == ["rejected", "rejected"]
    assert SECRET not in journal_text(app)


async def test_secrets_of_malformed_bodies_and_headers_are_never_stored_or_logged(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, app = await serve()
    caplog.set_level("DEBUG")
    await post(client, b'{"secret": "hook-secret-123", "strategy": "es-scalper", broken')
    await post(client, b'{"secret":"wrong-one", "strategy": "es-scalper", broken')
    await post(client, {k: v for k, v in scalper().items() if k != "secret"}, headers={"X-Webhook-Secret": "nope!"})
    stored = journal_text(app)
    for secret in (SECRET, "wrong-one", "nope!"):
        assert secret not in stored
        assert secret not in caplog.text
    assert '"secret": "***"' in stored or '"secret":"***"' in stored


# -- authentication ---------------------------------------------------------------------------------------------


async def test_a_body_that_is_not_an_object_is_refused_after_authentication(serve: Any) -> None:
    client, app = await serve()
    status, body = await post(client, [scalper()], headers={"X-Webhook-Secret": SECRET})
    assert status == 422 and body["error"]["path"] == "$" and "must be a JSON object" in body["error"]["message"]
    assert (await post(client, [scalper()]))[0] == 401
    assert [r["status"] for r in app[JOURNAL].recent_signals(5)] == ["rejected", "rejected"]


async def test_a_strategy_with_its_own_secret_accepts_only_that_secret(serve: Any) -> None:
    client, _app = await serve()
    swing = {"strategy": "nq-swing", "ticker": "NQ1!", "action": "buy", "quantity": 1}
    assert (await post(client, {**swing, "secret": SECRET}))[0] == 401
    status, body = await post(client, {**swing, "secret": NQ_SECRET})
    assert status == 202 and [o["account"] for o in body["decision"]["orders"]] == ["swing-1"]
    assert (await post(client, scalper(secret=NQ_SECRET)))[0] == 401


async def test_a_strategy_whose_secret_variable_is_unset_is_refused(serve: Any) -> None:
    client, _app = await serve(env={})
    status, body = await post(client, {"secret": SECRET, "strategy": "nq-swing", "ticker": "NQ1!",
                                       "action": "buy", "quantity": 1})
    assert status == 401 and "no webhook secret is configured" in body["error"]["message"]


async def test_the_source_ip_allow_list(serve: Any) -> None:
    client, app = await serve(allow_ips=parse_networks("10.0.0.0/8, 192.168.1.7"))
    status, body = await post(client, scalper())
    assert status == 403 and "127.0.0.1" in body["error"]["message"]
    assert app[JOURNAL].recent_signals(1)[0]["status"] == "rejected"
    await client.close()
    client, _app = await serve(allow_ips=parse_networks("127.0.0.0/8"), data_dir=app[JOURNAL].path.parent / "2")
    assert (await post(client, scalper()))[0] == 202


# -- idempotency ------------------------------------------------------------------------------------------------


async def test_a_repeat_answers_with_the_original_and_creates_no_orders(serve: Any) -> None:
    client, app = await serve()
    first_status, first = await post(client, scalper(time=NOW.isoformat()))
    again_status, again = await post(client, scalper(time=NOW.isoformat()), content_type="text/plain")
    assert (first_status, again_status) == (202, 200)
    assert again == {"signal_id": first["signal_id"], "duplicate": True, "decision": first["decision"]}
    journal = app[JOURNAL]
    assert len(journal.orders()) == 3
    assert [r["status"] for r in journal.recent_signals(10)] == ["duplicate", "accepted"]
    await asyncio.sleep(0)
    assert len(app[RUNTIME].dispatched) == 1


async def test_the_same_id_is_a_repeat_even_with_another_body(serve: Any) -> None:
    client, app = await serve()
    _s, first = await post(client, scalper(id="tv-42"))
    status, again = await post(client, scalper(id="tv-42", quantity=3))
    assert status == 200 and again["signal_id"] == first["signal_id"]
    assert len(app[JOURNAL].orders()) == 3


async def test_concurrent_repeats_wait_for_the_first_and_never_decide_twice(serve: Any) -> None:
    client, app = await serve()
    answers = await asyncio.gather(*(post(client, scalper(id="burst-1")) for _ in range(6)))
    statuses = sorted(s for s, _b in answers)
    assert statuses == [200] * 5 + [202]
    assert len({b["signal_id"] for _s, b in answers}) == 1
    assert len(app[JOURNAL].orders()) == 3
    await asyncio.sleep(0)
    assert len(app[RUNTIME].dispatched) == 1


async def test_concurrent_repeats_of_a_refused_signal_are_each_refused_not_called_duplicates(serve: Any) -> None:
    client, app = await serve()
    answers = await asyncio.gather(*(post(client, scalper(id="bad-1", ticker="ZZ1!")) for _ in range(4)))
    assert [(s, b["error"]["code"]) for s, b in answers] == [(422, "unknown_instrument")] * 4
    assert app[JOURNAL].orders() == []


async def test_a_content_key_without_time_is_only_remembered_briefly_but_an_id_for_the_window(serve: Any) -> None:
    client, app = await serve(content_key_window_s=300)
    runtime = app[RUNTIME]
    _s, first = await post(client, scalper())
    _s, tagged = await post(client, scalper(id="tv-7"))
    runtime.now = NOW + timedelta(seconds=299)
    assert (await post(client, scalper()))[1]["signal_id"] == first["signal_id"]
    runtime.now = NOW + timedelta(seconds=301)
    status, later = await post(client, scalper())
    assert status == 202 and later["signal_id"] != first["signal_id"]
    status, repeat = await post(client, scalper(id="tv-7"))
    assert status == 200 and repeat["signal_id"] == tagged["signal_id"]
    runtime.now = NOW + timedelta(hours=24, seconds=1)
    assert (await post(client, scalper(id="tv-7")))[0] == 202


async def test_a_retry_of_an_accepted_signal_after_max_age_is_a_duplicate_not_stale(serve: Any) -> None:
    client, app = await serve()
    _s, first = await post(client, scalper(time=NOW.isoformat()))
    app[RUNTIME].now = NOW + timedelta(minutes=5)
    status, again = await post(client, scalper(time=NOW.isoformat()))
    assert status == 200 and again["signal_id"] == first["signal_id"]


# -- storage failures -------------------------------------------------------------------------------------------


async def test_a_read_only_journal_answers_503_acknowledges_nothing_and_a_resend_then_succeeds(serve: Any) -> None:
    client, app = await serve()
    journal = app[JOURNAL]
    await journal.execute("PRAGMA query_only = 1", transaction=False)  # every write now fails: "attempt to write a readonly database"
    status, body = await post(client, scalper(id="tv-full"))
    assert status == 503 and body["error"]["code"] == "journal_unavailable"
    await asyncio.sleep(0)
    assert app[RUNTIME].dispatched == []
    # Held from the decision on, released when the commit failed: nothing stays counted.
    holds = app[RUNTIME].holds
    assert [(kind, on_disk) for kind, _sid, on_disk in holds] == [("hold", False), ("release", False)]
    assert holds[0][1] == holds[1][1] and app[RUNTIME].held == {}
    await journal.execute("PRAGMA query_only = 0", transaction=False)
    assert journal.recent_signals(10) == []
    status, body = await post(client, scalper(id="tv-full"))
    assert status == 202  # not a duplicate: the first was never acknowledged


async def test_a_closed_journal_answers_503(serve: Any) -> None:
    client, app = await serve()
    await app[JOURNAL].close()
    status, body = await post(client, scalper())
    assert status == 503 and "not acknowledged" in body["error"]["message"]
    assert app[RUNTIME].dispatched == [] and app[RUNTIME].held == {}
    async with client.get("/healthz") as r:
        assert r.status == 503


async def test_healthz_needs_no_token_and_says_nothing_secret(serve: Any) -> None:
    client, app = await serve()
    async with client.get("/healthz") as r:
        assert r.status == 200
        assert await r.json() == {"status": "ok", "journal": True, "rules_generation": 1}
    assert app[WEBHOOK].config.webhook_secret == SECRET
    assert SECRET not in repr(app[WEBHOOK].config)


async def test_the_calendars_are_read_before_the_port_opens_not_by_the_first_signal(
        serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # As in a fresh process: nothing read yet. Reading them takes seconds (pandas), longer than a sender waits.
    from engine import sessions
    monkeypatch.setattr(sessions, "_holidays", None)
    monkeypatch.setattr(sessions, "_sessions", {})
    client, _app = await serve()
    assert sessions._holidays is not None
    assert datetime.now(timezone.utc).year in sessions._sessions
    read = []
    monkeypatch.setattr(sessions, "_calendar", lambda name: read.append(name))  # would raise if used now
    status, _answer = await post(client, scalper())
    assert status == 202 and read == []
