"""ProjectX specifics the shared contract suite does not cover: the success-in-the-body envelope, 401 and token
renewal, customTag idempotency, seven-digit timestamps, contract ids, unsigned positions, the user hub."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from brokers.base import (
    BrokerError,
    OutcomeUnknown,
    BrokerUnavailable,
    ConnectionEvent,
    FillEvent,
    OrderEvent,
    OrderRejected,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    make_connector,
)
from brokers.emulators.projectx import ProjectXEmulator, build_contracts, wire_time
from brokers.projectx import (
    ProjectXConnector,
    choose_contract,
    code_from_contract,
    filled_quantity,
    order_status,
    signed_size,
    trading_day_start,
    wire_order_type,
)
from engine.catalog import Catalog
from engine.model import RateLimit
from tests.harness.projectx import ACCOUNT, ENV, FAST, ProjectXHarness, broker_doc, make_harness

NOW = datetime(2026, 11, 24, 16, 0, tzinfo=timezone.utc)
CATALOG = Catalog()


def market(coid: str, contract: str, side: Side = Side.BUY, quantity: int = 1) -> OrderRequest:
    return OrderRequest(coid, ACCOUNT, contract, side, quantity)


async def next_event(queue: "asyncio.Queue", kind: type, timeout_s: float = 2.0):  # type: ignore[type-arg]
    async def wait():  # type: ignore[no-untyped-def]
        while True:
            event = await queue.get()
            if isinstance(event, kind):
                return event
    return await asyncio.wait_for(wait(), timeout_s)


@pytest.fixture
async def px(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with make_harness(tmp_path) as harness:
        yield harness


# -- pure wire logic ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("wire", "fill_volume", "expected"), [
    (0, 0, OrderStatus.UNKNOWN),
    (1, 0, OrderStatus.WORKING),
    (1, 2, OrderStatus.PARTIALLY_FILLED),
    (2, 3, OrderStatus.FILLED),
    (3, 0, OrderStatus.CANCELLED),
    (4, 0, OrderStatus.EXPIRED),
    (5, 0, OrderStatus.REJECTED),
    (6, 0, OrderStatus.PENDING),
    (7, 0, OrderStatus.WORKING),  # pending cancellation: still live until the broker says cancelled
    (8, 0, OrderStatus.PENDING),
    (99, 0, OrderStatus.UNKNOWN),
])
def test_order_status_mapping(wire: int, fill_volume: int, expected: OrderStatus) -> None:
    assert order_status(wire, fill_volume) is expected


@pytest.mark.parametrize(("wire", "expected"), [
    (1, OrderType.LIMIT), (2, OrderType.MARKET), (3, OrderType.STOP), (4, OrderType.STOP), (5, OrderType.STOP),
    (6, OrderType.LIMIT), (7, OrderType.LIMIT),  # JoinBid / JoinAsk rest at the touch: limits, not markets
])
def test_order_types_from_the_wire(wire: int, expected: OrderType) -> None:
    assert wire_order_type(wire) is expected


def test_filled_quantity_without_fill_volume_comes_from_the_status() -> None:
    assert filled_quantity({"size": 3, "status": 2, "fillVolume": 3}) == 3
    assert filled_quantity({"size": 3, "status": 1, "fillVolume": 1}) == 1
    assert filled_quantity({"size": 3, "status": 2}) == 3  # older gateways: no fillVolume
    assert filled_quantity({"size": 3, "status": 1}) == 0


def test_positions_become_signed() -> None:
    assert signed_size(1, 2) == 2
    assert signed_size(2, 3) == -3
    with pytest.raises(BrokerError, match="neither 1"):
        signed_size(0, 1)


SEARCH_NQ = [  # what a firm answers to searchText "NQ": product-style names, micro and minis mixed
    {"id": "CON.F.US.ENQ.Z26", "name": "ENQZ26", "tickSize": 0.25, "tickValue": 5},
    {"id": "CON.F.US.MNQ.Z26", "name": "MNQZ26", "tickSize": 0.25, "tickValue": 0.5},
    {"id": "CON.F.US.ENQ.H27", "name": "ENQH27", "tickSize": 0.25, "tickValue": 5},
    {"id": "CON.F.US.NQG.Z26", "name": "NQGZ26", "tickSize": 0.005, "tickValue": 12.5},
]


@pytest.mark.parametrize(("code", "contracts", "expected"), [
    ("MESZ6", [{"id": "CON.F.US.MES.Z26", "name": "MESZ6"}], "CON.F.US.MES.Z26"),
    ("MESZ6", [{"id": "CON.F.US.MES.Z26", "name": "MESZ26"}], "CON.F.US.MES.Z26"),
    ("ESZ6", [{"id": "CON.F.US.MES.Z26", "name": "MESZ6"}, {"id": "CON.F.US.EP.Z26", "name": "ESZ6"}],
     "CON.F.US.EP.Z26"),
    ("NQZ6", SEARCH_NQ, "CON.F.US.ENQ.Z26"),       # by the catalog's tick size and value
    ("MNQZ6", SEARCH_NQ, "CON.F.US.MNQ.Z26"),      # by product = root
    ("NQH7", SEARCH_NQ, "CON.F.US.ENQ.H27"),       # month and year come from the code
    ("MGCG7", [{"id": "CON.F.US.GMET.G27", "name": "GMETG27", "tickSize": 0.1, "tickValue": 1}],
     "CON.F.US.GMET.G27"),
])
def test_contract_resolution(code: str, contracts: list[dict[str, object]], expected: str) -> None:
    assert choose_contract(code, contracts, CATALOG)["id"] == expected


def test_contract_resolution_refuses_to_guess() -> None:
    twins = [{"id": "CON.F.US.AAA.Z26", "name": "AAAZ26", "tickSize": 0.25, "tickValue": 5},
             {"id": "CON.F.US.BBB.Z26", "name": "BBBZ26", "tickSize": 0.25, "tickValue": 5}]
    with pytest.raises(BrokerError, match="cannot tell which contract is NQZ6"):
        choose_contract("NQZ6", twins, CATALOG)
    assert choose_contract("NQZ6", twins, CATALOG, {"NQ": "BBB"})["id"] == "CON.F.US.BBB.Z26"
    connector = ProjectXConnector(broker_doc(None), env=ENV, products={"NQ": "BBB"})
    assert connector.products == {"NQ": "BBB"}
    assert connector.base_url == "https://gateway-api-demo.s2f.projectx.com"
    with pytest.raises(BrokerError, match="no candidates"):
        choose_contract("NQU6", SEARCH_NQ, CATALOG)


@pytest.mark.parametrize(("contract", "expected"), [
    ({"id": "CON.F.US.MES.Z26", "name": "MESZ6"}, "MESZ6"),
    ({"id": "CON.F.US.EP.Z26", "name": "EPZ26"}, "ESZ6"),
    ({"id": "CON.F.US.GMET.G27", "name": "GMETG27"}, "MGCG7"),
    ({"id": "CON.F.US.ENQ.H27"}, "NQH7"),
    ({"id": "CON.F.US.QQQ.H27"}, "CON.F.US.QQQ.H27"),  # unknown product: the id itself, never a guess
])
def test_contract_code_from_gateway_contract(contract: dict[str, str], expected: str) -> None:
    assert code_from_contract(contract, CATALOG) == expected


@pytest.mark.parametrize(("now", "expected"), [
    (datetime(2026, 11, 24, 16, 0, tzinfo=timezone.utc), datetime(2026, 11, 23, 23, 0, tzinfo=timezone.utc)),
    (datetime(2026, 11, 24, 23, 30, tzinfo=timezone.utc), datetime(2026, 11, 24, 23, 0, tzinfo=timezone.utc)),
    # Monday 2 November, after the fall-back: the day began Sunday 18:00 EST = 23:00 UTC
    (datetime(2026, 11, 2, 14, 0, tzinfo=timezone.utc), datetime(2026, 11, 1, 23, 0, tzinfo=timezone.utc)),
    # Monday 9 March, after the spring-forward: Sunday 18:00 EDT = 22:00 UTC
    (datetime(2026, 3, 9, 14, 0, tzinfo=timezone.utc), datetime(2026, 3, 8, 22, 0, tzinfo=timezone.utc)),
])
def test_trading_day_starts_at_six_pm_new_york(now: datetime, expected: datetime) -> None:
    assert trading_day_start(now) == expected


def test_wire_time_has_seven_fractional_digits_and_an_offset() -> None:
    text = wire_time(datetime(2026, 11, 24, 16, 27, 11, 123456, tzinfo=timezone.utc))
    assert text == "2026-11-24T16:27:11.1234560+00:00"


def test_emulated_contract_table_uses_firm_product_codes() -> None:
    ids = {c.code: c.id for c in build_contracts(NOW)}
    assert ids["ESZ6"] == "CON.F.US.EP.Z26"
    assert ids["NQH7"] == "CON.F.US.ENQ.H27"
    assert ids["MESZ6"] == "CON.F.US.MES.Z26"
    assert ids["MGCG7"] == "CON.F.US.GMET.G27"


# -- against the emulator ---------------------------------------------------------------------------------------
async def test_registered_for_type_projectx(px: ProjectXHarness) -> None:
    connector = make_connector(px.connector.broker, env=ENV)
    assert isinstance(connector, ProjectXConnector)


async def test_failures_arrive_with_http_200_and_become_errors(px: ProjectXHarness) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{px.emulator.base_url}/api/Auth/loginKey",
                                json={"userName": "trader", "apiKey": "wrong"}) as resp:
            assert resp.status == 200
            body = await resp.json()
        async with session.post(f"{px.emulator.base_url}/api/Account/search", json={"onlyActiveAccounts": True},
                                headers={"Authorization": "Bearer forged"}) as resp:
            assert resp.status == 401
        px.rate_limit_next(1, retry_after_s=0.5)
        async with session.get(f"{px.emulator.base_url}/api/Status/ping") as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (429, "0.5")
    assert body["success"] is False and body["errorCode"] != 0

    px.reject_next()
    with pytest.raises(OrderRejected, match="maximum position size"):
        await px.connector.place_order(market("rej-1", px.contract))
    assert await px.broker_order_count("rej-1") == 0

    with pytest.raises(BrokerError, match="no active account named 'NOPE'"):
        await px.connector.positions("NOPE")


async def test_wrong_api_key_is_an_auth_error(tmp_path: Path) -> None:
    from brokers.base import AuthError

    async with ProjectXEmulator() as emulator:
        connector = ProjectXConnector(broker_doc(emulator), env={**ENV, "PX_TEST_KEY": "not-the-key"}, **FAST)
        with pytest.raises(AuthError, match="login refused") as info:
            await connector.connect()
        assert "not-the-key" not in str(info.value)
        await connector.close()


async def test_expired_token_gets_401_and_one_fresh_login(px: ProjectXHarness) -> None:
    assert px.emulator.logins == 1
    px.emulator.expire_tokens()
    assert await px.connector.positions(px.account) == []
    assert px.emulator.logins == 2


async def test_requests_refused_together_share_one_new_login(px: ProjectXHarness) -> None:
    px.emulator.expire_tokens()
    await asyncio.gather(*(px.connector.working_orders(px.account) for _ in range(5)))
    assert px.emulator.logins == 2


async def test_token_is_renewed_with_validate_before_it_expires(tmp_path: Path) -> None:
    async with make_harness(tmp_path, token_refresh_s=0.0) as px:
        await px.connector.positions(px.account)
        assert px.emulator.requests["/api/Auth/validate"] >= 1
        assert px.emulator.logins == 1


async def test_repeated_custom_tag_returns_the_order_already_placed(px: ProjectXHarness) -> None:
    first = await px.connector.place_order(market("dup-1", px.contract))
    again = await px.connector._submit(market("dup-1", px.contract))  # straight to the wire: no lookup first
    assert again.broker_order_id == first.broker_order_id
    assert again.client_order_id == "dup-1"
    assert await px.broker_order_count("dup-1") == 1
    assert px.emulator.requests["/api/Order/place"] == 2


async def test_lost_place_answer_is_found_by_custom_tag(px: ProjectXHarness) -> None:
    px.lose_next_place_response()
    order = await px.connector.place_order(market("lost-1", px.contract))
    assert order.client_order_id == "lost-1" and order.status is OrderStatus.FILLED
    assert await px.broker_order_count("lost-1") == 1
    assert px.emulator.requests["/api/Order/place"] == 1


async def test_times_are_parsed_from_seven_digits_to_aware_utc(px: ProjectXHarness) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    order = await px.connector.place_order(market("time-1", px.contract))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{px.emulator.base_url}/api/Order/search",
                                headers={"Authorization": f"Bearer {px.connector._token}"},
                                json={"accountId": px.emulator.account_id(px.account),
                                      "startTimestamp": before.isoformat()}) as resp:
            raw = (await resp.json())["orders"][0]["creationTimestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}\+00:00", raw)
    fills = await px.connector.fills_since(px.account, before)
    for value in (order.created_at, order.updated_at, fills[0].time):
        assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
        assert before <= value <= datetime.now(timezone.utc)


async def test_contract_ids_round_trip_with_product_style_names(tmp_path: Path) -> None:
    async with ProjectXEmulator(name_style="product", accounts={ACCOUNT: Decimal(50000)}) as emulator:
        es = next(c for c in emulator.contracts.values() if c.root == "ES" and c.active)
        connector = ProjectXConnector(broker_doc(emulator), env=ENV, use_hub=False, **FAST)
        await connector.connect()
        try:
            assert await connector.contract_id(es.code) == es.id and es.id.startswith("CON.F.US.EP.")
            emulator.set_price(es.code, Decimal("6001.25"))
            order = await connector.place_order(market("es-1", es.code, Side.SELL, 2))
            assert order.contract == es.code and order.avg_fill_price == Decimal("6001.25")
            [position] = await connector.positions(ACCOUNT)
            assert (position.contract, position.quantity, position.avg_price) == (es.code, -2, Decimal("6001.25"))
            assert emulator.requests["/api/Contract/search"] == 1  # cached after the first resolution
        finally:
            await connector.close()


async def test_round_turn_pnl_fees_and_snapshot(px: ProjectXHarness) -> None:
    px.set_price(Decimal("6000.00"))
    await px.connector.place_order(market("rt-open", px.contract, Side.BUY, 2))
    px.set_price(Decimal("6003.25"))
    await px.connector.place_order(market("rt-close", px.contract, Side.SELL, 2))
    fills = await px.connector.fills_since(px.account, datetime.now(timezone.utc) - timedelta(minutes=1))
    assert [(f.client_order_id, f.side, f.price, f.commission) for f in fills] == [
        ("rt-open", Side.BUY, Decimal("6000"), Decimal("0.74")),
        ("rt-close", Side.SELL, Decimal("6003.25"), Decimal("0.74")),
    ]
    snapshot = await px.connector.account_snapshot(px.account)
    gross = Decimal("3.25") * 2 * px.point_value
    assert snapshot.realized_pnl == gross - 4 * px.commission_per_side
    assert snapshot.cash_balance == Decimal(50000) + gross - 4 * px.commission_per_side
    assert snapshot.margin_used == 0 and await px.connector.positions(px.account) == []


async def test_margin_used_comes_from_the_broker_document(px: ProjectXHarness) -> None:
    await px.connector.place_order(market("m-1", px.contract, Side.SELL, 3))
    snapshot = await px.connector.account_snapshot(px.account)
    assert snapshot.margin_used == 3 * Decimal(50)
    assert snapshot.free_margin == snapshot.cash_balance - 3 * Decimal(50)


async def test_resting_limit_order_cancels_and_a_filled_one_cannot(px: ProjectXHarness) -> None:
    px.set_price(Decimal("6000"))
    resting = await px.connector.place_order(OrderRequest("lim-1", px.account, px.contract, Side.BUY, 1,
                                                          OrderType.LIMIT, limit_price=Decimal("5900")))
    assert resting.status is OrderStatus.WORKING and resting.limit_price == Decimal("5900")
    assert [o.broker_order_id for o in await px.connector.working_orders(px.account)] == [resting.broker_order_id]
    cancelled = await px.connector.cancel_order(px.account, resting.broker_order_id)
    assert cancelled.status is OrderStatus.CANCELLED
    filled = await px.connector.place_order(market("mkt-1", px.contract))
    assert (await px.connector.cancel_order(px.account, filled.broker_order_id)).status is OrderStatus.FILLED


async def test_429_penalizes_the_limiter_and_the_request_goes_through(px: ProjectXHarness) -> None:
    px.rate_limit_next(2, retry_after_s=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await px.connector.working_orders(px.account) == []
    assert loop.time() - started >= 0.1
    assert px.connector.limiter.penalties >= 1


async def test_place_over_the_limit_waits_and_places_once(px: ProjectXHarness) -> None:
    await px.connector.positions(px.account)  # account resolved: the next request is the place itself
    await px.connector.contract_id(px.contract)
    px.rate_limit_next(1, retry_after_s=0.1)
    order = await px.connector.place_order(market("rl-1", px.contract))
    assert order.status is OrderStatus.FILLED
    assert await px.broker_order_count("rl-1") == 1


async def test_events_arrive_through_the_user_hub(tmp_path: Path) -> None:
    async with make_harness(tmp_path, poll_interval_s=30.0) as px:  # polling effectively off
        queue = px.connector.subscribe()
        await asyncio.wait_for(px.connector._hub_live.wait(), 2.0)
        polls = px.emulator.requests["/api/Trade/search"]
        order = await px.connector.place_order(market("hub-1", px.contract))
        fill = (await next_event(queue, FillEvent)).fill
        assert (fill.broker_order_id, fill.client_order_id) == (order.broker_order_id, "hub-1")
        assert px.emulator.requests["/api/Trade/search"] == polls


async def test_events_by_polling_without_the_hub(tmp_path: Path) -> None:
    async with make_harness(tmp_path, use_hub=False) as px:
        queue = px.connector.subscribe()
        px.partial_fill_next([1, 1])
        order = await px.connector.place_order(market("poll-1", px.contract, quantity=2))
        fills, statuses = [], []

        async def until_filled() -> None:
            while len(fills) < 2 or OrderStatus.FILLED not in statuses:
                event = await queue.get()
                if isinstance(event, FillEvent):
                    fills.append(event.fill)
                elif isinstance(event, OrderEvent):
                    statuses.append(event.order.status)

        await asyncio.wait_for(until_filled(), 2.0)
        assert {f.broker_order_id for f in fills} == {order.broker_order_id}
        assert [f.quantity for f in fills] == [1, 1]
        assert statuses.count(OrderStatus.FILLED) == 1  # each change once, however often it was polled


async def test_drop_pauses_and_reconnects_by_itself(px: ProjectXHarness) -> None:
    queue = px.connector.subscribe()
    await px.drop_connection()
    with pytest.raises(BrokerUnavailable):
        await px.connector.positions(px.account)
    assert (await next_event(queue, ConnectionEvent)).connected is False
    with pytest.raises(BrokerUnavailable, match="not sent"):
        await px.connector.place_order(market("down-1", px.contract))
    await px.restore_connection()
    assert (await next_event(queue, ConnectionEvent)).connected is True
    order = await px.connector.place_order(market("up-1", px.contract))
    assert order.status is OrderStatus.FILLED
    assert await px.broker_order_count("down-1") == 0


async def test_without_a_configured_limit_the_documented_budget_applies(tmp_path: Path) -> None:
    async with ProjectXEmulator() as emulator:
        doc = broker_doc(emulator)
        default = ProjectXConnector(dataclasses.replace(doc, rate_limit=None), env=ENV)
        configured = ProjectXConnector(dataclasses.replace(doc, rate_limit=RateLimit(5, 1.0)), env=ENV)
        assert (default.limiter.requests, default.limiter.per_seconds) == (200, 60.0)
        assert (configured.limiter.requests, configured.limiter.per_seconds) == (5, 1.0)


async def test_gateway_over_its_own_budget_answers_429_and_we_wait(tmp_path: Path) -> None:
    """Our limiter believes in 200/min; this firm allows 4 per 0.3 s: its 429s must slow us, not fail us."""
    async with ProjectXEmulator(rate_limit=(4, 0.3), accounts={ACCOUNT: Decimal(50000)}) as emulator:
        connector = ProjectXConnector(broker_doc(emulator), env=ENV, use_hub=False, **{**FAST,
                                      "poll_interval_s": 10.0})
        await connector.connect()
        try:
            for _ in range(10):
                assert await connector.working_orders(ACCOUNT) == []
            assert emulator.throttled >= 1
            assert connector.limiter.penalties == emulator.throttled
        finally:
            await connector.close()


async def test_fill_while_disconnected_is_reported_after_reconnect(px: ProjectXHarness) -> None:
    queue = px.connector.subscribe()
    await asyncio.wait_for(px.connector._hub_live.wait(), 2.0)
    px.set_price(Decimal("6000"))
    resting = await px.connector.place_order(OrderRequest("gap-1", px.account, px.contract, Side.SELL, 1,
                                                          OrderType.LIMIT, limit_price=Decimal("6010")))
    await px.drop_connection()
    px.set_price(Decimal("6012"))  # the limit fills while nobody is listening
    await px.restore_connection()
    fill = (await next_event(queue, FillEvent)).fill
    assert (fill.broker_order_id, fill.client_order_id, fill.price) == (resting.broker_order_id, "gap-1",
                                                                          Decimal("6010"))
    await asyncio.wait_for(px.connector._hub_live.wait(), 2.0)  # and the hub is back for what comes next
    await px.connector.place_order(market("gap-2", px.contract, Side.BUY))
    assert (await next_event(queue, FillEvent)).fill.client_order_id == "gap-2"


async def test_flatten_closes_the_position_at_market(px: ProjectXHarness) -> None:
    px.set_price(Decimal("6000"))
    await px.connector.place_order(market("fl-1", px.contract, Side.SELL, 2))
    px.set_price(Decimal("5990"))
    await px.connector.flatten(px.account, px.contract)
    assert await px.connector.positions(px.account) == []
    snapshot = await px.connector.account_snapshot(px.account)
    assert snapshot.realized_pnl == 10 * 2 * px.point_value - 4 * px.commission_per_side


# -- the documented gateway, where it differs from our first reading ---------------------------------------------
@contextlib.asynccontextmanager
async def connected(**emulator_options):  # type: ignore[no-untyped-def]
    """A connector (polling only) against an emulator built with ``emulator_options``."""
    async with ProjectXEmulator(accounts={ACCOUNT: Decimal(50000)}, **emulator_options) as emulator:
        connector = ProjectXConnector(broker_doc(emulator), env=ENV, use_hub=False, **FAST)
        await connector.connect()
        try:
            yield emulator, connector, next(c.code for c in emulator.contracts.values()
                                            if c.root == "MES" and c.active)
        finally:
            await connector.close()


async def test_contract_search_names_products_as_the_documented_example() -> None:
    """https://gateway.docs.projectx.com/docs/api-reference/market-data/search-contracts: "ENQH25", not "NQH5"."""
    async with ProjectXEmulator() as emulator:
        contracts = (await emulator._contract_search({"searchText": "NQ", "live": False}))["contracts"]
    names = {c["name"] for c in contracts}
    assert any(re.fullmatch(r"ENQ[FGHJKMNQUVXZ]\d\d", n) for n in names), names
    assert any(re.fullmatch(r"MNQ[FGHJKMNQUVXZ]\d\d", n) for n in names), names


