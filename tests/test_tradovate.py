"""Tradovate specifics the shared contract suite does not cover: failures inside HTTP 200 (errorText,
failureReason, penalty tickets), token renewal, 429 backoff, clOrdId on the Command, WebSocket frames, heartbeats
and drop detection, millisecond ``Z`` timestamps, and ``brokers check`` against the emulator."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import aiohttp
import pytest

from brokers.base import (
    AuthError,
    ConnectionEvent,
    FillEvent,
    OrderRejected,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    make_connector,
)
from brokers.check import check_broker
from brokers.emulators.tradovate import listed_contracts, trade_date, wire_time
from brokers.timeconv import parse_broker_time
from brokers.tradovate import (
    CaptchaRequired,
    Frame,
    TradovateConnector,
    encode_request,
    fill_fee_total,
    order_status,
    parse_frame,
    penalty_ticket,
    place_body,
    rejection_reason,
)
from engine.catalog import Catalog
from tests.harness.tradovate import ACCOUNT, ENV, FAST, TradovateHarness, broker_doc, make_emulator, make_harness, \
    wait_until

FEES_MES = {"commission": Decimal("0.25"), "clearingFee": Decimal("0.19"), "exchangeFee": Decimal("0.20"),
            "nfaFee": Decimal("0.02")}
"""A FillFee breakdown whose total (0.66) differs from the Broker document's MES commission (0.35)."""


def market(h: TradovateHarness, coid: str, side: Side = Side.BUY, quantity: int = 1) -> OrderRequest:
    return OrderRequest(coid, h.account, h.contract, side, quantity)


async def next_event(queue: "asyncio.Queue[Any]", kind: type, timeout_s: float = 3.0) -> Any:
    async def wait() -> Any:
        while True:
            event = await queue.get()
            if isinstance(event, kind):
                return event
    return await asyncio.wait_for(wait(), timeout_s)


@pytest.fixture
async def tv(tmp_path: Path) -> AsyncIterator[TradovateHarness]:
    async with make_harness(tmp_path) as harness:
        yield harness


# -- pure wire logic ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("wire", "filled", "expected"), [
    ("PendingNew", 0, OrderStatus.PENDING),
    ("Working", 0, OrderStatus.WORKING),
    ("Working", 1, OrderStatus.PARTIALLY_FILLED),
    ("PendingCancel", 0, OrderStatus.WORKING),  # still live until the broker says cancelled
    ("PendingReplace", 2, OrderStatus.PARTIALLY_FILLED),
    ("Suspended", 0, OrderStatus.PENDING),
    ("Filled", 3, OrderStatus.FILLED),
    ("Completed", 3, OrderStatus.FILLED),
    ("Completed", 0, OrderStatus.CANCELLED),
    ("Canceled", 1, OrderStatus.CANCELLED),
    ("Expired", 0, OrderStatus.EXPIRED),
    ("Rejected", 0, OrderStatus.REJECTED),
    ("Unknown", 0, OrderStatus.UNKNOWN),
    ("SomethingNew", 0, OrderStatus.UNKNOWN),
])
def test_order_status_mapping(wire: str, filled: int, expected: OrderStatus) -> None:
    assert order_status(wire, filled) is expected


def test_frames_are_parsed() -> None:
    assert parse_frame("o") == Frame("open")
    assert parse_frame("h") == Frame("heartbeat")
    assert parse_frame('a[{"s":200,"i":0}]') == Frame("messages", [{"s": 200, "i": 0}])
    assert parse_frame('c[1000,"Server shutdown"]') == Frame("close", [1000, "Server shutdown"])
    for bad in ("x", "a{", 'a{"s":200}', ""):
        with pytest.raises(ValueError):
            parse_frame(bad)


def test_requests_are_encoded_endpoint_id_query_body() -> None:
    assert encode_request("authorize", 0, "tok") == "authorize\n0\n\ntok"
    assert encode_request("user/syncrequest", 7, '{"users":[1]}') == 'user/syncrequest\n7\n\n{"users":[1]}'


def test_penalty_tickets_are_recognized() -> None:
    assert penalty_ticket({"p-ticket": "abc", "p-time": 15, "p-captcha": False}) == ("abc", 15.0, False)
    assert penalty_ticket({"p-ticket": "abc", "p-time": 3600, "p-captcha": True}) == ("abc", 3600.0, True)
    assert penalty_ticket({"orderId": 5}) is None
    assert penalty_ticket([]) is None


