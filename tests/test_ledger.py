"""The positions ledger: average-cost accounting per account, strategy and contract, in Decimal."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.ledger import EXTERNAL_STRATEGY, Book, Ledger, replay

MES = Decimal(5)  # USD per point
D = Decimal


def fill(ledger: Ledger, fid: str, qty: int, price: str, *, account: str = "apex-1", strategy: str = "es-scalper",
         contract: str = "MESZ6", commission: str = "0.25") -> bool:
    return ledger.apply(fill_id=fid, account=account, strategy=strategy, contract=contract, signed_qty=qty,
                        price=D(price), commission=D(commission) * abs(qty), point_value=MES)


@pytest.mark.parametrize(
    "fills, quantity, avg, realized",
    [
        pytest.param([(2, "6000")], 2, "6000", "0", id="open long"),
        pytest.param([(1, "6000"), (1, "6001")], 2, "6000.5", "0", id="add moves the average"),
        pytest.param([(2, "6000"), (-1, "6002")], 1, "6000", "10", id="reduce realizes, average unchanged"),
        pytest.param([(2, "6000"), (-2, "5999")], 0, "0", "-10", id="close at a loss"),
        pytest.param([(-3, "6000"), (3, "5990")], 0, "0", "150", id="short covered lower is a gain"),
        pytest.param([(2, "6000"), (-5, "6004")], -3, "6004", "40", id="crossing zero opens the rest at the fill"),
        pytest.param([(1, "6000.25"), (2, "6000.50"), (-3, "6000.75")], 0, "0", "5.00", id="round trip is exact"),
        pytest.param([(1, "6000.25"), (2, "6000.50"), (-1, "6000.75"), (-1, "6000.75"), (-1, "6000.75")], 0, "0",
                     "5.00", id="partial closes of an awkward average still sum exactly"),
    ],
)
def test_average_cost_accounting(fills: list[tuple[int, str]], quantity: int, avg: str, realized: str) -> None:
    ledger = Ledger()
    for n, (qty, price) in enumerate(fills):
        fill(ledger, f"f{n}", qty, price)
    book = ledger.book("apex-1", "es-scalper", "MESZ6")
    assert book.quantity == quantity
    assert book.avg_price == D(avg)
    assert book.realized == D(realized)
    assert book.commissions == D("0.25") * sum(abs(q) for q, _ in fills)


def test_a_fill_seen_twice_counts_once() -> None:
    ledger = Ledger()
    assert fill(ledger, "paper:1", 2, "6000") is True
    assert fill(ledger, "paper:1", 2, "6000") is False
    assert ledger.account_position("apex-1", "MESZ6") == 2


def test_positions_are_kept_per_strategy_and_summed_per_account() -> None:
    ledger = Ledger()
    fill(ledger, "a", 2, "6000", strategy="es-scalper")
    fill(ledger, "b", -1, "6001", strategy="micro-trend")
    fill(ledger, "c", 3, "21000", contract="MNQZ6", strategy="micro-trend")
    fill(ledger, "d", 1, "6000", account="apex-2")
    assert ledger.account_positions("apex-1") == {"MESZ6": 1, "MNQZ6": 3}
    assert ledger.strategy_positions("apex-1", "micro-trend") == {"MESZ6": -1, "MNQZ6": 3}
    assert ledger.account_positions("apex-2") == {"MESZ6": 1}


def test_flat_books_do_not_show_as_positions() -> None:
    ledger = Ledger()
    fill(ledger, "a", 2, "6000")
    fill(ledger, "b", -2, "6001")
    assert ledger.account_positions("apex-1") == {}


def test_net_pnl_marks_open_positions_and_subtracts_commissions() -> None:
    ledger = Ledger()
    fill(ledger, "a", 2, "6000")          # 0.50 commission
    fill(ledger, "b", -1, "6002")         # +10 realized, 0.25 commission
    pnl = ledger.net_pnl("apex-1", {"MESZ6": D("6004")}, {"MESZ6": MES})
    assert pnl == D(10) + D(4) * 1 * MES - D("0.75")


def test_rebased_ledger_measures_the_day_from_the_day_start_mark() -> None:
    ledger = Ledger()
    fill(ledger, "a", 2, "6000")
    day = ledger.rebased({"MESZ6": D("6010")})
    assert day.book("apex-1", "es-scalper", "MESZ6") == Book(2, D("12020"))
    # A fill seen before the day began is not booked into the new day again.
    assert fill(day, "a", 2, "6000") is False
    fill(day, "b", -2, "6008")
    assert day.net_pnl("apex-1", {}, {"MESZ6": MES}) == D(-2) * 2 * MES - D("0.50")


def test_a_trade_by_hand_opening_a_position_is_booked_to_no_strategy_without_touching_the_strategys() -> None:
    ledger = Ledger()
    fill(ledger, "a", 2, "6000")
    assert ledger.apply(fill_id="adopted-1", account="apex-1", strategy=EXTERNAL_STRATEGY, contract="MESZ6",
                        signed_qty=1, price=D("6001"), commission=D(0), point_value=MES, manual=True)
    assert ledger.account_position("apex-1", "MESZ6") == 3
    assert ledger.book("apex-1", "es-scalper", "MESZ6").quantity == 2
    assert ledger.book("apex-1", EXTERNAL_STRATEGY, "MESZ6").quantity == 1
    assert ledger.book("apex-1", EXTERNAL_STRATEGY, "MESZ6").realized == 0


def test_floats_are_refused() -> None:
    with pytest.raises(TypeError, match="Decimal"):
        Ledger().apply(fill_id="x", account="a", strategy="s", contract="MESZ6", signed_qty=1,
                       price=6000.25, commission=D(0), point_value=MES)  # type: ignore[arg-type]


def test_replay_rebuilds_the_ledger_from_journal_rows() -> None:
    """A fill booked to no strategy that is not of an order of ours is a trade made by hand: it closes what the
    strategy on the other side held (once, in its place); one of ours (an ``mb-`` id, an account-wide flatten's
    exit of what belongs to nobody) is booked to nobody as it is."""
    rows = [
        {"broker": "paper-fast", "fill_id": "1", "account": "apex-1", "strategy": "es-scalper", "contract": "MESZ6",
         "side": "buy", "quantity": 2, "price": "6000.25", "commission": "0.50"},
        {"broker": "paper-fast", "fill_id": "1", "account": "apex-1", "strategy": "es-scalper", "contract": "MESZ6",
         "side": "buy", "quantity": 2, "price": "6000.25", "commission": "0.50"},
        {"broker": "paper-fast", "fill_id": "2", "account": "apex-1", "strategy": None, "contract": "MESZ6",
         "side": "sell", "quantity": 1, "price": "6001", "commission": "0.25"},
        {"broker": "paper-fast", "fill_id": "3", "account": "apex-1", "strategy": None, "contract": "MESZ6",
         "side": "buy", "quantity": 1, "price": "6002", "commission": "0.25", "client_order_id": "mb-abc"},
    ]
    ledger = replay(rows, lambda contract: MES)
    scalper = ledger.book("apex-1", "es-scalper", "MESZ6")
    assert scalper.quantity == 1 and scalper.realized == D("0.75") * MES  # sold 1 by hand at 6001
    assert ledger.book("apex-1", EXTERNAL_STRATEGY, "MESZ6").quantity == 1
    assert ledger.book("apex-1", EXTERNAL_STRATEGY, "MESZ6").commissions == D("0.50")
    assert ledger.account_positions("apex-1") == {"MESZ6": 2}


def test_snapshot_rows_write_prices_as_plain_decimals_never_in_exponent_form() -> None:
    ledger = Ledger()
    ledger.apply(fill_id="f1", account="a", strategy="s", contract="MNQZ6", signed_qty=2, price=Decimal("21000"),
                 commission=Decimal("0.50"), point_value=Decimal(2))
    ledger.apply(fill_id="f2", account="a", strategy="s", contract="MESZ6", signed_qty=3, price=Decimal("6001.25"),
                 commission=Decimal("0.75"), point_value=Decimal(5))
    rows = {r["contract"]: r for r in ledger.snapshot_rows()}
    assert rows["MNQZ6"]["avg_price"] == "21000"  # not "2.1E+4"
    assert rows["MESZ6"]["avg_price"] == "6001.25"


def test_a_manual_close_closes_the_strategies_on_the_other_side_by_name() -> None:
    """Opposite strategies first by name; a same-side manual line stays booked to no strategy."""
    ledger = Ledger()
    for fid, strategy, qty in (("1", "beta", 2), ("2", "alpha", 1), ("3", "gamma", -1)):
        ledger.apply(fill_id=fid, account="a1", strategy=strategy, contract="MESH6", signed_qty=qty,
                     price=Decimal("5000"), commission=Decimal(0), point_value=Decimal(5))
    # sold 2 by hand at 5002: alpha's 1 and 1 of beta's 2, 2 points each, realized at that price
    ledger.apply(fill_id="4", account="a1", strategy=EXTERNAL_STRATEGY, contract="MESH6", signed_qty=-2,
                 price=Decimal("5002"), commission=Decimal(0), point_value=Decimal(5), manual=True)
    ledger.apply(fill_id="5", account="a1", strategy=EXTERNAL_STRATEGY, contract="MESM6", signed_qty=1,
                 price=Decimal("5000"), commission=Decimal(0), point_value=Decimal(5), manual=True)
    assert ledger.account_positions("a1") == {"MESM6": 1}
    assert ledger.strategy_lines() == {("a1", "beta", "MESH6"): 1, ("a1", "gamma", "MESH6"): -1,
                                       ("a1", EXTERNAL_STRATEGY, "MESM6"): 1}
    assert ledger.book("a1", "alpha", "MESH6").realized == ledger.book("a1", "beta", "MESH6").realized == D(10)


def _manual(ledger: Ledger, fid: str, qty: int, price: str = "5000") -> None:
    ledger.apply(fill_id=fid, account="a1", strategy=EXTERNAL_STRATEGY, contract="MESH6", signed_qty=qty,
                 price=D(price), commission=D("0.25"), point_value=MES, manual=True)


def _ours(ledger: Ledger, fid: str, strategy: str, qty: int, price: str = "5000") -> None:
    ledger.apply(fill_id=fid, account="a1", strategy=strategy, contract="MESH6", signed_qty=qty, price=D(price),
                 commission=D(0), point_value=MES)


def test_a_manual_close_is_booked_once_so_a_strategy_that_reopens_holds_what_it_reopened() -> None:
    """mirror short 2, bought back by hand, then long 2 of its own: mirror holds 2 (its exit sells them), nothing
    belongs to nobody. Netted at every read instead, the hand buy ate mirror's new long."""
    ledger = Ledger()
    _ours(ledger, "1", "mirror", -2)
    _manual(ledger, "2", 2, "4990")
    assert ledger.strategy_lines() == {} and ledger.book("a1", "mirror", "MESH6").realized == D(10) * 2 * MES
    _ours(ledger, "3", "mirror", 2)
    assert ledger.strategy_lines() == {("a1", "mirror", "MESH6"): 2}


