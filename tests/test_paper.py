"""The paper broker's own promises: costs from the Broker document, resting orders, quirks, restarts, drops."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from brokers.base import (
    BrokerUnavailable,
    ConnectionEvent,
    FillEvent,
    OrderEvent,
    OrderRejected,
    OrderRequest,
    OrderStatus,
    OrderType,
    OutcomeUnknown,
    RateLimited,
    Side,
    make_connector,
)
from brokers.feed import PriceFeed, root_of, snap
from brokers.paper import DuplicateOrder, PaperConnector, PaperQuirks
from engine.loader import load_rules
from engine.model import RateLimit
from tests.harness.paper import ACCOUNT, broker_doc

UTC = timezone.utc


def coid() -> str:
    return f"pt-{uuid.uuid4().hex[:12]}"


def buy(qty: int = 1, contract: str = "MESZ6", account: str = ACCOUNT, **kw: Any) -> OrderRequest:
    return OrderRequest(coid(), account, contract, Side.BUY, qty, **kw)


def sell(qty: int = 1, contract: str = "MESZ6", account: str = ACCOUNT, **kw: Any) -> OrderRequest:
    return OrderRequest(coid(), account, contract, Side.SELL, qty, **kw)


def connector(tmp_path: Path | None, feed: PriceFeed, *, paper: dict[str, Any] | None = None,
              rate_limit: RateLimit | None = RateLimit(120, 60.0),  # noqa: B008 - frozen value
              **kw: Any) -> PaperConnector:
    options: dict[str, Any] = {"feed": feed, **kw}
    if tmp_path is not None:
        options["data_dir"] = tmp_path
    return PaperConnector(broker_doc(paper=paper, rate_limit=rate_limit), **options)


@pytest.fixture
def feed() -> PriceFeed:
    f = PriceFeed(seed=1)
    f.set_price("MES", Decimal("6000"))
    f.set_price("ES", Decimal("6000"))
    return f


# -- the price feed ----------------------------------------------------------------------------------------------

def test_feed_defaults_snap_and_walk_in_ticks() -> None:
    feed = PriceFeed(seed=3)
    assert feed.price("MESZ6") == Decimal("6000.00")
    assert feed.price("NQ") == Decimal("21000.00")
    assert feed.price("MCLF7") == Decimal("70.00")
    assert feed.set_price("ES", Decimal("6000.13")) == Decimal("6000.25")
    assert feed.set_price("GC", "2600.04") == Decimal("2600.0")
    for _ in range(50):
        feed.step()
    for root in ("ES", "MES", "NQ", "MCL", "GC"):
        tick = feed.catalog[root].tick_size
        assert feed.price(root) % tick == 0
    assert PriceFeed(seed=3).price("ES") == Decimal("6000.00")


def test_feed_walk_is_reproducible_with_a_seed() -> None:
    def walk(seed: int) -> list[Decimal]:
        feed = PriceFeed(seed=seed)
        feed.price("MES")
        out = []
        for _ in range(20):
            feed.step()
            out.append(feed.price("MES"))
        return out

    assert walk(5) == walk(5)
    assert walk(5) != walk(6)


def test_feed_replays_csv_bars(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    path.write_text("time,root,open,high,low,close\n"
                    "2026-03-09T13:30:00Z,MES,6000,6002,5999,6001.25\n"
                    "2026-03-09T13:30:00Z,CL,70,70.1,69.9,70.05\n"
                    "2026-03-09T13:31:00Z,MES,6001.25,6004,6001,6003.5\n", encoding="utf-8")
    feed = PriceFeed.from_csv(path)
    seen: list[tuple[str, Decimal]] = []
    feed.subscribe(lambda root, price: seen.append((root, price)))
    assert feed.bar_time == datetime(2026, 3, 9, 13, 30, tzinfo=UTC)
    assert feed.price("MESH6") == Decimal("6001.25")
    assert feed.price("CL") == Decimal("70.05")
    assert feed.step() is True
    assert feed.price("MES") == Decimal("6003.50")
    assert seen == [("MES", Decimal("6003.50"))]
    assert feed.step() is False


def test_feed_csv_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    path.write_text("time,root,open,high,low,close\n2026-03-09T13:30:00,MES,1,1,1,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bars.csv:2"):
        PriceFeed.from_csv(path)
    path.write_text("time,root,close\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks column"):
        PriceFeed.from_csv(path)


def test_shared_feed_registry_and_roots() -> None:
    assert PriceFeed.shared("test-registry") is PriceFeed.shared("test-registry")
    assert PriceFeed.shared("test-registry") is not PriceFeed.shared("another-test-registry")
    assert root_of("MESZ6") == "MES" and root_of("es") == "ES" and root_of("M2KH7") == "M2K"
    with pytest.raises(KeyError, match="unknown instrument"):
        root_of("ZZZZ6")
    assert snap(Decimal("6000.125"), Decimal("0.25")) == Decimal("6000.25")


# -- costs: commissions, margin, P&L ----------------------------------------------------------------------------

async def test_commissions_come_from_the_broker_document_per_root(tmp_path: Path, feed: PriceFeed) -> None:
    feed.set_price("CL", Decimal("70"))
    async with connector(tmp_path, feed) as conn:
        since = datetime.now(UTC) - timedelta(seconds=5)
        await conn.place_order(buy(2, "MESZ6"))
        await conn.place_order(buy(1, "ESZ6"))
        await conn.place_order(buy(1, "CLF7"))  # falls back to "default"
        fills = await conn.fills_since(ACCOUNT, since)
        assert [(f.contract, f.commission) for f in fills] == [
            ("MESZ6", Decimal("0.50")), ("ESZ6", Decimal("0.59")), ("CLF7", Decimal("0.79"))]
        snap_ = await conn.account_snapshot(ACCOUNT)
        assert snap_.cash_balance == Decimal(50000) - Decimal("1.88")
        assert snap_.realized_pnl == Decimal("-1.88")


async def test_margin_unrealized_and_free_margin(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        await conn.place_order(buy(2, "MESZ6"))
        await conn.place_order(sell(1, "ESZ6"))
        feed.set_price("MES", Decimal("6010"))   # long 2 MES: +10 pts * 2 * $5 = +100
        feed.set_price("ES", Decimal("6004"))    # short 1 ES: -4 pts * $50 = -200
        snap_ = await conn.account_snapshot(ACCOUNT)
        assert snap_.margin_used == 2 * Decimal(50) + Decimal(500)
        assert snap_.unrealized_pnl == Decimal(-100)
        cash = Decimal(50000) - 2 * Decimal("0.25") - Decimal("0.59")
        assert snap_.cash_balance == cash
        assert snap_.free_margin == cash - 100 - 600
        positions = {p.contract: p for p in await conn.positions(ACCOUNT)}
        assert positions["MESZ6"].quantity == 2 and positions["MESZ6"].unrealized_pnl == Decimal(100)
        assert positions["ESZ6"].quantity == -1 and positions["ESZ6"].avg_price == Decimal(6000)


async def test_orders_beyond_free_margin_are_rejected_but_reducing_is_allowed(tmp_path: Path,
                                                                               feed: PriceFeed) -> None:
    conn = connector(tmp_path, feed, paper={"starting_cash": 1000})
    async with conn:
        await conn.place_order(buy(1, "ESZ6"))              # 500 margin of ~1000
        with pytest.raises(OrderRejected, match="insufficient margin"):
            await conn.place_order(buy(2, "ESZ6"))
        closing = await conn.place_order(sell(1, "ESZ6"))   # reduces exposure: always allowed
        assert closing.status is OrderStatus.FILLED


async def test_position_flip_realizes_only_the_closed_part(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        await conn.place_order(buy(1))
        feed.set_price("MES", Decimal("6002"))
        await conn.place_order(sell(3))
        [position] = await conn.positions(ACCOUNT)
        assert (position.quantity, position.avg_price) == (-2, Decimal("6002"))
        snap_ = await conn.account_snapshot(ACCOUNT)
        assert snap_.realized_pnl == Decimal(10) - 4 * Decimal("0.25")  # 2 pts * $5 on the closed lot


async def test_the_days_realized_pnl_adds_up_fill_by_fill_and_starts_over_each_trading_day(
        tmp_path: Path, feed: PriceFeed) -> None:
    """The snapshot's realized P&L is a running sum (each call adds the fills since the last one), checked against
    summing the whole day's fills at every step, with another account's fills in between and across 18:00 ET."""
    now = [datetime(2026, 11, 24, 15, 0, tzinfo=timezone.utc)]  # 10:00 ET
    conn = connector(tmp_path, feed, clock=lambda: now[0])
    other = "SIM-OTHER"

    def summed(account: str) -> Decimal:
        start = "2026-11-24T23:00:00" if now[0].hour >= 23 else "2026-11-23T23:00:00"
        return sum((Decimal(p) - Decimal(c) for p, c in conn.book.db.execute(
            "select pnl, commission from fills where account = ? and time >= ?", [account, start]).fetchall()),
            Decimal(0))

    async with conn:
        seen = []
        for step, price in enumerate(("6001", "6003.25", "5999.5", "6004")):
            feed.set_price("MES", Decimal(price))
            await conn.place_order(buy(1) if step % 2 == 0 else sell(1))
            await conn.place_order(buy(2, account=other) if step % 2 else sell(2, account=other))
            snap_ = await conn.account_snapshot(ACCOUNT)
            assert snap_.realized_pnl == summed(ACCOUNT), step
            seen.append(snap_.realized_pnl)
        assert seen[1] == Decimal("11.25") - 2 * Decimal("0.25")  # 2.25 pts * $5, two commissions
        assert (await conn.account_snapshot(other)).realized_pnl == summed(other)
        now[0] = datetime(2026, 11, 24, 23, 30, tzinfo=timezone.utc)  # 18:30 ET: the next trading day
        assert (await conn.account_snapshot(ACCOUNT)).realized_pnl == 0
        feed.set_price("MES", Decimal("6000"))
        await conn.place_order(buy(1))
        await conn.place_order(sell(1))
        assert (await conn.account_snapshot(ACCOUNT)).realized_pnl == summed(ACCOUNT) == -2 * Decimal("0.25")


# -- resting orders -----------------------------------------------------------------------------------------------

async def test_limit_order_rests_then_fills_when_the_feed_crosses(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        events = conn.subscribe()
        order = await conn.place_order(buy(1, order_type=OrderType.LIMIT, limit_price=Decimal("5990")))
        assert order.status is OrderStatus.WORKING
        feed.set_price("MES", Decimal("5990.25"))       # not yet
        assert (await conn.find_order(ACCOUNT, order.client_order_id)).status is OrderStatus.WORKING
        feed.set_price("MES", Decimal("5989.75"))       # crossed: fills at the market, no worse than the limit
        filled = await conn.find_order(ACCOUNT, order.client_order_id)
        assert filled.status is OrderStatus.FILLED and filled.avg_fill_price == Decimal("5989.75")
        fills = [e.fill for e in drain(events) if isinstance(e, FillEvent)]
        assert [(f.quantity, f.price) for f in fills] == [(1, Decimal("5989.75"))]


async def test_sell_limit_and_stops_trigger_on_the_right_side(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        take = await conn.place_order(sell(1, order_type=OrderType.LIMIT, limit_price=Decimal("6010")))
        stop_buy = await conn.place_order(buy(1, order_type=OrderType.STOP, stop_price=Decimal("6020")))
        stop_sell = await conn.place_order(sell(1, order_type=OrderType.STOP, stop_price=Decimal("5980")))
        feed.set_price("MES", Decimal("6011"))
        status = {o.broker_order_id: o.status for o in await conn.working_orders(ACCOUNT)}
        assert take.broker_order_id not in status
        assert set(status) == {stop_buy.broker_order_id, stop_sell.broker_order_id}
        feed.set_price("MES", Decimal("6025"))          # gapped through the buy stop: fills at the market
        order = await conn.find_order(ACCOUNT, stop_buy.client_order_id)
        assert order.status is OrderStatus.FILLED and order.avg_fill_price == Decimal("6025")
        feed.set_price("MES", Decimal("5979"))
        order = await conn.find_order(ACCOUNT, stop_sell.client_order_id)
        assert order.status is OrderStatus.FILLED and order.avg_fill_price == Decimal("5979")


async def test_marketable_limit_fills_at_once_and_off_tick_prices_are_rejected(tmp_path: Path,
                                                                                feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        order = await conn.place_order(buy(1, order_type=OrderType.LIMIT, limit_price=Decimal("6005")))
        assert order.status is OrderStatus.FILLED and order.avg_fill_price == Decimal("6000")
        with pytest.raises(OrderRejected, match="tick"):
            await conn.place_order(buy(1, order_type=OrderType.LIMIT, limit_price=Decimal("6000.10")))


async def test_cancel_rules(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        filled = await conn.place_order(buy(1))
        with pytest.raises(OrderRejected, match="already filled"):
            await conn.cancel_order(ACCOUNT, filled.broker_order_id)
        with pytest.raises(OrderRejected, match="no order"):
            await conn.cancel_order(ACCOUNT, "P999")
        resting = await conn.place_order(buy(1, order_type=OrderType.LIMIT, limit_price=Decimal("5000")))
        with pytest.raises(OrderRejected, match="no order"):
            await conn.cancel_order("SOMEONE-ELSE", resting.broker_order_id)
        first = await conn.cancel_order(ACCOUNT, resting.broker_order_id)
        again = await conn.cancel_order(ACCOUNT, resting.broker_order_id)  # cancelling twice is harmless
        assert first.status is again.status is OrderStatus.CANCELLED


# -- persistence ---------------------------------------------------------------------------------------------------

async def test_state_survives_a_restart(tmp_path: Path, feed: PriceFeed) -> None:
    first = connector(tmp_path, feed)
    async with first:
        market_order = await first.place_order(buy(2))
        resting = await first.place_order(sell(1, order_type=OrderType.LIMIT, limit_price=Decimal("6050")))
        before = await first.account_snapshot(ACCOUNT)
    assert (tmp_path / "paper-paper-test.db").exists()

    feed.set_price("MES", Decimal("6060"))  # while we were down: the resting order fills on reconnect
    second = connector(tmp_path, feed)
    async with second:
        assert (await second.find_order(ACCOUNT, market_order.client_order_id)).status is OrderStatus.FILLED
        after_fill = await second.find_order(ACCOUNT, resting.client_order_id)
        assert after_fill.status is OrderStatus.FILLED and after_fill.avg_fill_price == Decimal("6060")
        [position] = await second.positions(ACCOUNT)
        assert position.quantity == 1 and position.avg_price == Decimal("6000")
        after = await second.account_snapshot(ACCOUNT)
        assert after.cash_balance == before.cash_balance + Decimal(60) * 5 - Decimal("0.25")
        # Ids keep counting: a new order never reuses an old broker id.
        new = await second.place_order(buy(1))
        assert new.broker_order_id not in {market_order.broker_order_id, resting.broker_order_id}


async def test_every_step_is_committed_where_another_connection_sees_it(tmp_path: Path, feed: PriceFeed) -> None:
    """The book writes with plain SQL: each broker step must still end committed (a crash loses nothing it
    answered), seen from a separate connection as a restarted process would see it."""
    async with connector(tmp_path, feed, paper={"starting_cash": 1000}) as conn:
        other = sqlite3.connect(tmp_path / "paper-paper-test.db")
        try:
            def one(sql: str, *params: Any) -> Any:
                return other.execute(sql, params).fetchone()

            filled = await conn.place_order(buy(2))
            assert one("select status, filled_quantity from orders where broker_order_id = ?",
                       filled.broker_order_id) == ("filled", 2)
            quantity, avg_price = one("select quantity, avg_price from positions where account = ?", ACCOUNT)
            assert (quantity, Decimal(avg_price)) == (2, Decimal(6000))
            assert one("select cash from accounts where id = ?", ACCOUNT) == ("999.50",)
            assert one("select count(*), sum(quantity) from fills where account = ?", ACCOUNT) == (1, 2)
            resting = await conn.place_order(sell(1, order_type=OrderType.LIMIT, limit_price=Decimal("6050")))
            await conn.cancel_order(ACCOUNT, resting.broker_order_id)
            assert one("select status from orders where broker_order_id = ?", resting.broker_order_id) == (
                "cancelled",)
            with pytest.raises(OrderRejected, match="insufficient margin"):
                await conn.place_order(buy(100))
            await conn.account_snapshot("fresh")
            assert one("select cash from accounts where id = 'fresh'") == ("1000",)
            await conn.place_order(sell(2))  # closes the position: its row goes
            assert one("select count(*) from positions") == (0,)
            assert dict(other.execute("select name, value from counters").fetchall()) == {
                "orders": 3, "fills": 2, "rejected": 1}
            assert not conn.book.db.conn.in_transaction
        finally:
            other.close()


async def test_a_fill_that_fails_halfway_changes_nothing(tmp_path: Path, feed: PriceFeed,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Position, cash, fill and order move together: a failure after the position moved rolls it all back."""
    async with connector(tmp_path, feed) as conn:
        await conn.place_order(buy(1))
        book = conn.book
        order = book.accept(buy(2))
        before = (book.positions(ACCOUNT), book.snapshot_values(ACCOUNT), book.order(order["broker_order_id"]))

        def broken(name: str, prefix: str) -> str:
            raise RuntimeError("disk full")

        monkeypatch.setattr(book, "_next_id", broken)  # after the position and the cash, before the fill row
        with pytest.raises(RuntimeError, match="disk full"):
            book.fill(order["broker_order_id"], 2)
        monkeypatch.undo()
        assert not book.db.conn.in_transaction
        assert (book.positions(ACCOUNT), book.snapshot_values(ACCOUNT),
                book.order(order["broker_order_id"])) == before
        assert book.fill(order["broker_order_id"], 2) is not None
        [position] = book.positions(ACCOUNT)
        assert position["quantity"] == 3


