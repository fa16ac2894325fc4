"""Seeded random scenarios against the whole runtime, and the invariants every one of them must keep.

Why: each guarantee of the runtime (no duplicate order, ledger = broker, a flatten closes and never reverses,
duplicates create nothing, missed flattens and catch-up on come-up, the schedule's flatten) is pinned by hand-written
scenarios; real money rides on the combinations nobody wrote down. ``generate(seed)`` draws a scenario (a list of
plain-dict steps, printable and replayable) from ``random.Random(seed)``; ``Runner`` plays it on the real runtime
(``tests.harness.runtime.world``: real journal, rules, engine, paper brokers with small latencies) and checks the
invariants at every quiescence point (all brokers up and not paused, everything settled) and after every flatten.

Signals go through the real webhook handler (``service.webhook.Webhook``) over HTTP on 127.0.0.1, not through
``World.submit``: the webhook is where duplicates are recognised (its in-process claim on a key being decided, then
the journal's key lookup), and a concurrent repeat of a signal must meet exactly that code. A restart stops the
world and opens a new one on the same directory (same journal, same paper-broker databases, same clock).

Steps (``Step = dict``; ``do`` says which):

- ``send``: ``bodies`` (1-3 webhook bodies) posted at once (``asyncio.gather``): the webhook decides one while an
  earlier one's commit is in flight. A body may repeat an earlier one (same ``id``: a duplicate), also in one group.
- ``flatten``: an operator flatten of ``account`` and/or ``strategy`` (None: all), posted together with ``bodies``.
  With ``reject`` ({broker: n}) that broker rejects its next n orders first (the flatten's exits, or orders in
  flight before them: the follow-up and the retries); with ``advance`` the clock jumps right after the flatten is
  issued, while its exits and retries are under way (across 18:00 ET: the retries give up with ``flatten_failed``).
- ``drop`` / ``reconnect`` / ``pause`` / ``resume`` of a ``broker``; ``price`` moves the feed by ``points`` (and,
  with ``risk``, has the risk monitor look at once);
  ``advance`` moves the clock by ``seconds`` and ticks the schedule; ``restart``; ``settle`` (what can settle);
  ``check`` (a quiescence point: the generator emits it only when every broker is up and not paused).
- ``manual``: a trade nobody ordered through multibroker at ``account`` (``Runner._trade_by_hand``): ``close``,
  ``partial``, ``reverse`` what the broker holds, or ``open`` by hand; ``via: fill`` (an order ``manual-<n>`` at the
  broker whose fill reaches the fill stream, or ``fills_since`` at the come-up when the broker is down) or ``via:
  position`` (the broker's position moves with no fill: only a reconciliation pass finds it); a ``crash`` may
  carry ``manual`` trades made while the process is dead. Most are followed by an exit, flat target or flatten of
  a strategy of the account (``after_manual``: ``Runner.check_after_manual``). Accounts draw ``on_mismatch``
  (``halt_accounts``); every check runs a reconciliation pass first (``check_reconciled``).
- ``reject``: the ``broker`` rejects its next ``n`` orders (``PaperConnector.reject_next``); ``risk``: the risk
  monitor checks now (it also runs on its own loop every half second); ``clear``: an operator clears the halt on
  ``account``, if any.

With ``generate(seed, crash=True)`` (``options["crash"]``) two more steps, and the service's own rules watcher
(``engine.reload.RulesWatcher``, journaling its reloads as ``service.app`` wires it) in place of static rules:

- ``crash``: kill -9 inside the test process (``Runner._kill``, then ``_bury``), at a ``moment`` that matters: right
  after the answers to ``bodies``, inside the tracker's hook of the n-th order transition (mid fan-out: ``sending``
  committed, the request not sent), a few ms after posting, mid operator flatten, mid retry of its rejected exits.
  Lost: journal writes not COMMITted, every task where it stands (no graceful path), requests under way (no
  answer), memory. Kept: what the journal committed (and a COMMIT already on its thread), the paper brokers' books
  with the orders handed to them (they fill on the next connection) and the rejections they owe. Then a restart
  on the same directory, and a check. With ``comeup``, that restart dies too, inside its brokers' come-up
  (``Runner._arm``: before or after recovery's lookup of the n-th order found in flight, at the end of a
  reconciliation before the owed follow-ups and re-issued flatten exits are journaled, as one of those is
  journaled or sent, at any order transition), and a second restart follows. A ``reconnect`` with ``crash``
  kills the process inside that broker's come-up the same way, or mid catch-up (``catchup``); the generator
  sets it up with a signal before the drop, a target while the broker is down and maybe a flatten whose exits
  there are missed. Cutting the brokers' links is ``PaperConnector.sever``. Invariants on top of the others: an
  order the journal held in flight at a crash is never ``missed`` afterwards (looked up by client order id, adopted or sent); every 202 is journaled
  with the decision it answered, once per key; a flatten the crash interrupted that reached the journal is
  carried out by the restarted process (``check_flatten``).
- ``reload``: one rules file rewritten (renamed over, as editors do): ``accounts.yaml`` with new
  ``size_multiplier``s (``multipliers``), ``risk.yaml`` with the account contract cap ``CAP_LIMIT`` added,
  changed or removed (``max_contracts``, often below what accounts hold), ``routing.yaml`` with an account taken
  out of or put back into the mirror rule of ``mirror`` or ``trend`` (``routes``), or a ``bad`` edit of one of
  them; applied by the watcher noticing it (``watch``) or an operator's reload, with ``bodies`` posted meanwhile.
  A valid edit is the next generation at once (watcher, runtime, journal's reloads); an invalid one is rejected
  with diagnostics naming the file and changes nothing. Every decision comes from the rules live when it was
  posted, as its journaled record names them (``ruleset``: content hash and generation), and follows them
  (``check_rules_used``, with the positions ``TracedEngine`` saw those rules decide from): its orders go to the
  accounts their routing names, its quantities follow their multipliers, no entry takes an account over their cap
  while an entry that would is refused with a reason, and an exit closes the strategy's whole position at every
  routed account, whatever the cap.

Every scenario, crash or not: each journaled decision record (the webhook's, a flatten's, a catch-up's) names a
rules generation its process applied, by content hash and number, as that process journaled it in its reloads
(``check_rulesets``; the static rules of a scenario without reloads are journaled as the next generation at each
start, as ``service.app``'s watcher journals its start).

With ``generate(seed, broker="tradovate")`` (or ``"projectx"``; ``options["emulated"]``) one broker, ``fast`` or
``slow`` (drawn), is the real connector of that type (``brokers.tradovate``, ``brokers.projectx``) against its
emulator (``brokers.emulators``) on 127.0.0.1, started for the scenario in a process of its own (``EmulatorProcess``):
the broker outlives the service's restarts and crashes, as the paper books on disk do; the credentials reach the
connector as the service's environment would give them (``connector_options["env"]``). The other broker stays
paper. The steps map onto the emulator (``EmulatedVenue``): ``reject`` is ``reject_next``; ``drop`` /
``reconnect`` are ``drop_connection`` / ``restore_connection`` (the connector notices the drop and comes back by
itself; a restart or crash restores a dropped emulator, as a new process connects afresh); the crash's cut of the
links takes the connector's HTTP session away (no request leaves; its tasks die with the process) and closes it
with the process; ``manual`` is the emulator's ``trade_by_hand`` (``via: fill``: an order and fill another client
of the account made, reaching the connector's push channel or its polls) or ``move_position`` (``via: position``);
``price`` also moves every MES month at the emulator. Three steps only this option draws, from a stream of its own
(so that the paper scenarios stay what they were): ``rate_limit`` (the broker's own 429 / penalty ticket for the
next ``n`` requests), ``lose`` (``lose_next_place_response``: the next order is accepted and filled, its answer
lost with the connection) and ``partial`` (the next ``n`` market orders fill one contract, then the rest: the
paper quirk ``partial_fill_rate`` does not apply to an emulated broker and makes these steps more frequent).
Left out for the emulated broker: the paper quirks ``reject_rate`` and the ack and fill latencies (the ``reject``
steps stand for the former). The brokers' timestamps are the real time while the service's clock is moved to the
scenario's: a connector reads its own clock (``utcnow``) for its lookback windows, so the emulator keeps real time
too, and its fills carry a trading day the service's clock has not reached (whether their realized P&L counts
toward the service's daily-loss limits as the paper fills' does is not something these scenarios pin down).

Options per seed (``Scenario.options``): latencies; ``schedule`` (15:55 ET flatten of mirror, entries blocked 15:50-
18:00 ET); a start shortly before 18:00 ET, so that advances cross into the next CME trading day; the paper quirks
``partial_fill_rate`` (a market order fills in two parts, the second after the fill latency) and ``reject_rate``;
``account_loss`` with ``account_action`` (``flatten_and_halt`` or ``halt_entries``), a daily-loss limit small enough
for the price steps (bigger in those seeds) to breach it. Retries of rejected flatten exits back off
``RETRY_DELAYS_S``, so that they run, and run out, inside a scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Iterator, cast
from zoneinfo import ZoneInfo

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from brokers.base import BrokerUnavailable, RateLimited, Side
from brokers.emulators.projectx import SIDE_BUY as PX_BUY
from brokers.emulators.projectx import SIDE_SELL as PX_SELL
from brokers.emulators.projectx import STATUS_FILLED as PX_FILLED
from brokers.feed import PriceFeed
from engine.catalog import MONTH_CODES
from engine.decide import build_engine
from engine.loader import load_rules
from engine.model import RuleSet
from engine.reload import Reload, RulesWatcher
from engine.sessions import trading_day
from engine.state import contract_root
from engine.symbols import resolve
from service.config import ServiceConfig
from service.dispatch import CANCELLED, FILLED, FINAL, MISSED, REJECTED, Tracked
from service.journal import Journal, parse_utc
from service.ledger import ADOPTED, EXTERNAL_STRATEGY, replay
from service.runtime import Runtime
from service.webhook import Webhook
from tests.harness.emulated import EmulatorProcess
from tests.harness.projectx import ENV as PX_ENV
from tests.harness.tradovate import ENV as TV_ENV
from tests.harness.runtime import Clock, StaticWatcher, World, account_doc, documents, wait_until, write_rules

ET = ZoneInfo("America/New_York")
SECRET = "fuzz-secret"
BROKERS = ("fast", "slow")
STRATEGIES = ("mirror", "trend", "best")
ROOT = "MES"
START_PRICE = Decimal("5000")
FLATTEN_FAILED = "flatten_failed"
"""The risk event kind of a flatten whose retries ran out (``service.runtime``'s module docstring)."""
RETRY_DELAYS_S = (0.05, 0.1, 0.2)
"""The runtime's backoff between retries of a rejected flatten exit, shortened so that the retries and their
give-up both happen inside a scenario (``Runtime.flatten_retry_delays_s``; two minutes in service)."""

ACCOUNTS: dict[str, tuple[str, str, tuple[str, ...], bool]] = {
    # name: (broker, broker account, strategies, catch_up). ``f1`` follows two mirror strategies and ``bs`` a
    # best-mode and a mirror one, all in the one contract: each strategy trades its own position there (the engine
    # decides from the strategy's book, in flight and held orders; the ledger books per strategy), so the
    # invariants below hold per strategy, and the broker holds the sum of the strategies' books.
    "f1": ("fast", "F-1", ("mirror", "trend"), False),
    "f2": ("fast", "F-2", ("mirror",), True),
    "s1": ("slow", "S-1", ("mirror",), True),
    "ft": ("fast", "F-T", ("trend",), False),
    "s2": ("slow", "S-2", ("trend",), True),
    "bf": ("fast", "B-F", ("best",), False),
    "bs": ("slow", "B-S", ("best", "trend"), True),
}
BEST = ("bf", "bs")

ROUTING = """kind: Routing
name: main
rules:
  - name: mirror
    match: {strategy: [mirror, trend]}
    mode: mirror
  - name: best
    match: {strategy: best}
    mode: best
    select: [cheapest_commission, most_free_margin]
"""

MULTIPLIERS = ("0.5", "1", "2")
"""The ``size_multiplier`` values a valid rules reload gives accounts (``round_half_up(quantity * multiplier)``)."""
BAD_EDITS = ("negative_multiplier", "unknown_broker", "broken_yaml", "negative_cap", "unknown_account")
"""Invalid edits a reload must reject (schema, reference and syntax errors): of ``accounts.yaml``, of
``risk.yaml`` (``negative_cap``) and of ``routing.yaml`` (``unknown_account``)."""
ACCOUNTS_FILE = "accounts.yaml"
RISK_FILE = "risk.yaml"
ROUTING_FILE = "routing.yaml"
RULES_FILES = (ACCOUNTS_FILE, RISK_FILE, ROUTING_FILE)
"""The rules files a reload edits (each edit rewrites one of them)."""
CAP_LIMIT = "size-cap"
"""The name of the ``max_contracts`` limit a reload adds, changes or removes in ``risk.yaml`` (scope account, MES)."""
CAPS = (0, 1, 2, 3, 5)
"""Values a reload gives ``max_contracts``: often below what an account holds (its exits still go out)."""
ROUTED = ("mirror", "trend")
"""The strategies whose mirror routing a reload narrows to some of their followers, or widens back
(``routing_yaml``: one rule each, with ``accounts:``)."""


def followers(strategy: str) -> tuple[str, ...]:
    return tuple(name for name, (_b, _a, strategies, _c) in ACCOUNTS.items() if strategy in strategies)
CRASH_MOMENTS = ("answer", "transition", "transition", "delay", "flatten", "retry")
"""When a ``crash`` step kills the process (see ``Runner._crash``)."""
COMEUP_MOMENTS = ("lookup", "looked_up", "reconciled", "redo", "sent")
"""Where a crash inside a restart's come-up kills (``Runner._arm``); ``catchup`` too, after a drop and a target its
catch_up accounts missed (a reconnect's come-up catches that up, and so does a restart's: ``Runtime._since_start``)."""
CRASH_WAIT_S = 2.0
EMULATED = ("tradovate", "projectx")
"""``generate(seed, broker=...)``: the real connector of that type, against its emulator, for one broker."""
EMULATED_STEPS = ("rate_limit", "lose", "partial")
"""Steps only the emulated option draws, all at the emulated broker: the broker's own rate-limit answer to the next
``n`` requests (``rate_limit``), the next accepted order's answer lost with its connection (``lose``), and the next
``n`` market orders filled in two parts (``partial``)."""
MANUAL = "(manual)"
"""``Runner.model_lines``: a trade by hand (a broker fill with a ``manual-`` client order id, or a hand move)."""
"""How long a crash waits for its moment (a transition that never comes) before it kills anyway."""

Step = dict[str, Any]


class InvariantError(AssertionError):
    """An invariant broke; the message names it and what was seen."""


# -- the generator -----------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    seed: int | None
    options: dict[str, Any]
    """``write_rules`` options (latencies, ``schedule``) and ``start`` (ISO time of the clock's start, UTC)."""
    steps: list[Step]

    def describe(self) -> str:
        lines = [f"seed={self.seed} options={self.options}"]
        lines += [f"  {i:2d}. {json.dumps(step, sort_keys=True)}" for i, step in enumerate(self.steps)]
        return "\n".join(lines)


def _body(rng: random.Random, sid: str, strategy: str) -> dict[str, Any]:
    """One webhook body: ``best`` only states targets (or exits) so that its position lives at one account; the
    mirror strategies also send plain buys and sells."""
    body: dict[str, Any] = {"strategy": strategy, "ticker": "MES1!", "id": sid}
    kinds = ["target", "exit"] if strategy == "best" else ["buy", "sell", "target", "exit"]
    kind = rng.choice(kinds + ["target"])
    if kind in ("buy", "sell"):
        body.update(action=kind, quantity=rng.randint(1, 3))
    elif kind == "exit":
        body.update(action="exit")
    else:
        position = rng.choice(["long", "short", "flat"])
        size = 0 if position == "flat" else rng.randint(1, 3)
        body.update(action="buy" if position == "long" else "sell", quantity=max(size, 1), position=position,
                    position_size=size)
    return body


def generate(seed: int, *, steps: int | None = None, crash: bool = False, broker: str | None = None) -> Scenario:
    """The scenario of ``seed``; with ``crash``, also ``crash`` and ``reload`` steps (drawn only then, so that the
    scenarios without them stay what they were for every seed)."""
    rng = random.Random(seed)
    schedule = rng.random() < 0.35
    # Evening: the clock starts shortly before 18:00 ET and its advances cross into the next CME trading day (halts
    # lift, day books roll, yesterday's flattens are neither re-issued nor retried: they end in ``flatten_failed``).
    evening = rng.random() < 0.25
    if evening:
        start = datetime(2026, 3, 11, 17, rng.randint(40, 57), tzinfo=ET)
    elif schedule:
        start = datetime(2026, 3, 11, 15, rng.randint(35, 48), tzinfo=ET)
    else:
        start = datetime(2026, 3, 11, 10, 30, tzinfo=ET)
    options: dict[str, Any] = {
        "fast_ms": rng.randint(0, 20), "slow_ms": rng.randint(0, 20), "fill_ms": rng.randint(0, 20),
        "schedule": schedule, "start": start.astimezone(timezone.utc).isoformat(),
        # Broker faults through the paper broker's own quirks (``paper:`` in the Broker documents).
        "partial_fill_rate": rng.choice([0, 0, 0, 0, 0.3, 0.7]),
        "reject_rate": rng.choice([0] * 7 + [0.05, 0.15]),
    }
    loss = rng.choice([None, None, None, 25, 60, 150])
    if loss is not None:
        # A small account daily-loss limit that price steps breach (MES: $5 a point, up to 3 contracts a line).
        options.update(account_loss=loss, account_action=rng.choice(["flatten_and_halt"] * 3 + ["halt_entries"]))
    if crash:
        options["crash"] = True
    # The emulated option draws from a stream of its own too (none of it on the paper path): which broker runs
    # on the emulator, and the faults of the real connectors' risky paths between the steps (``EMULATED_STEPS``).
    erng: random.Random | None = None
    if broker is not None:
        if broker not in EMULATED:
            raise ValueError(f"unknown emulated broker {broker!r}: one of {EMULATED}")
        erng = random.Random(f"emulated-{seed}-{broker}-{int(crash)}")
        options["emulated"] = {"type": broker, "name": erng.choice(BROKERS)}
    # Manual trades and the reconciliation policy come from a stream of their own: the steps the main stream
    # draws stay what they were for every seed, with manual trades (and what follows them) in between.
    mrng = random.Random(f"manual-{seed}-{int(crash)}")
    halts = sorted(name for name in ACCOUNTS if mrng.random() < 0.3)
    if halts:
        options["halt_accounts"] = halts  # ``on_mismatch: halt`` (the others adopt, the default)
    manual_n = 0
    undo: set[str] = set()
    """Halt accounts whose broker was moved by hand with no fill: a later step may put it back (a pass matches)."""
    n = steps if steps is not None else rng.randint(14, 26)
    multipliers = {name: "1" for name in ACCOUNTS}
    """The live generation's multipliers: a valid reload changes them, an invalid one does not."""
    cap: int | None = None
    routes = {strategy: list(followers(strategy)) for strategy in ROUTED}
    crashes = 0
    down: set[str] = set()
    paused: set[str] = set()
    sent: list[dict[str, Any]] = []
    counter = 0
    restarts = 0
    clock = start
    end_of_day = datetime(2026, 3, 11, 18, 45, tzinfo=ET) if evening else datetime(2026, 3, 11, 17, 45, tzinfo=ET)
    out: list[Step] = []

    def bodies(k: int) -> list[dict[str, Any]]:
        nonlocal counter
        group = []
        for _ in range(k):
            if sent and rng.random() < 0.12:
                group.append(dict(rng.choice(sent)))  # a repeat of an earlier signal
                continue
            if group and rng.random() < 0.08:
                group.append(dict(group[-1]))  # the same signal twice at once
                continue
            counter += 1
            body = _body(rng, f"s{seed}-{counter}", rng.choice(STRATEGIES))
            group.append(body)
            sent.append(body)
        return group

    def advance() -> int:
        nonlocal clock
        seconds = rng.randint(60, 600) if evening else rng.randint(30, 400) if schedule else rng.randint(5, 900)
        clock += timedelta(seconds=seconds)
        return seconds

    def manual(account: str | None, via: str | None = None) -> Step:
        """A trade nobody ordered through multibroker, at ``account`` (None: drawn, an account at a down broker
        more often than not). ``via``: ``fill`` (an order at the broker whose fill reaches the fill stream, or
        ``fills_since`` after a drop) or ``position`` (the broker's position moves with no fill the service can
        fetch: only a reconciliation pass's comparison finds it; drawn only where a pass comes before anything
        trades there: at a down broker, or while the process is dead)."""
        nonlocal manual_n
        manual_n += 1
        if account is None:
            at_down = [a for a in sorted(ACCOUNTS) if ACCOUNTS[a][0] in down]
            account = mrng.choice(at_down) if at_down and mrng.random() < 0.7 else mrng.choice(sorted(ACCOUNTS))
        if via is None:
            via = "position" if ACCOUNTS[account][0] in down and mrng.random() < 0.5 else "fill"
        if via == "position" and account in halts:
            undo.add(account)
        return {"do": "manual", "account": account, "via": via, "n": manual_n,
                "kind": mrng.choice(["close", "close", "partial", "reverse", "open"]),
                "side": mrng.choice(["buy", "sell"]), "quantity": mrng.randint(1, 2)}

    def after_manual(account: str) -> list[Step]:
        """Most manual trades are followed shortly by an exit, a flat target or a flatten of a strategy of the
        account (``after_manual``: checked once it settled, ``Runner.check_after_manual``)."""
        if mrng.random() >= 0.75:
            return []
        strategy = mrng.choice(ACCOUNTS[account][2])
        tag = {"account": account, "strategy": strategy}
        out_: list[Step] = [{"do": "settle"}] if mrng.random() < 0.3 else []
        pick = mrng.random()
        if pick < 0.5:
            body: dict[str, Any] = {"strategy": strategy, "ticker": "MES1!", "id": f"s{seed}-m{manual_n}"}
            if mrng.random() < 0.5:
                body.update(action="exit")
            else:
                body.update(action="sell", quantity=1, position="flat", position_size=0)
            out_.append({"do": "send", "bodies": [body], "after_manual": tag})
        else:
            whole = pick >= 0.8
            out_.append({"do": "flatten", "account": account if whole or mrng.random() < 0.5 else None,
                         "strategy": None if whole else strategy, "bodies": [], "after_manual": tag})
        return out_

    for _ in range(n):
        if erng is not None and erng.random() < 0.3:
            fault = erng.choice(EMULATED_STEPS + (("partial",) * 2 if options["partial_fill_rate"] else ()))
            out.append({"do": fault, "n": erng.randint(1, 2)} if fault != "lose" else {"do": fault})
        if mrng.random() < 0.12:
            step_m = manual(None)
            out.append(step_m)
            out.extend(after_manual(step_m["account"]))
        if undo and mrng.random() < 0.15:
            account = mrng.choice(sorted(undo))
            undo.discard(account)
            # The hand change at the broker is undone (the trader, or the broker's back office): a pass matches.
            out.append({**manual(account, "position"), "kind": "undo"})
            undo.discard(account)
        if halts and mrng.random() < 0.04:
            out.append({"do": "clear", "account": mrng.choice(halts)})  # the operator clears the halt
        weights = {"send": 10, "flatten": 3, "drop": 2 if len(down) < 2 else 0, "reconnect": 4 if down else 0,
                   "pause": 1 if len(paused) < 2 else 0, "resume": 3 if paused else 0, "price": 2 if loss is None else 4,
                   "advance": 2 if clock < end_of_day else 0, "restart": 1 if restarts < 2 else 0, "settle": 2,
                   "check": 2 if not down and not paused else 0, "reject": 2, "risk": 2 if loss is not None else 0,
                   "clear": 1 if loss is not None else 0}
        if crash:
            weights.update(crash=3 if crashes < 3 else 0, reload=2)
        kinds = [k for k, w in weights.items() if w]
        do = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        if do == "send":
            out.append({"do": "send", "bodies": bodies(rng.choice([1, 1, 1, 2, 2, 3]))})
        elif do == "flatten":
            scope = rng.choice(["all", "account", "strategy"])
            account = rng.choice(sorted(ACCOUNTS)) if scope == "account" else None
            strategy = rng.choice(STRATEGIES) if scope == "strategy" else None
            step: Step = {"do": "flatten", "account": account, "strategy": strategy,
                          "bodies": bodies(rng.choice([0, 0, 1, 2]))}
            if rng.random() < 0.35:
                # The broker rejects the next orders it gets: the flatten's exits (retried) or orders before them.
                step["reject"] = {rng.choice(BROKERS): rng.randint(1, 6)}  # 4 and more: the retries may run out
            if clock < end_of_day and rng.random() < (0.4 if evening else 0.1):
                step["advance"] = advance()  # right after the flatten is issued, its retries still pending
            out.append(step)
        elif do in ("drop", "pause"):
            choices = [b for b in BROKERS if b not in (down if do == "drop" else paused)]
            broker = rng.choice(choices)
            (down if do == "drop" else paused).add(broker)
            out.append({"do": do, "broker": broker})
            if do == "drop" and crash and crashes < 3 and not paused and rng.random() < 0.35:
                # What the broker's come-up owes, and a crash in the middle of it: targets its catch-up accounts
                # missed, maybe a flatten whose exits there are missed (re-issued at the come-up), then the
                # reconnect the process dies in.
                strategy = rng.choice(ROUTED)
                counter += 1
                opened = {"strategy": strategy, "ticker": "MES1!", "id": f"s{seed}-{counter}",
                          "action": rng.choice(["buy", "sell"]), "quantity": rng.randint(1, 2)}
                sent.append(opened)
                out.insert(len(out) - 1, {"do": "send", "bodies": [opened]})  # held there before the drop
                counter += 1
                position = rng.choice(["long", "short", "flat"])
                size = 0 if position == "flat" else rng.randint(1, 3)
                target = {"strategy": strategy, "ticker": "MES1!", "id": f"s{seed}-{counter}",
                          "action": "buy" if position == "long" else "sell", "quantity": max(size, 1),
                          "position": position, "position_size": size}
                sent.append(target)
                out.append({"do": "send", "bodies": [target]})
                if rng.random() < 0.5:
                    out.append({"do": "flatten", "account": None, "strategy": rng.choice([None, strategy]),
                                "bodies": []})
                crashes += 1
                if rng.random() < 0.3:
                    # The process dies before the broker is back, and the restart dies inside the come-up's
                    # catch-up of what the first process journaled missed (``Runtime._since_start``).
                    out.append({"do": "crash", "moment": "delay", "delay_ms": 0, "bodies": [],
                                "comeup": {"moment": "catchup", "nth": 1}})
                    paused.clear()
                else:
                    out.append({"do": "reconnect", "broker": broker,
                                "crash": {"moment": rng.choice(("catchup", "catchup", "redo", "redo") +
                                                               COMEUP_MOMENTS), "nth": rng.randint(1, 2)}})
                down.clear()
        elif do in ("reconnect", "resume"):
            pool = down if do == "reconnect" else paused
            broker = rng.choice(sorted(pool))
            pool.discard(broker)
            step = {"do": do, "broker": broker}
            if do == "reconnect" and crash and crashes < 3 and rng.random() < 0.4:
                # The process dies inside the broker's come-up: what it missed while down is owed then.
                crashes += 1
                step["crash"] = {"moment": rng.choice(COMEUP_MOMENTS + ("catchup", "catchup")),
                                 "nth": rng.randint(1, 3)}
                down.clear()
                paused.clear()
            out.append(step)
        elif do == "price":
            reach = 20 if loss is None else 160
            step = {"do": "price", "points": str(Decimal(rng.randint(-reach, reach)) / 4)}
            if loss is not None and rng.random() < 0.6:
                step["risk"] = True  # the risk monitor looks at once (else on its own loop, every half second)
            out.append(step)
        elif do == "advance":
            out.append({"do": "advance", "seconds": advance()})
        elif do == "restart":
            restarts += 1
            down.clear()  # a new process connects afresh (and nobody has paused anything in it)
            paused.clear()
            out.append({"do": "restart"})
        elif do == "reject":
            out.append({"do": "reject", "broker": rng.choice(BROKERS), "n": rng.randint(1, 3)})
        elif do == "clear":
            out.append({"do": "clear", "account": rng.choice(sorted(ACCOUNTS))})
        elif do == "crash":
            crashes += 1
            comeup = {"moment": rng.choice(COMEUP_MOMENTS), "nth": rng.randint(1, 3)} if rng.random() < 0.4 \
                else None
            # A restart dying in recovery's lookups needs orders in flight: this crash leaves some (mid fan-out).
            lookups = comeup is not None and comeup["moment"] in ("lookup", "looked_up", "sent")
            moment = "transition" if lookups else rng.choice(CRASH_MOMENTS)
            step = {"do": "crash", "moment": moment}
            if moment in ("flatten", "retry"):
                # Nothing posted with it: if it reached the journal, the restarted process must carry it out.
                scope = rng.choice(["all", "account", "strategy"])
                step.update(account=rng.choice(sorted(ACCOUNTS)) if scope == "account" else None,
                            strategy=rng.choice(STRATEGIES) if scope == "strategy" else None, bodies=[])
                if moment == "retry":
                    step["reject"] = {rng.choice(BROKERS): rng.randint(1, 4)}
                # The n-th transition of one of its exits (or of a retry's), else after ``delay_ms``.
                step.update(nth=rng.randint(1, 4), delay_ms=rng.randint(0, 60))
            else:
                step["bodies"] = bodies(rng.choice([1, 2, 2, 3]))
                if moment == "transition":
                    # The n-th order transition to ``status`` (any when None): mid fan-out at ``sending``.
                    step.update(status="sending" if lookups else rng.choice(["sending", "sending", "acknowledged",
                                                                                   None]),
                                nth=rng.randint(1, 3))
                elif moment == "delay":
                    step["delay_ms"] = rng.randint(0, 30)
            if comeup is not None:
                # The restart dies too, inside its brokers' come-up (recovering what this crash left in flight).
                step["comeup"] = comeup
                up = [b for b in BROKERS if b not in down and b not in paused]
                if comeup["moment"] == "redo" and up:
                    # A flatten whose exits a down broker missed: the restart's come-up re-issues them.
                    out.append({"do": "drop", "broker": rng.choice(up)})
                    out.append({"do": "flatten", "account": None, "strategy": rng.choice([None, *STRATEGIES]),
                                "bodies": []})
            down.clear()  # a new process connects afresh (and nobody has paused anything in it)
            paused.clear()
            dead: list[Step] = []
            if mrng.random() < 0.5:
                # While the process is dead the trader trades by hand: only the restart's reconciliation finds it.
                dead.append(manual(None, "position" if mrng.random() < 0.4 else "fill"))
                step["manual"] = dead
            out.append(step)
            if dead:
                out.extend(after_manual(dead[0]["account"]))
        elif do == "reload":
            step = {"do": "reload", "bodies": bodies(rng.choice([0, 0, 1, 2])), "watch": rng.random() < 0.3}
            edit = rng.random()
            if edit < 0.3:
                changed = dict(multipliers)
                for name in rng.sample(sorted(ACCOUNTS), rng.randint(1, 2)):
                    changed[name] = rng.choice([m for m in MULTIPLIERS if m != changed[name]])
                multipliers = changed
                step["multipliers"] = changed
            elif edit < 0.5:
                # A risk edit: the account contract cap, added, tightened (below what accounts hold, too),
                # loosened or removed (None).
                cap = rng.choice([c for c in (*CAPS, None) if c != cap])
                step["max_contracts"] = cap
            elif edit < 0.75:
                # A routing edit: one account leaves a strategy's mirror rule, or one comes back.
                changed_routes = {k: list(v) for k, v in routes.items()}
                strategy = rng.choice(ROUTED)
                now, every = changed_routes[strategy], followers(strategy)
                gone = [a for a in every if a not in now]
                if gone and (len(now) < 2 or rng.random() < 0.5):
                    now.append(rng.choice(gone))
                else:
                    now.remove(rng.choice(now))
                changed_routes[strategy] = sorted(now)
                routes = changed_routes
                step["routes"] = changed_routes
            else:
                step["bad"] = rng.choice(BAD_EDITS)
            out.append(step)
        else:
            out.append({"do": do})
    return Scenario(seed, options, out)


# -- the runner --------------------------------------------------------------------------------------------------

class _Watcher(StaticWatcher):
    """``StaticWatcher`` with the ``acquire`` the webhook pins a generation with, and a generation number: a
    static rule set is the first and only generation of its process (``RulesWatcher.generation`` after start,
    numbered on from the journal's last one as ``service.app`` numbers it), so every decision record names it as
    ``RulesWatcher`` would (the webhook reads the pinned generation's ``number``, flattens and catch-ups the
    watcher's ``generation``)."""

    def __init__(self, rules: Path, generation: int) -> None:
        super().__init__(rules)
        self.generation = generation

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Any]:
        yield SimpleNamespace(engine=self.engine, ruleset=self.ruleset, number=self.generation)


