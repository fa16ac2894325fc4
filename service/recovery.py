"""A broker's come-up: recovery of orders in flight, reconciliation and catch-up.

Recovery is the same code path at start-up and after a reconnect (``_recover``): orders the journal holds as in
flight are looked up at the broker by client order id; found, their state is adopted; not found, an order that
never left (``new``) or whose fate is unknown after a crash is sent (the broker holds none, so this cannot
duplicate), while an order whose request failed during a drop in this run becomes ``missed`` (catch-up converges
accounts that want it). Then the broker is reconciled, accounts with ``catch_up`` converge to their strategies'
last targets (or to flat, when a flatten fired meanwhile), and only then does the broker take new orders. Mirror
entries the engine skipped because their broker was down or paused are journaled as ``missed`` orders too (what
the account would have received), so the journal shows which accounts fell behind their strategy; a broker's
first come-up after a start reads them back, so a target missed before a restart is caught up after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from itertools import islice
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Iterable, Mapping

from brokers.base import BrokerError
from engine.decision import Decision
from engine.model import Account
from engine.schedule import FLATTEN, firings
from engine.sessions import trading_day, trading_day_start
from engine.signal import parse_signal
from engine.symbols import SymbolError, resolve
from service import reconcile
from service.dispatch import (
    CANCELLED,
    FINAL,
    IN_FLIGHT,
    MISSED,
    NEW,
    REJECTED,
    SENDING,
    UNKNOWN,
    WORKING,
    Job,
    OrderTracker,
    Tracked,
)
from service.flatten import _flatten_scope
from service.ledger import EXTERNAL_STRATEGY, Arrivals
from service.journal import parse_utc
from service.runtime_state import SIGNAL_FIELDS, RuntimeState, _utc

log = logging.getLogger("service.runtime")
"""The runtime's one logger, whichever of its modules logs (operators filter and read it by that name)."""

PLACING_WAIT_S = 30.0
"""How long a come-up waits for an order whose request this process still has under way (its rate-limit retries
included) before leaving it unjudged."""

_GONE = frozenset({REJECTED, CANCELLED, MISSED})
"""Final states in which an order fills nothing more (what it filled before stays filled)."""


@dataclass(frozen=True)
class OrdersAtRead:
    """Our orders of one account as they stood the moment before its broker was asked for its positions.

    The position the broker answers holds every fill booked here by that moment. Of a fill booked later it may or
    may not hold anything (the fill happened before or after the broker read its book; its report came after), and
    the answer is used only after more awaits (the account snapshot, the journal, the other accounts, the retry's
    own computation), while fills keep arriving. Our orders must therefore be read as of that moment, not when the
    answer is used: counted then, an order that fills in between is in neither the answer nor what is still in
    flight, and a retry capped at "broker position + in flight" closes that much too little and settles, leaving
    the line open with nothing to say so (fuzz seed 53)."""

    account: str
    known: int
    """How many orders the tracker held then: it only ever adds (``OrderTracker.orders`` keeps insertion order),
    so the ones tracked since are those after this many (each counts in full)."""
    booked: Mapping[str, int]
    """Client order id -> quantity it had booked then, for each of them not final then (a final one is in the
    answer already: the broker reported it done before it was asked)."""

    @classmethod
    def take(cls, account: str, tracker: OrderTracker) -> OrdersAtRead:
        """Call it in the step that sends the request for the positions (no await in between). Reads only the
        orders not settled (``unsettled``: every order not final is), not the day's whole history."""
        return cls(account, len(tracker.orders),
                   {t.job.client_order_id: t.filled for t in tracker.unsettled()
                    if t.job.account == account and t.status not in FINAL})

    def _since(self, tracker: OrderTracker) -> Iterable[Tracked]:
        """The account's orders not final at the read, or tracked since."""
        orders = tracker.orders
        for coid in self.booked:
            yield orders[coid]
        for t in islice(orders.values(), self.known, None):
            if t.job.account == self.account:
                yield t

    def unfilled(self, tracker: OrderTracker) -> dict[str, int]:
        """By contract, signed: what our orders may yet add to the position the broker answered. Each counts
        everything it had left at the read (all of it, if tracked since), whether or not it filled since: a fill
        the answer did hold then counts twice, which loosens a cap on an exit and never tightens it. An order that
        ended rejected, cancelled or missed counts only what it filled since."""
        out: dict[str, int] = {}
        for t in self._since(tracker):
            job = t.job
            before = self.booked.get(job.client_order_id, 0)
            left = t.filled - before if t.status in _GONE else job.quantity - before
            if left:
                out[job.contract] = out.get(job.contract, 0) + left * job.sign
        return out

    def in_flux(self, tracker: OrderTracker) -> set[str]:
        """Contracts whose position may differ between the broker's answer and the ledger for no fault: an order
        on them was not final at the read, or was tracked since (its fill may be booked here and not in the
        answer), or is not all booked yet (``OrderTracker.unsettled``: in the answer, not in the ledger)."""
        return {t.job.contract for t in self._since(tracker)} | \
            {t.job.contract for t in tracker.unsettled() if t.job.account == self.account}