def test_place_body_carries_our_id_as_clordid() -> None:
    request = OrderRequest("sig-1", "DEMO1", "MESZ6", Side.SELL, 2, OrderType.LIMIT, limit_price=Decimal("6010.25"),
                           time_in_force="gtc")
    body = place_body(request, 42)
    assert body == {"accountSpec": "DEMO1", "accountId": 42, "action": "Sell", "symbol": "MESZ6", "orderQty": 2,
                    "orderType": "Limit", "timeInForce": "GTC", "isAutomated": True, "clOrdId": "sig-1",
                    "price": 6010.25}
    with pytest.raises(ValueError, match="time in force"):
        place_body(OrderRequest("x", "A", "MESZ6", Side.BUY, 1, time_in_force="gtd"), 1)


def test_rejection_reason_keeps_the_brokers_words() -> None:
    assert rejection_reason({"failureReason": "SessionClosed", "failureText": "Market closed"}) == \
        "SessionClosed: Market closed"
    assert rejection_reason({"failureText": None}) == "UnknownReason"


def test_wire_time_is_milliseconds_z_and_parses_back_to_aware_utc() -> None:
    moment = datetime(2026, 11, 1, 5, 30, 15, 123456, tzinfo=timezone.utc)
    text = wire_time(moment)
    assert text == "2026-11-01T05:30:15.123Z"
    parsed = parse_broker_time(text, "utc_iso")
    assert parsed.utcoffset() == timedelta(0)
    assert parsed == moment.replace(microsecond=123000)


def test_trade_date_rolls_at_six_pm_new_york() -> None:
    assert trade_date(datetime(2026, 11, 24, 22, 59, tzinfo=timezone.utc)).day == 24  # 17:59 EST
    assert trade_date(datetime(2026, 11, 24, 23, 0, tzinfo=timezone.utc)).day == 25   # 18:00 EST


def test_emulator_lists_contracts_from_this_month_on() -> None:
    names = listed_contracts(datetime(2026, 11, 24, tzinfo=timezone.utc), roots=("MES",))
    assert names == ["MESZ6", "MESH7", "MESM7", "MESU7", "MESZ7"]


def test_default_endpoints_follow_the_environment() -> None:
    demo = TradovateConnector(broker_doc(None), env=ENV)
    assert demo.base_url == "https://demo.tradovateapi.com/v1"
    assert demo.ws_url == "wss://demo.tradovateapi.com/v1/websocket"
    live_doc = broker_doc(None)
    object.__setattr__(live_doc, "environment", "live")
    live = TradovateConnector(live_doc, env=ENV)
    assert live.base_url == "https://live.tradovateapi.com/v1"


# -- against the emulator ----------------------------------------------------------------------------------------
async def test_registered_for_type_tradovate(tv: TradovateHarness) -> None:
    assert isinstance(make_connector(tv.connector.broker, env=ENV), TradovateConnector)


async def test_bad_login_is_http_200_with_error_text_and_an_auth_error(tmp_path: Path) -> None:
    emulator = make_emulator()
    await emulator.start()
    try:
        connector = TradovateConnector(broker_doc(emulator), env={**ENV, "TV_TEST_PASS": "wrong"}, **FAST)
        with pytest.raises(AuthError, match="Incorrect username or password") as excinfo:
            await connector.connect()
        assert "wrong" not in str(excinfo.value)  # the secret is never echoed
        assert not connector.connected
        wrong_sec = TradovateConnector(broker_doc(emulator), env={**ENV, "TV_TEST_SEC": "nope"}, **FAST)
        with pytest.raises(AuthError):
            await wrong_sec.connect()
        assert emulator.logins == 0
    finally:
        await emulator.stop()


async def test_token_is_renewed_before_expiry_without_a_new_login(tmp_path: Path) -> None:
    # A 2 s life renews 0.5 s before expiry: room for a loaded machine's loop delays (at 1 s, a quarter-second
    # stall let the token expire first and cost a second login).
    async with make_harness(tmp_path, emulator_options={"token_life_s": 2.0}) as h:
        assert h.emulator.logins == 1
        await wait_until(lambda: h.emulator.renewals >= 2, timeout_s=8.0, what="two token renewals")
        assert h.emulator.logins == 1
        assert await h.connector.positions(h.account) == []  # the renewed token works
        assert h.emulator.requests["/v1/auth/accesstokenrequest"] == 1


