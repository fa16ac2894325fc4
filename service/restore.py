"""Restoring the runtime's state at start, from the journal alone.

A restart must be invisible to the rules: the orders still open are tracked again (and recover when their broker
comes up), today's halts and the limits that already flattened stay in force, and the risk monitor's day book is
rebuilt as it would be had the process never stopped, so that no loss limit allows a day's loss a second time.
The ledger itself is a replay of the journal's fills (``service.ledger.replay``, called by ``Runtime.start``)."""

from __future__ import annotations

import logging
import re
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from engine.sessions import session, trading_day, trading_day_start
from service.dispatch import FINAL, IN_FLIGHT
from service.flatten import FLATTEN_FAILED, _flatten_scope, _Netted, _Owed, _settle_covered, _settle_redone, _Withheld
from service.flatten import _withheld_of
from service.journal import parse_utc
from service.ledger import ADOPTED, EXTERNAL_STRATEGY, fill_entry, replay
from service.risk import FLATTEN_AND_HALT, PORTFOLIO, halt_key
from service.runtime_state import RuntimeState, _Reservation

log = logging.getLogger("service.runtime")
"""The runtime's one logger, whichever of its modules logs (operators filter and read it by that name)."""

DAY_START = "day_start"
"""Risk event kind: the marks a trading day's book was opened at (``Runtime._open_day_book``)."""


def booked_of(booked: dict[Any, int], order: dict[str, Any]) -> int:
    """Contracts of journaled ``order`` in the ledger at a start (``booked``: by client order id, and by (broker,
    broker order id) for the fills a broker reported without the client order id)."""
    return booked.get(order["client_order_id"], 0) + booked.get((order.get("broker"), order.get("broker_order_id")), 0)


