"""Aggregation over the example rules: limits at their edges, buffers, and margin that is never pooled."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from engine.loader import load_rules
from tests.conftest import EXAMPLE_RULES
from view.aggregate import AccountInput, PositionView, account_view, portfolio_view, to_jsonable


@pytest.fixture(scope="module")
def rules():
    result = load_rules([EXAMPLE_RULES])
    assert result.ok
    return result.ruleset


def acct(name: str, realized: str, unrealized: str = "0", margin: str = "500", free: str = "49000",
         strategy: str = "es-scalper", contract: str = "ESH6", qty: int = 1) -> AccountInput:
    positions = (PositionView(name, strategy, contract, qty, D("5000"), D("5000"), D(unrealized)),) if qty else ()
    return AccountInput(name, cash=D("50000"), margin_used=D(margin), free_margin=D(free), realized=D(realized),
                        commissions=D("1.18"), positions=positions)


def test_account_limit_breaches_when_the_loss_reaches_it(rules) -> None:
    # apex-1: capital 50,000; account-daily-loss is 2 % => 1,000.00
    at_limit = account_view(rules, acct("apex-1", "-1000.00"))
    [status] = at_limit.limits
    assert (status.limit, status.limit_usd, status.breached, status.headroom) == ("account-daily-loss", D("1000.00"), True, D("0"))
    just_inside = account_view(rules, acct("apex-1", "-999.99"))
    assert just_inside.limits[0].breached is False and just_inside.limits[0].headroom == D("0.01")


def test_unrealized_counts_in_daily_pnl(rules) -> None:
    view = account_view(rules, acct("apex-1", "-900", unrealized="-100"))
    assert view.daily_pnl == D("-1000") and view.limits[0].breached


def test_buffer_left_against_the_margin_buffer(rules) -> None:
    view = account_view(rules, acct("apex-1", "0", margin="500", free="49000"))
    assert view.buffer_required == D("150.00")  # 30 % of 500
    assert view.buffer_left == D("48850.00")


def test_portfolio_totals_and_limit(rules) -> None:
    inputs = [acct("apex-1", "-1000"), acct("topstep-1", "-1000"),
              acct("micro-c", "-500", strategy="micro-trend", contract="MESH6", margin="100", free="9800")]
    view = portfolio_view(rules, inputs)
    assert view.total.daily_pnl == D("-2500")
    [portfolio_limit] = view.limits
    assert portfolio_limit.limit == "portfolio-daily-loss" and portfolio_limit.breached  # loss reached 2,500
    assert "portfolio-daily-loss" in view.breached and "apex-1:account-daily-loss" in view.breached
    # margin stays at each broker: no single pooled figure
    assert view.total.margin_used_by_broker == {"paper-cheap": D("100"), "paper-fast": D("500"), "paper-slow": D("500")}
    assert view.total.free_margin_by_broker["paper-fast"] == D("49000")
    brokers = {g.name: g for g in view.by_broker}
    assert brokers["paper-slow"].accounts == ("topstep-1",)
    strategies = {g.name: g for g in view.by_strategy}
    assert strategies["es-scalper"].daily_pnl == D("-2000") and strategies["micro-trend"].open_contracts == 1


def test_json_form_has_no_floats(rules) -> None:
    data = to_jsonable(portfolio_view(rules, [acct("apex-1", "-12.34")]))
    assert data["total"]["daily_pnl"] == "-12.34"

    def walk(node):
        if isinstance(node, float):
            raise AssertionError("float in money view")
        if isinstance(node, dict):
            [walk(v) for v in node.values()]
        if isinstance(node, list):
            [walk(v) for v in node]
    walk(data)
