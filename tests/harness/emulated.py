"""What the harnesses of the real connectors share: the connector runs unchanged against one of our emulators
(``brokers.emulators``), and the misbehaviour hooks of ``BrokerHarness`` go to that emulator, which misbehaves
on the wire the way the real broker does."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

from brokers.base import Connector


class Emulator(Protocol):
    """The misbehaviour hooks both broker emulators offer."""

    def set_price(self, contract: str, price: Decimal, /) -> None: ...

    def reject_next(self, n: int = 1) -> None: ...

    def partial_fill_next(self, parts: list[int]) -> None: ...

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2) -> None: ...

    def lose_next_place_response(self) -> None: ...

    async def drop_connection(self) -> None: ...

    async def restore_connection(self) -> None: ...


@dataclass
class EmulatedHarness:
    connector: Connector
    emulator: Emulator
    account: str
    contract: str
    commission_per_side: Decimal
    point_value: Decimal

    broker_label: ClassVar[str] = "The"
    """The broker's name in the message of a reconnect that never came."""
    remote: ClassVar[str] = "broker"
    """What the connector waits for to come back, in the same message (ProjectX calls it the gateway)."""

    def set_price(self, price: Decimal) -> None:
        self.emulator.set_price(self.contract, price)

    def reject_next(self, n: int = 1) -> None:
        self.emulator.reject_next(n)

    def partial_fill_next(self, parts: list[int]) -> None:
        self.emulator.partial_fill_next(parts)

    def rate_limit_next(self, n: int = 1, retry_after_s: float = 0.2) -> None:
        self.emulator.rate_limit_next(n, retry_after_s)

    def lose_next_place_response(self) -> None:
        self.emulator.lose_next_place_response()

    async def drop_connection(self) -> None:
        await self.emulator.drop_connection()

    async def restore_connection(self) -> None:
        """Bring the broker back and wait (bounded) until the connector has reconnected by itself: the suite
        checks what the connector does on its own, not a reconnect the harness forced."""
        await self.emulator.restore_connection()
        deadline = time.monotonic() + 5.0
        while not self.connector.connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.broker_label} connector did not reconnect within 5 s of the "
                                   f"{self.remote} coming back")
            await asyncio.sleep(0.02)


async def wait_until(predicate: Any, timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate()`` (bounded) — for state the connector reaches in the background."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:g}s")
        await asyncio.sleep(0.01)


EMULATORS = {"tradovate": "brokers.emulators.tradovate:TradovateEmulator",
             "projectx": "brokers.emulators.projectx:ProjectXEmulator"}
"""Emulator type -> its class (``module:name``), imported in the emulator's process only."""
OPERATIONS = frozenset({
    # the faults and the trader at the account
    "set_price", "reject_next", "partial_fill_next", "rate_limit_next", "lose_next_place_response",
    "drop_connection", "restore_connection", "trade_by_hand", "move_position",
    # read-outs in plain values
    "contract_names", "order_book", "fills_of", "positions_of", "fill_count", "net_position", "order_count",
})
"""The emulator's public methods an ``EmulatorProcess`` may call by name (a coroutine's result is awaited)."""
URLS = ("base_url", "ws_url", "hub_url")
"""The emulator's addresses, read once it listens (each emulator has some of them)."""


