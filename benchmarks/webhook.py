"""Webhook-to-answer latency and sustained signals per second, side by side with a bare aiohttp handler.

Servers run one after another as separate processes on 127.0.0.1, measured by the same aiohttp client in this
process:

* ``bare``: an aiohttp handler that only parses the JSON body and answers (the floor any aiohttp service pays);
* ``bare-fsync``: the same plus one row committed to SQLite with ``synchronous=FULL`` before the answer, inline (the
  floor of any answer that is on disk before it goes out, as issue 5 requires: its ratio to ``bare`` is what the
  disk alone costs; always run, like ``bare``);
* ``mb-answer``: the service (``service.app.create_app``) with everything before dispatch real (authenticate,
  validate, decide, journal with group commit and ``synchronous=FULL``, answer) and a runtime that drops the
  journaled orders: the answer path alone;
* ``mb-instant``: the real runtime (``service.runtime.Runtime``) behind it, on a benchmark connector that fills every
  order inside ``place_order`` from dicts: the service's own cost per order (journal, state machine, ledger, risk);
* ``mb-paper``: the real runtime on the two zero-latency paper brokers of the rules, as ``multibroker serve`` runs
  them (state in memory unless ``--paper-on-disk``): adds the paper simulation's own cost per order.

The rules mirror one strategy to 10 accounts on two brokers (no rate limit, no schedule, no risk limits).

Phases per server: warm-up; latency (one request at a time, keep-alive); throughput (a fixed number of signals from
``--concurrency`` workers); and, for the runtime servers, a paced run at ``--rate`` signals/s once the throughput
run's orders have settled, after which the journal says how long each signal took from its decision to the moment
its last order was handed to its broker (``sending``, journaled just before ``place_order``) and acknowledged.

Targets (issue 5, 2-core machine): p50 within 3x the bare handler; p99 < 5 ms; >= 2,500 signals/s sustained;
all orders of a signal handed to the brokers within 20 ms p99 at 1,000 signals/s. Results: benchmarks/README.md.

Run: python -m benchmarks.webhook [--latency-n 2000] [--throughput-n 5000] [--concurrency 32] [--rate 1000]
                                  [--only mb-answer|mb-instant|mb-paper ...] [--paper-on-disk] [--keep]
                                  [--sweep 100 200 300 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

SECRET = "bench-secret"
ACCOUNTS = 10

BARE_SERVER = textwrap.dedent("""
    import json
    import sys
    from aiohttp import web

    async def handle(request):
        json.loads(await request.read())
        return web.json_response({"ok": True}, status=202)

    app = web.Application()
    app.router.add_post("/webhook", handle)
    app.router.add_get("/healthz", lambda r: web.json_response({"status": "ok"}))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
""")


DURABLE_SERVER = textwrap.dedent("""
    import json
    import sqlite3
    import sys
    from aiohttp import web

    # The floor of any answer that is on disk before it goes out: the bare handler plus one row committed with
    # synchronous=FULL in a WAL (the fsync), inline on the loop (no thread hand-over: the cheapest way, one at a
    # time; under load it commits serially, so its throughput is not a target's baseline).
    conn = sqlite3.connect(sys.argv[2], isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS signals (id INTEGER PRIMARY KEY, body TEXT)")

    async def handle(request):
        raw = await request.read()
        json.loads(raw)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO signals (body) VALUES (?)", (raw.decode(),))
        conn.execute("COMMIT")
        return web.json_response({"ok": True}, status=202)

    app = web.Application()
    app.router.add_post("/webhook", handle)
    app.router.add_get("/healthz", lambda r: web.json_response({"status": "ok"}))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
""")


MB_SERVER = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from aiohttp import web
    from service.app import create_app
    from service.config import ServiceConfig
    from service.runtime import Runtime

    logging.basicConfig(level=logging.WARNING)
    from decimal import Decimal
    from engine.state import AccountState, EngineState

    class NullRuntime:
        # Everything before dispatch is real; dispatch drops the (journaled) orders: the answer path alone.
        # The webhook holds a decision's orders from the decision to the dispatch (Runtime.hold): kept here as a
        # dict entry, so that the answer path pays its hold/release calls as it does with the real runtime.
        def __init__(self, config, journal, watcher):
            self.watcher = watcher
            self.held = {}
        async def start(self): pass
        async def stop(self): pass
        def engine_state(self, now):
            accounts = {name: AccountState(True, Decimal(10**9), Decimal(0)) for name in self.watcher.current[0].accounts}
            return EngineState(accounts=accounts)
        def hold(self, signal_id, decision): self.held[signal_id] = decision
        def release(self, signal_id): self.held.pop(signal_id, None)
        def dispatch(self, signal_id, decision): self.held.pop(signal_id, None)

    rules, data, port, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "instant":
        from benchmarks.instant import install
        install()  # type: paper brokers fill inside place_order (benchmarks/instant.py)
    config = ServiceConfig.from_env(rules_dir=rules, data_dir=data, port=port, paper_tick_s=0)
    options = {} if mode == "disk" else {"data_dir": None}  # paper broker state in memory unless "disk"
    factory = NullRuntime if mode == "null" else (lambda c, j, w: Runtime(c, j, w, connector_options=options))
    app = create_app(config, runtime_factory=factory, tune_interpreter=True)  # as `multibroker serve` runs it
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
""")


