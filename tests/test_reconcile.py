"""Reconciliation against paper brokers: at start-up, periodically and after a reconnect; every pass journaled;
a mismatch adopts the broker's truth with an alert, or halts the account's entries until a clean pass, per
Account.on_mismatch."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from service import reconcile
from service.ledger import EXTERNAL_STRATEGY
from tests.harness.runtime import signal, wait_until, world


def test_compare_positions_reports_differences_and_skips_contracts_in_flux() -> None:
    found = reconcile.compare_positions({"MESH6": 2, "ESH6": 1}, {"MESH6": 3, "NQH6": -1}, in_flux={"ESH6"})
    assert [m.as_dict() for m in found] == [{"contract": "MESH6", "ledger": 2, "broker": 3},
                                            {"contract": "NQH6", "ledger": 0, "broker": -1}]
    assert reconcile.describe(found) == "MESH6: ledger +2, broker +3; NQH6: ledger +0, broker -1"
    assert reconcile.compare_positions({"MESH6": 1}, {"MESH6": 1}) == []


def broker_position(w, broker: str, account: str, contract: str, quantity: int) -> None:  # type: ignore[no-untyped-def]
    """Change the broker's books behind the service's back (a position it never reported a fill for)."""
    db = w.connector(broker).book.db
    if quantity:
        db["positions"].upsert({"account": account, "contract": contract, "quantity": quantity,
                                "avg_price": "5000"}, pk=("account", "contract"))
    else:
        db["positions"].delete_where("account = ? and contract = ?", [account, contract])


async def test_every_broker_is_reconciled_at_start_up_and_then_periodically(tmp_path: Path) -> None:
    async with world(tmp_path, rules={"reconcile": 1}) as w:
        rows = w.journal.reconciliations(100)
        assert {(r["broker"], r["account"], r["reason"]) for r in rows} == {
            ("fast", "f1", "start-up"), ("fast", "f2", "start-up"), ("fast", "bf", "start-up"),
            ("slow", "s1", "start-up"), ("slow", "bs", "start-up")}
        assert all(r["ok"] for r in rows)
        await wait_until(lambda: {r["broker"] for r in w.journal.reconciliations(100) if r["reason"] == "periodic"}
                         == {"fast", "slow"}, 4, what="periodic passes")


async def test_a_reconnect_is_reconciled_before_the_broker_takes_orders(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        order_seen_by_reconcile: list[bool] = []
        reconcile_broker = w.runtime.reconcile_broker

        async def watched(broker: str, *, reason: str) -> list:  # type: ignore[type-arg]
            order_seen_by_reconcile.append(w.runtime.pool.available(broker))
            return await reconcile_broker(broker, reason=reason)

        w.runtime.reconcile_broker = watched  # type: ignore[method-assign]
        w.connector("slow").disconnect("test drop")
        await wait_until(lambda: w.runtime.pool["slow"].down, what="slow paused")
        await w.connector("slow").reconnect()
        await wait_until(lambda: w.runtime.pool.available("slow"), what="slow back")
        assert order_seen_by_reconcile == [False]
        assert {r["account"] for r in w.journal.reconciliations(100) if r["reason"] == "reconnect"} == {"s1", "bs"}


async def test_adopt_policy_takes_the_brokers_position_and_alerts(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        decision = await w.submit(signal("mirror", "buy", 1, sid="e1"))
        await w.settle()
        contract = decision.orders[0].contract
        broker_position(w, "fast", "F-1", contract, 3)
        rows = await w.runtime.reconcile_broker("fast", reason="test")
        f1 = next(r for r in rows if r["account"] == "f1")
        assert f1["ok"] is False and f1["policy"] == "adopt"
        assert f1["mismatches"] == [{"contract": contract, "ledger": 1, "broker": 3}]
        assert w.runtime.ledger.account_positions("f1") == {contract: 3}
        assert w.runtime.ledger.strategy_positions("f1", EXTERNAL_STRATEGY) == {contract: 2}
        assert w.runtime.engine_state(w.clock()).accounts["f1"].halted is None
        assert w.runtime.status()["alerts"][-1]["account"] == "f1"
        assert any(e["kind"] == "adopt" and e["name"] == "f1" for e in w.journal.risk_events(10))
        # The next pass matches.
        rows = await w.runtime.reconcile_broker("fast", reason="test")
        assert all(r["ok"] for r in rows)
        stored = [r for r in w.journal.reconciliations(20) if r["account"] == "f1" and r["reason"] == "test"]
        assert [r["ok"] for r in stored] == [True, False]  # newest first


async def test_halt_policy_halts_entries_until_a_clean_pass(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        decision = await w.submit(signal("mirror", "buy", 1, sid="e1"))
        await w.settle()
        contract = decision.orders[0].contract
        broker_position(w, "fast", "F-2", contract, 0)  # the broker lost the position (liquidated, say)
        rows = await w.runtime.reconcile_broker("fast", reason="test")
        assert next(r for r in rows if r["account"] == "f2")["mismatches"] == [
            {"contract": contract, "ledger": 1, "broker": 0}]
        assert w.runtime.ledger.account_positions("f2") == {contract: 1}  # not adopted
        halted = w.runtime.engine_state(w.clock()).accounts["f2"].halted
        assert halted and "reconciliation mismatch" in halted
        blocked = await w.submit(signal("mirror", "buy", 1, sid="e2"))
        assert sorted(o.account for o in blocked.orders) == ["f1", "s1"]
        await w.settle()
        # Still halted on the next pass; resolved once the broker and the ledger agree again.
        await w.runtime.reconcile_broker("fast", reason="test")
        assert w.runtime.engine_state(w.clock()).accounts["f2"].halted
        broker_position(w, "fast", "F-2", contract, 1)
        await w.runtime.reconcile_broker("fast", reason="test")
        assert w.runtime.engine_state(w.clock()).accounts["f2"].halted is None
        kinds = [(e["name"], e["kind"]) for e in w.journal.risk_events(10) if e["name"] == "f2"]
        assert kinds == [("f2", "clear"), ("f2", "halt")]
        assert w.connector("fast").book.positions("F-2")[0]["quantity"] == 1
        assert Decimal(w.runtime.accounts()[1]["free_margin"]) > 0


async def test_every_pass_journals_a_position_snapshot_of_the_ledger(tmp_path: Path) -> None:
    """The journal's ``position_snapshots``: after each pass, the ledger's lines of the broker's accounts (a flat
    account as one flat row), at the pass's time."""
    async with world(tmp_path) as w:
        decision = await w.submit(signal("mirror", "buy", 1, sid="e1"))
        await w.settle()
        at_fast = {o.account: o.contract for o in decision.orders if o.broker == "fast"}
        assert at_fast
        await w.runtime.reconcile_broker("fast", reason="test")
        rows = [r for r in w.journal.position_snapshots(100) if r["reason"] == "test"]
        fast_accounts = {a.name for a in w.runtime.ruleset.accounts.values() if a.broker == "fast"}
        want = {(name, "mirror", at_fast[name]) if name in at_fast else (name, None, None): 1 if name in at_fast else 0
                for name in fast_accounts}
        assert {(r["account"], r["strategy"], r["contract"]): r["quantity"] for r in rows} == want
        assert {r["broker"] for r in rows} == {"fast"} and len({r["at"] for r in rows}) == 1
        assert all(Decimal(r["avg_price"]) > 0 for r in rows if r["quantity"])
        assert {r["reason"] for r in w.journal.position_snapshots(200)} >= {"start-up", "test"}


