"""The validator never crashes: arbitrary text and arbitrary documents only ever yield clean diagnostics."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from engine.loader import load_rules
from engine.yamlsource import parse_text

KINDS = ["Broker", "Account", "Instrument", "Routing", "Risk", "Schedule", "Other", 7, None]
FIELDS = ["kind", "name", "type", "broker", "broker_account", "capital", "strategies", "rules", "limits", "match",
          "mode", "select", "accounts", "brokers", "at", "between", "before_close", "days", "action", "scope",
          "max_daily_loss", "max_daily_loss_pct", "max_contracts", "instrument", "commissions", "margins",
          "credentials", "rate_limit", "timezone", "instruments", "size_multiplier", "paper", "endpoints"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["15:50", "ES", "MES", "paper", "mirror", "best",
                                                           "${X}", "apex-1", "paper-fast", "5m", "flatten"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), inner, max_size=5)), max_leaves=20)
documents = st.fixed_dictionaries({"kind": st.sampled_from(KINDS)},
                                  optional={f: values for f in FIELDS[1:]})


def _check(diagnostics: list) -> None:
    for d in diagnostics:
        assert d.line >= 1 and d.column >= 1
        assert d.file and d.kind and d.name and d.message
        assert "Traceback" not in d.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_arbitrary_text_never_crashes(tmp_path: Path, text: str) -> None:
    (tmp_path / "x.yaml").write_text(text, encoding="utf-8")
    result = load_rules([tmp_path])
    _check(result.diagnostics)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("kind: Broker\n-[]{}'\"&*!|>#%@`,?=~ \t0123456789.$")), max_size=200))
def test_yaml_looking_noise_never_crashes(text: str) -> None:
    docs, problems = parse_text(text, "noise.yaml")
    _check(problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(documents, min_size=1, max_size=4))
def test_arbitrary_documents_never_crash(tmp_path: Path, docs: list) -> None:
    import io

    buffer = io.StringIO()
    YAML().dump_all(docs, buffer)
    (tmp_path / "docs.yaml").write_text(buffer.getvalue(), encoding="utf-8")
    result = load_rules([tmp_path])
    _check(result.diagnostics)
    if result.ruleset is None:
        assert result.diagnostics
