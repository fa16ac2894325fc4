"""Exits overtaken by a trade made by hand: one position closed twice, made good toward flat.

An exit is computed from the ledger: a strategy long 2 gets "sell 2". When the trader closes the same position by
hand at the broker while that exit is on its way, or a moment before it was computed with the fill report not in
yet, or while the service was down with the exit already handed to the broker, the broker fills both, and the
account ends short 2: a position nobody chose. The ledger books it faithfully (the trade by hand closes the
strategy's long, ``Ledger._book_manual``, and our exit then opens a short), reconciliation agrees with the broker,
and nothing says that the flatten the exit belonged to left its scope reversed (fuzz crash seeds 108 and 144).

What the exit did not know when it was decided is what trades by hand closed on its line after that. The ledger
counts, per line, the contracts trades by hand have closed there (``Ledger.hand_closed``); an exit notes the count
when its job is made (``Runtime._job``; only a non-zero count is kept, so the common case is one dict lookup).

- **While the exit is in flight**, a trade by hand booked on its account and contract that closed its line the
  exit's way is what the exit will close a second time, as far as it has not filled yet: a stand-in for that much,
  the other way, is held at once (``overtaken:<exit id>``, a flatten-kind hold: counted, never sent), so that the
  engine sees the line where the exit meant it. Without it a "short 1" decided meanwhile would see the line short
  already and buy, and a flatten would close the overshoot next to the follow-up.
- **Once the exit is final**, the stand-in goes and a follow-up exit (``<signal id>-follow-<n>``, a flatten of the
  line: journaled, retried when rejected, re-issued when missed, its body's ``covers`` naming
  ``overtaken:<exit id>``) closes what it closed twice: the contracts closed by hand since its decision, as far as
  it filled after the first of them, never more than the line stands beyond flat the exit's way (orders in flight
  and held counted: a signal decided meanwhile keeps what it opened), only ever toward flat. ``made_good`` keeps
  two checks of one exit from closing the same contracts twice.

The trade by hand may be booked after the exit's fill. Outside a come-up a broker's stream reports fills in its
own order, but a come-up books the exit found at the broker before the reconciliation pass reads the trader's
fill, made earlier (the ledger is then rebuilt in the broker's order, ``service.ledger.Arrivals``). So an exit
that settles while its broker is not open (connecting, recovering: the fills a broker reports as the link comes
back arrive before ``_on_up`` even begins), or that a trade by hand overtook in flight, stays under watch until the
end of the next reconciliation pass of its broker that began after it settled (that pass reads every fill of the
day and adopts what the broker shows beyond them), and each trade by hand booked on its account and contract
meanwhile checks it again. Other exits are not kept: memory stays flat however many exits a day sends. An exit
still in flight with fills booked when such a late trade by hand is booked takes what it had filled when the trade
was made, in the broker's order, not when it was booked (``_filled_when_overtaken``; fuzz crash seed 518).

The watch survives a crash. A non-zero basis is journaled with its exit (``Journal.note_with_exit``: an entry
``{"exit": "overtaken:<exit id>", "hand_basis": n}`` in its signal's body ``exit_watch``, written in the signal's
own transaction, or appended to a signal already written before the exit goes out); no entry means the basis was
zero, so the common case writes nothing. A start rebuilds, for the exits of the current trading day
(``_restore_overtaken``), what the live watch holds: the basis of the exits loaded in flight (not the count of the
ledger replayed at load, which includes the trades by hand made since the decision), the stand-in of those already
overtaken, and, for a final exit that no journaled follow-up covers (``covers``: ``overtaken:<exit id>``; the
process died before its commit), the follow-up it is owed, sized by the same ``overshoot`` from the replayed ledger
(what it filled after the first trade by hand that overtook it: ``filled_before_overtaken``), held from the start
and issued at its broker's come-up after reconciliation, never more than the broker holds
(``FlattenMixin._issue_owed_follow_ups``). A journaled follow-up is the end of it: a second restart issues nothing.
A final exit the journal does not show overtaken, settled after the last reconciliation pass of its account began,
goes back under the come-up watch (a crash may have cut the come-up it settled in short, before its pass read the
trader's fill made earlier): its broker's come-up pass ends it, as live.

No basis entry reads as zero, with two exceptions and one limit:

- a come-up's re-issue of a flatten (``redo_of``) is journaled before its exits' jobs are made, so its basis is
  appended in a later transaction and a crash in between loses it: for such an exit still ``new`` (never sent) the
  start takes the count of the ledger it replayed, so that the day's earlier trades by hand never read as
  overtaking it (one made between its decision and the crash, a window of one commit, goes unseen);
- an exit whose basis append failed (logged as an error) and that went out anyway reads as zero.
- The limit: a journal written before bases were journaled (by the code before this watch survived a crash, on the
  day of the upgrade) has no entry for any exit, and reads zero for all: an exit on a line that trades by hand had
  closed in part before it was decided reads as overtaken by them, and the start may make good, as far as the line
  stands beyond flat the exit's way, what was never closed twice. Taking the basis from the ledger replayed up to
  the exit's journal time was considered and not done: an order's ``created_at`` is the time its signal was
  journaled for, not the moment the decision read the ledger, and a fill is journaled before the ledger books it, so
  that replay can count a fill the decision did not see (basis too large: an overtaking missed) or miss one it did
  (too small: a false make-good), and the ledger may have booked the day in the broker's order, not the journal's.
  An operator restarting on an upgrade day should reconcile the lines traded by hand that day.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping

from engine.sessions import trading_day, trading_day_start
from service.dispatch import FINAL, Job, Tracked
from service.flatten import _Netted, _Owed
from service.journal import parse_utc
from service.ledger import ADOPTED, Key, Ledger, fill_entry
from service.restore import booked_of
from service.runtime_state import RuntimeState

log = logging.getLogger("service.runtime")

BASIS_PREFIX = "overtaken:"
"""What an exit's journaled basis entry (``exit``) and its follow-up's ``covers`` put before the exit's id: the key
of its stand-in, never an order's id (``service.exits``'s restore passes over such an entry)."""


def overshoot(closed: int, filled: int, filled_before: int, made_good: int, stands: int, sign: int
              ) -> tuple[int, int]:
    """What an exit of side ``sign`` closed a second time and is not made good yet, and what to close of it now:
    (over, size). ``closed``: what trades by hand closed on its line, its way, since its decision; ``filled`` in
    all, ``filled_before`` when the first of them was booked; ``stands``: where the line stands (book, orders in
    flight and held). Only what it filled after that trade closed twice; never more than the line stands beyond
    flat the exit's way. Pure: the live watch and a restart's owed follow-up size it alike."""
    over = min(closed, filled - filled_before) - made_good
    return over, (min(over, max(0, stands * sign)) if over > 0 else 0)


def filled_before_overtaken(rows: Iterable[Mapping[str, Any]], point_value: Callable[[str], Decimal], key: Key,
                            basis: int, sign: int, exit_id: str, at_broker: tuple[Any, Any]) -> int | None:
    """What the exit had filled when the trade by hand that overtook it was booked, from the journaled fills
    ``rows`` of its account and contract in the broker's order (as ``replay`` books them; the exit's fills name
    ``exit_id``, or only its (broker, broker order id), ``at_broker``): the live watch's ``filled_before`` for a
    restart, which has no memory of it. The last
    time the line's count moved past ``basis`` the exit's way, so that what trades by hand did before the decision
    (back to ``basis`` by then) does not count. None when the line does not end overtaken."""
    ledger = Ledger()
    filled, before = 0, None
    for row in rows:
        ledger.apply(**fill_entry(row, point_value))  # type: ignore[arg-type]
        ours = row.get("client_order_id")
        if row.get("kind") != ADOPTED and (ours == exit_id or (
                not ours and at_broker[1] is not None and (row.get("broker"), row.get("broker_order_id")) == at_broker)):
            filled += int(row["quantity"])
        if (ledger.hand_closed.get(key, 0) - basis) * sign > 0:
            before = filled if before is None else before
        else:
            before = None
    return before


@dataclass(eq=False)
class _Overtaken:
    """An exit that a trade by hand closed part of its position ahead of (in flight), or that filled (final)."""

    exit_id: str
    signal_id: str
    broker: str
    account: str
    strategy: str
    contract: str
    sign: int
    """The exit's side: +1 buy (closing a short), -1 sell."""
    quantity: int
    basis: int
    """``Ledger.hand_closed`` of its line when the exit was decided."""
    filled_before: int = 0
    """What the exit had filled when the first trade by hand after its decision was booked (0 when that was
    booked after the exit was final: reported late, made earlier): only what it filled after that is closed twice."""
    filled: int = 0
    """What it filled in all, once final."""
    final: bool = False
    made_good: int = 0
    """Contracts follow-ups have closed for it so far."""

    @property
    def standin(self) -> str:
        """The key of the hold standing for the overshoot while the exit is in flight (never a signal id)."""
        return BASIS_PREFIX + self.exit_id


