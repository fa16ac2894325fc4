"""Paper harness for the shared broker contract suite: ``PaperConnector`` on its own feed and a file database.

Timestamps default to ``eastern_naive``, the convention hardest to get right, so the suite runs the paper broker
through the same edge conversion the prop-firm brokers need.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

from brokers.feed import PriceFeed
from brokers.paper import PaperConnector
from engine.catalog import BUILTIN
from engine.model import Broker, Location, RateLimit

ACCOUNT = "PAPER-1"
CONTRACT = "MESZ6"
COMMISSIONS = {"MES": Decimal("0.25"), "ES": Decimal("0.59"), "default": Decimal("0.79")}
MARGINS = {"MES": Decimal(50), "ES": Decimal(500), "default": Decimal(1000)}


def broker_doc(name: str = "paper-test", *, paper: dict[str, Any] | None = None,
               rate_limit: RateLimit | None = RateLimit(120, 60.0),  # noqa: B008 - frozen value
               commissions: dict[str, Decimal] | None = None, margins: dict[str, Decimal] | None = None) -> Broker:
    """A paper Broker document as the loader would build it from YAML."""
    return Broker(
        name=name,
        type="paper",
        environment="demo",
        credentials={},
        rate_limit=rate_limit,
        commissions=COMMISSIONS if commissions is None else commissions,
        margins=MARGINS if margins is None else margins,
        reconcile_every_seconds=30,
        endpoints={},
        options={"paper": {"seed": 7, "timestamps": "eastern_naive", "starting_cash": 50000, **(paper or {})}},
        source=Location("tests/harness/paper.py", 1, 1),
    )


@dataclass
class PaperHarness:
    connector: PaperConnector
    feed: PriceFeed
    account: str
    contract: str
    commission_per_side: Decimal
    point_value: Decimal

    def set_price(self, price: Decimal) -> None:
        self.feed.set_price(self.contract, price)

    def reject_next(self, n: int = 1) -> None:
        self.connector.reject_next(n)

    def partial_fill_next(self, parts: list[int]) -> None:
        self.connector.partial_fill_next(parts)

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2) -> None:
        self.connector.rate_limit_next(n, retry_after_s)

    def lose_next_place_response(self) -> None:
        self.connector.lose_next_place_response()

    async def drop_connection(self) -> None:
        self.connector.disconnect("harness dropped the connection")

    async def restore_connection(self) -> None:
        await self.connector.reconnect()

    async def broker_order_count(self, client_order_id: str) -> int:
        return self.connector.book.order_count(self.account, client_order_id)


@contextlib.asynccontextmanager
async def make_harness(tmp_path: Path, *, paper: dict[str, Any] | None = None,
                       **connector_options: Any) -> AsyncIterator[PaperHarness]:
    feed = PriceFeed(seed=0)
    broker = broker_doc(paper=paper)
    connector = PaperConnector(broker, feed=feed, data_dir=tmp_path / "paper-data", **connector_options)
    await connector.connect()
    try:
        yield PaperHarness(
            connector=connector,
            feed=feed,
            account=ACCOUNT,
            contract=CONTRACT,
            commission_per_side=COMMISSIONS["MES"],
            point_value=BUILTIN["MES"].point_value,
        )
    finally:
        await connector.close()