@dataclass
class Answer:
    body: dict[str, Any]
    status: int
    """0: no answer (the process was killed while the request was under way)."""
    payload: dict[str, Any]
    step: int
    rules: frozenset[str] | None = None
    """The content hashes of the rules that may have decided it (the live generation when it was posted, and the
    one a reload posted with it applies); None when the scenario does not trace generations."""


@dataclass
class FlattenRecord:
    step: int
    signal_id: str
    account: str | None
    strategy: str | None
    available: set[str]
    """Brokers available when the flatten was computed."""
    bodies: list[dict[str, Any]]
    day: date
    """The trading day it was issued in."""


def in_scope(record: "FlattenRecord", strategy: str, strategies: tuple[str, ...]) -> bool:
    """A line of ``strategy`` (one the account follows, or what belongs to nobody) is in the flatten's scope: a
    strategy's flatten closes that strategy's lines; an account-wide one (no strategy) closes every line of the
    account, what the trader opened by hand included (``service.flatten._flatten_orders`` reads
    ``Ledger.strategy_lines``, the manual residual among them; the README says nothing of it)."""
    if strategy == EXTERNAL_STRATEGY:
        return record.strategy is None
    return strategy in strategies and record.strategy in (None, strategy)


def reducing(body: dict[str, Any]) -> bool:
    """A signal that can only close: whenever it is decided (before or after a flatten) it never opens."""
    return body.get("action") == "exit" or body.get("position") == "flat"


