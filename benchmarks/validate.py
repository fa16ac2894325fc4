"""How long `multibroker validate` takes on 200 documents, against the cost of only parsing them.

The target (issue 2) is "200 documents in well under a second", fast enough for a pre-commit hook on every save.
The baseline, measured in the same run on the same files, is parsing the YAML with positions (ruamel round-trip),
which any validator that reports line:col must pay; the ratio shows what schema and cross-checks add.

Run: python -m benchmarks.validate [--docs 200] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from engine.loader import load_rules
from engine.yamlsource import parse_text


def make_rules(directory: Path, documents: int) -> None:
    """A realistic rule set: brokers, many accounts, routing, risk and schedule, spread over several files."""
    brokers = 3
    accounts = max(1, documents - brokers - 3)
    broker_text = "".join(
        f"---\nkind: Broker\nname: b{i}\ntype: paper\nrate_limit: {{requests: 120, per_seconds: 60}}\n"
        f"commissions: {{ES: 0.5{i}, MES: 0.2{i}, default: 0.79}}\nmargins: {{ES: 500, MES: 50, default: 1000}}\n"
        for i in range(brokers))
    (directory / "brokers.yaml").write_text(broker_text)
    for chunk in range(0, accounts, 50):
        text = "".join(
            f"---\nkind: Account\nname: acct-{n}\nbroker: b{n % brokers}\nbroker_account: A{n}\ncapital: 50000\n"
            f"strategies: [s{n % 10}]\ninstruments: [ES, MES]\nsize_multiplier: 1\n"
            for n in range(chunk, min(accounts, chunk + 50)))
        (directory / f"accounts-{chunk // 50}.yaml").write_text(text)
    rules = "".join(f"  - name: r{i}\n    match: {{strategy: s{i}}}\n    mode: mirror\n" for i in range(10))
    (directory / "routing.yaml").write_text(f"kind: Routing\nname: main\nrules:\n{rules}")
    (directory / "risk.yaml").write_text(
        "kind: Risk\nname: limits\nmargin_buffer_pct: 30\nlimits:\n"
        "  - {name: daily, scope: account, max_daily_loss_pct: 2}\n"
        "  - {name: size, scope: account, instrument: [ES, MES], max_contracts: 4}\n")
    (directory / "schedule.yaml").write_text(
        "kind: Schedule\nname: s\nrules:\n  - {name: flat, at: '15:55', action: flatten}\n"
        "  - {name: late, between: ['15:50', '18:00'], action: block_entries}\n")


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        make_rules(directory, args.docs)
        result = load_rules([directory])
        assert result.ok, [str(d) for d in result.diagnostics][:5]
        files = sorted(directory.glob("*.yaml"))
        texts = [(p.read_text(), str(p)) for p in files]
        load_rules([directory])  # warm caches (schemas compiled once per process, as in a long-lived hook)
        parse = timed(lambda: [parse_text(t, n) for t, n in texts], args.repeat)
        full = timed(lambda: load_rules([directory]), args.repeat)
        cold_start = time.perf_counter()
        import subprocess
        import sys
        subprocess.run([sys.executable, "-m", "multibroker", "validate", str(directory)], check=True,
                       capture_output=True)
        cold = time.perf_counter() - cold_start
    p, f = statistics.median(parse), statistics.median(full)
    print(f"documents: {result.documents} in {len(files)} files")
    print(f"baseline  parse with positions   median {p * 1000:8.1f} ms")
    print(f"validate  load_rules (in-process) median {f * 1000:8.1f} ms   ratio {f / p:5.2f}x baseline")
    print(f"validate  CLI process incl. start        {cold * 1000:8.1f} ms   (target: well under 1000 ms)")


if __name__ == "__main__":
    main()
