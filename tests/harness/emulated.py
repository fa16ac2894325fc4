"""What the harnesses of the real connectors share: the connector runs unchanged against one of our emulators
(``brokers.emulators``), and the misbehaviour hooks of ``BrokerHarness`` go to that emulator, which misbehaves
on the wire the way the real broker does."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar, Protocol

from brokers.base import Connector


class Emulator(Protocol):
    """The misbehaviour hooks both broker emulators offer."""

    def set_price(self, contract: str, price: Decimal, /) -> None: ...

    def reject_next(self, n: int = 1) -> None: ...

    def partial_fill_next(self, parts: list[int]) -> None: ...

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2) -> None: ...

    def lose_next_place_response(self) -> None: ...

    async def drop_connection(self) -> None: ...

    async def restore_connection(self) -> None: ...


@dataclass
class EmulatedHarness:
    connector: Connector
    emulator: Emulator
    account: str
    contract: str
    commission_per_side: Decimal
    point_value: Decimal

    broker_label: ClassVar[str] = "The"
    """The broker's name in the message of a reconnect that never came."""
    remote: ClassVar[str] = "broker"
    """What the connector waits for to come back, in the same message (ProjectX calls it the gateway)."""

    def set_price(self, price: Decimal) -> None:
        self.emulator.set_price(self.contract, price)

    def reject_next(self, n: int = 1) -> None:
        self.emulator.reject_next(n)

    def partial_fill_next(self, parts: list[int]) -> None:
        self.emulator.partial_fill_next(parts)

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2) -> None:
        self.emulator.rate_limit_next(n, retry_after_s)

    def lose_next_place_response(self) -> None:
        self.emulator.lose_next_place_response()

    async def drop_connection(self) -> None:
        await self.emulator.drop_connection()

    async def restore_connection(self) -> None:
        """Bring the broker back and wait (bounded) until the connector has reconnected by itself: the suite
        checks what the connector does on its own, not a reconnect the harness forced."""
        await self.emulator.restore_connection()
        deadline = time.monotonic() + 5.0
        while not self.connector.connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.broker_label} connector did not reconnect within 5 s of the "
                                   f"{self.remote} coming back")
            await asyncio.sleep(0.02)


async def wait_until(predicate: Any, timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate()`` (bounded) — for state the connector reaches in the background."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:g}s")
        await asyncio.sleep(0.01)


class EmulatorThread:
    """An emulator on an event loop of its own, in a thread: the broker as another process is, for the runtime
    fuzz (``tests.harness.fuzz``), whose crash kills every task of the test's loop (the service's) and must leave
    the broker trading: its request handlers, the rest of a partial fill, its pushes. Calls into the emulator go
    through its loop (``call`` for its synchronous hooks and read-outs, blocking for a moment; ``run`` for its
    coroutines, awaited without blocking the caller's loop, whose clients the emulator may be talking to)."""

    def __init__(self, emulator: Any) -> None:
        import threading

        self.emulator = emulator
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="emulator", daemon=True)

    async def start(self) -> None:
        self._thread.start()
        await self.run(self.emulator.start)

    async def stop(self) -> None:
        try:
            await self.run(self.emulator.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            await asyncio.to_thread(self._thread.join, 5.0)
            self.loop.close()

    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the emulator's loop (synchronous, never awaiting): its result, or its exception."""
        import concurrent.futures

        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def invoke() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return future.result(timeout=10.0)

    async def run(self, fn: Any, *args: Any) -> Any:
        """Await the coroutine ``fn(*args)`` on the emulator's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), self.loop))
