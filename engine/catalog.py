"""The instrument catalog: what a contract is worth, when it trades and when traders roll it.

Facts come from the exchanges' contract specs (see ``docs/contracts.md`` in the shared team docs). Each entry
carries its expiry rule and roll offset as data, not code, so a ``kind: Instrument`` document can add or override
an instrument without touching Python. Money is ``Decimal``: a tick value summed in binary floating point drifts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Mapping

MONTH_CODES = "FGHJKMNQUVXZ"
"""CME month codes, January (F) to December (Z)."""

EXPIRY_RULES = ("third_friday", "cl", "mcl", "third_last_business_day")
"""How the last trading day of a contract month is found.

- ``third_friday``: the third Friday of the contract month (equity index futures).
- ``cl``: three business days before the 25th calendar day of the month *before* the contract month (WTI crude).
- ``mcl``: one business day before the ``cl`` date (Micro WTI).
- ``third_last_business_day``: the third-last business day of the contract month (COMEX gold).
"""


@dataclass(frozen=True)
class Instrument:
    """A futures root (``ES``) and everything needed to price, margin and roll it."""

    root: str
    exchange: str
    tick_size: Decimal
    tick_value: Decimal
    months: str
    expiry: str
    roll_days_before_expiry: int
    description: str = ""

    @property
    def point_value(self) -> Decimal:
        """USD per full point of price (tick value / tick size)."""
        return self.tick_value / self.tick_size

    def month_numbers(self) -> tuple[int, ...]:
        """Listed contract months as 1..12, in calendar order."""
        return tuple(MONTH_CODES.index(code) + 1 for code in self.months)


def _inst(root: str, exchange: str, tick: str, value: str, months: str, expiry: str, roll: int, desc: str) -> Instrument:
    return Instrument(root, exchange, Decimal(tick), Decimal(value), months, expiry, roll, desc)


_QUARTERLY = "HMUZ"
_EQUITY_ROLL = 8  # the Thursday of the week before the third-Friday expiry

BUILTIN: Mapping[str, Instrument] = {
    i.root: i
    for i in (
        _inst("ES", "CME", "0.25", "12.50", _QUARTERLY, "third_friday", _EQUITY_ROLL, "E-mini S&P 500"),
        _inst("MES", "CME", "0.25", "1.25", _QUARTERLY, "third_friday", _EQUITY_ROLL, "Micro E-mini S&P 500"),
        _inst("NQ", "CME", "0.25", "5.00", _QUARTERLY, "third_friday", _EQUITY_ROLL, "E-mini Nasdaq-100"),
        _inst("MNQ", "CME", "0.25", "0.50", _QUARTERLY, "third_friday", _EQUITY_ROLL, "Micro E-mini Nasdaq-100"),
        _inst("YM", "CBOT", "1", "5.00", _QUARTERLY, "third_friday", _EQUITY_ROLL, "E-mini Dow ($5)"),
        _inst("MYM", "CBOT", "1", "0.50", _QUARTERLY, "third_friday", _EQUITY_ROLL, "Micro E-mini Dow"),
        _inst("RTY", "CME", "0.10", "5.00", _QUARTERLY, "third_friday", _EQUITY_ROLL, "E-mini Russell 2000"),
        _inst("M2K", "CME", "0.10", "0.50", _QUARTERLY, "third_friday", _EQUITY_ROLL, "Micro E-mini Russell 2000"),
        # Energy rolls a few days before last trade, well ahead of delivery.
        _inst("CL", "NYMEX", "0.01", "10.00", MONTH_CODES, "cl", 5, "WTI Crude Oil"),
        _inst("MCL", "NYMEX", "0.01", "1.00", MONTH_CODES, "mcl", 5, "Micro WTI Crude Oil"),
        # Gold rolls before first notice (end of the month before delivery): about a month before last trade.
        _inst("GC", "COMEX", "0.10", "10.00", "GJMQVZ", "third_last_business_day", 33, "Gold"),
        _inst("MGC", "COMEX", "0.10", "1.00", "GJMQVZ", "third_last_business_day", 33, "Micro Gold"),
    )
}


class Catalog:
    """The built-in instruments, overlaid with the rule set's ``kind: Instrument`` documents."""

    def __init__(self, overrides: Mapping[str, Instrument] | None = None) -> None:
        self._by_root: dict[str, Instrument] = dict(BUILTIN)
        self._by_root.update(overrides or {})
        self._roots = tuple(sorted(self._by_root, key=lambda r: (-len(r), r)))

    def __contains__(self, root: object) -> bool:
        return root in self._by_root

    def __getitem__(self, root: str) -> Instrument:
        return self._by_root[root]

    def get(self, root: str) -> Instrument | None:
        return self._by_root.get(root)

    def roots(self) -> tuple[str, ...]:
        """Known roots, longest first, so that ``MES`` is tried before ``ES`` when parsing a ticker."""
        return self._roots

    def with_override(self, instrument: Instrument) -> "Catalog":
        return Catalog({**self._by_root, instrument.root: instrument})


def merge_instrument(base: Instrument | None, root: str, fields: Mapping[str, object]) -> Instrument:
    """Build the instrument a ``kind: Instrument`` document describes, inheriting unset fields from ``base``."""
    def dec(key: str) -> Decimal | None:
        value = fields.get(key)
        return None if value is None else Decimal(str(value))

    if base is None:
        base = Instrument(root, "CME", Decimal("0.25"), Decimal("1"), _QUARTERLY, "third_friday", _EQUITY_ROLL)
    updates: dict[str, object] = {"root": root}
    if fields.get("exchange") is not None:
        updates["exchange"] = str(fields["exchange"])
    if (tick := dec("tick_size")) is not None:
        updates["tick_size"] = tick
    if (value := dec("tick_value")) is not None:
        updates["tick_value"] = value
    if (months := fields.get("months")) is not None:
        updates["months"] = "".join(str(m) for m in months) if isinstance(months, (list, tuple, str)) else str(months)
    if fields.get("expiry") is not None:
        updates["expiry"] = str(fields["expiry"])
    if fields.get("roll_days_before_expiry") is not None:
        updates["roll_days_before_expiry"] = int(fields["roll_days_before_expiry"])  # type: ignore[call-overload]
    if fields.get("description") is not None:
        updates["description"] = str(fields["description"])
    return replace(base, **updates)  # type: ignore[arg-type]