class EmulatorProcess:
    """A broker emulator in a process of its own (a child Python running ``serve_emulator``), as the broker is:
    for the runtime fuzz (``tests.harness.fuzz``), whose crash kills every task of the test's loop (the
    service's) and must leave the broker trading: its request handlers, the rest of a partial fill, its pushes.

    Why a process and not a thread: an emulator on a second loop in a thread of the test process raced the
    interpreter's shared AST recursion counter (CPython 3.11, python/cpython#106905: pytest's next module rewrite
    failed with ``SystemError: AST constructor recursion depth mismatch``). Why a plain child (``subprocess`` with
    one end of a socket pair) rather than ``multiprocessing``'s spawn: spawn re-runs the parent's main module in
    the child (pytest's, or a script's without a ``__main__`` guard, which then fails), and costs that import.
    Why that socket pair as control channel (``multiprocessing.connection.Connection``: pickled messages) and
    not an HTTP route in the child: the caller needs both a blocking call (the harness reads the broker's book
    from synchronous code, in the middle of a check) and an awaited one (``drop_connection`` and
    ``trade_by_hand`` run while the service talks to the emulator); the pair serves both with no client session
    to open and close (one more thing a crash step would have to spare), in microseconds, and it ends by itself
    when either side dies: the child watches it and exits at its end of file, so no emulator outlives its test
    process, and ``stop`` terminates, then kills, a child that did not end.

    Messages: ``(kind, options)`` first, to build the emulator; then ``(id, operation, args)`` to the child and
    ``(id, ok, result or exception)`` back, matched by id (awaited calls may overlap blocking ones; the child
    answers each when it is done). Answer 0 is the emulator's addresses, once it listens."""

    def __init__(self, kind: str, **options: Any) -> None:
        if kind not in EMULATORS:
            raise ValueError(f"unknown emulator {kind!r}: one of {sorted(EMULATORS)}")
        self.kind = kind
        self._options = options
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reading = False
        self._ended = False
        self.urls: dict[str, str] = {}
        """``base_url`` and ``ws_url`` (Tradovate) or ``hub_url`` (ProjectX), once started."""

    async def start(self, timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        ready = self._pending[0] = loop.create_future()
        self._process, self._conn = _take_spare()
        self._conn.send((self.kind, self._options))
        loop.add_reader(self._conn.fileno(), self._drain)
        self._reading = True
        try:
            self.urls = await asyncio.wait_for(ready, timeout_s)
        except BaseException:
            await self._end()
            raise

    async def stop(self) -> None:
        try:
            if self._reading:
                await asyncio.wait_for(self.run("stop"), 10.0)
        finally:
            await self._end()

    async def _end(self) -> None:
        """Stop reading, let the child exit (terminate, then kill it, if it does not) and free the pipe."""
        if self._ended:
            return
        self._ended = True
        self._stop_reading(ConnectionError("the emulator's process was stopped"))
        if self._conn is not None:
            self._conn.close()  # the child's end of file, if it still listens
        process = self._process
        if process is None:
            return
        for signal_it, wait_s in ((None, 5.0), (process.terminate, 2.0), (process.kill, 5.0)):
            if process.poll() is not None:
                break
            if signal_it is not None:
                signal_it()
            deadline = time.monotonic() + wait_s
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        process.wait(5.0)

    def call(self, op: str, *args: Any, timeout_s: float = 10.0) -> Any:
        """The emulator's ``op(*args)``, blocking the caller's loop until the answer (a read-out or a hook: a
        moment); its exception is raised here."""
        rid = self._send(op, args)
        assert self._conn is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._conn.poll(left):
                raise TimeoutError(f"the emulator did not answer {op}{args!r} within {timeout_s:g}s")
            answer = self._receive()
            if answer is None:
                raise ConnectionError(f"the emulator's process ended before answering {op}{args!r}")
            if answer[0] == rid:
                return self._result(answer)
            self._settle(answer)

    async def run(self, op: str, *args: Any) -> Any:
        """``op(*args)`` at the emulator (a coroutine there: ``drop_connection``), awaited without blocking the
        caller's loop, whose clients the emulator may be talking to meanwhile."""
        future = asyncio.get_running_loop().create_future()
        rid = self._send(op, args)
        self._pending[rid] = future
        return await future

    def _send(self, op: str, args: tuple[Any, ...]) -> int:
        if not self._reading or self._conn is None:
            raise ConnectionError(f"the emulator's process is not running ({op})")
        rid = next(self._ids)
        self._conn.send((rid, op, args))
        return rid

    def _receive(self) -> tuple[int, bool, Any] | None:
        assert self._conn is not None
        try:
            return cast(tuple[int, bool, Any], self._conn.recv())
        except (EOFError, OSError):
            self._stop_reading(ConnectionError("the emulator's process ended"))
            return None

    @staticmethod
    def _result(answer: tuple[int, bool, Any]) -> Any:
        _rid, ok, value = answer
        if not ok:
            raise value
        return value

    def _settle(self, answer: tuple[int, bool, Any]) -> None:
        future = self._pending.pop(answer[0], None)
        if future is None or future.done():
            return
        if answer[1]:
            future.set_result(answer[2])
        else:
            future.set_exception(answer[2])

    def _drain(self) -> None:
        """The pipe is readable (the loop's reader): settle every answer waiting in it."""
        while self._reading and self._conn is not None and self._conn.poll():
            answer = self._receive()
            if answer is not None:
                self._settle(answer)

    def _stop_reading(self, why: Exception) -> None:
        if self._reading and self._conn is not None:
            self._reading = False
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._conn.fileno())
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(why)


