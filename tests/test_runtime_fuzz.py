"""Seeded random scenarios against the whole runtime (``tests.harness.fuzz``): signals, duplicates, flattens, drops,
pauses, price moves, clock moves across the schedule, restarts, with the invariants checked at every quiescence
point and after every flatten.

CI runs ``DEFAULT_SEEDS``; ``MB_FUZZ_SEEDS=500`` runs seeds 0..499 instead, ``MB_FUZZ_SEED=<n>`` replays one seed
(a failure prints the seed and its steps).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness.fuzz import FLAT_LINE, generate, run_scenario, tolerated
from tests.harness.runtime import NOON, Clock, signal, world

DEFAULT_SEEDS = list(range(40))
"""About 0.3 s a seed. Found failing (strict, before the fixes): seeds 11, 16, 26, 35, 36, 40, 41, 46 and more
(``FLAT_LINE``), seed 80 (the paused-broker netting below)."""

TOLERATED = set() if os.environ.get("MB_FUZZ_STRICT") else (tolerated() or {FLAT_LINE})
"""The known bug ``FLAT_LINE`` (pinned strictly by the first xfail test below) is timing-dependent: whether an
entry is still in flight when a flatten computes varies run to run, so a strict CI seed set would be flaky. The
tolerance is narrow (only lines the ledger held flat with an order in flight at that instant); ``MB_FUZZ_STRICT=1``
turns it off. Remove it once the bug is fixed."""


def _seeds() -> list[int]:
    if os.environ.get("MB_FUZZ_SEED"):
        return [int(os.environ["MB_FUZZ_SEED"])]
    if os.environ.get("MB_FUZZ_SEEDS"):
        return list(range(int(os.environ["MB_FUZZ_SEEDS"])))
    return DEFAULT_SEEDS


@pytest.mark.parametrize("seed", _seeds())
async def test_a_random_scenario_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    runner = await run_scenario(tmp_path, generate(seed), tolerate=TOLERATED)
    assert runner.checks >= 1


# -- bugs the fuzzer found (minimal reproductions; strict xfail until fixed) ------------------------------------------

@pytest.mark.xfail(strict=True, reason="Runtime._flatten_orders iterates only ledger lines with a non-zero quantity, "
                   "so an entry still in flight on a line the ledger holds flat gets no exit: it fills after the "
                   "flatten and the position stays open (found by seeds 26, 36)")
async def test_a_flatten_closes_an_entry_still_in_flight_on_a_flat_line(tmp_path: Path) -> None:
    async with world(tmp_path, rules={"slow_ms": 20, "fill_ms": 20}, clock=Clock(NOON)) as w:
        opened = await w.submit(signal("mirror", "buy", 1, sid="open"))  # dispatched, not filled yet
        assert {o.account for o in opened.orders} == {"f1", "f2", "s1"}
        result = await w.runtime.flatten(reason="operator: everything")
        await w.settle()
        held = {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}
        assert held == {}, (held, result["orders"])


@pytest.mark.xfail(strict=True, reason="Runtime._flatten_orders nets an exit still in flight ('new') at a paused "
                   "broker; the dispatcher then makes that exit 'missed', the flatten journaled no exit of its own for "
                   "the account, so resume_broker has no missed flatten exit to re-issue and the position stays open "
                   "after the flatten (found by seed 80, through the 15:55 schedule flatten)")
async def test_a_flatten_that_nets_an_exit_later_missed_at_a_paused_broker_still_closes_on_resume(
        tmp_path: Path) -> None:
    async with world(tmp_path, clock=Clock(NOON)) as w:
        await w.submit(signal("mirror", "buy", 1, sid="open"))
        await w.settle()
        await w.runtime.pause_broker("slow")
        closing = await w.submit(signal("mirror", "exit", sid="close"))  # s1's exit: 'new', in slow's lane
        assert {o.account for o in closing.orders} == {"f1", "f2", "s1"}
        result = await w.runtime.flatten(strategy="mirror", reason="operator")  # nets the exits in flight
        await w.settle()
        assert w.statuses("close")["s1"] == "missed"
        await w.runtime.resume_broker("slow")
        await w.settle()
        held = {key: book.quantity for key, book in w.runtime.ledger.items() if book.quantity}
        assert held == {}, (held, result["orders"])
        assert [int(p["quantity"]) for p in w.connector("slow").book.positions("S-1") if int(p["quantity"])] == []
