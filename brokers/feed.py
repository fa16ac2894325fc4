"""The price every paper account fills and marks against.

One feed is shared by all paper brokers by default (``PriceFeed.shared()``), so three simulated brokers quote the
same market and routing between them compares costs, not random prices. Prices move by a seeded random walk in
whole ticks of the instrument (so every fill is a price the exchange could print), or replay recorded bars from a
CSV (``time,root,open,high,low,close``). Prices are per root: all months of MES share one price, which is close
enough for a simulator and keeps rolls from jumping.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Callable, ClassVar, Iterable

from brokers.timeconv import parse_broker_time
from engine.catalog import MONTH_CODES, Catalog, Instrument

DEFAULT_START_PRICES: dict[str, Decimal] = {
    "ES": Decimal("6000"), "MES": Decimal("6000"),
    "NQ": Decimal("21000"), "MNQ": Decimal("21000"),
    "YM": Decimal("44000"), "MYM": Decimal("44000"),
    "RTY": Decimal("2300"), "M2K": Decimal("2300"),
    "CL": Decimal("70"), "MCL": Decimal("70"),
    "GC": Decimal("2600"), "MGC": Decimal("2600"),
}
FALLBACK_START_PRICE = Decimal("100")
MAX_STEP_TICKS = 4
"""A random-walk step moves each price by -4..+4 ticks."""

PriceListener = Callable[[str, Decimal], None]


def root_of(contract_or_root: str, catalog: Catalog | None = None) -> str:
    """``MESZ6`` -> ``MES``; a known root is returned as is."""
    catalog = catalog or Catalog()
    code = contract_or_root.strip().upper()
    if code in catalog:
        return code
    if len(code) > 2 and code[-2] in MONTH_CODES and code[-1].isdigit() and code[:-2] in catalog:
        return code[:-2]
    raise KeyError(f"unknown instrument {contract_or_root!r}: not a catalog root or root+month+year code")


def snap(price: Decimal, tick: Decimal) -> Decimal:
    """Round to the nearest whole tick (half up), keeping the tick's decimal places."""
    ticks = (price / tick).quantize(Decimal(1), rounding="ROUND_HALF_UP")
    return (ticks * tick).quantize(tick)


@dataclass(frozen=True)
class Bar:
    time: datetime
    root: str
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal


class PriceFeed:
    """Current price per root; ``step()`` moves time forward (one random-walk step, or one replayed bar time).

    Listeners (paper connectors) are told of every change, so resting orders can trigger on the move that
    crosses them.
    """

    _registry: ClassVar[dict[str, "PriceFeed"]] = {}

    def __init__(self, *, seed: int | None = 0, catalog: Catalog | None = None,
                 start_prices: dict[str, Decimal] | None = None, bars: Iterable[Bar] | None = None) -> None:
        self.catalog = catalog or Catalog()
        self._rng = random.Random(seed)
        self._prices: dict[str, Decimal] = {}
        self._start = {**DEFAULT_START_PRICES, **(start_prices or {})}
        self._listeners: list[PriceListener] = []
        self._bar_times: list[datetime] = []
        self._bars: dict[datetime, list[Bar]] = defaultdict(list)
        self._bar_index = -1
        for bar in bars or ():
            self._bars[bar.time].append(bar)
        self._bar_times = sorted(self._bars)
        if self._bar_times:
            self.step()

    # -- registry --------------------------------------------------------------------------------------------
    @classmethod
    def shared(cls, name: str = "default") -> "PriceFeed":
        """The process-wide feed called ``name`` (created on first use), shared by every paper broker using it."""
        feed = cls._registry.get(name)
        if feed is None:
            feed = cls._registry[name] = cls()
        return feed

    @classmethod
    def register(cls, name: str, feed: "PriceFeed") -> "PriceFeed":
        """Install ``feed`` under ``name`` (e.g. a CSV replay for a demo) before paper brokers look it up."""
        cls._registry[name] = feed
        return feed

    @classmethod
    def from_csv(cls, path: Path | str, **kwargs: object) -> "PriceFeed":
        """Replay bars from a CSV with header ``time,root,open,high,low,close`` (time: ISO-8601 with offset)."""
        bars: list[Bar] = []
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"time", "root", "open", "high", "low", "close"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: price CSV lacks column(s) {', '.join(sorted(missing))}")
            for line_no, row in enumerate(reader, start=2):
                try:
                    bars.append(Bar(parse_broker_time(row["time"], "utc_iso"), row["root"].strip().upper(),
                                    *(Decimal(row[k].strip()) for k in ("open", "high", "low", "close"))))
                except (ValueError, ArithmeticError) as exc:
                    raise ValueError(f"{path}:{line_no}: bad price bar: {exc}") from None
        if not bars:
            raise ValueError(f"{path}: no price bars")
        return cls(bars=bars, **kwargs)  # type: ignore[arg-type]

    # -- prices ----------------------------------------------------------------------------------------------
    def instrument(self, contract_or_root: str) -> Instrument:
        return self.catalog[root_of(contract_or_root, self.catalog)]

    def price(self, contract_or_root: str) -> Decimal:
        root = root_of(contract_or_root, self.catalog)
        price = self._prices.get(root)
        if price is None:
            start = self._start.get(root, FALLBACK_START_PRICE)
            price = self._prices[root] = snap(start, self.catalog[root].tick_size)
        return price

    def set_price(self, contract_or_root: str, price: Decimal | int | str) -> Decimal:
        """Force a price (tests, demos); snapped to the tick. Listeners hear of it."""
        root = root_of(contract_or_root, self.catalog)
        snapped = snap(Decimal(str(price)), self.catalog[root].tick_size)
        if snapped <= 0:
            raise ValueError(f"price of {root} must be > 0, got {price}")
        self._prices[root] = snapped
        self._notify(root, snapped)
        return snapped

    @property
    def replaying(self) -> bool:
        return bool(self._bar_times)

    @property
    def bar_time(self) -> datetime | None:
        """Time of the bar being replayed (None for a random walk)."""
        if 0 <= self._bar_index < len(self._bar_times):
            return self._bar_times[self._bar_index]
        return None

    def step(self) -> bool:
        """Advance: the next replayed bar (False once the replay is over), or one random-walk step per known root."""
        if self._bar_times:
            if self._bar_index + 1 >= len(self._bar_times):
                return False
            self._bar_index += 1
            for bar in self._bars[self._bar_times[self._bar_index]]:
                if bar.root in self.catalog:
                    self._prices[bar.root] = snap(bar.close, self.catalog[bar.root].tick_size)
                    self._notify(bar.root, self._prices[bar.root])
            return True
        for root in sorted(self._prices):
            tick = self.catalog[root].tick_size
            moved = self._prices[root] + tick * self._rng.randint(-MAX_STEP_TICKS, MAX_STEP_TICKS)
            self._prices[root] = max(moved, tick)
            self._notify(root, self._prices[root])
        return True

    # -- listeners -------------------------------------------------------------------------------------------
    def subscribe(self, listener: PriceListener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: PriceListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, root: str, price: Decimal) -> None:
        for listener in list(self._listeners):
            listener(root, price)


__all__ = ["Bar", "DEFAULT_START_PRICES", "PriceFeed", "root_of", "snap"]
