"""The decision record: one JSON object, the same in the CLI, the journal, the API and the dashboard.

``Decision.to_json()`` is the contract::

    {"signal_id", "strategy", "accepted", "rule", "blocked_by", "reason", "order_type", "price",
     "orders": [{"account", "broker", "contract", "side", "quantity", "intent", "client_order_id"}],
     "skipped": [{"account", "reason", "by"}],
     "cancel": [{"account", "broker", "instrument"}],
     "ruleset": {"content_hash", "generation"}}

``accepted`` is true exactly when at least one order results. ``cancel`` is non-empty only for ``action: cancel``:
the engine places nothing and tells the service where to cancel working orders (``accepted`` stays false, so
nothing is dispatched as a new order). Entries carry the margin they reserve (``Order.margin_usd``, not in the
JSON) so that the service can count in-flight entries as exposure.

``ruleset`` names the rules that decided, because they hot-reload: an auditor asking why Monday's signal went to an
account must know whether today's rules or Monday's decided it. ``content_hash`` (``RuleSet.content_hash``, the
same across restarts) is the identity; the engine sets it, so every decision has it, the CLI's included.
``generation`` is the watcher's number for that rule set in the running process (which reload: the reload records
in the journal carry both), known only to whoever pinned the generation, so it is given to ``to_json`` rather than
kept on the decision; null where no watcher is involved (``multibroker decide``). Records journaled before this
field existed have no ``ruleset``: readers treat it as optional.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


def client_order_id(signal_id: str, account: str, leg: str) -> str:
    """Deterministic per (signal, account, leg): a retried dispatch reuses it and the broker deduplicates.

    ``mb-`` + 29 hex digits of SHA-256 (116 bits): 32 characters of [0-9a-f-], within every broker's limit.
    (Hex rather than base32: base64.b32encode is pure Python and cost more than the rest of the id.)
    """
    return "mb-" + hashlib.sha256(f"{signal_id}\x1f{account}\x1f{leg}".encode()).hexdigest()[:29]


def ruleset_ref(content_hash: str | None, generation: int | None) -> dict[str, Any]:
    """The ``ruleset`` member of a decision record, for records made without a ``Decision`` (the runtime's
    flattens): one shape wherever a record is written."""
    return {"content_hash": content_hash, "generation": generation}


@dataclass(frozen=True)
class Order:
    account: str
    broker: str
    contract: str
    side: str
    """``buy`` or ``sell``."""
    quantity: int
    intent: str
    """``entry`` (increases the absolute position) or ``exit`` (reduces it)."""
    client_order_id: str
    margin_usd: Decimal = Decimal(0)
    """Margin an entry reserves (quantity x the broker's margin per contract, buffer excluded); 0 for exits."""

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "broker": self.broker, "contract": self.contract, "side": self.side,
                "quantity": self.quantity, "intent": self.intent, "client_order_id": self.client_order_id}


@dataclass(frozen=True)
class Skip:
    account: str
    reason: str
    by: str
    """The rule, limit or check that excluded the account (``margin``, ``connection``, ``no-late-entries``...)."""

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "reason": self.reason, "by": self.by}


@dataclass(frozen=True)
class Cancel:
    account: str
    broker: str
    instrument: str

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "broker": self.broker, "instrument": self.instrument}


@dataclass(frozen=True)
class Decision:
    signal_id: str
    strategy: str
    rule: str | None
    blocked_by: str | None
    reason: str
    orders: tuple[Order, ...] = ()
    skipped: tuple[Skip, ...] = ()
    order_type: str = "market"
    price: Decimal | None = None
    cancel: tuple[Cancel, ...] = field(default=())
    content_hash: str | None = None
    """``RuleSet.content_hash`` of the rules that decided (``Engine.decide`` sets it); None for a hand-made one."""

    @property
    def accepted(self) -> bool:
        return bool(self.orders)

    def to_json(self, generation: int | None = None) -> dict[str, Any]:
        """The record; ``generation``: the number of the watcher's generation that decided (see the module)."""
        return {
            "signal_id": self.signal_id,
            "strategy": self.strategy,
            "accepted": self.accepted,
            "rule": self.rule,
            "blocked_by": self.blocked_by,
            "reason": self.reason,
            "order_type": self.order_type,
            "price": None if self.price is None else str(self.price),
            "orders": [o.to_json() for o in self.orders],
            "skipped": [s.to_json() for s in self.skipped],
            "cancel": [c.to_json() for c in self.cancel],
            "ruleset": ruleset_ref(self.content_hash, generation),
        }

    def dumps(self, generation: int | None = None, **kwargs: Any) -> str:
        return json.dumps(self.to_json(generation), **kwargs)
