"""The JSON Schemas (draft-07) for rule documents and webhook signals, shipped as package data.

They live at the top of the repository so editors (yaml-language-server modelines) and pull-request checks can use
them directly; this module only finds and loads them for the validator.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent

KIND_FILES = {
    "Broker": "broker.schema.json",
    "Account": "account.schema.json",
    "Instrument": "instrument.schema.json",
    "Routing": "routing.schema.json",
    "Risk": "risk.schema.json",
    "Schedule": "schedule.schema.json",
}
RULES_FILE = "rules.schema.json"
SIGNAL_FILE = "signal.schema.json"


@lru_cache(maxsize=None)
def load(filename: str) -> dict[str, Any]:
    """The parsed schema in ``filename`` (cached: schemas do not change while a process runs)."""
    with open(SCHEMA_DIR / filename, encoding="utf-8") as fh:
        return json.load(fh)


def all_files() -> list[str]:
    return sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json"))
