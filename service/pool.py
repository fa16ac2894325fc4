"""The broker connections: one connector per Broker document, its health, pauses, and reconnects with backoff.

A broker is *available* for trading only when it is connected, not paused by an operator, and not still
recovering from a reconnect. Recovery matters: after a drop the service does not know what happened while it was
away, so the runtime's ``on_up`` hook (look up in-flight orders, reconcile, catch up) runs before the broker takes
new orders again. Until then routing treats its accounts as disconnected (best mode picks another broker, mirror
orders for them are recorded as missed) and positions already held stay where they are.

Start-up does not wait for brokers: ``start`` begins every broker's first connect and recovery in the background
and returns, so that the service listens (and answers webhooks) while a broker is slow to log in, rate-limited or
unreachable. Until its first recovery finished a broker is simply not available, exactly as if it were down;
``ready`` waits for every broker's first attempt (tests, the CLI, callers that want the brokers before they act).

Drops are learned three ways: a ``ConnectionEvent(connected=False)`` from the connector, calls that fail with
``BrokerUnavailable``/``OutcomeUnknown`` (``report_failure``), and an order request that ended with nothing to vouch
for (``unresolved``: the broker is treated as dropped so that a come-up looks the order up at once). Reconnects
back off exponentially (``backoff_s`` doubling up to ``backoff_max_s``); a connector that reconnects by itself
(ProjectX does) is simply noticed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, Mapping

from brokers.base import BrokerError, BrokerEvent, ConnectionEvent, Connector, make_connector, utcnow
from engine.model import Broker

log = logging.getLogger(__name__)

STARTING, RECOVERING, UP, DOWN, PAUSED = "starting", "recovering", "up", "down", "paused"
"""What ``BrokerSlot.state`` reports (also in ``/api/status`` and ``/healthz``)."""

EventHandler = Callable[[str, BrokerEvent], Awaitable[None]]
StateHook = Callable[[str], Awaitable[None]]


@dataclass
class BrokerSlot:
    """One broker's connection and what the service knows about its health."""

    name: str
    connector: Connector
    admin_paused: bool = False
    down: bool = True
    """Not connected, or connected but not yet recovered (lookups, reconciliation, catch-up pending)."""
    reason: str = "not started"
    since: datetime = field(default_factory=utcnow)
    reconnects: int = 0
    failures: int = 0
    last_error: str | None = None
    recovering: bool = False
    started: bool = False
    """The first connect attempt has finished (and, when it connected, the recovery that followed it)."""
    settled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    """Set while no recovery runs: the first attempt waits for a recovery the event pump may have begun."""

    def __post_init__(self) -> None:
        self.settled.set()

    @property
    def available(self) -> bool:
        return not self.down and not self.admin_paused and self.connector.connected

    @property
    def state(self) -> str:
        """``paused`` (operator), ``up``, ``recovering`` (connected, lookups and reconciliation running),
        ``starting`` (first connect not finished yet) or ``down``."""
        if self.admin_paused:
            return PAUSED
        if self.available:
            return UP
        if self.recovering:
            return RECOVERING
        return DOWN if self.started else STARTING

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.connector.broker.type,
            "state": self.state,
            "connected": self.connector.connected and not self.down,
            "paused": self.admin_paused,
            "available": self.available,
            "reason": self.reason,
            "since": self.since.isoformat().replace("+00:00", "Z"),
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "rate_limit_headroom": round(self.connector.rate_limit_headroom(), 3),
        }


