"""Loading a rules directory into one validated ``RuleSet`` (or every reason why not).

The loader is all-or-nothing on purpose: a rule set with one bad document is never partially applied, because a
half-loaded risk file is worse than none. ``LoadResult.ruleset`` is set only when there are no diagnostics at all.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Sequence

from engine.catalog import BUILTIN, Catalog, Instrument, merge_instrument
from engine.diagnostics import Diagnostic
from engine.model import (
    Account,
    Broker,
    Limit,
    Location,
    RateLimit,
    Risk,
    Routing,
    RoutingRule,
    RuleSet,
    Schedule,
    ScheduleRule,
)
from engine.validate import check_schema, check_set
from engine.yamlsource import SourceDoc, discover, read_documents

DEFAULT_RULES_DIR = "rules"


@dataclass
class LoadResult:
    ruleset: RuleSet | None
    diagnostics: list[Diagnostic]
    files: list[str] = field(default_factory=list)
    documents: int = 0
    content_hash: str = ""

    @property
    def ok(self) -> bool:
        return self.ruleset is not None and not self.diagnostics


def display_path(path: Path) -> str:
    """Paths relative to the working directory when below it, as editors and CI logs expect."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _hash_names(files: Sequence[Path]) -> dict[Path, str]:
    """Each file's name as the content hash covers it: relative to the directory holding them all, so that the
    hash is the rules' identity wherever they are read from (the service, ``multibroker decide`` in another
    working directory, an absolute ``--rules``): decision records name their rules by it."""
    if not files:
        return {}
    resolved = {path: path.resolve() for path in files}
    root = Path(os.path.commonpath([p.parent for p in resolved.values()]))
    return {path: real.relative_to(root).as_posix() for path, real in resolved.items()}


def load_rules(paths: Sequence[str | Path] | str | Path = DEFAULT_RULES_DIR) -> LoadResult:
    """Read, validate and build every rule document under ``paths`` (files or directories)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files, problems = discover(paths)
    docs: list[SourceDoc] = []
    digest = hashlib.sha256()
    names = _hash_names(files)
    for path in files:
        shown = display_path(path)
        file_docs, file_problems, raw = read_documents(path, shown)
        digest.update(names[path].encode() + b"\0" + hashlib.sha256(raw).digest())
        docs.extend(file_docs)
        problems.extend(file_problems)
    for doc in docs:
        problems.extend(check_schema(doc))
    problems.extend(check_set(docs))
    content_hash = digest.hexdigest()
    shown_files = [display_path(p) for p in files]
    if not files and not problems:
        where = ", ".join(str(p) for p in paths)
        problems.append(Diagnostic(where, 1, 1, "YAML", "file", "no rule files (*.yaml, *.yml) found"))
    problems = sorted(set(problems), key=lambda d: (d.file, d.line, d.column, d.message))
    ruleset = None if problems else build_ruleset(docs, content_hash, shown_files)
    return LoadResult(ruleset, problems, shown_files, len(docs), content_hash)


# ---------------------------------------------------------------------------------------------------------------
# Building typed documents (only ever called on a fully valid set)
# ---------------------------------------------------------------------------------------------------------------

def _dec(value: Any) -> Decimal:
    # str() first: YAML floats are binary; 0.59 must become Decimal("0.59"), not 0.58999999...
    return Decimal(str(value))


def _tuple(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(str(v) for v in (value if isinstance(value, list) else [value]))


def _plain(value: Any) -> Any:
    """ruamel's commented containers and scalar subclasses as plain Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def _env_name(reference: str) -> str:
    return reference[2:-1]  # "${NAME}" -> "NAME" (the schema guarantees the shape)


def _loc(doc: SourceDoc, path: Sequence[Any] = ()) -> Location:
    line, column = doc.position(path)
    return Location(doc.file, line, column)


