"""Exits that counted on orders still in flight: made good when one of those orders does not fill.

The engine decides from each strategy's position with its orders in flight counted as if they will fill (so that
two signals a few milliseconds apart never close the same position twice). A signal's exit then closes what the
line will hold once they fill. When one of them does not fill after all (the broker rejects an entry, it is
``missed`` at a broker that went away, it fills in part), the exit closed too much or too little: "long 2" whose
entry is rejected, then "short 1" a moment later, sells 2 to close the long and 1 to open the short, and the
account ends short 3. TradingView sends an alert per order of a bar, so an exit and the next entry arrive together,
and prop firms reject entries for margin routinely: this happens.

Flattens have their own watch for this (``service.flatten._Netted``). A signal's exit is watched here: each order
in flight on the line (same account, strategy and contract) when the exit was decided is *counted*. When a counted
order settles with quantity unfilled, the line is off by that much. A stand-in, held at once in that same step,
keeps the engine's view where the exit meant it to be (``_Hold`` of flatten kind: counted, never sent, never
superseded), so that no signal decided meanwhile closes the difference a second time. Once the exit itself is final,
the difference is made good by a follow-up exit (``<signal id>-follow-<n>``, a flatten of the line: journaled,
retried when rejected, re-issued when missed), as far as it brings the line toward flat and never further from it:
an exit the broker rejected closed nothing, and nothing is made good for it; an entry is never re-sent.

One counted order is made good once, for the first exit that counted on it (a later exit on the same line saw the
first one's exit too, which already closed for it); a flatten of the line takes it over before it computes (its
own watch makes good what it counted).

The watch survives a crash, as the flatten's does (reconciliation would not tell: the ledger and the broker agree on
the overshoot). It is journaled with its signal, in the signal's own transaction (``Journal.watch_exit``: the body's
``exit_watch``, per watched exit its client order id, line, counted orders and ``assumed``), and each make-good
follow-up names what it covers (``covers``): the exit when no order it counted on is left to settle, else the exit
and the counted orders it makes good (``covers_of``), so that one exit made good twice (a counted order settling
short after the first make-good) owes after a restart exactly the make-good that died with the process. A bare exit
id covers all its counted orders, as every make-good of a journal written before did (``covered_by``). A start
rebuilds the watches of the current trading day's signals from the journal (``_restore_exit_watches``), leaving out
those a flatten in scope journaled after the signal took over: counted orders not final yet are watched again
(settling during recovery makes good as usual, held through the broker's come-up); an exit final with counted
orders final and unfilled that no journaled follow-up covers (the process died before the follow-up's commit), is
owed its make-good, sized as ``_make_good`` sizes it, held from the start and issued at the broker's come-up after
reconciliation, never more than the broker holds (``FlattenMixin._issue_owed_follow_ups``). A journaled follow-up
is the end of it: a second restart issues nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Iterable

from engine.sessions import trading_day, trading_day_start
from engine.state import contract_root
from service.dispatch import FINAL, Job, Tracked
from service.flatten import _flatten_scope, _Netted, _Owed
from service.journal import parse_utc
from service.restore import booked_of
from service.runtime_state import RuntimeState

log = logging.getLogger("service.runtime")


@dataclass
class _ExitWatch:
    """A signal's exit on one line and the orders in flight it counted on."""

    signal_id: str
    account: str
    strategy: str
    contract: str
    exit_id: str
    counted: set[str]
    """Client order ids not settled yet."""
    assumed: int
    """What the exit counted on closing: the line's position then (its book, orders in flight and held) on the side
    the exit closes, positive (0: the exit counted on nothing to close)."""
    lost: int = 0
    """Signed: what the counted orders that settled left undone (a rejected buy 2: +2), not made good yet."""
    causes: list[str] = field(default_factory=list)
    lost_from: list[str] = field(default_factory=list)
    """The counted orders whose unfilled quantity is in ``lost``: what its make-good covers (``covers_of``)."""
    ended: tuple[str, int, int, int] | None = None
    """(status, sign, quantity, filled) of an exit already final when a restart rebuilt the watch (a start tracks
    the open orders only); None: the tracker has it."""

    @property
    def standin(self) -> str:
        """The key of the hold standing for ``lost`` until the exit is final (never a journaled signal id)."""
        return f"standin:{self.exit_id}"

    def as_json(self) -> dict[str, Any]:
        """The watch as its signal's journaled body keeps it (``exit_watch``), as it was decided."""
        return {"exit": self.exit_id, "account": self.account, "strategy": self.strategy, "contract": self.contract,
                "counted": sorted(self.counted), "assumed": self.assumed}