class RestoreMixin(RuntimeState):
    """The start-up restore part of ``Runtime`` (see the module docstring)."""

    # -- restoring state at start ------------------------------------------------------------------------------
    def _load_open_orders(self, booked: dict[Any, int]) -> None:
        """Every order not final in the journal becomes tracked again (in flight ones recover when their broker
        comes up); their strategies (the order's own, for a flatten's exits, else its signal's) attribute the fills
        still to come. ``booked``: contracts per client order id already in the ledger (replayed from the
        journal's fills)."""
        strategies: dict[str, str] = {}
        assert self._started_at is not None, "start() sets it first"
        rows = self.journal.orders(status=["new", "sending", "unknown", "acknowledged", "partially_filled"])
        # A broker's "filled" can be journaled before its fill report (they arrive as separate events): a crash in
        # between leaves a filled order whose fill is not in the ledger. Tracked again, the fill still to come (an
        # event, or reconciliation's fills_since) is booked to it instead of waiting forever as not ours yet.
        rows += [row for row in self.journal.orders(status=["filled"],
                                                    updated_since=self._started_at - timedelta(days=7))
                 if booked_of(booked, row) < int(row["quantity"])]
        for row in rows:
            sid = row["signal_id"]
            if sid not in strategies:
                signal = self.journal.get_signal(sid) or {}
                strategies[sid] = signal.get("strategy") or (signal.get("decision") or {}).get("strategy") or \
                    EXTERNAL_STRATEGY
            job = self._job(row, row.get("strategy") or strategies[sid], sid)  # a flatten's exit: its own
            if job is None:
                continue
            self.tracker.track(job, row["status"], row.get("broker_order_id"), filled=booked_of(booked, row))
            if job.margin_usd > 0 and row["status"] not in FINAL:
                self._add_reservation(job.client_order_id, _Reservation(job.account, job.margin_usd))
            if row["status"] in IN_FLIGHT:
                self._recovering_at_start.add(job.client_order_id)

    def _restore_watches(self, booked: dict[Any, int]) -> None:
        """Rebuild the watch of this trading day's flattens over the orders they counted on (``service.flatten``:
        ``_Netted``), from the journal: each flatten journaled its lines (``watch``) and each follow-up the order
        it covers (``covers``). A counted order tracked again and not settled is watched again: its settling
        (during recovery, or later) issues its follow-up as it would have. One final with quantity unfilled that no
        journaled follow-up covers is owed one (the process died between its settling and its follow-up's
        commit): issued at its broker's come-up (``_issue_owed_follow_ups``). Covered: done, whatever became of
        the follow-up (its retry or redo is owed through its own rows). Each order once, however many flattens
        counted on it, as ``_netted_settled`` does. Run after ``_load_open_orders`` (``booked``: its fills by
        client order id), before any broker comes up.

        An earlier trading day's flatten is not followed up after a restart, as its missed exits are not redone:
        that day is over, and reconciliation shows what is held."""
        assert self._started_at is not None, "start() sets it first"
        rows = self.journal.flatten_watches_since(trading_day_start(self._started_at))
        covered: set[str] = set()
        watches: list[tuple[str, date, list[dict[str, Any]]]] = []
        for row in rows:
            body = row["signal"]
            origin = body.get("follow_of")
            if origin:
                if body.get("covers"):
                    covered.add(str(body["covers"]))
                found = re.fullmatch(re.escape(str(origin)) + r"-follow-(\d+)", str(row["id"]))
                if found:  # ids never repeat: the next one follows the highest journaled
                    self._follow_ups[origin] = max(self._follow_ups.get(origin, 0), int(found.group(1)))
            if body.get("watch"):
                watches.append((str(row["id"]), trading_day(parse_utc(str(row["received_at"]))), body["watch"]))
        unsettled = {t.job.client_order_id for t in self.tracker.unsettled()}
        done = set(covered)
        for fid, day, watch in watches:
            for item in watch:
                line = _Netted(fid, str(item["account"]), str(item["strategy"]), str(item["contract"]),
                               counted=tuple(str(c) for c in item["counted"]))
                for coid in line.counted:
                    if coid in done:
                        continue
                    if coid in unsettled:
                        self._netted.setdefault(coid, []).append(line)
                        continue
                    done.add(coid)
                    order = self.journal.get_order(coid)
                    if order is None or order["status"] not in FINAL:
                        continue
                    unfilled = int(order["quantity"]) - booked_of(booked, order)
                    if unfilled <= 0:
                        continue
                    left = -unfilled if order["side"] == "buy" else unfilled
                    what = (f"{order['side']} {order['quantity']} ({order['signal_id']}) ended {order['status']} "
                            f"with {unfilled} unfilled, and its follow-up was lost in a restart")
                    log.warning("flatten %s: %s %s (%s) is owed a follow-up closing %+d: %s; issued when %s comes "
                                "up", fid, line.account, line.contract, line.strategy, left, what, order["broker"])
                    owed = _Owed(line, coid, left, what, day)
                    self._owed_follow_ups.setdefault(str(order["broker"]), []).append(owed)
                    self._hold_owed(owed)  # the engine sees the line flat until the come-up issues it

    def _restore_withheld(self) -> dict[tuple[str, str], _Withheld]:
        """What the current trading day's flattens withheld where an account's ledger and its broker disagreed, and
        still owe (``service.flatten._Withheld``), by (flatten id, account): the journal's flattens of the day
        replayed in the order they were written. An original adds what its body says it withheld
        (``withheld``) after ending what older ones owed on the lines its scope covers (``_settle_covered``); a
        re-issue ends what it redid (``_settle_redone``): so a withheld flatten redone before a restart is not
        redone after it, nor after a second one. Read once, at the process's first need
        (``FlattenMixin._withheld_debts``); an earlier day's is not owed (its redo would act on a day that is
        over, as a missed flatten's)."""
        now = self.clock()
        debts: dict[tuple[str, str], _Withheld] = {}
        rows = self.journal.flattens_between(trading_day_start(now) - timedelta(microseconds=1),
                                             now + timedelta(days=1))
        for row in reversed(rows):  # oldest first
            scope = _flatten_scope(row)
            if scope is None or scope.retry_of is not None or scope.follow_of is not None:
                continue
            if scope.redo_of is not None:
                _settle_redone(debts, scope.redo_of, row["signal"])
                continue
            _settle_covered(debts, scope)
            for debt in _withheld_of(str(row["id"]), row["signal"], scope,
                                     trading_day(parse_utc(str(row["received_at"])))):
                debts[(debt.origin, debt.account)] = debt
        for debt in debts.values():
            log.warning("flatten %s withheld its exits at %s (%s) in %s where the ledger and the broker disagreed; "
                        "carried out when a reconciliation pass finds them agreeing", debt.origin, debt.account,
                        debt.broker, ", ".join(sorted(debt.contracts)))
        return debts

    def _restore_halts(self, events: list[dict[str, Any]]) -> None:
        """Halts of today survive a restart (they lift at the next trading day or by an operator), and so does
        which ``flatten_and_halt`` limits already flattened their scope today (``RiskMonitor.fired``), so that a
        restart neither flattens a scope twice nor forgets that a softer limit's halt must not stop a harder one.

        A halt restricted to roots comes back with its roots (the event row's JSON ``instruments``) under the same
        key (``key``; rows written before roots existed have neither and mean the bare name). A halt event
        flattened when it says so (``flattened``; rows written before that field: when its action was
        ``flatten_and_halt``); a later ``rearm`` event of the same limit and key undoes it. A ``flatten_failed``
        event halts its account like a ``halt`` event."""
        now = self.clock()
        today = trading_day(now).isoformat()
        cleared: set[str] = set()
        decided: set[tuple[str, str]] = set()
        for row in events:  # newest first
            name, kind = row.get("name"), row.get("kind")
            roots = row.get("instruments") or None
            key = str(row.get("key") or halt_key(str(name), roots))
            source, limit = str(row.get("source") or ""), row.get("limit")
            mine = str(row.get("day")) == today and bool(limit) and source == f"risk:{limit}"
            pair = (str(limit), key)
            if mine and kind == "rearm" and pair not in decided:
                decided.add(pair)
            elif mine and kind == "halt" and row.get("flattened", row.get("action") == FLATTEN_AND_HALT):
                self.risk.fire_count[pair] = self.risk.fire_count.get(pair, 0) + 1
                if pair not in decided:
                    decided.add(pair)
                    self.risk.fired.add(pair)
            if kind == "clear":
                cleared.add(key)
            elif kind in ("halt", FLATTEN_FAILED) and key not in cleared and key not in self.risk.halts \
                    and row.get("day"):
                if str(row["day"]) == today:
                    self.risk.halt(str(name), str(row.get("reason")), str(row.get("source")), now,
                                   instruments=roots)

    async def _open_day_book(self, fills: list[dict[str, Any]], now: datetime,
                             events: list[dict[str, Any]]) -> None:
        """Rebuild the risk monitor's day book as it would be had the process never stopped: the positions held
        when this trading day began, valued at the marks of that moment, then every fill of the day (realized P&L
        and commissions). Rebasing on the positions and marks of *now* instead would forget every loss taken
        earlier in the day, and a loss limit would allow it a second time.

        The day-start mark of a carried contract is the first of:

        - the one journaled when this day's book was opened (``day_start`` risk event): what the process that was
          running at 18:00 ET used;
        - the 17:00 ET daily mark of the previous session (``service.marks``), when the service was down at 18:00:
          the last price taken before the day began, and the market is closed in between, so it is the day's
          opening value but for a rare settlement adjustment;
        - the earliest fill price of the day in that contract: the price nearest to the day start we know;
        - the current mark, logged as a warning: the position's P&L between the day start and now is then lost
          (the service was down at 17:00 and at 18:00, and nothing in that contract filled since).

        The marks used are journaled as the day's (when none were), so that a later restart finds the same ones.
        """
        today = trading_day(now)
        before: list[dict[str, Any]] = []
        during: list[dict[str, Any]] = []
        for fill in fills:
            (before if trading_day(self._fill_time(fill)) < today else during).append(fill)
        opening = replay(before, self._point_value)
        held = sorted({key[2] for key, book in opening.books.items() if book.quantity})
        journaled = self._journaled_day_marks(today, events)
        marks: dict[str, Decimal] = {}
        basis: dict[str, str] = {}
        daily: dict[str, Decimal] | None = None
        for contract in held:
            if journaled is not None and contract in journaled:
                marks[contract], basis[contract] = journaled[contract], "journaled day start"
                continue
            if daily is None:
                daily = self._previous_daily_marks(today)
            first = next((f for f in during if f.get("contract") == contract and f.get("price") not in (None, "")),
                         None)
            current = self._mark(contract)
            if contract in daily:
                marks[contract], basis[contract] = daily[contract], "17:00 ET daily mark"
            elif first is not None:
                marks[contract], basis[contract] = Decimal(str(first["price"])), "earliest fill of the day"
            elif current is not None:
                marks[contract], basis[contract] = current, "current mark"
            else:
                basis[contract] = "average price (no mark known)"
            level = logging.INFO if contract in daily else logging.WARNING
            log.log(level, "risk: day-start mark of %s for %s: %s (%s)%s", contract, today,
                    marks.get(contract, "-"), basis[contract],
                    "; its P&L since the day began is not counted" if basis[contract].startswith(("current",
                                                                                                  "average")) else "")
        self.risk.open_day(today, opening, marks)
        for fill in during:
            if fill.get("kind") == ADOPTED and fill.get("price") in (None, ""):
                continue  # adopted with no mark known: the day book did not follow it live either (``book_entry``)
            entry = fill_entry(fill, self._point_value)
            del entry["point_value"]  # the day book's own
            self.risk.apply_fill(**entry, at=self._fill_time(fill))  # type: ignore[arg-type]
        if journaled is not None and set(held) <= set(journaled):
            self._day_start_journaled = today
        else:
            await self._journal_day_start(basis)

    @staticmethod
    def _fill_time(fill: dict[str, Any]) -> datetime:
        return parse_utc(str(fill.get("at") or fill.get("recorded_at")))

    @staticmethod
    def _journaled_day_marks(day: date, events: list[dict[str, Any]]) -> dict[str, Decimal] | None:
        """The day-start marks journaled for ``day`` (the newest ``day_start`` of ``events``), or None."""
        for row in events:  # newest first
            if row.get("kind") == DAY_START and str(row.get("day")) == day.isoformat():
                found = {}
                for contract, price in (row.get("marks") or {}).items():
                    try:
                        found[str(contract)] = Decimal(str(price))
                    except ArithmeticError:
                        log.warning("risk: journaled day-start mark %r of %s for %s unreadable", price, contract, day)
                return found
        return None

    def _previous_daily_marks(self, day: date) -> dict[str, Decimal]:
        """Contract prices of the 17:00 ET daily mark of the last session before trading day ``day`` began (a
        mark of an older session is stale: the prices moved in the sessions the service missed)."""
        previous = next((d for d in (day - timedelta(days=n) for n in range(1, 11)) if session(d) is not None),
                        None)
        if previous is None:
            return {}
        found: dict[str, Decimal] = {}
        for row in self.journal.daily_marks(since=previous):
            if row.get("trading_day") == previous.isoformat():
                for contract, price in (row.get("marks") or {}).items():
                    try:
                        found.setdefault(str(contract), Decimal(str(price)))
                    except ArithmeticError:
                        log.warning("risk: daily mark %r of %s on %s unreadable", price, contract, previous)
        return found

    async def _journal_day_start(self, basis: dict[str, str]) -> None:
        """Journal the marks the current day book was opened at, for a restart later in the day."""
        day = self.risk.day
        if day is None:
            return
        await self._risk_event(PORTFOLIO, DAY_START, f"trading day {day.isoformat()} began: positions carried in "
                               "are valued at these marks", "risk", self.clock(), day=day.isoformat(),
                               marks={c: str(m) for c, m in sorted(self.risk.day_marks.items())}, basis=basis)
        self._day_start_journaled = day
