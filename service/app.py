"""The aiohttp application: routes, typed app state and the lifecycle of journal, rules watcher and runtime.

Start-up order is the data path's: the journal (nothing may be acknowledged before it is open), the rules (the
initial load is journaled as a reload), then the runtime (its state replayed from the journal). Brokers connect and
recover in the background: the port opens without waiting for them, because a webhook sender that meets a refused
connection does not retry, while a signal answered during a broker's start-up is handled as if that broker were down
(and caught up later). Shutdown is the reverse, after the webhooks still being recorded have finished, so that
nothing acknowledged misses the journal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from engine import sessions
from engine.reload import Reload, RulesWatcher
from service import tuning
from service.admin import AdminAPI
from service.config import ServiceConfig
from service.journal import Journal
from service.marks import DailyMarker, mark_rows
from service.webhook import Webhook, json_response
from view import metrics as metrics_view
from view.aggregate import portfolio_view
from view.dashboard import Dashboard
from view.metrics import CONTENT_TYPE, JournalFeed, Metrics
from view.snapshot import account_inputs, collect

logger = logging.getLogger(__name__)

RuntimeFactory = Callable[[ServiceConfig, Journal, RulesWatcher], Any]

CONFIG = web.AppKey("config", ServiceConfig)
JOURNAL = web.AppKey("journal", Journal)
WATCHER = web.AppKey("watcher", RulesWatcher)
RUNTIME: "web.AppKey[Any]" = web.AppKey("runtime")  # a Runtime, or a benchmark's stand-in
WEBHOOK = web.AppKey("webhook", Webhook)
RUNTIME_FACTORY = web.AppKey("runtime_factory", object)
ENGINE_BUILDER: "web.AppKey[Any]" = web.AppKey("engine_builder")
METRICS = web.AppKey("metrics", Metrics)


def default_runtime(config: ServiceConfig, journal: Journal, watcher: RulesWatcher) -> Any:
    from service.runtime import Runtime  # noqa: PLC0415 - keeps `import service.app` light for the CLI's help

    return Runtime(config, journal, watcher)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    journal = Journal(config.journal_path,
                      key_horizon_s=max(config.idempotency_window_s, config.content_key_window_s))
    await journal.start()
    builder = app[ENGINE_BUILDER]
    # Numbered on from the journal's last generation: "generation N" in a decision record names one rule set for
    # the life of the journal, not one per process.
    watcher = RulesWatcher(config.rules_dir, **({} if builder is None else {"build": builder}),
                           first_generation=journal.last_generation() + 1)

    async def journal_reload(record: Reload) -> None:
        await journal.record_reload(record.as_dict())

    watcher.on_reload(journal_reload)
    runtime = None
    try:
        await watcher.start()
        factory: RuntimeFactory = app[RUNTIME_FACTORY]  # type: ignore[assignment]
        runtime = factory(config, journal, watcher)
        if getattr(runtime, "clock", None) is not None:
            journal.clock = runtime.clock  # one clock: rows stamped by the journal line up with the runtime's
        await runtime.start()
    except BaseException:
        if runtime is not None:
            await runtime.stop()
        await watcher.stop()
        await journal.close()
        raise
    # Before the port opens: the first signal would otherwise import pandas' calendars and compute the CME holidays
    # (seconds; TradingView gives up after a few and never retries).
    this_year = datetime.now(timezone.utc).year
    await asyncio.to_thread(sessions.preload, (this_year - 1, this_year, this_year + 1))
    webhook = Webhook(config, journal, watcher, runtime, clock=getattr(runtime, "clock", None))
    app[JOURNAL] = journal
    app[WATCHER] = watcher
    app[RUNTIME] = runtime
    app[WEBHOOK] = webhook
    logger.info("multibroker ready to listen on http://%s:%d (POST /webhook, admin API /api, /healthz): rules "
                "generation %d from %s, journal %s; %s", config.host, config.port, watcher.generation,
                config.rules_dir, config.journal_path, _brokers_line(runtime))
    ticker = _paper_ticker(config, watcher, runtime)
    check = asyncio.create_task(_startup_check(watcher), name="broker-check") if config.startup_check else None
    marker = _daily_marker(journal, runtime)
    _instrument(app[METRICS], journal, watcher, runtime)
    if marker is not None:
        await marker.start()
    try:
        yield
    finally:
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if marker is not None:
            await marker.stop()
        if check is not None:
            check.cancel()
            await asyncio.gather(check, return_exceptions=True)
        await webhook.drain()
        await runtime.stop()
        await watcher.stop()
        await journal.close()
        logger.info("multibroker stopped; journal closed")


def _brokers_line(runtime: Any) -> str:
    """Which brokers are still coming up, for the start-up log (a stand-in runtime may not say)."""
    states = getattr(runtime, "broker_states", None)
    if states is None:
        return "brokers: not reported"
    coming = [f"{name} ({state})" for name, state in states().items() if state in ("starting", "recovering")]
    if not coming:
        return "all brokers up"
    return (f"brokers still coming up: {', '.join(coming)} (webhooks are answered meanwhile; until a broker is up "
            f"routing skips it)")


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


async def _startup_check(watcher: RulesWatcher) -> None:
    """The pre-flight check a trader would run (``multibroker brokers check``), logged once at start-up.

    It runs beside the service, not before it: webhooks are answered meanwhile. Each broker gets its own connection
    for the probe (a far-from-market limit order placed and cancelled; paper brokers trade a throwaway in-memory
    book), so the runtime's connections and the paper accounts are untouched.
    """
    from brokers.check import check_broker, render_text  # noqa: PLC0415 - only when the check runs

    ruleset, _engine = watcher.current
    results = await asyncio.gather(*(check_broker(b, ruleset, timeout_s=20.0) for b in ruleset.brokers.values()))
    bad = any(not r.ok or r.flags for r in results)
    for line in render_text(list(results)).splitlines():
        logger.log(logging.WARNING if bad else logging.INFO, "brokers check: %s", line)


def _snapshots(runtime: Any) -> dict[str, Any]:
    return dict(runtime.account_snapshots())


def _daily_marker(journal: Journal, runtime: Any) -> DailyMarker | None:
    """The 17:00 ET mark of every account (needs the real runtime's ledger; a stand-in runtime has none)."""
    if not (hasattr(runtime, "ledger") and hasattr(runtime, "risk")):
        return None

    def take() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        risk = runtime.risk
        return mark_rows(runtime.ruleset, runtime.ledger, marks=risk.marks, point_value=risk.point_value,
                         snapshots=_snapshots(runtime))

    return DailyMarker(take, journal.record_daily_marks, clock=getattr(runtime, "clock", None))


def _instrument(metrics: Metrics, journal: Journal, watcher: RulesWatcher, runtime: Any) -> None:
    """Feed /metrics: journal counts since the last scrape, per-account gauges, rate-limit waits."""
    metrics.before_scrape(JournalFeed(metrics, journal))

    def last_reload() -> None:
        history = watcher.history
        if history:
            metrics.last_reload_ok.set(1 if history[-1].ok else 0)

    metrics.before_scrape(last_reload)
    if not (hasattr(runtime, "ledger") and hasattr(runtime, "risk")):
        return

    def accounts() -> Any:
        now = runtime.clock()
        state = runtime.engine_state(now)
        risk = runtime.risk
        inputs, by_strategy = account_inputs(
            runtime.ruleset, risk.book, marks=risk.marks, point_value=risk.point_value,
            snapshots=_snapshots(runtime), free_margin={n: a.free_margin for n, a in state.accounts.items()},
            connected={n: a.connected for n, a in state.accounts.items()},
            halted={n: a.halted for n, a in state.accounts.items()})
        return metrics_view.account_gauges(portfolio_view(runtime.ruleset, inputs, by_strategy).accounts)

    metrics.live(accounts)
    metrics_view.rate_limit_waits(metrics, lambda: [] if runtime.pool is None else
                                  [(n, s.connector) for n, s in sorted(runtime.pool.slots.items())])


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text format. No token: it holds counts and P&L figures, no secrets and no controls."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _webhook(request: web.Request) -> web.StreamResponse:
    """Observes the webhook's latency as the sender sees it: from the request reaching the handler to the answer
    being ready (timed here rather than in a middleware, which every other route would pay for too)."""
    app = request.app
    started = time.perf_counter()
    try:
        return await app[WEBHOOK].handle(request)
    finally:
        app[METRICS].webhook_latency.observe(time.perf_counter() - started)


async def _healthz(request: web.Request) -> web.Response:
    """Liveness for a load balancer or systemd: no auth, no secrets.

    Brokers still starting or down do not make it fail: the service answers and journals webhooks meanwhile (a
    restart that answered 503 here would be taken out of rotation for nothing). Each broker's state is shown by
    name, and ``starting`` lists those whose first connect and recovery have not finished, so that a deploy script
    or a test can wait for them.
    """
    app = request.app
    journal = app[JOURNAL]
    watcher = app[WATCHER]
    ok = journal.running and watcher.generation > 0
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "journal": journal.running,
                            "rules_generation": watcher.generation}
    runtime = app[RUNTIME]
    if hasattr(runtime, "broker_states") and hasattr(runtime, "starting"):
        body["brokers"] = runtime.broker_states()
        body["starting"] = runtime.starting()
    return json_response(body, status=200 if ok else 503)


