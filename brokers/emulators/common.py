"""What every broker emulator needs besides its wire format: a real server on 127.0.0.1 that can be dropped and
restored, background tasks that die with it, and the fault hooks whose mechanics do not depend on the broker.

Why shared: the contract suite asks every emulator for the same misbehaviour (a network drop that resets live
sockets, an answer lost after the order took effect), and the subtle parts — stop listening *and* reset keep-alive
connections, write the lost answer into a reset socket — must behave identically for every broker or the suite
would test the emulators rather than the connectors.
"""

from __future__ import annotations

import abc
import asyncio
from decimal import Decimal
from typing import Any, Awaitable, Callable, Self

from aiohttp import web

HOST = "127.0.0.1"


def wire_number(value: Decimal | None) -> float | None:
    """Decimal to a JSON number, as real brokers send prices (connectors read them back with ``Decimal(str(x))``)."""
    return None if value is None else float(value)


def wire_decimal(value: Any) -> Decimal | None:
    """A JSON number from a client back to Decimal, through its text so that 6065.25 stays 6065.25."""
    return None if value is None else Decimal(str(value))


def check_parts(parts: list[int]) -> list[int]:
    """Validate a ``partial_fill_next`` argument: positive quantities only."""
    if not parts or any(int(p) <= 0 for p in parts):
        raise ValueError(f"partial fill parts must be positive, got {parts!r}")
    return [int(p) for p in parts]


class EmulatorServer(abc.ABC):
    """An aiohttp application on a free port of 127.0.0.1 with the broker-independent fault hooks.

    Subclasses build the application (``_build_app``), name their base URL and close their streaming clients
    (``_close_streams``); their middleware calls ``_refuse_if_down`` first and their place-order handler asks
    ``_lose_this_answer`` before answering.
    """

    def __init__(self, *, port: int = 0) -> None:
        self._port = port
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._down = False
        self._lose_next_place = 0

    # -- subclass hooks -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _build_app(self) -> web.Application: ...

    @property
    @abc.abstractmethod
    def base_url(self) -> str: ...

    async def _close_streams(self) -> None:  # noqa: B027 - optional hook: an emulator with no streams has none
        """Close (reset) every streaming client: WebSockets, hubs. Called on drop and on stop."""

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> str:
        """Listen on a free port of 127.0.0.1 (or the one given) and return the REST base URL."""
        self._runner = web.AppRunner(self._build_app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        await self._listen()
        return self.base_url

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, HOST, self._port)
        await self._site.start()
        if not self._port:
            self._port = int(self._runner.addresses[0][1])  # bound now; kept for restore_connection

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_streams()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` in the background until it ends or the emulator stops."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- faults ---------------------------------------------------------------------------------------------------
    def lose_next_place_response(self) -> None:
        """The next accepted order takes effect (and fills), then its answer dies with the connection."""
        self._lose_next_place += 1

    async def drop_connection(self) -> None:
        """A real network drop: stop listening, reset keep-alive connections as they speak, close every stream."""
        self._down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        await self._close_streams()

    async def restore_connection(self) -> None:
        self._down = False
        if self._site is None and self._runner is not None:
            await self._listen()

    def _refuse_if_down(self, request: web.Request) -> None:
        """Middleware guard: a keep-alive connection opened before a drop is reset, as a dead network would."""
        if self._down:
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPServiceUnavailable()

    def _lose_this_answer(self, request: web.Request) -> web.Response | None:
        """If an answer is to be lost, reset the connection and return the response to write into it (which the
        client never sees); otherwise None. Call only once the order is in the book."""
        if not self._lose_next_place:
            return None
        self._lose_next_place -= 1
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=204)


async def serve_forever(emulator: EmulatorServer, banner: Callable[[], str]) -> None:
    """Run ``emulator`` until interrupted (``python -m brokers.emulators.<type>``), printing ``banner()`` once up."""
    await emulator.start()
    print(banner(), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
