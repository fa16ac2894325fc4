"""The runtime fuzz (``tests.harness.fuzz``) with one broker on the real connector against its emulator
(``generate(seed, broker="tradovate" | "projectx")``): the connectors' own logic (idempotent ``place_order`` with
its lookup by client order id / ``customTag`` after a lost answer or a crash, fill streams, reconnects with
backoff, the broker's rate-limit answers, partial fills) meets the random combinations the paper fuzz plays.

Not part of the default run yet: ``MB_FUZZ_EMULATED=1`` runs ``DEFAULT_SEEDS`` of each option, plain and crash
(about 12 s in all), and ``MB_FUZZ_SEEDS=a-b`` / ``MB_FUZZ_SEED=n`` run those seeds, as ``tests/test_runtime_fuzz.py``
does. Why not by default: about one run in ten of the default seeds fails for a reason of the harness, not of
the product, and CI must not be flaky. Two causes were seen: the aiohttp session of a crashed connector is
sometimes left unclosed and reported when it is collected (warnings are errors: crash seed 1 on ProjectX), and
CPython 3.11's ``SystemError: AST constructor recursion depth mismatch`` when pytest next rewrites a module it
imports (the interpreter's shared AST recursion counter is left off by a race with the emulator's thread,
python/cpython#106905). Next: close every dead connector's session in the crash step, and run the emulator in a
process of its own instead of a thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness.fuzz import EMULATED, generate, run_scenario
from tests.test_runtime_fuzz import _seeds

DEFAULT_SEEDS: dict[tuple[str, bool], list[int]] = {
    ("tradovate", False): [0, 1, 2],
    ("projectx", False): [0, 1, 2],
    ("tradovate", True): [0, 1],
    ("projectx", True): [0, 1],
}
"""(broker, crash) -> seeds run by default."""
KNOWN_FAILING: dict[tuple[str, bool, int], str] = {
    # Fixed (service/recovery.py waits for a request still under way; tests/test_dispatch_pipeline.py): projectx
    # plain 5, 30, 55, 57; tradovate plain 10, 30, 55, 57; projectx crash 22 (an order journaled missed, then
    # filled at the broker).
    ("projectx", True, 45): "open: a flatten's exit whose request was never sent (BrokerUnavailable, 'not sent') "
                            "goes unknown, then missed at the come-up, and the check at step 3 finds it neither "
                            "filled nor rejected at the available broker (redo of the missed exit or harness: "
                            "not read yet)",
    ("tradovate", False, 32): "not reduced: a fill by hand (trade_by_hand) at the Tradovate emulator never booked "
                              "within 5 s (connector or harness: open)",
    ("tradovate", False, 47): "harness, not fixed: the check's own reconciliation pass (Runtime.reconcile_broker) "
                              "meets the injected 429 on /fill/list and raises RateLimited out of the check",
}
"""Seeds that fail on a known product bug, kept out of the defaults (they still run with MB_FUZZ_SEEDS /
MB_FUZZ_SEED)."""


def _cases() -> list[tuple[str, bool, int]]:
    if os.environ.get("MB_FUZZ_SEED") or os.environ.get("MB_FUZZ_SEEDS"):
        return [(broker, crash, seed) for broker in EMULATED for crash in (False, True) for seed in _seeds()]
    if not os.environ.get("MB_FUZZ_EMULATED"):
        return []
    return [(broker, crash, seed) for (broker, crash), seeds in DEFAULT_SEEDS.items() for seed in seeds
            if (broker, crash, seed) not in KNOWN_FAILING]


@pytest.mark.parametrize(("broker", "crash", "seed"), _cases())
async def test_a_random_scenario_on_a_real_connector_keeps_every_invariant(broker: str, crash: bool, seed: int,
                                                                            tmp_path: Path) -> None:
    runner = await run_scenario(tmp_path, generate(seed, crash=crash, broker=broker))
    assert runner.checks >= 1
