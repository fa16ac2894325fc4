"""Webhook signals: validated against ``schemas/signal.schema.json`` and normalized into a frozen ``Signal``.

The secret is dropped here and never reaches a Signal, a log line or the signal id. A signal without an ``id`` gets
one derived from its content (``sig-`` + 16 hex of the SHA-256 of its canonical JSON), so a TradingView alert
that fires twice with the same body is recognised as the same signal.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Mapping

import jsonschema

import schemas

_NORMALIZE_LOWER = ("action", "order_type", "position")


class SignalError(ValueError):
    """A signal that breaks the signal schema; the message starts with the JSON path of the problem."""


@dataclass(frozen=True)
class Signal:
    id: str
    strategy: str
    ticker: str
    action: str
    """``buy``, ``sell``, ``exit`` or ``cancel``."""
    quantity: int | None = None
    order_type: str = "market"
    price: Decimal | None = None
    position: str | None = None
    """The strategy's position after the signal (``long``/``short``/``flat``): makes this a target signal."""
    position_size: int | None = None
    time: datetime | None = None
    comment: str | None = None
    id_derived: bool = False

    @property
    def is_target(self) -> bool:
        """Target signals converge every account to the strategy's stated position (self-healing)."""
        return self.position is not None and self.action in ("buy", "sell")


_validator: jsonschema.Draft7Validator | None = None


def _schema_validator() -> jsonschema.Draft7Validator:
    global _validator
    if _validator is None:
        _validator = jsonschema.Draft7Validator(schemas.load(schemas.SIGNAL_FILE))
    return _validator


# The fast check below restates schemas/signal.schema.json by hand (tests/test_signal_fastpath.py proves it agrees
# with the schema and pins these constants to it). It only ever says "certainly valid"; anything else goes to
# jsonschema, which decides and words the error, so a gap here can cost speed but never change an answer.
_TICKER = re.compile(r"^([A-Z0-9_]+:)?[A-Z0-9]+!?$")
_QUANTITY = re.compile(r"^[1-9][0-9]{0,5}$")
_PRICE = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_SIZE = re.compile(r"^[0-9]{1,6}$")
_TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:?[0-9]{2})$")
_ACTIONS = frozenset(("buy", "sell", "exit", "cancel"))
_ORDER_TYPES = frozenset(("market", "limit", "stop"))
_POSITIONS = frozenset(("long", "short", "flat"))
_MAX_CONTRACTS = 100000


def _ok_quantity(v: Any) -> bool:
    t = type(v)  # exact types: bool is an int subclass and must not pass as one
    if t is int:
        return 1 <= v <= _MAX_CONTRACTS
    return t is str and _QUANTITY.search(v) is not None


def _ok_price(v: Any) -> bool:
    t = type(v)
    if t is int or t is float:
        return v > 0
    return t is str and _PRICE.search(v) is not None


def _ok_size(v: Any) -> bool:
    t = type(v)
    if t is int:
        return 0 <= v <= _MAX_CONTRACTS
    return t is str and _SIZE.search(v) is not None


_FIELD_OK: dict[str, Any] = {
    "strategy": lambda v: type(v) is str and 1 <= len(v) <= 64,
    "ticker": lambda v: type(v) is str and 2 <= len(v) <= 40 and _TICKER.search(v) is not None,
    "action": lambda v: type(v) is str and v in _ACTIONS,
    "quantity": _ok_quantity,
    "order_type": lambda v: type(v) is str and v in _ORDER_TYPES,
    "price": _ok_price,
    "position": lambda v: type(v) is str and v in _POSITIONS,
    "position_size": _ok_size,
    "id": lambda v: type(v) is str and 1 <= len(v) <= 128,
    "time": lambda v: type(v) is str and _TIME.search(v) is not None,
    "comment": lambda v: type(v) is str and len(v) <= 500,
}


def _certainly_valid(body: dict[str, Any]) -> bool:
    """The schema check for bodies that pass, in microseconds (jsonschema: 60-150 us); False: "ask jsonschema"."""
    for key, value in body.items():
        ok = _FIELD_OK.get(key)
        if ok is None or not ok(value):
            return False
    if "strategy" not in body or "ticker" not in body or "action" not in body:
        return False
    if body["action"] in ("buy", "sell") and "quantity" not in body:
        return False
    if body.get("order_type") in ("limit", "stop") and "price" not in body:
        return False
    if body.get("position") in ("long", "short") and "position_size" not in body:
        return False
    return True


def schema_errors(body: dict[str, Any]) -> list[jsonschema.ValidationError]:
    """Every schema violation of a (secret-free, normalized) body, from jsonschema itself."""
    return list(_schema_validator().iter_errors(body))


def _json_path(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def derive_signal_id(body: Mapping[str, Any]) -> str:
    """``sig-`` + 16 hex of SHA-256 over the canonical JSON of the body (secret excluded)."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "secret"}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False, default=str)
    return "sig-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_signal(obj: Any) -> Signal:
    """Validate and normalize a webhook body; raises SignalError naming the JSON path and the fix."""
    if not isinstance(obj, Mapping):
        raise SignalError(f"$: a signal must be a JSON object, got {type(obj).__name__}")
    body = {k: v for k, v in obj.items() if k != "secret"}
    for key in _NORMALIZE_LOWER:
        if isinstance(body.get(key), str):
            body[key] = body[key].strip().lower()
    if isinstance(body.get("ticker"), str):
        body["ticker"] = body["ticker"].strip().upper()
    errors = [] if _certainly_valid(body) else schema_errors(body)
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        path = _json_path(best.absolute_path)
        if best.validator == "additionalProperties":
            allowed = ", ".join(schemas.load(schemas.SIGNAL_FILE)["properties"])
            raise SignalError(f"{path}: {best.message} (allowed: {allowed})")
        raise SignalError(f"{path}: {best.message}")
    quantity = body.get("quantity")
    size = body.get("position_size")
    price = body.get("price")
    if isinstance(price, float) and not math.isfinite(price):
        # JSON Schema compares NaN with nothing, so `exclusiveMinimum: 0` lets it through; a NaN or infinite limit
        # price must never reach a broker.
        raise SignalError(f"$.price: {price!r} is not a finite number")
    when = body.get("time")
    time = None
    if when is not None:
        try:
            time = datetime.fromisoformat(when).astimezone(timezone.utc)
        except ValueError:
            raise SignalError(f"$.time: {when!r} is not an ISO-8601 time") from None
    return Signal(
        id=body["id"] if "id" in body else derive_signal_id(obj),
        strategy=body["strategy"],
        ticker=body["ticker"],
        action=body["action"],
        quantity=None if quantity is None else int(quantity),
        order_type=body.get("order_type", "market"),
        price=None if price is None else Decimal(str(price)),
        position=body.get("position"),
        position_size=None if size is None else int(size),
        time=time,
        comment=body.get("comment"),
        id_derived="id" not in body,
    )
