"""The schemas themselves: draft-07, an $id each, hover text everywhere, strict objects, kind dispatch."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from jsonschema import Draft7Validator
from ruamel.yaml import YAML

import schemas
from engine.validate import file_validator
from tests.conftest import EXAMPLE_RULES


def _objects(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for key, value in node.items():
            if key not in ("if", "then", "else", "not"):  # conditions, not shapes an editor completes
                yield from _objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{path}/{i}")


@pytest.mark.parametrize("filename", schemas.all_files())
def test_schema_is_draft7_with_id(filename: str) -> None:
    schema = schemas.load(filename)
    Draft7Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["$id"].endswith("/" + filename)


@pytest.mark.parametrize("filename", schemas.all_files())
def test_every_property_has_a_description(filename: str) -> None:
    missing = [f"{path}/{name}" for path, obj in _objects(schemas.load(filename))
               for name, prop in obj.get("properties", {}).items() if "description" not in prop]
    assert missing == []


@pytest.mark.parametrize("filename", [f for f in schemas.all_files() if f != schemas.RULES_FILE])
def test_objects_reject_unknown_fields(filename: str) -> None:
    loose = [path for path, obj in _objects(schemas.load(filename))
             if "properties" in obj and obj.get("additionalProperties") is not False]
    assert loose == []


def _example_documents() -> list[dict]:
    docs = []
    for path in sorted(EXAMPLE_RULES.glob("*.yaml")):
        docs.extend(d for d in YAML(typ="safe").load_all(path.read_text()) if d)
    return docs


def test_top_level_schema_dispatches_on_kind() -> None:
    """What an editor sees through the modeline agrees with the validator."""
    validator = file_validator(schemas.RULES_FILE)
    for doc in _example_documents():
        assert list(validator.iter_errors(doc)) == [], doc["name"]
    bad_broker = {"kind": "Broker", "name": "x", "type": "paper", "comission": {}}
    assert any(e.validator == "additionalProperties" for e in validator.iter_errors(bad_broker))
    assert list(validator.iter_errors({"kind": "Nope"}))
    assert list(validator.iter_errors({"kind": "Account", "name": "a"}))


def test_example_files_carry_the_modeline() -> None:
    for path in EXAMPLE_RULES.glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=../schemas/rules.schema.json", path


def test_signal_schema_accepts_tradingview_bodies() -> None:
    validator = file_validator(schemas.SIGNAL_FILE)
    good = {"secret": "s", "strategy": "es-scalper", "ticker": "CME_MINI:ES1!", "action": "buy", "quantity": "2",
            "order_type": "market", "price": 5123.25, "position": "long", "position_size": 2,
            "id": "k1", "time": "2026-03-09T14:30:00Z"}
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors({**good, "action": "buy", "quantity": 0}))
    missing_qty = {k: v for k, v in good.items() if k != "quantity"}
    assert list(validator.iter_errors(missing_qty))
    assert list(validator.iter_errors({**good, "quantty": 2}))
    assert list(validator.iter_errors({**good, "time": "2026-03-09T14:30:00"}))  # naive: refused
    assert list(validator.iter_errors({"strategy": "s", "ticker": "ES1!", "action": "exit"})) == []
