"""Checking rule documents: each against its JSON Schema, then the whole set against itself.

Two passes, because the schema can only judge one document at a time: names that must resolve to other documents,
uniqueness, unreachable routing rules and similar set-wide facts are checked in ``check_set``. Both passes collect
``Diagnostic``s pointing at the offending value; nothing here prints, raises on bad input, or echoes a credential.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from typing import Any, Iterable, Iterator, Sequence

from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

import schemas
from engine.catalog import BUILTIN
from engine.diagnostics import Diagnostic
from engine.yamlsource import SourceDoc

SECRET_FIELDS = ("credentials", "strategy_secrets")
"""Mappings whose values are ``${ENV_VAR}`` references; their values are never quoted back in a message."""

_PATTERN_HINTS = {
    "^[A-Za-z0-9][A-Za-z0-9_.-]*$": "not a valid name (letters, digits, '_', '.', '-'; starting with a letter or digit)",
    "^[A-Z][A-Z0-9]{0,5}$": "not an instrument root (upper case, e.g. ES, MES)",
    "^([01][0-9]|2[0-3]):[0-5][0-9]$": "not a valid HH:MM time (24-hour clock, two digits each, e.g. 09:30, 15:55)",
    "^[1-9][0-9]*[mh]$": "not a duration such as 5m or 1h",
    "^([A-Z][A-Z0-9]{0,5}|default)$": "not an instrument root (upper case, e.g. ES) or 'default'",
    "^https?://": "not an http(s):// URL",
    "^wss?://": "not a ws(s):// URL",
    "^(https?|wss?)://": "not an http(s):// or ws(s):// URL",
}


@lru_cache(maxsize=1)
def _registry() -> Registry:
    resources = [(schemas.load(f)["$id"], Resource.from_contents(schemas.load(f))) for f in schemas.all_files()]
    return Registry().with_resources(resources)


@lru_cache(maxsize=None)
def validator_for(kind: str) -> Draft7Validator:
    return Draft7Validator(schemas.load(schemas.KIND_FILES[kind]), registry=_registry())


@lru_cache(maxsize=None)
def file_validator(filename: str) -> Draft7Validator:
    return Draft7Validator(schemas.load(filename), registry=_registry())


def shown(value: Any) -> str:
    """A short, safe rendering of a YAML value for a message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = json.dumps(value, default=str) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def _field_path(path: Sequence[Any]) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def _in_secret(path: Sequence[Any]) -> bool:
    return any(step in SECRET_FIELDS for step in path if isinstance(step, str))


def _render(doc: SourceDoc, err: ValidationError) -> Iterator[Diagnostic]:
    path = list(err.absolute_path)
    where = _field_path(path)
    prefix = f"{where}: " if where else ""
    v = err.validator
    if "propertyNames" in err.absolute_schema_path:
        # jsonschema reports a bad key as an error of the nested keyword (pattern), at the mapping's path.
        hint = _PATTERN_HINTS.get(str(err.validator_value), "not allowed here")
        yield doc.diag([*path, err.instance], f"{prefix}key {shown(err.instance)} is {hint}", key=True)
        return
    if _in_secret(path) and v != "additionalProperties":
        yield doc.diag(path, f"{prefix}must be an ${{ENV_VAR}} reference such as ${{MY_BROKER_PASSWORD}}; "
                             "a literal secret is not allowed in rule files (value not shown)")
        return
    if v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        yield doc.diag(path, f"{prefix}missing required field '{missing}'")
    elif v == "additionalProperties":
        schema = err.schema if isinstance(err.schema, dict) else {}
        known = list(schema.get("properties", {}))
        instance = err.instance if isinstance(err.instance, dict) else {}
        for key in instance:
            if key in known:
                continue
            near = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f" (did you mean '{near[0]}'?)" if near else f" (allowed: {', '.join(known)})"
            yield doc.diag([*path, key], f"{prefix}unknown field '{key}'{suggestion}", key=True)
    elif v == "enum":
        options = ", ".join(str(o) for o in err.validator_value)
        near = difflib.get_close_matches(str(err.instance), [str(o) for o in err.validator_value], n=1)
        suggestion = f" (did you mean '{near[0]}'?)" if near else ""
        yield doc.diag(path, f"{prefix}{shown(err.instance)} is not one of: {options}{suggestion}")
    elif v == "const":
        yield doc.diag(path, f"{prefix}must be {shown(err.validator_value)}, got {shown(err.instance)}")
    elif v == "type":
        expected = err.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        expected = {"object": "mapping", "array": "list"}.get(expected, expected)
        yield doc.diag(path, f"{prefix}expected a {expected}, got {_json_type(err.instance)} {shown(err.instance)}")
    elif v == "pattern":
        hint = _PATTERN_HINTS.get(err.validator_value, f"does not match {err.validator_value}")
        yield doc.diag(path, f"{prefix}{shown(err.instance)} is {hint}" if hint in _PATTERN_HINTS.values()
                       else f"{prefix}{shown(err.instance)} {hint}")
    elif v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        yield doc.diag(path, f"{prefix}must be {op} {err.validator_value}, got {shown(err.instance)}")
    elif v == "minItems":
        yield doc.diag(path, f"{prefix}must have at least {err.validator_value} entr{'y' if err.validator_value == 1 else 'ies'}")
    elif v == "maxItems":
        yield doc.diag(path, f"{prefix}must have at most {err.validator_value} entries")
    elif v == "uniqueItems":
        yield doc.diag(path, f"{prefix}has duplicate entries")
    elif v in ("minLength", "maxLength"):
        op = "at least" if v == "minLength" else "at most"
        yield doc.diag(path, f"{prefix}must be {op} {err.validator_value} characters long")
    elif v in ("oneOf", "anyOf"):
        yield from _render_alternatives(doc, err, path, prefix)
    elif v == "not":
        yield doc.diag(path, f"{prefix}{shown(err.instance)} is not allowed here")
    else:
        yield doc.diag(path, f"{prefix}{err.message}")


