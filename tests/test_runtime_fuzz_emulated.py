"""The runtime fuzz (``tests.harness.fuzz``) with one broker on the real connector against its emulator
(``generate(seed, broker="tradovate" | "projectx")``): the connectors' own logic (idempotent ``place_order`` with
its lookup by client order id / ``customTag`` after a lost answer or a crash, fill streams, reconnects with
backoff, the broker's rate-limit answers, partial fills) meets the random combinations the paper fuzz plays.

``DEFAULT_SEEDS`` of each option, plain and crash, run by default; ``MB_FUZZ_SEEDS=a-b`` / ``MB_FUZZ_SEED=n``
run those seeds instead (both options, plain and crash), as ``tests/test_runtime_fuzz.py`` does. The emulator runs
in a process of its own (``tests.harness.emulated.EmulatorProcess``), as the broker does: it outlives the
service's crashes, and no thread of it shares the interpreter with pytest (with a thread, CPython 3.11's AST
recursion counter raced pytest's module rewriting now and then: python/cpython#106905). A crash closes every
session its dead connector held (``EmulatedVenue.bury``), and the harness's own calls to the service (the check's
reconciliation pass, an operator's resume) wait out the throttling a scenario owes the service
(``Runner._past_throttling``): the harness causes of the flakiness this file had while it was opt-in.
"""

from __future__ import annotations

import asyncio
import os
import time
from decimal import Decimal
from pathlib import Path

import pytest

from tests.harness.emulated import EmulatorProcess
from tests.harness.fuzz import EMULATED, generate, run_scenario
from tests.test_runtime_fuzz import _seeds

DEFAULT_SEEDS: dict[tuple[str, bool], list[int]] = {
    ("tradovate", False): [0, 1, 2],
    ("projectx", False): [0, 1, 2],
    ("tradovate", True): [0, 1],
    ("projectx", True): [1, 3],
}
"""(broker, crash) -> seeds run by default (projectx crash 0 left them while it met the ProjectX bug fixed in
stop 21, about one run in fifty)."""
KNOWN_FAILING: dict[tuple[str, bool, int], str] = {
    # Fixed (service/recovery.py waits for a request still under way; tests/test_dispatch_pipeline.py): projectx
    # plain 5, 30, 55, 57; tradovate plain 10, 30, 55, 57; projectx crash 22 (an order journaled missed, then
    # filled at the broker). Harness, fixed: tradovate plain 47 (the check's own reconciliation met the 429s a
    # scenario owed the service: Runner._past_throttling waits them out; so does an operator's resume, tradovate
    # crash 143).
    # Fixed in stop 21: projectx plain 75 and crash 0 (our fill reported without its id when it overtook its
    # Order/place answer: brokers/projectx.py, tests/test_projectx_trade_before_answer.py); tradovate plain 32 and
    # 123, crash 169 (a pushed fill dropped when its fee lookup met 429s: tests/test_tradovate_manual_fill.py);
    # projectx crash 45, 127 and 156 (harness: the check now accepts a missed flatten exit that the come-up's redo re-issued,
    # tests/test_flatten_missed_exit.py).
    ("projectx", True, 147): "not reduced, flaky (0 of 1 rerun): after step 10 (a flatten of everything with the "
                             "clock advanced, 429s owed at fast, the login throttled) order mb-bedb... is journaled "
                             "missed but was sent to fast (the invariant the fix of projectx crash 22 restored)",
    ("projectx", False, 170): "not reduced, flaky (0 of 1 rerun): at step 27 (a flatten of trend, answers to "
                              "Order/place lost at slow, the flatten missed there and re-issued for bs, s1, s2 at "
                              "the reconnect) s1's mirror line (-2) is gone from the books: a flatten of trend "
                              "changed another strategy's book (re-issue, or a fill booked to the wrong line: open)",
    ("projectx", False, 176): "not reduced, flaky (0 of 1 rerun): at step 13 (a flatten of everything; its exit at "
                              "fast lost its answer, the flatten missed there and re-issued for f1, f2 at the "
                              "reconnect, and that re-issue's answer was lost too) the check finds f1 still holding "
                              "mirror 3 with no flatten_failed naming it",
    ("tradovate", True, 78): "not reduced, flaky (1 in the sweep, 0 in 24 runs since): after step 13 (a crash in "
                             "the retry of a flatten's rejected exits, with a lost answer owed at the emulator), an "
                             "order of B-S is journaled missed while the broker holds it filled (broker order "
                             "1049); the come-up's recovery that ran meanwhile failed on a disconnect ('recovery "
                             "after reconnected failed'); candidate: service/recovery.py:237-238 (missed, 'never "
                             "sent') for an order whose request was still reaching the broker",
}
"""Seeds that fail on a known product bug, kept out of the defaults (they still run with MB_FUZZ_SEEDS /
MB_FUZZ_SEED)."""