class BrokerPool:
    """Owns the connectors. ``on_event`` receives every order/fill event; ``on_up``/``on_down`` see state changes."""

    def __init__(self, brokers: Mapping[str, Broker], *, connector_options: Mapping[str, Any] | None = None,
                 factory: Callable[..., Connector] = make_connector, backoff_s: float = 0.5,
                 backoff_max_s: float = 30.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._factory = factory
        self._sleep = sleep
        self._options = dict(connector_options or {})
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.slots: dict[str, BrokerSlot] = {}
        self.on_event: EventHandler | None = None
        self.on_up: StateHook | None = None
        self.on_down: StateHook | None = None
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._reconnecting: dict[str, asyncio.Task[None]] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        for broker in brokers.values():
            self.add(broker)

    def add(self, broker: Broker) -> BrokerSlot:
        slot = BrokerSlot(broker.name, self._factory(broker, **self._options))
        self.slots[broker.name] = slot
        return slot

    def __getitem__(self, name: str) -> BrokerSlot:
        try:
            return self.slots[name]
        except KeyError:
            raise KeyError(f"no broker named {name!r}; configured: {', '.join(sorted(self.slots))}") from None

    def connector(self, name: str) -> Connector:
        return self[name].connector

    def available(self, name: str) -> bool:
        slot = self.slots.get(name)
        return slot is not None and slot.available

    def unavailable(self) -> frozenset[str]:
        """Brokers routing must skip (paused, down or recovering)."""
        return frozenset(name for name, slot in self.slots.items() if not slot.available)

    def disconnected(self) -> frozenset[str]:
        """Brokers down or still recovering (a subset of ``unavailable``: an operator pause is not a drop)."""
        return frozenset(name for name, slot in self.slots.items() if slot.down or not slot.connector.connected)

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin every broker's connect and recovery in the background and return at once.

        Nothing here may keep the service from listening: a broker that hangs in its login would otherwise keep
        the port closed, and a webhook sender that meets a refused connection does not retry. A broker that fails
        to connect is retried with backoff, as after a drop.
        """
        for slot in self.slots.values():
            if slot.name not in self._starting:
                self._starting[slot.name] = asyncio.create_task(self._start_one(slot), name=f"pool-start-{slot.name}")

    async def ready(self, timeout: float | None = None) -> bool:
        """Wait until every broker's first attempt finished (up, or down and retrying); False if ``timeout``
        (seconds) passed first or ``start`` was not called. Never cancels the attempts themselves."""
        if self._stopping or not self._starting:
            return False
        pending = [task for task in self._starting.values() if not task.done()]
        if pending:
            _done, pending_set = await asyncio.wait(pending, timeout=timeout)
            if pending_set:
                return False
        return all(slot.started for slot in self.slots.values())

    def starting(self) -> list[str]:
        """Brokers whose first connect (or the recovery after it) has not finished yet."""
        return sorted(name for name, slot in self.slots.items() if not slot.started)

    async def _start_one(self, slot: BrokerSlot) -> None:
        queue = slot.connector.subscribe()
        self._tasks[slot.name] = [asyncio.create_task(self._pump(slot, queue), name=f"pool-events-{slot.name}")]
        slot.reason = "starting: connecting"
        try:
            try:
                await slot.connector.connect()
            except Exception as exc:  # noqa: BLE001 - in the background nobody else would see it; retried below
                slot.last_error = str(exc)
                slot.reason, slot.since = f"down: could not connect at start: {exc}", utcnow()
                level = logging.WARNING if isinstance(exc, (BrokerError, OSError)) else logging.ERROR
                log.log(level, "broker %s: could not connect at start (%s: %s); retrying with backoff", slot.name,
                        type(exc).__name__, exc)
                if not self._stopping:
                    self._schedule_reconnect(slot)
                return
            await self._came_up(slot, "connected")
            await slot.settled.wait()  # a recovery the event pump began (the connect's own event) ends first
        finally:
            slot.started = True

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for ts in self._tasks.values() for t in ts] + list(self._reconnecting.values()) + \
            list(self._starting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._reconnecting.clear()
        self._starting.clear()
        for slot in self.slots.values():
            try:
                await slot.connector.close()
            except Exception:  # closing must not stop the others from closing
                log.exception("broker %s: error while closing", slot.name)

    # -- health ----------------------------------------------------------------------------------------------
    async def _pump(self, slot: BrokerSlot, queue: "asyncio.Queue[BrokerEvent]") -> None:
        while True:
            event = await queue.get()
            try:
                if isinstance(event, ConnectionEvent):
                    if event.connected:
                        if slot.down and not slot.recovering and slot.name not in self._reconnecting:
                            await self._came_up(slot, event.reason)
                    else:
                        await self.mark_down(slot.name, event.reason)
                elif self.on_event is not None:
                    await self.on_event(slot.name, event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("broker %s: error while handling %r", slot.name, event)

    async def mark_down(self, name: str, reason: str) -> None:
        """The broker's connection is gone (or unusable): stop routing to it and start reconnecting."""
        slot = self[name]
        if slot.down and name in self._reconnecting:
            return
        was_down = slot.down
        slot.down, slot.reason, slot.since = True, f"down: {reason}", utcnow()
        if not was_down:
            log.warning("broker %s paused (%s)", name, reason)
            if self.on_down is not None:
                await self.on_down(name)
        if not self._stopping:
            self._schedule_reconnect(slot)

    async def report_failure(self, name: str, exc: BaseException) -> None:
        """A call failed in a way that says the connection is unusable; pause the broker if it is."""
        slot = self[name]
        slot.failures += 1
        slot.last_error = str(exc)
        if not slot.connector.connected or slot.failures >= 3:
            await self.mark_down(name, f"{type(exc).__name__}: {exc}")

    async def unresolved(self, name: str, client_order_id: str, exc: BaseException) -> None:
        """An order's request ended and this process cannot say what the broker did with it (journaled ``unknown``:
        its answer was lost and the lookups failed, or the broker kept refusing it with rate limits past every
        retry): pause the broker at once and recover it, as after a drop. Until a come-up looks the order up, the
        service counts it as filling (an exit "closing" a position that may still be open, with nothing that would
        ever resolve it while the connection stays up); the come-up's recovery adopts what the broker has, or
        journals it ``missed``, and then redoes the flattens and catches up the accounts that missed it."""
        slot = self[name]
        slot.failures += 1
        slot.last_error = f"{client_order_id}: {type(exc).__name__}: {exc}"
        await self.mark_down(name, f"order {client_order_id} left unresolved ({type(exc).__name__}: {exc}); "
                                   "recovering to look it up")

    def report_success(self, name: str) -> None:
        self[name].failures = 0

    def _schedule_reconnect(self, slot: BrokerSlot) -> None:
        task = self._reconnecting.get(slot.name)
        if task is None or task.done():
            self._reconnecting[slot.name] = asyncio.create_task(self._reconnect(slot), name=f"reconnect-{slot.name}")

    async def _reconnect(self, slot: BrokerSlot) -> None:
        delay = self.backoff_s
        try:
            while not self._stopping:
                if not slot.connector.connected:
                    try:
                        await slot.connector.connect()
                    except (BrokerError, OSError) as exc:
                        slot.last_error = str(exc)
                        log.info("broker %s: reconnect failed (%s); next try in %.2fs", slot.name, exc, delay)
                if slot.connector.connected:
                    slot.reconnects += 1
                    await self._came_up(slot, "reconnected")
                    if not slot.down:
                        return
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
        finally:
            if self._reconnecting.get(slot.name) is asyncio.current_task():
                del self._reconnecting[slot.name]

    async def _came_up(self, slot: BrokerSlot, reason: str) -> None:
        """Connected again: recover (the runtime's hook) before taking new orders."""
        if slot.recovering:
            return
        slot.recovering = True
        slot.settled.clear()
        try:
            try:
                if self.on_up is not None:
                    await self.on_up(slot.name)
            except Exception as exc:
                slot.last_error = f"recovery failed: {exc}"
                log.exception("broker %s: recovery after %s failed; staying paused", slot.name, reason)
                slot.recovering = False
                if slot.connector.connected and not self._stopping:
                    await asyncio.sleep(min(self.backoff_s, 1.0))
                    self._schedule_reconnect(slot)
                return
            slot.recovering = False
            if slot.connector.connected:
                slot.down, slot.reason, slot.since, slot.failures = False, reason, utcnow(), 0
                log.info("broker %s available (%s)", slot.name, reason)
        finally:
            slot.recovering = False
            slot.settled.set()

    # -- operator --------------------------------------------------------------------------------------------
    def pause(self, name: str) -> BrokerSlot:
        slot = self[name]
        slot.admin_paused = True
        return slot

    def resume(self, name: str) -> BrokerSlot:
        slot = self[name]
        slot.admin_paused = False
        return slot

    def status(self) -> list[dict[str, Any]]:
        return [slot.as_dict() for _, slot in sorted(self.slots.items())]
