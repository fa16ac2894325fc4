"""``POST /webhook``: a signal in, a journaled decision out, within milliseconds, and only then the orders.

TradingView gives up after a few seconds and never retries, so the answer may not wait for any broker. The path is:
check the source and the size, parse, authenticate, validate, recognise a repeat, refuse a stale signal, decide
(the engine is pure and fast), journal the signal with its decision and its orders in one transaction, await the
COMMIT, answer ``202``, and hand the orders to the runtime's dispatcher after the answer is written. A request the
service cannot put on disk gets ``503`` and no acknowledgement; every refusal is journaled with its reason.

The decided orders count as exposure from the decision on (``Runtime.hold``, in the same step as the decision),
not from the dispatch: other signals are decided while this one awaits its commit, and each must see the orders
before it, or two concurrent entries both pass a limit that allows one and best mode opens a position twice.

The record names the rules that decided (``ruleset``: the engine's content hash and the number of the generation
pinned for the decision), read off the pinned generation: rules reload, and an auditor must know which decided.

Answers::

    202 {"signal_id", "decision": <decision record>}                 a new signal (decision may have no orders)
    200 {"signal_id": <original>, "duplicate": true, "decision": <original's>}
    4xx/5xx {"error": {"status", "code", "message", "path"?}}

Order of checks (each later one assumes the earlier passed): 403 source not allowed, 415 content type, 413 too
large, 400 not UTF-8 JSON, 401 secret (authentication precedes any detail about the body), 422 schema, 422 a limit
or stop order (not supported yet: refused rather than sent at market), duplicate, 422 stale, 422 unknown instrument,
503 journal.

Idempotency: the key is the signal's ``id``, else ``engine.signal.derive_signal_id`` of the body without the secret
(``time`` included when present). The sender's id is only the key: the journal gives every signal its own id, from
which the client order ids derive, so a sender reusing an id after the window can never collide at a broker.
Requests with the same key that arrive while the first is still being decided and committed wait for its outcome:
taken, they answer as its duplicate; refused or not stored (nothing acknowledged), each is judged on its own. A
key is never decided twice at once.

Secrets: compared with ``hmac.compare_digest``; the ``secret`` field is removed from the body before it is stored
(a malformed body is redacted textually), and any configured secret value found in stored text is masked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping, Protocol

from aiohttp import web

from engine.decision import Decision
from engine.reload import RulesWatcher
from engine.signal import Signal, SignalError, parse_signal
from engine.state import EngineState
from engine.symbols import SymbolError
from service.config import ServiceConfig
from service.journal import Journal, JournalError, dumps, new_signal_id

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Webhook-Secret"
_JSON_TYPES = ("application/json", "text/plain", "application/octet-stream", "")
"""TradingView posts JSON as text/plain; curl without -H posts form-urlencoded (refused: not what it looks like)."""
_SECRET_FIELD = re.compile(r'("secret"\s*:\s*)("(?:[^"\\]|\\.)*"|[^,}\]\s]+)', re.IGNORECASE)


class Dispatcher(Protocol):
    """What the webhook needs from ``service.runtime.Runtime``."""

    def engine_state(self, now: datetime) -> EngineState: ...

    def hold(self, signal_id: str, decision: Decision) -> None:
        """Count the decision's orders as exposure until ``dispatch`` takes them (``Runtime.hold``)."""

    def release(self, signal_id: str) -> None:
        """Drop a hold whose signal was not acknowledged; a no-op once dispatched."""

    def dispatch(self, signal_id: str, decision: Decision) -> None: ...


class Refusal(Exception):
    """A request refused with an HTTP status; ``reason`` is what the journal keeps (``message`` is shown)."""

    def __init__(self, status: int, code: str, message: str, path: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.path = path

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.path is not None:
            error["path"] = self.path
        return {"error": error}


def error_response(status: int, code: str, message: str, path: str | None = None) -> web.Response:
    return json_response(Refusal(status, code, message, path).body(), status=status)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=dumps(body), status=status, content_type="application/json")


def redact(text: str, secrets: list[str]) -> str:
    """Mask every ``"secret": ...`` member and any known secret value, for bodies that could not be parsed."""
    text = _SECRET_FIELD.sub(r'\1"***"', text)
    for value in secrets:
        if value:
            text = text.replace(value, "***")
    return text


