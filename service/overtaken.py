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
meanwhile checks it again. Other exits are not kept: memory stays flat however many exits a day sends.

Not journaled: a crash between the exit's settling and the follow-up's journal commit loses the follow-up. A
start notes the count for the exits it loads in flight (``RestoreMixin``'s ``_job``), from the ledger replayed
from the journal, so trades by hand made while the service was down, with our exit at the broker, are seen (the
case the crash fuzz found). Journaling the noted count with the exit would close the rest of the gap.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from service.dispatch import Job, Tracked
from service.flatten import _Netted
from service.runtime_state import RuntimeState

log = logging.getLogger("service.runtime")


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
        return f"overtaken:{self.exit_id}"


class OvertakenMixin(RuntimeState):
    """The overtaken-exit part of ``Runtime`` (see the module docstring)."""

    _hand_basis: dict[str, int]
    """Exit client order id -> its line's ``Ledger.hand_closed`` at its decision, when that was not zero."""
    _overtaken: dict[tuple[str, str], list[_Overtaken]]
    """(account, contract) -> final exits there under watch (settled in a come-up, or overtaken in flight)."""
    _overtaking: dict[str, _Overtaken]
    """Exit client order id -> an exit in flight that a trade by hand has overtaken."""

    def _note_hand_basis(self, job: Job) -> None:
        """An exit's job is made: note what trades by hand had closed on its line by then."""
        if job.intent == "exit" and job.client_order_id.startswith("mb-"):  # not a stand-in: those never settle
            closed = self.ledger.hand_closed.get((job.account, job.strategy, job.contract))
            if closed:
                self._hand_basis[job.client_order_id] = closed

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
                    job.sign, job.quantity, basis, filled_before=tracked.filled)
            size = min(self._closed_by_hand(watch), watch.quantity - watch.filled_before)
            self.release(watch.standin)
            # Counted from now, so that the engine sees the line where the exit meant it (a signal decided while
            # the exit is in flight must not trade the overshoot), and a flatten counts it as an exit to come.
            self._hold_closing(watch.standin, account, job.strategy, contract, size * watch.sign)
        for watch in self._overtaken.get((account, contract), ()):
            self._check_overtaken(watch)

    def _check_overtaken(self, watch: _Overtaken) -> None:
        """The exit is final: make good what it closed a second time (see the module docstring)."""
        self.release(watch.standin)
        closed = self._closed_by_hand(watch)
        over = min(closed, watch.filled - watch.filled_before) - watch.made_good
        if over <= 0:
            return
        stands = self._line_stands(watch.account, watch.strategy, watch.contract)
        size = min(over, max(0, stands * watch.sign))
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
