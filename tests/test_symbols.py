"""Tickers to contracts: every TradingView form, the roll at the Eastern-time date, and every way a ticker is wrong."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timezone

import pytest

from engine.catalog import BUILTIN, Catalog
from engine.symbols import SymbolError, expiry_date, front_contract, parse_contract, resolve, roll_date

CATALOG = Catalog()
MID_JANUARY = datetime(2026, 1, 15, 15, 0, tzinfo=timezone.utc)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("ticker", "root", "contract", "continuous"),
    [
        ("ES1!", "ES", "ESH6", True),
        ("CME_MINI:ES1!", "ES", "ESH6", True),
        ("ESH2026", "ES", "ESH6", False),
        ("ESH6", "ES", "ESH6", False),
        ("MES1!", "MES", "MESH6", True),
        ("ES2!", "ES", "ESM6", True),
        ("ES3!", "ES", "ESU6", True),
        ("CME_MINI:MESM2026", "MES", "MESM6", False),
        ("es1!", "ES", "ESH6", True),
        ("  CME_MINI:MNQ1!  ", "MNQ", "MNQH6", True),
        ("M2K1!", "M2K", "M2KH6", True),
        ("CBOT_MINI:MYM2!", "MYM", "MYMM6", True),
        ("NYMEX:CL1!", "CL", "CLH6", True),  # CLG6 last trades 2026-01-20 and rolls 5 days before, on the 15th
        ("MGC1!", "MGC", "MGCG6", True),
        ("GCJ2026", "GC", "GCJ6", False),
    ],
)
def test_every_ticker_form(ticker: str, root: str, contract: str, continuous: bool) -> None:
    symbol = resolve(ticker, MID_JANUARY, CATALOG)
    assert (symbol.root, symbol.contract, symbol.continuous, symbol.ticker) == (root, contract, continuous, ticker)


@pytest.mark.parametrize(
    ("ticker", "root"),
    [("MESH6", "MES"), ("ESH6", "ES"), ("MNQM6", "MNQ"), ("NQM6", "NQ"), ("MCLK6", "MCL"), ("CLK6", "CL"),
     ("MGCJ6", "MGC"), ("GCJ6", "GC"), ("MYMH6", "MYM"), ("YMH6", "YM"), ("M2KU6", "M2K"), ("RTYU6", "RTY")],
)
def test_longest_root_wins(ticker: str, root: str) -> None:
    assert resolve(ticker, MID_JANUARY, CATALOG).root == root


@pytest.mark.parametrize(
    ("ticker", "message"),
    [
        ("XX1!", "unknown instrument"),
        ("CME:ZB1!", "unknown instrument"),
        ("ES", "unknown instrument"),
        ("", "empty"),
        ("CME_MINI:", "no symbol"),
        ("ESF6", "ES lists no Jan (F) contract; listed months: H (Mar) M (Jun) U (Sep) Z (Dec)"),
        ("ESA6", "'A' is not a month code"),
        ("ESZ5", "ESZ5 (Dec 2025) expired on 2025-12-19"),
        ("ESH2036", "2036 is not within the listed years 2025..2034"),
        ("ES0!", "must be 1! to 12!"),
        ("ES13!", "must be 1! to 12!"),
        ("ES1", "found '1'"),
        ("ESZ6X", "found 'Z6X'"),
    ],
)
def test_bad_tickers_say_what_is_wrong(ticker: str, message: str) -> None:
    with pytest.raises(SymbolError) as caught:
        resolve(ticker, MID_JANUARY, CATALOG)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_contract_trades_until_its_expiry_date() -> None:
    expiry_morning = utc("2026-03-20T13:00:00Z")  # 09:00 EDT on the third Friday
    assert resolve("ESH6", expiry_morning, CATALOG).expiry == date(2026, 3, 20)
    with pytest.raises(SymbolError, match="expired on 2026-03-20"):
        resolve("ESH6", utc("2026-03-21T04:00:00Z"), CATALOG)  # 00:00 EDT the next day


@pytest.mark.parametrize(
    ("at", "front", "second"),
    [
        # ESH6 expires Fri 2026-03-20; roll 8 days before: Thu 2026-03-12 (EDT, UTC-4, since 8 March).
        ("2026-03-12T03:59:59Z", "ESH6", "ESM6"),  # Wed 11 March 23:59:59 EDT: the day before the roll
        ("2026-03-12T04:00:00Z", "ESM6", "ESU6"),  # Thu 12 March 00:00:00 EDT: the roll day
        # ESZ6 expires Fri 2026-12-18; roll Thu 2026-12-10 (EST, UTC-5).
        ("2026-12-10T02:00:00Z", "ESZ6", "ESH7"),  # already the 10th in UTC, still the 9th (21:00) in New York
        ("2026-12-10T04:59:59Z", "ESZ6", "ESH7"),
        ("2026-12-10T05:00:00Z", "ESH7", "ESM7"),
    ],
)
def test_continuous_rolls_on_the_eastern_date(at: str, front: str, second: str) -> None:
    assert resolve("ES1!", utc(at), CATALOG).contract == front
    assert resolve("CME_MINI:ES2!", utc(at), CATALOG).contract == second
    assert resolve("MES1!", utc(at), CATALOG).contract == "M" + front


def test_roll_offset_is_catalog_data() -> None:
    late_roller = Catalog().with_override(replace(BUILTIN["ES"], roll_days_before_expiry=0))
    on_the_17th = utc("2026-03-17T15:00:00Z")
    assert resolve("ES1!", on_the_17th, CATALOG).contract == "ESM6"
    assert resolve("ES1!", on_the_17th, late_roller).contract == "ESH6"
    # A roll offset of 0 makes the expiry day itself the roll day.
    assert front_contract(late_roller["ES"], utc("2026-03-19T15:00:00Z")) == "ESH6"
    assert front_contract(late_roller["ES"], utc("2026-03-20T15:00:00Z")) == "ESM6"


def test_crude_rolls_five_days_before_last_trade() -> None:
    cl = BUILTIN["CL"]
    assert roll_date(cl, 2027, 1) == date(2026, 12, 16)  # CLF7 last trades 2026-12-21
    assert front_contract(cl, utc("2026-12-16T04:59:59Z")) == "CLF7"
    assert front_contract(cl, utc("2026-12-16T05:00:00Z")) == "CLG7"


@pytest.mark.parametrize(
    ("root", "year", "month", "expiry"),
    [
        ("ES", 2026, 3, date(2026, 3, 20)),
        ("ES", 2026, 6, date(2026, 6, 18)),  # third Friday is Juneteenth: the business day before
        ("MES", 2026, 12, date(2026, 12, 18)),
        ("CL", 2026, 4, date(2026, 3, 20)),  # 25 March is a business day: 3 business days before
        ("CL", 2026, 5, date(2026, 4, 21)),  # 25 April is a Saturday: 4 business days before
        ("CL", 2027, 1, date(2026, 12, 21)),  # 25 December is a holiday: 4 business days before
        ("MCL", 2027, 1, date(2026, 12, 18)),  # one business day before CL
        ("MCL", 2026, 4, date(2026, 3, 19)),
        ("GC", 2026, 12, date(2026, 12, 29)),  # third-last business day
        ("GC", 2026, 11, date(2026, 11, 25)),  # Thanksgiving (26th) is not a business day
        ("MGC", 2026, 2, date(2026, 2, 25)),
    ],
)
def test_expiry_rules(root: str, year: int, month: int, expiry: date) -> None:
    assert expiry_date(BUILTIN[root], year, month) == expiry


def test_unknown_expiry_rule_is_reported() -> None:
    odd = replace(BUILTIN["ES"], root="XY", expiry="second_tuesday")
    with pytest.raises(SymbolError, match="XY: unknown expiry rule 'second_tuesday'"):
        expiry_date(odd, 2026, 3)


@pytest.mark.parametrize(
    ("code", "at", "parsed"),
    [
        ("ESH6", "2026-01-15T00:00:00Z", ("ES", 3, 2026)),
        ("MESZ2026", "2026-01-15T00:00:00Z", ("MES", 12, 2026)),
        ("M2KH6", "2026-01-15T00:00:00Z", ("M2K", 3, 2026)),
        ("ESZ5", "2026-01-15T00:00:00Z", ("ES", 12, 2025)),  # last year, not 2035
        ("ESH0", "2029-12-20T00:00:00Z", ("ES", 3, 2030)),  # across the decade
        ("mclf7", "2026-11-24T00:00:00Z", ("MCL", 1, 2027)),
    ],
)
def test_parse_contract(code: str, at: str, parsed: tuple[str, int, int]) -> None:
    assert parse_contract(code, utc(at)) == parsed


@pytest.mark.parametrize("code", ["ES1!", "ES", "H6", "ESH26", "ES-H6"])
def test_parse_contract_refuses_non_codes(code: str) -> None:
    with pytest.raises(SymbolError, match="not a contract code"):
        parse_contract(code, MID_JANUARY)


def test_naive_decision_time_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        resolve("ES1!", datetime(2026, 1, 15, 15, 0), CATALOG)
