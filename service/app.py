"""The aiohttp application: routes, typed app state and the lifecycle of journal, rules watcher and runtime.

Start-up order is the data path's: the journal (nothing may be acknowledged before it is open), the rules (the
initial load is journaled as a reload), then the runtime (connect brokers, recover what was in flight). Shutdown is
the reverse, after the webhooks still being recorded have finished, so that nothing acknowledged misses the journal.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from engine.reload import Reload, RulesWatcher
from service.admin import AdminAPI
from service.config import ServiceConfig
from service.journal import Journal
from service.webhook import Webhook, json_response

logger = logging.getLogger(__name__)

RuntimeFactory = Callable[[ServiceConfig, Journal, RulesWatcher], Any]

CONFIG = web.AppKey("config", ServiceConfig)
JOURNAL = web.AppKey("journal", Journal)
WATCHER = web.AppKey("watcher", RulesWatcher)
RUNTIME = web.AppKey("runtime", object)
WEBHOOK = web.AppKey("webhook", Webhook)
RUNTIME_FACTORY = web.AppKey("runtime_factory", object)
ENGINE_BUILDER = web.AppKey("engine_builder", object)


def default_runtime(config: ServiceConfig, journal: Journal, watcher: RulesWatcher) -> Any:
    from service.runtime import Runtime  # noqa: PLC0415 - keeps `import service.app` light for the CLI's help

    return Runtime(config, journal, watcher)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    journal = Journal(config.journal_path)
    await journal.start()
    builder = app[ENGINE_BUILDER]
    watcher = RulesWatcher(config.rules_dir) if builder is None else RulesWatcher(config.rules_dir, build=builder)

    async def journal_reload(record: Reload) -> None:
        await journal.record_reload(record.as_dict())

    watcher.on_reload(journal_reload)
    runtime = None
    try:
        await watcher.start()
        factory: RuntimeFactory = app[RUNTIME_FACTORY]  # type: ignore[assignment]
        runtime = factory(config, journal, watcher)
        await runtime.start()
    except BaseException:
        if runtime is not None:
            await runtime.stop()
        await watcher.stop()
        await journal.close()
        raise
    webhook = Webhook(config, journal, watcher, runtime, clock=getattr(runtime, "clock", None))
    app[JOURNAL] = journal
    app[WATCHER] = watcher
    app[RUNTIME] = runtime
    app[WEBHOOK] = webhook
    logger.info("multibroker on http://%s:%d (POST /webhook, admin API /api, /healthz): rules generation %d "
                "from %s, journal %s", config.host, config.port, watcher.generation, config.rules_dir,
                config.journal_path)
    ticker = _paper_ticker(config, watcher, runtime)
    try:
        yield
    finally:
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        await webhook.drain()
        await runtime.stop()
        await watcher.stop()
        await journal.close()
        logger.info("multibroker stopped; journal closed")


def _paper_ticker(config: ServiceConfig, watcher: RulesWatcher, runtime: Any) -> asyncio.Task[None] | None:
    """Move the paper price feed while paper brokers trade, so that marks and P&L move as in a market."""
    feed = getattr(runtime, "feed", None)
    ruleset, _engine = watcher.current
    if feed is None or config.paper_tick_s <= 0 or not any(b.type == "paper" for b in ruleset.brokers.values()):
        return None

    async def tick() -> None:
        while True:
            await asyncio.sleep(config.paper_tick_s)
            try:
                feed.step()
            except Exception:  # noqa: BLE001 - a failing listener must not stop the market
                logger.exception("paper price feed step failed")

    return asyncio.create_task(tick(), name="paper-price-feed")


async def _webhook(request: web.Request) -> web.StreamResponse:
    return await request.app[WEBHOOK].handle(request)


async def _healthz(request: web.Request) -> web.Response:
    """Liveness for a load balancer or systemd: no auth, no secrets, no broker details."""
    app = request.app
    journal = app[JOURNAL]
    watcher = app[WATCHER]
    ok = journal.running and watcher.generation > 0
    return json_response({"status": "ok" if ok else "unavailable", "journal": journal.running,
                          "rules_generation": watcher.generation}, status=200 if ok else 503)


def create_app(config: ServiceConfig, *, runtime_factory: RuntimeFactory | None = None,
               engine_builder: Callable[[Any], Any] | None = None) -> web.Application:
    """The service as an aiohttp application.

    ``runtime_factory`` puts something else behind the HTTP layer (a stand-in in tests, a tuned runtime in the
    benchmark); ``engine_builder`` replaces ``engine.decide.build_engine`` for every rules generation.
    """
    app = web.Application(client_max_size=max(config.max_body_bytes, 64 * 1024))
    app[CONFIG] = config
    app[RUNTIME_FACTORY] = runtime_factory or default_runtime
    app[ENGINE_BUILDER] = engine_builder
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/webhook", _webhook)
    app.router.add_get("/healthz", _healthz)
    AdminAPI(JOURNAL, WATCHER, RUNTIME, CONFIG).register(app.router)
    return app


def run(config: ServiceConfig) -> None:
    """Serve until interrupted (SIGINT/SIGTERM shut down cleanly: webhooks drain, then the journal closes)."""
    app = create_app(config)
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None,
                shutdown_timeout=10.0, handle_signals=True)


__all__ = ["CONFIG", "JOURNAL", "RUNTIME", "WATCHER", "WEBHOOK", "create_app", "default_runtime", "run"]
