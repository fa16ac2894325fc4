"""Broker connectors behind one normalized async interface (see ``brokers.base``).

Importing the package registers every built-in connector with the type registry, so
``make_connector(broker_doc)`` finds the class for ``broker_doc.type``.
"""

from __future__ import annotations

import importlib
import importlib.util

from brokers.base import (
    AccountSnapshot,
    AuthError,
    BrokerError,
    BrokerEvent,
    BrokerUnavailable,
    ConnectionEvent,
    Connector,
    Fill,
    FillEvent,
    Order,
    OrderEvent,
    OrderRejected,
    OrderRequest,
    OrderStatus,
    OrderType,
    OutcomeUnknown,
    Position,
    RateLimited,
    Side,
    connector_class,
    make_connector,
    register,
    registered_types,
)

__all__ = [
    "AccountSnapshot", "AuthError", "BrokerError", "BrokerEvent", "BrokerUnavailable", "ConnectionEvent",
    "Connector", "Fill", "FillEvent", "Order", "OrderEvent", "OrderRejected", "OrderRequest", "OrderStatus",
    "OrderType", "OutcomeUnknown", "Position", "RateLimited", "Side", "connector_class", "make_connector",
    "register", "registered_types",
]

CONNECTOR_MODULES = ("paper", "tradovate", "projectx")

for _name in CONNECTOR_MODULES:
    if importlib.util.find_spec(f"brokers.{_name}") is not None:
        importlib.import_module(f"brokers.{_name}")