async def test_a_fill_made_during_the_pass_is_booked_once_not_adopted_then_booked_again(tmp_path: Path) -> None:
    """A trade by hand fills after the pass read the account's fills and before it read the positions; its fill
    reaches our stream only after the pass. Acting on that one read adopted it (an alert, or a halt on a halt
    account, for nothing) and then booked its fill too: the ledger long 5 where the broker holds 3, until the next
    pass adopted that back. The pass now reads the account once more on a mismatch, finds the fill in the list,
    and books it once."""
    from brokers.base import Side

    async with world(tmp_path) as w:
        decision = await w.submit(signal("mirror", "buy", 1, sid="e1"))
        await w.settle()
        contract = decision.orders[0].contract
        connector = w.connector("fast")
        book = connector.book
        late: list[tuple[str, dict]] = []  # type: ignore[type-arg]
        positions = connector.positions

        async def hand_trade_before_positions(account: str) -> list:  # type: ignore[type-arg]
            if account == "F-1" and not late:
                listeners, book.listeners = list(book.listeners), [lambda kind, record: late.append((kind, record))]
                try:
                    book.manual_trade("F-1", contract, Side.BUY, 2, "hand-1")
                finally:
                    book.listeners = listeners
            return await positions(account)

        connector.positions = hand_trade_before_positions
        rows = await w.runtime.reconcile_broker("fast", reason="test")
        assert late and next(r for r in rows if r["account"] == "f1")["ok"] is True
        assert not any(e["kind"] == "adopt" for e in w.journal.risk_events(10))
        for kind, record in late:  # the stream catches up: the same fill, already booked
            for listener in list(book.listeners):
                listener(kind, record)
        # A second trade by hand, reported as it happens: the stream is handled in order, so once it is booked the
        # late report of the first was handled too.
        connector.manual_trade("F-1", contract, Side.SELL, 1, "hand-2")
        await wait_until(lambda: "hand-2" in [f["client_order_id"] for f in w.journal.fills(account="f1")],
                         what="the stream handled")
        assert w.runtime.ledger.account_positions("f1") == {contract: 2} == {
            p["contract"]: p["quantity"] for p in book.positions("F-1")}
        assert w.runtime.ledger.strategy_positions("f1", EXTERNAL_STRATEGY) == {contract: 1}
        assert [f["client_order_id"] for f in w.journal.fills(account="f1")].count("hand-1") == 1
        rows = await w.runtime.reconcile_broker("fast", reason="test")
        assert all(r["ok"] for r in rows)