def _render_alternatives(doc: SourceDoc, err: ValidationError, path: list[Any], prefix: str) -> Iterator[Diagnostic]:
    alternatives = err.validator_value
    required_sets: list[list[str]] = [alt["required"] for alt in alternatives
                                      if isinstance(alt, dict) and set(alt) == {"required"}]
    if len(required_sets) == len(alternatives):
        fields = ", ".join(name for req in required_sets for name in req)
        present = [name for req in required_sets for name in req if isinstance(err.instance, dict) and name in err.instance]
        if err.validator == "oneOf" and len(present) > 1:
            yield doc.diag(path, f"{prefix}set only one of: {fields} (found {', '.join(present)})")
        else:
            word = "exactly one" if err.validator == "oneOf" else "at least one"
            yield doc.diag(path, f"{prefix}needs {word} of: {fields}")
        return
    # "a value or a list of values" style alternatives: report the most relevant branch.
    types: list[str] = []
    for alt in alternatives:
        if isinstance(alt, dict) and "type" in alt:
            types.append(str({"array": "list", "object": "mapping"}.get(alt["type"], alt["type"])))
    if err.context:
        same_type = [c for c in err.context if c.validator != "type"]
        if same_type:
            best = min(same_type, key=lambda c: len(list(c.relative_schema_path)))
            yield from _render(doc, best)
            return
    yield doc.diag(path, f"{prefix}expected {' or '.join(dict.fromkeys(types)) or 'a different value'}, "
                         f"got {_json_type(err.instance)} {shown(err.instance)}")