QUIRKS = ("partial_fill_rate", "reject_rate")
"""Scenario options that go into both paper brokers' ``paper:`` quirks (``write_rules`` has no parameter for them)."""


def rules_dir(tmp_path: Path, options: dict[str, Any], emulated: "EmulatedVenue | None" = None) -> Path:
    rules = write_rules(tmp_path / "rules", **{k: v for k, v in options.items()
                                               if k not in ("start", "crash", "halt_accounts", "emulated")
                                               and k not in QUIRKS})
    quirks = "".join(f", {name}: {options[name]}" for name in QUIRKS if options.get(name))
    if quirks:
        brokers = rules / "brokers.yaml"
        text = brokers.read_text()
        assert text.count("starting_cash: 50000}") == len(BROKERS), text
        brokers.write_text(text.replace("starting_cash: 50000}", f"starting_cash: 50000{quirks}}}"))
    if emulated is not None:
        # The emulated broker's document replaces its paper one (the paper quirks stay with the paper broker).
        brokers = rules / "brokers.yaml"
        docs = brokers.read_text().split("---\n")
        at = [i for i, doc in enumerate(docs) if f"name: {emulated.name}\n" in doc]
        assert len(at) == 1, docs
        docs[at[0]] = emulated.yaml()
        brokers.write_text("---\n".join(docs))
    (rules / ACCOUNTS_FILE).write_text(accounts_yaml({}, options.get("halt_accounts", ())))
    (rules / "routing.yaml").write_text(ROUTING)
    return rules


def accounts_yaml(multipliers: dict[str, str], halts: Iterable[str] = ()) -> str:
    """The Account documents of ``ACCOUNTS``, with a ``size_multiplier`` where ``multipliers`` says other than 1,
    and ``on_mismatch: halt`` for the accounts ``halts`` names (the others adopt: the schema's default)."""
    docs = []
    for name, (broker, acct, strategies, catch_up) in ACCOUNTS.items():
        extra: dict[str, Any] = {"catch_up": True} if catch_up else {}
        if name in halts:
            extra["on_mismatch"] = "halt"
        if multipliers.get(name, "1") != "1":
            extra["size_multiplier"] = multipliers[name]
        docs.append(account_doc(name, broker, acct, ", ".join(strategies), **extra))
    return documents(*docs)


def routing_yaml(routes: dict[str, list[str]]) -> str:
    """``ROUTING`` with one mirror rule per strategy of ``ROUTED``, each naming its target ``accounts``."""
    rules = "".join(f"  - name: {strategy}\n    match: {{strategy: {strategy}}}\n    mode: mirror\n"
                    f"    accounts: [{', '.join(routes[strategy])}]\n" for strategy in ROUTED)
    best = ROUTING[ROUTING.index("  - name: best"):]
    return "kind: Routing\nname: main\nrules:\n" + rules + best


def risk_yaml(original: str, cap: int | None) -> str:
    """The scenario's ``risk.yaml`` with the ``CAP_LIMIT`` limit (none when ``cap`` is None)."""
    if cap is None:
        return original
    assert original.endswith("\n"), original
    return original + (f"  - name: {CAP_LIMIT}\n    scope: account\n    instrument: [MES]\n"
                       f"    max_contracts: {cap}\n")


def bad_edit(kind: str, good: dict[str, str]) -> tuple[str, str]:
    """(file, text): the live rules file ``kind`` edits, broken so that the set fails validation (``BAD_EDITS``)."""
    if kind == "negative_cap":
        text = good[RISK_FILE]
        return RISK_FILE, risk_yaml(text, 1).replace("max_contracts: 1", "max_contracts: -1") \
            if f"name: {CAP_LIMIT}" not in text else \
            text[:text.index("max_contracts:", text.index(f"name: {CAP_LIMIT}"))] + "max_contracts: -1\n"
    if kind == "unknown_account":
        text = good[ROUTING_FILE]
        if "accounts: [" in text:
            return ROUTING_FILE, text.replace("accounts: [", "accounts: [nobody, ", 1)
        return ROUTING_FILE, text.replace("    mode: mirror\n", "    mode: mirror\n    accounts: [nobody]\n", 1)
    return ACCOUNTS_FILE, bad_accounts_yaml(kind, good[ACCOUNTS_FILE])


def bad_accounts_yaml(kind: str, good: str) -> str:
    """``good`` broken the way ``kind`` says: each must fail validation as a whole set (``BAD_EDITS``)."""
    if kind == "negative_multiplier":
        return good.replace("name: f2\n", "name: f2\nsize_multiplier: -1\n", 1)
    if kind == "unknown_broker":
        return good.replace("broker: slow\n", "broker: nowhere\n", 1)
    if kind == "broken_yaml":
        return good.replace("strategies: [mirror]", "strategies: [mirror", 1)
    raise ValueError(f"unknown bad edit {kind!r}")


def replace_file(path: Path, text: str) -> None:
    """Write ``path`` the way an editor that renames a temp file over it does: the rules watcher never reads half
    a file (a truncated set may be valid and smaller)."""
    temp = path.with_name(f".{path.name}.fuzz-tmp")  # hidden: never a rule file
    temp.write_text(text)
    os.replace(temp, path)


def round_half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


class TracedEngine:
    """An engine that notes the positions each signal was decided from, per rules (content hash): the journaled
    decision record names the rules that decided (``ruleset``) but not the state they read, which the
    ``max_contracts`` and exit invariants need. Keyed by (signal id, content hash), the first decision of each: a
    later one of the same id by the same rules (the runtime asking what accounts at a down broker would have
    received, from a state with that broker up) is not the one recorded. Which rules decided is the record's word,
    never this wrapper's: an engine that decided a signal is not necessarily the one whose decision was journaled."""

    def __init__(self, engine: Any, content_hash: str,
                 states: dict[tuple[str, str], dict[str, tuple[int, int]]]) -> None:
        self.engine = engine
        self.content_hash = content_hash
        self.states = states

    def decide(self, signal: Any, state: Any, now: datetime) -> Any:
        key = (str(signal.id), self.content_hash)
        if key not in self.states:
            self.states[key] = {
                name: (sum(acc.held(ROOT).values()), sum(acc.strategy_held(signal.strategy, ROOT).values()))
                for name, acc in state.accounts.items()}
        return self.engine.decide(signal, state, now)

    def close(self) -> None:
        self.engine.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


# -- the brokers' side: a paper book, or an emulator behind the real connector ---------------------------------

class PaperVenue:
    """The broker side of a paper broker: its book (SQLite in the data directory), read and moved as a second
    client of the broker would, through the current process's ``PaperConnector``."""

    emulated = False

    def __init__(self, connector: Any) -> None:
        self.connector = connector

    def orders(self) -> list[dict[str, Any]]:
        """Every order the broker holds: ``client_order_id``, broker ``account``, ``status``."""
        return [dict(o) for o in self.connector.book.db.query("select * from orders")]

    def fills(self, acct: str) -> list[tuple[int, str, str, str, str, int]]:
        """(sequence, fill id, client order id, contract, side, quantity) of every fill at broker account ``acct``,
        in the order the broker made them."""
        return [tuple(row) for row in self.connector.book.db.execute(
            "select rowid, fill_id, client_order_id, contract, side, quantity from fills where account = ?",
            [acct]).fetchall()]

    def positions(self, acct: str) -> dict[str, int]:
        return {p["contract"]: int(p["quantity"]) for p in self.connector.book.positions(acct) if int(p["quantity"])}

    def held(self, acct: str, contract: str) -> int:
        row = self.connector.book.db.execute("select quantity from positions where account = ? and contract = ?",
                                             [acct, contract]).fetchone()
        return int(row[0]) if row else 0

    def last_fill(self) -> int:
        return int(self.connector.book.db.execute("select max(rowid) from fills").fetchone()[0] or 0)

    def manual_trade(self, acct: str, contract: str, side: Side, quantity: int, coid: str) -> str:
        return str(self.connector.manual_trade(acct, contract, side, quantity, coid).fill_id)

    def move(self, acct: str, contract: str, held: int, q: int, price: Decimal) -> None:
        book = self.connector.book
        with book.db.conn:
            if held + q:
                book.db.execute("insert into positions (account, contract, quantity, avg_price) values (?, ?, ?, ?) "
                                "on conflict (account, contract) do update set quantity = excluded.quantity",
                                [acct, contract, held + q, str(price)])
            else:
                book.db.execute("delete from positions where account = ? and contract = ?", [acct, contract])


class EmulatedVenue:
    """The broker side of a broker emulator (``brokers.emulators``) behind the real connector, in a process of its
    own (``EmulatorProcess``): it outlives the service's restarts and crashes within a scenario, as the broker
    does. Everything here is a named call to that process: the emulator's hooks and its plain read-outs."""

    emulated = True

    def __init__(self, kind: str, name: str, accounts: Iterable[str], start: datetime) -> None:
        self.kind, self.name = kind, name
        cash = {acct: Decimal(50000) for acct in accounts}
        if kind == "tradovate":
            self.process = EmulatorProcess(kind, username=TV_ENV["TV_TEST_USER"], password=TV_ENV["TV_TEST_PASS"],
                                           sec=TV_ENV["TV_TEST_SEC"], accounts=cash, today=start)
            self.env = TV_ENV
        elif kind == "projectx":
            self.process = EmulatorProcess(kind, username=PX_ENV["PX_TEST_USER"], api_key=PX_ENV["PX_TEST_KEY"],
                                           accounts=cash, today=start, rate_limit=(1_000_000, 60.0))
            self.env = PX_ENV
        else:
            raise ValueError(f"unknown emulated broker {kind!r}: tradovate or projectx")
        self._months: list[str] = []

    async def start(self, price: Decimal) -> None:
        await self.process.start()
        self._months = [name for name in self.process.call("contract_names")
                        if name.startswith(ROOT) and name[len(ROOT)] in MONTH_CODES]
        self.set_price(price)

    async def stop(self) -> None:
        await self.process.stop()

    def yaml(self) -> str:
        """The Broker document of ``name``: the real connector's type, endpoints at the emulator."""
        urls = self.process.urls
        if self.kind == "tradovate":
            creds = '{username: "${TV_TEST_USER}", password: "${TV_TEST_PASS}", sec: "${TV_TEST_SEC}"}'
            endpoints = f"{{rest: \"{urls['base_url']}\", websocket: \"{urls['ws_url']}\"}}"
            extra = ("app: {app_id: multibroker-fuzz, app_version: \"1.0\", cid: 8, device_id: fuzz-device}\n")
        else:
            creds = '{username: "${PX_TEST_USER}", api_key: "${PX_TEST_KEY}"}'
            endpoints = f"{{rest: \"{urls['base_url']}\", hub: \"{urls['hub_url']}\"}}"
            extra = ""
        fees = "commissions: {MES: 0.25, default: 0.79}\nmargins: {MES: 50, default: 1000}\n" if self.name == "fast" \
            else "commissions: {MES: 0.20, default: 0.60}\nmargins: {MES: 40, default: 800}\n"
        return (f"kind: Broker\nname: {self.name}\ntype: {self.kind}\nenvironment: demo\ncredentials: {creds}\n"
                f"rate_limit: {{requests: 1000, per_seconds: 1}}\n{fees}reconcile_every_seconds: 3600\n"
                f"endpoints: {endpoints}\n{extra}")

    # -- read-outs (the emulator's, in plain values) ---------------------------------------------------------
    def orders(self) -> list[dict[str, Any]]:
        book = self.process.call("order_book")
        if self.kind == "tradovate":
            return [{"client_order_id": o["cl_ord_id"], "account": o["account"],
                     "status": "filled" if o["status"] == "Filled" else str(o["status"]).lower(),
                     "broker_order_id": o["id"]} for o in book]
        return [{"client_order_id": o["custom_tag"], "account": o["account"],
                 "status": "filled" if o["status"] == PX_FILLED else str(o["status"]), "broker_order_id": o["id"]}
                for o in book]

    def fills(self, acct: str) -> list[tuple[int, str, str, str, str, int]]:
        fills = self.process.call("fills_of", acct)
        if self.kind == "tradovate":
            return [(f["seq"], str(f["id"]), str(f["cl_ord_id"]), f["contract"],
                     "buy" if f["action"] == "Buy" else "sell", int(f["qty"])) for f in fills]
        return [(f["seq"], str(f["id"]), str(f["custom_tag"]), f["contract"],
                 "buy" if f["side"] == PX_BUY else "sell", int(f["size"])) for f in fills]

    def positions(self, acct: str) -> dict[str, int]:
        return cast(dict[str, int], self.process.call("positions_of", acct))

    def held(self, acct: str, contract: str) -> int:
        return int(self.process.call("net_position", acct, contract))

    def last_fill(self) -> int:
        return int(self.process.call("fill_count"))

    # -- the broker misbehaving, and the trader at it ----------------------------------------------------------
    def set_price(self, price: Decimal) -> None:
        """Every MES month the emulator lists fills at ``price`` (the feed's price for the paper brokers)."""
        for name in self._months:
            self.process.call("set_price", name, price)

    def reject_next(self, n: int) -> None:
        self.process.call("reject_next", n)

    def partial_fill_next(self, n: int) -> None:
        """The next ``n`` market orders fill one contract first, then the rest (a 1-lot: at once)."""
        for _ in range(n):
            self.process.call("partial_fill_next", [1, 1_000_000])

    def rate_limit_next(self, n: int) -> None:
        self.process.call("rate_limit_next", n, 0.05)

    def lose_next_place_response(self) -> None:
        self.process.call("lose_next_place_response")

    down = False
    """Dropped (``drop``) and not restored yet."""

    async def drop(self) -> None:
        self.down = True
        await self.process.run("drop_connection")

    async def restore(self) -> None:
        self.down = False
        await self.process.run("restore_connection")

    async def manual_trade(self, acct: str, contract: str, side: Side, quantity: int, coid: str) -> str:
        if self.kind == "tradovate":
            fill_id = await self.process.run("trade_by_hand", acct, contract, "Buy" if side is Side.BUY else "Sell",
                                             quantity, coid)
        else:
            fill_id = await self.process.run("trade_by_hand", acct, contract, PX_BUY if side is Side.BUY else PX_SELL,
                                             quantity, coid)
        return str(fill_id)

    def move(self, acct: str, contract: str, held: int, q: int, price: Decimal) -> None:
        self.process.call("move_position", acct, contract, q)

    @staticmethod
    def sever(connector: Any) -> None:
        """A crash of our process: the connector's session goes with it (no request leaves from here on: the
        connector refuses, not connected; its tasks are cancelled with every other task of the process). The
        session itself is closed by ``bury``: the kernel's part, the sockets closing. Every session the dead
        connector ever held here is kept for that (a list: a task of the dead process cancelled mid ``connect``
        may open another before it ends, and a second cut must not lose the first)."""
        session = connector._session
        dead = connector.__dict__.setdefault("_dead_sessions", [])
        if session is not None:
            if session not in dead:
                dead.append(session)
            connector._session = None
        connector._connected = False

    @staticmethod
    async def bury(connector: Any) -> None:
        """After the dead process's tasks ended: close what it held, so that nothing is left for the garbage
        collector to find open (an unclosed session is a ResourceWarning, an error here)."""
        tasks, connector._tasks = list(connector._tasks), []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for name in ("_ws", "_hub_ws"):  # its push channel (Tradovate's socket, ProjectX's hub)
            ws = getattr(connector, name, None)
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1.0)
        EmulatedVenue.sever(connector)  # a session a dying task opened since the cut goes too
        for session in connector.__dict__.pop("_dead_sessions", []):
            await session.close()