def test_a_position_opened_by_hand_is_nobodys_and_a_strategys_trade_does_not_net_it() -> None:
    """Opened by hand long 1; mirror then shorts 2 (the broker nets to -1): mirror holds -2, nobody +1, and a
    later hand sell closes what was opened by hand before it touches a strategy."""
    ledger = Ledger()
    _manual(ledger, "1", 1)
    _ours(ledger, "2", "mirror", -2)
    assert ledger.strategy_lines() == {("a1", EXTERNAL_STRATEGY, "MESH6"): 1, ("a1", "mirror", "MESH6"): -2}
    _manual(ledger, "3", -1)
    assert ledger.strategy_lines() == {("a1", "mirror", "MESH6"): -2}
    _manual(ledger, "4", 2)  # buys mirror's short back
    assert ledger.strategy_lines() == {}
    assert ledger.book("a1", EXTERNAL_STRATEGY, "MESH6").commissions == D("0.75")  # the trader's commissions


def test_what_trades_by_hand_closed_is_counted_per_line_and_replayed_alike() -> None:
    """``hand_closed``: what an exit decided before a trade by hand compares against (``service.overtaken``).
    Only closes count (what a trade by hand opens is nobody's, not closed), on the line they closed, and a replay
    of the same rows in the same order counts the same."""
    ledger = Ledger()
    _ours(ledger, "1", "mirror", 2)
    _ours(ledger, "2", "trend", -1)
    _manual(ledger, "3", -3)  # closes mirror's 2 (the side it opposes), opens 1 of nobody's
    _manual(ledger, "4", 2)  # closes nobody's 1 first, then trend's short 1
    assert ledger.hand_closed == {("a1", "mirror", "MESH6"): -2, ("a1", EXTERNAL_STRATEGY, "MESH6"): 1,
                                  ("a1", "trend", "MESH6"): 1}
    rows = [{"broker": "b", "fill_id": fid, "account": "a1", "strategy": strategy, "contract": "MESH6",
             "side": "buy" if qty > 0 else "sell", "quantity": abs(qty), "price": "5000", "commission": "0",
             "client_order_id": None if strategy == EXTERNAL_STRATEGY else f"mb-{fid}"}
            for fid, strategy, qty in (("1", "mirror", 2), ("2", "trend", -1), ("3", EXTERNAL_STRATEGY, -3),
                                       ("4", EXTERNAL_STRATEGY, 2))]
    assert replay(rows, lambda contract: MES).hand_closed == ledger.hand_closed


