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