async def test_without_data_dir_state_lives_in_memory_for_the_connector(feed: PriceFeed) -> None:
    conn = connector(None, feed)
    async with conn:
        order = await conn.place_order(buy(1))
    async with conn:
        assert (await conn.find_order(ACCOUNT, order.client_order_id)) is not None
    async with connector(None, feed) as other:
        assert (await other.find_order(ACCOUNT, order.client_order_id)) is None


async def test_any_account_is_opened_with_starting_cash(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed, paper={"starting_cash": 12345}) as conn:
        snap_ = await conn.account_snapshot("brand-new")
        assert snap_.cash_balance == Decimal(12345) and snap_.free_margin == Decimal(12345)


async def test_a_repeated_client_order_id_returns_the_first_order(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        request = buy(1)
        first = await conn.place_order(request)
        second = await conn._submit(request)  # bypass the lookup: the broker itself refuses to book it twice
        assert second.broker_order_id == first.broker_order_id
        assert conn.book.order_count(ACCOUNT, request.client_order_id) == 1


# -- quirks ---------------------------------------------------------------------------------------------------------

async def test_reject_rate_rejects_without_booking(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed, paper={"reject_rate": 1}) as conn:
        events = conn.subscribe()
        request = buy(1)
        with pytest.raises(OrderRejected, match="reject_rate") as excinfo:
            await conn.place_order(request)
        assert excinfo.value.order is not None and excinfo.value.order.status is OrderStatus.REJECTED
        assert conn.book.order_count(ACCOUNT, request.client_order_id) == 0
        assert [e.order.status for e in drain(events) if isinstance(e, OrderEvent)] == [OrderStatus.REJECTED]


async def test_partial_fill_rate_splits_market_orders(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed, paper={"partial_fill_rate": 1, "seed": 11}) as conn:
        since = datetime.now(UTC) - timedelta(seconds=5)
        order = await conn.place_order(buy(5))
        assert order.status is OrderStatus.FILLED
        parts = [f.quantity for f in await conn.fills_since(ACCOUNT, since)]
        assert len(parts) == 2 and sum(parts) == 5
        single = await conn.place_order(buy(1))          # one lot cannot split
        assert single.filled_quantity == 1


async def test_injected_partial_parts_are_clipped_and_completed(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        since = datetime.now(UTC) - timedelta(seconds=5)
        conn.partial_fill_next([2, 5])
        await conn.place_order(buy(4))
        conn.partial_fill_next([1])
        await conn.place_order(buy(3))
        assert [f.quantity for f in await conn.fills_since(ACCOUNT, since)] == [2, 2, 1, 2]


async def test_latencies_delay_the_ack_and_the_fill(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed, paper={"ack_latency_ms": 30, "fill_latency_ms": 60}) as conn:
        events = conn.subscribe()
        started = time.monotonic()
        order = await conn.place_order(buy(1))
        assert time.monotonic() - started >= 0.025
        assert order.status is OrderStatus.WORKING          # acknowledged, not yet filled
        fill = await asyncio.wait_for(next_fill(events), 2)
        assert fill.broker_order_id == order.broker_order_id
        assert (await conn.find_order(ACCOUNT, order.client_order_id)).status is OrderStatus.FILLED


async def test_zero_latency_fast_path_matches_the_latency_path(feed: PriceFeed) -> None:
    """Filling at once (the row kept from the write, the order not read back) books and reports exactly what the
    latency path does, which reads every step from SQLite: same events, same stored state, and the order returned
    is the stored one."""

    async def run(paper: dict[str, Any]) -> tuple[list[Any], list[Any], Any]:
        prices = PriceFeed(seed=1, start_prices={"MES": Decimal(6000)})
        conn = connector(None, prices, paper={"partial_fill_rate": 0.5, "seed": 3, **paper}, rate_limit=None)
        async with conn:
            events = conn.subscribe()
            seen: list[Any] = []
            for i in range(12):
                prices.step()  # fills at moving prices: averages and P&L differ order to order
                if i == 4:
                    conn.partial_fill_next([1, 1])
                request = OrderRequest(f"eq-{i}", ("EQ-A", "EQ-B")[i % 2], "MESZ6",
                                       Side.SELL if i % 3 == 2 else Side.BUY, 1 + i % 4)
                returned = await conn.place_order(request)
                if not paper:
                    assert returned.status is OrderStatus.FILLED
                    assert returned == conn._order(conn.book.order(returned.broker_order_id))
                while True:  # wait for this order to fill completely before the next one
                    event = await asyncio.wait_for(events.get(), 2)
                    if isinstance(event, (OrderEvent, FillEvent)):
                        value = event.order if isinstance(event, OrderEvent) else event.fill
                        seen.append({k: v for k, v in vars(value).items()
                                     if k not in ("created_at", "updated_at", "time")})
                    if isinstance(event, OrderEvent) and event.order.status is OrderStatus.FILLED:
                        break
            book = conn.book
            state = [(book.positions(a), {k: v for k, v in book.snapshot_values(a).items()}) for a in ("EQ-A", "EQ-B")]
            stored = book.db.conn.execute(
                "select broker_order_id, status, filled_quantity, avg_fill_price from orders order by 1").fetchall()
            return seen, state, stored

    fast = await run({})
    slow = await run({"ack_latency_ms": 1, "fill_latency_ms": 1})
    assert fast == slow
    assert any(e.get("status") is OrderStatus.PARTIALLY_FILLED for e in fast[0])  # splits were exercised


async def test_pending_fills_complete_on_close(tmp_path: Path, feed: PriceFeed) -> None:
    conn = connector(tmp_path, feed, paper={"fill_latency_ms": 10_000})
    async with conn:
        order = await conn.place_order(buy(1))
        assert order.status is OrderStatus.WORKING
    async with connector(tmp_path, feed) as again:
        assert (await again.find_order(ACCOUNT, order.client_order_id)).status is OrderStatus.FILLED


@pytest.mark.parametrize("convention, raw_type", [("utc_iso", str), ("eastern_naive", str), ("epoch_ms", int)])
async def test_timestamps_cross_the_edge_as_aware_utc(tmp_path: Path, feed: PriceFeed, convention: str,
                                                      raw_type: type) -> None:
    async with connector(tmp_path, feed, paper={"timestamps": convention}) as conn:
        order = await conn.place_order(buy(1))
        raw = conn.book.find(ACCOUNT, order.client_order_id)
        assert isinstance(raw["created_at"], raw_type)             # the broker's own format...
        if convention == "eastern_naive":
            assert "+" not in raw["created_at"] and "Z" not in raw["created_at"]
        now = datetime.now(UTC)
        for stamp in (order.created_at, order.updated_at, await conn.server_time()):
            assert stamp.utcoffset() == timedelta(0)                # ...normalized at the edge
            assert abs(now - stamp) < timedelta(seconds=5)


def test_unknown_or_bad_paper_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown paper option"):
        PaperQuirks.from_options({"latency": 3})
    with pytest.raises(ValueError, match="timestamps"):
        PaperQuirks.from_options({"timestamps": "local"})
    with pytest.raises(ValueError, match="reject_rate"):
        PaperQuirks.from_options({"reject_rate": 2})


# -- rate limit and connection -----------------------------------------------------------------------------------

async def test_broker_side_rate_limit_answers_like_a_broker(feed: PriceFeed) -> None:
    conn = connector(None, feed, rate_limit=RateLimit(2, 0.5))
    book = conn.book
    book.admit()
    book.admit()
    with pytest.raises(RateLimited) as excinfo:
        book.admit()
    assert 0 < excinfo.value.retry_after_s <= 0.5
    assert "2 requests per 0.5s" in str(excinfo.value)


async def test_bursts_over_the_limit_are_throttled_not_duplicated(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed, rate_limit=RateLimit(3, 0.3)) as conn:
        requests = [buy(1) for _ in range(6)]
        orders = await asyncio.gather(*(conn.place_order(r) for r in requests))
        assert [o.client_order_id for o in orders] == [r.client_order_id for r in requests]
        assert all(conn.book.order_count(ACCOUNT, r.client_order_id) == 1 for r in requests)
        assert conn.limiter.waits + conn.limiter.penalties > 0
        [position] = await conn.positions(ACCOUNT)
        assert position.quantity == 6


async def test_disconnect_and_reconnect(tmp_path: Path, feed: PriceFeed) -> None:
    async with connector(tmp_path, feed) as conn:
        events = conn.subscribe()
        resting = await conn.place_order(buy(1, order_type=OrderType.LIMIT, limit_price=Decimal("5990")))
        conn.disconnect()
        assert not conn.connected
        with pytest.raises(BrokerUnavailable):
            await conn.find_order(ACCOUNT, resting.client_order_id)
        with pytest.raises(BrokerUnavailable):
            await conn.connect()
        feed.set_price("MES", Decimal("5985"))   # the broker trades on while we are away...
        await conn.reconnect()
        seen = drain(events)
        assert [e.connected for e in seen if isinstance(e, ConnectionEvent)] == [False, True]
        assert not any(isinstance(e, FillEvent) for e in seen)  # ...and we did not hear of it live
        order = await conn.find_order(ACCOUNT, resting.client_order_id)
        assert order.status is OrderStatus.FILLED


async def test_sever_cuts_the_link_silently_and_the_broker_finishes_the_orders_handed_to_it(
        tmp_path: Path, feed: PriceFeed) -> None:
    """A crash of our process (kill -9): no event at all, not even a connection event; the fill the connector was
    playing out stops where it stands; the broker keeps the order and the faults it owes, and the next connection,
    from the restarted process, finds the order filled and gets the rejection still owed."""
    conn = connector(tmp_path, feed, paper={"fill_latency_ms": 60})
    await conn.connect()
    events = conn.subscribe()
    order = await conn.place_order(buy(2))
    assert order.status is OrderStatus.WORKING
    conn.reject_next(1)
    drain(events)
    conn.sever()
    conn.sever()  # idempotent
    assert not conn.connected
    await asyncio.sleep(0.1)  # the fill was due meanwhile
    assert drain(events) == []
    assert conn.book.order(order.broker_order_id)["status"] == OrderStatus.WORKING.value  # the broker still has it
    with pytest.raises(BrokerUnavailable):
        await conn.find_order(ACCOUNT, order.client_order_id)
    owed = conn.book.reject_next
    conn.book.db.close()  # the dead process's handle on the broker goes with it
    assert owed == 1
    async with connector(tmp_path, feed) as restarted:
        restarted.reject_next(owed)
        found = await restarted.find_order(ACCOUNT, order.client_order_id)
        assert found is not None and found.status is OrderStatus.FILLED and found.filled_quantity == 2
        with pytest.raises(OrderRejected):
            await restarted.place_order(buy(1))
        assert restarted.book.order_count(ACCOUNT, order.client_order_id) == 1


async def test_sever_then_reconnect_is_a_silent_network_failure(tmp_path: Path, feed: PriceFeed) -> None:
    """The same connector links again: the order handed to the broker before the cut is filled once, a placement
    under way when the link was cut ends OutcomeUnknown (never "not sent": it may have reached the broker)."""
    async with connector(tmp_path, feed, paper={"ack_latency_ms": 50}, reconnect_wait_s=0.05) as conn:
        events = conn.subscribe()
        request = buy(1)
        placing = asyncio.create_task(conn.place_order(request))
        await asyncio.sleep(0.02)  # handed to the broker, the acknowledgement not back yet
        conn.sever()
        with pytest.raises(OutcomeUnknown):
            await placing
        assert [e for e in drain(events) if isinstance(e, ConnectionEvent)] == []
        await conn.reconnect()
        assert [e.connected for e in drain(events) if isinstance(e, ConnectionEvent)] == [True]
        found = await conn.find_order(ACCOUNT, request.client_order_id)
        assert found is not None and found.status is OrderStatus.FILLED
        assert conn.book.order_count(ACCOUNT, request.client_order_id) == 1


async def test_drop_while_waiting_for_the_ack_is_resolved_by_lookup(tmp_path: Path, feed: PriceFeed,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async with connector(tmp_path, feed, paper={"ack_latency_ms": 100}) as conn:
        request = buy(1)
        placing = asyncio.create_task(conn.place_order(request))
        await asyncio.sleep(0.03)
        conn.disconnect()
        await asyncio.sleep(0.1)
        await conn.reconnect()
        order = await placing
        assert order.client_order_id == request.client_order_id
        assert any("unknown" in r.getMessage() for r in caplog.records)  # it went through the lookup path
        assert conn.book.order_count(ACCOUNT, request.client_order_id) == 1


async def test_registered_and_built_from_the_example_rules(tmp_path: Path, feed: PriceFeed) -> None:
    result = load_rules(["rules"])
    assert result.ruleset is not None, result.diagnostics
    slow = result.ruleset.brokers["paper-slow"]
    conn = make_connector(slow, feed=feed, data_dir=tmp_path)
    assert isinstance(conn, PaperConnector)
    assert conn.quirks.timestamps == "eastern_naive" and conn.quirks.ack_latency_ms == 200
    assert conn.limiter.requests == 200


def drain(queue: "asyncio.Queue[Any]") -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def next_fill(queue: "asyncio.Queue[Any]") -> Any:
    while True:
        event = await queue.get()
        if isinstance(event, FillEvent):
            return event.fill


async def test_a_manual_trade_is_the_brokers_own_and_reaches_the_fill_stream_only_while_connected(
        tmp_path: Path, feed: PriceFeed) -> None:
    """A trade placed by hand in the broker's platform: filled at once in full at the feed's price, outside the
    faults injected for our session (the rejection owed stays owed), its fill on our event stream while connected;
    while the link is down nothing reaches us live and ``fills_since`` lists it. Its client order id is its own."""
    async with connector(tmp_path, feed, paper={"partial_fill_rate": 1.0}) as conn:
        events = conn.subscribe()
        conn.reject_next(1)
        since = datetime.now(UTC) - timedelta(minutes=1)
        fill = conn.manual_trade(ACCOUNT, "MESZ6", Side.SELL, 3, "manual-1")
        assert (fill.client_order_id, fill.side, fill.quantity, fill.price) == ("manual-1", Side.SELL, 3,
                                                                                Decimal("6000"))
        seen = [e.fill for e in drain(events) if isinstance(e, FillEvent)]
        assert [(f.client_order_id, f.quantity) for f in seen] == [("manual-1", 3)]
        assert {p.contract: p.quantity for p in await conn.positions(ACCOUNT)} == {"MESZ6": -3}
        assert conn.book.reject_next == 1  # still owed to our next order
        with pytest.raises(OrderRejected):
            await conn.place_order(buy(1))

        conn.disconnect()
        conn.manual_trade(ACCOUNT, "MESZ6", Side.BUY, 1, "manual-2")  # the broker trades on while we are away
        await conn.reconnect()
        assert not any(isinstance(e, FillEvent) for e in drain(events))
        listed = await conn.fills_since(ACCOUNT, since)
        assert [(f.client_order_id, f.side, f.quantity) for f in listed] == [("manual-1", Side.SELL, 3),
                                                                             ("manual-2", Side.BUY, 1)]
        assert {p.contract: p.quantity for p in await conn.positions(ACCOUNT)} == {"MESZ6": -2}
        with pytest.raises(DuplicateOrder, match="manual-2"):
            conn.manual_trade(ACCOUNT, "MESZ6", Side.BUY, 1, "manual-2")