def test_rebuilding_one_account_and_contract_leaves_the_other_lines_and_matches_a_full_replay() -> None:
    """``Ledger.rebuild``: a fill reported late across a trade by hand re-books its account and contract only."""
    def row(fid: str, account: str, contract: str, strategy: str, qty: int) -> dict[str, object]:
        return {"broker": "b", "fill_id": fid, "account": account, "strategy": strategy, "contract": contract,
                "side": "buy" if qty > 0 else "sell", "quantity": abs(qty), "price": "5000", "commission": "0",
                "client_order_id": None if strategy == EXTERNAL_STRATEGY else f"mb-{fid}"}
    in_order = [row("1", "a1", "MESH6", "mirror", 2), row("2", "a1", "MESH6", EXTERNAL_STRATEGY, -2),
                row("3", "a1", "MESH6", "mirror", -2), row("4", "a1", "MESM6", "mirror", 1),
                row("5", "a2", "MESH6", "mirror", 3)]
    arrived = [in_order[i] for i in (0, 2, 3, 4, 1)]  # our exit's fill (3) booked before the hand close (2)
    live = replay(arrived, lambda contract: MES)
    assert live.strategy_lines()[("a1", EXTERNAL_STRATEGY, "MESH6")] == -2  # booked out of order: nobody's short
    live.rebuild("a1", "MESH6", [r for r in in_order if (r["account"], r["contract"]) == ("a1", "MESH6")],
                 lambda contract: MES)
    full = replay(in_order, lambda contract: MES)
    assert live.books == full.books and live.hand_closed == full.hand_closed and live.seen_fills == full.seen_fills
    assert live.strategy_lines() == {("a1", "mirror", "MESH6"): -2, ("a1", "mirror", "MESM6"): 1,
                                     ("a2", "mirror", "MESH6"): 3}
