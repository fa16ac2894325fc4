"""Positions and P&L per (account, strategy, contract), from fills only: the service's own book of what it holds.

Pure: no I/O, no clock. The runtime feeds it the fills the brokers report (each once: ``apply`` ignores a fill id
it has already seen, so a fill that arrives both as an event and from ``fills_since`` counts once) and reads
positions for decisions, reconciliation and the admin API.

Accounting is average-cost, the convention futures brokers report: adding to a position moves the average price;
reducing it realizes ``(exit - average) x closed x sign x point value`` and leaves the average unchanged; a fill that
crosses zero closes the old position at its average and opens the rest at the fill price. Commissions are kept
apart from price P&L (``commissions``) so each can be checked against the broker's statement. Everything is
``Decimal``; a float is refused rather than silently rounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Callable, Iterable, Iterator, Mapping

EXTERNAL_STRATEGY = "(external)"
"""Strategy bucket for positions the service did not open itself (adopted from the broker by reconciliation)."""


def _dec(value: Decimal | int, what: str) -> Decimal:
    if isinstance(value, float) or isinstance(value, bool):
        raise TypeError(f"{what} must be Decimal or int, not {type(value).__name__} (convert with Decimal(str(x)))")
    return Decimal(value)


COST_QUANTUM = Decimal("1e-10")
"""Precision of the cost a partial close releases; the rest stays in the book, so a round trip sums exactly."""


@dataclass(frozen=True)
class Book:
    """One (account, strategy, contract) line: signed quantity, cost basis, realized P&L and commissions.

    The cost basis (``cost``: sum of price x contracts still open, in price units) is kept instead of a rounded
    average, so a position closed in full realizes exactly sells minus buys, however awkward its average.
    """

    quantity: int = 0
    cost: Decimal = Decimal(0)
    realized: Decimal = Decimal(0)
    """USD from price moves on closed contracts, commissions excluded."""
    commissions: Decimal = Decimal(0)

    @property
    def avg_price(self) -> Decimal:
        return self.cost / abs(self.quantity) if self.quantity else Decimal(0)

    def unrealized(self, mark: Decimal, point_value: Decimal) -> Decimal:
        if not self.quantity:
            return Decimal(0)
        sign = 1 if self.quantity > 0 else -1
        return (mark * abs(self.quantity) - self.cost) * sign * point_value

    def net(self, mark: Decimal | None, point_value: Decimal) -> Decimal:
        """Realized + unrealized (at ``mark``; ignored when flat or unknown) - commissions."""
        open_pnl = self.unrealized(mark, point_value) if mark is not None else Decimal(0)
        return self.realized + open_pnl - self.commissions

    def fill(self, signed_qty: int, price: Decimal, commission: Decimal, point_value: Decimal) -> "Book":
        """The book after a fill of ``signed_qty`` (buy > 0) at ``price``."""
        commissions = self.commissions + commission
        if signed_qty == 0:
            return replace(self, commissions=commissions)
        qty, cost, realized = self.quantity, self.cost, self.realized
        if qty == 0 or (qty > 0) == (signed_qty > 0):
            return _book(qty + signed_qty, cost + price * abs(signed_qty), realized, commissions)
        closed = min(abs(qty), abs(signed_qty))
        direction = 1 if qty > 0 else -1
        released = cost if closed == abs(qty) else (cost * closed / abs(qty)).quantize(COST_QUANTUM)
        realized += (price * closed - released) * direction * point_value
        new_qty = qty + signed_qty
        remaining = cost - released
        if new_qty and (new_qty > 0) != (qty > 0):
            remaining = price * abs(new_qty)  # crossed zero: the remainder opened at this fill's price
        return _book(new_qty, remaining, realized, commissions)


_new = object.__new__
_set = object.__setattr__


def _book(quantity: int, cost: Decimal, realized: Decimal, commissions: Decimal) -> Book:
    """``Book(quantity, cost, realized, commissions)`` without the frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field): the same instance, built once per fill on the runtime's busiest path."""
    book = _new(Book)
    _set(book, "__dict__", {"quantity": quantity, "cost": cost, "realized": realized, "commissions": commissions})
    return book


