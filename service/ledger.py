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
from datetime import datetime, timedelta
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


ADOPTED = "adopted"
"""The ``kind`` of a journaled fills row that is a position change reconciliation adopted from the broker."""


def is_manual(row: Mapping[str, object]) -> bool:
    """Is a journaled fills row a trade made by hand at the broker? An adopted position change, or a fill booked to
    no strategy that is not of an order of ours (our client order ids start ``mb-``; an account-wide flatten's exit
    of what belongs to nobody is ours, booked to nobody)."""
    if row.get("kind") == ADOPTED:
        return True
    return (row.get("strategy") or EXTERNAL_STRATEGY) == EXTERNAL_STRATEGY \
        and not str(row.get("client_order_id") or "").startswith("mb-")


def fill_entry(row: Mapping[str, object], point_value: Callable[[str], Decimal]) -> dict[str, object]:
    """``Ledger.apply``'s arguments for a journaled fills row (a fill, or an adoption: ``Journal.record_adoption``).
    An adoption booked with no mark known moves the position at no price and realizes nothing (point value 0), as
    it did live."""
    contract = str(row["contract"])
    qty = int(row["quantity"])  # type: ignore[call-overload]
    price = row.get("price")
    priced = price not in (None, "")
    return {"fill_id": f"{row['broker']}:{row['fill_id']}", "account": str(row["account"]),
            "strategy": str(row.get("strategy") or EXTERNAL_STRATEGY), "contract": contract,
            "signed_qty": qty if str(row["side"]) == "buy" else -qty,
            "price": Decimal(str(price)) if priced else Decimal(0),
            "commission": Decimal(str(row.get("commission") or 0)),
            "point_value": point_value(contract) if priced else Decimal(0), "manual": is_manual(row)}


@dataclass
class Ledger:
    """Books by (account, strategy, contract) plus the fill ids already applied."""

    books: dict[Key, Book] = field(default_factory=dict)
    seen_fills: set[str] = field(default_factory=set)
    hand_closed: dict[Key, int] = field(default_factory=dict)
    """Per line, the signed contracts trades made by hand have closed there so far (a buy closing a short: > 0).
    An exit decided before such a trade, and filled after it, closed the same position a second time: the runtime
    compares this count at the exit's decision and after its fills (``service.overtaken``). Rebuilt by ``replay``
    in the broker's order, like the books."""

    def apply(self, *, fill_id: str, account: str, strategy: str, contract: str, signed_qty: int,
              price: Decimal, commission: Decimal, point_value: Decimal, manual: bool = False) -> bool:
        """Book one fill; False (and no change) when ``fill_id`` was applied before. ``manual``: a trade made by
        hand at the broker (a fill we did not order), booked where it lands (``_book_manual``), not to
        ``strategy``."""
        if fill_id in self.seen_fills:
            return False
        if type(price) is not Decimal:
            price = _dec(price, "fill price")
        if type(commission) is not Decimal:
            commission = _dec(commission, "commission")
        if type(point_value) is not Decimal:
            point_value = _dec(point_value, "point value")
        self.seen_fills.add(fill_id)
        if manual:
            self._book_manual(account, contract, signed_qty, price, commission, point_value)
            return True
        key = (account, strategy, contract)
        book = self.books.get(key)
        self.books[key] = (_EMPTY if book is None else book).fill(signed_qty, price, commission, point_value)
        return True

    def _book_manual(self, account: str, contract: str, qty: int, price: Decimal, commission: Decimal,
                     point_value: Decimal) -> None:
        """Book a trade made by hand (``qty`` of ``contract``, buy > 0) where it lands, once, when it is made.

        First it closes what earlier trades by hand opened (the bucket of no strategy, on the other side); then it
        closes the strategies' positions on the other side, by name: a trader closing a strategy's position at the
        broker closed it, at this price, so that the strategy's next exit, target or flatten does not trade a
        position that is gone (it would open the other side). What is left opens a position of no strategy: a
        strategy's later trades never net it, and none of its exits closes it. Settled here rather than at every
        read: netted at read time, a strategy that re-opened after a manual close had its new position eaten by
        the old close (its exit then sent nothing and the account stayed open). The commission is the trader's
        (the bucket of no strategy)."""
        left = qty
        external = (account, EXTERNAL_STRATEGY, contract)
        keys = [external] + sorted(k for k in self.books
                                   if k[0] == account and k[2] == contract and k[1] != EXTERNAL_STRATEGY)
        for key in keys:
            if left == 0:
                break
            book = self.books.get(key)
            held = book.quantity if book is not None else 0
            if held == 0 or (held > 0) == (left > 0):
                continue
            take = min(abs(held), abs(left)) * (1 if left > 0 else -1)
            self.books[key] = book.fill(take, price, Decimal(0), point_value)  # type: ignore[union-attr]
            self.hand_closed[key] = self.hand_closed.get(key, 0) + take
            left -= take
        book = self.books.get(external)
        if left or commission or book is not None:
            self.books[external] = (_EMPTY if book is None else book).fill(left, price, commission, point_value)

    def rebuild(self, account: str, contract: str, rows: Iterable[Mapping[str, object]],
                point_value: Callable[[str], Decimal]) -> None:
        """Book ``account``'s ``contract`` lines again from journaled fills rows (``rows``: that account and
        contract's, in the broker's order), as ``replay`` would, leaving every other line as it is: a trade by hand
        only ever nets the lines of its own account and contract, so theirs are all a late fill can change."""
        for key in [k for k in self.books if k[0] == account and k[2] == contract]:
            del self.books[key]
        for key in [k for k in self.hand_closed if k[0] == account and k[2] == contract]:
            del self.hand_closed[key]
        part = replay(rows, point_value)
        self.books.update(part.books)
        self.hand_closed.update(part.hand_closed)
        self.seen_fills |= part.seen_fills

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
        """Non-zero positions by (account, strategy, contract): what each strategy holds at the broker (a trade
        made by hand is booked where it lands when it is made: ``_book_manual``), and what belongs to no
        strategy."""
        return {key: b.quantity for key, b in sorted(self.books.items()) if b.quantity}

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


