"""Catch-up never doubles a best-mode position: the proof, case by case, on the real runtime and paper brokers.

When a broker comes back, ``Runtime._catch_up`` re-decides each strategy's last target for its ``catch_up`` accounts.
In ``mode: best`` exactly one account may hold the strategy's position. While ``slow`` was away, best routing gave
the entry to ``bf`` at ``fast`` (``slow`` is cheaper, so with both up ``bs`` would have won). When ``slow`` returns:

1. ``bf`` holds the position (filled): catch-up sends nothing;
2. ``bf``'s order is still in flight (sent and unanswered, acknowledged with its fill pending, of unknown fate
   after a drop, or decided by the webhook and not dispatched yet): it counts as held, catch-up sends nothing;
3. ``bf``'s order was rejected or missed: nobody holds it, so catch-up opens it at ``slow`` (that is its point);
4. the target was flat: only exits, each sent once;
5. mirror: each ``catch_up`` account converges on its own.

``bs`` and ``bs2`` are both ``catch_up`` accounts at ``slow``: ``select`` picks one (``bs``, by name), never both.
Two brokers back at once catch up one after the other, so the second sees the first's order.
Every check reads the brokers' own books: what exists at the broker is what counts.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from brokers.base import BrokerUnavailable
from engine.decision import Decision
from engine.signal import parse_signal
from service.dispatch import ACKNOWLEDGED, FILLED, MISSED, REJECTED, SENDING, UNKNOWN
from tests.harness.runtime import (NOON, Clock, World, account_doc, documents, signal, wait_until, world,
                                  write_rules)

ACCOUNTS = documents(
    account_doc("f1", "fast", "F-1", "mirror"),
    account_doc("s1", "slow", "S-1", "mirror", catch_up=True),
    account_doc("bf", "fast", "B-F", "best"),
    account_doc("bs", "slow", "B-S", "best", catch_up=True),
    account_doc("bs2", "slow", "B-S2", "best", catch_up=True),
)

BEST_ACCOUNTS = {"bf": ("fast", "B-F"), "bs": ("slow", "B-S"), "bs2": ("slow", "B-S2")}


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    rules = write_rules(tmp_path / "rules")
    (rules / "accounts.yaml").write_text(ACCOUNTS)
    async with world(tmp_path, rules_dir=rules, clock=Clock(NOON)) as started:
        yield started


def target(sid: str, position: str, size: int) -> dict[str, Any]:
    action = "sell" if position in ("flat", "short") else "buy"
    return signal("best", action, max(size, 1), sid=sid, position=position, position_size=size)


async def drop(w: World, broker: str) -> None:
    w.connector(broker).disconnect("test drop")
    await wait_until(lambda: w.runtime.pool[broker].down, what=f"{broker} down")


async def come_back(w: World, broker: str) -> dict[str, Any]:
    """Reconnect ``broker`` and return the catch-up record of the strategy ``best`` from this come-up."""
    before = len(w.runtime.catchups)
    await w.connector(broker).reconnect()
    await wait_until(lambda: w.runtime.pool.available(broker), what=f"{broker} back")
    mine = [c for c in w.runtime.catchups[before:] if c["strategy"] == "best"]
    assert len(mine) == 1, w.runtime.catchups[before:]
    return mine[0]


def book(w: World) -> dict[str, list[tuple[str, int, str]]]:
    """What each best-mode account has at its broker: (side, quantity, status) per order."""
    return {name: [(o["side"], int(o["quantity"]), o["status"]) for o in w.book_orders(broker, account)]
            for name, (broker, account) in BEST_ACCOUNTS.items()}


def held(w: World) -> dict[str, int]:
    """Each best-mode account's position as its broker reports it."""
    out = {}
    for name, (broker, account) in BEST_ACCOUNTS.items():
        out[name] = sum(int(p["quantity"]) for p in w.connector(broker).book.positions(account))
    return out


