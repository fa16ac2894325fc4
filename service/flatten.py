"""Flattens: closing positions in scope, and making sure they stay closed.

Missed flattens: a flatten (schedule, risk ``flatten_and_halt``, operator) sends its exits to every account holding
a position in scope; an exit whose broker was down or paused becomes ``missed`` (also one whose request failed in a
drop and that recovery then did not find at the broker). An account in its scope whose broker was down or paused
as it was computed counts as missed there too (its body's ``away``, ``_away``), exit or no exit: the ledger it read
did not know what happened at that broker meanwhile (a position opened there by hand and reported at the come-up,
the exits it counted on in flight there). When that broker comes back (``_on_up``: after recovery
and reconciliation, before catch-up), every flatten of the current trading day with an exit missed there is carried
out now for those accounts, whatever their ``catch_up``: a flatten signal of its own, ``<flatten id>-redo-<broker>-
<n>``, with exits only (never blocked by risk or schedule: exits never are) for the positions in the original's
scope (account, strategy, roots) the account still holds after reconciliation, net of orders in flight, capped as
a retry is (``_capped_exits``): never more on a line than the missed exits left unfilled there, only on that side
(``_cap_to_unfilled``: a retry's or a follow-up's exit is missed at a broker that was open after the flatten, and a
signal decided meanwhile is not the flatten's; an account the original found away is owed its whole scope), and
never more than the broker holds net of our orders in flight (``_clamp_to_broker``). The journaled id makes a
second come-up a no-op; only when the re-issue's own exits are missed again (the broker dropped once more) does the
next come-up issue ``n + 1``. A broker
that comes back while an operator keeps it paused gets nothing, neither re-issued flattens nor catch-up, until
``resume_broker``, which does both, in that order, before it un-pauses. A pause is an operator's drop: what is
decided while it lasts is missed there, so the resume catches up from the moment of the pause, drop or no drop. An exit the broker *rejected* is not
re-issued by a come-up (a reconnect says nothing about why the broker refused): it is retried, below. A flatten of
an earlier trading day is not carried out: the day it belonged to is over (a schedule flatten guarded that
session's close, a risk flatten that day's loss, whose halts lifted at 18:00 ET), positions carried into the new day
are part of its book, and closing them now would act at a time and price nobody chose. But it is a flatten that did
not close, so each account still holding something in its scope gets a ``flatten_failed`` naming the positions
(``_lapsed``: alert, risk event, entries halted until an operator clears them; once: its ``settles`` keeps the next
come-up from raising it again), unless a flatten of the new day redone at the same come-up covers the account
(it closes it). The same holds for a withheld flatten and an owed follow-up of an earlier day. Catch-up treats any journaled flatten after a strategy's last target (not only the schedule's) as voiding
that target (``_flatten_times``), so it never re-opens what a risk or operator flatten closed.

Rejected flatten exits: an exit of a flatten (any of the above, a re-issue, or a retry) that the broker rejects, or
cancels with quantity unfilled, is retried after a backoff (``FLATTEN_RETRY_DELAYS_S``: five attempts over about
two minutes), while the broker is connected and not paused, and only within the original's CME trading day: many
rejections are transient (Tradovate's TooLate or SessionClosed, a broker-side risk check timing out, a rate limit
answered as a reject), and a flatten left open is a position nobody meant to hold. A retry is a flatten signal of
its own, ``<flatten id>-retry-<broker>-<n>`` (``retry_of``), journaled before it is sent, its exits never blocked by
risk or schedule and sent through the dispatcher like the original's (held and superseding what is held in scope,
as any flatten). It never trusts the ledger alone: it reconciles the broker first, computes the exits for the
accounts owed in the original's scope as the redo does (net of orders in flight and of other flattens' held
exits), never more on a line than the exits it retries left unfilled there (``_cap_to_unfilled``: a signal decided
in between saw the line still open, so what it added, or a reversal it made, is not the flatten's to close), and
never exits more than the broker holds, in any contract (``_clamp_to_broker``: a position closed by
hand at the broker is booked to no strategy, so the strategy's book alone would sell into a short), net of what our
orders may still add to that position as they stood when the broker read it (``OrdersAtRead``: counted when the
exits are computed, an order that fills in between counts nowhere and the retry closes too little) and of what
the capped lines keep back (``_kept_back``: the broker holds that too, and counted as the batch's to close it would
cut an opposite line's exit, leaving that line open with nobody owing it). Nothing left to close settles it with no
order. What is owed is read from the journal (``_flatten_debts``): per account, the latest
of the original, its re-issues and its retries decides, so an account is owed a redo (missed exits: the come-up)
or a retry (rejected ones), never both; the two run under one lock and each nets out the other's exits in flight,
and a retry whose own exit is lost in a drop is redone by the come-up instead of retried as well. A broker that is
down or paused when a retry comes due gets it after its come-up (recovery, reconciliation, redo first) or resume;
a restart resumes the retries it owes the same way, their backoff counted from the come-up. When the retries run
out, or the trading day ends first, with something still held, the account's entries halt (exits never do): a
``flatten_failed`` risk event names the account, broker, contracts, quantities left and the last rejection, the
service logs it at ERROR, and the halt lasts like any other (restored after a restart, lifted by
``POST /api/halts/{name}/clear`` or the next trading day).

Withheld flatten exits: where an ``on_mismatch: halt`` account's last reconciliation pass found its ledger and its
broker disagreeing in a contract, a flatten sends no exit there (``_unreconciled_lines``: one computed from either
side could open a position instead of closing one; fuzz seed 646), closes the rest of its scope, and names the
contracts in a ``flatten_failed`` event that halts the account's entries (``_flatten_refused``). The withheld part
is owed, like a missed flatten's: the flatten's own body journals it (``withheld``: per account, its broker and the
exits withheld, with the orders in flight they counted on), in the flatten's transaction, so that no crash after
the flatten's commit loses it (the ``flatten_failed`` event, written after, could be lost; and no schema changes).
The first reconciliation pass of that broker that finds those contracts agreeing (not mismatched, no order of ours
in flight on them) carries it out (``_withheld_after_pass``, ``_redo_withheld``): a re-issue ``<flatten id>-redo-
<broker>-<n>`` (``redo_of``, numbered with the come-up's re-issues, so that its exits missed or rejected are
redone or retried as theirs), for the original's scope at that account, in the contracts that agree and no other
(a pass agreeing on some keeps owing the rest), computed on the now-agreed ledger net of orders in flight, only on
the side of the exit withheld and never more than it (``_cap_to_unfilled``, moved by what the orders it counted on
left unfilled: a signal decided since is not the flatten's), never more than the broker holds
(``_clamp_to_broker``), sent like a retry, with a ``flatten_redone`` event saying what was carried out and why. At
once when the pass runs with the broker open and the redo's lock free; a come-up's pass (or a retry's, or a redo's)
leaves it to a task that waits for the broker to open and the lock, then reconciles again. Its ``withheld`` names
the contracts it redid: neither this process nor a restart (``RestoreMixin._restore_withheld``, this trading day's
flattens replayed in order) redoes them again. Not carried out on a later trading day (as a missed flatten), nor
after a newer flatten (operator, risk, schedule) of a scope covering the line (it closed the line, or withheld it
again and owes it itself), nor for an account whose broker was away (the come-up's redo owes it the whole scope).
An operator clearing the halt does not cancel it; the redo does not lift the halt either (the operator does, as
for every ``flatten_failed``).

Decisions held when a flatten is computed: a webhook's (or catch-up's) orders count from their decision on
(``hold``) and leave only after the signal's journal commit (``dispatch``). A flatten (operator, risk, schedule)
supersedes every held order in its scope (account, strategy, roots): it is never sent and is journaled ``missed``
naming the flatten, in the flatten's own transaction when its signal is on disk already, else in the signal's own
transaction (``Journal.supersede``), so that no restart sends it either: a superseded order is never on disk as
``new`` next to the flatten, whatever order the two commits land in and whether or not a later write fails.
Without that, an entry decided just before the flatten would stay open after it, and a held exit would sell next
to the flatten's own exit (the account ends short). The flatten computes its exits from the ledger, the orders in
flight and the exits of other flattens still being journaled, and its own exits count (held) from that moment, so
that a signal or a flatten decided during its journal commit does not exit the same position again. Held orders
outside its scope go out as usual, and the answer the webhook gave stays as it was.

Orders in flight when a flatten is computed: the flatten counts them as if they will fill, also on a line the
ledger holds flat (an entry sent a moment ago), and exits the result at once, as the engine counts them too: from
that instant every decision sees the line flat, and no signal exits it a second time. An order that then does not
do what was counted (the broker rejects it, a paused or down broker makes it ``missed``, it fills in part) leaves
the line off flat by what it left unfilled: the moment such an order settles (final, fills booked), a follow-up
exit for that difference, ``<flatten id>-follow-<n>``, is held in that same step (the engine's view stays flat, so
an exit signal decided while other orders are still in flight cannot close the same difference again) and
journaled and sent like the flatten's own exits (retried when rejected, re-issued when missed). When the flatten's
own exit on the line fails too, its retry or re-issue recomputes the line from the ledger and the broker, counting
the follow-ups in flight: the two never close the same contracts twice, at the price of a round trip when both
fail. When the exit had already failed (missed, rejected, cancelled unfilled) by the time the counted order
settles, no follow-up is issued at all (``_own_exit_failed``): the retry or re-issue alone closes what is there, a
retry's cap counting what such counted orders left undone (``_counted_undone``), and a retry never computes while
orders are in flight on the lines it may close (``_retry_waits``): it would count them as the flatten did, with
nobody watching them.
Orders decided after the flatten are not part of it: a new signal may open the line again. One counted order
is followed up once, however many flattens counted on it (a later flatten counts the earlier one's exit as well,
which already sold for it). An order settled by its broker's come-up (recovery, at a start or a reconnect) is
owed its follow-up instead, as after a restart (below): held as a stand-in and issued by that come-up after
reconciliation, before the redo computes, capped to what the broker holds, for the oldest flatten of the current
trading day that counted on it (one of an earlier day is not carried out, as its redo is not: ``_lapsed``). Sized when the order
settled and sent after the come-up, it knew nothing of a trade made by hand meanwhile (reconciliation books it
to the line it closed), and the redo, which nets it out, caps to the broker's position without what it adds
(fuzz seed 556: the follow-up bought back a short the trader had closed, the redo's sell of that was capped
away, and the account ended long 1 with nothing said).

The watch survives a crash: the flatten journals it with itself, in its own transaction (its body's ``watch``: per
line, the client order ids it counted on), and each follow-up names the order it covers (``covers``, next to
``follow_of``). Reconciliation would not tell the difference (the ledger and the broker agree on the reversed
position), so a start rebuilds the watch from the journal, for the flattens of the current trading day, before
recovery settles what was in flight (``RestoreMixin._restore_watches``): a counted order not final yet is watched
again (its settling during recovery makes its follow-up owed, as above, and issued as below); one final with
quantity unfilled and no journaled follow-up covering it (it settled, and the
follow-up's commit was lost with the process) is owed one, counted from the start as a flatten exit held (the
engine sees the line flat, as it would have without the crash: ``_hold_owed``) and issued at its broker's come-up
after reconciliation,
before the redo of missed flattens computes (which nets it out), and never larger than the broker holds there
(``_issue_owed_follow_ups``). A journaled follow-up is the end of it: its own failure is the retry's or the
redo's business, so a second restart issues nothing again. The follow-up counter restarts from the journal's
highest ``<flatten id>-follow-<n>``: an id lost with the process never reached the journal, hence no broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping

from brokers.base import BrokerError
from engine.decision import client_order_id, ruleset_ref
from engine.schedule import Firing
from engine.sessions import trading_day, trading_day_start
from engine.state import contract_root
from service.dispatch import CANCELLED, FINAL, MISSED, REJECTED, Job, Tracked
from service.journal import parse_utc
from service.runtime_state import RuntimeState, _Hold, _utc

log = logging.getLogger("service.runtime")
"""The runtime's one logger, whichever of its modules logs (operators filter and read it by that name)."""