async def test_a_repeated_tag_refused_under_any_error_code_returns_the_order_placed() -> None:
    """The docs say customTag "must be unique across the account" but not which errorCode a repeat gets."""
    async with connected(duplicate_tag_error_code=9) as (emulator, connector, contract):
        first = await connector.place_order(market("dup-9", contract))
        again = await connector._submit(market("dup-9", contract))  # straight to the wire: no lookup first
        assert again.broker_order_id == first.broker_order_id
        assert emulator.order_count(emulator.account_id(ACCOUNT), "dup-9") == 1


async def test_search_without_custom_tag_finds_our_orders_and_never_guesses_absent() -> None:
    """The first published Order/search example has no customTag, fillVolume or filledPrice."""
    async with connected(order_fields="legacy") as (emulator, connector, contract):
        placed = await connector.place_order(market("leg-1", contract))
        found = await connector.find_order(ACCOUNT, "leg-1")  # its tag is known from the Order/place answer
        assert found is not None and found.broker_order_id == placed.broker_order_id
        assert found.status is OrderStatus.FILLED and found.filled_quantity == 1

        emulator.lose_next_place_response()
        with pytest.raises(OutcomeUnknown):
            await connector.place_order(market("leg-2", contract))
        assert emulator.order_count(emulator.account_id(ACCOUNT), "leg-2") == 1
        assert emulator.requests["/api/Order/place"] == 2  # leg-1 and leg-2 once each: never resent


