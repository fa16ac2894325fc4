"""Interpreter settings for a long-running service (``multibroker serve`` and the webhook benchmark).

Two process-wide settings of CPython cost the webhook its latency under load; ``serving`` changes both once the
service is up and puts them back when it stops (the tests start and stop many services in one process).

The cyclic garbage collector. Profiled under load (300 signals/s, 10 orders each), it took 15-20 % of the event
loop, and each collection of the oldest generation paused the loop for 40+ ms, which alone breaks a 5 ms p99:

- everything imported and built at start-up (aiohttp, pandas' calendars, the compiled rules, durable-rules'
  Python side) is hundreds of thousands of container objects that live as long as the process, and every full
  collection walked all of them again;
- the default threshold (700 net new container objects) ran a young collection every few signals, since a signal
  allocates hundreds of dicts, dataclasses, futures and tasks.

So ``serving`` collects once and freezes what exists (``gc.freeze``: never scanned again) and raises the thresholds,
so that young collections are rarer; each then walks at most ``YOUNG`` surviving objects. Reference cycles are
still collected; only the cadence changes.

The GIL switch interval. The journal's COMMIT (the fsync that makes an answer true) runs on a committer thread.
When the fsync returns while the event loop is running Python code, the thread waits for the GIL until the loop
drops it, which CPython forces only every ``sys.getswitchinterval()`` (5 ms by default): a 0.3 ms fsync became a
5 ms commit under load, and every answer of that batch waited for it. ``SWITCH_S`` bounds that wait.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import AsyncIterator, Callable

from aiohttp import web

log = logging.getLogger(__name__)

YOUNG = 20_000
"""Net new container objects between young collections (default 700)."""
MIDDLE = 20
"""Young collections between collections of the middle generation (default 10)."""
OLD = 50
"""Middle collections between full collections (default 10; CPython also waits until the objects that survived
since the last full collection are a quarter of those it holds, so full collections stay proportional)."""
SWITCH_S = 0.0005
"""GIL switch interval: the longest a thread ready to run (the committer after its fsync) waits for the loop."""


def tune() -> Callable[[], None]:
    """Apply the settings now (freezing what exists); returns the function that puts the previous ones back."""
    thresholds = gc.get_threshold()
    switch = sys.getswitchinterval()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
    sys.setswitchinterval(SWITCH_S)
    log.debug("serving: %d objects frozen after start-up; gc thresholds %s; GIL switch interval %g s",
              gc.get_freeze_count(), gc.get_threshold(), SWITCH_S)

    def undo() -> None:
        sys.setswitchinterval(switch)
        gc.set_threshold(*thresholds)
        gc.unfreeze()

    return undo


async def serving(app: web.Application) -> AsyncIterator[None]:
    """An aiohttp cleanup context; register it after the contexts that build the service, so it runs once built."""
    undo = tune()
    try:
        yield
    finally:
        undo()