REDO_LOOKBACK = timedelta(days=7)
"""How far back a broker's come-up looks for flattens it missed: enough to warn about one of the previous session
across a weekend or a holiday (only the current trading day's are carried out), without rereading all history."""
FLATTEN_RETRY_DELAYS_S: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0, 60.0)
"""Seconds from a flatten exit's rejection to each retry (``Runtime.flatten_retry_delays_s``; tests shorten it):
five attempts over about two minutes, long enough for a broker-side hiccup (a risk check timing out, a rate limit
answered as a reject) to pass, short enough that the position does not drift far past its flatten."""
FLATTEN_FAILED = "flatten_failed"
"""Risk event kind: a flatten's exits were rejected until its retries ran out (or its trading day ended), or were
withheld where the account's ledger and its broker disagree (``_unreconciled_lines``: carried out once they agree,
``FLATTEN_REDONE``); the account's entries are
halted (a halt like any other: restored after a restart, lifted by an operator or the next
trading day)."""
FLATTEN_REDONE = "flatten_redone"
"""Risk event kind: a flatten withheld where the ledger and the broker disagreed (``flatten_failed``) was carried
out once a reconciliation pass found them agreeing (``Runtime._redo_withheld``)."""
RETRY_WAIT_LOOK_S = 1.0
"""How often a retry waiting for orders in flight on its lines (``_retry_waits``) looks again without being woken."""


@dataclass(frozen=True)
class _FlattenScope:
    """What a journaled flatten signal covered: None means every account / strategy / root."""

    account: str | None
    strategy: str | None
    roots: frozenset[str] | None
    redo_of: str | None
    """The original flatten's id when this one re-issues a missed flatten at a broker that came back."""
    retry_of: str | None = None
    """The original flatten's id when this one retries exits a broker rejected."""
    follow_of: str | None = None
    """The original flatten's id when this one closes what an order it counted on left unfilled (a follow-up)."""

    @property
    def origin(self) -> str | None:
        """The original flatten this one carries out again (None: it is an original)."""
        return self.redo_of or self.retry_of


def _flatten_scope(row: dict[str, Any]) -> _FlattenScope | None:
    """The scope of a journaled signal row if it is a flatten, else None."""
    body = row.get("signal") or {}
    if not isinstance(body, dict) or not body.get("flatten"):
        return None
    strategy = body.get("strategy")
    roots = body.get("instruments")
    return _FlattenScope(account=body.get("account") or None,
                         strategy=None if strategy in (None, "", "(flatten)") else str(strategy),
                         roots=None if roots is None else frozenset(str(r) for r in roots),
                         redo_of=body.get("redo_of") or None, retry_of=body.get("retry_of") or None,
                         follow_of=body.get("follow_of") or None)


def _come_up_redo(row: Mapping[str, Any]) -> bool:
    """Whether a journaled flatten signal row is a come-up's re-issue of missed exits (sent before its broker opens),
    not a withheld redo (``withheld`` in its body: sent while the broker is open) nor a retry."""
    body = row.get("signal") or {}
    return bool(body.get("redo_of")) and "withheld" not in body


def _redo_id(origin: str, broker: str, attempt: int) -> str:
    """The id of the ``attempt``-th re-issue of flatten ``origin`` at ``broker``: derived, so that a second come-up
    finds it journaled instead of flattening again."""
    return f"{origin}-redo-{broker}-{attempt}"


def _retry_id(origin: str, broker: str, attempt: int) -> str:
    """The id of the ``attempt``-th retry of flatten ``origin``'s rejected exits at ``broker`` (derived, like
    ``_redo_id``: the journal, not memory, says how many ran)."""
    return f"{origin}-retry-{broker}-{attempt}"


_MISSED_EXIT, _REJECTED_EXIT, _PENDING_EXIT, _SETTLED_EXIT = "missed", "rejected", "pending", "settled"


def _exit_outcome(orders: Iterable[dict[str, Any]]) -> str:
    """What one flatten signal's exits for one account at one broker came to (journaled order rows).

    Missed first: a redo closes everything in scope, the rejected exits' positions too. Then rejected (or
    cancelled with quantity unfilled, which is what a cancelled order is: a full fill ends ``filled``). Then still
    pending (the broker has not answered yet). Otherwise settled: filled, or nothing was left to close."""
    statuses = {str(o["status"]) for o in orders}
    if MISSED in statuses:
        return _MISSED_EXIT
    if statuses & {REJECTED, CANCELLED}:
        return _REJECTED_EXIT
    if statuses - FINAL:
        return _PENDING_EXIT
    return _SETTLED_EXIT


@dataclass
class _Debt:
    """What a broker's accounts are still owed of one flatten (``Runtime._flatten_debts``)."""

    origin: str
    row: dict[str, Any]
    """The original flatten's journaled signal row (its scope and time)."""
    missed: set[str] = field(default_factory=set)
    """Accounts whose latest exits there were missed: a redo owes them (``_redo_missed_flattens``)."""
    missed_exits: dict[str, str] = field(default_factory=dict)
    """Of ``missed``, account -> the id of the flatten signal whose exits there were missed, where the redo closes
    no more than they left unfilled (``_cap_to_unfilled``). Not an account the original found away (``_away``), as
    long as only come-ups' redos followed it there: the ledger it read did not know what that broker held, and the
    broker has not been open since (a come-up's redo is missed only when the link drops before it opens), so no
    signal decided after the flatten reached it; its redo owes the whole scope there."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Account -> the id of the flatten signal whose exits there the broker rejected (or cancelled unfilled) and
    that no retry, redo or ``flatten_failed`` settled since: a retry owes them."""
    redos: int = 0
    retries: int = 0
    """How many re-issues and retries of the original are journaled at this broker."""
    reason: str | None = None
    """The last rejection's reason, as the broker gave it."""

    def state(self, broker: str) -> tuple[Any, ...]:
        """Changes with every attempt: what a retry's backoff counts from (``Runtime._retry_due``)."""
        return broker, self.origin, self.retries, tuple(sorted(self.rejected.items()))


def _outside(orders: list[dict[str, Any]],
             books: Mapping[tuple[str, str], Mapping[str, int]]) -> dict[tuple[str, str], int]:
    """Per (account, contract) of ``orders``: what the lines that are NOT exiting it in this batch hold there
    (``books``: by account and contract, strategy -> signed quantity, a position opened by hand under no strategy).
    The broker nets every line of an account; the part of its position the exiting strategies may close is its
    position less that (a strategy never closes another's, nor the trader's). A manual close not booked yet still
    caps: the broker's position is read fresh."""
    exiting: dict[tuple[str, str], set[str]] = {}
    for order in orders:
        exiting.setdefault((str(order["account"]), str(order["contract"])), set()).add(str(order["strategy"]))
    return {key: sum(q for strat, q in books.get(key, {}).items() if strat not in strategies)
            for key, strategies in exiting.items()}