def write_rules(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    brokers = "".join(
        f"---\nkind: Broker\nname: zero-{b}\ntype: paper\ncommissions: {{MES: 0.25, default: 0.5}}\n"
        f"margins: {{MES: 50, default: 500}}\nreconcile_every_seconds: 3600\n"
        f"paper: {{seed: {b}, ack_latency_ms: 0, fill_latency_ms: 0, starting_cash: 1000000000}}\n"
        for b in range(2))
    (directory / "brokers.yaml").write_text(brokers)
    accounts = "".join(
        f"---\nkind: Account\nname: acct-{n}\nbroker: zero-{n % 2}\nbroker_account: A{n}\ncapital: 1000000000\n"
        f"strategies: [bench]\ninstruments: [MES]\n" for n in range(ACCOUNTS))
    (directory / "accounts.yaml").write_text(accounts)
    (directory / "routing.yaml").write_text(
        "kind: Routing\nname: main\nrules:\n  - name: fan-out\n    match: {strategy: bench}\n    mode: mirror\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)


async def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{log.read_text()}")
            try:
                async with session.get(f"{url}/healthz") as r:
                    # The port opens before the brokers are up; signals sent earlier would be journaled missed.
                    if r.status == 200 and not (await r.json()).get("starting"):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"server did not come up:\n{log.read_text()}")


def body(n: int) -> bytes:
    return json.dumps({"secret": SECRET, "strategy": "bench", "ticker": "MES1!", "action": "buy" if n % 2 else "sell",
                       "quantity": 1, "id": f"b-{uuid.uuid4().hex}"}).encode()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def one(session: aiohttp.ClientSession, url: str, n: int) -> tuple[float, int, Any]:
    data = body(n)
    t0 = time.perf_counter()
    async with session.post(f"{url}/webhook", data=data, headers={"Content-Type": "text/plain"}) as r:
        answer = await r.read()
    return (time.perf_counter() - t0) * 1000, r.status, answer


async def latency(url: str, n: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        for i in range(200):
            await one(session, url, i)
        out = []
        for i in range(n):
            ms, status, answer = await one(session, url, i)
            if status not in (200, 202):
                raise SystemExit(f"unexpected answer {status}: {answer[:300]!r}")
            out.append(ms)
        return out


async def throughput(url: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        counter = iter(range(n))
        lat: list[float] = []

        async def worker() -> None:
            for i in counter:
                ms, status, _a = await one(session, url, i)
                if status not in (200, 202):
                    raise SystemExit(f"unexpected answer {status}")
                lat.append(ms)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t0), lat


async def paced(url: str, rate: float, seconds: float) -> tuple[list[str], list[float], float]:
    """Open loop: a signal every 1/rate s whatever the answers do; returns the signal ids and answer latencies."""
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        ids: list[str] = []
        lat: list[float] = []
        total = int(rate * seconds)
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def send(i: int) -> None:
            ms, status, answer = await one(session, url, i)
            lat.append(ms)
            if status == 202:
                ids.append(json.loads(answer)["signal_id"])

        tasks = []
        for i in range(total):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i)))
        await asyncio.gather(*tasks)
        achieved = total / (loop.time() - t0)
        return ids, lat, achieved