@dataclass
class Arrivals:
    """By (account, contract), the broker's time of the latest fill booked, and of the latest trade made by hand
    booked (an adoption: when it was adopted). A trade by hand is netted against what the strategies held when it
    was made (``Ledger._book_manual``), so the ledger books in the broker's order; a fill reported out of that order
    across a trade by hand (a come-up books our in-flight orders' fills before reconciliation finds the trader's,
    made before them) is ``late``: the runtime then rebuilds the ledger from the journal, in the broker's order, as
    a restart would (``replay`` of ``Journal.fills``)."""

    last: dict[tuple[str, str], datetime] = field(default_factory=dict)
    last_manual: dict[tuple[str, str], datetime] = field(default_factory=dict)

    def late(self, account: str, contract: str, at: datetime, manual: bool) -> bool:
        before = (self.last if manual else self.last_manual).get((account, contract))
        return before is not None and at < before

    def placed(self, account: str, contract: str, found: datetime) -> datetime:
        """The time to book a position change reconciliation adopted at (``Journal.record_adoption``): ``found``
        (its pass), or just after the latest entry booked at ``account``'s ``contract`` when that is later (a fill
        the pass itself read, one booked while it awaited the broker, one a broker stamped ahead of our clock).

        The adoption is the broker's position less the ledger's, so it is netted against the strategies as they
        stand when it is booked: after every one of those entries. Stamped earlier, it is ``late`` across them and
        the live ledger is rebuilt with it before them (a restart's replay too, in time order): netted against
        other positions, a strategy's share ends booked to nobody, or nobody's to a strategy (crash fuzz seed
        313)."""
        before = self.last.get((account, contract))
        return found if before is None or before < found else before + timedelta(microseconds=1)

    def note(self, account: str, contract: str, at: datetime, manual: bool) -> None:
        key = (account, contract)
        for seen, counts in ((self.last, True), (self.last_manual, manual)):
            if counts and (key not in seen or seen[key] < at):
                seen[key] = at


def booking_order(rows: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """Journaled fills rows (``rows``: in time order, ``Journal.fills``) with each adoption moved after every row of
    its account and contract journaled before it (``recorded_at``), where the live ledger booked it; every other
    row keeps its place (a fill reported out of the broker's order stays in the broker's order).

    An adoption is the broker's position less the ledger's when it was booked, so only there does it net what the
    strategies held then. ``Arrivals.placed`` stamps it after them; a journal written before that holds adoptions
    stamped with the start of their reconciliation pass, earlier than fills that pass booked before them, and the
    time order alone would book them before those fills (a strategy's share to nobody: crash fuzz seed 313).
    Rows without ``recorded_at`` (not the journal's) are taken as given."""
    out = list(rows)
    if not any(row.get("kind") == ADOPTED for row in out) or not all(row.get("recorded_at") for row in out):
        return out
    placed: list[Mapping[str, object]] = []  # adoptions already placed, journaled no later than the next
    for adoption in sorted((r for r in out if r.get("kind") == ADOPTED), key=lambda r: str(r["recorded_at"])):
        key, journaled = (adoption["account"], adoption["contract"]), str(adoption["recorded_at"])
        here = next(i for i, r in enumerate(out) if r is adoption)
        # After the rows journaled before it (one journaled at the same instant is not), and after the adoptions
        # placed before it, so that two of one instant keep their order.
        after = max((i for i, r in enumerate(out) if (r["account"], r["contract"]) == key and (
            str(r["recorded_at"]) < journaled or any(r is p for p in placed))), default=-1)
        if after > here:
            out.insert(after, out.pop(here))  # popped from before it: lands just after that row
        placed.append(adoption)
    return out


def replay(fills: Iterable[Mapping[str, object]], point_value: Callable[[str], Decimal]) -> Ledger:
    """A ledger rebuilt from journaled fills rows (account, strategy, contract, side, quantity, price, commission;
    adoptions among them), booked in the order given, as the live ledger booked them (an adoption after every row
    of its account and contract journaled before it: ``booking_order``)."""
    ledger = Ledger()
    for row in booking_order(fills):
        ledger.apply(**fill_entry(row, point_value))  # type: ignore[arg-type]
    return ledger