class RecoveryMixin(RuntimeState):
    """The come-up, recovery, reconciliation and catch-up part of ``Runtime`` (see the module docstring)."""

    arrivals: Arrivals
    """When the latest entry of each account and contract was booked (``Runtime``'s): an adoption goes after it."""

    # -- failover ----------------------------------------------------------------------------------------------
    async def _on_down(self, broker: str) -> None:
        self._invalidate()
        if self.running and self.pool is not None:  # not while the service stops and closes its connections
            self.notifier.notify("broker_down", f"{self.pool[broker].reason}; its accounts miss what is decided "
                                 "until it is back, positions there stay open", at=self.clock(), broker=broker)

    async def _on_up(self, broker: str) -> None:
        """The broker (re)connected: recover in-flight orders, reconcile, carry out the flattens it missed, catch
        up; then it takes orders again. While an operator keeps it paused, recovery and reconciliation run but the
        flattens and the catch-up wait for ``resume_broker``: the pause means "send nothing new there"."""
        first = broker not in self._first_up
        self._first_up.add(broker)
        await self._recover(broker)
        reconciled = await self.reconcile_broker(broker, reason="start-up" if first else "reconnect")
        # The first come-up after a start catches up what arrived while it was connecting (the service listened
        # meanwhile) and what an earlier process journaled missed there and never caught up, not what an earlier
        # process already handled (``_since_start``); a reconnect catches up the whole day.
        catch_up = not first or self._started_at is not None
        since = self._since_start(broker) if first else None
        if self.pool is not None and self.pool[broker].admin_paused:
            log.info("broker %s is back but paused: the flattens it missed and its catch-up wait for its resume",
                     broker)
            if catch_up:
                self._owe_catch_up(broker, since)
        else:
            await self._redo_missed_flattens(broker, reconciled, why="start-up" if first else "reconnect")
            if catch_up:
                await self._catch_up(broker, since=self._owed_since(broker, since))
            if self._owed_follow_ups.get(broker):
                # A counted order settled after the redo issued what was owed (its fill or cancel reported during
                # the catch-up): its follow-up is owed too (``_netted_settled``), issued before the broker opens,
                # on a fresh reconciliation (the one above is older than the redo's and the catch-up's fills).
                await self._redo_missed_flattens(broker, why="start-up" if first else "reconnect")
            self._wake_retries(broker)  # rejected flatten exits: retried once the broker is open again
        self._invalidate()
        mismatched = sorted({str(r["account"]) for r in reconciled if not r["ok"]})
        self.notifier.notify("broker_up", ("connected at start-up" if first else "reconnected") + "; recovered and "
                             "reconciled" + (f", mismatch at {', '.join(mismatched)}" if mismatched else ""),
                             at=self.clock(), broker=broker)

    def _since_start(self, broker: str) -> datetime | None:
        """The ``since`` of the catch-up of a broker's first come-up after a start: the start, or earlier when the
        journal shows a target missed there for a ``catch_up`` account that no catch-up covered since
        (``Journal.catch_up_owed_since``, this trading day's only): the broker was down when it arrived and the
        process stopped before it came back, so this come-up is the one it was waiting for. Never earlier
        without such a miss: a position a trader closed by hand before the restart is not re-opened."""
        started = self._started_at
        if started is None:
            return None
        names = [a.name for a in self.ruleset.accounts.values() if a.broker == broker and a.catch_up]
        owed = self.journal.catch_up_owed_since(broker, names, trading_day_start(self.clock())) if names else None
        if owed is not None and owed < started:
            log.info("broker %s: catching up targets missed there since %s, before this process started", broker,
                     owed.isoformat())
            return owed
        return started

    def _owe_catch_up(self, broker: str, since: datetime | None) -> None:
        """Remember a catch-up a paused come-up skipped; two of them owe the wider of the two."""
        if broker in self._catch_up_owed:
            earlier = self._catch_up_owed[broker]
            since = None if earlier is None or since is None else min(earlier, since)
        self._catch_up_owed[broker] = since

    def _owed_since(self, broker: str, since: datetime | None) -> datetime | None:
        """The ``since`` of a catch-up about to run, widened by one a paused come-up left owed (now settled)."""
        if broker not in self._catch_up_owed:
            return since
        earlier = self._catch_up_owed.pop(broker)
        return None if earlier is None or since is None else min(earlier, since)

    async def _recover(self, broker: str) -> None:
        assert self.pool is not None and self.dispatcher is not None
        connector = self.pool.connector(broker)
        for tracked in list(self.tracker.orders.values()):
            job = tracked.job
            if job.broker != broker or tracked.status not in IN_FLIGHT:
                continue
            coid = job.client_order_id
            placing = self.dispatcher.placing.get(coid)
            if placing is not None:
                # This process has its request under way (sent before the drop, or waiting out a rate limit): it
                # may reach the broker after this lookup, so wait for its outcome before judging it. Called missed
                # now, it would fill at the broker as an order the journal says never left.
                try:
                    await asyncio.wait_for(asyncio.shield(placing), PLACING_WAIT_S)
                except TimeoutError:
                    log.warning("recovery: %s is still being placed at %s after %g s; left in flight (looked up "
                                "again at the next come-up or reconciliation)", coid, broker, PLACING_WAIT_S)
                    continue
                if tracked.status not in IN_FLIGHT:
                    continue
            found = await connector.find_order(job.broker_account, coid)
            if found is not None:
                log.info("recovery: %s found at %s (%s); adopting", coid, broker, found.status.value)
                self._recovering_at_start.discard(coid)
                if tracked.status == NEW:
                    await self.tracker.transition(coid, SENDING, detail="recovery: found at the broker")
                await self.tracker.adopt(coid, found)
                continue
            # In flight when the last process died (its request may or may not have left): the lookup just said
            # the broker has none, so sending it now cannot duplicate it. It stays "crashed" until resolved, so a
            # drop during this very resend does not turn an acknowledged signal's order into "missed".
            crashed = coid in self._recovering_at_start
            if tracked.status == NEW or crashed:
                if tracked.status == SENDING:
                    await self.tracker.transition(coid, UNKNOWN, detail="recovery: not at the broker; resending")
                await self._send_recovered(job)
                if tracked.status not in IN_FLIGHT:
                    self._recovering_at_start.discard(coid)
                elif tracked.status == UNKNOWN:
                    # Its send ended without an answer to vouch for (lost, or refused by rate limits past every
                    # retry): the broker must not open with it unresolved. The come-up fails and is retried, and
                    # looks it up again first.
                    raise BrokerError(f"recovery: {coid} could not be sent to {broker} "
                                      f"({tracked.detail or 'no answer'}); come-up retried")
            else:
                await self.tracker.transition(coid, MISSED, detail=(
                    f"not at broker {broker} after the connection came back; never sent"))

    async def _send_recovered(self, job: Job) -> None:
        """Send during recovery, before the broker is open to new orders (the lookup just found none)."""
        assert self.dispatcher is not None
        await self.dispatcher.send(job, recovering=True)

    # -- reconciliation ----------------------------------------------------------------------------------------
    async def _reconcile_loop(self, broker: str) -> None:
        while True:
            doc = self.ruleset.brokers.get(broker)
            await asyncio.sleep(doc.reconcile_every_seconds if doc else 60)
            if self.pool is None or not self.pool.available(broker):
                continue
            try:
                await self.reconcile_broker(broker, reason="periodic")
            except asyncio.CancelledError:
                raise
            except BrokerError as exc:
                log.warning("reconciliation of %s failed: %s", broker, exc)
            except Exception:
                log.exception("reconciliation of %s failed", broker)

    async def reconcile_broker(self, broker: str, *, reason: str) -> list[dict[str, Any]]:
        """Compare the ledger with the broker for each of its accounts; apply each account's policy. Each row
        returned (not what is journaled) also carries ``orders_at_read``: our orders as they stood just before the
        broker was asked for the positions in ``broker_positions`` (``OrdersAtRead``), what a caller that pairs
        those positions with our orders in flight must read them from."""
        assert self.pool is not None
        now = self.clock()
        since = trading_day_start(now) - timedelta(days=1)
        ending = self._overtaken_window(broker)  # exits final before this pass: it reads every fill they could miss
        rows = []
        for account in sorted(self.ruleset.accounts.values(), key=lambda a: a.name):
            if account.broker != broker:
                continue
            at_read, held, mismatches = await self._read_account(broker, account, since)
            if mismatches:
                # Read once more before acting on it: a fill made between this read's fill list and its positions
                # (a trade by hand at that moment, or ours) shows in the positions only; adopted now, it would be
                # booked a second time when its fill is reported, and a halt would stop entries for nothing. The
                # second read's fill list holds it. A mismatch that stays is real.
                at_read, held, mismatches = await self._read_account(broker, account, since)
            row = {"broker": broker, "account": account.name, "ok": not mismatches, "reason": reason,
                   "policy": account.on_mismatch, "mismatches": [m.as_dict() for m in mismatches],
                   "broker_positions": held, "at": now}
            await self.journal.record_reconciliation(row)
            rows.append({**row, "orders_at_read": at_read})
            if mismatches and account.on_mismatch == reconcile.HALT:  # the ledger is kept: a flatten must not trust it
                self._unreconciled[account.name] = {m.contract: (m.ledger, m.broker) for m in mismatches}
            else:
                self._unreconciled.pop(account.name, None)
            await self._apply_policy(account, mismatches, now)
        self._invalidate()
        self._overtaken_window_ends(ending)
        await self._snapshot_positions(broker, [str(r["account"]) for r in rows], now, reason)
        await self._withheld_after_pass(broker, rows)  # flattens withheld where these rows now agree: redone
        return rows

    async def _read_account(self, broker: str, account: Account, since: datetime
                            ) -> tuple[OrdersAtRead, dict[str, int], list[reconcile.Mismatch]]:
        """One read of ``account`` at its broker for a reconciliation: its fills since ``since`` booked, its working
        orders' states taken, then its positions (and snapshot) compared with the ledger, leaving out contracts
        with our orders in flight at the read (``OrdersAtRead``)."""
        assert self.pool is not None
        connector = self.pool.connector(broker)
        for fill in await connector.fills_since(account.broker_account, since):
            await self.ingest_fill(broker, fill)
        for order in await connector.working_orders(account.broker_account):
            tracked = self.tracker.find(broker, order.client_order_id, order.broker_order_id)
            if tracked is not None:
                await self.tracker.adopt(tracked.job.client_order_id, order)
        for tracked in self.tracker.unsettled():  # a working order is not final: unsettled (not the day's all)
            if tracked.job.account == account.name and tracked.status in WORKING:
                found = await connector.find_order(account.broker_account, tracked.job.client_order_id)
                if found is not None:
                    await self.tracker.adopt(tracked.job.client_order_id, found)
        at_read = OrdersAtRead.take(account.name, self.tracker)
        held = {p.contract: p.quantity for p in await connector.positions(account.broker_account) if p.quantity}
        self._set_snapshot(account.name, await connector.account_snapshot(account.broker_account))
        mismatches = reconcile.compare_positions(self.ledger.account_positions(account.name), held,
                                                 at_read.in_flux(self.tracker))
        return at_read, held, mismatches

    async def _snapshot_positions(self, broker: str, accounts: list[str], now: datetime, reason: str) -> None:
        """Journal the ledger's positions of ``accounts`` as they stand after a reconciliation pass (what the
        ``position_snapshots`` table is for): each (strategy, contract) line held, with its average price and the
        day's realized P&L and commissions, or one flat row for an account holding nothing, so that the history
        shows every pass. Periodic (start-up, reconnect, ``reconcile_every_seconds``), never on the webhook's
        path."""
        names = set(accounts)
        held = [row for row in self.ledger.snapshot_rows() if row["account"] in names and row["quantity"]]
        rows: list[dict[str, Any]] = [{**row, "broker": broker, "reason": reason, "at": now} for row in held]
        flat = names - {str(row["account"]) for row in held}
        rows += [{"broker": broker, "account": name, "strategy": None, "contract": None, "quantity": 0,
                  "reason": reason, "at": now} for name in sorted(flat)]
        await self.journal.record_position_snapshot(rows)

    async def _apply_policy(self, account: Account, mismatches: list[reconcile.Mismatch], now: datetime) -> None:
        halt = self.risk.halts.get(account.name)
        if not mismatches:
            if halt is not None and halt.source == "reconciliation":
                self.risk.clear(account.name)
                await self._risk_event(account.name, "clear", "reconciliation matches again", "reconciliation", now)
            return
        text = reconcile.describe(mismatches)
        if account.on_mismatch == reconcile.HALT:
            if halt is None:
                self.risk.halt(account.name, f"reconciliation mismatch: {text}", "reconciliation", now,
                               until_day_end=False)
                await self._risk_event(account.name, "halt", f"reconciliation mismatch: {text}", "reconciliation",
                                       now)
            return
        for m in mismatches:
            # A trade made by hand that the broker shows as a position only: journaled in its place among the fills,
            # then booked as one (at the current mark; with none known, at no price and realizing nothing), exactly
            # as a restart's replay of the journal books it.
            delta = m.broker - self.ledger.account_position(account.name, m.contract)
            if not delta:
                continue
            # Stamped after every entry booked there (``Arrivals.placed``), not with the pass's start: the delta is
            # netted against the ledger as it stands now, fills the pass booked included.
            mark, at = self._mark(m.contract), self.arrivals.placed(account.name, m.contract, now)
            fill_id = await self.journal.record_adoption(broker=account.broker, account=account.name,
                                                         contract=m.contract, quantity=delta, price=mark, at=at)
            self.book_entry(fill_id=f"{account.broker}:{fill_id}", account=account.name, strategy=EXTERNAL_STRATEGY,
                            contract=m.contract, signed_qty=delta, price=mark or Decimal(0), commission=Decimal(0),
                            at=at, manual=True, point_value=None if mark is not None else Decimal(0),
                            day_book=mark is not None)
        alert = {"account": account.name, "kind": "reconciliation_adopted", "detail": text, "at": _utc(now)}
        self.alerts.append(alert)
        log.warning("reconciliation: %s adopted the broker's positions (%s)", account.name, text)
        await self._risk_event(account.name, "adopt", f"adopted broker positions: {text}", "reconciliation", now)

    # -- catch-up ----------------------------------------------------------------------------------------------
    async def _catch_up(self, broker: str, *, since: datetime | None = None) -> None:
        """Converge ``catch_up`` accounts at ``broker`` to their strategies' last targets of this trading day.

        Never into a position after a flatten time: when a flatten of the strategy fired since its last target
        (while the broker was away, so its exit was missed), the target is void and the accounts converge to flat
        instead. Entries the rules block now (schedule windows, halts) stay blocked: the engine decides.
        ``since``: only targets received from then on (a broker's first come-up after a start catches up what
        arrived while it was connecting and what an earlier process journaled missed and never caught up, not what
        an earlier process already handled: ``_since_start``).
        """
        now = self.clock()
        accounts = [a for a in self.ruleset.accounts.values() if a.broker == broker and a.catch_up]
        if not accounts:
            return
        targets = self.journal.last_targets_since(trading_day_start(now))  # catch-up is this trading day's
        for strategy, row in targets.items():
            followers = [a for a in accounts if strategy in a.strategies]
            if not followers:
                continue
            received = parse_utc(str(row["received_at"]))
            body = {k: v for k, v in (row.get("signal") or {}).items() if k in SIGNAL_FIELDS}
            row, received, body, flat = self._with_moves(strategy, followers, row, received, body, now)
            if trading_day(received) != trading_day(now) or (since is not None and received < since):
                continue
            sid = f"{row['id']}-catchup-{broker}-{self.pool[broker].reconnects if self.pool else 0}"
            if self.journal.get_signal(sid) is not None:
                continue
            try:
                signal = parse_signal({**body, "id": sid})
            except ValueError as exc:
                log.warning("catch-up of %s: stored signal no longer parses: %s", strategy, exc)
                continue
            # Decide, journal and track under one lock: two brokers coming back together (one network blip) must
            # not both decide before either's orders are in view, or best mode opens the position at each. The
            # sends happen after the lock, once the orders count as in flight.
            async with self._catch_up_guard:
                # The broker is connected but not yet open to new orders (its recovery): decide as if it were.
                decision = self.engine.decide(signal, self._state_with_up(now, {broker}), now)
                names = {a.name for a in followers}
                orders = tuple(o for o in decision.orders if o.account in names)
                self.catchups.append({"strategy": strategy, "signal": sid, "flat": flat,
                                      "orders": [o.to_json() for o in orders]})
                journaled = {**body, "catch_up": True, "broker": broker}
                decision = Decision(signal_id=sid, strategy=strategy, rule=decision.rule,
                                    blocked_by=decision.blocked_by,
                                    reason=f"catch-up after {broker} reconnected: {decision.reason}", orders=orders,
                                    content_hash=decision.content_hash)
                record = decision.to_json(self._rules_generation())
                if not orders:
                    # Journaled all the same: it covers the misses before it (``Journal.catch_up_owed_since``), so
                    # a restart does not catch them up again over what a trader changed by hand since.
                    await self.journal.record_signal(
                        raw=json.dumps(journaled), remote=None, status="decided", reason="catch-up: nothing to do",
                        key=None, signal=journaled, decision=record, signal_id=sid, at=now)
                    continue
                # Counted from the decision on (no await since it): a webhook deciding while this commits sees it.
                self.hold(sid, decision, unavailable_missed=False)  # the broker is back, not open yet
                try:
                    await self.journal.record_signal(
                        raw=json.dumps(journaled), remote=None, status="accepted",
                        reason="catch-up", key=None, signal=journaled, decision=record,
                        orders=[{**o.to_json(), "margin_usd": o.margin_usd} for o in orders], signal_id=sid, at=now)
                except BaseException:
                    self.release(sid)
                    raise
                # Held -> tracked in one step: the orders never stop counting; recovery sends them below.
                jobs = self._take_hold(sid) or []
                for job in jobs:
                    self.tracker.track(job)
                self._invalidate()
            for job in jobs:
                await self._send_recovered(job)

    def _with_moves(self, strategy: str, followers: list[Account], row: dict[str, Any], received: datetime,
                    body: dict[str, Any], now: datetime) -> tuple[dict[str, Any], datetime, dict[str, Any], bool]:
        """Where ``strategy`` stands now, from its last target or exit (``row``, received at ``received``, its
        journaled ``body``): the plain buys and sells of the same instrument since then move it (a "buy 2" after
        "long 1" is long 3: converging to the target alone would leave the account 2 short of its strategy, and a
        strategy traded only with plain signals after its first target would never be caught up), and a flatten
        in between, or since the last of them, sets it flat (``_flatten_times``, read once). Returns the signal
        the catch-up is named after (the last one counted), when it arrived, the target body to decide, and
        whether a flatten since the last signal made it flat."""
        ticker = body.get("ticker")
        root = self._root_of(ticker, now)
        flattens = self._flatten_times(strategy, followers, received, now, root)
        moves = [m for m in self.journal.moves_since(strategy, received)
                 if self._root_of((m.get("signal") or {}).get("ticker"), now) == root]
        side = {"long": 1, "short": -1}.get(str(body.get("position")), 0)
        position = 0 if body.get("action") == "exit" else side * int(body.get("position_size") or 0)
        at = received
        for move in moves:
            when = parse_utc(str(move["received_at"]))
            if any(at < t <= when for t in flattens):
                position = 0
            signal = move.get("signal") or {}
            quantity = int(str(signal.get("quantity") or 0))
            position += quantity if signal.get("action") == "buy" else -quantity
            row, at = move, when
        flat = any(t > at for t in flattens)
        if not moves:
            return row, received, ({**body, "position": "flat", "position_size": 0} if flat else body), flat
        if flat:
            position = 0
        body = {**body, "action": "buy" if position > 0 else "sell", "quantity": max(abs(position), 1),
                "position": "long" if position > 0 else "short" if position < 0 else "flat",
                "position_size": abs(position)}
        return row, at, body, flat

    def _root_of(self, ticker: Any, now: datetime) -> str | None:
        """The root ``ticker`` resolves to now; None when unknown (callers then take the safe side)."""
        try:
            return resolve(str(ticker), now, self.ruleset.catalog).root if ticker else None
        except SymbolError:
            return None

    def _flatten_times(self, strategy: str, accounts: Iterable[Account], since: datetime, now: datetime,
                       root: str | None) -> list[datetime]:
        """When flattens covering ``strategy`` at any of ``accounts`` happened after ``since`` and up to ``now`` (a
        target's arrival, and what came after it): each voids what the strategy held before it.

        Any flatten counts, not only the schedule's: a risk ``flatten_and_halt`` or an operator's flatten voids the
        strategy's earlier target just as much, and catch-up must not put the position back. Both the schedule's
        firings (a flatten time passed even if no process fired it) and the journaled flatten signals are read;
        a redo of a missed flatten (``-redo-``) is not a flatten of its own (its original's time counts, or a
        target received between the two would be voided), nor is a retry of rejected exits (``-retry-``), nor a
        follow-up closing what an order the flatten counted on left unfilled (``-follow-``: issued when that order
        settled, after a restart maybe minutes later).
        ``root``: the target's, so that a flatten restricted to other roots does not void it (unknown: it does,
        the safe side)."""
        names = {a.name for a in accounts}
        times = []
        for firing in firings(self.ruleset.schedule_rules, since + timedelta(microseconds=1),
                              now + timedelta(microseconds=1)):
            rule = firing.rule
            if firing.action != FLATTEN:
                continue
            if rule.strategies is not None and strategy not in rule.strategies:
                continue
            if rule.accounts is not None and not names & set(rule.accounts):
                continue
            times.append(firing.at)
        for row in self.journal.flattens_between(since, now):
            scope = _flatten_scope(row)
            if scope is None or scope.origin is not None or scope.follow_of is not None:
                continue
            if scope.strategy is not None and scope.strategy != strategy:
                continue
            if scope.account is not None and scope.account not in names:
                continue
            if scope.roots is not None and root is not None and root not in scope.roots:
                continue
            times.append(parse_utc(str(row["received_at"])))
        return sorted(times)