async def test_expired_token_gets_401_and_one_fresh_login(tv: TradovateHarness) -> None:
    tv.emulator.expire_tokens()
    assert await tv.connector.positions(tv.account) == []
    assert tv.emulator.logins == 2


async def test_penalty_ticket_is_waited_out_and_resent_with_the_ticket(tv: TradovateHarness) -> None:
    tv.emulator.rate_limit_next(1, 0.3, kind="ticket")
    started = time.monotonic()
    order = await tv.connector.place_order(market(tv, "ticket-1"))
    assert time.monotonic() - started >= 0.25
    assert tv.emulator.tickets_honoured == 1
    assert order.client_order_id == "ticket-1"
    assert tv.emulator.order_count(ACCOUNT, "ticket-1") == 1
    assert tv.connector.limiter.penalties >= 1


async def test_captcha_stops_with_a_clear_error_and_sends_nothing(tv: TradovateHarness) -> None:
    tv.emulator.captcha_next()
    with pytest.raises(CaptchaRequired, match="captcha"):
        await tv.connector.place_order(market(tv, "captcha-1"))
    assert tv.emulator.order_count(ACCOUNT, "captcha-1") == 0
    assert tv.connector.rate_limit_headroom() == 0.0  # everything waits out the penalty


async def test_429_on_a_read_penalizes_the_limiter_and_retries(tv: TradovateHarness) -> None:
    tv.emulator.rate_limit_next(1, kind="429")
    started = time.monotonic()
    assert await tv.connector.positions(tv.account) == []
    assert time.monotonic() - started >= FAST["throttle_wait_s"] * 0.9
    assert tv.connector.limiter.penalties == 1


async def test_429_on_a_placement_waits_and_places_once(tv: TradovateHarness) -> None:
    tv.emulator.rate_limit_next(1, kind="429")
    order = await tv.connector.place_order(market(tv, "throttled-1"))
    assert order.client_order_id == "throttled-1"
    assert tv.emulator.order_count(ACCOUNT, "throttled-1") == 1


async def test_failure_reason_becomes_order_rejected(tv: TradovateHarness) -> None:
    tv.emulator.reject_next(reason="SessionClosed", text="The market is closed")
    with pytest.raises(OrderRejected) as excinfo:
        await tv.connector.place_order(market(tv, "rejected-1"))
    assert excinfo.value.reason == "Tradovate SessionClosed: The market is closed"
    assert tv.emulator.order_count(ACCOUNT, "rejected-1") == 0


async def test_lost_answer_is_found_through_command_deps(tmp_path: Path) -> None:
    async with make_harness(tmp_path, use_websocket=False) as h:  # no pushed commands: REST lookups only
        h.lose_next_place_response()
        order = await h.connector.place_order(market(h, "lost-1"))
        assert order.client_order_id == "lost-1"
        assert order.status is OrderStatus.FILLED
        assert h.emulator.requests["/v1/command/deps"] >= 1
        assert h.emulator.order_count(ACCOUNT, "lost-1") == 1


async def test_limit_order_rests_cancels_and_a_filled_one_cannot(tv: TradovateHarness) -> None:
    tv.set_price(Decimal("6000"))
    resting = await tv.connector.place_order(OrderRequest("lim-1", ACCOUNT, tv.contract, Side.BUY, 1,
                                                          OrderType.LIMIT, limit_price=Decimal("5990.25")))
    assert resting.status is OrderStatus.WORKING
    assert resting.limit_price == Decimal("5990.25")
    cancelled = await tv.connector.cancel_order(ACCOUNT, resting.broker_order_id)
    assert cancelled.status is OrderStatus.CANCELLED
    filled = await tv.connector.place_order(market(tv, "mkt-1"))
    assert filled.status is OrderStatus.FILLED
    after = await tv.connector.cancel_order(ACCOUNT, filled.broker_order_id)  # TooLate: the state is the answer
    assert after.status is OrderStatus.FILLED


async def test_snapshot_realized_pnl_is_net_of_commissions(tv: TradovateHarness) -> None:
    tv.set_price(Decimal("6000"))
    await tv.connector.place_order(market(tv, "rt-buy", Side.BUY, 1))
    tv.set_price(Decimal("6002.5"))
    snap_open = await tv.connector.account_snapshot(ACCOUNT)
    assert snap_open.unrealized_pnl == Decimal("2.5") * tv.point_value
    assert snap_open.margin_used == Decimal(50)  # emulator MES margin for one contract
    await tv.connector.place_order(market(tv, "rt-sell", Side.SELL, 1))
    snapshot = await tv.connector.account_snapshot(ACCOUNT)
    assert snapshot.realized_pnl == Decimal("2.5") * tv.point_value - 2 * tv.commission_per_side
    assert snapshot.cash_balance == Decimal(50000) + snapshot.realized_pnl


