"""Webhook signals: validated against ``schemas/signal.schema.json`` and normalized into a frozen ``Signal``.

The secret is dropped here and never reaches a Signal, a log line or the signal id. A signal without an ``id`` gets
one derived from its content (``sig-`` + 16 hex of the SHA-256 of its canonical JSON), so a TradingView alert
that fires twice with the same body is recognised as the same signal.
"""

from __future__ import annotations

import hashlib
import json
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
    errors = list(_schema_validator().iter_errors(body))
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
