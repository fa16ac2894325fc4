"""Reconciliation: the ledger against the broker's positions and working orders, and what to do when they differ.

Runs per broker at start-up, after every reconnect and every ``reconcile_every_seconds``, at the rate limiter's
poll priority (orders and cancels go first). One pass per account: first fetch the broker's fills since the trading
day began and book any the service missed (an event lost during a drop), then compare positions contract by
contract. A contract with an order still in flight is left out of the comparison: its fill may simply not have
arrived yet, and calling that a mismatch would halt accounts for nothing.

Policy per account (``Account.on_mismatch``): ``adopt`` makes the ledger take the broker's position (booked to the
external bucket) and raises an alert; ``halt`` stops the account's entries until a later pass finds no mismatch
or an operator clears the halt. Every pass is journaled, matching or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

ADOPT = "adopt"
HALT = "halt"


@dataclass(frozen=True)
class Mismatch:
    contract: str
    ledger: int
    broker: int

    def as_dict(self) -> dict[str, Any]:
        return {"contract": self.contract, "ledger": self.ledger, "broker": self.broker}


def compare_positions(ledger: Mapping[str, int], broker: Mapping[str, int],
                      in_flux: Iterable[str] = ()) -> list[Mismatch]:
    """Contracts whose net quantity differs, skipping those with orders in flight (``in_flux``)."""
    skip = set(in_flux)
    out = []
    for contract in sorted(set(ledger) | set(broker)):
        if contract in skip:
            continue
        mine, theirs = ledger.get(contract, 0), broker.get(contract, 0)
        if mine != theirs:
            out.append(Mismatch(contract, mine, theirs))
    return out


def describe(mismatches: Iterable[Mismatch]) -> str:
    return "; ".join(f"{m.contract}: ledger {m.ledger:+d}, broker {m.broker:+d}" for m in mismatches)
