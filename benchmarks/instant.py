"""A benchmark broker that fills at once: shared by benchmarks/webhook.py (in its server process) and
benchmarks/dispatch.py."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from brokers import base


class InstantBroker(base.Connector):
    """Fills every market order inside ``_submit`` at a fixed price, holding its state in dicts: what a benchmark
    measures behind it is the service's own cost per order (journal, state machine, ledger, risk), not a broker
    simulation's. It registers as type ``paper`` (``install``), so the benchmark rules' paper brokers use it."""

    type = "paper"

    def __init__(self, broker: Any, **options: Any) -> None:
        super().__init__(broker, **options)
        self.up = False
        self.orders: dict[tuple[str, str], base.Order] = {}
        self.fills: dict[str, list[base.Fill]] = {}
        self.pos: dict[tuple[str, str], int] = {}
        self.n = 0

    async def connect(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.up = False

    @property
    def connected(self) -> bool:
        return self.up

    async def _submit(self, request: base.OrderRequest) -> base.Order:
        now = datetime.now(timezone.utc)
        self.n += 1
        order = base.Order(f"I{self.n}", request.client_order_id, request.account, request.contract,
                           request.side, request.quantity, request.quantity, base.OrderStatus.FILLED,
                           request.order_type, now, now, avg_fill_price=Decimal("6000"))
        fill = base.Fill(f"F{self.n}", order.broker_order_id, order.client_order_id, order.account,
                         order.contract, order.side, order.quantity, Decimal("6000"), Decimal("0.25"), now)
        self.orders[(request.account, request.client_order_id)] = order
        self.fills.setdefault(request.account, []).append(fill)
        key = (request.account, request.contract)
        self.pos[key] = self.pos.get(key, 0) + order.quantity * order.side.sign
        self._emit(base.FillEvent(fill))
        self._emit(base.OrderEvent(order))
        return order

    async def find_order(self, account: str, client_order_id: str) -> base.Order | None:
        return self.orders.get((account, client_order_id))

    async def cancel_order(self, account: str, broker_order_id: str) -> base.Order:
        raise base.OrderRejected("nothing rests here")

    async def working_orders(self, account: str) -> list[base.Order]:
        return []

    async def positions(self, account: str) -> list[base.Position]:
        return [base.Position(a, c, q, Decimal("6000")) for (a, c), q in sorted(self.pos.items())
                if a == account and q]

    async def account_snapshot(self, account: str) -> base.AccountSnapshot:
        return base.AccountSnapshot(account, Decimal(10**9), Decimal(0), Decimal(10**9), Decimal(0), Decimal(0),
                                    datetime.now(timezone.utc))

    async def fills_since(self, account: str, since: datetime) -> list[base.Fill]:
        return [f for f in self.fills.get(account, []) if f.time >= since]


def install() -> None:
    """Make ``type: paper`` brokers instant ones (the built-in connectors register first, then this replaces paper)."""
    base.connector_class("paper")
    base.register(InstantBroker)