async def test_websocket_heartbeats_both_ways(tmp_path: Path) -> None:
    async with make_harness(tmp_path, heartbeat_s=0.05,
                            emulator_options={"server_heartbeat_s": 0.05}) as h:
        await wait_until(lambda: h.emulator.heartbeats_received >= 3, timeout_s=2.0, what="client heartbeats")
        assert h.connector.heartbeats_sent >= 3


async def test_silent_websocket_is_detected_and_replaced(tmp_path: Path) -> None:
    async with make_harness(tmp_path, heartbeat_s=0.05, ws_timeout_s=0.3,
                            emulator_options={"server_heartbeat_s": 0.05}) as h:
        h.emulator.mute_heartbeats()
        await wait_until(lambda: h.emulator.requests["/v1/websocket"] >= 2, timeout_s=3.0,
                         what="a second WebSocket after the first went silent")
        h.emulator.mute_heartbeats(False)
        await wait_until(lambda: h.connector.websocket_live, timeout_s=3.0, what="the socket live again")
        queue = h.connector.subscribe()
        await h.connector.place_order(market(h, "after-silence"))
        event = await next_event(queue, FillEvent)
        assert event.fill.client_order_id == "after-silence"


async def test_events_arrive_over_the_websocket_with_our_client_order_id(tv: TradovateHarness) -> None:
    assert tv.connector.websocket_live
    tv.set_price(Decimal("6001.75"))
    queue = tv.connector.subscribe()
    polls_before = tv.emulator.requests["/v1/fill/list"]
    await tv.connector.place_order(market(tv, "ws-1"))
    event = await next_event(queue, FillEvent)
    assert event.fill.client_order_id == "ws-1"
    assert event.fill.price == Decimal("6001.75")
    assert event.fill.commission == tv.commission_per_side
    assert event.fill.time.utcoffset() == timedelta(0)
    assert tv.emulator.requests["/v1/fill/list"] == polls_before  # pushed, not polled


async def test_events_by_polling_without_the_websocket(tmp_path: Path) -> None:
    async with make_harness(tmp_path, use_websocket=False) as h:
        queue = h.connector.subscribe()
        await h.connector.place_order(market(h, "poll-1"))
        event = await next_event(queue, FillEvent)
        assert event.fill.client_order_id == "poll-1"
        assert h.emulator.socket_count == 0


async def test_drop_is_detected_and_reconnects_with_missed_fills_reported(tv: TradovateHarness) -> None:
    queue = tv.connector.subscribe()
    await tv.drop_connection()
    down = await next_event(queue, ConnectionEvent)
    assert down.connected is False
    # While we are away the broker fills an order someone else placed (e.g. from the phone app).
    await tv.emulator._place({"accountId": tv.emulator.account_id(ACCOUNT), "accountSpec": ACCOUNT,
                              "symbol": tv.contract, "action": "Buy", "orderQty": 1, "orderType": "Market",
                              "clOrdId": "while-away"})
    await tv.restore_connection()
    up = await next_event(queue, ConnectionEvent)
    assert up.connected is True
    fill = await next_event(queue, FillEvent)
    assert fill.fill.client_order_id == "while-away"
    assert tv.connector.reconnects == 1


async def test_a_penalty_ticket_answering_the_socket_sync_is_waited_out_and_resent(tv: TradovateHarness) -> None:
    queue = tv.connector.subscribe()
    await tv.drop_connection()
    assert (await next_event(queue, ConnectionEvent)).connected is False
    # Filled while we are away: the new socket's snapshot must report it. Its first sync answer is a ticket.
    await tv.emulator._place({"accountId": tv.emulator.account_id(ACCOUNT), "accountSpec": ACCOUNT,
                              "symbol": tv.contract, "action": "Buy", "orderQty": 1, "orderType": "Market",
                              "clOrdId": "while-throttled"})
    tv.emulator.ticket_next_sync(1, wait_s=0.3)
    await tv.restore_connection()
    assert (await next_event(queue, FillEvent)).fill.client_order_id == "while-throttled"
    await wait_until(lambda: tv.connector.websocket_live, timeout_s=3.0, what="the socket live after the penalty")
    assert tv.emulator.tickets_honoured == 1  # resent with the ticket, after its wait
    # Read as a snapshot, the ticket left the socket unsynced: pushes never came, only the 30 s safety poll did.
    polls_before = tv.emulator.requests["/v1/fill/list"]
    await tv.connector.place_order(market(tv, "pushed-after-penalty"))
    event = await next_event(queue, FillEvent)
    assert event.fill.client_order_id == "pushed-after-penalty"
    assert tv.emulator.requests["/v1/fill/list"] == polls_before