def build_ruleset(docs: Iterable[SourceDoc], content_hash: str, files: Sequence[str]) -> RuleSet:
    brokers: dict[str, Broker] = {}
    accounts: dict[str, Account] = {}
    routing: list[Routing] = []
    risks: list[Risk] = []
    schedules: list[Schedule] = []
    instruments: dict[str, Instrument] = {}
    for doc in docs:
        d = _plain(doc.data)
        kind, name = d["kind"], d["name"]
        if kind == "Broker":
            rate = d.get("rate_limit")
            brokers[name] = Broker(
                name=name,
                type=d["type"],
                environment=d.get("environment", "demo"),
                credentials={k: _env_name(v) for k, v in (d.get("credentials") or {}).items()},
                rate_limit=RateLimit(int(rate["requests"]), float(rate["per_seconds"])) if rate else None,
                commissions={k: _dec(v) for k, v in (d.get("commissions") or {}).items()},
                margins={k: _dec(v) for k, v in (d.get("margins") or {}).items()},
                reconcile_every_seconds=int(d.get("reconcile_every_seconds", 60)),
                endpoints=dict(d.get("endpoints") or {}),
                options={"paper": dict(d.get("paper") or {}), "app": dict(d.get("app") or {}),
                         "projectx": dict(d.get("projectx") or {})},
                source=_loc(doc),
            )
        elif kind == "Account":
            accounts[name] = Account(
                name=name,
                broker=d["broker"],
                broker_account=str(d["broker_account"]),
                capital=_dec(d["capital"]),
                strategies=tuple(d.get("strategies") or ()),
                size_multiplier=_dec(d.get("size_multiplier", 1)),
                instruments=_tuple(d.get("instruments")),
                catch_up=bool(d.get("catch_up", False)),
                on_mismatch=d.get("on_mismatch", "adopt"),
                source=_loc(doc),
            )
        elif kind == "Instrument":
            instruments[name] = merge_instrument(BUILTIN.get(name), name, d)
        elif kind == "Routing":
            rules = tuple(
                RoutingRule(
                    name=r["name"],
                    strategies=_tuple((r.get("match") or {}).get("strategy")),
                    instruments=_tuple((r.get("match") or {}).get("instrument")),
                    mode=r["mode"],
                    select=tuple(r.get("select") or ()),
                    accounts=_tuple(r.get("accounts")),
                    brokers=_tuple(r.get("brokers")),
                    routing=name,
                    source=_loc(doc, ["rules", i]),
                )
                for i, r in enumerate(d["rules"])
            )
            secrets = {k: _env_name(v) for k, v in (d.get("strategy_secrets") or {}).items()}
            routing.append(Routing(name, rules, secrets, _loc(doc)))
        elif kind == "Risk":
            limits = tuple(
                Limit(
                    name=lim["name"],
                    scope=lim["scope"],
                    max_daily_loss=_dec(lim["max_daily_loss"]) if "max_daily_loss" in lim else None,
                    max_daily_loss_pct=_dec(lim["max_daily_loss_pct"]) if "max_daily_loss_pct" in lim else None,
                    max_contracts=int(lim["max_contracts"]) if "max_contracts" in lim else None,
                    instruments=_tuple(lim.get("instrument")),
                    accounts=_tuple(lim.get("accounts")),
                    on_breach=lim.get("on_breach", "halt_entries"),
                    risk=name,
                    source=_loc(doc, ["limits", i]),
                )
                for i, lim in enumerate(d.get("limits") or [])
            )
            buffer = _dec(d["margin_buffer_pct"]) if "margin_buffer_pct" in d else None
            risks.append(Risk(name, buffer, limits, _loc(doc)))
        elif kind == "Schedule":
            rules_s = []
            for i, r in enumerate(d["rules"]):
                before = r.get("before_close")
                minutes = None
                if before:
                    minutes = int(before[:-1]) * (60 if before.endswith("h") else 1)
                between = r.get("between")
                rules_s.append(ScheduleRule(
                    name=r["name"],
                    action=r["action"],
                    at=r.get("at"),
                    between=(between[0], between[1]) if between else None,
                    before_close_minutes=minutes,
                    days=tuple(r.get("days") or ("mon", "tue", "wed", "thu", "fri", "sat", "sun")),
                    strategies=_tuple(r.get("strategies")),
                    accounts=_tuple(r.get("accounts")),
                    schedule=name,
                    source=_loc(doc, ["rules", i]),
                ))
            schedules.append(Schedule(name, d.get("timezone", "America/New_York"), tuple(rules_s), _loc(doc)))
    return RuleSet(
        brokers=brokers,
        accounts=accounts,
        routing=tuple(routing),
        risks=tuple(risks),
        schedules=tuple(schedules),
        catalog=Catalog(instruments),
        content_hash=content_hash,
        files=tuple(files),
    )