def _signal_json(signal: Signal) -> dict[str, Any]:
    return {f.name: getattr(signal, f.name) for f in dataclasses.fields(signal) if getattr(signal, f.name) is not None}


class Webhook:
    """The handler with its collaborators; ``service.app`` registers ``handle`` on ``POST /webhook``."""

    def __init__(self, config: ServiceConfig, journal: Journal, watcher: RulesWatcher, runtime: Dispatcher, *,
                 clock: Callable[[], datetime] | None = None):
        self.config = config
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        """The decision time (a test pins it; the schedule and continuous tickers depend on it)."""
        self.journal = journal
        self.watcher = watcher
        self.runtime = runtime
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._secrets: tuple[Any, list[str]] | None = None

    # -- the handler --------------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = b""
        body: Any = None
        try:
            self._check_source(request)
            self._check_content_type(request)
            raw = await self._read(request)
            body = self._parse(raw)
            self._authenticate(request, body)
            signal = self._validate(body)
        except Refusal as refusal:
            return await self._refuse(request, refusal, raw, body)
        # Recording and dispatching must finish even if the client hangs up meanwhile: an acknowledged-on-disk
        # signal whose dispatch was cancelled would wait for a restart. Shield the work from handler cancellation.
        task = asyncio.ensure_future(self._accept_or_503(request, signal, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _accept_or_503(self, request: web.Request, signal: Signal,
                             body: Mapping[str, Any]) -> web.StreamResponse:
        try:
            return await self._accept(request, signal, body)
        except JournalError as exc:  # e.g. the idempotency lookup could not read the journal
            logger.error("signal %s not acknowledged: %s", signal.id, exc)
            return error_response(503, "journal_unavailable",
                                  "the journal is unavailable, so the signal was not acknowledged: send it again")

    async def _accept(self, request: web.Request, signal: Signal, body: Mapping[str, Any]) -> web.StreamResponse:
        key = signal.id
        window = self.config.idempotency_window_s
        if signal.id_derived and signal.time is None:
            window = self.config.content_key_window_s
        while (pending := self._inflight.get(key)) is not None and not pending.done():
            # The same key is being decided right now: wait for its outcome. Taken -> we are its duplicate;
            # refused or not stored -> nothing was acknowledged, so this request is judged on its own.
            await asyncio.wait([pending])
        now = self.clock()
        original = self.journal.find_by_key(key, now - timedelta(seconds=window))
        if original is not None:
            return await self._duplicate(request, key, original, body)
        try:
            self._check_age(signal, now)
        except Refusal as refusal:
            return await self._refuse(request, refusal, b"", body, key=key, signal=signal)

        # No await between the lookup above and this claim: a concurrent repeat sees the claim and waits.
        claim: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[key] = claim
        try:
            response = await self._decide_and_record(request, signal, body, key, now, claim)
        finally:
            self._inflight.pop(key, None)
            if not claim.done():
                claim.set_result("")  # refused or not stored: waiters look again and find nothing
        return response

    async def _decide_and_record(self, request: web.Request, signal: Signal, body: Mapping[str, Any], key: str,
                                 now: datetime, claim: asyncio.Future[str]) -> web.StreamResponse:
        signal_id = new_signal_id(now)
        own = dataclasses.replace(signal, id=signal_id)
        try:
            state = self.runtime.engine_state(now)
            with self.watcher.acquire() as generation:
                decision: Decision = generation.engine.decide(own, state, now)
                number: int | None = getattr(generation, "number", None)  # None: a static rule set, no reloads
        except SymbolError as exc:
            refusal = Refusal(422, "unknown_instrument", f"$.ticker: {exc}", "$.ticker")
            return await self._refuse(request, refusal, b"", body, key=key, signal=signal)
        except Exception as exc:  # noqa: BLE001 - an engine failure must be visible, journaled and not crash us
            logger.exception("deciding signal %s failed", key)
            refusal = Refusal(500, "decision_failed", f"the decision failed: {type(exc).__name__}: {exc}")
            return await self._refuse(request, refusal, b"", body, key=key, signal=signal)
        # The orders count as exposure from their decision on (no await in between): a signal decided while this
        # one's commit is under way sees them (max_contracts, margin, best mode's holder). ``dispatch`` ends the
        # hold; leaving without it (not acknowledged, or cancelled) releases it, so nothing stays counted.
        if decision.orders:
            self.runtime.hold(signal_id, decision)
        try:
            return await self._record_and_answer(request, signal, body, key, now, claim, signal_id, decision,
                                                 number)
        finally:
            self.runtime.release(signal_id)  # a no-op once dispatched

    async def _record_and_answer(self, request: web.Request, signal: Signal, body: Mapping[str, Any], key: str,
                                 now: datetime, claim: asyncio.Future[str], signal_id: str,
                                 decision: Decision, generation: int | None) -> web.StreamResponse:
        record = decision.to_json(generation)  # names its rules: the engine's content hash, the pinned generation
        record_text = dumps(record)  # once, for the journal and the answer alike
        orders = [{**o.to_json(), "margin_usd": o.margin_usd, "order_type": decision.order_type,
                   "price": record["price"]} for o in decision.orders]
        try:
            await self.journal.record_signal(
                signal_id=signal_id, raw=self._stored_body(body), remote=request.remote,
                status="accepted" if decision.orders else "decided", reason=decision.reason, key=key,
                signal={**_signal_json(signal), "key": key}, decision=record_text, orders=orders, at=now)
        except JournalError as exc:
            logger.error("signal %s not acknowledged: %s", key, exc)
            return error_response(503, "journal_unavailable",
                                  "the signal could not be stored, so it was not acknowledged: send it again")
        claim.set_result(signal_id)
        # dumps() sorts keys, so this is byte for byte json_response({"signal_id": ..., "decision": record}).
        response = web.Response(text=f'{{"decision":{record_text},"signal_id":{dumps(signal_id)}}}', status=202,
                                content_type="application/json")
        if decision.orders or decision.cancel:
            # The answer goes out first: the dispatcher only enqueues, but no broker work may precede the answer.
            try:
                await response.prepare(request)
                await response.write_eof()
            except Exception:  # noqa: BLE001 - the sender hung up; the signal is on disk and must be dispatched
                logger.info("sender of %s left before the answer; the signal is journaled and dispatched", key)
            self.runtime.dispatch(signal_id, decision)
        return response

    async def _duplicate(self, request: web.Request, key: str, original: Mapping[str, Any],
                         body: Mapping[str, Any]) -> web.Response:
        try:
            await self.journal.record_signal(
                raw=self._stored_body(body), remote=request.remote, status="duplicate",
                reason=f"duplicate of {original['id']}", key=key, signal=None, decision=None)
        except JournalError as exc:  # the original is on disk: the answer stays true without this audit row
            logger.warning("duplicate of %s not journaled: %s", original["id"], exc)
        return json_response({"signal_id": original["id"], "duplicate": True, "decision": original["decision"]})

    async def _refuse(self, request: web.Request, refusal: Refusal, raw: bytes, body: Any, *,
                      key: str | None = None, signal: Signal | None = None) -> web.Response:
        stored = self._stored_body(body) if body is not None else self._stored_raw(raw)
        try:
            await self.journal.record_signal(
                raw=stored, remote=request.remote, status="rejected", reason=f"{refusal.status} {refusal.message}",
                key=key, signal=None if signal is None else _signal_json(signal), decision=None)
        except JournalError as exc:
            logger.warning("rejected request not journaled (%s): %s", refusal.code, exc)
        level = logging.WARNING if refusal.status in (401, 403) else logging.INFO
        logger.log(level, "webhook from %s refused: %d %s", request.remote, refusal.status, refusal.message)
        return json_response(refusal.body(), status=refusal.status)

    # -- the checks ---------------------------------------------------------------------------------------------

    def _check_source(self, request: web.Request) -> None:
        if not self.config.allow_ips:
            return
        try:
            address = ipaddress.ip_address((request.remote or "").split("%")[0])
        except ValueError:
            raise Refusal(403, "forbidden", "source address not allowed") from None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not any(address in net for net in self.config.allow_ips):
            raise Refusal(403, "forbidden", f"source address {address} is not in the allow-list")

    def _check_content_type(self, request: web.Request) -> None:
        ctype = request.content_type if request.headers.get("Content-Type") else ""
        if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
            raise Refusal(415, "unsupported_media_type",
                          f"Content-Type {ctype} is not accepted; send the JSON body as application/json or "
                          "text/plain (curl: -H 'Content-Type: application/json')")

    async def _read(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Refusal(413, "too_large", f"body of {request.content_length} bytes exceeds {limit} bytes")
        chunks = []
        size = 0
        async for chunk in request.content.iter_chunked(16 * 1024):
            size += len(chunk)
            if size > limit:
                raise Refusal(413, "too_large", f"body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, raw: bytes) -> Any:
        if not raw.strip():
            raise Refusal(400, "malformed_json", "empty body: expected a JSON object")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise Refusal(400, "malformed_json", f"body is not UTF-8 (byte {exc.start})") from None
        try:
            return json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise Refusal(400, "malformed_json",
                          f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        except ValueError as exc:
            raise Refusal(400, "malformed_json", str(exc)) from None

    def _expected_secret(self, body: Any) -> str | None:
        strategy = body.get("strategy") if isinstance(body, Mapping) else None
        if isinstance(strategy, str):
            ruleset, _engine = self.watcher.current
            env_name = ruleset.strategy_secret_env(strategy.strip())
            if env_name is not None:
                value = self.config.strategy_secret(env_name)
                if value is None:
                    logger.error("strategy %r needs its webhook secret in $%s, which is not set", strategy, env_name)
                return value
        return self.config.webhook_secret

    def _authenticate(self, request: web.Request, body: Any) -> None:
        given = request.headers.get(SECRET_HEADER)
        if given is None and isinstance(body, Mapping):
            value = body.get("secret")
            given = value if isinstance(value, str) else None
        expected = self._expected_secret(body)
        if expected is None:
            raise Refusal(401, "unauthorized", "no webhook secret is configured for this strategy on the server")
        if not given:
            raise Refusal(401, "unauthorized", f"missing secret: put it in the body's \"secret\" field or the "
                                               f"{SECRET_HEADER} header")
        if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
            raise Refusal(401, "unauthorized", "wrong secret")

    def _validate(self, body: Any) -> Signal:
        try:
            signal = parse_signal(body)
        except SignalError as exc:
            message = str(exc)
            path = message.split(":", 1)[0] if message.startswith("$") else None
            raise Refusal(422, "invalid_signal", message, path) from None
        if signal.order_type != "market" and signal.action != "cancel":
            # The signal format has limit and stop orders, and the connectors place them, but the runtime does not
            # manage resting orders yet: a flatten, an exit or a target counts an order in flight as about to
            # fill, which holds for a market order (milliseconds) and not for a limit resting for an hour (the
            # flatten would sell for it and leave the account short while it rests). Refused, not sent at market:
            # a limit filled at the market price is a trade the sender did not ask for.
            raise Refusal(422, "unsupported_order_type",
                          f"$.order_type: {signal.order_type} orders are not supported yet (only market orders are "
                          f"sent); send \"order_type\": \"market\" (the price field may stay, as information)",
                          "$.order_type")
        return signal

    def _check_age(self, signal: Signal, now: datetime) -> None:
        if signal.time is None:
            return
        age = (now - signal.time).total_seconds()
        limit = self.config.max_signal_age_s
        if age > limit:
            raise Refusal(422, "stale", f"stale signal: $.time is {age:.0f} s old (limit {limit:g} s)", "$.time")
        if age < -limit:
            raise Refusal(422, "stale", f"$.time is {-age:.0f} s in the future (limit {limit:g} s): check the "
                                        "sender's clock", "$.time")

    # -- storage ------------------------------------------------------------------------------------------------

    def _known_secrets(self) -> list[str]:
        """Every secret value that must never be stored: the global one and the strategies' of the current rules
        (derived once per rules generation: every journaled body is masked with them)."""
        try:
            ruleset, _engine = self.watcher.current
        except RuntimeError:
            return [self.config.webhook_secret or ""]
        cached = self._secrets
        if cached is not None and cached[0] is ruleset:
            return cached[1]
        values = [self.config.webhook_secret or ""]
        for doc in ruleset.routing:
            values.extend(self.config.strategy_secret(name) or "" for name in doc.strategy_secrets.values())
        self._secrets = (ruleset, values)
        return values

    def _stored_body(self, body: Any) -> str:
        """The body as journaled: the ``secret`` member removed, any secret value masked."""
        if isinstance(body, Mapping):
            body = {k: v for k, v in body.items() if k != "secret"}
        return redact(json.dumps(body, ensure_ascii=False, separators=(",", ":")), self._known_secrets())

    def _stored_raw(self, raw: bytes) -> str:
        return redact(raw[: self.config.max_body_bytes].decode("utf-8", "replace"), self._known_secrets())

    async def drain(self) -> None:
        """Wait for accepted signals still being recorded (shutdown: let them finish before the journal closes)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
