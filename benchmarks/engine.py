"""Decision throughput and latency, next to the cost of the durable-rules posts each decision needs.

3 brokers, 12 accounts, 20 routing rules (mirror and best), risk limits and a schedule, loaded from YAML through
the real loader. A mix of signals (entries, exits, zero-crossings, target signals, unrouted) is decided N times;
in the same run, a bare durable-rules post of one event to a one-rule ruleset is timed: that is the floor. The
ratio compares a decision with the bare posts it makes (route + one per candidate entry).

Targets on the 2-core reference machine: >= 2,000 decisions/s, p99 < 2 ms, <= 3x the floor.

Usage: python benchmarks/engine.py [-n 20000] [--backend durable|python]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.decide import Engine, make_rules  # noqa: E402
from engine.loader import load_rules  # noqa: E402
from engine.signal import parse_signal  # noqa: E402
from engine.state import parse_state  # noqa: E402

BROKERS = [("fast", "0.25", "50"), ("slow", "0.37", "40"), ("cheap", "0.20", "100")]
STRATEGIES = [f"s{i}" for i in range(20)]


def rules_yaml() -> str:
    docs = []
    for name, commission, margin in BROKERS:
        docs.append(f"kind: Broker\nname: {name}\ntype: paper\ncommissions: {{MES: {commission}, default: 0.79}}\n"
                    f"margins: {{MES: {margin}, ES: 500, NQ: 1000, MNQ: 100, default: 1000}}\n")
    for i in range(12):
        broker = BROKERS[i % 3][0]
        follows = ", ".join(STRATEGIES[j] for j in range(20) if j % 3 == i % 3)
        docs.append(f"kind: Account\nname: acct{i:02d}\nbroker: {broker}\nbroker_account: A{i:02d}\n"
                    f"capital: 50000\nstrategies: [{follows}]\nsize_multiplier: {1 + (i % 2) * 0.5}\n")
    rules = []
    for j, strategy in enumerate(STRATEGIES):
        mode = "mirror" if j % 2 == 0 else "best"
        select = "\n    select: [cheapest_commission, most_free_margin]" if mode == "best" else ""
        rules.append(f"  - name: r{j}\n    match: {{strategy: {strategy}, instrument: [MES, ES, MNQ]}}\n"
                     f"    mode: {mode}{select}")
    docs.append("kind: Routing\nname: main\nrules:\n" + "\n".join(rules) + "\n")
    docs.append("kind: Risk\nname: limits\nmargin_buffer_pct: 30\nlimits:\n"
                "  - {name: portfolio-loss, scope: portfolio, max_daily_loss: 5000}\n"
                "  - {name: account-loss, scope: account, max_daily_loss_pct: 2}\n"
                "  - {name: size, scope: account, instrument: [ES, MES], max_contracts: 6}\n")
    docs.append('kind: Schedule\nname: sessions\nrules:\n  - name: no-late-entries\n    between: ["15:50", "18:00"]\n'
                "    action: block_entries\n")
    return "---\n".join(docs)


def state_doc() -> dict[str, Any]:
    accounts = {}
    for i in range(12):
        accounts[f"acct{i:02d}"] = {"connected": i != 5, "free_margin": 2000 + 500 * i, "daily_pnl": -10 * i,
                                    "positions": {"MESH6": (i % 3) - 1} if i % 4 == 0 else {}}
    return {"now": "2026-03-10T10:00:00-04:00", "accounts": accounts}


def signals() -> list[dict[str, Any]]:
    out = []
    for j, strategy in enumerate(STRATEGIES):
        out.append({"id": f"b{j}", "strategy": strategy, "ticker": "MES1!", "action": "buy", "quantity": 2})
        out.append({"id": f"s{j}", "strategy": strategy, "ticker": "MES1!", "action": "sell", "quantity": 3})
    out.append({"id": "x", "strategy": "s0", "ticker": "MES1!", "action": "exit"})
    out.append({"id": "t", "strategy": "s2", "ticker": "MES1!", "action": "buy", "quantity": 1, "position": "long",
                "position_size": 1})
    out.append({"id": "u", "strategy": "unrouted", "ticker": "MES1!", "action": "buy", "quantity": 1})
    return out


def percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # ns -> us


def _time(post: Any, message: dict[str, Any], n: int) -> list[int]:
    for _ in range(1000):
        post(message)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        post(message)
        samples.append(clock() - start)
    return samples


def bare_posts(n: int, backend: str) -> dict[str, list[int]]:
    """One event into a one-rule ruleset: via ``Host.post`` (durable-rules' public API) and via our own path."""
    floors = {}
    rules = make_rules([("hit", 0, {"k": "e"})], backend)
    floors["bare post, our path"] = _time(rules.post, {"k": "e"}, n)
    rules.close()
    if backend == "durable":
        from durable.engine import Host  # noqa: PLC0415

        class Quiet(Host):  # type: ignore[misc]
            def _run(self) -> None:
                pass

        host = Quiet()
        host.set_rulesets({"bare": {"hit": {"all": [{"m": {"k": "e"}}], "run": lambda c: None}}})
        floors["bare Host.post"] = _time(lambda m: host.post("bare", m), {"k": "e"}, n)
    return floors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="decisions to time")
    parser.add_argument("--backend", choices=["durable", "python"], default="durable")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "rules.yaml").write_text(rules_yaml())
        result = load_rules([tmp])
    assert result.ruleset is not None, [str(d) for d in result.diagnostics]
    engine = Engine(result.ruleset, backend=args.backend)
    now, state = parse_state(state_doc())
    parsed = [parse_signal(s) for s in signals()]

    posts = 0
    real_post = engine.rules.post

    def counting_post(message: Any, text: str | None = None) -> str | None:
        nonlocal posts
        posts += 1
        return real_post(message, text)

    engine.rules.post = counting_post  # type: ignore[method-assign]
    orders = 0
    for signal in parsed:  # warm-up, and the post count per decision
        orders += len(engine.decide(signal, state, now).orders)
    posts_per_decision = posts / len(parsed)
    engine.rules.post = real_post  # type: ignore[method-assign]

    gc.collect()
    samples = []
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for i in range(args.n):
        signal = parsed[i % len(parsed)]
        t0 = clock()
        engine.decide(signal, state, now)
        samples.append(clock() - t0)
    elapsed = time.perf_counter() - started
    engine.close()
    floors = bare_posts(max(args.n, 1000), args.backend)

    mean_decision = statistics.fmean(samples) / 1000
    print(f"backend: {args.backend}; 3 brokers, 12 accounts, 20 routing rules; {len(parsed)} signal shapes, "
          f"{orders / len(parsed):.1f} orders and {posts_per_decision:.1f} rule-engine posts per decision")
    print(f"{'':34}{'per second':>12}{'mean us':>10}{'p50 us':>10}{'p99 us':>10}")
    print(f"{'decision':34}{args.n / elapsed:12,.0f}{mean_decision:10.1f}{percentile(samples, .5):10.1f}"
          f"{percentile(samples, .99):10.1f}")
    for label, floor in floors.items():
        mean_post = statistics.fmean(floor) / 1000
        print(f"{label:34}{1e6 / mean_post:12,.0f}{mean_post:10.1f}{percentile(floor, .5):10.1f}"
              f"{percentile(floor, .99):10.1f}")
    for label, floor in floors.items():
        per_decision = statistics.fmean(floor) / 1000 * posts_per_decision
        print(f"floor = {posts_per_decision:.1f} x {label}: {per_decision:.1f} us; "
              f"decision / floor = {mean_decision / per_decision:.2f}x")
    print("targets: >= 2,000 decisions/s, p99 < 2,000 us, <= 3x the floor")


if __name__ == "__main__":
    main()