async def journal_only(w: World, body: dict[str, Any]) -> Decision:
    """The webhook up to the journal's commit: decided, held (as exposure) and journaled, not dispatched yet."""
    now = w.clock()
    parsed = parse_signal(body)
    decision = w.watcher.engine.decide(parsed, w.runtime.engine_state(now), now)
    w.runtime.hold(parsed.id, decision)
    await w.journal.record_signal(
        signal_id=parsed.id, raw=str(body), remote=None, status="accepted", reason=decision.reason, key=parsed.id,
        signal={k: v for k, v in vars(parsed).items() if v is not None and k != "id_derived"},
        decision=decision.to_json(), orders=[{**o.to_json(), "margin_usd": o.margin_usd} for o in decision.orders],
        at=now)
    return decision


def legs(record: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    return [(o["account"], o["side"], o["quantity"], o["intent"]) for o in record["orders"]]


# -- 1. the other broker's account holds the position --------------------------------------------------------------

async def test_a_filled_entry_at_the_other_broker_is_held_and_catch_up_sends_nothing(w: World) -> None:
    await drop(w, "slow")
    entry = await w.submit(target("t1", "long", 2))
    assert [(o.account, o.quantity) for o in entry.orders] == [("bf", 2)]
    await w.settle()
    assert w.statuses("t1") == {"bf": FILLED}

    caught = await come_back(w, "slow")
    assert caught["signal"].startswith("t1-catchup-slow") and legs(caught) == []
    await w.settle()
    assert held(w) == {"bf": 2, "bs": 0, "bs2": 0}
    assert book(w)["bs"] == [] and book(w)["bs2"] == []
    # The next come-up finds the same: the position lives at bf.
    await drop(w, "slow")
    assert legs(await come_back(w, "slow")) == []
    assert held(w) == {"bf": 2, "bs": 0, "bs2": 0}


# -- 2. the other broker's entry is still in flight ----------------------------------------------------------------

async def test_an_entry_sent_but_unanswered_at_the_other_broker_counts_as_held(w: World) -> None:
    fast = w.connector("fast")
    submit, gate, reached = fast._submit, asyncio.Event(), asyncio.Event()

    async def unanswered(request: Any) -> Any:
        reached.set()
        await gate.wait()
        return await submit(request)

    fast._submit = unanswered
    await drop(w, "slow")
    await w.submit(target("t1", "long", 2))
    await asyncio.wait_for(reached.wait(), 5)
    assert w.statuses("t1") == {"bf": SENDING}

    caught = await come_back(w, "slow")
    assert legs(caught) == []
    gate.set()
    await w.settle()
    assert w.statuses("t1") == {"bf": FILLED}
    assert held(w) == {"bf": 2, "bs": 0, "bs2": 0} and book(w)["bs"] == [] == book(w)["bs2"]


async def test_an_entry_acknowledged_with_its_fill_pending_at_the_other_broker_counts_as_held(w: World) -> None:
    fast = w.connector("fast")
    fill_now, waiting = fast._fill_now, []
    fast._fill_now = waiting.append  # the broker acknowledges; the fill comes when the test says so
    await drop(w, "slow")
    await w.submit(target("t1", "long", 2))
    await wait_until(lambda: w.statuses("t1") == {"bf": ACKNOWLEDGED}, what="bf acknowledged")
    assert held(w)["bf"] == 0  # not filled at the broker yet

    caught = await come_back(w, "slow")
    assert legs(caught) == []
    fast._fill_now = fill_now
    for order_id in waiting:
        fill_now(order_id)
    await w.settle()
    assert w.statuses("t1") == {"bf": FILLED}
    assert held(w) == {"bf": 2, "bs": 0, "bs2": 0} and book(w)["bs"] == [] == book(w)["bs2"]


async def test_an_entry_of_unknown_fate_holds_until_resolved_then_a_miss_is_caught_up(w: World) -> None:
    fast = w.connector("fast")
    submit = fast._submit

    async def dropped(request: Any) -> Any:  # the link drops as the entry goes out; nothing reaches the broker
        fast.disconnect("drop while sending")
        raise BrokerUnavailable("paper broker fast: not connected")

    fast._submit = dropped
    await drop(w, "slow")
    await w.submit(target("t1", "long", 2))
    await wait_until(lambda: w.statuses("t1") == {"bf": UNKNOWN}, what="bf unknown")

    # slow comes back while bf's entry may or may not be at fast: it counts as held, nothing opens at slow.
    assert legs(await come_back(w, "slow")) == []
    assert book(w)["bs"] == [] == book(w)["bs2"]

    # fast comes back: the lookup finds nothing, the entry is missed; nobody holds the position now.
    fast._submit = submit
    fast._link_down = False
    fast._link_up.set()
    await wait_until(lambda: w.runtime.pool.available("fast"), what="fast back")
    assert w.statuses("t1") == {"bf": MISSED}

    # slow's next come-up opens it once, at one account (select: cheapest broker, then the name).
    await drop(w, "slow")
    assert legs(await come_back(w, "slow")) == [("bs", "buy", 2, "entry")]
    await w.settle()
    assert held(w) == {"bf": 0, "bs": 2, "bs2": 0}
    assert book(w) == {"bf": [], "bs": [("buy", 2, "filled")], "bs2": []}


# -- 3. the other broker's entry was rejected ----------------------------------------------------------------------

async def test_a_rejected_entry_at_the_other_broker_is_opened_once_at_one_catch_up_account(w: World) -> None:
    w.connector("fast").reject_next(1)
    await drop(w, "slow")
    await w.submit(target("t1", "long", 2))
    await w.settle()
    assert w.statuses("t1") == {"bf": REJECTED}

    caught = await come_back(w, "slow")
    assert legs(caught) == [("bs", "buy", 2, "entry")]  # bs and bs2 tie at slow: select then the name, one only
    await w.settle()
    assert held(w) == {"bf": 0, "bs": 2, "bs2": 0}
    assert book(w)["bs"] == [("buy", 2, "filled")] and book(w)["bs2"] == []
    # Converged: a later come-up sends nothing more.
    await drop(w, "slow")
    assert legs(await come_back(w, "slow")) == []
    assert held(w) == {"bf": 0, "bs": 2, "bs2": 0}


# -- 4. a flat target: exits only ----------------------------------------------------------------------------------

async def test_a_flat_target_after_the_entry_elsewhere_opens_nothing(w: World) -> None:
    await drop(w, "slow")
    await w.submit(target("t1", "long", 2))
    await w.settle()
    await w.submit(target("t2", "flat", 0))
    await w.settle()
    assert w.statuses("t2") == {"bf": FILLED}

    caught = await come_back(w, "slow")
    assert caught["signal"].startswith("t2-catchup-slow") and legs(caught) == []
    await w.settle()
    assert held(w) == {"bf": 0, "bs": 0, "bs2": 0} and book(w)["bs"] == [] == book(w)["bs2"]


async def test_a_missed_exit_is_caught_up_once_and_never_reverses_the_position(w: World) -> None:
    opened = await w.submit(target("t1", "long", 2))
    assert [(o.account, o.quantity) for o in opened.orders] == [("bs", 2)]  # slow is up and cheaper
    await w.settle()
    await drop(w, "slow")
    await w.submit(target("t2", "flat", 0))  # the exit goes to bs, whose broker is down: missed
    await wait_until(lambda: w.statuses("t2") == {"bs": MISSED}, what="exit missed")
    assert held(w)["bs"] == 2

    caught = await come_back(w, "slow")
    assert legs(caught) == [("bs", "sell", 2, "exit")]
    await w.settle()
    assert held(w) == {"bf": 0, "bs": 0, "bs2": 0}
    assert book(w) == {"bf": [], "bs": [("buy", 2, "filled"), ("sell", 2, "filled")], "bs2": []}
    await drop(w, "slow")
    assert legs(await come_back(w, "slow")) == []
    assert held(w) == {"bf": 0, "bs": 0, "bs2": 0}


# -- 5. mirror: each catch_up account converges on its own ---------------------------------------------------------

async def test_mirror_catch_up_converges_each_account_on_its_own(w: World) -> None:
    await drop(w, "slow")
    decision = await w.submit(signal("mirror", "buy", 2, sid="m1", position="long", position_size=2))
    assert [o.account for o in decision.orders] == ["f1"]
    await wait_until(lambda: w.statuses("m1") == {"f1": FILLED, "s1": MISSED}, what="s1 missed")

    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    mirror = [c for c in w.runtime.catchups if c["strategy"] == "mirror"]
    assert [legs(c) for c in mirror] == [[("s1", "buy", 2, "entry")]]
    await w.settle()
    assert [(o["side"], o["quantity"]) for o in w.book_orders("slow", "S-1")] == [("buy", 2)]
    assert [(o["side"], o["quantity"]) for o in w.book_orders("fast", "F-1")] == [("buy", 2)]


async def test_a_resume_catches_up_what_an_operator_pause_made_the_account_miss(w: World) -> None:
    """A pause is an operator's drop: orders decided meanwhile are missed there, and the resume converges the
    ``catch_up`` accounts as a come-up does (before, a pause without a drop never caught up)."""
    await w.runtime.pause_broker("slow")
    decision = await w.submit(signal("mirror", "buy", 2, sid="m1", position="long", position_size=2))
    assert [o.account for o in decision.orders] == ["f1"]
    await wait_until(lambda: w.statuses("m1") == {"f1": FILLED, "s1": MISSED}, what="s1 missed")
    await w.runtime.resume_broker("slow")
    mirror = [c for c in w.runtime.catchups if c["strategy"] == "mirror"]
    assert [legs(c) for c in mirror] == [[("s1", "buy", 2, "entry")]]
    await w.settle()
    assert [(o["side"], o["quantity"]) for o in w.book_orders("slow", "S-1")] == [("buy", 2)]
    await w.runtime.pause_broker("slow")  # nothing missed this time: the resume has nothing to catch up
    await w.runtime.resume_broker("slow")
    await w.settle()
    assert [(o["side"], o["quantity"]) for o in w.book_orders("slow", "S-1")] == [("buy", 2)]


# -- 2b. a webhook's entry journaled but not handed to its broker yet ---------------------------------------------

async def test_an_entry_journaled_but_not_yet_dispatched_counts_as_held(w: World) -> None:
    """The webhook commits a signal with its orders, answers its sender, and only then dispatches: a broker that
    comes back in between sees the signal as the strategy's last target, while its entry is not tracked yet but
    held (``Runtime.hold``), which the catch-up's decision counts (the journal's ``new`` orders are not read)."""
    await drop(w, "slow")
    body = target("t1", "long", 2)
    decision = await journal_only(w, body)
    assert [(o.account, o.quantity) for o in decision.orders] == [("bf", 2)]
    assert w.statuses("t1") == {"bf": "new"}

    caught = await come_back(w, "slow")
    assert caught["signal"].startswith("t1-catchup-slow") and legs(caught) == []
    w.runtime.dispatch(decision.signal_id, decision)
    await w.settle()
    assert w.statuses("t1") == {"bf": FILLED}
    assert held(w) == {"bf": 2, "bs": 0, "bs2": 0} and book(w)["bs"] == [] == book(w)["bs2"]


# -- two brokers back at once --------------------------------------------------------------------------------------

async def test_two_brokers_back_at_once_open_the_position_once(tmp_path: Path) -> None:
    """A network blip drops both brokers; a target arrives meanwhile (nobody eligible); both come back together and
    each catches up its own account. The catch-ups' commits are slowed so that, unserialized, each would decide
    before the other's order is in view (and best mode would open the position at both)."""
    rules = write_rules(tmp_path / "rules")
    both = ACCOUNTS.replace("broker_account: B-F\n", "broker_account: B-F\ncatch_up: true\n")
    (rules / "accounts.yaml").write_text(both)
    async with world(tmp_path, rules_dir=rules, clock=Clock(NOON)) as w:
        record = w.journal.record_signal

        async def slow_commit(**kwargs: Any) -> Any:
            if (kwargs.get("signal") or {}).get("catch_up"):
                await asyncio.sleep(0.2)
            return await record(**kwargs)

        w.journal.record_signal = slow_commit  # type: ignore[method-assign]
        await drop(w, "fast")
        await drop(w, "slow")
        nobody = await w.submit(target("t1", "long", 2))
        assert nobody.orders == ()
        await asyncio.gather(w.connector("fast").reconnect(), w.connector("slow").reconnect())
        await wait_until(lambda: w.runtime.pool.available("fast") and w.runtime.pool.available("slow"),
                         what="both back")
        await w.settle()
        best = [c for c in w.runtime.catchups if c["strategy"] == "best"]
        assert len(best) == 2 and sorted(len(c["orders"]) for c in best) == [0, 1], best
        positions = held(w)
        assert sorted(positions.values()) == [0, 0, 2], positions
        assert sum(len(orders) for orders in book(w).values()) == 1


# -- 6. the position at two accounts after a failover: one keeps it, the other is closed ---------------------------

async def test_a_holder_left_behind_by_a_missed_exit_is_closed_not_topped_up(w: World) -> None:
    """Fuzzer seed 425: ``bs`` holds 1; a flat target's exit to ``bs`` is decided (so the next target sees ``bs``
    flat and opens 2 at ``bf``), ``slow`` is paused before the exit's turn, and it is missed there. The position now
    sits at two accounts. On the resume, catch-up re-decides the last target (long 2): ``bf`` is at the target and
    keeps it; ``bs`` is closed. Before, every holder converged to the target: ``bs`` bought 1 more (4 held for a
    target of 2)."""
    opened = await w.submit(target("t1", "long", 1))
    assert [(o.account, o.quantity) for o in opened.orders] == [("bs", 1)]  # slow is up and cheaper
    await w.settle()
    flat = await journal_only(w, target("t2", "flat", 0))  # decided and held: bs counts as flat from now on
    assert [(o.account, o.side, o.quantity) for o in flat.orders] == [("bs", "sell", 1)]
    await w.runtime.pause_broker("slow")
    reopened = await w.submit(target("t3", "long", 2))
    assert [(o.account, o.quantity) for o in reopened.orders] == [("bf", 2)]
    w.runtime.dispatch(flat.signal_id, flat)  # the exit reaches the paused broker: missed
    await wait_until(lambda: w.statuses("t2") == {"bs": MISSED}, what="bs's exit missed")
    await w.settle()
    assert held(w) == {"bf": 2, "bs": 1, "bs2": 0}

    before = len(w.runtime.catchups)
    await w.runtime.resume_broker("slow")
    caught = [c for c in w.runtime.catchups[before:] if c["strategy"] == "best"]
    assert [legs(c) for c in caught] == [[("bs", "sell", 1, "exit")]]
    await w.settle()
    assert held(w) == {"bf": 2, "bs": 0, "bs2": 0}
    assert book(w) == {"bf": [("buy", 2, "filled")], "bs": [("buy", 1, "filled"), ("sell", 1, "filled")], "bs2": []}
    # Converged: the next pause and resume sends nothing more.
    await w.runtime.pause_broker("slow")
    await w.runtime.resume_broker("slow")
    await w.settle()
    assert held(w) == {"bf": 2, "bs": 0, "bs2": 0}


async def noise(w: World, n: int) -> None:
    """``n`` signals of another strategy journaled (rejected, as a bad secret or an unknown strategy is): a busy
    day's traffic between a quiet strategy's last target and a come-up."""
    await asyncio.gather(*(w.journal.record_signal(raw="{}", remote="127.0.0.1", status="rejected", reason="noise",
                                                   key=None, signal={"strategy": "other"}, decision=None,
                                                   signal_id=f"noise-{i}", at=w.clock()) for i in range(n)))


async def test_a_quiet_strategys_target_behind_a_busy_days_signals_is_still_caught_up(w: World) -> None:
    await drop(w, "slow")
    await w.submit(signal("mirror", "buy", 2, sid="m1", position="long", position_size=2))
    await wait_until(lambda: w.statuses("m1") == {"f1": FILLED, "s1": MISSED}, what="s1 missed")
    await noise(w, 1200)

    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    assert [legs(c) for c in w.runtime.catchups if c["strategy"] == "mirror"] == [[("s1", "buy", 2, "entry")]]
    await w.settle()
    assert [(o["side"], o["quantity"]) for o in w.book_orders("slow", "S-1")] == [("buy", 2)]


async def test_a_flatten_behind_a_busy_days_signals_still_voids_the_target(w: World) -> None:
    await drop(w, "slow")
    await w.submit(signal("mirror", "buy", 2, sid="m1", position="long", position_size=2))
    await wait_until(lambda: w.statuses("m1") == {"f1": FILLED, "s1": MISSED}, what="s1 missed")
    w.clock.advance(timedelta(seconds=1))
    await w.runtime.flatten(strategy="mirror", reason="operator")
    await w.settle()
    w.clock.advance(timedelta(seconds=1))
    await noise(w, 1200)

    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    await w.settle()
    mirror = [c for c in w.runtime.catchups if c["strategy"] == "mirror"]
    assert [c["flat"] for c in mirror] == [True] and [legs(c) for c in mirror] == [[]]
    assert w.book_orders("slow", "S-1") == []  # never opened after the flatten


async def test_a_catch_up_record_names_the_rules_that_decided_it(w: World) -> None:
    await drop(w, "slow")
    await w.submit(signal("mirror", "buy", 2, sid="m1", position="long", position_size=2))
    await wait_until(lambda: w.statuses("m1") == {"f1": FILLED, "s1": MISSED}, what="s1 missed")
    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    [caught] = [c for c in w.runtime.catchups if c["strategy"] == "mirror"]
    record = (w.journal.get_signal(caught["signal"]) or {})["decision"]
    assert record["ruleset"]["content_hash"] == w.runtime.ruleset.content_hash
    assert record["ruleset"]["content_hash"] == (w.journal.get_signal("m1") or {})["decision"]["ruleset"][
        "content_hash"]


async def test_an_exit_decided_for_a_paused_broker_is_missed_at_once_and_the_holder_keeps_the_position(
        w: World) -> None:
    """Fuzzer seed 341 (crash seeds): with ``slow`` paused (or down) at the decision, the flat target's exit to
    ``bs`` cannot leave; counted as held until its turn in the dispatcher, it made ``bs`` look flat, and a target
    decided meanwhile opened the position at ``bf`` too. Now it is journaled ``missed`` with its signal and never
    counts: the next target finds the position at ``bs`` (which cannot trade: under target, never a second holder),
    and the resume's catch-up converges ``bs``."""
    opened = await w.submit(target("t1", "long", 1))
    assert [(o.account, o.quantity) for o in opened.orders] == [("bs", 1)]
    await w.settle()
    await w.runtime.pause_broker("slow")
    flat = await journal_only(w, target("t2", "flat", 0))
    assert [(o.account, o.side, o.quantity) for o in flat.orders] == [("bs", "sell", 1)]  # exits are decided
    assert w.runtime.engine_state(w.clock()).accounts["bs"].positions == {"MESH6": 1}  # and do not count
    reopened = await w.submit(target("t3", "long", 2))
    assert reopened.orders == ()  # the position lives at bs: nobody else opens it
    w.runtime.dispatch(flat.signal_id, flat)
    await w.settle()
    assert w.statuses("t2") == {"bs": MISSED}
    [row] = w.journal.orders(signal_id="t2")
    assert "paused or down at the decision" in str(row["detail"])
    assert held(w) == {"bf": 0, "bs": 1, "bs2": 0}

    before = len(w.runtime.catchups)
    await w.runtime.resume_broker("slow")
    caught = [c for c in w.runtime.catchups[before:] if c["strategy"] == "best"]
    assert [legs(c) for c in caught] == [[("bs", "buy", 1, "entry")]]
    await w.settle()
    assert held(w) == {"bf": 0, "bs": 2, "bs2": 0}


# -- 7. an exit after the target: the strategy is flat --------------------------------------------------------------

async def test_an_exit_after_the_target_voids_it_for_an_account_that_missed_both(w: World) -> None:
    """Crash fuzz seed 1035: catch-up converged to the strategy's last *target* and skipped the plain ``exit``
    that came after it, so the come-up opened a position its strategy had closed (in best mode at a second
    account, while the first still held what its missed exit left)."""
    await drop(w, "slow")
    await w.submit(signal("mirror", "buy", 2, sid="m1", position="long", position_size=2))
    await w.submit(signal("mirror", "exit", sid="m2"))
    await w.settle()
    assert w.statuses("m1") == {"f1": FILLED, "s1": MISSED} and w.statuses("m2") == {"f1": FILLED}

    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    mirror = [c for c in w.runtime.catchups if c["strategy"] == "mirror"]
    assert [(c["signal"].split("-catchup")[0], legs(c)) for c in mirror] == [("m2", [])]
    await w.settle()
    assert w.book_orders("slow", "S-1") == []


async def test_an_exit_missed_by_a_catch_up_account_is_caught_up(w: World) -> None:
    """The other half of the same gap, a missed exit: the strategy's last target (long 2) matched what ``s1``
    still held after its exit was missed, so catch-up found nothing to do and ``s1`` stayed long after its strategy
    went flat."""
    await w.submit(signal("mirror", "buy", 2, sid="m1", position="long", position_size=2))
    await w.settle()
    await drop(w, "slow")
    await w.submit(signal("mirror", "exit", sid="m2"))
    await wait_until(lambda: w.statuses("m2") == {"f1": FILLED, "s1": MISSED}, what="s1's exit missed")

    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    mirror = [c for c in w.runtime.catchups if c["strategy"] == "mirror"]
    assert [legs(c) for c in mirror] == [[("s1", "sell", 2, "exit")]]
    await w.settle()
    assert [(o["side"], o["quantity"]) for o in w.book_orders("slow", "S-1")] == [("buy", 2), ("sell", 2)]
    await drop(w, "slow")  # once: the next come-up finds the strategy's exit done there
    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back again")
    await w.settle()
    assert [(o["side"], o["quantity"]) for o in w.book_orders("slow", "S-1")] == [("buy", 2), ("sell", 2)]


async def test_plain_buys_and_sells_after_the_target_move_it(w: World) -> None:
    """Strategies alerting with plain "buy 2" / "sell 1" (no ``position``) after a target: catch-up converged to
    the stale target, leaving ``s1`` behind its strategy (long 1 where the strategy was long 2)."""
    await w.submit(signal("mirror", "buy", 1, sid="m1", position="long", position_size=1))
    await w.settle()
    await drop(w, "slow")
    await w.submit(signal("mirror", "buy", 2, sid="m2"))  # long 3
    await w.submit(signal("mirror", "sell", 1, sid="m3"))  # long 2
    await w.settle()
    assert w.statuses("m2") == {"f1": FILLED, "s1": MISSED} and w.statuses("m3") == {"f1": FILLED, "s1": MISSED}

    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    mirror = [c for c in w.runtime.catchups if c["strategy"] == "mirror"]
    assert [(c["signal"].split("-catchup")[0], legs(c)) for c in mirror] == [("m3", [("s1", "buy", 1, "entry")])]
    await w.settle()
    at = {name: sum(int(p["quantity"]) for p in w.connector(broker).book.positions(acct))
          for name, (broker, acct) in {"f1": ("fast", "F-1"), "s1": ("slow", "S-1")}.items()}
    assert at == {"f1": 2, "s1": 2}


async def test_a_flatten_between_the_target_and_a_later_buy_resets_it(w: World) -> None:
    await w.submit(signal("mirror", "buy", 2, sid="m1", position="long", position_size=2))
    await w.settle()
    await drop(w, "slow")
    await w.runtime.flatten(strategy="mirror", reason="operator")
    await w.settle()
    await w.submit(signal("mirror", "buy", 1, sid="m2"))  # flat + 1 = long 1, not long 3
    await w.settle()

    await w.connector("slow").reconnect()
    await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
    await w.settle()
    assert {p["contract"]: int(p["quantity"]) for p in w.connector("slow").book.positions("S-1")
            if int(p["quantity"])} == {"MESH6": 1}