async def test_429_without_retry_after_waits_our_backoff_and_places_once(px: ProjectXHarness) -> None:
    """https://gateway.docs.projectx.com/docs/getting-started/rate-limits names HTTP 429 and no Retry-After."""
    await px.connector.positions(px.account)
    await px.connector.contract_id(px.contract)
    px.emulator.rate_limit_next(1, retry_after_s=None)
    order = await px.connector.place_order(market("rl-none", px.contract))
    assert order.status is OrderStatus.FILLED
    assert await px.broker_order_count("rl-none") == 1
    assert px.connector.limiter.penalties >= 1


async def test_voided_trades_are_neither_fills_nor_pnl(px: ProjectXHarness) -> None:
    since = datetime.now(timezone.utc) - timedelta(minutes=1)
    px.set_price(Decimal("6000"))
    await px.connector.place_order(market("v-open", px.contract, Side.BUY))
    px.set_price(Decimal("6010"))
    await px.connector.place_order(market("v-close", px.contract, Side.SELL))
    closing = px.emulator.trades[-1]
    assert closing.profit_and_loss is not None
    px.emulator.void_trade(closing.id)
    fills = await px.connector.fills_since(px.account, since)
    assert [f.client_order_id for f in fills] == ["v-open"]
    snapshot = await px.connector.account_snapshot(px.account)
    assert snapshot.realized_pnl == -px.commission_per_side  # the opening half-turn's fee alone
