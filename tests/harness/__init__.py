"""Harnesses that put one connector in front of a broker we control, for the shared contract suite.

Each module here (``paper``, ``tradovate``, ``projectx``) exposes ``make_harness(tmp_path)``: an async context
manager yielding a ``BrokerHarness`` whose connector is connected and ready to trade, plus hooks that make the
broker misbehave the way real ones do. ``tests/test_broker_contract.py`` runs one suite against all of them, so
every connector is held to the same promises (above all: never a duplicate order). ``emulated`` holds what the
harnesses of the real connectors share (they differ only in the emulator behind them).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import AsyncContextManager, Protocol, runtime_checkable

from brokers.base import Connector

HARNESS_MODULES = ("paper", "tradovate", "projectx")
"""Modules the contract suite runs against, in ``tests.harness``."""


@runtime_checkable
class BrokerHarness(Protocol):
    connector: Connector
    """Connected, ready to trade."""
    account: str
    """Broker account id to trade in (``OrderRequest.account``)."""
    contract: str
    """A contract to trade, e.g. ``MESZ6``."""
    commission_per_side: Decimal
    """What a fill of one contract is charged, for P&L assertions."""
    point_value: Decimal
    """USD per point for ``contract``."""

    def set_price(self, price: Decimal) -> None:
        """Market orders fill at ``price`` from now on (and resting orders may trigger)."""

    def reject_next(self, n: int = 1) -> None:
        """The next ``n`` place-order requests are rejected by the broker."""

    def partial_fill_next(self, parts: list[int]) -> None:
        """The next market order fills in these parts (e.g. ``[1, 2]`` for a 3-lot)."""

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2) -> None:
        """The next ``n`` requests get the broker's own rate-limit answer (429 / penalty ticket)."""

    def lose_next_place_response(self) -> None:
        """The broker accepts and fills the next order, but its answer never reaches the connector."""

    async def drop_connection(self) -> None:
        """A real drop: the broker closes sockets / stops accepting."""

    async def restore_connection(self) -> None:
        """The broker is reachable again (and the connector has noticed)."""

    async def broker_order_count(self, client_order_id: str) -> int:
        """How many orders the broker holds with ``client_order_id``: broker-side truth, for assertions."""


class HarnessFactory(Protocol):
    def __call__(self, tmp_path: Path) -> AsyncContextManager[BrokerHarness]: ...