def settle(journal: Path, timeout_s: float) -> int:
    """Wait until no order is still ``new`` or ``sending`` (or ``timeout_s``); returns how many still are."""
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = int(conn.execute("SELECT COUNT(*) FROM orders WHERE status IN ('new', 'sending')").fetchone()[0])
            if left == 0 or time.monotonic() > deadline:
                return left
            time.sleep(0.2)
    finally:
        conn.close()


def dispatch_latency(journal: Path, ids: list[str], timeout_s: float = 60) -> dict[str, Any]:
    """Per signal: decision time -> last order's ``sending`` and ``acknowledged`` events (from the journal).

    Only signals all of whose orders got there count; the caller compares their number with the signals sent.
    """
    left = settle(journal, timeout_s)
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    marks = ",".join("?" for _ in ids)
    # Per order: when it was handed over ('sending') and when the broker first answered (acknowledged, or a final
    # status straight away, as a broker that fills at once reports); per signal: the last of its orders.
    rows = conn.execute(
        f"SELECT s.id, s.received_at, MAX(o.sent), MAX(o.answered), COUNT(o.sent), COUNT(o.answered) "
        f"FROM signals s JOIN (SELECT o.signal_id, "
        f"  (SELECT MIN(at) FROM order_events e WHERE e.client_order_id = o.client_order_id "
        f"   AND e.status = 'sending') AS sent, "
        f"  (SELECT MIN(at) FROM order_events e WHERE e.client_order_id = o.client_order_id "
        f"   AND e.status NOT IN ('new', 'sending', 'unknown')) AS answered "
        f"  FROM orders o WHERE o.signal_id IN ({marks})) o ON o.signal_id = s.id GROUP BY s.id", ids).fetchall()
    conn.close()

    def t(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    out: dict[str, list[float]] = {"sending": [], "acknowledged": []}
    for _sid, received, sent, answered, n_sent, n_answered in rows:
        if n_sent == ACCOUNTS:
            out["sending"].append((t(sent) - t(received)).total_seconds() * 1000)
        if n_answered == ACCOUNTS:
            out["acknowledged"].append((t(answered) - t(received)).total_seconds() * 1000)
    return {"unsettled_orders": left, **out}


async def sweep(name: str, url: str, journal: Path, args: argparse.Namespace) -> float | None:
    """Paced runs at rising rates (``--sweep``): the highest rate whose hand-off (decision -> last of the signal's
    orders journaled ``sending``) stays within 20 ms p99 with every order settled: what "sustained" means with the
    orders actually sent, not only answered."""
    best = None
    for rate in args.sweep:
        settle(journal, args.settle_s)
        ids, plat, achieved = await paced(url, rate, args.rate_seconds)
        d = dispatch_latency(journal, ids, args.settle_s)
        sending = d["sending"]
        ok = len(sending) == len(ids) and not d["unsettled_orders"] and pct(sending, 99) <= 20
        print(f"{name:<10} sweep       {rate:6g}/s offered ({achieved:6.0f} achieved): answer {fmt(plat)}; "
              f"hand-off {fmt(sending)} {'ok' if ok else 'over 20 ms p99'}", flush=True)
        if not ok:
            break
        best = rate
    return best


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {pct(values, 50):6.2f} ms  p99 {pct(values, 99):6.2f} ms  max {max(values):7.2f} ms"


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="mb-bench-"))
    rules = work / "rules"
    write_rules(rules)
    env = {**os.environ, "MULTIBROKER_WEBHOOK_SECRET": SECRET, "MULTIBROKER_ADMIN_TOKEN": "bench-admin"}
    repo = Path(__file__).resolve().parent.parent
    results: dict[str, Any] = {}

    paper_mode = "disk" if args.paper_on_disk else "memory"
    servers = [("bare", [sys.executable, "-c", BARE_SERVER]),
               ("bare-fsync", [sys.executable, "-c", DURABLE_SERVER, "{port}", str(work / "durable.db")]),
               ("mb-answer", [sys.executable, "-c", MB_SERVER, str(rules), str(work / "data-null"), "{port}", "null"]),
               ("mb-instant", [sys.executable, "-c", MB_SERVER, str(rules), str(work / "data-instant"), "{port}",
                               "instant"]),
               ("mb-paper", [sys.executable, "-c", MB_SERVER, str(rules), str(work / "data-paper"), "{port}",
                             paper_mode])]
    chosen = {"bare", "bare-fsync", *(args.only or [name for name, _cmd in servers])}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, cmd in servers:
            if name not in chosen:
                continue
            port = free_port()
            cmd = [c.replace("{port}", str(port)) for c in cmd] + ([str(port)] if name == "bare" else [])
            log = work / f"{name}.log"
            proc = start(cmd, env, log, repo)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            await wait_up(url, proc, log)
            lat = await latency(url, args.latency_n)
            print(f"{name:<10} sequential  {fmt(lat)}", flush=True)
            rate, tlat = await throughput(url, args.throughput_n, args.concurrency)
            results[name] = {"latency": lat, "throughput": rate}
            print(f"{name:<10} throughput  {rate:8.0f} signals/s with {args.concurrency} concurrent senders "
                  f"(answer {fmt(tlat)})", flush=True)
            if name in ("mb-instant", "mb-paper"):
                journal = work / f"data-{name[3:]}" / "journal.db"
                settle(journal, args.settle_s)  # the throughput run's dispatch must not overlap the paced run
                ids, plat, achieved = await paced(url, args.rate, args.rate_seconds)
                print(f"{name:<10} paced       {achieved:8.0f} signals/s offered ({args.rate:g} target), "
                      f"answer {fmt(plat)}", flush=True)
                d = dispatch_latency(journal, ids, args.settle_s)
                results[name]["dispatch"] = d
                print(f"{name:<10} dispatch    decision -> last of {ACCOUNTS} orders handed to broker: "
                      f"{fmt(d['sending'])}  ({len(d['sending'])} of {len(ids)} signals)")
                print(f"{name:<10} dispatch    decision -> last of {ACCOUNTS} orders answered:         "
                      f"{fmt(d['acknowledged'])}  (unsettled orders after {args.settle_s:g} s: "
                      f"{d['unsettled_orders']})", flush=True)
                if args.sweep:
                    results[name]["sustained"] = await sweep(name, url, journal, args)
            proc.terminate()
            proc.wait(timeout=30)
        b50 = pct(results["bare"]["latency"], 50)
        f50 = pct(results["bare-fsync"]["latency"], 50)
        print()
        print(f"bare-fsync: p50 {f50 / b50:.1f}x bare: the floor of an answer journaled with a fsync on this disk")
        for name, _cmd in servers[2:]:
            if name not in results:
                continue
            lat = results[name]["latency"]
            print(f"{name}: p50 {pct(lat, 50) / b50:.1f}x bare (target <= 3x), {pct(lat, 50) / f50:.1f}x bare-fsync; "
                  f"p99 {pct(lat, 99):.2f} ms (target < 5 ms); {results[name]['throughput']:.0f} signals/s "
                  f"(target >= 2500)")
            if results[name].get("sustained") is not None:
                print(f"{name}: sustained {results[name]['sustained']:g} signals/s with every signal's orders handed "
                      f"over within 20 ms p99 (--sweep)")
            if "dispatch" in results[name]:
                sending = results[name]["dispatch"]["sending"] or [float("nan")]
                print(f"{name}: dispatch at {args.rate:g}/s: p99 {pct(sending, 99):.2f} ms to hand all "
                      f"{ACCOUNTS} orders of a signal over (target <= 20 ms)")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-n", type=int, default=2000)
    parser.add_argument("--throughput-n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--rate-seconds", type=float, default=2)
    parser.add_argument("--paper-on-disk", action="store_true",
                        help="paper brokers persist their state in SQLite as under `serve` (default: in memory)")
    parser.add_argument("--settle-s", type=float, default=60,
                        help="how long to wait for dispatch to catch up before the paced run and before reading it")
    parser.add_argument("--sweep", type=float, nargs="+", metavar="RATE",
                        help="after the paced run, paced runs at these rising rates (signals/s) until hand-off p99 "
                             "exceeds 20 ms: the highest rate sustained with every order sent")
    parser.add_argument("--only", action="append", choices=["mb-answer", "mb-instant", "mb-paper"],
                        help="run only these servers (and the bare handler); repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the temporary rules, journal and logs")
    asyncio.run(main(parser.parse_args()))