def covers_of(exit_id: str, made_good: Iterable[str], counted_left: bool) -> str:
    """What a make-good of ``exit_id`` journals in ``covers``: the bare exit id when no counted order of it is left
    to settle (it covers them all, as every make-good did before partial ones were told apart), else the exit id
    with the counted orders it makes good (``<exit id>:<counted id>,<counted id>``), so that a restart still owes
    the make-good of a counted order that settles later (``covered_by``)."""
    return exit_id if not counted_left else f"{exit_id}:{','.join(sorted(made_good))}"


def covered_by(covers: Iterable[str]) -> tuple[set[str], dict[str, set[str]]]:
    """Read the ``covers`` of journaled follow-ups (``covers_of``): (exits covered whole, counted orders covered by
    exit). A bare exit id covers every order the exit counted on, whatever wrote it: a journal of the code before
    partial make-goods were told apart named the bare exit in each, and read so it never makes good twice. Other
    follow-ups' ``covers`` (a flatten's counted order, ``overtaken:<exit id>``) read as exits nobody watches."""
    whole: set[str] = set()
    partial: dict[str, set[str]] = {}
    for text in covers:
        exit_id, colon, orders = text.partition(":")
        if colon and exit_id.startswith("mb-"):
            partial.setdefault(exit_id, set()).update(o for o in orders.split(",") if o)
        else:
            whole.add(text)
    return whole, partial


def _make_good_trade(lost: int, assumed: int, exit_sign: int, filled: int, stands: int) -> tuple[int, int]:
    """What makes good ``lost`` (signed, see ``_ExitWatch``) for an exit of ``exit_sign`` that counted on closing
    ``assumed`` and filled ``filled``, on a line that stands at ``stands`` now: (the trade, signed; the trade before
    it was kept toward flat). Pure: the live watch and a restart's owed make-good size it alike (``_make_good``)."""
    if (lost > 0) != (exit_sign > 0):  # the exit closed what was never there: back the other way
        size = min(abs(lost), max(0, filled - max(0, assumed - abs(lost))))
        trade = size if lost > 0 else -size
    else:  # the exit left open what an earlier order it counted did not close: on, the exit's way
        trade = min(abs(lost), filled) * exit_sign
    raw = trade
    if abs(trade) > abs(stands):
        trade = -stands  # to flat, never through it
    if trade == 0 or (stands > 0) == (trade > 0):
        return 0, raw
    return trade, raw


