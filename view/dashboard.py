"""The dashboard: one page at ``GET /``, its assets, a JSON snapshot and a live stream of snapshots.

The page itself holds no data and needs no token; everything it shows comes from ``/api/dashboard`` and
``/api/dashboard/stream``, which need the admin bearer token like the rest of the admin API. The stream is
server-sent events: a snapshot at connect, then a new one whenever something changed (checked a few times a
second, sent only when different), with comment heartbeats so proxies keep the connection open. Assets ship in
the package (``view/static``): the dashboard works with no internet.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}

Snapshot = Callable[[web.Application], dict[str, Any]]
Guard = Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]],
                 Callable[[web.Request], Awaitable[web.StreamResponse]]]


class Dashboard:
    def __init__(self, snapshot: Snapshot, guard: Guard, *, interval_s: float = 0.25, heartbeat_s: float = 15.0):
        self.snapshot = snapshot
        self.guard = guard
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.index)
        router.add_get("/assets/{name}", self.asset)
        router.add_get("/api/dashboard", self.guard(self.current))
        router.add_get("/api/dashboard/stream", self.guard(self.stream))

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                       "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={"Content-Type": ASSETS[name], "Cache-Control": "no-cache"})

    def _snapshot_json(self, app: web.Application) -> str:
        return json.dumps(self.snapshot(app), separators=(",", ":"), default=str)

    async def current(self, request: web.Request) -> web.Response:
        return web.Response(text=self._snapshot_json(request.app), content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        last = None
        idle = 0.0
        try:
            while True:
                text = self._snapshot_json(request.app)
                if text != last:
                    await response.write(f"event: snapshot\ndata: {text}\n\n".encode())
                    last, idle = text, 0.0
                elif idle >= self.heartbeat_s:
                    await response.write(b": keep-alive\n\n")
                    idle = 0.0
                await asyncio.sleep(self.interval_s)
                idle += self.interval_s
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response