def _cases() -> list[tuple[str, bool, int]]:
    if os.environ.get("MB_FUZZ_SEED") or os.environ.get("MB_FUZZ_SEEDS"):
        return [(broker, crash, seed) for broker in EMULATED for crash in (False, True) for seed in _seeds()]
    return [(broker, crash, seed) for (broker, crash), seeds in DEFAULT_SEEDS.items() for seed in seeds
            if (broker, crash, seed) not in KNOWN_FAILING]


@pytest.mark.parametrize(("broker", "crash", "seed"), _cases())
async def test_a_random_scenario_on_a_real_connector_keeps_every_invariant(broker: str, crash: bool, seed: int,
                                                                            tmp_path: Path) -> None:
    runner = await run_scenario(tmp_path, generate(seed, crash=crash, broker=broker))
    assert runner.checks >= 1


async def test_the_emulator_process_answers_by_name_and_ends_with_its_caller() -> None:
    """The emulator the fuzz trades against lives in a child process: its hooks and read-outs are named calls
    (blocking or awaited, the emulator's own exception raised at the caller), an unknown name is refused there,
    and the child ends both at ``stop`` and when its caller's end of the socket goes (a test process that died):
    no emulator outlives its test."""
    emulator = EmulatorProcess("projectx", username="u", api_key="k", accounts={"ACC-1": Decimal(50000)})
    await emulator.start()
    try:
        assert emulator.urls["hub_url"].startswith(emulator.urls["base_url"])
        mes = next(name for name in emulator.call("contract_names") if name.startswith("MES"))
        emulator.call("set_price", mes, Decimal("5010.25"))
        trade_id = await emulator.run("trade_by_hand", "ACC-1", mes, 0, 2, "by-hand")
        assert emulator.call("net_position", "ACC-1", mes) == 2
        assert [(f["id"], f["custom_tag"], f["size"]) for f in emulator.call("fills_of", "ACC-1")] == \
            [(trade_id, "by-hand", 2)]
        await emulator.run("drop_connection")  # a coroutine there, awaited here
        await emulator.run("restore_connection")
        with pytest.raises(KeyError, match="no account 'NOPE'"):
            emulator.call("net_position", "NOPE", mes)
        with pytest.raises(ValueError, match="no emulator operation 'expire_tokens'"):
            emulator.call("expire_tokens")
    finally:
        await emulator.stop()
    process = emulator._process
    assert process is not None and process.returncode == 0
    with pytest.raises(ConnectionError):
        emulator.call("fill_count")

    orphan = EmulatorProcess("tradovate", accounts={"DEMO": Decimal(1000)})
    await orphan.start()
    child = orphan._process
    assert child is not None and orphan._conn is not None
    orphan._stop_reading(ConnectionError("the test process died"))
    orphan._conn.close()  # what the kernel does to a dead test process's end
    deadline = time.monotonic() + 10.0
    while child.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert child.poll() is not None, "the emulator outlived its caller"
    await orphan.stop()
