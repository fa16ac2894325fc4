"""From a TradingView ticker to the exact futures contract an order must name.

TradingView writes the same market several ways: ``ES1!`` (continuous, front month), ``ES2!`` (the one after),
``CME_MINI:ES1!`` (with an exchange prefix), ``ESH2026`` (full year) and ``ESH6`` (the exchange's own code: root,
month code, last digit of the year). Brokers want the last form. A wrong answer here sends an order for the wrong
expiry, so everything that is not clearly one instrument and one listed contract month is refused with a
``SymbolError`` that says what was wrong.

Continuous symbols resolve at the *decision* time using the catalog's roll rule, not the expiry: equity index
traders move to the next contract 8 calendar days before the third-Friday expiry, and from the roll day (its
Eastern-time date) onward ``1!`` means the next contract. Expiry arithmetic counts CME business days (weekdays minus
the holidays of pandas_market_calendars' ``CME_TradeDate`` calendar, see ``engine.sessions``).

Roots are matched longest first (``MES`` before ``ES``), so ``MESH6`` is never read as ``ES`` with junk in front.
Lookups are cached per instrument and Eastern date, so the decision path pays for the arithmetic once a day.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache

from engine.catalog import MONTH_CODES, Catalog, Instrument
from engine.sessions import ET, is_business_day, to_et

MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MAX_CONTINUOUS = 12
"""``ES12!`` is the furthest continuous index accepted; beyond it a typo is likelier than intent."""

_CONTINUOUS = re.compile(r"^(\d+)!$")
_DATED = re.compile(r"^([A-Z])(\d{4}|\d)$")
_CONTRACT = re.compile(r"^([A-Z0-9]+?)([FGHJKMNQUVXZ])(\d{4}|\d)$")


class SymbolError(ValueError):
    """A ticker that names no known instrument or no listed contract; the message says which part is wrong."""


@dataclass(frozen=True)
class Symbol:
    """A resolved ticker: ``contract`` is what goes to the broker (``ESM6``)."""

    root: str
    contract: str
    continuous: bool
    ticker: str
    """The ticker as the signal wrote it."""
    expiry: date | None = None
    """Last trading day of ``contract``."""


def contract_code(root: str, year: int, month: int) -> str:
    """``ES``, 2026, 6 -> ``ESM6``."""
    return f"{root}{MONTH_CODES[month - 1]}{year % 10}"


def decode_year(digit: int, ref: date) -> int:
    """The year a one-digit contract year means at ``ref``: from last year to eight years ahead.

    Last year is included so that a just-expired contract is reported as expired rather than read as ten years out.
    """
    low = ref.year - 1
    return low + (digit - low) % 10


def parse_contract(code: str, at: datetime | None = None) -> tuple[str, int, int]:
    """``ESH6`` or ``ESH2026`` -> (root, month 1..12, full year).

    A one-digit year is read relative to ``at`` (default: now), see ``decode_year``. The root is whatever precedes
    the month code; checking that it is a known instrument is ``resolve``'s job.
    """
    text = code.strip().upper()
    match = _CONTRACT.match(text)
    if match is None:
        raise SymbolError(f"{code!r} is not a contract code (root + month code + year, e.g. ESH6 or ESH2026)")
    root, month_code, year_text = match.groups()
    if len(year_text) == 4:
        year = int(year_text)
    else:
        ref = to_et(at).date() if at is not None else datetime.now(tz=ET).date()
        year = decode_year(int(year_text), ref)
    return root, MONTH_CODES.index(month_code) + 1, year


# --- expiry rules (catalog.EXPIRY_RULES) -----------------------------------------------------------------------

def _business_day_on_or_before(day: date) -> date:
    while not is_business_day(day):
        day -= timedelta(days=1)
    return day


def _business_days_before(day: date, count: int) -> date:
    """The ``count``-th business day strictly before ``day``."""
    while count:
        day -= timedelta(days=1)
        if is_business_day(day):
            count -= 1
    return day


def _third_friday(year: int, month: int) -> date:
    first = date(year, month, 1)
    return first + timedelta(days=(4 - first.weekday()) % 7 + 14)


def _cl_expiry(year: int, month: int) -> date:
    # Three business days before the 25th of the month before; four when the 25th is not itself a business day.
    prior_year, prior_month = (year - 1, 12) if month == 1 else (year, month - 1)
    the_25th = date(prior_year, prior_month, 25)
    return _business_days_before(the_25th, 3 if is_business_day(the_25th) else 4)


def expiry_date(instrument: Instrument, year: int, month: int) -> date:
    """Last trading day of ``instrument``'s ``month``/``year`` contract, by the catalog's expiry rule.

    ``third_friday`` moves to the business day before when that Friday is a CME holiday (as the exchange does).
    """
    rule = instrument.expiry
    if rule == "third_friday":
        return _business_day_on_or_before(_third_friday(year, month))
    if rule == "cl":
        return _cl_expiry(year, month)
    if rule == "mcl":
        return _business_days_before(_cl_expiry(year, month), 1)
    if rule == "third_last_business_day":
        last = date(year, month, calendar.monthrange(year, month)[1])
        return _business_days_before(last + timedelta(days=1), 3)
    raise SymbolError(f"{instrument.root}: unknown expiry rule {rule!r} (expected third_friday, cl, mcl or "
                      "third_last_business_day)")


def roll_date(instrument: Instrument, year: int, month: int) -> date:
    """First Eastern-time date on which continuous symbols no longer mean this contract."""
    return expiry_date(instrument, year, month) - timedelta(days=instrument.roll_days_before_expiry)


@lru_cache(maxsize=4096)
def _continuous(instrument: Instrument, today: date, n: int) -> tuple[str, date]:
    months = instrument.month_numbers()
    if not months:
        raise SymbolError(f"{instrument.root}: the catalog lists no contract months")
    year, month = today.year, today.month
    seen = 0
    for _ in range(12 * 5 + n * 12):
        if month in months and roll_date(instrument, year, month) > today:
            seen += 1
            if seen == n:
                return contract_code(instrument.root, year, month), expiry_date(instrument, year, month)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    raise SymbolError(f"{instrument.root}{n}!: no listed contract found")  # pragma: no cover - months non-empty


def front_contract(instrument: Instrument, at: datetime, n: int = 1) -> str:
    """The contract ``ROOT{n}!`` means at ``at``: the n-th listed contract whose roll date is after the ET date."""
    return _continuous(instrument, to_et(at).date(), n)[0]


def _split_root(body: str, catalog: Catalog) -> list[tuple[str, str]]:
    return [(root, body[len(root):]) for root in catalog.roots() if body.startswith(root) and len(body) > len(root)]


def resolve(ticker: str, at: datetime, catalog: Catalog) -> Symbol:
    """The contract ``ticker`` means at the decision time ``at``; raises ``SymbolError`` with the reason if none."""
    if not isinstance(ticker, str) or not ticker.strip():
        raise SymbolError("ticker is empty")
    today = to_et(at).date()
    body = ticker.strip().upper().rsplit(":", 1)[-1].strip()
    if not body:
        raise SymbolError(f"ticker {ticker!r} has an exchange prefix but no symbol")
    candidates = _split_root(body, catalog)
    if not candidates:
        known = ", ".join(sorted(catalog.roots()))
        raise SymbolError(f"ticker {ticker!r}: unknown instrument (known roots: {known})")
    problem: str | None = None
    for root, rest in candidates:
        instrument = catalog[root]
        if (cont := _CONTINUOUS.match(rest)) is not None:
            n = int(cont.group(1))
            if not 1 <= n <= MAX_CONTINUOUS:
                raise SymbolError(f"ticker {ticker!r}: continuous index {n}! must be 1! to {MAX_CONTINUOUS}!")
            contract, expiry = _continuous(instrument, today, n)
            return Symbol(root, contract, True, ticker, expiry)
        if (dated := _DATED.match(rest)) is not None:
            return _dated(ticker, instrument, dated.group(1), dated.group(2), today)
        problem = problem or (f"ticker {ticker!r}: after the root {root} expected a continuous index ({root}1!) "
                              f"or a month code and year ({root}H6, {root}H2026), found {rest!r}")
    raise SymbolError(problem or f"ticker {ticker!r} is not understood")


def _dated(ticker: str, instrument: Instrument, month_code: str, year_text: str, today: date) -> Symbol:
    root = instrument.root
    if month_code not in MONTH_CODES:
        raise SymbolError(f"ticker {ticker!r}: {month_code!r} is not a month code (F G H J K M N Q U V X Z)")
    month = MONTH_CODES.index(month_code) + 1
    if month_code not in instrument.months:
        listed = " ".join(f"{c} ({MONTH_NAMES[MONTH_CODES.index(c)]})" for c in instrument.months)
        raise SymbolError(f"ticker {ticker!r}: {root} lists no {MONTH_NAMES[month - 1]} ({month_code}) contract; "
                          f"listed months: {listed}")
    if len(year_text) == 4:
        year = int(year_text)
        if decode_year(year % 10, today) != year:
            raise SymbolError(f"ticker {ticker!r}: {year} is not within the listed years "
                              f"{today.year - 1}..{today.year + 8}")
    else:
        year = decode_year(int(year_text), today)
    expiry = expiry_date(instrument, year, month)
    contract = contract_code(root, year, month)
    if expiry < today:
        raise SymbolError(f"ticker {ticker!r}: {contract} ({MONTH_NAMES[month - 1]} {year}) expired on "
                          f"{expiry.isoformat()}")
    return Symbol(root, contract, False, ticker, expiry)