def check_schema(doc: SourceDoc) -> list[Diagnostic]:
    """Validate one document against the schema of its ``kind``. Sets ``doc.schema_ok``."""
    data = doc.data
    if not isinstance(data, dict):
        return [Diagnostic(doc.file, doc.line, doc.column, "document", doc.name,
                           f"a rule document must be a mapping with a 'kind', got {_json_type(data)}")]
    kind = data.get("kind")
    if kind is None:
        return [doc.diag([], f"missing required field 'kind' (one of: {', '.join(schemas.KIND_FILES)})")]
    if not isinstance(kind, str) or kind not in schemas.KIND_FILES:
        hint = difflib.get_close_matches(str(kind), list(schemas.KIND_FILES), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return [doc.diag(["kind"], f"kind: unknown kind {shown(kind)}; one of: {', '.join(schemas.KIND_FILES)}{suggestion}")]
    problems: list[Diagnostic] = []
    for err in validator_for(kind).iter_errors(data):
        problems.extend(_render(doc, err))
    doc.schema_ok = not problems
    return sorted(set(problems))


# ---------------------------------------------------------------------------------------------------------------
# Set-wide checks
# ---------------------------------------------------------------------------------------------------------------

def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _unknown(what: str, value: str, known: Iterable[str]) -> str:
    known = sorted(known)
    hint = difflib.get_close_matches(value, known, n=1)
    if hint:
        return f"unknown {what} '{value}' (did you mean '{hint[0]}'?)"
    return f"unknown {what} '{value}'" + (f" (known: {', '.join(known)})" if known else f" (no {what} is defined)")


def _hhmm_minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def check_set(docs: Sequence[SourceDoc]) -> list[Diagnostic]:
    """Cross-document checks over schema-valid documents: names, references, reachability, consistency."""
    valid = [d for d in docs if d.schema_ok]
    by_kind: dict[str, list[SourceDoc]] = {}
    problems: list[Diagnostic] = []
    for doc in valid:
        by_kind.setdefault(doc.data["kind"], []).append(doc)

    # Names are unique per kind.
    for kind, group in by_kind.items():
        seen: dict[str, SourceDoc] = {}
        for doc in group:
            name = doc.data["name"]
            if name in seen:
                first = seen[name]
                problems.append(doc.diag(["name"], f"duplicate {kind} name '{name}' (first defined at "
                                                   f"{first.file}:{first.line}:{first.column})"))
            else:
                seen[name] = doc

    roots = set(BUILTIN)
    for doc in by_kind.get("Instrument", []):
        roots.add(doc.data["name"])
        if doc.data["name"] not in BUILTIN:
            for required in ("tick_size", "tick_value"):
                if required not in doc.data:
                    problems.append(doc.diag([], f"new instrument '{doc.data['name']}' needs '{required}' "
                                                 "(only built-in instruments may omit it)"))
    brokers = {d.data["name"]: d for d in by_kind.get("Broker", [])}
    accounts = {d.data["name"]: d for d in by_kind.get("Account", [])}
    followed = {s for d in accounts.values() for s in d.data.get("strategies", [])}

    def check_roots(doc: SourceDoc, path: list[Any], values: Any) -> None:
        items = values if isinstance(values, list) else [values]
        for i, root in enumerate(items):
            if root not in roots:
                where = [*path, i] if isinstance(values, list) else path
                problems.append(doc.diag(where, f"{_field_path(where)}: " + _unknown("instrument", root, roots)))

    def check_accounts(doc: SourceDoc, path: list[Any], names: list[str]) -> None:
        for i, name in enumerate(names):
            if name not in accounts:
                problems.append(doc.diag([*path, i], f"{_field_path([*path, i])}: " + _unknown("account", name, accounts)))

    for doc in brokers.values():
        for table in ("commissions", "margins"):
            for root in doc.data.get(table, {}) or {}:
                if root != "default" and root not in roots:
                    problems.append(doc.diag([table, root], f"{table}: " + _unknown("instrument", root, roots), key=True))

    for doc in accounts.values():
        broker = doc.data["broker"]
        if broker not in brokers:
            problems.append(doc.diag(["broker"], "broker: " + _unknown("broker", broker, brokers)))
        if "instruments" in doc.data:
            check_roots(doc, ["instruments"], doc.data["instruments"])
            bdoc = brokers.get(broker)
            if bdoc is not None:
                margins = bdoc.data.get("margins", {}) or {}
                for i, root in enumerate(doc.data["instruments"]):
                    if root in roots and root not in margins and "default" not in margins:
                        problems.append(doc.diag(["instruments", i], f"instruments[{i}]: broker '{broker}' has no "
                                                 f"margin for {root} and no default, so no entry could pass the "
                                                 "margin check; add it under the broker's margins"))

    rule_names: dict[str, tuple[SourceDoc, int]] = {}
    catch_all: tuple[SourceDoc, int] | None = None
    for doc in by_kind.get("Routing", []):
        for i, rule in enumerate(doc.data["rules"]):
            base = ["rules", i]
            name = rule["name"]
            if name in rule_names:
                first_doc, first_i = rule_names[name]
                line, col = first_doc.position(["rules", first_i, "name"])
                problems.append(doc.diag([*base, "name"], f"duplicate routing rule name '{name}' (first defined "
                                                          f"at {first_doc.file}:{line}:{col})"))
            else:
                rule_names[name] = (doc, i)
            if catch_all is not None:
                cdoc, ci = catch_all
                problems.append(doc.diag([*base, "name"], f"rule '{name}' can never apply: rule "
                                         f"'{cdoc.data['rules'][ci]['name']}' above it matches every signal"))
            match = rule.get("match", {}) or {}
            if not match and catch_all is None:
                catch_all = (doc, i)
            if "instrument" in match:
                check_roots(doc, [*base, "match", "instrument"], match["instrument"])
            if "accounts" in rule:
                check_accounts(doc, [*base, "accounts"], rule["accounts"])
            for j, bname in enumerate(rule.get("brokers", []) or []):
                if bname not in brokers:
                    problems.append(doc.diag([*base, "brokers", j], f"brokers[{j}]: " + _unknown("broker", bname, brokers)))
            if "select" in rule and rule["mode"] != "best":
                problems.append(doc.diag([*base, "select"], "select: only applies to mode 'best'; "
                                         "a mirror rule sends to every eligible account"))
            if "accounts" not in rule and "brokers" not in rule:
                strategies = _as_list(match.get("strategy"))
                for j, strategy in enumerate(strategies):
                    if strategy not in followed:
                        where = [*base, "match", "strategy"] + ([j] if isinstance(match.get("strategy"), list) else [])
                        problems.append(doc.diag(where, f"no account follows strategy '{strategy}', so this rule has no "
                                                        "target accounts; add it to an account's strategies or list "
                                                        "accounts/brokers on the rule"))
        for strategy in doc.data.get("strategy_secrets", {}) or {}:
            if strategy not in followed:
                problems.append(doc.diag(["strategy_secrets", strategy],
                                         "strategy_secrets: " + _unknown("strategy", strategy, followed), key=True))

    buffer: tuple[SourceDoc, Any] | None = None
    limit_names: dict[str, SourceDoc] = {}
    for doc in by_kind.get("Risk", []):
        if "margin_buffer_pct" in doc.data:
            value = doc.data["margin_buffer_pct"]
            if buffer is not None and buffer[1] != value:
                problems.append(doc.diag(["margin_buffer_pct"], f"margin_buffer_pct: {value} conflicts with "
                                         f"{buffer[1]} set in Risk/{buffer[0].data['name']}; set it in one place"))
            buffer = buffer or (doc, value)
        for i, limit in enumerate(doc.data.get("limits", []) or []):
            base = ["limits", i]
            if limit["name"] in limit_names:
                problems.append(doc.diag([*base, "name"], f"duplicate risk limit name '{limit['name']}'"))
            limit_names.setdefault(limit["name"], doc)
            if "instrument" in limit:
                check_roots(doc, [*base, "instrument"], limit["instrument"])
            if "accounts" in limit:
                if limit["scope"] != "account":
                    problems.append(doc.diag([*base, "accounts"], "accounts: only applies to scope 'account'"))
                check_accounts(doc, [*base, "accounts"], limit["accounts"])
            loss_keys = [k for k in ("max_daily_loss", "max_daily_loss_pct") if k in limit]
            if len(loss_keys) > 1:
                problems.append(doc.diag([*base, loss_keys[1]], "set either max_daily_loss or max_daily_loss_pct, "
                                                                "not both, in one limit"))
            if "on_breach" in limit and not loss_keys:
                problems.append(doc.diag([*base, "on_breach"], "on_breach: only applies to loss limits "
                                                               "(max_daily_loss, max_daily_loss_pct)"))

    schedule_names: dict[str, SourceDoc] = {}
    for doc in by_kind.get("Schedule", []):
        for i, rule in enumerate(doc.data["rules"]):
            base = ["rules", i]
            if rule["name"] in schedule_names:
                problems.append(doc.diag([*base, "name"], f"duplicate schedule rule name '{rule['name']}'"))
            schedule_names.setdefault(rule["name"], doc)
            action = rule["action"]
            if action == "flatten" and "between" in rule:
                problems.append(doc.diag([*base, "between"], "between: a flatten happens at an instant; "
                                         "use 'at' or 'before_close' (block_entries takes a window)"))
            if action == "block_entries" and "at" in rule:
                problems.append(doc.diag([*base, "at"], "at: block_entries needs a window; use "
                                         "between: [start, end] or before_close"))
            if "between" in rule:
                start, end = rule["between"]
                if _hhmm_minutes(start) == _hhmm_minutes(end):
                    problems.append(doc.diag([*base, "between", 1], f"between[1]: the window [{start}, {end}) is "
                                             "empty; start and end must differ"))
            if "before_close" in rule:
                text = rule["before_close"]
                minutes = int(text[:-1]) * (60 if text.endswith("h") else 1)
                if minutes > 23 * 60:
                    problems.append(doc.diag([*base, "before_close"], f"before_close: {text} is longer than a "
                                             "trading session (at most 23h)"))
            if "accounts" in rule:
                check_accounts(doc, [*base, "accounts"], rule["accounts"])
            for j, strategy in enumerate(rule.get("strategies", []) or []):
                if strategy not in followed:
                    problems.append(doc.diag([*base, "strategies", j], f"strategies[{j}]: "
                                             + _unknown("strategy", strategy, followed)))
    return problems