class OvertakenMixin(RuntimeState):
    """The overtaken-exit part of ``Runtime`` (see the module docstring)."""

    _hand_basis: dict[str, int]
    """Exit client order id -> its line's ``Ledger.hand_closed`` at its decision, when that was not zero."""
    _overtaken: dict[tuple[str, str], list[_Overtaken]]
    """(account, contract) -> final exits there under watch (settled in a come-up, or overtaken in flight)."""
    _overtaking: dict[str, _Overtaken]
    """Exit client order id -> an exit in flight that a trade by hand has overtaken."""

    def _note_hand_basis(self, job: Job) -> None:
        """An exit's job is made: note what trades by hand had closed on its line by then, and journal it with the
        exit when it is not zero (a start loading the exits in flight journals nothing: ``_restore_overtaken``
        sets their basis from the journal)."""
        if job.intent == "exit" and job.client_order_id.startswith("mb-"):  # not a stand-in: those never settle
            closed = self.ledger.hand_closed.get((job.account, job.strategy, job.contract))
            if closed:
                self._hand_basis[job.client_order_id] = closed
                if self.running:
                    self.journal.note_with_exit(job.signal_id, job.client_order_id,
                                                {"exit": BASIS_PREFIX + job.client_order_id, "hand_basis": closed})

    def _forget_hand_basis(self, job: Job) -> None:
        """``job`` will never be sent (its hold was released: the signal was not journaled): no basis, in memory or
        parked for the signal's write."""
        if self._hand_basis.pop(job.client_order_id, None) is not None:
            self.journal.withdraw_exit_watch(job.signal_id, BASIS_PREFIX + job.client_order_id)

    def _closed_by_hand(self, watch: _Overtaken) -> int:
        """Contracts trades by hand have closed on the exit's line, the exit's way, since it was decided."""
        key = (watch.account, watch.strategy, watch.contract)
        return (self.ledger.hand_closed.get(key, 0) - watch.basis) * watch.sign

    def _overtaken_settled(self, tracked: Tracked) -> None:
        """An order settled (``OrderTracker.settled_hooks``): a filled exit goes under watch, and is checked once
        its exposure is off the books (``call_soon``: the hooks run before)."""
        job = tracked.job
        if job.intent != "exit":
            return
        basis = self._hand_basis.pop(job.client_order_id, 0)
        watch = self._overtaking.pop(job.client_order_id, None)
        if watch is None:
            slot = None if self.pool is None else self.pool.slots.get(job.broker)
            if not tracked.filled or slot is None or slot.available:
                return  # only a come-up books a trade by hand made before our fill after it (see the docstring)
            watch = _Overtaken(job.client_order_id, job.signal_id, job.broker, job.account, job.strategy,
                               job.contract, job.sign, job.quantity, basis)
        watch.final, watch.filled = True, tracked.filled
        self._overtaken.setdefault((job.account, job.contract), []).append(watch)
        asyncio.get_running_loop().call_soon(self._check_overtaken, watch)

    def _hand_trade_booked(self, account: str, contract: str) -> None:
        """A trade by hand was booked (or the ledger rebuilt) on ``account`` ``contract``: an exit in flight there
        that it overtook gets a stand-in for what it will close twice; a final one is checked again."""
        for tracked in self.tracker.unsettled():
            job = tracked.job
            if job.account != account or job.contract != contract or job.intent != "exit" \
                    or not job.client_order_id.startswith("mb-"):
                continue
            watch = self._overtaking.get(job.client_order_id)
            if watch is None:
                basis = self._hand_basis.get(job.client_order_id, 0)
                if (self.ledger.hand_closed.get((account, job.strategy, contract), 0) - basis) * job.sign <= 0:
                    continue  # not overtaken: nothing closed by hand its way since its decision
                watch = self._overtaking[job.client_order_id] = _Overtaken(
                    job.client_order_id, job.signal_id, job.broker, job.account, job.strategy, job.contract,
                    job.sign, job.quantity, basis, filled_before=self._filled_when_overtaken(tracked, basis))
            size = min(self._closed_by_hand(watch), watch.quantity - watch.filled_before)
            self.release(watch.standin)
            # Counted from now, so that the engine sees the line where the exit meant it (a signal decided while
            # the exit is in flight must not trade the overshoot), and a flatten counts it as an exit to come.
            self._hold_closing(watch.standin, account, job.strategy, contract, size * watch.sign)
        for watch in self._overtaken.get((account, contract), ()):
            self._check_overtaken(watch)

    def _filled_when_overtaken(self, tracked: Tracked, basis: int) -> int:
        """What the exit in flight ``tracked`` had filled when the trade by hand that overtakes it was made, in the
        broker's order: 0 when it has filled nothing yet (the common case: nothing to read), else from the
        journaled fills of its account and contract that the ledger has booked, as ``replay`` orders them
        (``filled_before_overtaken``). Not simply its fills booked so far: a trade by hand reported after some of
        them (a come-up books the fills of our exits in flight before reconciliation reads the trader's, made
        earlier; the ledger is then rebuilt in the broker's order) was made before them, and they closed what it
        had closed already (fuzz crash seed 518: a flatten's retry sold 5, all booked before the trader's sell 2
        made while it worked, and the line stayed short 2 with nothing owed)."""
        job = tracked.job
        if not tracked.filled:
            return 0
        before = filled_before_overtaken(self._booked_rows(job.account, job.contract), self._point_value,
                                         (job.account, job.strategy, job.contract), basis, job.sign,
                                         job.client_order_id, (job.broker, tracked.broker_order_id))
        return tracked.filled if before is None else before

    def _check_overtaken(self, watch: _Overtaken) -> None:
        """The exit is final: make good what it closed a second time (see the module docstring)."""
        self.release(watch.standin)
        closed = self._closed_by_hand(watch)
        stands = self._line_stands(watch.account, watch.strategy, watch.contract)
        over, size = overshoot(closed, watch.filled, watch.filled_before, watch.made_good, stands, watch.sign)
        if over <= 0:
            return
        what = (f"a trade by hand closed {closed} of the position that the exit {watch.exit_id} "
                f"({'buy' if watch.sign > 0 else 'sell'}, {watch.filled} of {watch.quantity} filled) closed too")
        if size <= 0:
            log.info("%s: %s %s (%s): %s; nothing to make good (line at %+d)", watch.signal_id, watch.account,
                     watch.contract, watch.strategy, what, stands)
            return
        watch.made_good += size
        line = _Netted(watch.signal_id, watch.account, watch.strategy, watch.contract, counted=())
        self._follow_up(line, size * watch.sign, what, covers=watch.standin)

    def _overtaken_window(self, broker: str) -> list[_Overtaken]:
        """A reconciliation pass of ``broker`` begins: the watches it ends (``_overtaken_window_ends``)."""
        return [w for watches in self._overtaken.values() for w in watches if w.broker == broker]

    def _overtaken_window_ends(self, ending: list[_Overtaken]) -> None:
        """The pass read every fill of the day: the exits final before it began are not overtaken any more."""
        for watch in ending:
            key = (watch.account, watch.contract)
            watches = self._overtaken.get(key, [])
            if watch in watches:
                watches.remove(watch)
            if not watches:
                self._overtaken.pop(key, None)

    # -- restoring at start ------------------------------------------------------------------------------------
    def _restore_overtaken(self, booked: dict[Any, int]) -> None:
        """Rebuild the overtaken watch of this trading day's exits from the journal (see the module docstring). Run
        after ``_load_open_orders`` (``booked``: its fills by client order id) and the other restores (the
        follow-up counters, the holds they owe), before any broker comes up.

        An exit loaded in flight takes its journaled basis (none: zero); one already overtaken gets its stand-in
        (``_hand_trade_booked``), and its settling in recovery or later issues its follow-up as live. A final one
        overtaken that no journaled follow-up covers is owed the follow-up the live watch would have issued
        (``overshoot``), held from now and issued at its broker's come-up (``_issue_owed_follow_ups``)."""
        assert self._started_at is not None, "start() sets it first"
        since = trading_day_start(self._started_at)
        reconciled: dict[str, str] | None = None
        bases: dict[str, int] = {}
        for entry in self.journal.exit_watch_entries_since(since, "hand_basis"):
            bases.setdefault(str(entry.get("exit")), int(entry["hand_basis"]))  # the first: noted at the decision
        covered = self.journal.covered_since(since)
        unsettled = {t.job.client_order_id: t for t in self.tracker.unsettled()}
        fills: dict[tuple[str, str], list[dict[str, Any]]] = {}
        lines: set[tuple[str, str]] = set()
        for row in self.journal.exits_since(since):
            coid, account, contract = str(row["client_order_id"]), str(row["account"]), str(row["contract"])
            basis = bases.get(BASIS_PREFIX + coid, 0)
            tracked = unsettled.get(coid)
            if tracked is not None:  # not the ledger's count at load: trades by hand since the decision are in it
                if basis:
                    self._hand_basis[coid] = basis
                elif row.get("reissued") and row["status"] == "new":
                    # A come-up's re-issue: its basis is appended after its signal's commit, and the process may
                    # have died in between. No entry is then no answer: the count at load (``_load_open_orders``
                    # noted it) reads every trade by hand before the crash as made before the decision, so one made
                    # in that window goes unseen, but the day's earlier ones never read as overtaking it.
                    basis = self._hand_basis.get(coid, 0)
                else:
                    self._hand_basis.pop(coid, None)
            if BASIS_PREFIX + coid in covered:
                continue  # its follow-up is journaled: done, whatever became of it
            strategy = tracked.job.strategy if tracked is not None else str(row.get("line_strategy") or "")
            sign = 1 if row["side"] == "buy" else -1
            key = (account, strategy, contract)
            closed = (self.ledger.hand_closed.get(key, 0) - basis) * sign
            if closed <= 0:
                if tracked is None and row["status"] in FINAL and booked_of(booked, row) > 0:
                    if reconciled is None:
                        reconciled = self.journal.reconciled_since(since)
                    if reconciled.get(account, "") <= str(row["updated_at"]):
                        # Settled after the last pass of its account began (in a come-up the crash cut short, it
                        # may be): a trade by hand made before it and reported late is still to be read, by its
                        # broker's come-up pass, as it would have been live (``_overtaken_settled``).
                        self._overtaken.setdefault((account, contract), []).append(_Overtaken(
                            coid, str(row["signal_id"]), str(row["broker"]), account, strategy, contract, sign,
                            int(row["quantity"]), basis, filled=booked_of(booked, row), final=True))
                continue
            if (account, contract) not in fills:
                fills[(account, contract)] = [f for f in self.journal.fills(account=account)
                                              if f["contract"] == contract]
            before = filled_before_overtaken(fills[(account, contract)], self._point_value, key, basis, sign, coid,
                                             (row.get("broker"), row.get("broker_order_id")))
            if before is None:
                continue
            if tracked is not None:
                self._overtaking[coid] = _Overtaken(coid, str(row["signal_id"]), tracked.job.broker, account, strategy,
                                                    contract, sign, int(row["quantity"]), basis, filled_before=before)
                lines.add((account, contract))
            elif row["status"] in FINAL:
                self._owe_overtaken(row, strategy, sign, closed, basis, before, booked)
        for account, contract in sorted(lines):
            self._hand_trade_booked(account, contract)  # their stand-ins, as live

    def _owe_overtaken(self, row: dict[str, Any], strategy: str, sign: int, closed: int, basis: int, before: int,
                       booked: dict[Any, int]) -> None:
        """A start found the final exit ``row`` overtaken and its follow-up lost with the process: owe it, sized
        as ``_check_overtaken`` sizes it, held from now (``_hold_owed``) and issued at its broker's come-up after
        reconciliation, capped to what the broker holds (``_issue_owed_follow_ups``)."""
        coid, account, contract = str(row["client_order_id"]), str(row["account"]), str(row["contract"])
        filled = booked_of(booked, row)
        stands = self._line_stands(account, strategy, contract)
        over, size = overshoot(closed, filled, before, 0, stands, sign)
        if over <= 0:
            return
        what = (f"a trade by hand closed {closed} of the position that the exit {coid} "
                f"({row['side']}, {filled} of {row['quantity']} filled) closed too, and its follow-up was lost in "
                "a restart")
        if size <= 0:
            log.info("%s: %s %s (%s): %s; nothing to make good (line at %+d)", row["signal_id"], account, contract,
                     strategy, what, stands)
            return
        log.warning("%s: %s %s (%s) is owed a follow-up closing %+d: %s; issued when %s comes up", row["signal_id"],
                    account, contract, strategy, size * sign, what, row["broker"])
        day: date = trading_day(parse_utc(str(row["created_at"])))
        owed = _Owed(_Netted(str(row["signal_id"]), account, strategy, contract, counted=()), BASIS_PREFIX + coid,
                     size * sign, what, day)
        self._owed_follow_ups.setdefault(str(row["broker"]), []).append(owed)
        self._hold_owed(owed)  # the engine sees the line where the exit meant it until the come-up issues it
