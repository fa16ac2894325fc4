"""The runtime's own cost per dispatched order, in process: no HTTP, no webhook, no broker simulation.

A real ``service.runtime.Runtime`` with a real journal (``synchronous=FULL``, group commit, in a temporary
directory) on the webhook benchmark's rules (10 accounts mirroring one strategy on two brokers) and a connector that
fills every order inside ``_submit`` from dicts (``benchmarks.instant``, as in benchmarks/webhook.py). Signals are
decided by the real engine and journaled as the webhook does (decide -> ``Runtime.hold`` -> ``Journal.record_signal`` ->
``Runtime.dispatch``), so what is measured after that is the runtime: state machine, journal-ahead, per-account
ordering, the journal's order transitions, fills -> ledger -> risk, ``engine_state`` for the next decision.

Phases:

* ``burst``: N signals decided and journaled first (held), then all dispatched at once; measured from the first
  ``dispatch`` to the last order's fill booked: orders/s and CPU per order (the process's, which includes the
  committer thread, and the event loop thread's alone).
* ``floor``: the minimum durable work for the same orders, on a second journal holding the same signals: per order
  the same three writes (``sending``, the answer ``filled``, the fill row) through the same group commit, issued
  concurrently with no runtime logic. The runtime's CPU per order is reported as a ratio to this.
* ``paced``: signals at a fixed rate, each decided, journaled and dispatched by its own task as the webhook would;
  the journal then says how long each signal took from its decision to its last order's ``sending`` (as
  benchmarks/webhook.py ``dispatch_latency`` reads it), p50/p99; plus CPU per order for the whole path.

The interpreter is tuned as ``multibroker serve`` tunes it (``service.tuning``: ``gc.freeze`` after start-up, higher
collector thresholds, a shorter GIL switch interval) unless ``--default-gc``.

Run: python -m benchmarks.dispatch [--signals 2000] [--rate 500] [--rate-seconds 4] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sqlite3
import tempfile
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from brokers.feed import PriceFeed
from engine.decide import build_engine
from engine.loader import load_rules
from engine.signal import parse_signal
from service import tuning
from service.journal import Journal
from service.runtime import Runtime

from benchmarks import instant
from benchmarks.webhook import ACCOUNTS, write_rules


class Watcher:
    def __init__(self, rules_dir: Path) -> None:
        result = load_rules(rules_dir)
        assert result.ok, [str(d) for d in result.diagnostics]
        self.current = (result.ruleset, build_engine(result.ruleset))


def body(n: int) -> dict[str, Any]:
    return {"strategy": "bench", "ticker": "MES1!", "action": "buy" if n % 2 else "sell", "quantity": 1,
            "id": f"b-{uuid.uuid4().hex}"}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")


class Bench:
    def __init__(self, work: Path, rules: Path) -> None:
        self.work = work
        self.rules = rules
        self.journal = Journal(work / "data" / "journal.db")
        self.watcher = Watcher(rules)
        feed = PriceFeed(seed=0)
        feed.set_price("MES", Decimal("6000"))
        self.decided: dict[str, Any] = {}
        """Decisions by signal id, of the phase running."""
        self.runtime = Runtime(SimpleNamespace(data_dir=work / "data"), self.journal, self.watcher, feed=feed,
                               connector_options={"data_dir": None})

    async def start(self) -> None:
        await self.journal.start()
        await self.runtime.start()
        assert await self.runtime.ready(10.0), "brokers did not come up"

    async def stop(self) -> None:
        await self.runtime.stop()
        await self.journal.close()

    async def decide(self, n: int, *, dispatch: bool) -> str:
        """What the webhook does for one signal: decide, hold, journal (commit awaited), dispatch."""
        runtime, engine = self.runtime, self.watcher.current[1]
        raw = body(n)
        signal = parse_signal(raw)
        now = datetime.now(timezone.utc)
        decision = engine.decide(signal, runtime.engine_state(now), now)
        assert len(decision.orders) == ACCOUNTS, decision.reason
        runtime.hold(signal.id, decision)
        try:
            await self.journal.record_signal(
                signal_id=signal.id, raw=str(raw), remote=None, status="accepted", reason=decision.reason,
                key=signal.id, signal=raw, decision=decision.to_json(),
                orders=[{**o.to_json(), "margin_usd": o.margin_usd} for o in decision.orders], at=now)
            if dispatch:
                runtime.dispatch(signal.id, decision)
        finally:
            if dispatch:
                runtime.release(signal.id)
        self.decided[signal.id] = decision
        return signal.id

    async def settled(self, timeout_s: float = 120.0) -> None:
        """Every order tracked is final with its fills booked and nothing is queued or running."""
        runtime = self.runtime
        deadline = time.monotonic() + timeout_s
        # Cheap checks (this polls while the runtime works): the sizes, not copies of the collections.
        while runtime.tracker._unsettled or runtime.dispatcher._running or \
                any(runtime.dispatcher.queued().values()):
            if time.monotonic() > deadline:
                raise SystemExit(f"dispatch did not settle within {timeout_s}s: "
                                 f"{len(runtime.tracker._unsettled)} orders unsettled")
            await asyncio.sleep(0.002)


async def burst(bench: Bench, n: int, profile: str | None) -> dict[str, float]:
    bench.decided = {}
    ids = [await bench.decide(i, dispatch=False) for i in range(n)]
    orders = n * ACCOUNTS
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    t0, c0, l0 = time.perf_counter(), time.process_time(), time.thread_time()
    for sid in ids:
        bench.runtime.dispatch(sid, bench.decided[sid])
        bench.runtime.release(sid)
    await bench.settled()
    wall, cpu, loop_cpu = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - l0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    return {"orders": orders, "orders_s": orders / wall, "cpu_us": cpu / orders * 1e6,
            "loop_us": loop_cpu / orders * 1e6, "wall_s": wall}


async def floor(work: Path, bench: Bench, n: int) -> dict[str, float]:
    """The same three durable writes per order, on their own journal, with nothing else around them."""
    journal = Journal(work / "floor" / "journal.db")
    await journal.start()
    try:
        legs = []
        for i in range(n):
            raw = body(i)
            sid = raw["id"]
            decision = next(iter(bench.decided.values()))
            orders = [{**o.to_json(), "client_order_id": f"{sid}-{k}"} for k, o in enumerate(decision.orders)]
            await journal.record_signal(signal_id=sid, raw=str(raw), remote=None, status="accepted", reason="",
                                        key=sid, signal=raw, decision=decision.to_json(), orders=orders)
            legs.extend((o, f"I{i}-{k}") for k, o in enumerate(orders))

        async def one(order: dict[str, Any], broker_id: str) -> None:
            coid = order["client_order_id"]
            await journal.order_status(coid, "sending")
            now = datetime.now(timezone.utc)
            await journal.order_status(coid, "filled", broker_order_id=broker_id)
            await journal.record_fill({"broker": order["broker"], "fill_id": "F" + broker_id,
                                       "account": order["account"], "contract": order["contract"],
                                       "side": order["side"], "quantity": 1, "price": Decimal("6000"),
                                       "commission": Decimal("0.25"), "at": now, "client_order_id": coid,
                                       "broker_order_id": broker_id, "strategy": "bench"})

        t0, c0, l0 = time.perf_counter(), time.process_time(), time.thread_time()
        await asyncio.gather(*(one(order, bid) for order, bid in legs))
        wall, cpu, loop_cpu = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - l0
    finally:
        await journal.close()
    orders = len(legs)
    return {"orders": orders, "orders_s": orders / wall, "cpu_us": cpu / orders * 1e6,
            "loop_us": loop_cpu / orders * 1e6, "wall_s": wall}


async def paced(bench: Bench, rate: float, seconds: float) -> dict[str, Any]:
    bench.decided = {}
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    tasks = []
    t0, c0, l0 = loop.time(), time.process_time(), time.thread_time()
    for i in range(total):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(bench.decide(i, dispatch=True)))
    ids = await asyncio.gather(*tasks)
    offered = total / (loop.time() - t0)
    await bench.settled()
    wall, cpu, loop_cpu = loop.time() - t0, time.process_time() - c0, time.thread_time() - l0
    return {"offered": offered, "ids": ids, "cpu_us": cpu / (total * ACCOUNTS) * 1e6,
            "loop_us": loop_cpu / (total * ACCOUNTS) * 1e6, "wall_s": wall,
            **handoff(bench.journal.path, ids)}


def handoff(journal: Path, ids: list[str]) -> dict[str, list[float]]:
    """Per signal: its decision (``received_at``, the decision time here) -> the last of its orders' ``sending``."""
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        marks = ",".join("?" for _ in ids)
        rows = conn.execute(
            f"SELECT s.received_at, MAX(e.at), COUNT(DISTINCT e.client_order_id) FROM signals s "
            f"JOIN orders o ON o.signal_id = s.id JOIN order_events e ON e.client_order_id = o.client_order_id "
            f"AND e.status = 'sending' WHERE s.id IN ({marks}) GROUP BY s.id", ids).fetchall()
    finally:
        conn.close()

    def t(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    return {"sending": [(t(sent) - t(received)).total_seconds() * 1000 for received, sent, count in rows
                        if count == ACCOUNTS]}


async def main(args: argparse.Namespace) -> None:
    instant.install()  # type: paper brokers fill inside place_order
    work = Path(tempfile.mkdtemp(prefix="mb-dispatch-"))
    try:
        write_rules(work / "rules")
        bench = Bench(work, work / "rules")
        await bench.start()
        if not args.default_gc:
            tuning.tune()  # as `multibroker serve` runs (service.tuning)
        try:
            for i in range(100):  # warm-up: caches, code paths
                await bench.decide(i, dispatch=True)
            await bench.settled()
            b = await burst(bench, args.signals, args.profile)
            f = await floor(work, bench, args.signals) if "floor" in args.phases else None
            p = await paced(bench, args.rate, args.rate_seconds) if "paced" in args.phases else None
        finally:
            await bench.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"burst   {args.signals} signals x {ACCOUNTS} orders dispatched at once: {b['orders_s']:8.0f} orders/s, "
          f"CPU {b['cpu_us']:6.1f} us/order (event loop {b['loop_us']:6.1f} us)")
    if f is not None:
        print(f"floor   same 3 durable writes per order, no runtime:     {f['orders_s']:8.0f} orders/s, "
              f"CPU {f['cpu_us']:6.1f} us/order (event loop {f['loop_us']:6.1f} us)")
        print(f"ratio   runtime / floor CPU per order: {b['cpu_us'] / f['cpu_us']:.2f}x "
              f"(event loop {b['loop_us'] / f['loop_us']:.2f}x)")
    if p is None:
        return
    sending = p["sending"]
    print(f"paced   {p['offered']:.0f} signals/s offered ({args.rate:g} target) = {p['offered'] * ACCOUNTS:.0f} "
          f"orders/s: decision -> last of {ACCOUNTS} orders 'sending' p50 {pct(sending, 50):.2f} ms, "
          f"p99 {pct(sending, 99):.2f} ms, max {max(sending, default=float('nan')):.2f} ms "
          f"({len(sending)} of {len(p['ids'])} signals); whole path incl. decide+journal: CPU "
          f"{p['cpu_us']:.1f} us/order (event loop {p['loop_us']:.1f} us)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--signals", type=int, default=2000, help="signals of the burst (and floor) phase")
    parser.add_argument("--rate", type=float, default=300, help="signals/s of the paced phase")
    parser.add_argument("--rate-seconds", type=float, default=4)
    parser.add_argument("--default-gc", action="store_true", help="leave the interpreter untuned (default GC thresholds, no freeze, 5 ms GIL switch interval)")
    parser.add_argument("--profile", help="write a cProfile of the burst phase's dispatch to this file")
    parser.add_argument("--phases", nargs="+", default=["burst", "floor", "paced"],
                        help="burst always runs (floor needs its signals); leave out floor/paced to profile it")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser.parse_args()))
