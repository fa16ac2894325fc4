"""Webhook-to-answer latency and sustained signals per second, side by side with a bare aiohttp handler.

Two servers run as separate processes on 127.0.0.1, measured by the same aiohttp client in this process:

* ``bare``: an aiohttp handler that only parses the JSON body and answers (the floor any aiohttp service pays);
* ``multibroker``: the service (``service.app.create_app`` with the real runtime, as ``multibroker serve`` runs
  it), on rules with one strategy mirrored to 10 accounts on two zero-latency paper brokers (no rate limit, no
  schedule, no risk limits), every signal authenticated, validated, decided, journaled (group commit,
  ``synchronous=FULL``) before its answer, then dispatched. The paper brokers keep their state in memory unless
  ``--paper-on-disk`` (then every simulated order costs the broker a few synchronous SQLite commits).

Phases per server: warm-up; latency (one request at a time, keep-alive); throughput (a fixed number of signals from
``--concurrency`` workers); and, for multibroker, a paced run at ``--rate`` signals/s, after which the journal says
how long each signal took from its decision to the moment its last order was handed to its broker (``sending``,
journaled just before ``place_order``) and acknowledged by it.

Targets (issue 5, 2-core machine): p50 within 3x the bare handler; p99 < 5 ms; >= 2,500 signals/s sustained;
all orders of a signal handed to the brokers within 20 ms p99 at 1,000 signals/s.

Run: python -m benchmarks.webhook [--latency-n 2000] [--throughput-n 5000] [--concurrency 32] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
        def __init__(self, config, journal, watcher):
            self.watcher = watcher
        async def start(self): pass
        async def stop(self): pass
        def engine_state(self, now):
            accounts = {name: AccountState(True, Decimal(10**9), Decimal(0)) for name in self.watcher.current[0].accounts}
            return EngineState(accounts=accounts)
        def dispatch(self, signal_id, decision): pass

    rules, data, port, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    config = ServiceConfig.from_env(rules_dir=rules, data_dir=data, port=port, paper_tick_s=0)
    options = {} if mode == "disk" else {"data_dir": None}  # paper broker state in memory unless "disk"
    factory = NullRuntime if mode == "null" else (lambda c, j, w: Runtime(c, j, w, connector_options=options))
    app = create_app(config, runtime_factory=factory)
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
                    if r.status == 200:
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


def dispatch_latency(journal: Path, ids: list[str], timeout_s: float = 60) -> dict[str, Any]:
    """Per signal: decision time -> last order's ``sending`` and ``acknowledged`` events (from the journal)."""
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    marks = ",".join("?" for _ in ids)
    deadline = time.monotonic() + timeout_s
    while True:
        left = conn.execute(f"SELECT COUNT(*) FROM orders WHERE signal_id IN ({marks}) AND status IN "
                            "('new', 'sending')", ids).fetchone()[0]
        if left == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows = conn.execute(
        f"SELECT s.id, s.received_at, e.status, MAX(e.at), COUNT(*) FROM signals s JOIN orders o ON o.signal_id = s.id "
        f"JOIN order_events e ON e.client_order_id = o.client_order_id WHERE s.id IN ({marks}) AND e.status IN "
        "('sending', 'acknowledged') GROUP BY s.id, e.status", ids).fetchall()
    conn.close()

    def t(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    out: dict[str, list[float]] = {"sending": [], "acknowledged": []}
    for _sid, received, status, last, count in rows:
        if count == ACCOUNTS:
            out[status].append((t(last) - t(received)).total_seconds() * 1000)
    return {"unsettled_orders": left, **out}


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

    servers = [("bare", [sys.executable, "-c", BARE_SERVER]),
               ("mb-answer", [sys.executable, "-c", MB_SERVER, str(rules), str(work / "data-null"), "{port}", "null"]),
               ("mb-paper", [sys.executable, "-c", MB_SERVER, str(rules), str(work / "data"), "{port}",
                             "disk" if args.paper_on_disk else "memory"])]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, cmd in servers:
            port = free_port()
            cmd = [c.replace("{port}", str(port)) for c in cmd] + ([str(port)] if name == "bare" else [])
            log = work / f"{name}.log"
            proc = start(cmd, env, log, repo)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            await wait_up(url, proc, log)
            lat = await latency(url, args.latency_n)
            rate, tlat = await throughput(url, args.throughput_n, args.concurrency)
            results[name] = {"latency": lat, "throughput": rate}
            print(f"{name:<10} sequential  {fmt(lat)}", flush=True)
            print(f"{name:<10} throughput  {rate:8.0f} signals/s with {args.concurrency} concurrent senders "
                  f"(answer {fmt(tlat)})", flush=True)
            if name == "mb-paper":
                await asyncio.sleep(2)  # let the throughput run's dispatch drain before the paced run
                ids, plat, achieved = await paced(url, args.rate, args.rate_seconds)
                print(f"{name:<10} paced       {achieved:8.0f} signals/s offered ({args.rate:g} target), "
                      f"answer {fmt(plat)}", flush=True)
                d = dispatch_latency(work / "data" / "journal.db", ids)
                results["dispatch"] = d
                print(f"{name:<10} dispatch    decision -> last of {ACCOUNTS} orders handed to broker: "
                      f"{fmt(d['sending'])}")
                print(f"{name:<10} dispatch    decision -> last of {ACCOUNTS} orders acknowledged:     "
                      f"{fmt(d['acknowledged'])}  (unsettled orders: {d['unsettled_orders']})")
            proc.terminate()
            proc.wait(timeout=30)
        b50 = pct(results["bare"]["latency"], 50)
        print()
        for name in ("mb-answer", "mb-paper"):
            lat = results[name]["latency"]
            print(f"{name}: p50 {pct(lat, 50) / b50:.1f}x bare (target <= 3x); p99 {pct(lat, 99):.2f} ms "
                  f"(target < 5 ms); {results[name]['throughput']:.0f} signals/s (target >= 2500)")
        sending = results.get("dispatch", {}).get("sending") or [float("nan")]
        print(f"dispatch at {args.rate:g}/s: p99 {pct(sending, 99):.2f} ms to hand all orders over (target <= 20 ms)")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"work directory kept: {work}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-n", type=int, default=2000)
    parser.add_argument("--throughput-n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--rate-seconds", type=float, default=2)
    parser.add_argument("--paper-on-disk", action="store_true",
                        help="paper brokers persist their state in SQLite as under `serve` (default: in memory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary rules, journal and logs")
    asyncio.run(main(parser.parse_args()))