_EMPTY = Book()

Key = tuple[str, str, str]
"""(account, strategy, contract)."""


def absorb_external(by_strategy: dict[str, dict[str, int]], contract: str, qty: int) -> int:
    """Net a line booked to no strategy (``qty`` of ``contract``) against the strategies' lines of one account
    (``by_strategy``: strategy -> contract -> quantity, changed in place); returns what is left of it.

    A line booked to no strategy that opposes strategies' positions is a trader's manual close of them (a fill we
    did not order, or what reconciliation adopted from the broker): it takes those positions off, so that a
    strategy's next exit, target or flatten does not trade a position that is gone (it would open the other side).
    Strategies on the opposite side of it first by name; a manual line on the same side (a trade opened by hand)
    belongs to no strategy and changes none. Every reader of per-strategy positions nets the same way: the engine's
    view (``Runtime.engine_state``) and a flatten's lines (``Ledger.strategy_lines``)."""
    left = qty
    for strategy in sorted(by_strategy):
        held = by_strategy[strategy].get(contract, 0)
        if left == 0:
            break
        if held == 0 or (held > 0) == (left > 0):
            continue
        take = min(abs(held), abs(left))
        step = take if held > 0 else -take
        by_strategy[strategy][contract] = held - step
        left += step
    return left


@dataclass
class Ledger:
    """Books by (account, strategy, contract) plus the fill ids already applied."""

    books: dict[Key, Book] = field(default_factory=dict)
    seen_fills: set[str] = field(default_factory=set)

    def apply(self, *, fill_id: str, account: str, strategy: str, contract: str, signed_qty: int,
              price: Decimal, commission: Decimal, point_value: Decimal) -> bool:
        """Book one fill; False (and no change) when ``fill_id`` was applied before."""
        if fill_id in self.seen_fills:
            return False
        if type(price) is not Decimal:
            price = _dec(price, "fill price")
        if type(commission) is not Decimal:
            commission = _dec(commission, "commission")
        if type(point_value) is not Decimal:
            point_value = _dec(point_value, "point value")
        key = (account, strategy, contract)
        book = self.books.get(key)
        self.books[key] = (_EMPTY if book is None else book).fill(signed_qty, price, commission, point_value)
        self.seen_fills.add(fill_id)
        return True

    def adjust(self, *, account: str, contract: str, to_quantity: int, price: Decimal,
               strategy: str = EXTERNAL_STRATEGY) -> int:
        """Make the account's net position in ``contract`` equal ``to_quantity`` (the broker's truth).

        The difference is booked to ``strategy`` (by default the external bucket) at ``price`` without P&L, so the
        strategies' own books keep what they traded. Returns the signed quantity adjusted.
        """
        delta = to_quantity - self.account_position(account, contract)
        if delta:
            key = (account, strategy, contract)
            book = self.books.get(key, Book())
            # Booked as a fill with a zero point value: the quantity and average move, realized P&L does not.
            self.books[key] = book.fill(delta, _dec(price, "price"), Decimal(0), Decimal(0))
        return delta

    # -- reading --------------------------------------------------------------------------------------------
    def book(self, account: str, strategy: str, contract: str) -> Book:
        return self.books.get((account, strategy, contract), Book())

    def items(self) -> Iterator[tuple[Key, Book]]:
        return iter(sorted(self.books.items()))

    def account_position(self, account: str, contract: str) -> int:
        return sum(b.quantity for (a, _, c), b in self.books.items() if a == account and c == contract)

    def account_positions(self, account: str) -> dict[str, int]:
        """Net non-zero positions of ``account`` by contract (all strategies together, as the broker sees it)."""
        out: dict[str, int] = {}
        for (a, _, c), b in self.books.items():
            if a == account and b.quantity:
                out[c] = out.get(c, 0) + b.quantity
        return {c: q for c, q in out.items() if q}

    def strategy_lines(self) -> dict[Key, int]:
        """Non-zero positions by (account, strategy, contract) as each strategy still holds them at the broker:
        lines booked to no strategy are netted against the strategies' lines they oppose (``absorb_external``),
        and what is left of them stays booked to no strategy. What a flatten closes: the raw books would have a
        strategy's flatten sell a position a trader already closed by hand (the account would end short)."""
        own: dict[str, dict[str, dict[str, int]]] = {}
        external: list[tuple[str, str, int]] = []
        for (a, s, c), b in self.books.items():
            if b.quantity:
                if s == EXTERNAL_STRATEGY:
                    external.append((a, c, b.quantity))
                else:
                    line = own.setdefault(a, {}).setdefault(s, {})
                    line[c] = line.get(c, 0) + b.quantity
        lines = {(a, s, c): q for a, by in own.items() for s, held in by.items() for c, q in held.items()}
        for a, c, q in external:
            by = own.get(a, {})
            left = absorb_external(by, c, q)
            for s, held in by.items():
                lines[(a, s, c)] = held.get(c, 0)
            lines[(a, EXTERNAL_STRATEGY, c)] = left
        return {key: q for key, q in sorted(lines.items()) if q}

    def strategy_positions(self, account: str, strategy: str) -> dict[str, int]:
        return {c: b.quantity for (a, s, c), b in self.books.items() if a == account and s == strategy and b.quantity}

    def accounts(self) -> set[str]:
        return {a for (a, _, _) in self.books}

    def net_pnl(self, account: str, marks: Mapping[str, Decimal], point_values: Mapping[str, Decimal]) -> Decimal:
        """Realized + unrealized - commissions of ``account`` over all its books (marks and point values by
        contract)."""
        total = Decimal(0)
        for (a, _, c), b in self.books.items():
            if a == account:
                total += b.net(marks.get(c), point_values.get(c, Decimal(0)))
        return total

    def rebased(self, marks: Mapping[str, Decimal]) -> "Ledger":
        """A new ledger holding the same positions at ``marks`` with no P&L: the opening book of a trading day.

        Daily P&L is then this ledger's net P&L: what closed today, plus open positions measured from where they
        stood when the day began (the day-start mark for carried positions, the fill price for new ones).
        """
        fresh = Ledger(seen_fills=set(self.seen_fills))
        for key, book in self.books.items():
            if book.quantity:
                mark = marks.get(key[2], book.avg_price)
                fresh.books[key] = Book(book.quantity, _dec(mark, "mark") * abs(book.quantity))
        return fresh

    def snapshot_rows(self) -> list[dict[str, object]]:
        """Rows for the journal's position snapshots and the admin API (money as strings)."""
        return [{"account": a, "strategy": s, "contract": c, "quantity": b.quantity,
                 "avg_price": format(b.avg_price.quantize(COST_QUANTUM).normalize(), "f"),
                 "realized_pnl": str(b.realized), "commissions": str(b.commissions)}
                for (a, s, c), b in self.items()]


def replay(fills: Iterable[Mapping[str, object]], point_value: Callable[[str], Decimal]) -> Ledger:
    """A ledger rebuilt from journaled fill rows (account, strategy, contract, side, quantity, price, commission)."""
    ledger = Ledger()
    for row in fills:
        contract = str(row["contract"])
        qty = int(row["quantity"])  # type: ignore[call-overload]
        signed = qty if str(row["side"]) == "buy" else -qty
        ledger.apply(fill_id=f"{row['broker']}:{row['fill_id']}", account=str(row["account"]),
                     strategy=str(row.get("strategy") or EXTERNAL_STRATEGY), contract=contract, signed_qty=signed,
                     price=Decimal(str(row["price"])), commission=Decimal(str(row.get("commission") or 0)),
                     point_value=point_value(contract))
    return ledger

