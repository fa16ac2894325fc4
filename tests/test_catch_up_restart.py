"""Catch-up across a restart: a ``catch_up`` account whose broker was down when a target arrived converges to it
when that broker comes back, also when the process that journaled the miss is not the one that sees it come back
(a deploy, or a crash, while the broker was away).

What a restart catches up is what an earlier process journaled ``missed`` for a ``catch_up`` account and no
catch-up covered since (``Journal.catch_up_owed_since``), of this trading day: never a re-run of the day, so a
second restart sends nothing more, a miss caught up before the restart is not caught up again, and a position the
trader closed by hand is not re-opened. Every check reads the paper broker's own book."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from brokers.base import OrderRequest, Side
from service.dispatch import FILLED, MISSED
from service.journal import Journal
from tests.harness.runtime import NOON, Clock, World, signal, wait_until, world

LONG_1 = signal("mirror", "buy", 1, sid="t1", position="long", position_size=1)


async def down(w: World, broker: str) -> None:
    w.connector(broker).disconnect("down")
    await wait_until(lambda: w.runtime.pool is not None and w.runtime.pool[broker].down, what=f"{broker} down")


def held(w: World, account: str = "S-1") -> dict[str, int]:
    """What ``account`` holds at slow, by its broker's book."""
    return {p["contract"]: int(p["quantity"]) for p in w.connector("slow").book.positions(account)
            if int(p["quantity"])}


def sent(w: World, account: str = "S-1") -> list[tuple[str, int]]:
    """Every order slow ever received for ``account``: (side, quantity)."""
    return [(o["side"], int(o["quantity"])) for o in w.book_orders("slow", account)]


def catchups(w: World) -> list[str]:
    return sorted(s["id"] for s in w.journal.recent_signals(200) if "-catchup-" in s["id"])


