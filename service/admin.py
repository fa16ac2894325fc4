"""The admin API under ``/api``: what the service is doing, and the few levers an operator needs.

Every route needs ``Authorization: Bearer <MULTIBROKER_ADMIN_TOKEN>`` (compared in constant time). With no token
configured the routes answer 503 rather than run unprotected: flatten and pause move real money. Errors use the
webhook's shape, ``{"error": {"status", "code", "message"}}``. ``docs/openapi.yaml`` describes every route, and a
test keeps the two in step.
"""

from __future__ import annotations

import hmac
import json
import logging
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from aiohttp import web

from service.journal import JournalError
from service.webhook import error_response, json_response

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 1000


class AdminAPI:
    """Route table and handlers; the app keys are passed in so this module does not import ``service.app``."""

    def __init__(self, journal_key: Any, watcher_key: Any, runtime_key: Any, config_key: Any) -> None:
        self._journal = journal_key
        self._watcher = watcher_key
        self._runtime = runtime_key
        self._config = config_key

    def register(self, router: web.UrlDispatcher) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/api/status", self.status),
            ("GET", "/api/accounts", self.accounts),
            ("GET", "/api/positions", self.positions),
            ("GET", "/api/orders", self.orders),
            ("GET", "/api/signals", self.signals),
            ("GET", "/api/signals/{id}", self.signal),
            ("GET", "/api/reconciliations", self.reconciliations),
            ("POST", "/api/flatten", self.flatten),
            ("POST", "/api/brokers/{name}/pause", self.pause),
            ("POST", "/api/brokers/{name}/resume", self.resume),
            ("POST", "/api/halts/{name}/clear", self.clear_halt),
        ]
        for method, path, handler in routes:
            router.add_route(method, path, self.guarded(handler))

    # -- auth and errors ----------------------------------------------------------------------------------------

    def guarded(self, handler: Handler) -> Handler:
        """``handler`` behind the bearer-token check and the API's error mapping (the dashboard reuses it)."""
        async def guarded(request: web.Request) -> web.StreamResponse:
            token = request.app[self._config].admin_token
            if not token:
                return error_response(503, "not_configured",
                                      "admin token not configured: set MULTIBROKER_ADMIN_TOKEN")
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                logger.warning("admin API: unauthorized %s %s from %s", request.method, request.path, request.remote)
                response = error_response(401, "unauthorized", "missing or wrong bearer token")
                response.headers["WWW-Authenticate"] = 'Bearer realm="multibroker"'
                return response
            try:
                return await handler(request)
            except KeyError as exc:
                return error_response(404, "not_found", str(exc.args[0]) if exc.args else "not found")
            except ValueError as exc:
                return error_response(400, "bad_request", str(exc))
            except JournalError as exc:
                logger.error("admin API: journal unavailable: %s", exc)
                return error_response(503, "journal_unavailable", "the journal is unavailable")

        guarded.__name__ = handler.__name__
        return guarded

    # -- reads --------------------------------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        watcher = request.app[self._watcher]
        journal = request.app[self._journal]
        history = watcher.history
        last = history[-1].as_dict() if history else None
        last_applied = next((r.as_dict() for r in reversed(history) if r.outcome == "applied"), None)
        body = {
            "time": datetime.now(timezone.utc),
            **request.app[self._runtime].status(),
            "rules": {"dir": str(watcher.rules_dir), "generation": watcher.generation, "last_reload": last,
                      "last_applied": last_applied, "watching": watcher.watching},
            "journal": {"path": str(journal.path), "schema_version": journal.schema_version,
                        "commits": journal.batches, "writes": journal.writes},
        }
        return json_response(body)

    async def accounts(self, request: web.Request) -> web.Response:
        return json_response({"accounts": request.app[self._runtime].accounts()})

    async def positions(self, request: web.Request) -> web.Response:
        return json_response({"positions": request.app[self._runtime].positions()})

    async def orders(self, request: web.Request) -> web.Response:
        status = request.query.get("status")
        statuses = [s.strip() for s in status.split(",") if s.strip()] if status else None
        rows = request.app[self._journal].orders(status=statuses, account=request.query.get("account"),
                                                 limit=_limit(request))
        return json_response({"orders": rows})

    async def signals(self, request: web.Request) -> web.Response:
        rows = request.app[self._journal].recent_signals(_limit(request), status=request.query.get("status"))
        return json_response({"signals": rows})

    async def signal(self, request: web.Request) -> web.Response:
        signal_id = request.match_info["id"]
        row = request.app[self._journal].get_signal(signal_id)
        if row is None:
            return error_response(404, "not_found", f"no signal {signal_id!r} in the journal")
        return json_response(row)

    async def reconciliations(self, request: web.Request) -> web.Response:
        return json_response({"reconciliations": request.app[self._journal].reconciliations(_limit(request))})

    # -- levers -------------------------------------------------------------------------------------------------

    async def flatten(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        unknown = set(body) - {"account", "strategy", "reason"}
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; allowed: account, strategy, reason")
        for key in ("account", "strategy", "reason"):
            if key in body and not isinstance(body[key], str):
                raise ValueError(f"{key}: expected a string")
        reason = body.get("reason") or "flatten requested by operator"
        logger.warning("admin API: flatten account=%s strategy=%s (%s)", body.get("account", "*"),
                       body.get("strategy", "*"), reason)
        result = await request.app[self._runtime].flatten(account=body.get("account"),
                                                          strategy=body.get("strategy"), reason=reason)
        return json_response(result)

    async def pause(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        logger.warning("admin API: pausing broker %s", name)
        return json_response(await request.app[self._runtime].pause_broker(name))

    async def resume(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        logger.warning("admin API: resuming broker %s", name)
        return json_response(await request.app[self._runtime].resume_broker(name))

    async def clear_halt(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        logger.warning("admin API: clearing halt %s", name)
        return json_response(request.app[self._runtime].clear_halt(name))


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "100")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"limit: {text!r} is not an integer") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"limit: {value} is outside 1..{MAX_LIMIT}")
    return value


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body
