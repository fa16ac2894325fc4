"""Rules generations come and go (every hot reload builds one): 1,000 of them must leave threads and memory flat.

The stock durable-rules ``Host`` starts two timer threads per instance that never stop; 200 reloads leaked about
200 MB and 400 threads. ``engine.decide.DurableRules`` starts none and deletes its state and ruleset on close.
"""

from __future__ import annotations

import gc
import os
import threading

import pytest

from engine.decide import Engine, durable_available
from engine.loader import load_rules
from engine.signal import parse_signal
from engine.state import parse_state
from tests.conftest import EXAMPLE_RULES

pytestmark = pytest.mark.skipif(not durable_available(), reason="durable-rules is not importable here")

STATE = {"now": "2026-03-10T10:00:00-04:00", "accounts": {
    name: {"connected": True, "free_margin": 50000, "daily_pnl": 0} for name in ("apex-1", "apex-2", "topstep-1")}}
SIGNAL = {"id": "gen", "strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 1}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


UNROUTED = {"id": "gen", "strategy": "nobody", "ticker": "MES1!", "action": "buy", "quantity": 1}


def one_generation(ruleset, signals, state, now) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(ruleset, backend="durable")
    try:
        for signal in signals:
            engine.decide(signal, state, now)
    finally:
        engine.close()


def test_a_generation_starts_no_threads() -> None:
    ruleset = load_rules([EXAMPLE_RULES]).ruleset
    before = threading.active_count()
    engine = Engine(ruleset, backend="durable")
    assert threading.active_count() == before
    engine.close()


def test_1000_generations_keep_threads_and_memory_flat() -> None:
    ruleset = load_rules([EXAMPLE_RULES]).ruleset
    assert ruleset is not None
    now, state = parse_state(STATE)
    routed, unrouted = parse_signal(SIGNAL), parse_signal(UNROUTED)
    with Engine(ruleset) as engine:
        assert len(engine.decide(routed, state, now).orders) == 3
    # Generations that matched, and generations that never matched (their retirement once segfaulted).
    variants = [[routed], [unrouted], [unrouted, routed], [routed, unrouted], []]
    for i in range(100):  # warm up allocator pools and caches (sessions, schedule, symbols)
        one_generation(ruleset, variants[i % len(variants)], state, now)
    gc.collect()
    threads, memory = threading.active_count(), rss_bytes()
    for i in range(1000):
        one_generation(ruleset, variants[i % len(variants)], state, now)
    gc.collect()
    assert threading.active_count() == threads
    grown = rss_bytes() - memory
    # A leaking generation costs ~1 MB (1,000 MB here); allocator noise is well under 8 MB.
    assert grown < 8 * 2**20, f"RSS grew {grown / 2**20:.1f} MB over 1,000 generations"