@dataclass
class Runner:
    tmp_path: Path
    scenario: Scenario
    answers: list[Answer] = field(default_factory=list)
    flattens: list[FlattenRecord] = field(default_factory=list)
    checks: int = 0
    schedule_flattened: date | None = None
    """The trading day whose 15:55 ET flatten of ``mirror`` fired (entries are blocked from 15:50 to 18:00 ET):
    mirror stays flat after it for the rest of that day."""
    violations: list[str] = field(default_factory=list)
    """Invariants broken inside the runtime's own calls (an entry decided for a halted account), raised after the
    step."""
    price: Decimal = START_PRICE
    step_index: int = -1
    w: World | None = None
    _stack: contextlib.AsyncExitStack | None = None
    _client: TestClient | None = None
    # -- crashes and reloads (``generate(crash=True)``) --------------------------------------------------------
    live_rules: str | None = None
    """The content hash every decision from now on must come from: the rules loaded at start, or what the last
    valid reload applied (an invalid edit leaves it)."""
    multipliers: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    """Content hash -> each account's ``size_multiplier`` in those rules (what the harness wrote)."""
    caps: dict[str, int | None] = field(default_factory=dict)
    """Content hash -> the ``max_contracts`` of ``CAP_LIMIT`` in those rules (None: no such limit)."""
    routes: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)
    """Content hash -> each strategy's target accounts in those rules' routing."""
    good: dict[str, str] = field(default_factory=dict)
    """The rules files (``RULES_FILES``) as the live generation has them: an operator puts them back before a
    restart after an invalid edit (a service refuses to start on invalid rules)."""
    states: dict[tuple[str, str], dict[str, tuple[int, int]]] = field(default_factory=dict)
    """(Signal id, content hash) -> per account, (the account's net MES position, the signal's strategy's own) in
    the state the engine of those rules decided it from (``TracedEngine``): what ``max_contracts`` and an exit
    read. The record's ``ruleset`` says which entry is the decision's."""
    epoch: int = -1
    """The running process: 0 for the first, +1 at every start (``_open``), a restart or one after a crash."""
    _reload_floors: list[int] = field(default_factory=list)
    """Per process: the journal's last reload row id before it started (its reloads are the rows after, up to the
    next process's floor)."""
    _signal_epochs: dict[str, int] = field(default_factory=dict)
    """Journaled signal id -> the process that journaled it (assigned at the next start, or at a check)."""
    rules_invalid: bool = False
    _risk_original: str = ""
    """``risk.yaml`` as the scenario began (without ``CAP_LIMIT``): a cap edit adds its limit to it."""
    crash_in_flight: dict[str, int] = field(default_factory=dict)
    """Client order id -> the step of the crash at which the journal held it in flight (not final)."""
    crashes: int = 0
    crash_log: list[dict[str, Any]] = field(default_factory=list)
    """Per crash: its moment, whether the moment came (else it killed when quiet), the writes lost, the orders the
    journal held in flight and the requests left unanswered (what a crash seed exercised)."""
    _lost_writes: int = 0
    _watcher: RulesWatcher | None = None
    _killed: bool = False
    _keep: set[asyncio.Task[Any]] = field(default_factory=set)
    """Tasks a crash does not kill: the scenario's own (the test, and requests posted from outside the process)."""
    _victims: list[asyncio.Task[Any]] = field(default_factory=list)
    _carried_rejects: dict[str, int] = field(default_factory=dict)
    """Rejections a broker still owes across a crash (``reject_next``: the broker's state, not the process's)."""
    # -- manual trades (``manual`` steps) -----------------------------------------------------------------------
    moves: list[tuple[str, str, int, int]] = field(default_factory=list)
    """Hand changes of a broker's position with no fill (``via: position``): (account, contract, signed quantity,
    the broker's last fill rowid when it happened: where it stands among the fills)."""
    manual_log: list[dict[str, Any]] = field(default_factory=list)
    """What each ``manual`` step did (account, via, what the broker held, the trade), for failure messages."""
    after_manual_checks: int = 0
    """Follow-ups of a manual trade (an exit, flat target or flatten of a strategy there) checked in full."""
    emulated: EmulatedVenue | None = None
    """The broker on an emulator behind its real connector (``options["emulated"]``), if any."""

    def venue(self, broker: str) -> PaperVenue | EmulatedVenue:
        """The broker side of ``broker``: its emulator, or the paper book through the current connector."""
        if self.emulated is not None and self.emulated.name == broker:
            return self.emulated
        assert self.w is not None
        return PaperVenue(self.w.connector(broker))

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def halt_accounts(self) -> tuple[str, ...]:
        """The accounts whose ``on_mismatch`` is ``halt`` (the others adopt)."""
        return tuple(self.scenario.options.get("halt_accounts", ()))

    @property
    def tracing(self) -> bool:
        """Crash scenarios run the service's own rules watcher (hot reload) and trace which rules decided what."""
        return bool(self.scenario.options.get("crash"))

    async def _open(self, comeup: Step | None = None) -> None:
        """Start the process: journal, rules, runtime (brokers up and recovered), webhook over HTTP; the same
        wiring as ``tests.harness.runtime.world`` and ``service.app``, kept here so that a crash can abandon it.

        ``comeup``: a crash armed for the brokers' come-up (``_arm``); when it kills the process, this returns
        with it dead (``_killed``), before the webhook listens."""
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        self._killed = False
        rules = self._rules
        if self.rules_invalid:
            for name, text in self.good.items():  # the operator's fix before the restart
                if (rules / name).read_text() != text:
                    replace_file(rules / name, text)
            self.rules_invalid = False
        data_dir = self.tmp_path / "data"
        data_dir.mkdir(exist_ok=True)
        journal = Journal(data_dir / "journal.db", clock=self.clock)
        await journal.start()
        stack.push_async_callback(journal.close)
        self._begin_epoch(journal)
        watcher: Any
        if self.tracing:
            watcher = RulesWatcher(rules, build=self._build, debounce_s=0.05, max_delay_s=0.2,
                                   first_generation=journal.last_generation() + 1)  # as service.app numbers them

            async def journal_reload(record: Reload) -> None:  # as service.app wires it
                await journal.record_reload(record.as_dict())

            watcher.on_reload(journal_reload)
            await watcher.start()
            stack.push_async_callback(watcher.stop)
            self._watcher = watcher
            self._check_live_rules(watcher.current[0], "start")
        else:
            watcher = _Watcher(rules, journal.last_generation() + 1)
            stack.callback(watcher.close)
            # Journaled as service.app's watcher journals its start: the generation every record here names.
            await journal.record_reload(Reload(datetime.now(timezone.utc), watcher.ruleset.content_hash, True, (),
                                               "applied", "start", watcher.generation).as_dict())
        feed = PriceFeed(seed=0)
        feed.set_price(ROOT, self.price)
        config = SimpleNamespace(data_dir=data_dir, reconnect_backoff_s=0.02, reconnect_backoff_max_s=0.1)
        options: dict[str, Any] = {"reconnect_wait_s": 0.2}
        if self.emulated is not None:
            # The real connector's options: its credentials, and waits short enough for a scenario (the paper
            # connector reads none of them but ``reconnect_wait_s``).
            options.update(env=self.emulated.env, reconnect_wait_s=1.0, poll_interval_s=0.1, request_timeout_s=5.0,
                           reconnect_backoff_s=0.05, reconnect_backoff_max_s=0.2, throttle_wait_s=0.1)
        runtime = Runtime(config, journal, watcher, clock=self.clock, feed=feed, connector_options=options)
        self.w = World(runtime, journal, watcher, feed, self.clock, data_dir)
        stack.push_async_callback(runtime.stop)
        pool = runtime.prepare()
        if self.emulated is not None and self.emulated.down:
            await self.emulated.restore()  # a new process connects afresh (the generator's model of a restart)
        for broker, n in self._carried_rejects.items():
            pool.connector(broker).reject_next(n)  # before the start's recovery sends anything
        self._carried_rejects = {}
        self._watch_entries(runtime)
        if comeup is not None:
            self._arm(comeup, runtime)
        try:
            await runtime.start()
        except Exception:
            if not self._killed:
                raise
        if comeup is not None and await self._killed_before(lambda: not runtime.starting(), "the come-up"):
            return
        # start() returns before the brokers are up (the service listens meanwhile); scenarios begin with them.
        assert await runtime.ready(10.0), f"brokers still starting: {runtime.starting()}"
        if self.emulated is not None:
            # A real connector's first attempt may fail (the broker's rate-limit answer to its login): the pool
            # retries with backoff; scenarios begin with every broker up, as they do on paper.
            slot = runtime.pool[self.emulated.name]  # type: ignore[index]
            await wait_until(lambda: slot.available, 10.0, what=f"{self.emulated.name} up after the start")
        # Retries of rejected flatten exits, and their give-up, within a scenario; a retry a start resumed and
        # scheduled on the service's backoff looks again.
        runtime.flatten_retry_delays_s = RETRY_DELAYS_S
        for broker in BROKERS:
            runtime._wake_retries(broker)
        config_ = ServiceConfig(rules_dir=rules, data_dir=data_dir, webhook_secret=SECRET, env={})
        webhook = Webhook(config_, journal, watcher, runtime, clock=self.clock)
        app = web.Application()
        app.router.add_post("/webhook", webhook.handle)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        self._client = client

        async def stop_http() -> None:
            await webhook.drain()
            await client.close()

        stack.push_async_callback(stop_http)

    def _build(self, ruleset: RuleSet) -> TracedEngine:
        return TracedEngine(build_engine(ruleset), ruleset.content_hash, self.states)

    def _begin_epoch(self, journal: Journal) -> None:
        """A process starts on the journal the last one left: what that one journaled is its own, and the reloads
        from here on are this one's."""
        self._assign_epochs(journal)
        self.epoch += 1
        floor = journal._query("select max(id) as n from reloads")[0]["n"]
        self._reload_floors.append(int(floor or 0))

    def _assign_epochs(self, journal: Journal) -> None:
        """Every journaled signal not yet attributed was journaled by the process running (or just dead)."""
        for row in journal._query("select id from signals"):
            self._signal_epochs.setdefault(str(row["id"]), self.epoch)

    def _check_live_rules(self, ruleset: RuleSet, when: str) -> None:
        """At a start: the rules loaded are the live generation's (the first start: all multipliers 1)."""
        if self.live_rules is None:
            self.live_rules = ruleset.content_hash
            self.multipliers[ruleset.content_hash] = {name: Decimal(1) for name in ACCOUNTS}
            self.caps[ruleset.content_hash] = None
            self.routes[ruleset.content_hash] = {s: frozenset(followers(s)) for s in ROUTED}
            self.good = {name: (self._rules / name).read_text() for name in RULES_FILES}
            self._risk_original = self.good[RISK_FILE]
        elif ruleset.content_hash != self.live_rules:
            self.fail(f"the rules loaded at {when} ({ruleset.content_hash[:12]}) are not the live generation's "
                      f"({self.live_rules[:12]})")

    async def _close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()
        self.w = None
        self._client = None
        self._watcher = None

    async def run(self) -> None:
        self.clock = Clock(datetime.fromisoformat(self.scenario.options["start"]))
        emulated = self.scenario.options.get("emulated")
        if emulated is not None:
            name = emulated["name"]
            venue = EmulatedVenue(emulated["type"], name, [a for b, a, _s, _c in ACCOUNTS.values() if b == name],
                                  self.clock())
            await venue.start(self.price)
            self.emulated = venue
        self._rules = rules_dir(self.tmp_path, self.scenario.options, self.emulated)
        me = asyncio.current_task()
        assert me is not None
        self._keep = {me}
        try:
            await self._run()
        finally:
            if self.emulated is not None:
                await self.emulated.stop()

    async def _run(self) -> None:
        await self._open()
        try:
            for index, step in enumerate(self.scenario.steps):
                self.step_index = index
                await self._step(step)
            self.step_index = len(self.scenario.steps)
            await self._bring_all_up()
            await self.check()
        finally:
            await self._close()

    def _watch_entries(self, rt: Runtime) -> None:
        """Invariant: no entry is decided for an account while a halt stands on it (exits are allowed). Every
        decision that sends orders (the webhook's, a catch-up's) is held in the step it is decided in
        (``Runtime.hold``), so the halts seen here are the ones that stood when it was decided."""
        hold = rt.hold

        def checked(signal_id: str, decision: Any, **options: Any) -> None:
            for order in decision.orders:
                if order.intent != "entry":
                    continue
                why = rt.risk.halted(order.account, contract_root(order.contract))
                if why:
                    self.violations.append(f"entry {order.client_order_id} ({order.side} {order.quantity} "
                                           f"{order.contract}) decided for {order.account} while halted: {why}")
            hold(signal_id, decision, **options)

        rt.hold = checked  # type: ignore[method-assign]

    # -- steps -----------------------------------------------------------------------------------------------
    async def _post(self, body: dict[str, Any], rules: frozenset[str] | None = None) -> None:
        client = self._client
        assert client is not None
        if rules is None and self.live_rules is not None:
            rules = frozenset({self.live_rules})
        try:
            response = await client.post("/webhook", json={**body, "secret": SECRET})
            payload = await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if not self._killed:
                raise
            # The process died under the request: not acknowledged, whatever the journal holds.
            self.answers.append(Answer(dict(body), 0, {"error": repr(exc)}, self.step_index, rules))
            return
        if self._killed and response.status == 503:
            # Accepted by the kernel as the process died, answered by the dead process's webhook (its journal
            # gone): an artefact of dying in-process; a killed process answers nothing.
            self.answers.append(Answer(dict(body), 0, payload, self.step_index, rules))
            return
        self.answers.append(Answer(dict(body), response.status, payload, self.step_index, rules))

    async def _step(self, step: Step) -> None:
        w = self.w
        assert w is not None
        do = step["do"]
        follow = self._before_follow_up(step) if step.get("after_manual") else None
        if do == "send":
            await asyncio.gather(*(self._post(b) for b in step["bodies"]))
        elif do == "flatten":
            await self._flatten(step)
        elif do == "manual":
            await self._manual(step)
        elif do == "drop":
            venue = self.venue(step["broker"])
            if isinstance(venue, EmulatedVenue):
                await venue.drop()  # the connector notices by itself (its socket reset, a request refused)
            else:
                w.connector(step["broker"]).disconnect("fuzz drop")
            await wait_until(lambda: w.runtime.pool[step["broker"]].down, what=f"{step['broker']} down")
        elif do == "reconnect" and step.get("crash"):
            await self._reconnect_crash(step)
        elif do == "reconnect":
            broker = step["broker"]
            await self._reconnect(broker)
            slot = w.runtime.pool[broker]
            await wait_until(lambda: not slot.down and not slot.recovering and slot.connector.connected,
                             10.0, what=f"{broker} back")
        elif do == "pause":
            await w.runtime.pause_broker(step["broker"])
        elif do == "resume":
            await self._resume(step["broker"])
        elif do == "price":
            self.price += Decimal(step["points"])
            w.feed.set_price(ROOT, self.price)
            if self.emulated is not None:
                self.emulated.set_price(self.price)
            if step.get("risk"):
                await w.runtime.check_risk()
        elif do == "advance":
            await self._advance(step["seconds"])
        elif do == "restart":
            await self._close()
            await self._open()
            self._schedule_fired_in_journal()
        elif do == "crash":
            await self._crash(step)
        elif do == "reload":
            await self._reload(step)
        elif do == "settle":
            await self.soft_settle()
        elif do == "check":
            await self.check()
        elif do == "reject":
            self._reject_next(step["broker"], step["n"])
        elif do in EMULATED_STEPS:
            venue = self.emulated
            assert venue is not None, f"{do} steps are the emulated option's"
            if do == "rate_limit":
                venue.rate_limit_next(step["n"])
            elif do == "lose":
                venue.lose_next_place_response()
            else:
                venue.partial_fill_next(step["n"])
        elif do == "risk":
            await w.runtime.check_risk()
        elif do == "clear":
            with contextlib.suppress(KeyError):  # not halted: nothing to clear
                w.runtime.clear_halt(step["account"])
        else:
            raise ValueError(f"unknown step {step!r}")
        if follow is not None:
            await self.check_after_manual(step, follow)
        self.check_always()

    def _reject_next(self, broker: str, n: int) -> None:
        venue = self.venue(broker)
        if isinstance(venue, EmulatedVenue):
            venue.reject_next(n)
        else:
            venue.connector.reject_next(n)

    async def _reconnect(self, broker: str) -> None:
        """The broker is reachable again: a paper connector links again; an emulator listens again and the real
        connector must come back by itself."""
        venue = self.venue(broker)
        if isinstance(venue, EmulatedVenue):
            await venue.restore()
        else:
            assert self.w is not None
            await self.w.connector(broker).reconnect()

    # -- crash: kill -9 inside the test process -----------------------------------------------------------------
    async def _crash(self, step: Step) -> None:
        """Kill the process at the step's moment, restart it on the same data directory, and check.

        Moments: ``answer`` (right after the answers to ``bodies``), ``transition`` (inside the tracker's hook of
        the ``nth`` order transition to ``status``, any when None: mid fan-out at ``sending``, after the journal
        committed it and before the request left), ``delay`` (``delay_ms`` after posting), ``flatten`` (the
        ``nth`` transition of an exit of an operator flatten, else ``delay_ms`` after it was issued), ``retry``
        (the broker rejects the flatten's exits first; the ``nth`` transition of a retry's exit). A moment that
        never comes (nothing to send) kills after ``CRASH_WAIT_S`` or once everything is quiet."""
        w = self.w
        assert w is not None and w.runtime.pool is not None
        rt = w.runtime
        moment = step["moment"]
        reason = f"fuzz step {self.step_index}"
        available = {b for b in BROKERS if rt.pool.available(b)}
        started = self.clock()
        nth = int(step.get("nth") or 0)
        seen = 0

        def wanted(tracked: Tracked, status: str) -> bool:
            sid = tracked.job.signal_id
            if moment == "transition":
                return step.get("status") in (None, status)
            if moment == "flatten":  # the operator's flatten (no other flattens start during the step)
                return sid.startswith("flatten-") and not any(f"-{kind}-" in sid for kind in ("retry", "redo",
                                                                                              "follow"))
            if moment == "retry":
                return "-retry-" in sid
            return False

        def hook(tracked: Tracked, status: str) -> None:
            nonlocal seen
            if self._killed or not wanted(tracked, status):
                return None
            seen += 1
            if seen >= nth:
                self._kill()  # here: inside the runtime's own call, between two of its statements
            return None

        if nth:
            rt.tracker.hooks.append(hook)
        posts = [asyncio.create_task(self._post(b)) for b in step["bodies"]]
        self._keep.update(posts)
        flattening: asyncio.Task[Any] | None = None
        if moment in ("flatten", "retry"):
            for broker, n in (step.get("reject") or {}).items():
                self._reject_next(broker, n)
            # The operator's request runs in the process: the kill ends it.
            flattening = asyncio.create_task(rt.flatten(account=step["account"], strategy=step["strategy"],
                                                        reason=reason))
        if moment == "answer":
            await asyncio.gather(*posts)
        elif moment in ("delay", "flatten"):  # "flatten": its n-th exit transition, or the delay, what comes first
            until = time.monotonic() + step["delay_ms"] / 1000
            while not self._killed and time.monotonic() < until:
                await asyncio.sleep(0)
        else:
            deadline = time.monotonic() + CRASH_WAIT_S
            while not self._killed and time.monotonic() < deadline:
                if all(p.done() for p in posts) and (flattening is None or flattening.done()) \
                        and not self._retrying() and all(not rt.pool.available(t.job.broker)
                                                         for t in rt.tracker.in_flight()):
                    break  # quiet: the moment will not come
                await asyncio.sleep(0)
        came = self._killed
        if not self._killed:
            self._kill()
        for manual in step.get("manual") or ():
            await self._trade_by_hand(manual)  # the process is dead: the broker trades on, nobody hears of it
        await self._bury(posts)
        self._note_crash(moment, came, posts)
        comeup = step.get("comeup")
        if comeup is not None:
            # The restart dies too, inside its brokers' come-up (recovering what the first crash left in flight).
            await self._open(comeup)
            came = self._killed
            if not self._killed:
                self._kill()  # the moment never came: dies right after the come-up instead
            await self._bury([])
            self._note_crash(f"come-up:{comeup['moment']}", came, [])
        await self._open()
        self._schedule_fired_in_journal()
        await self.soft_settle()
        if moment in ("flatten", "retry"):
            record = self._crashed_flatten(step, reason, available, started)
            if record is not None:
                self.check_flatten(record)
        await self.check()

    def _note_crash(self, moment: str, came: bool, posts: list[asyncio.Task[Any]]) -> None:
        """After ``_bury``: log the crash, and remember what the journal holds in flight (never ``missed`` after)."""
        self.crashes += 1
        in_flight = self._journal_in_flight()
        self.crash_log.append({"step": self.step_index, "moment": moment, "came": came, "lost": self._lost_writes,
                               "in_flight": len(in_flight),
                               "unanswered": sum(1 for a in self.answers[-len(posts):] if a.status == 0)
                               if posts else 0})
        for coid in in_flight:
            self.crash_in_flight.setdefault(coid, self.step_index)

    async def _reconnect_crash(self, step: Step) -> None:
        """A dropped broker comes back and the process dies inside that come-up (``step["crash"]``, see ``_arm``):
        its recovery, reconciliation, re-issue of the flattens it missed, or its catch-up. Then a restart (the
        broker's first come-up in the new process does what the dead one left), and a check."""
        w = self.w
        assert w is not None and w.runtime.pool is not None
        broker, spec = step["broker"], step["crash"]
        # A flatten issued right before (the generator's set-up) while the broker was down: its exits there were
        # missed, and the come-up (this one, dying, or the restart's) owes their re-issue.
        owed = self.flattens[-1] if self.flattens and self.flattens[-1].step == self.step_index - 1 \
            and broker not in self.flattens[-1].available else None
        self._arm(spec, w.runtime)
        slot = w.runtime.pool[broker]
        await self._reconnect(broker)
        came = await self._killed_before(lambda: not slot.down and not slot.recovering and slot.connector.connected,
                                         f"{broker}'s come-up")
        if not came:
            self._kill()
        await self._bury([])
        self._note_crash(f"reconnect:{spec['moment']}", came, [])
        await self._open()
        self._schedule_fired_in_journal()
        await self.soft_settle()
        if owed is not None:
            self.check_redone(owed, broker)
        await self.check()

    def check_redone(self, record: FlattenRecord, broker: str) -> None:
        """The flatten's exits at ``broker`` were missed (it was down) and nothing traded between it and the
        broker's come-up, which the process died in: after the restart, every line in its scope at the broker's
        accounts is flat, unless the retries of the re-issue ran out (``flatten_failed``).
        Narrowed as ``check_flatten`` is: a signal posted together with the flatten and decided after it may open
        its strategy again, and a ``catch_up`` account converges to that target on the come-up (crash seed 943:
        a target long 2 decided 4 ms after the flatten, missed at the down broker, caught up there)."""
        w = self.w
        assert w is not None
        row = w.journal.get_signal(record.signal_id)
        if row is None:
            self.fail(f"flatten {record.signal_id} is not in the journal")
            return
        openers = {b["strategy"] for b in record.bodies if not reducing(b)}
        lines = self.strategy_lines()
        for account, (at, _, strategies, _) in ACCOUNTS.items():
            if at != broker or record.account not in (None, account):
                continue
            held = {(s, c): q for (a, s, c), q in lines.items() if a == account and in_scope(record, s, strategies)
                    and s not in openers and not (openers and s == EXTERNAL_STRATEGY)}
            if held:
                self.check_gave_up(account, record.signal_id, held, str(row["received_at"]))

    async def _killed_before(self, done: Any, what: str, timeout_s: float = 10.0) -> bool:
        """Wait until the armed moment killed the process (True) or ``done()`` (False)."""
        deadline = time.monotonic() + timeout_s
        while not self._killed and not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"harness: {what} neither ended nor crashed within {timeout_s:g} s")
            await asyncio.sleep(0.001)
        return self._killed

    def _arm(self, spec: Step, rt: Runtime) -> None:
        """Arm a kill for the ``nth`` time the come-up reaches ``spec["moment"]`` (``COMEUP_MOMENTS``).

        Hook points, all outside ``service``: the connectors' ``find_order`` (what recovery looks orders up with:
        ``lookup`` kills before the request, ``looked_up`` after the broker answered, before anything is
        journaled of it), the journal's ``record_position_snapshot`` (``reconciled``: the last write of a
        reconciliation pass, before the owed follow-ups and re-issued flatten exits are journaled) and
        ``record_signal`` (``redo``: a follow-up or re-issue of a flatten about to be journaled; ``catchup``: a
        catch-up signal), and the tracker's transition hook (``sent``: any order transition, such as recovery's
        resend; ``redo``/``catchup`` also count their orders' transitions). A kill in a wrapper stops the task
        right there (``CancelledError``: it was cancelled by the kill, and a dead process runs no further)."""
        moment, nth = spec["moment"], int(spec["nth"])
        seen = 0

        def hit() -> None:
            nonlocal seen
            if self._killed:
                return
            seen += 1
            if seen >= nth:
                self._kill()
                if asyncio.current_task() not in self._keep:
                    raise asyncio.CancelledError

        pool = rt.prepare()
        for broker in BROKERS:
            connector = pool.connector(broker)
            real_find = connector.find_order

            async def find_order(account: str, client_order_id: str, real: Any = real_find) -> Any:
                if moment == "lookup":
                    hit()
                found = await real(account, client_order_id)
                if moment == "looked_up":
                    hit()
                return found

            connector.find_order = find_order  # type: ignore[method-assign]
        journal = rt.journal
        real_signal, real_snapshot = journal.record_signal, journal.record_position_snapshot

        async def record_signal(**kw: Any) -> Any:
            body = kw.get("signal") or {}
            if (moment == "redo" and (body.get("redo_of") or body.get("follow_of"))) \
                    or (moment == "catchup" and body.get("catch_up")):
                hit()
            return await real_signal(**kw)

        async def record_position_snapshot(rows: Any) -> None:
            if moment == "reconciled":
                hit()
            await real_snapshot(rows)

        journal.record_signal = record_signal  # type: ignore[method-assign]
        journal.record_position_snapshot = record_position_snapshot  # type: ignore[method-assign]

        def transition(tracked: Tracked, status: str) -> None:
            sid = tracked.job.signal_id
            if moment == "sent" or (moment == "redo" and ("-redo-" in sid or "-follow-" in sid)) \
                    or (moment == "catchup" and "-catchup-" in sid):
                with contextlib.suppress(asyncio.CancelledError):  # the tracker's caller dies at its next await
                    hit()

        rt.tracker.hooks.append(transition)

    def _kill(self) -> None:
        """kill -9, synchronously (no other task runs before it is done), callable from inside the runtime's hooks.

        What is lost: every journal write not yet COMMITted (the queued batch is dropped; its callers never hear
        back), every task's next step (cancelled where it stands: no ``finally`` of theirs reaches the journal or a
        broker, because both are cut first), requests under way (their clients get no answer), and everything in
        memory. What survives: what the journal committed; a COMMIT already on the committer thread lands (the
        kill came after its fsync); the paper brokers' books (their own SQLite, as a remote broker's), with the
        market orders handed to them still to fill (the next connection finishes them, as a broker does while
        nobody is connected) and the rejections they still owe (``PaperConnector.sever`` cuts each link so)."""
        w = self.w
        assert w is not None and w.runtime.pool is not None
        self._killed = True
        journal = w.journal
        self._lost_writes = journal.die()  # queued, never executed: lost; a write from here on raises
        for broker in BROKERS:
            if self.emulated is not None and self.emulated.name == broker:
                EmulatedVenue.sever(w.connector(broker))  # its session dies with the process
                continue
            w.connector(broker).sever()  # no request leaves, no event arrives; the broker itself trades on
        self._abort_connections()  # the process's sockets close with it: requests under way get no answer
        self._victims = self._living()
        for task in self._victims:
            task.cancel()

    def _living(self) -> list[asyncio.Task[Any]]:
        """The dead process's tasks still running: all but the scenario's own and the rules watcher's (stopped
        after), and asyncio's accepting of a connection (its socket must become a transport to be closed: the
        kernel's part of a kill)."""
        keep = self._keep | (set(self._watcher._tasks) if self._watcher is not None else set())
        return [t for t in asyncio.all_tasks() if t not in keep and not t.done()
                and not getattr(t.get_coro(), "__qualname__", "").endswith("_accept_connection2")]

    def _abort_connections(self) -> None:
        """The kernel's part of a kill: every socket of the process is reset (``abort``: nothing buffered is
        flushed, no answer leaves)."""
        runner = self._client.server.runner if self._client is not None else None
        if runner is not None and runner.server is not None:
            for handler in runner.server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

    async def _bury(self, posts: list[asyncio.Task[Any]]) -> None:
        """After ``_kill``: let the cancelled tasks end, free what the dead process held (connections, the
        journal's lock, the rules engines, the port), and never run its graceful shutdown (the exit stack is
        dropped, not closed)."""
        w = self.w
        assert w is not None
        journal = w.journal
        for _ in range(20):
            victims = [t for t in self._victims if not t.done()]
            if victims:
                await asyncio.wait(victims, timeout=5.0)
            # Callbacks of the dead process (a commit landing, a connection accepted) may have started tasks
            # since: kill those too, and close what was accepted meanwhile.
            await asyncio.sleep(0)
            self._abort_connections()
            self._victims = self._living()
            for task in self._victims:
                task.cancel()
            if not self._victims:
                break
        await journal.bury()  # the COMMIT under way at the kill lands; nothing else does
        for broker in BROKERS:
            connector = w.connector(broker)
            if self.emulated is not None and self.emulated.name == broker:
                EmulatedVenue.sever(connector)
                await EmulatedVenue.bury(connector)  # the faults it owes stay at the emulator: nothing to carry
                continue
            connector.sever()  # again: nothing of the dead process linked it since
            # The broker lives on (its SQLite file); the dead process's handle on it goes, and the next process's
            # connector opens its own. The faults it still owes are the broker's, not the process's: carried.
            book = connector.book
            self._carried_rejects[broker] = book.reject_next
            book.db.close()
        if self._watcher is not None:
            await self._watcher.stop()  # in-process only: the rules on disk are what the next start loads
        else:
            cast(Any, w.watcher).close()
        if self._client is not None:
            await self._client.close()  # the port closes; requests under way get no answer
        await asyncio.gather(*posts)
        self._keep.difference_update(posts)
        self._stack = None  # dropped: its callbacks are the graceful shutdown a kill never runs
        self.w = None
        self._client = None
        self._watcher = None

    def _journal_in_flight(self) -> set[str]:
        """What the journal file holds as in flight after the kill (read as the next process will find it)."""
        path = self.tmp_path / "data" / "journal.db"
        marks = ", ".join("?" for _ in FINAL)
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute(f"select client_order_id from orders where status not in ({marks})",
                                sorted(FINAL)).fetchall()
        return {str(r[0]) for r in rows}

    def _crashed_flatten(self, step: Step, reason: str, available: set[str],
                         started: datetime) -> FlattenRecord | None:
        """The operator flatten a crash interrupted, if it reached the journal: the restarted process owes it."""
        for row in self._flatten_rows():
            body = row["signal"]
            if body.get("reason") == reason and not (body.get("redo_of") or body.get("retry_of")
                                                     or body.get("follow_of")):
                return FlattenRecord(self.step_index, str(row["id"]), step["account"], step["strategy"], available,
                                     [], trading_day(started))
        return None

    # -- reload: a rules change while signals flow ----------------------------------------------------------
    async def _reload(self, step: Step) -> None:
        """Rewrite ``accounts.yaml`` (new multipliers, or a ``bad`` edit) and reload as the service does: by the
        watcher noticing the file (``watch``) or an operator's reload (``reload_now``), with ``bodies`` posted
        meanwhile. A valid edit becomes the next generation and every later decision uses it; an invalid one is
        rejected with diagnostics naming the file, journaled, and changes nothing."""
        watcher = self._watcher
        w = self.w
        assert watcher is not None and w is not None and self.live_rules is not None
        before, generation, seen = self.live_rules, watcher.generation, len(watcher.history)
        valid = "bad" not in step
        if "multipliers" in step:
            name, text = ACCOUNTS_FILE, accounts_yaml(step["multipliers"], self.halt_accounts)
        elif "max_contracts" in step:
            name, text = RISK_FILE, risk_yaml(self._risk_original, step["max_contracts"])
        elif "routes" in step:
            name, text = ROUTING_FILE, routing_yaml(step["routes"])
        else:
            name, text = bad_edit(step["bad"], self.good)
        if valid:
            for other, good in self.good.items():  # a bad edit still on disk is mended with this one
                if other != name and (self._rules / other).read_text() != good:
                    replace_file(self._rules / other, good)
            self.rules_invalid = False
        replace_file(self._rules / name, text)
        loaded = await asyncio.to_thread(load_rules, [self._rules])
        if loaded.ok != valid:
            raise AssertionError(f"harness: the edit {step} loads {'valid' if loaded.ok else 'invalid'}: "
                                 f"{[str(d) for d in loaded.diagnostics]}")
        target = loaded.content_hash

        async def reload() -> Reload:
            if not step["watch"]:
                return await watcher.reload_now()

            def noticed() -> Reload | None:
                for record in watcher.history[seen:]:
                    if record.content_hash == target and record.outcome in ("applied", "invalid"):
                        return record
                return None

            found: Reload = await wait_until(noticed, 5.0, what="the watcher's reload of the edit")
            return found

        rules = frozenset({before, target}) if valid else frozenset({before})
        record, *_ = await asyncio.gather(reload(), *(self._post(b, rules) for b in step["bodies"]))
        if valid and record.outcome == "unchanged":
            # The watcher noticed the file first and applied it (our reload found it live): that swap is the one.
            record = next((r for r in watcher.history[seen:] if r.content_hash == target and r.outcome == "applied"),
                          record)
        live = watcher.current[0].content_hash
        if valid:
            if record.outcome != "applied" or record.generation != generation + 1 or record.content_hash != target:
                self.fail(f"valid edit of {name} {step} not applied as generation {generation + 1}: {record}")
            if live != target or self._rt.ruleset.content_hash != target:
                self.fail(f"after reload {record}: watcher runs {live[:12]}, runtime {self._rt.ruleset.content_hash[:12]}"
                          f", expected {target[:12]}")
            self.multipliers[target] = {a: Decimal(step["multipliers"].get(a, "1")) for a in ACCOUNTS} \
                if "multipliers" in step else self.multipliers[before]
            self.caps[target] = step["max_contracts"] if "max_contracts" in step else self.caps[before]
            self.routes[target] = {s: frozenset(step["routes"][s]) for s in ROUTED} if "routes" in step \
                else self.routes[before]
            self.live_rules = target
            self.good[name] = text
        else:
            if record.ok or record.outcome != "invalid" or not record.errors \
                    or not any(name in e for e in record.errors):
                self.fail(f"invalid edit {step['bad']} not rejected with a reason naming {name}: {record}")
            if watcher.generation != generation or live != before or self._rt.ruleset.content_hash != before:
                self.fail(f"invalid edit {step['bad']} changed the rules: generation {generation} -> "
                          f"{watcher.generation}, {before[:12]} -> {live[:12]}")
            self.rules_invalid = True

        def journaled() -> bool:  # written by the watcher's listener after the swap (a watch reload: after we saw it)
            return any(r.get("content_hash") == record.content_hash and r.get("outcome") == record.outcome
                       and r.get("generation") == record.generation for r in w.journal.reloads(20))

        try:
            await wait_until(journaled, 5.0)
        except AssertionError:
            self.fail(f"reload {record.outcome} (generation {record.generation}) is not in the journal: "
                      f"{w.journal.reloads(5)}")

    async def _advance(self, seconds: int) -> None:
        w = self.w
        assert w is not None and w.runtime.scheduler is not None
        self.clock.advance(timedelta(seconds=seconds))
        fired = await w.runtime.scheduler.tick()
        if any(f.action == "flatten" for f in fired):
            self.schedule_flattened = trading_day(self.clock())

    def _schedule_fired_in_journal(self) -> None:
        assert self.w is not None
        for row in self.w.journal.recent_signals(1000):
            if row["id"].startswith("flatten-flatten-mirror"):
                self.schedule_flattened = trading_day(parse_utc(str(row["received_at"])))
                return

    async def _flatten(self, step: Step) -> None:
        w = self.w
        assert w is not None and w.runtime.pool is not None
        for broker, n in (step.get("reject") or {}).items():
            self._reject_next(broker, n)
        available = {b for b in BROKERS if w.runtime.pool.available(b)}
        # Other strategies' books, when nothing else can move them during this step: no order in flight or held,
        # no retry pending, and only signals of the flattened strategy posted with it (a risk flatten meanwhile is
        # seen in the journal and lifts the comparison).
        others: dict[tuple[str, str, str], int] | None = None
        if step["strategy"] is not None and self._idle() \
                and all(b["strategy"] == step["strategy"] for b in step["bodies"]):
            others = {k: q for k, q in self.ledger_lines().items() if k[1] != step["strategy"]}
        started = self.clock()
        result: dict[str, Any] = {}

        async def flatten() -> None:
            result.update(await w.runtime.flatten(account=step["account"], strategy=step["strategy"],
                                                  reason=f"fuzz step {self.step_index}"))
            if step.get("advance"):
                await self._advance(step["advance"])  # while its exits and their retries are under way

        # The flatten goes among the signals at a random place (from the step's index: replayable).
        jobs = [self._post(b) for b in step["bodies"]]
        at = random.Random(self.step_index).randint(0, len(jobs))
        jobs.insert(at, flatten())
        await asyncio.gather(*jobs)
        record = FlattenRecord(self.step_index, result["signal_id"], step["account"], step["strategy"], available,
                               list(step["bodies"]), trading_day(started))
        self.flattens.append(record)
        await self.soft_settle()
        self.check_flatten(record)
        if others is not None:
            self.check_other_strategies(record, others, started)

    def _idle(self) -> bool:
        """Nothing in flight, held or owed a retry: only what this step does moves a book."""
        rt = self._rt
        return not rt.tracker.unsettled() and not rt._holds and not self._retrying()

    def _retrying(self) -> bool:
        """A retry of rejected flatten exits is pending or running at an available broker."""
        rt = self._rt
        assert rt.pool is not None
        return any(not task.done() for broker, task in rt._retry_runners.items() if rt.pool.available(broker))

    @property
    def _rt(self) -> Runtime:
        assert self.w is not None
        return self.w.runtime

    async def _bring_all_up(self) -> None:
        w = self.w
        assert w is not None and w.runtime.pool is not None
        for broker in BROKERS:
            slot = w.runtime.pool[broker]
            if slot.down or not slot.connector.connected:
                await self._step({"do": "reconnect", "broker": broker})
            if slot.admin_paused:
                await self._resume(broker)

    async def soft_settle(self, timeout_s: float = 8.0) -> None:
        """Until every order that can settle did: the queues are empty, no flatten's exits are held (but stand-ins
        and owed follow-ups waiting for a broker that is away), what is still unsettled is at a broker that is not
        available (down, recovering or paused), and no retry of a rejected flatten exit is pending at an available
        broker (retried until flat, or given up with ``flatten_failed``: ``RETRY_DELAYS_S``)."""
        await wait_until(self._quiet, timeout_s, what="orders settled and retries done where their broker is up")

    def _coming_back(self) -> bool:
        """The emulated broker is away though the scenario did not drop or pause it: its real connector lost the
        connection on its own (a lost answer resets it, a rate-limit answer to a reconnect's login) and comes
        back by itself; what the scenario expects up is waited for."""
        venue, w = self.emulated, self.w
        if venue is None or venue.down or w is None or w.runtime.pool is None:
            return False
        slot = w.runtime.pool[venue.name]
        return not slot.admin_paused and not slot.available

    def _quiet(self) -> bool:
        """What ``soft_settle`` waits for (its docstring); at a check, where every broker is up, anything not
        quiet was started by the check itself (``check``)."""
        w = self.w
        assert w is not None and w.runtime.pool is not None and w.runtime.dispatcher is not None
        rt = w.runtime
        pool = rt.pool

        def waits_for_broker(key: str, held: Any) -> bool:
            # A hold that is never sent and ends only when its broker is back: a stand-in for what an exit in
            # flight there will have done (``service.exits``' ``standin:``, ``service.overtaken``'s ``overtaken:``:
            # released once the exit is final, which a broker that is away cannot tell), or a follow-up a start
            # found owed (``owed:``: issued at its broker's come-up). Any other flatten hold is a flatten, follow-up
            # or re-issue on its way out, and so is one of these whose broker is available.
            kind, _, exit_id = key.partition(":")
            if kind == "owed":
                return all(not pool.available(job.broker) for job in held.jobs)
            if kind in ("standin", "overtaken"):
                tracked = rt.tracker.orders.get(exit_id)
                return tracked is not None and tracked.status not in FINAL and not pool.available(tracked.job.broker)
            return False

        if rt.dispatcher._running or any(rt.dispatcher.queued().values()):  # type: ignore[union-attr]
            return False
        if self._coming_back():
            return False
        if rt.redo_tasks or any(h.flatten and not waits_for_broker(k, h) for k, h in rt._holds.items()):
            return False  # a flatten, follow-up or re-issue on its way out
        if self._retrying():
            return False
        return all(not pool.available(t.job.broker) for t in rt.tracker.unsettled())  # type: ignore[union-attr]

    # -- manual: a trade nobody ordered through multibroker -------------------------------------------------------
    def _contract(self) -> str:
        """The fuzz contract now (what ``MES1!`` resolves to at the clock's time)."""
        return resolve(f"{ROOT}1!", self.clock(), self._rt.ruleset.catalog).contract

    async def _manual(self, step: Step) -> None:
        """The trader trades by hand at ``step["account"]``'s broker. At a broker that is up, on a settled position
        (the trader looks at the platform, then acts); then, for a fill the stream delivers, until the service
        booked it. At a broker that is down the fill waits for the come-up's reconciliation (``fills_since``)."""
        w = self.w
        assert w is not None and w.runtime.pool is not None
        broker = ACCOUNTS[step["account"]][0]
        if w.runtime.pool.available(broker):
            await self.soft_settle()
        fill_id = await self._trade_by_hand(step)
        if fill_id is not None and w.connector(broker).connected:
            key = f"{broker}:{fill_id}"
            await wait_until(lambda: key in w.runtime.ledger.seen_fills, 5.0,
                             what=f"the manual fill {fill_id} at {broker} booked")

    async def _trade_by_hand(self, step: Step) -> str | None:
        """Trade at the broker as a second client would (``PaperConnector.manual_trade``, client order id
        ``manual-<n>``), or move its position with no fill (``via: position``). Sized from what the broker holds:
        ``close`` all, ``partial`` half, ``reverse`` past flat by ``quantity``, ``open`` (or anything at a flat
        account) ``quantity`` on ``side``; ``undo`` takes back the hand moves with no fill at the account. Returns
        the broker's fill id (None: no fill). Synchronous: callable while the process lies dead."""
        w = self.w
        assert w is not None
        account = step["account"]
        broker, acct, _, _ = ACCOUNTS[account]
        venue = self.venue(broker)
        contract = self._contract()
        held = venue.held(acct, contract)
        sign = 1 if held > 0 else -1
        kind = step["kind"]
        if kind == "undo":
            q = -sum(qty for a, c, qty, _ in self.moves if a == account and c == contract)
        elif held and kind == "close":
            q = -held
        elif held and kind == "partial":
            q = -sign * max(1, abs(held) // 2)
        elif held and kind == "reverse":
            q = -held - sign * int(step["quantity"])
        else:
            q = int(step["quantity"]) * (1 if step["side"] == "buy" else -1)
        self.manual_log.append({"step": self.step_index, "account": account, "via": step["via"], "kind": kind,
                                "held": held, "trade": q, "at": self.clock().astimezone(timezone.utc).isoformat()
                                .replace("+00:00", "Z")})
        if q == 0:
            return None
        if step["via"] == "fill":
            side = Side.BUY if q > 0 else Side.SELL
            if isinstance(venue, EmulatedVenue):
                return await venue.manual_trade(acct, contract, side, abs(q), f"manual-{step['n']}")
            return venue.manual_trade(acct, contract, side, abs(q), f"manual-{step['n']}")
        last = venue.last_fill()
        venue.move(acct, contract, held, q, self.price)
        self.moves.append((account, contract, q, int(last)))
        return None

    def model_lines(self, account: str) -> dict[tuple[str, str], int] | None:
        """What each strategy of ``account`` holds, and what belongs to nobody (``EXTERNAL_STRATEGY``), by
        contract, as the broker's own fills say in the order it made them, each manual trade netted at the moment
        it was made: first against what earlier trades by hand left (a position opened by hand, closed by hand),
        then against the strategies on the other side (by name, as ``service.ledger.Ledger._book_manual``), the rest
        belonging to nobody. A strategy's own fills are its own whatever came before them: a position opened by
        hand is not closed by a strategy's later trade on the other side, and a strategy that re-opens after a
        manual close holds what it re-opened. The hand moves with no fill count at the account's ``adopt``
        (reconciliation books them, after the fills it booked before: placed there), not at a ``halt`` account
        (its ledger keeps its books: ``check``).

        Independent of the service's ledger: the broker's fills (``manual-`` client order ids are the trader's)
        and which strategy the journal booked each of ours to (an account-wide flatten's exit of what belongs to
        nobody is booked to nobody). None while a fill of ours is not journaled yet."""
        w = self.w
        assert w is not None
        broker, acct, _, _ = ACCOUNTS[account]
        booked = {str(f["fill_id"]): str(f.get("strategy") or EXTERNAL_STRATEGY)
                  for f in w.journal.fills() if f["broker"] == broker and f["account"] == account}
        journaled = w.journal._query("SELECT rowid AS n, fill_id, kind, contract, side, quantity FROM fills "
                                     "WHERE broker = ? AND account = ? ORDER BY rowid", (broker, account))
        journal_n = {str(r["fill_id"]): int(r["n"]) for r in journaled if not r["kind"]}
        events: list[tuple[int, int, str, str, int]] = []
        placed: list[tuple[int, int]] = []  # (journal row, broker row) of each broker fill
        for row in self.venue(broker).fills(acct):
            rowid, fill_id, coid, contract, side, qty = row
            signed = int(qty) if side == "buy" else -int(qty)
            if str(coid).startswith("manual-"):
                events.append((int(rowid), 0, MANUAL, str(contract), signed))
            elif str(fill_id) in booked:
                events.append((int(rowid), 0, booked[str(fill_id)], str(contract), signed))
            else:
                return None
            if str(fill_id) in journal_n:
                placed.append((journal_n[str(fill_id)], int(rowid)))
        if account not in self.halt_accounts:
            # A hand move with no fill: when it happened, only the broker knew; the service books it when a pass
            # adopts it (``Journal.record_adoption``), after the fills it had booked by then, and so does this.
            for i, row in enumerate(r for r in journaled if r["kind"] == ADOPTED):
                after = max((b for j, b in placed if j < int(row["n"])), default=0)
                q = int(row["quantity"])
                events.append((after, 1 + i, MANUAL, str(row["contract"]), q if row["side"] == "buy" else -q))
        raw: dict[tuple[str, str], int] = {}
        nobody: dict[str, int] = {}
        for _r, _o, who, contract, q in sorted(events):
            if who == EXTERNAL_STRATEGY:
                nobody[contract] = nobody.get(contract, 0) + q
                continue
            if who != MANUAL:
                raw[(who, contract)] = raw.get((who, contract), 0) + q
                continue
            mine = nobody.get(contract, 0)
            if mine and (mine > 0) != (q > 0):  # closes (some of) what was opened by hand
                take = min(abs(mine), abs(q)) * (1 if q > 0 else -1)
                nobody[contract] = mine + take
                q -= take
            for key in sorted(k for k in raw if k[1] == contract):
                held = raw[key]
                if q == 0:
                    break
                if held == 0 or (held > 0) == (q > 0):
                    continue
                take = min(abs(held), abs(q)) * (1 if q > 0 else -1)
                raw[key] = held + take
                q -= take
            nobody[contract] = nobody.get(contract, 0) + q
        lines = {k: v for k, v in raw.items() if v}
        lines.update({(EXTERNAL_STRATEGY, c): v for c, v in nobody.items() if v})
        return lines

    def service_lines(self, account: str) -> dict[tuple[str, str], int]:
        """The same as the service has it: its ledger's lines net of manual trades (``Ledger.strategy_lines``)."""
        return {(s, c): q for (a, s, c), q in self._rt.ledger.strategy_lines().items() if a == account}

    def _before_follow_up(self, step: Step) -> dict[str, Any] | None:
        """Before an exit, flat target or flatten that follows a manual trade: what its check needs."""
        w = self.w
        assert w is not None and w.runtime.pool is not None
        account = step["after_manual"]["account"]
        broker = ACCOUNTS[account][0]
        return {"available": w.runtime.pool.available(broker), "at": self.clock(),
                "since": self.clock().astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
                "rules": self.live_rules}

    async def check_after_manual(self, step: Step, before: dict[str, Any]) -> None:
        """After the affected strategy's exit, flat target or flatten settled: what it held there is closed, and
        no more. Read from the broker's fills (``model_lines``): a manual close is never traded again (the exit
        selling it a second time leaves the strategy on the other side of what it held), a position opened by
        hand is nobody's (a strategy exit closing it leaves the strategy holding the other side of it), and a
        strategy that traded after a manual trade is closed in full. An account-wide flatten closes what belongs
        to nobody as well (``service.flatten._flatten_orders``: its lines include the manual residual): the
        account ends flat.

        Checked when it can be told: the account's broker was available throughout and everything there settled,
        the exit reached the account (its routing) and filled (a webhook exit the broker rejects is not retried),
        no flatten there gave up, nothing posted with it opens the strategy again, and (``adopt``) no hand move
        with no fill is waiting for a reconciliation pass (the service cannot know of it before)."""
        w = self.w
        assert w is not None and w.runtime.pool is not None
        rt = w.runtime
        account, strategy = step["after_manual"]["account"], step["after_manual"]["strategy"]
        broker = ACCOUNTS[account][0]
        if step["do"] == "send":
            await self.soft_settle()
        if not before["available"] or not rt.pool.available(broker):
            return
        if any(t.job.account == account for t in rt.tracker.unsettled()) or self._retrying():
            return
        if any(b["strategy"] == strategy and not reducing(b) for b in step["bodies"]):
            return
        if strategy in ROUTED and before["rules"] is not None \
                and account not in self.routes[before["rules"]].get(strategy, frozenset({account})):
            return
        if account not in self.halt_accounts and rt.ledger.account_positions(account) != \
                self.broker_positions(account):
            return  # a hand move with no fill that no pass has booked yet: nothing traded could know of it
        if any(e.get("name") == account and str(e["at"]) >= before["since"] for e in self.flatten_failures()):
            return
        if step["do"] == "send":
            key = str(step["bodies"][0]["id"])  # the body's id; the journal's signal id is in the answer
            answer = next((a for a in reversed(self.answers) if a.body.get("id") == key), None)
            if answer is None or answer.status != 202:
                return
            sid = str(answer.payload["signal_id"])
            if any(o["account"] == account and o["status"] != FILLED for o in w.journal.orders(signal_id=sid)):
                return
        model = self.model_lines(account)
        if model is None:
            return  # a fill of ours not booked yet
        whole = step["do"] == "flatten" and step["strategy"] is None
        if whole:  # the account ends flat, whoever held what
            sums: dict[tuple[str, str], int] = {}
            for (_who, contract), q in model.items():
                sums[("account", contract)] = sums.get(("account", contract), 0) + q
            left = {k: q for k, q in sums.items() if q}
        else:
            left = {k: q for k, q in model.items() if k[0] == strategy}
        self.after_manual_checks += 1
        if left:
            self.fail(f"{account}: after {step['do']} of {strategy if not whole else 'everything'} settled, the "
                      f"broker's fills leave {left} (each manual trade netted when it was made; the service's "
                      f"lines {self.service_lines(account)}, broker {self.broker_positions(account)}): a manual "
                      f"close traded again, a position opened by hand closed by a strategy, or a strategy's own "
                      f"position left open; manual trades {[m for m in self.manual_log if m['account'] == account]}")

    async def reconcile_all(self) -> dict[str, dict[str, Any]]:
        """One reconciliation pass of every broker (as the periodic one does); its rows by account."""
        rt = self._rt
        rows: dict[str, dict[str, Any]] = {}
        for broker in BROKERS:
            for row in await self._reconcile(rt, broker):
                rows[str(row["account"])] = row
        return rows

    async def _reconcile(self, rt: Any, broker: str) -> list[dict[str, Any]]:
        """The check's pass of ``broker``, past the throttling a scenario owes the service (``_past_throttling``)."""
        return cast(list[dict[str, Any]],
                    await self._past_throttling(broker, lambda: rt.reconcile_broker(broker, reason="fuzz check")))

    async def _resume(self, broker: str) -> None:
        """An operator's resume of ``broker``: it carries out the flattens missed there first (a reconciliation),
        and a resume that fails leaves the broker paused; the operator resumes again (``_past_throttling``)."""
        await self._past_throttling(broker, lambda: self._rt.resume_broker(broker))

    async def _past_throttling(self, broker: str, call: Any) -> Any:
        """``call()``, again after the wait the broker asked for while it raises ``RateLimited`` at the emulated
        broker. Why: a ``rate_limit`` step owes the next n requests a 429 whoever sends them, and those the service
        did not send yet stack up (the connector resends a read a few times, then raises). They are meant for the
        service; the harness's own calls (the check's reconciliation pass, an operator's resume) meet them as the
        service's periodic pass would, and do what is done with a throttled pass or a failed resume: go again
        after the wait (a pass is a read and an idempotent booking of what it read; a resume that failed left the
        broker paused, with what it owed still owed). Clearing the owed answers instead would change what the
        service meets after. Likewise a call that finds the emulated connector dropped by itself."""
        for _ in range(20):
            try:
                return await call()
            except RateLimited as exc:
                if self.emulated is None or self.emulated.name != broker:
                    raise  # only the emulated broker is throttled by a step
                await asyncio.sleep(min(float(exc.retry_after_s or 0.1), 1.0))
            except BrokerUnavailable:
                # The emulated connector dropped by itself meanwhile (a lost answer owed by a ``lose`` step resets
                # its connection): it comes back on its own, and the call goes again then, as the periodic pass
                # runs again once its broker is back. A broker the scenario took down is not waited for.
                if self.emulated is None or self.emulated.name != broker or not self._coming_back():
                    raise
                await wait_until(lambda: not self._coming_back(), 10.0, what=f"{broker} back by itself")
        return await call()

    def hidden(self, account: str) -> dict[str, int]:
        """The hand moves with no fill at ``account`` by contract (what a ``halt`` account's ledger never books)."""
        out: dict[str, int] = {}
        for a, c, q, _ in self.moves:
            if a == account:
                out[c] = out.get(c, 0) + q
        return {c: q for c, q in out.items() if q}

    def check_reconciled(self, rows: dict[str, dict[str, Any]], halts_before: dict[str, Any]) -> None:
        """After the check's own pass. An ``adopt`` account agrees with its broker (the pass booked any hand move
        to nobody, with an ``adopt`` risk event) and never stands halted by reconciliation. A ``halt`` account's
        ledger keeps its books: it differs from the broker by exactly the hand moves with no fill (fills by hand
        are booked as they come, at any policy), the pass reports that mismatch, and while it lasts the account
        stands halted (by reconciliation, or by an earlier halt of another source); once the broker matches again
        (the hand change undone) the pass lifts a reconciliation halt, with a ``clear`` risk event. An operator's
        clear lasts until the next pass that still finds the mismatch."""
        w = self.w
        assert w is not None
        rt = self._rt
        for account in ACCOUNTS:
            row = rows.get(account)
            if row is None:
                self.fail(f"the check's reconciliation pass has no row for {account}")
                continue
            mismatched = {m["contract"]: int(m["broker"]) - int(m["ledger"]) for m in row["mismatches"]}
            halt = rt.risk.halts.get(account)
            if account not in self.halt_accounts:
                if halt is not None and halt.source == "reconciliation":
                    self.fail(f"{account} (on_mismatch adopt) is halted by reconciliation: {halt.reason}")
                continue
            hidden = self.hidden(account)
            if mismatched != hidden:
                self.fail(f"{account} (on_mismatch halt): the pass found {row['mismatches']}, the hand moves with "
                          f"no fill there are {hidden}")
            if hidden and halt is None:
                self.fail(f"{account} (on_mismatch halt) differs from its broker by {hidden} and is not halted")
            elif hidden and halts_before.get(account) is None and halt is not None \
                    and halt.source != "reconciliation":
                self.fail(f"{account}: the mismatch {hidden} halted it with source {halt.source}")
            if not hidden and halt is not None and halt.source == "reconciliation":
                self.fail(f"{account} matches its broker again and is still halted by reconciliation: {halt.reason}")
            if hidden and halt is not None and halt.source == "reconciliation" and not any(
                    e.get("kind") == "halt" and e.get("name") == account and e.get("source") == "reconciliation"
                    for e in w.journal.risk_events(5000)):
                self.fail(f"{account} is halted by reconciliation and no risk event says so")

    def check_manual(self) -> None:
        """At quiescence, after the check's pass: per account, what each strategy holds and what belongs to nobody
        is what the broker's fills say (``model_lines``), not a re-reading of them: a manual trade closes what the
        strategies held when it was made, never what they trade later."""
        for account in ACCOUNTS:
            model, service = self.model_lines(account), self.service_lines(account)
            if model is None:
                self.fail(f"{account}: a fill at the broker is not in the journal at quiescence")
            if model != service:
                self.fail(f"{account}: the service holds {service} per strategy (and to nobody), the broker's "
                          f"fills say {model} (each manual trade netted when it was made); broker "
                          f"{self.broker_positions(account)}; manual trades "
                          f"{[m for m in self.manual_log if m['account'] == account]}")

    # -- invariants ------------------------------------------------------------------------------------------
    def fail(self, what: str) -> None:
        raise InvariantError(f"after step {self.step_index}: {what}")

    def broker_positions(self, account: str) -> dict[str, int]:
        w = self.w
        assert w is not None
        broker, acct, _, _ = ACCOUNTS[account]
        return self.venue(broker).positions(acct)

    def ledger_lines(self) -> dict[tuple[str, str, str], int]:
        """The ledger's raw books: each strategy's fills, and the lines booked to no strategy."""
        w = self.w
        assert w is not None
        return {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}

    def strategy_lines(self) -> dict[tuple[str, str, str], int]:
        """What each strategy still holds, net of manual closes, and what belongs to nobody (``EXTERNAL_STRATEGY``):
        the lines a flatten closes (``Ledger.strategy_lines``; ``check_manual`` holds them to the broker's fills)."""
        return self._rt.ledger.strategy_lines()

    def flatten_failures(self) -> list[dict[str, Any]]:
        """The ``flatten_failed`` risk events of the scenario (newest first)."""
        w = self.w
        assert w is not None
        start = datetime.fromisoformat(self.scenario.options["start"]) - timedelta(days=1)
        return w.journal.risk_events_since(start, kinds=[FLATTEN_FAILED])

    def gave_up(self, account: str, family: str, since: str | None) -> dict[str, Any] | None:
        """The ``flatten_failed`` event naming ``account`` for flatten ``family`` (the flatten, or one of its
        follow-ups, whose retries are its own family: ``<id>-follow-<n>``; a prefix such as the schedule's
        ``flatten-flatten-mirror`` covers each of its firings), if any.

        Narrowed: or one of another flatten journaled at or after ``since`` (the family's time). Flattens that
        overlap net out each other's exits in flight (``_flatten_orders``, the redo and the retry alike): when
        the other one's exits carry the account's close and its retries run out, this family settled with
        "nothing left to close" and the give-up is the other's (seen: a schedule flatten's redo netted against a
        risk flatten's redo, whose exits the broker kept rejecting)."""
        for event in self.flatten_failures():
            if event.get("name") != account:
                continue
            origin = str(event.get("origin"))
            if origin == family or origin.startswith(f"{family}-"):
                return event
            if since is not None and str(event["at"]) >= since:
                return event
        return None

    def check_gave_up(self, account: str, family: str, held: Any, since: str | None) -> None:
        """``account`` still holds ``held`` in the scope of flatten ``family``: allowed only when its retries ran out
        (a ``flatten_failed`` event names the account), and then a halt stands on the account for the rest of the
        event's trading day (``Runtime._flatten_failed``), unless an operator cleared it."""
        event = self.gave_up(account, family, since)
        if event is None:
            self.fail(f"flatten {family}: {account} still holds {held} and no flatten_failed names it")
            return
        today = trading_day(self.clock())
        if str(event["day"]) == today.isoformat() and not self._rt.risk.halted(account) \
                and not self._cleared_since(account, str(event["at"])):
            self.fail(f"flatten {family}: {account} gave up ({event['reason']}) but is not halted")

    def _cleared_since(self, account: str, at: str) -> bool:
        w = self.w
        assert w is not None
        return any(e.get("kind") == "clear" and e.get("name") == account and str(e["at"]) >= at
                   for e in w.journal.risk_events(1000))

    def check_flatten(self, record: FlattenRecord) -> None:
        """Invariants 3 and 4, with retries: a flatten closes what is in its scope, and never reverses it.

        Checked per account whose broker was available when the flatten was computed and still is (elsewhere the
        exits are missed by design and re-issued on the come-up): its exits filled, or were rejected and retried;
        once the retries are done, every line in scope is flat, or a ``flatten_failed`` event names the account
        (the retries ran out, or the flatten's trading day ended first) and a halt stands on it.
        Narrowed: a signal of a strategy in scope posted together with the flatten may legitimately open a position
        after it (the webhook decides it after the flatten, on a flat book), so the check covers only strategies
        whose concurrent signals can only close (``exit``, target ``flat``).
        """
        w = self.w
        assert w is not None and w.runtime.pool is not None
        row = w.journal.get_signal(record.signal_id)
        if row is None:
            self.fail(f"flatten {record.signal_id} is not in the journal")
            return
        exits: dict[str, list[dict[str, Any]]] = {}
        for order in row["orders"]:
            exits.setdefault(order["account"], []).append(order)
        openers = {b["strategy"] for b in record.bodies if not reducing(b)}
        lines = self.strategy_lines()
        for account, (broker, _, strategies, _) in ACCOUNTS.items():
            if record.account not in (None, account) or broker not in record.available \
                    or not w.runtime.pool.available(broker):
                continue
            # An emulated broker's connector may drop by itself between the flatten and its dispatch (a lost
            # answer resets the connection): the exit is missed there by design and re-issued on the come-up.
            # Also while its request is under way (waiting out a 429 when another order's lost answer drops the
            # link: ``unknown``, then recovery finds it not at the broker, ``missed``; crash seed 45 on ProjectX):
            # the come-up's re-issue naming the account is what makes that good, so it must be journaled.
            away = self.emulated is not None and broker == self.emulated.name
            if any(o["status"] not in (FILLED, REJECTED, CANCELLED)
                   and not (away and o["status"] == MISSED and ("down at dispatch" in str(o.get("detail"))
                                                                or self._redone(record.signal_id, broker, account)))
                   for o in exits.get(account, [])):
                self.fail(f"flatten {record.signal_id}: exit at available broker {broker} neither filled nor "
                          f"rejected: {exits[account]}")
            held = {(s, c): q for (a, s, c), q in lines.items() if a == account and in_scope(record, s, strategies)
                    and s not in openers and not (openers and s == EXTERNAL_STRATEGY)
                    and not (s == EXTERNAL_STRATEGY and self._manual_since(account, str(row["received_at"])))}
            if held:
                self.check_gave_up(account, record.signal_id, held, str(row["received_at"]))

    def _redone(self, fid: str, broker: str, account: str) -> bool:
        """A come-up's re-issue of flatten ``fid`` at ``broker`` (``<fid>-redo-<broker>-<n>``) names ``account``:
        its missed exit there was carried out again (whether that closed the line is the check of what it holds)."""
        w = self.w
        assert w is not None
        n = 1
        while (redo := w.journal.get_signal(f"{fid}-redo-{broker}-{n}")) is not None:  # numbered from 1, no gaps
            if account in ((redo.get("signal") or {}).get("accounts") or ()):
                return True
            n += 1
        return False

    def _manual_since(self, account: str, at: str) -> bool:
        """A trade by hand at ``account`` after ``at`` (a crash's, while the flatten's exits were at the broker:
        both close, and what the trader did is nobody's)."""
        return any(m["account"] == account and m["at"] >= at for m in self.manual_log)

    def check_other_strategies(self, record: FlattenRecord, before: dict[tuple[str, str, str], int],
                               started: datetime) -> None:
        """A flatten of one strategy never changes another strategy's book (in the same account or elsewhere):
        checked when nothing else could move them during the step (see ``_flatten``)."""
        w = self.w
        assert w is not None
        after = {k: q for k, q in self.ledger_lines().items() if k[1] != record.strategy}
        if after == before:
            return
        since = started.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        foreign = [s["id"] for s in w.journal.recent_signals(200) if str(s["received_at"]) >= since
                   and (s.get("signal") or {}).get("flatten") and not str(s["id"]).startswith(record.signal_id)]
        if not foreign:
            self.fail(f"flatten {record.signal_id} of {record.strategy} changed other strategies' books: "
                      f"{before} -> {after}")

    async def check(self) -> None:
        """Every invariant at a quiescence point: every broker up and not paused, everything settled."""
        w = self.w
        assert w is not None and w.runtime.pool is not None
        if self._coming_back():
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: not self._coming_back(), 10.0)
        for broker in BROKERS:
            if not w.runtime.pool.available(broker):
                self.fail(f"check at a point where {broker} is not available: {w.runtime.pool[broker].state}")
        for _ in range(3):
            await self.soft_settle()
            await w.settle(8.0)
            # A reconciliation pass, as the periodic one (``reconcile_every_seconds``) would run: a hand move with
            # no fill is found by nothing else.
            halts_before = {a: w.runtime.risk.halts.get(a) for a in ACCOUNTS}
            reconciled = await self.reconcile_all()
            await asyncio.sleep(0)
            if self._quiet():
                break
            # The risk monitor ticks on its own (``RISK_TICK_S``, real time): a breach due since the last step may
            # act during the pass (crash seed 165 under load: a flatten journaled while the pass ran). Its orders
            # are not what this point checks settled; settle them and look again.
        self.checks += 1
        journal_orders = {o["client_order_id"]: o for o in w.journal.orders()}

        # 1. No client order id placed twice at a broker (its own database, across restarts); every order the
        #    broker holds is one the journal knows, for the account the journal names.
        for broker in BROKERS:
            at_broker = self.venue(broker).orders()
            counts: dict[Any, int] = {}
            for order in at_broker:
                counts[order["client_order_id"]] = counts.get(order["client_order_id"], 0) + 1
            dupes = [{"client_order_id": c, "n": n} for c, n in sorted(counts.items(), key=str) if n > 1]
            if dupes:
                self.fail(f"client order ids placed twice at {broker}: {dupes}")
            for order in at_broker:
                if str(order["client_order_id"]).startswith("manual-"):
                    continue  # placed by hand at the broker (``manual`` steps): not ours
                known = journal_orders.get(order["client_order_id"])
                if known is None:
                    self.fail(f"{broker} holds order {order['client_order_id']} the journal does not know: {order}")
                    continue
                if ACCOUNTS[known["account"]][1] != order["account"] or known["broker"] != broker:
                    self.fail(f"order {order['client_order_id']} journaled for {known['account']}@{known['broker']}"
                              f" sits in {order['account']}@{broker}")
                if known["status"] == MISSED:
                    self.fail(f"order {order['client_order_id']} is journaled missed but the broker has it: {order}")
                if order["status"] == "filled" and known["status"] != FILLED:
                    self.fail(f"order {order['client_order_id']} filled at {broker}, journaled {known['status']}")

        # 5. Every journaled order final at quiescence.
        for coid, order in journal_orders.items():
            if order["status"] not in FINAL:
                self.fail(f"order {coid} of {order['signal_id']} is {order['status']} at quiescence")

        # 2. Ledger = broker per account and contract, after the pass: the broker holds the sum of the
        #    strategies' books (and of the lines booked to no strategy); at a ``halt`` account, plus the hand moves
        #    with no fill its ledger never books (``check_reconciled``). The journal's fills replayed give the same
        #    ledger, line by line, but for what reconciliation adopted (never journaled as fills: a restart's pass
        #    adopts it again): the hand moves with no fill at an ``adopt`` account, booked to nobody.
        lines = self.ledger_lines()
        self.check_reconciled(reconciled, halts_before)
        for account in ACCOUNTS:
            ledger: dict[str, int] = {}
            for (a, _s, c), q in lines.items():
                if a == account:
                    ledger[c] = ledger.get(c, 0) + q
            if account in self.halt_accounts:
                for c, q in self.hidden(account).items():
                    ledger[c] = ledger.get(c, 0) + q
            ledger = {c: q for c, q in ledger.items() if q}
            broker = self.broker_positions(account)
            if ledger != broker:
                self.fail(f"{account}: the strategies' books sum to {ledger} != broker {broker} "
                          f"(books {[(k, q) for k, q in lines.items() if k[0] == account]}, hand moves with no "
                          f"fill {self.hidden(account)})")
        # What a restart would rebuild: the journal's fills, and the hand moves adopted among them, booked in order.
        replayed = {key: book.quantity for key, book in replay(w.journal.fills(), w.runtime._point_value).items()}
        replayed = {k: q for k, q in replayed.items() if q}
        if replayed != self.ledger_lines():
            self.fail(f"journal fills (and adoptions) replayed {replayed} != runtime ledger {self.ledger_lines()}")
        self.check_manual()

        # Best mode: the strategy's position lives at one account only (it sends targets and exits only: a target
        #    keeps one holder, closes any other and opens nowhere else; see engine.decide's docstring). Read from
        #    the strategy's own books (= the broker, per 2.): ``bs`` also holds ``trend``'s position.
        effective = self.strategy_lines()
        holders = {a: held for a in BEST
                   if (held := {c: q for (acct, s, c), q in effective.items() if acct == a and s == "best"})}
        if len(holders) > 1:
            self.fail(f"best-mode position held at several accounts: {holders}")

        # The schedule's 15:55 flatten of mirror (entries blocked from 15:50 to 18:00 ET): mirror is flat at every
        #    quiescence point after it in that trading day, missed exits included (re-issued on the come-up,
        #    catch-up converges to flat), unless its retries ran out at the account (``flatten_failed``).
        today = trading_day(self.clock())
        if self.schedule_flattened == today:
            fired = min((str(row["received_at"]) for row in self._flatten_rows()
                         if str(row["id"]).startswith("flatten-flatten-mirror")
                         and trading_day(parse_utc(str(row["received_at"]))) == today), default=None)
            for (account, strategy, contract), q in self.strategy_lines().items():
                if strategy == "mirror":
                    self.check_gave_up(account, "flatten-flatten-mirror", {contract: q}, fired)

        # 5 and 6. Every acknowledged signal (answered 202: on disk before the answer, whatever crashed after) is
        #    journaled with the decision it was answered with, once: the journal holds one accepted or decided
        #    signal per key, and it is the one every answer names (202 or duplicate). A request the process died
        #    under (no answer) may or may not be in the journal; if it is, a repeat is its duplicate.
        keyed = list(w.journal._query("select key, count(*) as n from signals where status in ('accepted', "
                                      "'decided') and key is not null group by key having n > 1"))
        if keyed:
            self.fail(f"keys accepted more than once: {keyed}")
        originals = {str(r["key"]): str(r["id"]) for r in w.journal._query(
            "select key, id from signals where status in ('accepted', 'decided') and key is not null")}
        for answer in self.answers:
            key = answer.body["id"]
            if answer.status == 202:
                sid = answer.payload["signal_id"]
                row = w.journal.get_signal(sid)
                if row is None or row.get("decision") is None:
                    self.fail(f"signal {key} answered 202 as {sid} is not journaled with its decision")
                    continue
                if row["decision"] != answer.payload["decision"]:
                    self.fail(f"signal {sid}: answered decision {answer.payload['decision']}, journaled "
                              f"{row['decision']}")
                # The decision's orders, plus (journaled ``missed``, never sent) the mirror entries the engine
                # skipped because their broker was down or paused: what those accounts would have received.
                decided = {o["client_order_id"] for o in answer.payload["decision"].get("orders") or []}
                journaled = {o["client_order_id"]: o["status"] for o in row["orders"]}
                extra = {c: s for c, s in journaled.items() if c not in decided}
                if not decided <= set(journaled) or any(s != MISSED for s in extra.values()):
                    self.fail(f"signal {sid}: answered orders {sorted(decided)}, journaled {journaled}")
                if originals.get(key) != sid:
                    self.fail(f"signal id {key} answered 202 as {sid}, the journal's one under that key is "
                              f"{originals.get(key)}")
                self.check_rules_used(answer, row["decision"])
            elif answer.status == 200 and answer.payload.get("duplicate"):
                if originals.get(key) != answer.payload["signal_id"]:
                    self.fail(f"duplicate of {key} answered {answer.payload['signal_id']}, the original is "
                              f"{originals.get(key)}")
            elif answer.status == 0 and self.crashes:
                pass  # cut off by a crash: not acknowledged
            else:
                self.fail(f"signal {key}: unexpected answer {answer.status} {answer.payload}")

        # Crash safety: an order the journal held in flight at a crash was looked up at the broker by client
        #    order id and adopted, or (not there) sent: never given up as ``missed`` (its signal may have been
        #    acknowledged). That it reached the broker at most once is 1., that it ended final is 5.
        if self.crash_in_flight:
            marks = ", ".join("?" for _ in self.crash_in_flight)
            lost = {str(r["client_order_id"]): int(self.crash_in_flight[str(r["client_order_id"])])
                    for r in w.journal._query(f"select client_order_id from orders where status = ? and "
                                              f"client_order_id in ({marks})", [MISSED, *self.crash_in_flight])}
            if lost:
                self.fail(f"orders in flight at a crash (client order id: step) became missed: {lost}")

        self.check_rulesets()
        self.check_retries_done()
        self.check_flatten_scopes()
        self.check_loss_flattens()
        self.check_halts_lifted()
        self.check_always()

    def check_rules_used(self, answer: Answer, decision: dict[str, Any]) -> None:
        """Reloads: the signal was decided by the rules live when it was posted (or by the generation a reload
        posted with it applied), never by rules an invalid edit proposed or a reload replaced, and it follows
        those rules. ``decision`` is its journaled record (the answer's, byte for byte): its ``ruleset`` names the
        rules that decided; ``TracedEngine`` noted the positions those rules decided it from.

        - routing: its orders go to the accounts those rules route its strategy to, no other;
        - ``size_multiplier``: a plain buy or sell of q sends each account round_half_up(q * m) contracts in all
          (its exit part only, when the entry part is not eligible);
        - ``max_contracts`` (``CAP_LIMIT``): no entry takes an account's net MES position (all strategies, in
          flight included) beyond the cap; a mirror account whose entry would is refused (a skip names the first
          check that refused it: ``CAP_LIMIT``'s names ``max_contracts``), and keeps its exit part;
        - exits are never blocked, whatever the cap: an ``exit`` (or a flat target) closes the strategy's whole
          position at every routed account holding one."""
        if answer.rules is None:
            return
        signal_id = str(decision.get("signal_id"))
        used = (decision.get("ruleset") or {}).get("content_hash")
        if used not in answer.rules:
            self.fail(f"signal {signal_id} (step {answer.step}) names rules {str(used)[:12]} as the ones that "
                      f"decided it, expected {sorted(h[:12] for h in answer.rules)}")
            return
        assert isinstance(used, str)
        state = self.states.get((signal_id, used))
        if state is None:
            self.fail(f"signal {signal_id} (step {answer.step}) names rules {used[:12]} as the ones that decided it, "
                      f"and no engine of those rules decided it (rules that did: "
                      f"{sorted(h[:12] for sid, h in self.states if sid == signal_id)})")
            return
        body = answer.body
        strategy = str(body["strategy"])
        targets = self.routes[used].get(strategy, frozenset(BEST if strategy == "best" else followers(strategy)))
        multipliers = self.multipliers[used]
        cap = self.caps[used]
        per_account: dict[str, list[dict[str, Any]]] = {}
        for order in decision.get("orders") or []:
            per_account.setdefault(order["account"], []).append(order)
        skipped = {str(skip["account"]): skip for skip in decision.get("skipped") or []}
        what = f"signal {signal_id} ({json.dumps({k: v for k, v in body.items() if k != 'id'}, sort_keys=True)})"
        stray = sorted(set(per_account) - targets)
        if stray:
            self.fail(f"{what}: orders for {stray}, not among the accounts its rules route {strategy} to "
                      f"({sorted(targets)})")
        for skip in skipped.values():
            if skip.get("by") == CAP_LIMIT and (f"max_contracts {cap}" not in str(skip["reason"])
                                                 or CAP_LIMIT not in str(skip["reason"])):
                self.fail(f"{what}: {skip['account']} refused by {CAP_LIMIT} (max_contracts {cap}) with the reason "
                          f"{skip['reason']!r}")
        for account in sorted(targets):
            orders = per_account.get(account, [])
            sent = sum(int(o["quantity"]) * (1 if o["side"] == "buy" else -1) for o in orders)
            net, own = state.get(account, (0, 0))
            entry = any(o["intent"] == "entry" for o in orders)
            if cap is not None and entry and abs(net + sent) > cap:
                self.fail(f"{what}: {account} (net {net:+d} MES) got {orders}, {net + sent:+d} after them, over "
                          f"{CAP_LIMIT} max_contracts {cap}")
            if body.get("action") == "exit" or body.get("position") == "flat":
                if own and sent != -own:
                    self.fail(f"{what}: {account} holds {own:+d} of {strategy} and got {orders}: an exit always "
                              f"closes it (max_contracts {cap})")
                continue
            if strategy == "best":
                continue  # one account of several gets the entry: ``select`` decides which
            if body.get("action") in ("buy", "sell") and "position" not in body:
                want = round_half_up(Decimal(body["quantity"]) * multipliers[account])
                delta = want if body["action"] == "buy" else -want
                if abs(sent) > want or (entry and abs(sent) != want):
                    self.fail(f"{what}: {account} got {orders}, its multiplier {multipliers[account]} in the rules "
                              f"that decided it makes {want}")
            elif "position" in body:
                size = round_half_up(Decimal(body.get("position_size") or 0) * multipliers[account])
                delta = {"long": size, "short": -size}.get(str(body["position"]), 0) - own
            else:
                continue
            opening = delta if own == 0 or (delta > 0) == (own > 0) else delta + own if abs(delta) > abs(own) else 0
            if cap is not None and opening and abs(net + delta) > cap:
                if entry:
                    self.fail(f"{what}: {account} (net {net:+d}, {strategy} {own:+d}) was sent an entry: "
                              f"{orders}, over {CAP_LIMIT} max_contracts {cap}")
                elif account not in skipped:
                    self.fail(f"{what}: {account} (net {net:+d}, {strategy} {own:+d}) would go to {net + delta:+d}"
                              f" MES, over max_contracts {cap}, and no skip says why it got {orders}")
                closing = delta - opening
                if closing and sent != closing:
                    self.fail(f"{what}: {account} ({strategy} {own:+d}) refused its entry over max_contracts {cap} "
                              f"but got {orders}, not its exit part {closing:+d}")

    def check_rulesets(self) -> None:
        """Every journaled decision record names the rules that made it as a generation its process applied: its
        ``ruleset`` (content hash, generation number) is one the process journaled as an ``applied`` reload (at
        its start, or later), so that an auditor reading the journal can tell which rules decided, and which
        reload made them live. The webhook's records (pinned generation), and the runtime's own alike: flattens,
        their follow-ups, re-issues and retries, catch-ups. Only the reloads of the record's process can vouch for
        it; and a number names one rule set for the life of the journal (a restart numbers on), so no two applied
        reloads anywhere in the journal give one number two content hashes."""
        w = self.w
        assert w is not None
        self._assign_epochs(w.journal)
        applied: list[set[tuple[str, int]]] = [set() for _ in self._reload_floors]
        numbered: dict[int, str] = {}
        for row in w.journal._query("select id, data from reloads order by id"):
            record = json.loads(row["data"])
            if record.get("outcome") != "applied":
                continue
            epoch = sum(1 for floor in self._reload_floors if floor < int(row["id"])) - 1
            pair = (str(record.get("content_hash")), int(record.get("generation")))
            applied[epoch].add(pair)
            named = numbered.setdefault(pair[1], pair[0])
            if named != pair[0]:
                self.fail(f"rules generation {pair[1]} names two rule sets in one journal: {named[:12]} and "
                          f"{pair[0][:12]} (reload row {row['id']}, start #{epoch + 1})")
        for row in w.journal.recent_signals(100_000):
            decision = row.get("decision")
            if decision is None:
                continue  # refused or a duplicate: nothing was decided
            body = row.get("signal") or {}
            kind = "flatten" if body.get("flatten") else "catch-up" if body.get("catch_up") else \
                "webhook signal" if row.get("key") else "signal"
            sid = str(row["id"])
            ruleset = decision.get("ruleset")
            pair = (ruleset.get("content_hash"), ruleset.get("generation")) if isinstance(ruleset, dict) else None
            epoch = self._signal_epochs[sid]
            if pair is None or not isinstance(pair[0], str) or not isinstance(pair[1], int):
                self.fail(f"the decision record of {kind} {sid} does not name its rules (content hash and "
                          f"generation): ruleset {ruleset!r}")
            elif pair not in applied[epoch]:
                self.fail(f"the decision record of {kind} {sid} names rules {pair[0][:12]} generation {pair[1]}, "
                          f"which its process (start #{epoch + 1} of the scenario) never journaled as applied: "
                          f"its applied reloads {sorted((g, h[:12]) for h, g in applied[epoch])}")

    def check_retries_done(self) -> None:
        """Every rejected flatten exit at an available broker was retried until closed or given up on: nothing is
        still owed a retry at a quiescence point (``soft_settle`` waited for the retry tasks to end)."""
        rt = self._rt
        now = self.clock()
        for broker in BROKERS:
            owed = {d.origin: d.rejected for d in rt._flatten_debts(broker, now) if d.rejected}
            if owed:
                self.fail(f"{broker} is still owed retries of rejected flatten exits at quiescence: {owed}")

    def _flatten_rows(self) -> list[dict[str, Any]]:
        w = self.w
        assert w is not None
        return [row for row in w.journal.recent_signals(5000) if (row.get("signal") or {}).get("flatten")]

    def check_flatten_scopes(self) -> None:
        """Per strategy and account: every exit of every flatten (operator, schedule, risk, and their follow-ups,
        re-issues and retries) stays in the flatten's scope, so a strategy-scoped flatten never trades another
        strategy's book, and an account-scoped one (or a re-issue or retry for listed accounts) no other account.
        Re-issues and retries of a flatten carry it out in its own trading day only: one of an earlier day is
        given up (``flatten_failed``) or only warned about, never sent the next day."""
        w = self.w
        assert w is not None
        rows = self._flatten_rows()
        by_id = {str(row["id"]): row for row in rows}
        for row in rows:
            body = row["signal"]
            strategy = None if body.get("strategy") in (None, "", "(flatten)") else body["strategy"]
            listed = set(body.get("accounts") or ()) or ({body["account"]} if body.get("account") else None)
            for order in w.journal.orders(signal_id=str(row["id"])):
                if order.get("intent") != "exit":
                    self.fail(f"flatten {row['id']} has a non-exit order {order}")
                if strategy is not None and order.get("strategy") != strategy:
                    self.fail(f"flatten {row['id']} of strategy {strategy} trades {order.get('strategy')}'s book: "
                              f"{order}")
                if listed is not None and order["account"] not in listed:
                    self.fail(f"flatten {row['id']} for {sorted(listed)} trades {order['account']}: {order}")
            origin = body.get("redo_of") or body.get("retry_of")
            if origin:
                first = by_id.get(str(origin))
                if first is None:
                    self.fail(f"{row['id']} carries out {origin}, which is not journaled as a flatten")
                    continue
                day, first_day = (trading_day(parse_utc(str(r["received_at"]))) for r in (row, first))
                if day != first_day and w.journal.orders(signal_id=str(row["id"])):
                    self.fail(f"{row['id']} ({day}) sent exits for {origin} of trading day {first_day}")

    def check_loss_flattens(self) -> None:
        """A ``flatten_and_halt`` breach leaves the account flat (the limit's scope: the whole account) while its
        halt stands: the flatten closed everything (retries included) and no entry may reopen it, unless the
        retries ran out (``flatten_failed``). Risk flattens are ``risk-<limit>-<day>-<account>[-<n>]``."""
        rt = self._rt
        today = trading_day(self.clock()).isoformat()
        lines = self.strategy_lines()
        for row in self._flatten_rows():
            sid = str(row["id"])
            body = row["signal"]
            if not sid.startswith(f"risk-account-loss-{today}-") or body.get("redo_of") or body.get("retry_of") \
                    or body.get("follow_of"):
                continue
            account = str(body["account"])
            if not rt.risk.halted(account):
                continue  # cleared by an operator: trading may resume
            # What the trader opened by hand after it is nobody's: no flatten closes it.
            later = any(m["account"] == account and m["at"] >= str(row["received_at"]) for m in self.manual_log)
            held = {(s, c): q for (a, s, c), q in lines.items() if a == account
                    and not (later and s == EXTERNAL_STRATEGY)}
            if held:
                self.check_gave_up(account, sid, held, str(row["received_at"]))

    def check_halts_lifted(self) -> None:
        """Halts bound to a trading day are gone once the next trading day began (the engine's view rolls the day
        book as soon as it is asked for it in the new day)."""
        rt = self._rt
        now = self.clock()
        rt.engine_state(now)
        today = trading_day(now)
        stale = {key: halt.day for key, halt in rt.risk.halts.items() if halt.day is not None and halt.day < today}
        if stale:
            self.fail(f"halts of an earlier trading day still stand on {today}: {stale}")

    def check_always(self) -> None:
        """After every step, whatever is up or down: no entry was decided for a halted account (``_watch_entries``),
        and no order the journal ever recorded ``missed`` reached a paper broker (in the brokers' own databases)."""
        if self.violations:
            self.fail("; ".join(self.violations))
        w = self.w
        assert w is not None
        missed = {r["client_order_id"] for r in w.journal._query(
            "select distinct client_order_id from order_events where status = ?", [MISSED])}
        if not missed:
            return
        for broker in BROKERS:
            sent = {r["client_order_id"] for r in self.venue(broker).orders()}
            if sent & missed:
                self.fail(f"orders journaled missed were sent to {broker}: {sorted(sent & missed)}")


async def run_scenario(tmp_path: Path, scenario: Scenario) -> Runner:
    runner = Runner(tmp_path, scenario)
    started = time.monotonic()
    try:
        await runner.run()
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__} at step {runner.step_index} "
                             f"({time.monotonic() - started:.1f}s): {exc}\n"
                             f"replay: MB_FUZZ_SEED={scenario.seed}\n{scenario.describe()}") from exc
    return runner