async def test_brokers_check_against_the_emulator() -> None:
    emulator = make_emulator()
    await emulator.start()
    try:
        broker = broker_doc(emulator)
        # Just what the probe reads from a RuleSet: the accounts and the catalog.
        account = SimpleNamespace(broker=broker.name, broker_account=ACCOUNT, instruments=("MES",))
        ruleset = SimpleNamespace(accounts={"tv": account}, catalog=Catalog())
        result = await check_broker(broker, ruleset, timeout_s=10,  # type: ignore[arg-type]
                                    connector_options={"env": ENV, **FAST})
        assert result.ok, result.error
        assert result.ack_ms is not None and result.cancel_ms is not None
        assert result.clock_offset_ms is not None and abs(result.clock_offset_ms) < 500
        probes = [o for o in emulator.orders.values() if (o.cl_ord_id or "").startswith("check-")]
        assert [o.status for o in probes] == ["Canceled"]
    finally:
        await emulator.stop()


async def test_a_live_socket_is_still_backed_by_a_safety_poll(tmp_path: Path) -> None:
    async with make_harness(tmp_path, safety_poll_s=0.1) as h:
        assert h.connector.websocket_live
        before = h.emulator.requests["/v1/fill/list"]
        await wait_until(lambda: h.emulator.requests["/v1/fill/list"] >= before + 2, timeout_s=2.0,
                         what="two safety polls")
        assert h.connector.websocket_live


def test_login_carries_app_identity_and_sec_from_the_environment() -> None:
    connector = TradovateConnector(broker_doc(None), env=ENV)
    body = connector._login_body()
    assert body == {"name": "trader", "password": "secret", "sec": "emulator-sec", "appId": "multibroker-tests",
                    "appVersion": "1.0", "cid": 8, "deviceId": "harness-device"}
    without_sec = TradovateConnector(broker_doc(None, credentials={"username": "TV_TEST_USER",
                                                                   "password": "TV_TEST_PASS"}, app={}), env=ENV)
    assert without_sec._login_body() == {"name": "trader", "password": "secret"}


# -- fees: the broker's FillFee, else the Broker document ----------------------------------------------------------
def test_fill_fee_total_sums_every_fee_and_is_none_when_none_is_stated() -> None:
    assert fill_fee_total({"id": 1, "commission": 0.5, "clearingFee": 0.19, "exchangeFee": 0.2, "nfaFee": 0.02,
                           "commissionCurrencyId": 1}) == Decimal("0.91")
    assert fill_fee_total({"id": 1, "commission": None, "orderRoutingFee": 0.1}) == Decimal("0.1")
    assert fill_fee_total({"id": 1, "commissionCurrencyId": 1}) is None


async def test_fill_commission_and_realized_pnl_use_the_brokers_fill_fees(tmp_path: Path) -> None:
    async with make_harness(tmp_path, emulator_options={"fee_schedule": {"MES": FEES_MES}}) as h:
        per_side = sum(FEES_MES.values(), Decimal(0))
        assert per_side != h.connector.broker.commission("MES")  # otherwise this test could not tell them apart
        queue = h.connector.subscribe()
        h.set_price(Decimal("6000"))
        await h.connector.place_order(market(h, "fee-buy", Side.BUY, 2))
        event = await next_event(queue, FillEvent)
        assert event.fill.commission == 2 * per_side
        h.set_price(Decimal("6001"))
        await h.connector.place_order(market(h, "fee-sell", Side.SELL, 2))
        fills = await h.connector.fills_since(ACCOUNT, datetime.now(timezone.utc) - timedelta(minutes=5))
        assert sorted(f.commission for f in fills) == [2 * per_side, 2 * per_side]
        snapshot = await h.connector.account_snapshot(ACCOUNT)
        assert snapshot.realized_pnl == 2 * h.point_value - 4 * per_side
        assert snapshot.cash_balance == Decimal(50000) + snapshot.realized_pnl  # the broker's own books agree