def _cap_batch(orders: list[dict[str, Any]], start: dict[tuple[str, str], int], why: str) -> list[dict[str, Any]]:
    """Exits of one batch, capped per (account, contract) in ``start`` (what the exiting strategies hold there at
    the broker, signed) so that together they never take the broker past flat: opposite exits (two strategies of
    one account on opposite sides) cancel at the broker and go out matched; what is left on one side goes out, in
    order, only as far as ``start`` holds on that side. Orders of other (account, contract) pass unchanged."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, order in enumerate(orders):
        key = (str(order["account"]), str(order["contract"]))
        if key in start:
            groups.setdefault(key, []).append(i)
    sent = [int(o["quantity"]) for o in orders]
    for key, members in groups.items():
        # Every line's exits pair off, a position opened by hand (booked to no strategy) too: in an account-wide
        # flatten it is closed like the strategies' (its exit and theirs go out matched, and the ledger closes both).
        sells = sum(int(orders[i]["quantity"]) for i in members if orders[i]["side"] == "sell")
        buys = sum(int(orders[i]["quantity"]) for i in members if orders[i]["side"] == "buy")
        pair = {"sell": min(sells, buys), "buy": min(sells, buys)}
        rest: dict[int, int] = {}
        for i in members:
            order = orders[i]
            paired = min(int(order["quantity"]), pair[order["side"]])
            pair[order["side"]] -= paired
            sent[i] = paired
            rest[i] = int(order["quantity"]) - paired
        # What is left goes out on one side only, the side with more left (the broker's on a tie), and only as far
        # as the broker holds on that side.
        left_sells = sum(q for i, q in rest.items() if orders[i]["side"] == "sell")
        left_buys = sum(q for i, q in rest.items() if orders[i]["side"] == "buy")
        side = "sell" if left_sells > left_buys else "buy" if left_buys > left_sells else \
            ("sell" if start[key] > 0 else "buy")
        held = start[key] if side == "sell" else -start[key]
        for i in members:
            order = orders[i]
            capped = min(rest[i], max(held, 0)) if order["side"] == side else 0
            held -= capped
            sent[i] += capped
            if sent[i] < int(order["quantity"]):
                log.warning("%s %s %s: %s %s to close it, the broker holds %+d there for the strategies exiting "
                            "(%s); exiting %d only", key[0], key[1], order["strategy"], order["side"],
                            order["quantity"], start[key], why, sent[i])
    return [{**o, "quantity": q} for o, q in zip(orders, sent) if q > 0]


def _left_open(orders: Iterable[Mapping[str, Any]], filled: Mapping[str, int]) -> dict[tuple[str, str], int]:
    """By (strategy, contract), signed like a position, what final ``orders`` left unfilled (``filled``: by client
    order id): a sell's unfilled quantity is a long still held, a buy's a short."""
    out: dict[tuple[str, str], int] = {}
    for o in orders:
        left = int(o["quantity"]) - filled.get(str(o["client_order_id"]), 0)
        key = (str(o.get("strategy")), str(o["contract"]))
        out[key] = out.get(key, 0) + (left if o["side"] == "sell" else -left)
    return out


def _clamp_to_broker(orders: list[dict[str, Any]], reconciled: dict[str, dict[str, Any]],
                     pending: dict[tuple[str, str], int],
                     books: Mapping[tuple[str, str], Mapping[str, int]] | None = None, *,
                     kept: Mapping[tuple[str, str], int] | None = None) -> list[dict[str, Any]]:
    """A retry's exits, each no larger than what the broker holds on its side in every contract, net of our orders
    there still in flight (``pending``: by account and contract, signed, what they may yet add to the broker's
    position as the reconciliation read it, and the flatten exits held: ``Runtime._clamp_basis``), in exit order.

    Every contract, not only those where the reconciliation found the ledger and the broker disagreeing: a retry
    comes seconds to minutes after the rejection (a come-up's redo minutes to hours after the flatten), time enough for someone to close the position at the broker by hand. Such a
    close is booked to no strategy (``EXTERNAL_STRATEGY``), so the account's total agrees with the broker while the
    strategy's book still shows the position; a sell computed from that book would open a short. ``reconciled``:
    rows of the reconciliation just run, by account; an account without one is not exited at all. The broker's
    position is first less what the account's strategies outside this batch hold, their orders in flight included
    (``_outside``: in an account that follows several strategies, each closes only its own), and less what the
    batch's own lines keep back (``kept``: by account and contract, signed like a position, what ``_kept_back``
    says the retry leaves open on its lines), and the batch's exits are capped together (``_cap_batch``: two
    strategies on opposite sides net to zero at the broker).

    Why ``kept``: the broker holds what a line keeps back as surely as another strategy's book (a follow-up of the
    flatten closes it, or a signal decided after the flatten opened it). Left in, it offsets the opposite line's
    exit in the batch, which the cap then cut as if it would take the broker past flat, and what it cut is owed by
    nobody: the retry fills, the flatten counts as settled, and the line stays open (fuzz seed 733: mirror +2 and
    trend -2 at a broker holding 0, the retry selling mirror 1 of 2 and buying trend 1 of 2)."""
    outside = _outside(orders, books or {})
    exits = []
    start: dict[tuple[str, str], int] = {}
    for order in orders:
        key = (str(order["account"]), str(order["contract"]))
        row = reconciled.get(key[0])
        if row is None:
            log.error("%s %s: not reconciled, so what the broker holds is unknown; not exited", *key)
            continue
        exits.append(order)
        start[key] = int((row.get("broker_positions") or {}).get(key[1], 0)) + pending.get(key, 0) \
            - outside.get(key, 0) - (kept or {}).get(key, 0)
    return _cap_batch(exits, start, "retry")


def _kept_back(computed: list[dict[str, Any]], capped: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """By (account, contract), signed like a position: what ``capped`` (a retry's exits after ``_cap_to_unfilled``)
    leaves open on the lines it still exits, of what ``computed`` (the same exits from the whole line) would have
    closed. A line ``capped`` no longer exits at all is left out: ``_outside`` counts its whole book already."""
    left = {str(o["client_order_id"]): int(o["quantity"]) for o in capped}
    out: dict[tuple[str, str], int] = {}
    for order in computed:
        coid = str(order["client_order_id"])
        if coid not in left or left[coid] >= int(order["quantity"]):
            continue
        key = (str(order["account"]), str(order["contract"]))
        back = int(order["quantity"]) - left[coid]
        out[key] = out.get(key, 0) + (back if order["side"] == "sell" else -back)
    return out


def _cap_to_unfilled(orders: list[dict[str, Any]],
                     unfilled: Mapping[str, Mapping[tuple[str, str], int]]) -> list[dict[str, Any]]:
    """A retry's (or a redo's) exits, each no larger than what the exits it carries out again left unfilled on its
    line (``unfilled``: by account, then (strategy, contract), signed like a position: what the line held beyond flat
    that those exits were to close). A line they did not leave open gets no exit, and neither does one that moved
    to the other side since. An account without an entry in ``unfilled`` passes unchanged.

    Why: the retry comes seconds to minutes after the rejection, and signals decided meanwhile are not part of the
    flatten (they saw the line still open, and a ``buy 1`` then meant one more than it held). Recomputed from the
    whole line, the retry would close them too: the position a later signal opened, or the reversal it made.
    Capped, it closes what the flatten meant to close and no more."""
    out = []
    for order in orders:
        account = str(order["account"])
        if account not in unfilled:
            out.append(order)
            continue
        owed = unfilled[account].get((str(order["strategy"]), str(order["contract"])), 0)
        side = "sell" if owed > 0 else "buy"
        quantity = min(int(order["quantity"]), abs(owed)) if owed and order["side"] == side else 0
        if quantity < int(order["quantity"]):
            log.warning("%s %s %s: the line holds %s %s beyond flat, the exits carried out again (rejected, missed, "
                        "withheld) left %+d of it open; closing %d (signals decided after the flatten keep the rest)",
                        account, order["contract"], order["strategy"], "long" if order["side"] == "sell" else "short",
                        order["quantity"], owed, quantity)
        if quantity > 0:
            out.append({**order, "quantity": quantity})
    return out


def _superseded_detail(fid: str) -> str:
    return f"superseded by flatten {fid}, computed while this order was held: never sent"


@dataclass
class _Netted:
    """A line (account, strategy, contract) a flatten closed while orders were still in flight on it.

    The flatten's own exit counted on them to fill what they had left (``Runtime._flatten_orders``), but an order in
    flight may yet fill in part, or never leave (rejected, or ``missed`` at a broker that is down or paused). The
    moment one of them settles with quantity unfilled, the line is off flat by that much, and a follow-up exit for
    it is held in that same step (``Runtime._follow_up``), so that the engine never sees the line off flat: an exit
    signal decided while the other orders are still in flight would otherwise close the same difference again. The
    flatten's own exit is not watched: if it fails, its retry or re-issue recomputes the line from the ledger and
    the broker, counting the follow-ups in flight. Orders decided after the flatten are not watched either: a new
    signal may open the line again. Journaled with the flatten (its body's ``watch``, ``as_json``), so that a
    restart watches again what was still in flight and owes what settled unfilled without a follow-up
    (``RestoreMixin._restore_watches``)."""

    fid: str
    account: str
    strategy: str
    contract: str
    counted: tuple[str, ...]
    """The client order ids of the orders in flight it counted on (each watched until it settles)."""

    def as_json(self) -> dict[str, Any]:
        """The line as the flatten's journaled body keeps it (``watch``)."""
        return {"account": self.account, "strategy": self.strategy, "contract": self.contract,
                "counted": list(self.counted)}


@dataclass
class _Owed:
    """A follow-up a start found owed (``RestoreMixin._restore_watches``): an order ``line``'s flatten counted on
    settled with quantity unfilled, and no journaled follow-up covers it (the process died before its commit).
    Issued at the broker's come-up (``Runtime._issue_owed_follow_ups``)."""

    line: _Netted
    covers: str
    """The client order id of the counted order."""
    left: int
    """Signed: what the line holds beyond flat because of it (the follow-up exits the opposite)."""
    what: str
    day: date
    """The flatten's CME trading day: a broker that comes back on a later one gets no follow-up (as no redo)."""


@dataclass
class _Withheld:
    """What one account is still owed of a flatten that withheld its exits in contracts where the account's ledger
    and its broker disagreed (``FlattenMixin._unreconciled_lines``): carried out by the first reconciliation pass
    of its broker that finds those contracts agreeing (``Runtime._redo_withheld``), the same trading day.

    Journaled in the flatten's own body (``withheld``), in the flatten's transaction, so that a crash after the
    flatten's commit cannot lose it, and read back from the journal by a start (``_restore_withheld``)."""

    origin: str
    scope: _FlattenScope
    account: str
    broker: str
    day: date
    lines: dict[tuple[str, str], int]
    """(strategy, contract) -> signed like a position, what the withheld exit there was to close (a sell of 2 is
    +2): the most the redo closes on the line, and only on that side (``_cap_to_unfilled``)."""
    counted: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    """(strategy, contract) -> client order ids in flight the withheld exit counted on as if they would fill: what
    they left unfilled moves what the line holds beyond flat (``Runtime._withheld_owed``)."""

    @property
    def contracts(self) -> set[str]:
        return {contract for _strategy, contract in self.lines}


def _withheld_body(blind: Mapping[str, Mapping[str, Any]], brokers: Mapping[str, str],
                   away: Mapping[str, list[str]]) -> dict[str, Any]:
    """The ``withheld`` field of a flatten's body: by account, its broker and the exits withheld (``blind``: what
    ``_unreconciled_lines`` took out). An account whose broker is away is left out: its broker's come-up redoes
    the whole flatten there (``_away``). So is a contract with no exit withheld: nothing there was the flatten's
    to close."""
    skip = {name for names in away.values() for name in names}
    out: dict[str, Any] = {}
    for account, contracts in sorted(blind.items()):
        if account in skip or account not in brokers:
            continue
        lines = [{"strategy": str(o["strategy"]), "contract": contract, "side": str(o["side"]),
                  "quantity": int(o["quantity"]),
                  "counted": sorted({c for n in line.get("netted", ()) if n.strategy == o["strategy"]
                                     for c in n.counted})}
                 for contract, line in sorted(contracts.items()) for o in line["exits"]]
        if lines:
            out[account] = {"broker": brokers[account], "lines": lines}
    return out


def _withheld_of(fid: str, body: Mapping[str, Any], scope: _FlattenScope, day: date) -> list[_Withheld]:
    """The debts a journaled flatten body's ``withheld`` (``_withheld_body``) says it owes."""
    out = []
    for account, entry in sorted((body.get("withheld") or {}).items()):
        lines: dict[tuple[str, str], int] = {}
        counted: dict[tuple[str, str], tuple[str, ...]] = {}
        for line in entry.get("lines") or ():
            key = (str(line["strategy"]), str(line["contract"]))
            qty = int(line["quantity"])
            lines[key] = lines.get(key, 0) + (qty if line["side"] == "sell" else -qty)
            counted[key] = counted.get(key, ()) + tuple(str(c) for c in line.get("counted") or ())
        if lines:
            out.append(_Withheld(fid, scope, str(account), str(entry["broker"]), day, lines, counted))
    return out


def _settle_covered(debts: dict[tuple[str, str], _Withheld], scope: _FlattenScope) -> None:
    """A newer flatten (an original: operator, risk, schedule) with ``scope`` ends what older withheld flattens owe
    on the lines it covers: it closed them, or withheld them again and owes them itself."""
    for key, debt in list(debts.items()):
        if scope.account is not None and scope.account != debt.account:
            continue
        for strategy, contract in list(debt.lines):
            if (scope.strategy is None or scope.strategy == strategy) and \
                    (scope.roots is None or contract_root(contract) in scope.roots):
                del debt.lines[(strategy, contract)]
        if not debt.lines:
            del debts[key]


def _settle_redone(debts: dict[tuple[str, str], _Withheld], origin: str, body: Mapping[str, Any]) -> None:
    """A journaled re-issue of flatten ``origin`` (``body``) ends what it owes the accounts it redid: a withheld
    redo the contracts it names (``withheld``: account -> contracts), a come-up's redo of missed exits every
    contract of the accounts it lists (it computed the whole scope there)."""
    redone = body.get("withheld")
    if isinstance(redone, dict):
        for account, contracts in redone.items():
            debt = debts.get((origin, str(account)))
            if debt is None:
                continue
            for key in [k for k in debt.lines if k[1] in {str(c) for c in contracts}]:
                del debt.lines[key]
            if not debt.lines:
                del debts[(origin, str(account))]
        return
    for account in body.get("accounts") or ():
        debts.pop((origin, str(account)), None)


class FlattenMixin(RuntimeState):
    """The flatten part of ``Runtime`` (see the module docstring)."""

    # -- flatten -----------------------------------------------------------------------------------------------
    async def flatten(self, *, account: str | None = None, strategy: str | None = None, reason: str,
                      flatten_id: str | None = None, instruments: Iterable[str] | None = None) -> dict[str, Any]:
        """Close positions in scope with market orders (journaled first, like any order). Exits are never blocked;
        a broker that is down records its orders as missed and keeps its positions. ``instruments``: only
        positions in these roots (a loss limit restricted to roots breached), None for all. Orders in scope decided
        before and not dispatched yet (held) are superseded: never sent (``_supersede_holds``)."""
        roots = None if instruments is None else frozenset(instruments)
        now = self.clock()
        if account is not None and account not in self.ruleset.accounts:
            raise KeyError(f"no account named {account!r}")
        fid = flatten_id or f"flatten-{_utc(now)}-{account or '*'}-{strategy or '*'}"
        if fid in self._holds or self.journal.get_signal(fid) is not None:
            # Held: the same flatten is being journaled right now (two risk checks of one breach at once).
            return {"signal_id": fid, "orders": [], "duplicate": True}
        accounts = None if account is None else {account}
        body: dict[str, Any] = {"flatten": True, "account": account, "strategy": strategy, "reason": reason}
        if roots is not None:
            body["instruments"] = sorted(roots)
        away = self._away(accounts)
        if away:  # carried out there at the come-up, on what the broker shows then (``_flatten_debts``)
            body["away"] = away
        netted: list[_Netted] = []
        self._flatten_takes_over(accounts, strategy, roots)  # signals' exit watches in scope end (``service.exits``)
        orders = self._flatten_orders(fid, accounts=accounts, strategy=strategy, roots=roots, netted=netted)
        blind = self._unreconciled_lines(orders, netted, accounts=accounts, strategy=strategy, roots=roots)
        withheld = _withheld_body(blind, {name: doc.broker for name, doc in self.ruleset.accounts.items()}, away)
        if withheld:  # owed, with the flatten itself: the first pass finding them agreeing redoes them
            body["withheld"] = withheld
        self._withheld_debts()  # read before this flatten is journaled: ``_withheld_flatten`` adds it once
        if netted:  # journaled with the flatten itself: a restart watches again (``_restore_watches``)
            body["watch"] = [line.as_json() for line in netted]
        for line in netted:  # before the first await: an order may become final at any moment after it
            for coid in line.counted:
                self._netted.setdefault(coid, []).append(line)
        try:
            decision = await self._issue_flatten(fid, body, orders, accounts=accounts, strategy=strategy,
                                                 roots=roots, now=now)
        except BaseException:
            for line in netted:
                for coid in line.counted:
                    watching = self._netted.get(coid, [])
                    if line in watching:
                        watching.remove(line)
                    if not watching:
                        self._netted.pop(coid, None)
            raise
        if self.running:
            for broker in away:  # one coming back now: its come-up may have read the journal before this flatten
                self._redo_once_open(broker)
        self._withheld_flatten(fid, body, now)
        for name, lines in sorted(blind.items()):
            await self._flatten_refused(fid, name, lines, now)
        return {"signal_id": fid, "orders": decision["orders"], "reason": reason}

    def _unreconciled_lines(self, orders: list[dict[str, Any]], netted: list[_Netted], *, accounts: set[str] | None,
                            strategy: str | None, roots: frozenset[str] | None) -> dict[str, dict[str, Any]]:
        """Take out of ``orders`` (and ``netted``) every exit in a contract where the account's last reconciliation
        found its ledger and its broker disagreeing (``on_mismatch: halt`` keeps the ledger as it was); returns, by
        account, those contracts with the exits taken out, for ``_flatten_refused``.

        Such an exit is computed from a position the broker does not hold: the ledger short 1 by hand while the
        broker is long 1 made a flatten *buy* 1, which would have left the account long 2 (fuzz seed 646). The
        policy says a person decides which side is right, so the flatten does not guess either way: it closes
        the rest of its scope and names these in a ``flatten_failed`` event. An account flatten names every such
        contract, exit or not (the ledger flat while the broker holds 2 is no flatter); a strategy's names those
        where the strategy has something to close."""
        if not self._unreconciled:
            return {}
        blind: dict[str, dict[str, Any]] = {}
        for name, contracts in self._unreconciled.items():
            if accounts is not None and name not in accounts:
                continue
            for contract, (ledger, broker) in contracts.items():
                if roots is not None and contract_root(contract) not in roots:
                    continue
                taken = [o for o in orders if o["account"] == name and o["contract"] == contract]
                if strategy is None or taken:
                    # Both sides moved alike by every fill booked since the pass: the broker's is an estimate.
                    now = self.ledger.account_position(name, contract)
                    blind.setdefault(name, {})[contract] = {"ledger": ledger, "broker": broker, "now": now,
                                                            "broker_now": broker + now - ledger, "exits": taken}
        if blind:
            for line in netted:  # what the withheld exits counted on (``_withheld_body``: owed with them)
                taken_line = blind.get(line.account, {}).get(line.contract)
                if taken_line is not None:
                    taken_line.setdefault("netted", []).append(line)
            orders[:] = [o for o in orders if o["contract"] not in blind.get(str(o["account"]), {})]
            netted[:] = [n for n in netted if n.contract not in blind.get(n.account, {})]
        return blind

    async def _flatten_refused(self, fid: str, account: str, lines: dict[str, dict[str, Any]], now: datetime) -> None:
        """A ``flatten_failed`` event for contracts the flatten did not exit because the account's ledger and its
        broker disagree there (``_unreconciled_lines``), with the halt every ``flatten_failed`` carries."""
        doc = self._account(account)
        broker = doc.broker if doc is not None else "?"
        held = "; ".join(f"{contract}: ledger {line['now']:+d}, broker {line['broker_now']:+d} (the last "
                         f"reconciliation's {line['broker']:+d} moved by the fills booked since)"
                         for contract, line in sorted(lines.items()))
        text = (f"flatten {fid} did not close {account} at {broker}: its ledger and the broker disagree ({held}); "
                f"an exit computed from either could open a position instead of closing one. Resolve the mismatch "
                f"(trade at the broker, or set on_mismatch: adopt): the first reconciliation pass that finds them "
                f"agreeing carries the flatten out there, this trading day; clearing the halt does not cancel it")
        positions = [{"contract": contract, "ledger": line["now"], "broker": line["broker_now"],
                      "exits_withheld": [{k: o[k] for k in ("strategy", "side", "quantity")} for o in line["exits"]]}
                     for contract, line in sorted(lines.items())]
        first = min(lines)
        await self._give_up(account, text, fid, now, broker=broker, settles=[], contract=first,
                            quantity=lines[first]["broker_now"], positions=positions,
                            last_reason="reconciliation mismatch", retries=0)

    async def _give_up(self, account: str, text: str, origin: str, now: datetime, **fields: Any) -> None:
        """What every ``flatten_failed`` does: log at ERROR, halt the account's entries (exits stay allowed) until
        an operator clears it or the next trading day (a halt that lasts until cleared stays so), alert, and
        journal the risk event with ``fields``."""
        log.error("%s; entries halted until an operator clears the halt", text)
        halt = self.risk.halts.get(account)
        self.risk.halt(account, text, f"flatten:{origin}", now, until_day_end=halt is None or halt.day is not None)
        self.alerts.append({"account": account, "kind": FLATTEN_FAILED, "detail": text, "at": _utc(now)})
        self._invalidate()
        await self._risk_event(account, FLATTEN_FAILED, text, f"flatten:{origin}", now, key=account, origin=origin,
                               **fields)

    # -- flattens withheld where the ledger and the broker disagreed ------------------------------------------
    def _withheld_debts(self) -> dict[tuple[str, str], _Withheld]:
        """What withheld flattens still owe, by (flatten id, account), oldest first: read from the journal at the
        first need of the process (``_restore_withheld``), then kept as flattens withhold and redo."""
        if self._withheld is None:
            self._withheld = self._restore_withheld()
        return self._withheld

    def _withheld_flatten(self, fid: str, body: Mapping[str, Any], now: datetime) -> None:
        """Flatten ``fid`` (``body``, journaled) ends what older withheld flattens owe in its scope and owes what
        it withheld itself (``_Withheld``). The debts were read before it was journaled (``flatten``)."""
        debts = self._withheld_debts()
        scope = _flatten_scope({"signal": body})
        assert scope is not None
        _settle_covered(debts, scope)
        for debt in _withheld_of(fid, body, scope, trading_day(now)):
            debts[(fid, debt.account)] = debt

    def _withheld_agreeing(self, debt: _Withheld, row: Mapping[str, Any] | None) -> set[str]:
        """The contracts of ``debt`` that the reconciliation pass of ``row`` (its account's row) found agreeing:
        not mismatched, and no order of ours on them in flight at the read or since (``OrdersAtRead.in_flux``:
        left out of the comparison, such a contract is not known to agree)."""
        if row is None:
            return set()
        mismatched = {str(m["contract"]) for m in row.get("mismatches") or ()}
        at_read = row.get("orders_at_read")
        flux = at_read.in_flux(self.tracker) if at_read is not None else set()
        return debt.contracts - mismatched - flux

    async def _withheld_after_pass(self, broker: str, rows: list[dict[str, Any]]) -> None:
        """After every reconciliation pass of ``broker`` (``reconcile_broker``: ``rows``): redo the withheld flattens
        whose contracts it found agreeing (``_redo_withheld``). At once when the broker is open and no redo or retry
        computes. Otherwise (the pass is a come-up's, a retry's or a redo's own, or the broker is paused) once the
        broker is open and the lock is free, on a pass of its own: what the lock's holder sent changes what is
        held, and a come-up's owed follow-ups and redo of missed flattens go first."""
        if self.pool is None or broker in self._withheld_pending:
            return
        debts = [d for d in self._withheld_debts().values() if d.broker == broker]
        by_account = {str(r["account"]): r for r in rows}
        if not any(self._withheld_agreeing(d, by_account.get(d.account)) for d in debts):
            return
        slot = self.pool.slots.get(broker)
        if slot is None:
            return
        if slot.available and not self._redo_guard.locked():
            async with self._redo_guard:
                await self._redo_withheld(broker, rows)
            return
        self._withheld_pending.add(broker)

        async def later() -> None:
            try:
                while slot.recovering:
                    await slot.settled.wait()
                if not slot.available or not self.running:
                    return  # down or paused: the first pass that finds it open again redoes them
                async with self._redo_guard:
                    if slot.available:
                        await self._redo_withheld(broker, await self.reconcile_broker(broker,
                                                                                      reason="withheld flatten"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a drop or a journal error: the next pass looks again
                log.warning("withheld flattens at %s not redone (%s: %s); the next reconciliation pass looks again",
                            broker, type(exc).__name__, exc)
            finally:
                self._withheld_pending.discard(broker)

        task = asyncio.create_task(later(), name=f"withheld-redo-{broker}")
        self.redo_tasks.add(task)  # cancelled by ``stop``; tests wait for it to settle
        task.add_done_callback(self.redo_tasks.discard)

    def _withheld_redos(self, debt: _Withheld) -> tuple[int, bool]:
        """How many re-issues of ``debt``'s flatten are journaled at its broker (withheld redos and come-up redos
        share the numbering: ``_redo_id``), and whether a come-up's redo of missed exits covered its account
        since (it computed the whole scope there, so nothing is owed any more)."""
        redos = self._journaled_members(debt.origin, debt.broker, _redo_id)
        return len(redos), any("withheld" not in (body := member.get("signal") or {})
                               and debt.account in (body.get("accounts") or ()) for member in redos)

    def _journaled_members(self, origin: str, broker: str,
                           make: Callable[[str, str, int], str]) -> list[dict[str, Any]]:
        """The re-issues (``make=_redo_id``) or retries (``_retry_id``) of flatten ``origin`` journaled at
        ``broker``, in their numbering's order: numbered from 1 with no gap, so the first id not journaled ends
        them."""
        members: list[dict[str, Any]] = []
        while (member := self.journal.get_signal(make(origin, broker, len(members) + 1))) is not None:
            members.append(member)
        return members

    def _withheld_owed(self, debt: _Withheld, contracts: set[str]) -> dict[tuple[str, str], int]:
        """By (strategy, contract) in ``contracts``, signed like a position: what the withheld exit was to close,
        moved by what the orders it counted on left unfilled (a counted buy rejected: the line holds that much
        less long). The most the redo closes on each line, and only on that side (``_cap_to_unfilled``)."""
        out: dict[tuple[str, str], int] = {}
        for key, quantity in debt.lines.items():
            if key[1] not in contracts:
                continue
            counted = [o for o in (self.journal.get_order(c) for c in debt.counted.get(key, ()))
                       if o is not None and o["status"] in (MISSED, REJECTED, CANCELLED)]
            out[key] = quantity + sum(_left_open(counted, self._journaled_fills(debt.account, counted)).values())
        return out

    async def _redo_withheld(self, broker: str, rows: list[dict[str, Any]]) -> list[str]:
        """Carry out, at ``broker`` (open, under the redo's lock), what withheld flattens still owe in the contracts
        the reconciliation pass of ``rows`` found agreeing; returns the ids journaled. A re-issue of the flatten,
        ``<flatten id>-redo-<broker>-<n>`` (``redo_of``; its ``withheld`` names the contracts it redid, so that
        neither this process nor a restart redoes them again), for the original's scope at that account, computed
        on the now-agreed ledger net of orders in flight and held flatten exits (``_flatten_orders``), only on the
        side of what was withheld and never more (``_cap_to_unfilled``: a signal decided since is not the
        flatten's), and never more than the broker holds (``_clamp_to_broker``). Contracts still disagreeing stay
        owed. Only on the flatten's trading day. Sent like a retry (held, superseding what is held in scope); its
        exits missed or rejected are owed a come-up's redo or a retry like any re-issue's (``_flatten_debts``)."""
        now = self.clock()
        today = trading_day(now)
        by_account = {str(r["account"]): r for r in rows}
        debts = self._withheld_debts()
        journaled: list[str] = []
        for key, debt in list(debts.items()):
            if debt.broker != broker or key not in debts:
                continue
            if debt.day != today:
                del debts[key]
                await self._lapsed(debt.account, debt.origin, debt.day, broker, now,
                                   f"withheld its exits in {', '.join(sorted(debt.contracts))} where the ledger and "
                                   f"the broker disagreed", [{"contract": c, "strategy": s, "quantity": q}
                                                             for (s, c), q in sorted(debt.lines.items())])
                continue
            agreeing = self._withheld_agreeing(debt, by_account.get(debt.account))
            if not agreeing:
                continue
            redos, settled = self._withheld_redos(debt)
            if settled:
                del debts[key]
                continue
            rid = _redo_id(debt.origin, broker, redos + 1)
            scope = debt.scope
            owed = self._withheld_owed(debt, agreeing)
            orders = self._capped_exits(rid, {debt.account}, scope, {debt.account: owed}, by_account, lines=owed)
            done = ", ".join(sorted(agreeing))
            origin_row = self.journal.get_signal(debt.origin) or {}
            reason = (f"{debt.origin} withheld at {broker} for {debt.account} in {done} (ledger and broker "
                      f"disagreed); they agree now: {origin_row.get('reason') or 'flatten'}")
            body: dict[str, Any] = {"flatten": True, "account": scope.account, "strategy": scope.strategy,
                                    "reason": reason, "redo_of": debt.origin, "broker": broker,
                                    "accounts": [debt.account], "withheld": {debt.account: sorted(agreeing)}}
            if scope.roots is not None:
                body["instruments"] = sorted(scope.roots)
            if orders:
                # Supersedes what is held in the redone contracts' roots only: the rest of the scope was closed.
                await self._issue_flatten(rid, body, orders, accounts={debt.account}, strategy=scope.strategy,
                                          roots=frozenset(contract_root(c) for c in agreeing), now=now)
            else:
                await self._journal_flatten(rid, body, [], now)  # nothing left to close: done, no order
            for line in [k for k in debt.lines if k[1] in agreeing]:
                del debt.lines[line]
            if not debt.lines:
                del debts[key]
            journaled.append(rid)
            await self._withheld_redone(debt, rid, agreeing, orders, now)
        return journaled

    async def _withheld_redone(self, debt: _Withheld, rid: str, contracts: set[str], orders: list[dict[str, Any]],
                               now: datetime) -> None:
        """Say that a withheld flatten was carried out now, and why: log, alert, and a ``flatten_redone`` risk
        event (the notifier's too). The halt its ``flatten_failed`` raised stays: an operator lifts it, as every
        such halt (the redo closes positions; it does not say the account's book is right)."""
        exits = ", ".join(f"{o['side']} {o['quantity']} {o['contract']} ({o['strategy']})" for o in orders)
        rest = sorted(debt.contracts)
        text = (f"flatten {debt.origin} withheld its exits at {debt.account} ({debt.broker}) in "
                f"{', '.join(sorted(contracts))} because the ledger and the broker disagreed there; a reconciliation "
                f"pass now finds them agreeing, so it is carried out now as {rid}: {exits or 'nothing left to close'}"
                + (f"; still withheld where they disagree: {', '.join(rest)}" if rest else "")
                + ". The halt it raised stays until an operator clears it")
        log.warning("%s", text)
        self.alerts.append({"account": debt.account, "kind": FLATTEN_REDONE, "detail": text, "at": _utc(now)})
        await self._risk_event(debt.account, FLATTEN_REDONE, text, f"flatten:{debt.origin}", now, key=debt.account,
                               origin=debt.origin, redo=rid, broker=debt.broker, contracts=sorted(contracts),
                               orders=[{k: o[k] for k in ("contract", "strategy", "side", "quantity")} for o in orders],
                               still_withheld=rest)

    async def _lapsed(self, account: str, origin: str, day: date, broker: str, now: datetime, what: str,
                      positions: list[dict[str, Any]]) -> None:
        """A flatten of an earlier trading day that ``account`` is still owed at ``broker`` (``what`` it left
        undone there; ``positions``: what is held in its scope, signed) is not carried out on a later one, since the
        flatten time it served has passed and the position may be the new session's; but it is a flatten that did
        not close, so it is a ``flatten_failed`` (alert, risk event, entries halted until an operator clears it or
        the day ends), not a log line nobody reads. ``settles``: a come-up's redo does not raise it again."""
        held = ", ".join(f"{p['contract']} {int(p['quantity']):+d} ({p['strategy']})" for p in positions)
        text = (f"flatten {origin} of trading day {day.isoformat()} {what} at {account} ({broker}); a new trading "
                f"day began before it could be carried out, so it is not: still held {held or 'nothing'}; an "
                f"operator decides")
        await self._give_up(account, text, origin, now, broker=broker, settles=[origin], positions=positions,
                            lapsed_day=day.isoformat())

    def _away(self, accounts: set[str] | None) -> dict[str, list[str]]:
        """The accounts in a flatten's scope whose broker is down or paused as it is computed, by broker.

        The flatten computes from the ledger, and the ledger does not know what happened at a broker that is away:
        a trade made by hand there (reported at the come-up, made before the flatten) is not closed by it, and the
        exits it counted on in flight there end ``missed``. So such an account is owed the flatten at its broker's
        come-up, whether or not it had an exit there (one it had is missed anyway): the redo closes what the
        account holds in scope after reconciliation (``_flatten_debts``, ``_redo_missed_flattens``)."""
        if self.pool is None:
            return {}
        away: dict[str, list[str]] = {}
        for name, doc in sorted(self.ruleset.accounts.items()):
            if (accounts is None or name in accounts) and not self.pool.available(doc.broker):
                away.setdefault(doc.broker, []).append(name)
        return away

    async def _issue_flatten(self, fid: str, body: dict[str, Any], orders: list[dict[str, Any]], *,
                             accounts: set[str] | None, strategy: str | None, roots: frozenset[str] | None,
                             now: datetime, supersede: bool = True) -> dict[str, Any]:
        """Journal flatten ``fid`` (``body``: its scope) with ``orders`` (its exits, just computed) and hand them to
        the dispatcher; returns the decision record. The operator's, the risk monitor's and the schedule's flattens
        come here, and so does a retry of rejected exits.

        Call it in the step that computed ``orders`` (``_flatten_orders``): up to its first await it supersedes
        the held orders in scope and holds its own exits, so that a signal or another flatten decided while this
        one is journaled does not exit the same positions a second time, and nothing held in scope leaves.

        The superseded orders reach the disk ``missed`` in the flatten's own transaction when their signal is on
        disk already, and in the signal's transaction when it is written later (``Journal.supersede``): either way
        never ``new`` next to the flatten, where a restart's recovery would send them (an entry reopening what the
        flatten closed), and without waiting for a commit the flatten cannot see coming."""
        superseded = self._hold_flatten(fid, orders, accounts=accounts, strategy=strategy, roots=roots,
                                        supersede=supersede)
        return await self._send_flatten(fid, body, orders, superseded, now)

    def _hold_flatten(self, fid: str, orders: list[dict[str, Any]], *, accounts: set[str] | None,
                      strategy: str | None, roots: frozenset[str] | None,
                      supersede: bool) -> dict[str, list[tuple[str, Job]]]:
        """The synchronous half of ``_issue_flatten``: supersede what is held in scope, hold the exits."""
        superseded = self._supersede_holds(fid, accounts=accounts, strategy=strategy, roots=roots) \
            if supersede else {}
        jobs = [job for job in (self._job(o, str(o["strategy"]), fid, Decimal(0)) for o in orders) if job is not None]
        self._holds[fid] = _Hold(jobs, [], flatten=True)
        for job in jobs:
            self._count_held(job, 1)
        detail = _superseded_detail(fid)
        for sid, voided in superseded.items():
            self.journal.supersede(sid, {job.client_order_id: detail for _fid, job in voided})
        self._invalidate()
        return superseded

    async def _send_flatten(self, fid: str, body: dict[str, Any], orders: list[dict[str, Any]],
                            superseded: dict[str, list[tuple[str, Job]]], now: datetime) -> dict[str, Any]:
        """The asynchronous half of ``_issue_flatten``: journal the flatten with what it superseded, then hand its
        held exits to the dispatcher."""
        detail = _superseded_detail(fid)
        try:
            decision = await self._journal_flatten(fid, body, orders, now, superseded=[
                (sid, [self._missed_row(job) for _fid, job in voided], detail) for sid, voided in superseded.items()])
        except BaseException:
            for sid, voided in superseded.items():
                self.journal.withdraw_superseded(sid, [job.client_order_id for _fid, job in voided])
            self.release(fid)
            raise
        assert self.dispatcher is not None
        self.dispatcher.submit_all(self._take_hold(fid) or [])  # held -> tracked in one step
        self._invalidate()
        return decision

    def _flatten_orders(self, fid: str, *, accounts: set[str] | None, strategy: str | None,
                        roots: frozenset[str] | None, netted: list[_Netted] | None = None) -> list[dict[str, Any]]:
        """One market exit per (account, strategy, contract) held in scope, net of orders still in flight and of the
        exits of other flattens being journaled (held). Other held orders do not count: those in scope are
        superseded by this flatten (``_supersede_holds``), and the redo of a missed flatten runs for a broker that
        takes no new orders yet.

        Orders in flight count as if they will fill, also on a line the ledger holds flat (an entry the broker has
        not filled yet): that is what the engine counts too, so from this instant every decision sees the line
        flat, and no signal decided meanwhile exits it a second time. ``netted``, when given, receives every line
        with orders in flight: an order that then does not fill as counted (rejected, or ``missed`` at a broker that
        is down or paused) leaves the line off flat by its difference, which a follow-up exit closes, held in the
        step the last of them settles, so that the engine's view stays flat throughout (``_Netted``)."""
        pending: dict[tuple[str, str, str], int] = {}
        for held in self._holds.values():
            if held.flatten:
                for job in held.jobs:
                    if self._standin_void(job):
                        continue  # its exit is held still: this flatten supersedes it, and the stand-in goes too
                    key = (job.account, job.strategy, job.contract)
                    pending[key] = pending.get(key, 0) + job.quantity * job.sign
        in_flight: dict[tuple[str, str, str], list[Tracked]] = {}
        for t in self.tracker.unsettled():
            in_flight.setdefault((t.job.account, t.job.strategy, t.job.contract), []).append(t)
        lines = self.ledger.strategy_lines()  # a manual close was booked to the strategies it closed
        for key in in_flight:
            lines.setdefault(key, 0)
        orders = []
        for (acct, strat, contract), quantity in lines.items():
            if accounts is not None and acct not in accounts:
                continue
            if strategy is not None and strat != strategy:
                continue
            if roots is not None and contract_root(contract) not in roots:
                continue
            doc = self._account(acct)
            if doc is None:
                continue
            key = (acct, strat, contract)
            flying = in_flight.get(key, [])
            counted = sum((t.job.quantity - t.filled) * t.job.sign for t in flying)
            remaining = quantity + pending.get(key, 0) + counted
            coid = client_order_id(fid, acct, f"{strat}:{contract}")
            if netted is not None and flying:
                netted.append(_Netted(fid, acct, strat, contract,
                                      counted=tuple(t.job.client_order_id for t in flying)))
            if remaining == 0:
                continue
            orders.append({"account": acct, "broker": doc.broker, "contract": contract,
                           "side": "sell" if remaining > 0 else "buy", "quantity": abs(remaining), "intent": "exit",
                           "client_order_id": coid, "strategy": strat})
        return orders

    def _netted_settled(self, tracked: Tracked) -> None:
        """An order settled (``OrderTracker.settled_hooks``). One a flatten counted on to fill what it had left: what
        it left unfilled is what the line is now off flat; close it at once (``_Netted``)."""
        coid = tracked.job.client_order_id
        runner = self._retry_runners.get(tracked.job.broker)
        if runner is not None and not runner.done():  # a retry there may wait for it (``_retry_waits``)
            self._wake_retries(tracked.job.broker)
        if coid not in self._netted:
            return
        unfilled = tracked.job.quantity - tracked.filled
        lines = self._netted.pop(coid, [])
        # Once per order, for the first flatten that counted on it: a later flatten that counted on it too counted
        # the earlier one's exit as well (which sold for it), so one follow-up closes the difference for both.
        if unfilled > 0 and lines:
            what = (f"{tracked.job.side} {tracked.job.quantity} ({tracked.job.signal_id}) ended {tracked.status} "
                    f"with {unfilled} unfilled")
            slot = None if self.pool is None else self.pool.slots.get(tracked.job.broker)
            coming_up = slot is not None and slot.recovering
            line, day = self._line_to_follow(lines) if coming_up else (lines[0], None)
            failed = self._own_exit_failed(line)
            if failed is not None:
                log.warning("%s: on %s %s (%s), %s; no follow-up: the flatten's own exit there %s, and its %s "
                            "recomputes the line from the ledger and the broker", line.fid, line.account,
                            line.contract, line.strategy, what, failed, "re-issue" if MISSED in failed else "retry")
                return
            left = -unfilled * tracked.job.sign
            if day is None:
                self._follow_up(line, left, what, covers=coid)
                return
            # Settled by its broker's come-up (recovery): owed, as after a restart, and issued by this come-up after
            # reconciliation, before the redo of missed flattens computes, capped to what the broker holds on the
            # line (``_issue_owed_follow_ups``). Sized now and sent after the come-up, it would not know of a trade
            # made by hand there meanwhile (reconciliation books it to the line it closed), and a redo capped to
            # the broker's position would not count what it adds (fuzz seed 556: the account ended long 1).
            owed = _Owed(line, coid, left, what, day)
            self._owed_follow_ups.setdefault(tracked.job.broker, []).append(owed)
            self._hold_owed(owed)  # the engine sees the line flat until the come-up issues it

    def _line_to_follow(self, lines: list[_Netted]) -> tuple[_Netted, date]:
        """Of the flattens that counted on one order (``lines``, oldest first), the one whose follow-up a come-up
        issues, and its CME trading day: the oldest of the current trading day, as a restart restores only the
        current day's watches (``RestoreMixin._restore_watches``); else the oldest, whose day is over (warned
        about, not carried out: ``_issue_owed_follow_ups``). A flatten not journaled yet is of the current day."""
        today = trading_day(self.clock())
        days = []
        for line in lines:
            row = self.journal.get_signal(line.fid)
            days.append(today if row is None else trading_day(parse_utc(str(row["received_at"]))))
            if days[-1] == today:
                return line, today
        return lines[0], days[0]

    def _own_exit_failed(self, line: _Netted) -> str | None:
        """How the flatten's own exit on ``line`` ended if it is final and did not fill in full (missed, rejected,
        cancelled), else None (filled, still in flight, or the flatten had nothing to exit there).

        Then a follow-up would buy back (or sell back) for a trade that did not happen, or not in full: the redo of
        a missed exit and the retry of a rejected one recompute the line from the ledger and the broker, with the
        counted order's outcome in it, and close what is really there. A follow-up as well would be a second
        close of the same difference, and a redo capped to the broker's position would not net it: the account would end holding what the follow-up bought (fuzz crash seed 438). While the exit is still
        in flight the follow-up goes out as usual, and a retry or redo of the exit counts it."""
        exit_id = client_order_id(line.fid, line.account, f"{line.strategy}:{line.contract}")
        tracked = self.tracker.orders.get(exit_id)
        if tracked is not None:
            status, quantity, filled = tracked.status, tracked.job.quantity, tracked.filled
        else:  # final before a restart (a start tracks the open orders only), or never journaled (no exit there)
            row = self.journal.get_order(exit_id)
            if row is None or row["status"] not in FINAL:
                return None
            status, quantity = str(row["status"]), int(row["quantity"])
            filled = quantity if status not in (MISSED, REJECTED, CANCELLED) else \
                self._journaled_fills(line.account, [row]).get(exit_id, 0)
        if status not in FINAL or filled >= quantity:
            return None
        return f"ended {status} with {quantity - filled} unfilled"

    def _follow_up_signal(self, line: _Netted, left: int, what: str, covers: str
                          ) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
        """The id, journaled body and exit of the next follow-up of ``line``'s flatten closing ``left`` (signed:
        what the line holds beyond flat) that order ``covers`` left open (``what``); None when there is nothing to
        close or the account is gone. Takes the next id (``<flatten id>-follow-<n>``)."""
        doc = self._account(line.account)
        if doc is None or left == 0:
            return None
        n = self._follow_ups[line.fid] = self._follow_ups.get(line.fid, 0) + 1
        fid = f"{line.fid}-follow-{n}"
        reason = (f"follow-up of {line.fid}: on {line.account} {line.contract} ({line.strategy}), {what}; "
                  f"closing {left:+d}")
        body: dict[str, Any] = {"flatten": True, "account": line.account, "strategy": line.strategy,
                                "instruments": [contract_root(line.contract)], "reason": reason,
                                "follow_of": line.fid, "covers": covers}
        order = {"account": line.account, "broker": doc.broker, "contract": line.contract,
                 "side": "sell" if left > 0 else "buy", "quantity": abs(left), "intent": "exit",
                 "client_order_id": client_order_id(fid, line.account, f"{line.strategy}:{line.contract}"),
                 "strategy": line.strategy}
        return fid, body, order

    def _follow_up(self, line: _Netted, left: int, what: str, *, covers: str) -> None:
        """Close ``left`` (signed: what ``line`` holds beyond flat) that a flatten left open because an order it
        counted on (``covers``) did not fill (``what``): a flatten signal of its own, ``<flatten id>-follow-<n>``,
        scoped to the line, journaled and sent like the flatten's exits (a rejected or missed one is retried or
        re-issued like theirs). It supersedes nothing: orders held now were decided after the flatten, and a new
        signal may open the line again."""
        made = self._follow_up_signal(line, left, what, covers)
        if made is None:
            return
        fid, body, order = made
        log.warning("%s: %s", fid, body["reason"])
        # Held now, in the step the order settled: the engine sees the exit from this instant, never the gap.
        self._hold_flatten(fid, [order], accounts={line.account}, strategy=line.strategy,
                           roots=frozenset(body["instruments"]), supersede=False)
        slot = None if self.pool is None else self.pool.slots.get(str(order["broker"]))

        async def send() -> None:
            try:
                while slot is not None and slot.recovering:
                    # Made as its broker's come-up began (one its recovery settles is owed instead:
                    # ``_netted_settled``): held, the come-up's redo and catch-up count it; it leaves once the broker
                    # opens, instead of being missed there meanwhile.
                    await slot.settled.wait()
                await self._send_flatten(fid, body, [order], {}, self.clock())
            except Exception:
                log.exception("%s: follow-up of flatten %s not journaled; %s %s still holds %+d", fid, line.fid,
                              line.account, line.contract, left)

        self._spawn(send())

    @staticmethod
    def _owed_hold(debt: _Owed) -> str:
        """The key of the hold standing for an owed follow-up until its come-up (never a journaled signal id)."""
        return f"owed:{debt.covers}"

    def _hold_owed(self, debt: _Owed) -> None:
        """Count an owed follow-up as a flatten exit held, from the start until its broker's come-up issues it
        (``_issue_owed_follow_ups``), as a follow-up made while its broker recovers is held: the engine, the
        portfolio's counts and best mode's holder see the line flat, as they would have without the crash, and an
        operator flatten computed meanwhile does not close the same difference again. Never dispatched."""
        self._hold_closing(self._owed_hold(debt), debt.line.account, debt.line.strategy, debt.line.contract,
                           debt.left)

    def _hold_closing(self, key: str, account: str, strategy: str, contract: str, left: int) -> None:
        """Hold, under ``key`` (never a journaled signal id), an exit closing ``left`` (signed: what the line holds
        beyond where it should) that is not sent from this hold: counted as a flatten exit held (the engine's view,
        the portfolio's counts, a flatten's pending exits), never dispatched nor superseded, until ``release``."""
        doc = self._account(account)
        if doc is None or left == 0:
            return
        job = self._job({"account": account, "broker": doc.broker, "contract": contract,
                         "side": "sell" if left > 0 else "buy", "quantity": abs(left), "intent": "exit",
                         "client_order_id": key}, strategy, key, Decimal(0))
        if job is None:
            return
        self._holds[key] = _Hold([job], [], flatten=True)
        self._count_held(job, 1)
        self._invalidate()

    async def _issue_owed_follow_ups(self, broker: str, reconciled: list[dict[str, Any]]) -> list[str]:
        """Issue the follow-ups a start found owed at ``broker`` (``_Owed``), just reconciled (``reconciled``: its
        rows), under the redo's lock and before the redo computes, so that a redo or retry of the flatten's own
        exit nets them out as in flight; returns the ids journaled. Each is capped to what the broker holds on the
        line's side, net of our orders in flight and the flatten exits held, less the other strategies' books
        (``_clamp_to_broker``): when the flatten's own exit never went out either, there is nothing to buy back,
        and it is journaled with no order (``covers`` still says it is done). Sent as recovery sends: the broker
        is not open to new orders yet."""
        owed = self._owed_follow_ups.pop(broker, [])
        by_account = {str(row["account"]): row for row in reconciled}
        journaled: list[str] = []
        jobs: list[Job] = []
        for i, debt in enumerate(owed):
            # Its stand-in ends here: the follow-up itself is held below, or nothing is sent. Before the cap is
            # computed, which counts the flatten exits held (the owed follow-ups not issued yet among them).
            self.release(self._owed_hold(debt))
            if debt.day != trading_day(self.clock()):
                await self._lapsed(debt.line.account, debt.line.fid, debt.day, broker, self.clock(),
                                   f"left {debt.line.contract} ({debt.line.strategy}) {-debt.left:+d} beyond flat "
                                   f"({debt.what}) and its follow-up was owed",
                                   [{"contract": debt.line.contract, "strategy": debt.line.strategy,
                                     "quantity": -debt.left}])
                continue
            made = self._follow_up_signal(debt.line, debt.left, debt.what, debt.covers)
            if made is None:
                continue
            fid, body, order = made
            orders = _clamp_to_broker([order], by_account, *self._clamp_basis(by_account))
            if not orders:
                body["reason"] = f"{body['reason']} (nothing left to close at {broker})"
            self._hold_flatten(fid, orders, accounts={debt.line.account}, strategy=debt.line.strategy,
                               roots=frozenset(body["instruments"]), supersede=False)
            try:
                await self._journal_flatten(fid, body, orders, self.clock())
            except BaseException:
                self.release(fid)
                self._owed_follow_ups.setdefault(broker, []).extend(owed[i:])  # the next come-up or resume
                for rest in owed[i:]:
                    if self._owed_hold(rest) not in self._holds:
                        self._hold_owed(rest)
                raise
            journaled.append(fid)
            log.warning("%s: %s (owed since a restart)", fid, body["reason"])
            for job in self._take_hold(fid) or []:  # held -> tracked in one step
                self.tracker.track(job)
                jobs.append(job)
            self._invalidate()
        await self._send_come_up(jobs, broker, "follow-up")
        return journaled

    async def _journal_flatten(self, fid: str, body: dict[str, Any], orders: list[dict[str, Any]],
                               now: datetime, *,
                               superseded: Iterable[tuple[str, list[dict[str, Any]], str]] = ()) -> dict[str, Any]:
        """Journal a flatten signal (``body``: its scope) with its exits; a flatten with none is journaled too
        (``decided``): its id is what makes a repeat of the same flatten a no-op. ``superseded``: (signal id,
        orders, detail) of held orders it superseded, journaled ``missed`` in the same transaction."""
        strategy, reason = body.get("strategy"), str(body.get("reason"))
        legs = [{k: v for k, v in o.items() if k != "strategy"} for o in orders]
        decision = {"signal_id": fid, "strategy": strategy or "(flatten)", "accepted": bool(orders), "rule": None,
                    "blocked_by": None, "reason": reason, "order_type": "market", "price": None,
                    "orders": legs, "skipped": [], "cancel": [],
                    "ruleset": ruleset_ref(self.ruleset.content_hash, self._rules_generation())}
        # The journaled orders keep each exit's strategy (the decision record's legs have no such field): a restart
        # with an exit still in flight must book its fill to the strategy it closes, not to "(flatten)".
        await self.journal.record_signal(raw=json.dumps(body), remote=None,
                                         status="accepted" if orders else "decided", reason=reason, key=None,
                                         signal={**body, "strategy": strategy or "(flatten)"}, decision=decision,
                                         orders=orders, signal_id=fid, at=now, missed=list(superseded))
        return decision

    async def _fire_schedule(self, firing: Firing) -> None:
        rule = firing.rule
        stamp = _utc(firing.at)
        accounts = list(rule.accounts) if rule.accounts else [None]
        strategies = list(rule.strategies) if rule.strategies else [None]
        for account in accounts:
            for strategy in strategies:
                await self.flatten(account=account, strategy=strategy, reason=f"schedule {rule.name} at {stamp}",
                                   flatten_id=f"flatten-{rule.name}-{stamp}-{account or '*'}-{strategy or '*'}")

    # -- held orders a flatten supersedes ----------------------------------------------------------------------
    def _supersede_holds(self, fid: str, *, accounts: set[str] | None, strategy: str | None,
                         roots: frozenset[str] | None) -> dict[str, list[tuple[str, Job]]]:
        """Take the held orders in a flatten's scope out of their holds: they are never sent.

        A decision held now was made before the flatten (its signal awaits its journal commit, or its answer is
        being written); dispatched after it, its entry would reopen what the flatten closes, and its exit would
        sell a second time next to the flatten's own (a double exit: the account ends short). The flatten
        computes from the ledger and the orders in flight, never from held orders, so dropping them leaves it
        exact. Held orders outside the scope (other accounts, strategies or roots) go out as usual; the hold
        itself stays until ``dispatch`` or ``release`` ends it, or the dispatch would hold the decision anew.
        Returns the superseded orders by signal id (the flatten journals them ``missed`` with itself)."""
        superseded: dict[str, list[tuple[str, Job]]] = {}
        for sid, held in self._holds.items():
            if held.flatten:
                continue  # another flatten's exits: they close, and this flatten nets them out
            keep = []
            for job in held.jobs:
                if (accounts is not None and job.account not in accounts) or \
                        (strategy is not None and job.strategy != strategy) or \
                        (roots is not None and contract_root(job.contract) not in roots):
                    keep.append(job)
                    continue
                self._count_held(job, -1)
                if job.client_order_id in held.reserved:
                    held.reserved.remove(job.client_order_id)
                    self._drop_reservation(job.client_order_id)
                superseded.setdefault(sid, []).append((fid, job))
                log.warning("%s: %s %s %d %s superseded by flatten %s before it was sent; never sent", sid,
                            job.account, job.side, job.quantity, job.contract, fid)
            held.jobs = keep
        for voided in superseded.values():
            for _fid, job in voided:
                self._unwatch_exit(job.client_order_id)  # never sent: nothing to make good, no stand-in
        if superseded:
            self._invalidate()
        return superseded

    @staticmethod
    def _missed_row(job: Job) -> dict[str, Any]:
        """A superseded order as ``Journal.record_orders`` takes it."""
        return {"client_order_id": job.client_order_id, "account": job.account, "broker": job.broker,
                "contract": job.contract, "side": job.side, "quantity": job.quantity, "intent": job.intent,
                "margin_usd": job.margin_usd}

    # -- flattens a broker missed ------------------------------------------------------------------------------
    def _missed_flattens(self, broker: str, now: datetime) -> list[_Debt]:
        """Flattens whose exits at ``broker`` were missed and not re-issued since, oldest first (``_Debt.missed``:
        the accounts still owed; the next attempt is ``redos + 1``).

        A re-issue (or a retry) is itself a flatten whose exits may be missed (the broker dropped again): then its
        accounts are owed once more, by the next attempt. A re-issue that reached them, or found nothing left to
        close, settles the original at this broker for good (``_flatten_debts``)."""
        return [debt for debt in self._flatten_debts(broker, now) if debt.missed]

    def _flatten_debts(self, broker: str, now: datetime) -> list[_Debt]:
        """What ``broker``'s accounts are still owed of each flatten of the last ``REDO_LOOKBACK``, oldest first,
        read from the journal (so that a restart owes exactly what the process before it did).

        A flatten's family at a broker is the original and its journaled re-issues (``-redo-``) and retries
        (``-retry-``). For each account, the latest member that covered it (had exits for it there, or listed it
        as owed and found nothing left) decides (``_exit_outcome``): missed exits owe a redo, rejected ones a retry
        unless a ``flatten_failed`` event already gave up on that member, anything else nothing. One account is
        therefore owed a redo or a retry, never both, and never twice for the same outcome."""
        horizon = now - REDO_LOOKBACK
        sids: set[str] = set()
        for order in self.journal.orders(status=[MISSED, REJECTED, CANCELLED], updated_since=horizon):
            if order["broker"] == broker and order.get("intent") == "exit":
                sids.add(str(order["signal_id"]))
        origins: dict[str, dict[str, Any]] = {}
        for flat in self.journal.flattens_away_since(trading_day_start(now)):  # away at the broker (``_away``)
            if broker in (flat["signal"].get("away") or {}):
                sids.add(str(flat["id"]))
        for sid in sids:
            row = self.journal.get_signal(sid)
            scope = None if row is None else _flatten_scope(row)
            if row is None or scope is None:
                continue
            origin = scope.origin or sid
            if origin not in origins:
                first = row if origin == sid else self.journal.get_signal(origin)
                if first is not None:
                    origins[origin] = first
        failed = {(str(settled), str(row.get("name")))
                  for row in self.journal.risk_events_since(horizon, kinds=[FLATTEN_FAILED])
                  if row.get("broker") == broker for settled in row.get("settles") or ()}
        debts = []
        for origin, first in origins.items():
            debt = _Debt(origin, first)
            members = [(first, 0)]
            redos = self._journaled_members(origin, broker, _redo_id)
            retries = self._journaled_members(origin, broker, _retry_id)
            debt.redos, debt.retries = len(redos), len(retries)
            members += [(m, 1) for m in redos] + [(m, 2) for m in retries]
            latest: dict[str, tuple[dict[str, Any], str, list[dict[str, Any]]]] = {}
            for member, _rank in sorted(members, key=lambda m: (str(m[0]["received_at"]), m[1])):
                exits: dict[str, list[dict[str, Any]]] = {}
                for order in member.get("orders") or ():
                    if order["broker"] == broker and order.get("intent") == "exit":
                        exits.setdefault(str(order["account"]), []).append(order)
                body = member.get("signal") or {}
                listed = body.get("accounts") if member is not first else (body.get("away") or {}).get(broker)
                for account in set(exits) | {str(a) for a in listed or ()}:
                    mine = exits.get(account, [])
                    # An account the original found away and had no exit for is owed it as if its exit was missed.
                    outcome = _MISSED_EXIT if member is first and not mine else _exit_outcome(mine)
                    latest[account] = (member, outcome, mine)
            blind = {str(a) for a in ((first.get("signal") or {}).get("away") or {}).get(broker) or ()}
            for account, (member, outcome, mine) in sorted(latest.items()):
                if outcome == _MISSED_EXIT:
                    if (origin, account) not in failed:  # else given up on a later trading day (``_lapsed``)
                        debt.missed.add(account)
                        if account not in blind or not (member is first or _come_up_redo(member)):
                            debt.missed_exits[account] = str(member["id"])
                elif outcome == _REJECTED_EXIT and (str(member["id"]), account) not in failed:
                    debt.rejected[account] = str(member["id"])
                    last = max((o for o in mine if o["status"] in (REJECTED, CANCELLED)),
                               key=lambda o: str(o["updated_at"]))
                    debt.reason = str(last.get("detail") or last["status"])
            if debt.missed or debt.rejected:
                debts.append(debt)
        debts.sort(key=lambda d: str(d.row["received_at"]))
        return debts

    async def _redo_missed_flattens(self, broker: str, reconciled: list[dict[str, Any]] | None = None, *,
                                    why: str) -> list[str]:
        """Carry out, for ``broker``'s accounts, this trading day's flattens whose exits they missed (see the
        module docstring), after the follow-ups a start found owed there (``_issue_owed_follow_ups``); returns the
        ids of the flatten signals journaled. The broker must be connected; its recovery ran (``reconciled``: the
        rows of the reconciliation that followed it; None: reconcile first, as after an operator's pause). Exits
        are sent as recovery sends (the broker is not open to new orders yet): a webhook's entry cannot slip in
        between and be closed by them."""
        async with self._redo_guard:
            now = self.clock()
            owed = self._missed_flattens(broker, now)
            if not owed and not self._owed_follow_ups.get(broker):
                return []
            if reconciled is None:
                reconciled = await self.reconcile_broker(broker, reason=why)
            # Follow-ups a restart found owed first: the redo below counts them as in flight.
            journaled = await self._issue_owed_follow_ups(broker, reconciled)
            by_account = {str(row["account"]): row for row in reconciled}
            today = trading_day(now)
            jobs: list[Job] = []
            for debt in owed:
                origin, row, accounts = debt.origin, debt.row, debt.missed
                scope = _flatten_scope(row)
                assert scope is not None
                received = parse_utc(str(row["received_at"]))
                if trading_day(received) != today:
                    newer = [(_flatten_scope(d.row), d.missed) for d in owed
                             if trading_day(parse_utc(str(d.row["received_at"]))) == today]
                    left: dict[str, list[dict[str, Any]]] = {}
                    for order in self._flatten_orders(origin, accounts=accounts, strategy=scope.strategy,
                                                      roots=scope.roots):
                        if any(s is not None and order["account"] in a and s.strategy in (None, scope.strategy)
                               and (s.roots is None or (scope.roots is not None and scope.roots <= s.roots))
                               for s, a in newer):
                            continue  # a flatten of today redone here closes it: nothing has failed
                        left.setdefault(str(order["account"]), []).append(
                            {"contract": order["contract"], "strategy": order["strategy"],
                             "quantity": int(order["quantity"]) * (1 if order["side"] == "sell" else -1)})
                    for account, positions in sorted(left.items()):
                        await self._lapsed(account, origin, trading_day(received), broker, now,
                                           "missed its exits there", positions)
                    continue
                rid = _redo_id(origin, broker, debt.redos + 1)
                # As a retry is capped: what a signal decided after the flatten opened (the broker was open for it
                # between the flatten and the drop that lost its exit) is not the flatten's to close, and a trade by
                # hand the ledger does not know of is not to be sold into.
                orders = self._capped_exits(rid, accounts, scope, self._missed_unfilled(debt, broker), by_account)
                reason = (f"{origin} missed at {broker} ({why}); re-issued for {', '.join(sorted(accounts))}: "
                          f"{row.get('reason') or 'flatten'}")
                body: dict[str, Any] = {"flatten": True, "account": scope.account, "strategy": scope.strategy,
                                        "reason": reason, "redo_of": origin, "broker": broker,
                                        "accounts": sorted(accounts)}
                if scope.roots is not None:
                    body["instruments"] = sorted(scope.roots)
                await self._journal_flatten(rid, body, orders, now)
                journaled.append(rid)
                log.warning("%s: %s", rid, reason if orders else f"{reason} (nothing left to close)")
                for order in orders:
                    job = self._job(order, str(order["strategy"]), rid, Decimal(0))
                    if job is not None:
                        self.tracker.track(job)  # counted as in flight before anything else decides
                        jobs.append(job)
                self._invalidate()
            await self._send_come_up(jobs, broker, "exits")
            return journaled

    async def _send_come_up(self, jobs: list[Job], broker: str, what: str) -> None:
        """Send, as recovery sends (the broker is not open to new orders yet), exits journaled during its come-up;
        a drop stops at the first failure: the rest stay ``new``, and the next come-up's recovery looks them up
        and sends them."""
        for job in jobs:
            try:
                await self._send_recovered(job)
            except BrokerError as exc:
                log.warning("%s: %s not sent, %s dropped again (%s); the next come-up sends them", job.signal_id,
                            what, broker, exc)
                break

    # -- flatten exits a broker rejected -----------------------------------------------------------------------
    def _wake_retries(self, broker: str) -> None:
        """Something may have changed what ``broker`` is owed (an exit rejected or cancelled, a come-up, a resume):
        let its retry task look again, starting one if none runs. Synchronous: status hooks call it."""
        if not self.running or self.pool is None or broker not in self.pool.slots:
            return
        wake = self._retry_wake.get(broker)
        if wake is None:
            wake = self._retry_wake[broker] = asyncio.Event()
        wake.set()
        task = self._retry_runners.get(broker)
        if task is None or task.done():
            task = asyncio.create_task(self._retry_loop(broker), name=f"flatten-retry-{broker}")
            self._retry_runners[broker] = task
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _retry_due(self, broker: str, debt: _Debt) -> datetime:
        """When the next retry of ``debt``'s rejected exits is due: its backoff after this process first saw the
        rejection (after a restart: after the broker's come-up); at once when the retries ran out
        (``_retry_flattens`` then gives up, after one more look at the broker)."""
        delays = self.flatten_retry_delays_s
        attempt = debt.retries + 1
        at = self._retry_seen.setdefault(debt.state(broker), self.clock())
        return at if attempt > len(delays) else at + timedelta(seconds=delays[attempt - 1])

    async def _retry_loop(self, broker: str) -> None:
        """Wait for the next retry due at ``broker`` and run it, until nothing is owed there. A broker that is down
        or paused ends the loop: its come-up (after recovery, reconciliation and the redo of missed exits) or its
        resume starts a new one, so a retry never races a come-up."""
        assert self.pool is not None
        slot = self.pool[broker]
        wake = self._retry_wake[broker]
        while self.running:
            wake.clear()  # before reading the journal: a rejection journaled from now on wakes the wait below
            if slot.recovering:
                await slot.settled.wait()
                continue
            if not slot.available:
                return
            try:
                now = self.clock()
                owed = [debt for debt in self._flatten_debts(broker, now) if debt.rejected]
                states = {debt.state(broker) for debt in owed}
                for state in [k for k in self._retry_seen if k[0] == broker and k not in states]:
                    del self._retry_seen[state]  # settled (or moved on to the next attempt)
                dues = [self._retry_due(broker, debt) for debt in owed if not self._retry_waits(debt, broker, now)]
                if not dues:
                    if owed:  # each waits for orders in flight: their settling wakes this loop; and a look
                        # every second, so that the end of the trading day (give up) is not missed either
                        try:
                            await asyncio.wait_for(wake.wait(), RETRY_WAIT_LOOK_S)
                        except TimeoutError:
                            pass
                        continue
                    return
                wait = (min(dues) - now).total_seconds()
                if wait > 0:
                    try:
                        await asyncio.wait_for(wake.wait(), wait)
                    except TimeoutError:
                        pass
                    continue
                await self._retry_flattens(broker)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broker drop or a journal error: look again shortly
                pause = min(self.flatten_retry_delays_s or (1.0,))
                level = logging.WARNING if isinstance(exc, BrokerError) else logging.ERROR
                log.log(level, "flatten retries at %s failed (%s: %s); looking again in %gs", broker,
                        type(exc).__name__, exc, pause, exc_info=level == logging.ERROR)
                await asyncio.sleep(pause)

    def _retry_waits(self, debt: _Debt, broker: str, now: datetime) -> bool:
        """Whether the retry of ``debt`` at ``broker`` waits for orders still in flight on the lines it may close
        (its accounts there, in its scope): computed now, it would count them as if they will fill, and one that
        then did not would leave the line off flat with nobody watching it (the retry's exit is no flatten's
        watched line), or, capped, short of what it counted. Once they settle, the retry computes from what they
        did (``_counted_undone``). Not past the flatten's trading day: then it gives up as usual."""
        if trading_day(parse_utc(str(debt.row["received_at"]))) != trading_day(now):
            return False
        scope = _flatten_scope(debt.row)
        assert scope is not None
        return any(t.job.broker == broker and t.job.account in debt.rejected
                   and (scope.strategy is None or t.job.strategy == scope.strategy)
                   and (scope.roots is None or contract_root(t.job.contract) in scope.roots)
                   for t in self.tracker.unsettled())

    async def _retry_flattens(self, broker: str) -> list[str]:
        """Retry, at ``broker``, the flatten exits it rejected whose backoff is over (see the module docstring);
        returns the ids of the retry signals journaled.

        Under the lock of the redo of missed flattens: the two never compute at once, and each nets out the
        other's exits in flight. The broker is reconciled first (the ledger alone may be stale: the position may
        have been closed at the broker meanwhile), and the exits never exceed what it holds (``_clamp_to_broker``)."""
        assert self.pool is not None
        async with self._redo_guard:
            if not self.pool.available(broker):
                return []
            now = self.clock()
            due = [d for d in self._flatten_debts(broker, now) if d.rejected and self._retry_due(broker, d) <= now
                   and not self._retry_waits(d, broker, now)]
            if not due:
                return []
            by_account = {str(row["account"]): row
                          for row in await self.reconcile_broker(broker, reason="flatten retry")}
            unfilled = {debt.origin: self._rejected_unfilled(debt, broker) for debt in due}
            now = self.clock()
            journaled: list[str] = []
            for debt in due:
                scope = _flatten_scope(debt.row)
                assert scope is not None
                attempt = debt.retries + 1
                rid = _retry_id(debt.origin, broker, attempt)
                accounts = set(debt.rejected)
                # Per debt, in the step that computes its exits: the retries issued before it count.
                orders = self._capped_exits(rid, accounts, scope, unfilled[debt.origin], by_account)
                day = trading_day(parse_utc(str(debt.row["received_at"])))
                late = day != trading_day(now)
                if orders and (late or attempt > len(self.flatten_retry_delays_s)):
                    why = (f"its trading day {day.isoformat()} ended before the retries closed it" if late else
                           f"the broker rejected the exits and {attempt - 1} retries")
                    await self._flatten_failed(debt, broker, orders, now, why=why)
                    accounts -= {str(o["account"]) for o in orders}
                    if not accounts:
                        continue
                    orders = []  # the other accounts had nothing left: settled below, with no order
                body: dict[str, Any] = {
                    "flatten": True, "account": scope.account, "strategy": scope.strategy, "retry_of": debt.origin,
                    "broker": broker, "accounts": sorted(accounts),
                    "reason": (f"{debt.origin} rejected at {broker} for {', '.join(sorted(accounts))} "
                               f"({debt.reason or 'no reason given'}); retry {attempt}: "
                               f"{debt.row.get('reason') or 'flatten'}")}
                if scope.roots is not None:
                    body["instruments"] = sorted(scope.roots)
                if orders:
                    # A flatten of its own: held and superseding what is held in scope, like the original.
                    await self._issue_flatten(rid, body, orders, accounts=accounts, strategy=scope.strategy,
                                              roots=scope.roots, now=now)
                else:
                    await self._journal_flatten(rid, body, [], now)  # nothing left to close: settled, no order
                journaled.append(rid)
                log.warning("%s: %s%s", rid, body["reason"], "" if orders else " (nothing left to close)")
            return journaled

    def _journaled_fills(self, account: str, rows: list[dict[str, Any]]) -> dict[str, int]:
        """Contracts filled per client order id, for the ``cancelled`` ones among ``account``'s journaled order
        ``rows`` (a rejected or missed order filled nothing; a cancelled one may have, in part: the fills table
        says). Looked up from ten minutes before the first was created: a fill's time is the broker's clock."""
        cancelled = [o for o in rows if o["status"] == CANCELLED]
        if not cancelled:
            return {}
        since = min(parse_utc(str(o["created_at"])) for o in cancelled) - timedelta(minutes=10)
        return self.journal.filled_quantities(account, since, [str(o["client_order_id"]) for o in cancelled])

    def _rejected_unfilled(self, debt: _Debt, broker: str) -> dict[str, dict[tuple[str, str], int]]:
        """What the rejected (or cancelled) exits a retry of ``debt`` retries left unfilled, by account and then
        (strategy, contract), signed like a position (a sell's unfilled quantity is a long still held): the most a
        retry closes per line (``_cap_to_unfilled``). Read from the journal, like the debt itself: a restart
        retries exactly what the process before it would have. An account whose rejected exits do not name their
        strategy (orders journaled before exits kept it) is left out: its retry closes the whole line in scope."""
        return self._left_unfilled(debt.rejected, broker, (REJECTED, CANCELLED))

    def _missed_unfilled(self, debt: _Debt, broker: str) -> dict[str, dict[tuple[str, str], int]]:
        """What the exits a redo of ``debt`` carries out again left unfilled (``_Debt.missed_exits``: missed, and
        any rejected or cancelled next to them, which a redo closes too), as ``_rejected_unfilled``: the most the
        redo closes per line. An account its original found away is left out: the redo closes its whole scope."""
        return self._left_unfilled(debt.missed_exits, broker, (MISSED, REJECTED, CANCELLED))

    def _left_unfilled(self, owed: Mapping[str, str], broker: str,
                       statuses: tuple[str, ...]) -> dict[str, dict[tuple[str, str], int]]:
        """By account and then (strategy, contract), signed like a position: what the exits at ``broker`` of the
        flatten signal ``owed`` names per account, those ended in one of ``statuses``, left unfilled, plus what the
        orders it counted on left undone with no follow-up (``_counted_undone``)."""
        out: dict[str, dict[tuple[str, str], int]] = {}
        for account, sid in owed.items():
            rows = [o for o in self.journal.orders(signal_id=sid) if str(o["account"]) == account
                    and o["broker"] == broker and o.get("intent") == "exit" and o["status"] in statuses]
            if any(not o.get("strategy") for o in rows):
                continue
            lines = _left_open(rows, self._journaled_fills(account, rows))
            for key, undone in self._counted_undone(sid, account).items():
                lines[key] = lines.get(key, 0) + undone
            out[account] = lines
        return out

    def _counted_undone(self, sid: str, account: str) -> dict[tuple[str, str], int]:
        """By (strategy, contract), signed like a position: what the orders flatten signal ``sid`` counted on in
        ``account`` (its journaled ``watch``) left unfilled with no follow-up covering it: they settled after its
        exit there had failed (``_own_exit_failed``: no follow-up), so the line holds that much more (or less)
        beyond flat than the exit was sized for. Part of what the retry closes (``_rejected_unfilled``): sized on
        the counted orders filling, the rejected exit left open on a sell counted on a long line less than the line
        holds, and capped to it the retry left the rest owed by nobody."""
        row = self.journal.get_signal(sid)
        watch = [item for item in ((row or {}).get("signal") or {}).get("watch") or ()
                 if str(item["account"]) == account]
        if row is None or not watch:
            return {}
        covered = self.journal.covered_since(trading_day_start(parse_utc(str(row["received_at"]))))
        out: dict[tuple[str, str], int] = {}
        for item in watch:
            orders = [o for o in (self.journal.get_order(str(c)) for c in item["counted"] if str(c) not in covered)
                      if o is not None and o["status"] in (MISSED, REJECTED, CANCELLED)]
            key = (str(item["strategy"]), str(item["contract"]))
            for undone in _left_open(orders, self._journaled_fills(account, orders)).values():
                out[key] = out.get(key, 0) + undone
        return out

    def _capped_exits(self, fid: str, accounts: set[str], scope: _FlattenScope,
                      unfilled: Mapping[str, Mapping[tuple[str, str], int]], by_account: dict[str, dict[str, Any]],
                      *, lines: Iterable[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """The exits of a flatten carried out again (``fid``: a retry, a come-up's redo, a withheld redo) for
        ``accounts`` in the original's ``scope``, computed in this step from the ledger net of orders in flight and
        held flatten exits (``_flatten_orders``), only on the ``lines`` given (None: every line in scope), never
        more on a line than what the exits it carries out left ``unfilled`` there (``_cap_to_unfilled``), and
        never more than the broker holds, net of our orders in flight and of what the capped lines keep back
        (``_clamp_to_broker``; ``by_account``: the reconciliation just run, by account)."""
        computed = self._flatten_orders(fid, accounts=accounts, strategy=scope.strategy, roots=scope.roots)
        if lines is not None:
            wanted = set(lines)
            computed = [o for o in computed if (str(o["strategy"]), str(o["contract"])) in wanted]
        capped = _cap_to_unfilled(computed, unfilled)
        return _clamp_to_broker(capped, by_account, *self._clamp_basis(by_account), kept=_kept_back(computed, capped))

    def _clamp_basis(self, by_account: Mapping[str, Mapping[str, Any]]
                     ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], dict[str, int]]]:
        """What ``_clamp_to_broker`` nets against the positions a reconciliation read (``by_account``: its rows by
        account): (``pending``, ``books``), both by (account, contract).

        ``pending``: what our orders may still add to each position read, from how they stood at the read
        (``OrdersAtRead``: an order that filled in between is in neither the answer nor what is in flight now),
        plus the flatten exits held and not tracked yet (another flatten, retry or follow-up being journaled: it
        closes as much). ``books``: each strategy's book with its orders in flight and those held exits. The retry
        and the follow-ups owed after a restart cap against the same basis, so that neither sells into a position
        closed by hand while another flatten's exit is on its way."""
        pending = {(account, contract): qty for account, row in by_account.items()
                   for contract, qty in row["orders_at_read"].unfilled(self.tracker).items()}
        books = self._strategy_books(in_flight=True)
        for held in self._holds.values():
            if held.flatten:
                for job in held.jobs:
                    key, qty = (job.account, job.contract), job.quantity * job.sign
                    pending[key] = pending.get(key, 0) + qty
                    by = books.setdefault(key, {})
                    by[job.strategy] = by.get(job.strategy, 0) + qty
        return pending, books

    def _strategy_books(self, *, in_flight: bool) -> dict[tuple[str, str], dict[str, int]]:
        """By (account, contract): each line's position there (a strategy's ledger book, a manual close of it booked
        to it: ``Ledger._book_manual``; a position opened by hand, under no strategy) and, ``in_flight``, its orders
        not settled yet: what ``_outside`` subtracts from a broker's position."""
        books: dict[tuple[str, str], dict[str, int]] = {}
        for (acct, strat, contract), quantity in self.ledger.strategy_lines().items():
            by = books.setdefault((acct, contract), {})
            by[strat] = by.get(strat, 0) + quantity
        if in_flight:  # the tracker keeps it per strategy as orders come and go
            for acct in self.ruleset.accounts:
                for strat, lines in self.tracker.strategy_exposure(acct).items():
                    for contract, qty in lines.items():
                        by = books.setdefault((acct, contract), {})
                        by[strat] = by.get(strat, 0) + qty
        return books

    async def _flatten_failed(self, debt: _Debt, broker: str, orders: list[dict[str, Any]], now: datetime, *,
                              why: str) -> None:
        """Give up retrying ``debt``'s rejected exits for the accounts of ``orders`` (what they still hold in
        scope): journal a ``flatten_failed`` risk event each, log at ERROR, and halt their entries (exits stay
        allowed) until an operator clears the halt or the next trading day, as any halt."""
        for account in sorted({str(o["account"]) for o in orders}):
            legs = [o for o in orders if o["account"] == account]
            positions = [{"contract": o["contract"], "strategy": o["strategy"],
                          "quantity": int(o["quantity"]) if o["side"] == "sell" else -int(o["quantity"])}
                         for o in legs]
            held = ", ".join(f"{p['contract']} {p['quantity']:+d} ({p['strategy']})" for p in positions)
            text = (f"flatten {debt.origin} could not close {account} at {broker}: {why}; still held: {held}; "
                    f"last rejection: {debt.reason or 'no reason given'}")
            await self._give_up(account, text, debt.origin, now, broker=broker, settles=[debt.rejected[account]],
                                contract=positions[0]["contract"], quantity=positions[0]["quantity"],
                                positions=positions, last_reason=debt.reason, retries=debt.retries)