def create_app(config: ServiceConfig, *, runtime_factory: RuntimeFactory | None = None,
               engine_builder: Callable[[Any], Any] | None = None,
               tune_interpreter: bool = False) -> web.Application:
    """The service as an aiohttp application.

    ``runtime_factory`` puts something else behind the HTTP layer (a stand-in in tests, a tuned runtime in the
    benchmark); ``engine_builder`` replaces ``engine.decide.build_engine`` for every rules generation.
    ``tune_interpreter``: once started, tune the interpreter for serving (``service.tuning``: the garbage collector
    and the GIL switch interval), as ``run`` and the benchmark do; off by default because it is process-wide.
    """
    app = web.Application(client_max_size=max(config.max_body_bytes, 64 * 1024))
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[RUNTIME_FACTORY] = runtime_factory or default_runtime
    app[ENGINE_BUILDER] = engine_builder
    app.cleanup_ctx.append(_lifecycle)
    if tune_interpreter:
        app.cleanup_ctx.append(tuning.serving)  # after _lifecycle: freezes what start-up built
    app.router.add_post("/webhook", _webhook)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    admin = AdminAPI(JOURNAL, WATCHER, RUNTIME, CONFIG)
    admin.register(app.router)
    Dashboard(lambda a: collect(a[RUNTIME], a[JOURNAL], a[WATCHER], a[RUNTIME].clock()),
              admin.guarded).register(app.router)
    return app


def run(config: ServiceConfig) -> None:
    """Serve until interrupted (SIGINT/SIGTERM shut down cleanly: webhooks drain, then the journal closes)."""
    app = create_app(config, tune_interpreter=True)

    def listening(_banner: str) -> None:
        # aiohttp calls this once its sockets accept connections, whatever the brokers are doing.
        runtime = app.get(RUNTIME)
        logger.info("multibroker listening on http://%s:%d; %s", config.host, config.port, _brokers_line(runtime))

    web.run_app(app, host=config.host, port=config.port, print=listening, access_log=None,
                shutdown_timeout=10.0, handle_signals=True)


__all__ = ["CONFIG", "JOURNAL", "METRICS", "RUNTIME", "WATCHER", "WEBHOOK", "create_app", "default_runtime", "run"]
