"""The interpreter settings ``multibroker serve`` applies once started, and undoes when it stops."""

from __future__ import annotations

import gc
import sys

from aiohttp import web

from service import tuning


async def _leave(context) -> None:  # type: ignore[no-untyped-def]
    try:
        await context.__anext__()
    except StopAsyncIteration:
        pass


async def test_serving_freezes_start_up_objects_and_restores_everything_on_exit() -> None:
    thresholds, switch = gc.get_threshold(), sys.getswitchinterval()
    assert gc.get_freeze_count() == 0
    built_at_start_up = [{"n": i} for i in range(1000)]  # what a service holds for its whole life
    context = tuning.serving(web.Application())
    await context.__anext__()
    try:
        assert gc.get_threshold() == (tuning.YOUNG, tuning.MIDDLE, tuning.OLD)
        assert sys.getswitchinterval() == tuning.SWITCH_S
        assert gc.get_freeze_count() >= len(built_at_start_up)
        first = built_at_start_up[0]
        assert not any(o is first for o in gc.get_objects(generation=2))  # frozen: no generation scans it
    finally:
        await _leave(context)
    assert gc.get_threshold() == thresholds
    assert sys.getswitchinterval() == switch
    assert gc.get_freeze_count() == 0


async def test_cycles_made_while_serving_are_still_collected() -> None:
    context = tuning.serving(web.Application())
    await context.__anext__()
    try:
        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        del a, b
        assert gc.collect() >= 2
    finally:
        await _leave(context)