async def miss_t1(tmp_path: Path) -> None:
    """A process in which slow is down when mirror's long 1 arrives: s1 (``catch_up``) misses it; it stops
    before slow is back."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await down(w, "slow")
        await w.submit(LONG_1)
        await w.settle()
        assert w.statuses("t1") == {"f1": FILLED, "f2": FILLED, "s1": MISSED}
        assert held(w) == {} and catchups(w) == []


async def test_a_target_missed_while_the_broker_was_down_is_caught_up_when_it_comes_back_after_a_restart(
        tmp_path: Path) -> None:
    await miss_t1(tmp_path)
    # The next process connects slow at its start: slow is back for s1.
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=5))) as w:
        await w.settle()
        assert list(held(w).values()) == [1], (held(w), w.runtime.catchups)
        assert sent(w) == [("buy", 1)] and catchups(w) == ["t1-catchup-slow-0"]


async def test_a_second_restart_sends_nothing_more(tmp_path: Path) -> None:
    await miss_t1(tmp_path)
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=5))) as w:
        await w.settle()
        assert sent(w) == [("buy", 1)]
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=10))) as w:
        await w.settle()
        assert w.runtime.catchups == []  # nothing owed: the start's since is the start, after t1
        assert sent(w) == [("buy", 1)] and list(held(w).values()) == [1] and catchups(w) == ["t1-catchup-slow-0"]


async def test_a_miss_the_previous_process_caught_up_is_not_caught_up_again_after_a_restart(tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await down(w, "slow")
        await w.submit(LONG_1)
        await w.settle()
        await w.connector("slow").reconnect()  # a reconnect: its catch-up's id is t1-catchup-slow-1
        await wait_until(lambda: w.runtime.pool is not None and w.runtime.pool.available("slow"), what="slow back")
        await w.settle()
        assert sent(w) == [("buy", 1)] and catchups(w) == ["t1-catchup-slow-1"]
    # A restart's first come-up would catch up as t1-catchup-slow-0, an id not journaled: only the journal's
    # record of the catch-up (after the miss) keeps it from buying again.
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=5))) as w:
        await w.settle()
        assert w.runtime.catchups == []
        assert sent(w) == [("buy", 1)] and list(held(w).values()) == [1] and catchups(w) == ["t1-catchup-slow-1"]


async def test_a_position_closed_by_hand_before_a_restart_is_not_reopened_when_nothing_was_missed(
        tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        decision = await w.submit(LONG_1)
        await w.settle()
        assert w.statuses("t1") == {"f1": FILLED, "f2": FILLED, "s1": FILLED}
        contract = next(o.contract for o in decision.orders if o.account == "s1")
        # The trader closes s1's long by hand at the broker (booked to no strategy).
        await w.connector("slow").place_order(OrderRequest(client_order_id="by-hand-1", account="S-1",
                                                           contract=contract, side=Side.SELL, quantity=1))
        await wait_until(lambda: held(w) == {}, what="closed by hand")
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=5))) as w:
        await w.settle()
        assert w.runtime.catchups == [] and catchups(w) == []
        assert held(w) == {} and sent(w) == [("buy", 1), ("sell", 1)]


async def test_a_target_missed_on_an_earlier_trading_day_is_not_caught_up(tmp_path: Path) -> None:
    await miss_t1(tmp_path)
    async with world(tmp_path, clock=Clock(NOON + timedelta(days=1))) as w:  # Thursday: the next trading day
        await w.settle()
        assert w.runtime.catchups == [] and held(w) == {} and sent(w) == [] and catchups(w) == []


async def test_a_flatten_after_the_missed_target_voids_it_across_the_restart(tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await down(w, "slow")
        await w.submit(LONG_1)
        await w.settle()
        w.clock.advance(timedelta(minutes=1))
        await w.runtime.flatten(strategy="mirror", reason="operator")  # after t1: its target is void
        await w.settle()
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=5))) as w:
        await w.settle()
        assert [(c["signal"], c["flat"], c["orders"]) for c in w.runtime.catchups] == \
            [("t1-catchup-slow-0", True, [])]
        assert held(w) == {} and sent(w) == []
        # A catch-up that decided nothing is journaled too: it covers the miss, so the next start owes nothing.
        row = w.journal.get_signal("t1-catchup-slow-0")
        assert row is not None and row["status"] == "decided" and row["orders"] == []
        assert row["signal"]["catch_up"] is True and row["signal"]["broker"] == "slow"
        assert "nothing to do" in str(row["reason"]) and row["decision"]["ruleset"]["content_hash"]
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=10))) as w:
        await w.settle()
        assert w.runtime.catchups == [] and held(w) == {} and sent(w) == []


# -- the journal's query -------------------------------------------------------------------------------------------

async def _target(journal: Journal, sid: str, strategy: str, minutes: int, orders: list[tuple[str, str]],
                  *, catch_up: bool = False, flatten: bool = False, missed: bool = True) -> None:
    body: dict[str, Any] = {"strategy": strategy, "ticker": "MES1!"}
    if flatten:
        body["flatten"] = True
    else:
        body.update(action="buy", position="long", position_size=1)
    if catch_up:
        body["catch_up"] = True
    rows = [{"client_order_id": f"{sid}-{i}", "account": account, "broker": broker, "contract": "MESH6",
             "side": "buy", "quantity": 1, "intent": "entry"} for i, (account, broker) in enumerate(orders)]
    await journal.record_signal(raw=None, remote=None, status="accepted" if rows else "decided", reason=None,
                                key=None, signal=body, decision=None, orders=[] if missed else rows, signal_id=sid,
                                at=NOON + timedelta(minutes=minutes))
    if missed and rows:
        await journal.record_orders(sid, rows, MISSED, at=NOON + timedelta(minutes=minutes))


async def test_what_a_start_owes_is_the_earliest_miss_no_later_catch_up_of_its_strategy_covers(
        tmp_path: Path) -> None:
    day = NOON - timedelta(hours=3)
    async with Journal(tmp_path / "journal.db", clock=Clock(NOON)) as journal:
        def owed(broker: str = "slow", accounts: tuple[str, ...] = ("s1", "s2")) -> Any:
            found = journal.catch_up_owed_since(broker, accounts, day)
            return None if found is None else int((found - NOON).total_seconds() // 60)

        await _target(journal, "old", "a", -200, [("s1", "slow")])  # before the trading day's start
        assert owed() is None
        await _target(journal, "fl", "a", 1, [("s1", "slow")], flatten=True)  # a flatten's exit: the redo's
        await _target(journal, "other", "a", 2, [("s1", "fast")])  # another broker's miss
        await _target(journal, "not-mine", "a", 3, [("x9", "slow")])  # not a catch_up account
        await _target(journal, "sent", "a", 4, [("s1", "slow")], missed=False)  # delivered
        assert owed() is None
        await _target(journal, "a1", "a", 10, [("s1", "slow")])
        await _target(journal, "b1", "b", 12, [("s2", "slow")])
        assert owed() == 10 and owed(accounts=("s2",)) == 12 and owed(accounts=()) is None
        # A catch-up of a at slow after a1 covers it; one at fast, or of b, does not cover b1.
        await _target(journal, "a1-catchup-slow-1", "a", 15, [("s1", "slow")], catch_up=True, missed=False)
        await _target(journal, "b1-catchup-fast-1", "b", 15, [("f1", "fast")], catch_up=True, missed=False)
        assert owed() == 12
        await _target(journal, "a2", "a", 20, [("s1", "slow")])
        await _target(journal, "b1-catchup-slow-1", "b", 21, [("s2", "slow")], catch_up=True, missed=False)
        assert owed() == 20
        await _target(journal, "a2-catchup-slow-0", "a", 25, [("s1", "slow")], catch_up=True, missed=False)
        assert owed() is None
        # A catch-up that decided nothing has no order: the broker its body names says where it looked.
        await _target(journal, "a3", "a", 30, [("s1", "slow")])
        assert owed() == 30
        await journal.record_signal(raw=None, remote=None, status="decided", reason="catch-up: nothing to do",
                                    key=None, signal={"strategy": "a", "catch_up": True, "broker": "fast"},
                                    decision=None, signal_id="a3-catchup-fast-2", at=NOON + timedelta(minutes=31))
        assert owed() == 30  # another broker's
        await journal.record_signal(raw=None, remote=None, status="decided", reason="catch-up: nothing to do",
                                    key=None, signal={"strategy": "a", "catch_up": True, "broker": "slow"},
                                    decision=None, signal_id="a3-catchup-slow-2", at=NOON + timedelta(minutes=32))
        assert owed() is None


async def test_an_exit_missed_before_a_restart_is_caught_up_after_it(tmp_path: Path) -> None:
    """An exit counts as where its strategy stands (flat), in what a start owes as in what catch-up converges to:
    before, the restart found only targets owed, and s1 stayed long after its strategy's exit (crash fuzz 1035)."""
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await w.submit(LONG_1)
        await w.settle()
        assert held(w) == {"MESH6": 1}
        await down(w, "slow")
        await w.submit(signal("mirror", "exit", sid="x1"))
        await w.settle()
        assert w.statuses("x1") == {"f1": FILLED, "f2": FILLED, "s1": MISSED}
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=5))) as w:
        await w.settle()
        assert held(w) == {} and sent(w) == [("buy", 1), ("sell", 1)]
        assert [c.split("-catchup")[0] for c in catchups(w)] == ["x1"]
    async with world(tmp_path, clock=Clock(NOON + timedelta(minutes=10))) as w:  # nothing more is owed
        await w.settle()
        assert sent(w) == [("buy", 1), ("sell", 1)] and len(catchups(w)) == 1