CHILD = """
import sys, types
for name in ("brokers", "tests", "tests.harness"):
    package = types.ModuleType(name)
    package.__path__ = [sys.argv[2] + "/" + name.replace(".", "/")]
    sys.modules[name] = package
from tests.harness.emulated import serve_emulator
serve_emulator(int(sys.argv[1]))
"""
"""The emulator's process: ``serve_emulator`` on the socket given, with ``brokers`` and ``tests.harness`` as bare
packages (their ``__init__`` not run: it imports every connector and, through sqlite_utils, pandas, which the
emulators never use; half a second per emulator, on cores the scenario shares)."""
_spare: tuple[subprocess.Popen[bytes], Connection] | None = None
"""A child started ahead, its imports done, waiting to be told which emulator to be: a scenario's emulator is up
in milliseconds instead of the half second of importing the product, and the next one warms up while the
scenario plays. Idle, it ends with the test process (its socket's end of file) or at exit (``_drop_spare``)."""


def _launch() -> tuple[subprocess.Popen[bytes], Connection]:
    ours, theirs = socket.socketpair()
    root = str(Path(__file__).resolve().parents[2])  # the repository: ``tests`` and the product import from it
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(theirs.fileno()), root],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": path})
    return process, Connection(ours.detach())


def _take_spare() -> tuple[subprocess.Popen[bytes], Connection]:
    """The spare child if it is still there (else a new one), and a new spare for the next emulator."""
    global _spare
    import atexit

    taken, _spare = _spare, None
    if taken is None or taken[0].poll() is not None:
        if taken is not None:
            taken[1].close()
        taken = _launch()
    atexit.unregister(_drop_spare)  # once, however many spares were made
    atexit.register(_drop_spare)
    _spare = _launch()
    return taken


def _drop_spare() -> None:
    """At exit: the idle child reads its end of file and ends; reap it."""
    global _spare
    taken, _spare = _spare, None
    if taken is not None:
        taken[1].close()
        try:
            taken[0].wait(5.0)
        except subprocess.TimeoutExpired:
            taken[0].kill()
            taken[0].wait(5.0)


def serve_emulator(fd: int) -> None:
    """The emulator's process (``EmulatorProcess``): import the emulators, then on the socket ``fd`` read what to
    build, build and start the emulator, say where it listens, and serve the calls until ``stop`` or the socket's
    end (the test process is gone: the emulator goes with it)."""
    import importlib

    for target in EMULATORS.values():
        importlib.import_module(target.split(":")[0])
    conn = Connection(fd)
    try:
        kind, options = conn.recv()
    except EOFError:
        return
    asyncio.run(_serve(conn, kind, options))
    # The emulator has stopped and said so: end now, not after the interpreter's teardown (the caller waits).
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def _serve(conn: Any, kind: str, options: dict[str, Any]) -> None:
    import importlib
    import inspect

    module, name = EMULATORS[kind].split(":")
    emulator = getattr(importlib.import_module(module), name)(**options)
    await emulator.start()
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    tasks: set[asyncio.Task[Any]] = set()

    def answer(rid: int, ok: bool, value: Any) -> None:
        try:
            conn.send((rid, ok, value))
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send((rid, False, RuntimeError(f"emulator answer not picklable: {value!r}")))
        except OSError:  # the test process is gone
            if not done.done():
                done.set_result(None)

    def finished(rid: int, task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if task.cancelled():
            answer(rid, False, ConnectionError("the emulator stopped before this call finished"))
        elif task.exception() is not None:
            answer(rid, False, task.exception())
        else:
            answer(rid, True, task.result())

    def readable() -> None:
        while not done.done() and conn.poll():
            try:
                rid, op, args = conn.recv()
            except (EOFError, OSError):
                done.set_result(None)
                return
            if op == "stop":
                done.set_result(rid)
                return
            if op not in OPERATIONS:
                answer(rid, False, ValueError(f"no emulator operation {op!r}: one of {sorted(OPERATIONS)}"))
                continue
            try:
                result = getattr(emulator, op)(*args)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                answer(rid, False, exc)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                tasks.add(task)
                task.add_done_callback(lambda t, rid=rid: finished(rid, t))
            else:
                answer(rid, True, result)

    answer(0, True, {url: getattr(emulator, url) for url in URLS if hasattr(emulator, url)})
    loop.add_reader(conn.fileno(), readable)
    try:
        stop_rid = await done
    finally:
        loop.remove_reader(conn.fileno())
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await emulator.stop()
    if stop_rid is not None:
        answer(stop_rid, True, None)
