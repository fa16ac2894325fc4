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
- ``reject``: the ``broker`` rejects its next ``n`` orders (``PaperConnector.reject_next``); ``risk``: the risk
  monitor checks now (it also runs on its own loop every half second); ``clear``: an operator clears the halt on
  ``account``, if any.

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
import random
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator
from zoneinfo import ZoneInfo

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from engine.sessions import trading_day
from engine.state import contract_root
from service.config import ServiceConfig
from service.dispatch import CANCELLED, FILLED, FINAL, MISSED, REJECTED
from service.journal import parse_utc
from service.ledger import replay
from service.runtime import Runtime
from service.webhook import Webhook
from tests.harness.runtime import Clock, StaticWatcher, World, account_doc, documents, wait_until, world, write_rules

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


def generate(seed: int, *, steps: int | None = None) -> Scenario:
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
    n = steps if steps is not None else rng.randint(14, 26)
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

    for _ in range(n):
        weights = {"send": 10, "flatten": 3, "drop": 2 if len(down) < 2 else 0, "reconnect": 4 if down else 0,
                   "pause": 1 if len(paused) < 2 else 0, "resume": 3 if paused else 0, "price": 2 if loss is None else 4,
                   "advance": 2 if clock < end_of_day else 0, "restart": 1 if restarts < 2 else 0, "settle": 2,
                   "check": 2 if not down and not paused else 0, "reject": 2, "risk": 2 if loss is not None else 0,
                   "clear": 1 if loss is not None else 0}
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
        elif do in ("reconnect", "resume"):
            pool = down if do == "reconnect" else paused
            broker = rng.choice(sorted(pool))
            pool.discard(broker)
            out.append({"do": do, "broker": broker})
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
        else:
            out.append({"do": do})
    return Scenario(seed, options, out)


# -- the runner --------------------------------------------------------------------------------------------------

class _Watcher(StaticWatcher):
    """``StaticWatcher`` with the ``acquire`` the webhook pins a generation with."""

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Any]:
        yield SimpleNamespace(engine=self.engine, ruleset=self.ruleset)


@dataclass
class Answer:
    body: dict[str, Any]
    status: int
    payload: dict[str, Any]
    step: int


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


def reducing(body: dict[str, Any]) -> bool:
    """A signal that can only close: whenever it is decided (before or after a flatten) it never opens."""
    return body.get("action") == "exit" or body.get("position") == "flat"


QUIRKS = ("partial_fill_rate", "reject_rate")
"""Scenario options that go into both paper brokers' ``paper:`` quirks (``write_rules`` has no parameter for them)."""


