"""A fill pushed over the Tradovate user-data socket reaches the service at once, even when the broker throttles
the lookup of its fees.

Why: the fuzz on the real connector (plain seed 32) traded by hand at the broker right after a few of the broker's
own 429s were queued; the socket pushed the fill, the connector asked ``/fillFee/deps`` for its fees, met 429 four
times (its resends spent) and dropped the whole fill as "not resolved yet", to be retried on the next sync or
safety poll, 30 s away on a live socket. Until then the ledger missed the trader's position and every exit was
sized wrong. Fees have a stand-in (the Broker document's commission); the position has none.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from brokers.base import FillEvent, Side
from tests.harness.tradovate import ACCOUNT, make_harness

FEES_MES = {"commission": Decimal("0.25"), "clearingFee": Decimal("0.19"), "exchangeFee": Decimal("0.20"),
            "nfaFee": Decimal("0.02")}
"""The broker's FillFee breakdown; its total (0.66) differs from the Broker document's MES commission (0.35)."""


async def pushed_fill(queue: "asyncio.Queue[object]") -> FillEvent:
    """The next fill the connector reports (its other events skipped)."""
    while True:
        event = await queue.get()
        if isinstance(event, FillEvent):
            return event


async def test_a_fill_by_hand_is_reported_at_once_when_its_fee_lookup_is_throttled(tmp_path: Path) -> None:
    async with make_harness(tmp_path, emulator_options={"fee_schedule": {"MES": FEES_MES}},
                            throttle_wait_s=0.02, safety_poll_s=30.0) as h:
        assert h.connector.websocket_live
        document_fee = h.connector.broker.commission("MES")
        broker_fee = sum(FEES_MES.values(), Decimal(0))
        assert document_fee != broker_fee  # otherwise the stand-in could not be told from the broker's figure
        queue = h.connector.subscribe()
        h.emulator.rate_limit_next(1 + h.connector.throttle.max_resends, kind="429")  # every resend throttled too
        fill_id = await h.emulator.trade_by_hand(ACCOUNT, h.contract, "Sell", 2, "manual-1")
        # Well inside the 30 s safety poll: only the push can deliver it this soon.
        event = await asyncio.wait_for(pushed_fill(queue), 5.0)
        assert h.emulator.requests["/v1/fillFee/deps"] == 1 + h.connector.throttle.max_resends  # it did ask
        assert event.fill.fill_id == str(fill_id)
        assert (event.fill.account, event.fill.contract, event.fill.client_order_id) == (ACCOUNT, h.contract,
                                                                                         "manual-1")
        assert (event.fill.side, event.fill.quantity) == (Side.SELL, 2)
        assert event.fill.commission == 2 * document_fee  # the stand-in, not a missing fill
        # The statement path still reads the broker's own fees for that fill.
        fills = await h.connector.fills_since(ACCOUNT, datetime.now(timezone.utc) - timedelta(minutes=5))
        assert [(f.fill_id, f.commission) for f in fills] == [(str(fill_id), 2 * broker_fee)]


async def test_a_fill_by_hand_waits_for_its_fees_no_longer_than_fee_wait_s_under_a_penalty(tmp_path: Path) -> None:
    """With the production wait after a 429 (60 s, doubling), the fee ask alone would hold the fill, and every event
    the socket pushes after it, for a minute or more: it is bounded by ``fee_wait_s``."""
    async with make_harness(tmp_path, emulator_options={"fee_schedule": {"MES": FEES_MES}},
                            throttle_wait_s=60.0, fee_wait_s=0.3, safety_poll_s=30.0) as h:
        assert h.connector.websocket_live
        queue = h.connector.subscribe()
        h.emulator.rate_limit_next(1, kind="429")  # the fee ask meets it, then waits out the 60 s penalty
        fill_id = await h.emulator.trade_by_hand(ACCOUNT, h.contract, "Buy", 1, "manual-2")

        event = await asyncio.wait_for(pushed_fill(queue), 5.0)
        assert h.emulator.requests["/v1/fillFee/deps"] == 1  # asked, refused, and not waited for
        assert (event.fill.fill_id, event.fill.side, event.fill.quantity) == (str(fill_id), Side.BUY, 1)
        assert event.fill.commission == h.connector.broker.commission("MES")