class ExitsMixin(RuntimeState):
    """The exit-watch part of ``Runtime`` (see the module docstring)."""

    _exit_watches: dict[str, _ExitWatch]
    """By the exit's client order id."""
    _counted_by: dict[str, _ExitWatch]
    """By a counted order's client order id: the first exit that counted on it."""

    def _watch_exits(self, signal_id: str, jobs: list[Job]) -> None:
        """Watch ``jobs``' exits (a signal's orders, about to be held) over the orders in flight on their lines.
        Called in the step that decided them; O(1) per exit unless its line has orders in flight."""
        for job in jobs:
            if job.intent != "exit":
                continue
            line = (job.account, job.strategy, job.contract)
            own = sum(j.quantity * j.sign for j in jobs if (j.account, j.strategy, j.contract) == line)
            flying = self.tracker.strategy_exposure(job.account).get(job.strategy, {}).get(job.contract, 0)
            held = self._held_by_strategy.get(job.account, {}).get(job.strategy, {}).get(job.contract, 0) - own
            if not flying and not held:
                continue  # nothing in flight or held there (the O(1) common case)
            counted = {t.job.client_order_id for t in self.tracker.unsettled()
                       if (t.job.account, t.job.strategy, t.job.contract) == line}
            counted |= {j.client_order_id for sid, h in self._holds.items() if not h.flatten and sid != signal_id
                        for j in h.jobs if (j.account, j.strategy, j.contract) == line}
            counted -= self._counted_by.keys()  # made good for the first exit that counted on it only
            # Another exit that is watched itself lands the line where it meant with its own make-good, whatever
            # becomes of it: counted here too, its failure would be made good twice (fuzz crash seed 126 under load).
            counted -= self._exit_watches.keys()
            if not counted:
                continue
            stands = self._line_stands(*line) - own  # what it counted on closing
            watch = _ExitWatch(signal_id, job.account, job.strategy, job.contract, job.client_order_id, counted,
                               assumed=max(0, stands * -job.sign))
            self.journal.watch_exit(signal_id, watch.as_json())  # journaled with the signal: a restart watches again
            self._exit_watches[job.client_order_id] = watch
            for coid in counted:
                self._counted_by[coid] = watch

    def _exit_watch_settled(self, tracked: Tracked) -> None:
        """An order settled (``OrderTracker.settled_hooks``, before its exposure is taken off the books): a counted
        order's unfilled quantity is held as a stand-in at once; once the watched exit is final too, the difference
        is made good next (``_make_good``, after this order's exposure is off the books)."""
        coid = tracked.job.client_order_id
        watch = self._counted_by.pop(coid, None)
        if watch is not None:
            watch.counted.discard(coid)
            unfilled = tracked.job.quantity - tracked.filled
            exit_order = self._exit_outcome(watch)
            held = self._holds.get(watch.signal_id)
            if exit_order is None and (held is None or all(j.client_order_id != watch.exit_id for j in held.jobs)):
                self._drop_watch(watch)  # the exit will never leave (its signal was not journaled, or superseded)
            elif unfilled > 0:
                watch.lost += unfilled * tracked.job.sign
                watch.lost_from.append(coid)
                watch.causes.append(f"{tracked.job.side} {tracked.job.quantity} ({tracked.job.signal_id}) ended "
                                    f"{tracked.status} with {unfilled} unfilled")
                self._hold_standin(watch)
                if exit_order is not None and exit_order[0] in FINAL:
                    asyncio.get_running_loop().call_soon(self._make_good, watch)
            elif not watch.counted and exit_order is not None and exit_order[0] in FINAL and not watch.lost:
                self._drop_watch(watch)
        own = self._exit_watches.get(coid)
        if own is not None:
            asyncio.get_running_loop().call_soon(self._make_good, own)

    def _restore_exit_watches(self, booked: dict[Any, int]) -> None:
        """Rebuild the exit watches of this trading day's signals from the journal (see the module docstring). Run
        after ``_load_open_orders`` (``booked``: its fills by client order id) and ``_restore_watches`` (the
        follow-up counters, the flattens' owed follow-ups held), before any broker comes up.

        A flatten journaled after a signal, in scope of one of its watches, took that watch over (it ends for good:
        the flatten's own watch counted its orders). A journaled follow-up covering the exit made good what its
        counted orders had left undone until then: only those still in flight are watched again. Each counted order
        once, for the first exit that counted on it, as live."""
        assert self._started_at is not None, "start() sets it first"
        covers: list[str] = []
        found: list[tuple[str, date, dict[str, Any]]] = []
        for row in self.journal.exit_watches_since(trading_day_start(self._started_at)):  # as written
            body, scope = row["signal"], _flatten_scope(row)
            if scope is not None:
                if scope.follow_of:
                    if body.get("covers"):
                        covers.append(str(body["covers"]))
                elif scope.origin is None:  # an original ``flatten``: took over the watches in scope before it
                    found = [(sid, day, item) for sid, day, item in found if not (
                        (scope.account is None or item.get("account") == scope.account)
                        and (scope.strategy is None or item.get("strategy") == scope.strategy)
                        and (scope.roots is None or contract_root(str(item.get("contract"))) in scope.roots))]
                continue
            day = trading_day(parse_utc(str(row["received_at"])))
            found += [(str(row["id"]), day, item) for item in body.get("exit_watch") or []]
        whole, partial = covered_by(covers)
        unsettled = {t.job.client_order_id for t in self.tracker.unsettled()}
        seen: set[str] = set()
        for sid, day, item in found:
            exit_id = str(item["exit"])
            exit_row = self.journal.get_order(exit_id)
            if exit_row is None:
                continue
            counted = [str(c) for c in item.get("counted") or () if str(c) not in seen]
            seen.update(counted)
            watch = _ExitWatch(sid, str(item["account"]), str(item["strategy"]), str(item["contract"]), exit_id,
                               {c for c in counted if c in unsettled}, assumed=int(item.get("assumed") or 0))
            if exit_id not in self.tracker.orders:
                watch.ended = (str(exit_row["status"]), 1 if exit_row["side"] == "buy" else -1,
                               int(exit_row["quantity"]), booked_of(booked, exit_row))
            if exit_id not in whole:  # else every counted order was made good (or ended with nothing to)
                for coid in counted:
                    if coid in partial.get(exit_id, ()):
                        continue  # a make-good journaled before the crash covers it
                    order = None if coid in unsettled else self.journal.get_order(coid)
                    if order is None or order["status"] not in FINAL:
                        continue
                    unfilled = int(order["quantity"]) - booked_of(booked, order)
                    if unfilled > 0:
                        watch.lost += unfilled * (1 if order["side"] == "buy" else -1)
                        watch.lost_from.append(coid)
                        watch.causes.append(f"{order['side']} {order['quantity']} ({order['signal_id']}) ended "
                                            f"{order['status']} with {unfilled} unfilled")
            final = exit_id not in unsettled and exit_row["status"] in FINAL
            if final and watch.lost:
                self._owe_make_good(watch, str(exit_row["broker"]), day)
            if watch.counted or watch.lost:
                self._exit_watches[exit_id] = watch
                for coid in watch.counted:
                    self._counted_by[coid] = watch
                if watch.lost:
                    self._hold_standin(watch)

    def _owe_make_good(self, watch: _ExitWatch, broker: str, day: date) -> None:
        """A start found ``watch``'s exit final and its make-good lost with the process: owe it, sized as
        ``_make_good`` sizes it, held from now (``_hold_owed``) and issued at ``broker``'s come-up after
        reconciliation, capped to what the broker holds (``_issue_owed_follow_ups``)."""
        outcome = self._exit_outcome(watch)
        if outcome is None:
            return
        status, exit_sign, quantity, filled = outcome
        lost, watch.lost = watch.lost, 0
        causes, watch.causes = watch.causes, []
        made_good, watch.lost_from = watch.lost_from, []
        stands = self._line_stands(watch.account, watch.strategy, watch.contract)
        trade, raw = _make_good_trade(lost, watch.assumed, exit_sign, filled, stands)
        what = (f"the exit {watch.exit_id} ({status}, {filled} of {quantity}) counted on " + "; ".join(causes)
                + ", and its make-good was lost in a restart")
        if trade == 0:
            log.info("%s: %s %s (%s): %s; nothing to make good (line at %+d, %+d would not close)", watch.signal_id,
                     watch.account, watch.contract, watch.strategy, what, stands, raw)
            return
        log.warning("%s: %s %s (%s) is owed a make-good closing %+d: %s; issued when %s comes up", watch.signal_id,
                    watch.account, watch.contract, watch.strategy, -trade, what, broker)
        owed = _Owed(_Netted(watch.signal_id, watch.account, watch.strategy, watch.contract, counted=()),
                     covers_of(watch.exit_id, made_good, bool(watch.counted)), -trade, what, day)
        self._owed_follow_ups.setdefault(broker, []).append(owed)
        self._hold_owed(owed)  # the engine sees the line where the exit meant it until the come-up issues it

    def _flatten_takes_over(self, accounts: set[str] | None, strategy: str | None,
                            roots: frozenset[str] | None) -> None:
        """A flatten is about to compute its exits for this scope: it counts every order in flight there and
        watches them itself (``service.flatten._Netted``), so the watches of signals' exits in scope end here, their
        stand-ins with them, before it computes (counted as an exit to come, a stand-in would have the flatten
        close a difference that this module then no longer makes good)."""
        for watch in list(self._exit_watches.values()):
            if (accounts is None or watch.account in accounts) and (strategy is None or watch.strategy == strategy) \
                    and (roots is None or contract_root(watch.contract) in roots):
                self._drop_watch(watch)

    def _unwatch_exit(self, client_order_id: str) -> None:
        """The exit ``client_order_id`` will never be sent (its signal was not journaled, or a flatten superseded
        it): no watch, no stand-in."""
        watch = self._exit_watches.get(client_order_id)
        if watch is not None:
            self._drop_watch(watch)

    def _standin_void(self, job: Job) -> bool:
        """Is ``job`` (a held flatten-kind job) the stand-in of an exit still held, not sent? A flatten computing
        now supersedes that exit if the line is in its scope, and the stand-in with it: not to be counted."""
        if not job.client_order_id.startswith("standin:"):
            return False
        return job.client_order_id.removeprefix("standin:") not in self.tracker.orders

    def _exit_outcome(self, watch: _ExitWatch) -> tuple[str, int, int, int] | None:
        """(status, sign, quantity, filled) of the watched exit, tracked or final before a restart; None when it is
        neither (still held, or never to leave)."""
        tracked = self.tracker.orders.get(watch.exit_id)
        if tracked is not None:
            return tracked.status, tracked.job.sign, tracked.job.quantity, tracked.filled
        return watch.ended

    def _drop_watch(self, watch: _ExitWatch) -> None:
        self.release(watch.standin)
        self.journal.withdraw_exit_watch(watch.signal_id, watch.exit_id)  # a no-op once its signal is written
        self._exit_watches.pop(watch.exit_id, None)
        for coid in watch.counted:
            if self._counted_by.get(coid) is watch:
                del self._counted_by[coid]

    def _hold_standin(self, watch: _ExitWatch) -> None:
        self.release(watch.standin)
        self._hold_closing(watch.standin, watch.account, watch.strategy, watch.contract, -watch.lost)

    def _line_stands(self, account: str, strategy: str, contract: str) -> int:
        """Where a strategy's line stands as the engine sees it: its book, its orders in flight and held."""
        return (self.ledger.book(account, strategy, contract).quantity
                + self.tracker.strategy_exposure(account).get(strategy, {}).get(contract, 0)
                + self._held_by_strategy.get(account, {}).get(strategy, {}).get(contract, 0))

    def _make_good(self, watch: _ExitWatch) -> None:
        """The exit is final: make good what the counted orders left undone, in proportion to what the exit did.

        ``lost`` opposite to the exit (an entry it closed that never filled): the exit closed what was there
        (``assumed - |lost|``) and then some: buy (or sell) back what it filled beyond that, at most ``|lost|``. ``lost``
        the exit's way (an earlier exit it counted, rejected): the line stays open by that much once the exit
        filled: close ``min(|lost|, filled)`` more. Only ever toward flat (a final guard on where the line stands,
        orders in flight and held counted). In one step with the stand-in's release: the engine's view never
        shows the gap."""
        exit_order = self._exit_outcome(watch)
        if exit_order is None or exit_order[0] not in FINAL:
            return
        self.release(watch.standin)
        lost, watch.lost = watch.lost, 0
        causes, watch.causes = watch.causes, []
        made_good, watch.lost_from = watch.lost_from, []
        if not watch.counted:
            self._drop_watch(watch)
        if not lost:
            return
        status, exit_sign, quantity, filled = exit_order
        stands = self._line_stands(watch.account, watch.strategy, watch.contract)
        trade, raw = _make_good_trade(lost, watch.assumed, exit_sign, filled, stands)
        what = f"the exit {watch.exit_id} ({status}, {filled} of {quantity}) counted on " + "; ".join(causes)
        if trade == 0:
            log.info("%s: %s %s (%s): %s; nothing to make good (line at %+d, %+d would not close)", watch.signal_id,
                     watch.account, watch.contract, watch.strategy, what, stands, raw)
            return
        line = _Netted(watch.signal_id, watch.account, watch.strategy, watch.contract, counted=())
        self._follow_up(line, -trade, what, covers=covers_of(watch.exit_id, made_good, bool(watch.counted)))