def rules_dir(tmp_path: Path, options: dict[str, Any]) -> Path:
    rules = write_rules(tmp_path / "rules", **{k: v for k, v in options.items() if k != "start" and k not in QUIRKS})
    quirks = "".join(f", {name}: {options[name]}" for name in QUIRKS if options.get(name))
    if quirks:
        brokers = rules / "brokers.yaml"
        text = brokers.read_text()
        assert text.count("starting_cash: 50000}") == len(BROKERS), text
        brokers.write_text(text.replace("starting_cash: 50000}", f"starting_cash: 50000{quirks}}}"))
    (rules / "accounts.yaml").write_text(documents(*(
        account_doc(name, broker, acct, ", ".join(strategies), **({"catch_up": True} if catch_up else {}))
        for name, (broker, acct, strategies, catch_up) in ACCOUNTS.items())))
    (rules / "routing.yaml").write_text(ROUTING)
    return rules


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

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def _open(self) -> None:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        rules = self._rules
        self.w = await stack.enter_async_context(world(self.tmp_path, rules_dir=rules, clock=self.clock,
                                                       price=self.price))
        # Retries of rejected flatten exits, and their give-up, within a scenario; a retry a start resumed and
        # scheduled on the service's backoff looks again.
        self.w.runtime.flatten_retry_delays_s = RETRY_DELAYS_S
        for broker in BROKERS:
            self.w.runtime._wake_retries(broker)
        self._watch_entries(self.w.runtime)
        # The webhook answers from the watcher it is given; the world's StaticWatcher has no ``acquire``.
        watcher = _Watcher(rules)
        stack.callback(watcher.close)
        config = ServiceConfig(rules_dir=rules, data_dir=self.w.data_dir, webhook_secret=SECRET, env={})
        webhook = Webhook(config, self.w.journal, watcher, self.w.runtime, clock=self.clock)  # type: ignore[arg-type]
        app = web.Application()
        app.router.add_post("/webhook", webhook.handle)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        self._client = client

        async def stop_http() -> None:
            await webhook.drain()
            await client.close()

        stack.push_async_callback(stop_http)

    async def _close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()
        self.w = None
        self._client = None

    async def run(self) -> None:
        self._rules = rules_dir(self.tmp_path, self.scenario.options)
        self.clock = Clock(datetime.fromisoformat(self.scenario.options["start"]))
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

        def checked(signal_id: str, decision: Any) -> None:
            for order in decision.orders:
                if order.intent != "entry":
                    continue
                why = rt.risk.halted(order.account, contract_root(order.contract))
                if why:
                    self.violations.append(f"entry {order.client_order_id} ({order.side} {order.quantity} "
                                           f"{order.contract}) decided for {order.account} while halted: {why}")
            hold(signal_id, decision)

        rt.hold = checked  # type: ignore[method-assign]

    # -- steps -----------------------------------------------------------------------------------------------
    async def _post(self, body: dict[str, Any]) -> None:
        assert self._client is not None
        response = await self._client.post("/webhook", json={**body, "secret": SECRET})
        payload = await response.json()
        self.answers.append(Answer(dict(body), response.status, payload, self.step_index))

    async def _step(self, step: Step) -> None:
        w = self.w
        assert w is not None
        do = step["do"]
        if do == "send":
            await asyncio.gather(*(self._post(b) for b in step["bodies"]))
        elif do == "flatten":
            await self._flatten(step)
        elif do == "drop":
            w.connector(step["broker"]).disconnect("fuzz drop")
            await wait_until(lambda: w.runtime.pool[step["broker"]].down, what=f"{step['broker']} down")
        elif do == "reconnect":
            broker = step["broker"]
            await w.connector(broker).reconnect()
            slot = w.runtime.pool[broker]
            await wait_until(lambda: not slot.down and not slot.recovering and slot.connector.connected,
                             10.0, what=f"{broker} back")
        elif do == "pause":
            await w.runtime.pause_broker(step["broker"])
        elif do == "resume":
            await w.runtime.resume_broker(step["broker"])
        elif do == "price":
            self.price += Decimal(step["points"])
            w.feed.set_price(ROOT, self.price)
            if step.get("risk"):
                await w.runtime.check_risk()
        elif do == "advance":
            await self._advance(step["seconds"])
        elif do == "restart":
            await self._close()
            await self._open()
            self._schedule_fired_in_journal()
        elif do == "settle":
            await self.soft_settle()
        elif do == "check":
            await self.check()
        elif do == "reject":
            w.connector(step["broker"]).reject_next(step["n"])
        elif do == "risk":
            await w.runtime.check_risk()
        elif do == "clear":
            with contextlib.suppress(KeyError):  # not halted: nothing to clear
                w.runtime.clear_halt(step["account"])
        else:
            raise ValueError(f"unknown step {step!r}")
        self.check_always()

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
            w.connector(broker).reject_next(n)
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
                await w.runtime.resume_broker(broker)

    async def soft_settle(self, timeout_s: float = 8.0) -> None:
        """Until every order that can settle did: the queues are empty, what is still unsettled is at a broker
        that is not available (down, recovering or paused), and no retry of a rejected flatten exit is pending at
        an available broker (retried until flat, or given up with ``flatten_failed``: ``RETRY_DELAYS_S``)."""
        w = self.w
        assert w is not None and w.runtime.pool is not None and w.runtime.dispatcher is not None
        rt = w.runtime
        pool = rt.pool

        def quiet() -> bool:
            if rt.dispatcher._running or any(rt.dispatcher.queued().values()):  # type: ignore[union-attr]
                return False
            if any(h.flatten for h in rt._holds.values()) or rt.redo_tasks:  # a flatten, follow-up or re-issue
                return False
            if self._retrying():
                return False
            return all(not pool.available(t.job.broker) for t in rt.tracker.unsettled())  # type: ignore[union-attr]

        await wait_until(quiet, timeout_s, what="orders settled and retries done where their broker is up")

    # -- invariants ------------------------------------------------------------------------------------------
    def fail(self, what: str) -> None:
        raise InvariantError(f"after step {self.step_index}: {what}")

    def broker_positions(self, account: str) -> dict[str, int]:
        w = self.w
        assert w is not None
        broker, acct, _, _ = ACCOUNTS[account]
        return {p["contract"]: int(p["quantity"]) for p in w.connector(broker).book.positions(acct)
                if int(p["quantity"])}

    def ledger_lines(self) -> dict[tuple[str, str, str], int]:
        w = self.w
        assert w is not None
        return {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}

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
        lines = self.ledger_lines()
        for account, (broker, _, strategies, _) in ACCOUNTS.items():
            if record.account not in (None, account) or broker not in record.available \
                    or not w.runtime.pool.available(broker):
                continue
            if any(o["status"] not in (FILLED, REJECTED, CANCELLED) for o in exits.get(account, [])):
                self.fail(f"flatten {record.signal_id}: exit at available broker {broker} neither filled nor "
                          f"rejected: {exits[account]}")
            held = {(s, c): q for (a, s, c), q in lines.items() if a == account and s in strategies
                    and record.strategy in (None, s) and s not in openers}
            if held:
                self.check_gave_up(account, record.signal_id, held, str(row["received_at"]))

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
        for broker in BROKERS:
            if not w.runtime.pool.available(broker):
                self.fail(f"check at a point where {broker} is not available: {w.runtime.pool[broker].state}")
        await self.soft_settle()
        await w.settle(8.0)
        self.checks += 1
        journal_orders = {o["client_order_id"]: o for o in w.journal.orders()}

        # 1. No client order id placed twice at a broker (its own database, across restarts); every order the
        #    broker holds is one the journal knows, for the account the journal names.
        for broker in BROKERS:
            db = w.connector(broker).book.db
            dupes = list(db.query("select client_order_id, count(*) as n from orders group by client_order_id "
                                  "having n > 1"))
            if dupes:
                self.fail(f"client order ids placed twice at {broker}: {dupes}")
            for order in db.query("select * from orders"):
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

        # 2. Ledger = broker per account and contract: the broker holds the sum of the strategies' books (and of
        #    the lines booked to no strategy); the journal's fills replayed give the same ledger, line by line.
        lines = self.ledger_lines()
        for account in ACCOUNTS:
            ledger: dict[str, int] = {}
            for (a, _s, c), q in lines.items():
                if a == account:
                    ledger[c] = ledger.get(c, 0) + q
            ledger = {c: q for c, q in ledger.items() if q}
            broker = self.broker_positions(account)
            if ledger != broker:
                self.fail(f"{account}: the strategies' books sum to {ledger} != broker {broker} "
                          f"(books {[(k, q) for k, q in lines.items() if k[0] == account]})")
        replayed = {key: book.quantity for key, book in replay(w.journal.fills(), w.runtime._point_value).items()
                    if book.quantity}
        if replayed != self.ledger_lines():
            self.fail(f"journal fills replayed {replayed} != runtime ledger {self.ledger_lines()}")

        # Best mode: the strategy's position lives at one account only (it sends targets and exits only: a target
        #    keeps one holder, closes any other and opens nowhere else; see engine.decide's docstring). Read from
        #    the strategy's own books (= the broker, per 2.): ``bs`` also holds ``trend``'s position.
        holders = {a: held for a in BEST
                   if (held := {c: q for (acct, s, c), q in lines.items() if acct == a and s == "best"})}
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
            for (account, strategy, contract), q in self.ledger_lines().items():
                if strategy == "mirror":
                    self.check_gave_up(account, "flatten-flatten-mirror", {contract: q}, fired)

        # 5 and 6. Every acknowledged signal is journaled with its decision; a duplicate creates nothing.
        first: dict[str, str] = {}
        for answer in self.answers:
            key = answer.body["id"]
            if answer.status == 202:
                sid = answer.payload["signal_id"]
                row = w.journal.get_signal(sid)
                if row is None or row.get("decision") is None:
                    self.fail(f"signal {key} answered 202 as {sid} is not journaled with its decision")
                    continue
                # The decision's orders, plus (journaled ``missed``, never sent) the mirror entries the engine
                # skipped because their broker was down or paused: what those accounts would have received.
                decided = {o["client_order_id"] for o in answer.payload["decision"].get("orders") or []}
                journaled = {o["client_order_id"]: o["status"] for o in row["orders"]}
                extra = {c: s for c, s in journaled.items() if c not in decided}
                if not decided <= set(journaled) or any(s != MISSED for s in extra.values()):
                    self.fail(f"signal {sid}: answered orders {sorted(decided)}, journaled {journaled}")
                if key in first:
                    self.fail(f"signal id {key} accepted twice: {first[key]} and {sid}")
                first[key] = sid
            elif answer.status == 200 and answer.payload.get("duplicate"):
                pass
            else:
                self.fail(f"signal {key}: unexpected answer {answer.status} {answer.payload}")
        for answer in self.answers:
            if answer.status == 200:
                key = answer.body["id"]
                if first.get(key) != answer.payload["signal_id"]:
                    self.fail(f"duplicate of {key} answered {answer.payload['signal_id']}, the original is "
                              f"{first.get(key)}")
        keyed = list(w.journal._query("select key, count(*) as n from signals where status in ('accepted', "
                                      "'decided') and key is not null group by key having n > 1"))
        if keyed:
            self.fail(f"keys accepted more than once: {keyed}")

        self.check_retries_done()
        self.check_flatten_scopes()
        self.check_loss_flattens()
        self.check_halts_lifted()
        self.check_always()

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
        lines = self.ledger_lines()
        for row in self._flatten_rows():
            sid = str(row["id"])
            body = row["signal"]
            if not sid.startswith(f"risk-account-loss-{today}-") or body.get("redo_of") or body.get("retry_of") \
                    or body.get("follow_of"):
                continue
            account = str(body["account"])
            if not rt.risk.halted(account):
                continue  # cleared by an operator: trading may resume
            held = {(s, c): q for (a, s, c), q in lines.items() if a == account}
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
            sent = {r["client_order_id"] for r in w.connector(broker).book.db.query(
                "select client_order_id from orders")}
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