async def test_without_fill_fees_the_broker_document_commission_stands_in(tmp_path: Path) -> None:
    async with make_harness(tmp_path, emulator_options={"fill_fees": False}) as h:
        queue = h.connector.subscribe()
        await h.connector.place_order(market(h, "nofee-1", Side.BUY, 3))
        event = await next_event(queue, FillEvent)
        assert event.fill.commission == 3 * h.connector.broker.commission("MES")
        assert h.emulator.requests["/v1/fillFee/deps"] >= 1  # it asked before falling back


# -- the user-data socket lives on the token it was authorized with ----------------------------------------------
async def _raw_socket_after_expiry(expired_socket: str) -> tuple[list[str], Any]:
    """Authorize a plain socket, let its token expire, fill an order: the frames that arrive, and the emulator."""
    emulator = make_emulator(token_life_s=0.4, server_heartbeat_s=0.05, expired_socket=expired_socket)
    await emulator.start()
    frames: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(emulator.base_url + "/auth/accesstokenrequest", json={
                    "name": ENV["TV_TEST_USER"], "password": ENV["TV_TEST_PASS"], "sec": ENV["TV_TEST_SEC"]}) as r:
                token = (await r.json())["accessToken"]
            async with session.ws_connect(emulator.ws_url) as ws:
                await ws.send_str(encode_request("authorize", 0, token))
                await ws.send_str(encode_request("user/syncrequest", 1, '{"users": [7001]}'))
                await asyncio.sleep(0.5)  # past the token's life
                await emulator._place({"accountId": emulator.account_id(ACCOUNT), "accountSpec": ACCOUNT,
                                       "symbol": listed_contracts(datetime.now(timezone.utc), ["MES"])[0],
                                       "action": "Buy", "orderQty": 1, "orderType": "Market"})
                deadline = time.monotonic() + 0.3
                while time.monotonic() < deadline:
                    try:
                        message = await ws.receive(timeout=0.1)
                    except asyncio.TimeoutError:
                        continue
                    if message.type != aiohttp.WSMsgType.TEXT:
                        frames.append(f"<{message.type.name}>")
                        break
                    frames.append(message.data)
    finally:
        await emulator.stop()
    return frames, emulator


async def test_emulator_silences_a_socket_whose_token_expired() -> None:
    frames, emulator = await _raw_socket_after_expiry("silent")
    assert "h" in frames  # it still looks alive ...
    assert not any('"props"' in f for f in frames) and emulator.withheld_pushes >= 1  # ... but events stop


async def test_emulator_can_close_a_socket_whose_token_expired_instead() -> None:
    frames, _ = await _raw_socket_after_expiry("close")
    assert any(f.startswith("c[") for f in frames)


async def test_socket_moves_to_each_renewed_token_and_no_fill_is_missed_or_doubled(tmp_path: Path) -> None:
    # Tokens live 1.2 s (renewed 0.3 s before expiry); the safety poll is out of reach, so every fill below
    # must come over a socket authorized with a live token.
    async with make_harness(tmp_path, heartbeat_s=0.05, safety_poll_s=60.0,
                            emulator_options={"token_life_s": 1.2, "server_heartbeat_s": 0.05}) as h:
        queue = h.connector.subscribe()
        polls_before = h.emulator.requests["/v1/fill/list"]
        seen = []
        for i in range(10):
            await h.connector.place_order(market(h, f"rot-{i}"))
            event = await next_event(queue, FillEvent, timeout_s=1.5)
            seen.append(event.fill.client_order_id)
            await asyncio.sleep(0.25)
        assert seen == [f"rot-{i}" for i in range(10)]
        assert h.emulator.renewals >= 2 and h.emulator.logins == 1
        assert h.connector.ws_rotations >= 2
        assert h.emulator.withheld_pushes == 0  # no socket ever outlived its token
        assert h.emulator.requests["/v1/fill/list"] == polls_before  # pushed, not polled
        assert all(h.emulator.order_count(ACCOUNT, f"rot-{i}") == 1 for i in range(10))
        await asyncio.sleep(0.3)  # the syncs after each rotation replayed every fill: none is emitted again
        extra = [e for e in (queue.get_nowait() for _ in range(queue.qsize())) if isinstance(e, FillEvent)]
        assert extra == []
