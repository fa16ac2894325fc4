"""Every rule the schemas and the cross-checks enforce, shown failing at the right line and column.

Each case adds one broken file (``zz-case.yaml``, loaded last) to a copy of the example rules and names the (line, column) and
words the trader must see. Values that are credentials must never appear in any message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.loader import load_rules

BROKER = "kind: Broker\nname: b2\ntype: paper\n"
ACCOUNT = "kind: Account\nname: acc-x\nbroker: paper-fast\nbroker_account: X1\ncapital: 1000\n"

CASES = [
    # (id, file text, line, column, expected words)
    ("unknown field with suggestion", BROKER + "comission: {ES: 1}\n", 4, 1, "unknown field 'comission' (did you mean 'commissions'?)"),
    ("bad broker type", "kind: Broker\nname: b2\ntype: papr\n", 3, 7, "\"papr\" is not one of: paper, tradovate, projectx (did you mean 'paper'?)"),
    ("literal secret", BROKER + "credentials:\n  password: hunter2\n", 5, 13, "must be an ${ENV_VAR} reference"),
    ("credential not a string", BROKER + "credentials:\n  password: 12345\n", 5, 13, "literal secret is not allowed"),
    ("missing required field", "kind: Account\nname: a\nbroker: paper-fast\nbroker_account: X\n", 1, 1, "missing required field 'capital'"),
    ("account unknown broker", ACCOUNT.replace("paper-fast", "paper-fats"), 3, 9, "unknown broker 'paper-fats' (did you mean 'paper-fast'?)"),
    ("duplicate name", BROKER.replace("b2", "paper-fast"), 2, 7, "duplicate Broker name 'paper-fast' (first defined at"),
    ("unknown instrument in allow-list", ACCOUNT + "instruments: [ES, XYZ]\n", 6, 19, "unknown instrument 'XYZ'"),
    ("account size multiplier negative", ACCOUNT + "size_multiplier: -1\n", 6, 18, "must be >= 0, got -1"),
    ("capital zero", ACCOUNT.replace("capital: 1000", "capital: 0"), 5, 10, "must be > 0, got 0"),
    ("routing unknown account", "kind: Routing\nname: r2\nrules:\n  - name: x\n    match: {strategy: es-scalper}\n    mode: mirror\n    accounts: [apex-1, apex-9]\n", 7, 24, "unknown account 'apex-9'"),
    ("routing unknown broker", "kind: Routing\nname: r2\nrules:\n  - name: x\n    match: {}\n    mode: best\n    brokers: [paper-fats]\n", 7, 15, "unknown broker 'paper-fats'"),
    ("routing rule after catch-all", "kind: Routing\nname: r2\nrules:\n  - name: x\n    match: {strategy: es-scalper}\n    mode: mirror\n", 4, 11, "rule 'x' can never apply: rule 'default' above it matches every signal"),
    ("routing unknown instrument", "kind: Routing\nname: r0\nrules:\n  - name: x\n    match: {instrument: ZZ}\n    mode: best\n    brokers: [paper-fast]\n", 5, 25, "unknown instrument 'ZZ'"),
    ("routing bad mode", "kind: Routing\nname: r0\nrules:\n  - name: x\n    match: {}\n    mode: mirorr\n    brokers: [paper-fast]\n", 6, 11, "is not one of: mirror, best (did you mean 'mirror'?)"),
    ("routing select on mirror", "kind: Routing\nname: r0\nrules:\n  - name: x\n    match: {strategy: es-scalper}\n    mode: mirror\n    select: [most_free_margin]\n", 7, 13, "select: only applies to mode 'best'"),
    ("routing strategy nobody follows", "kind: Routing\nname: r0\nrules:\n  - name: x\n    match: {strategy: ghost}\n    mode: mirror\n", 5, 23, "no account follows strategy 'ghost'"),
    ("routing match typo", "kind: Routing\nname: r0\nrules:\n  - name: x\n    match: {stratgy: es-scalper}\n    mode: mirror\n", 5, 13, "unknown field 'stratgy' (did you mean 'strategy'?)"),
    ("schedule bad time", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    at: \"25:00\"\n    action: flatten\n", 5, 9, "not a valid HH:MM time"),
    ("schedule empty window", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    between: [\"15:50\", \"15:50\"]\n    action: block_entries\n", 5, 24, "is empty; start and end must differ"),
    ("schedule wrong zone", "kind: Schedule\nname: s2\ntimezone: Europe/London\nrules:\n  - name: x\n    at: \"15:55\"\n    action: flatten\n", 3, 11, "must be \"America/New_York\""),
    ("schedule two kinds of time", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    at: \"15:55\"\n    before_close: 5m\n    action: flatten\n", 4, 5, "set only one of: at, between, before_close"),
    ("schedule no time at all", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    action: flatten\n", 4, 5, "needs exactly one of: at, between, before_close"),
    ("schedule flatten with window", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    between: [\"15:50\", \"16:00\"]\n    action: flatten\n", 5, 14, "a flatten happens at an instant"),
    ("schedule block at instant", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    at: \"15:50\"\n    action: block_entries\n", 5, 9, "block_entries needs a window"),
    ("schedule bad weekday", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    at: \"15:50\"\n    days: [monday]\n    action: flatten\n", 6, 12, "\"monday\" is not one of: mon"),
    ("schedule long before_close", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    before_close: 30h\n    action: flatten\n", 5, 19, "longer than a trading session"),
    ("schedule unknown strategy", "kind: Schedule\nname: s2\nrules:\n  - name: x\n    at: \"15:50\"\n    action: flatten\n    strategies: [es-scalpr]\n", 7, 18, "unknown strategy 'es-scalpr' (did you mean 'es-scalper'?)"),
    ("risk percentage out of range", "kind: Risk\nname: r2\nlimits:\n  - name: x\n    scope: account\n    max_daily_loss_pct: 150\n", 6, 25, "must be <= 100, got 150"),
    ("risk unknown instrument", "kind: Risk\nname: r2\nlimits:\n  - name: x\n    scope: account\n    instrument: [ES, QQ]\n    max_contracts: 2\n", 6, 22, "unknown instrument 'QQ'"),
    ("risk limit without a limit", "kind: Risk\nname: r2\nlimits:\n  - name: x\n    scope: account\n", 4, 5, "needs at least one of: max_daily_loss, max_daily_loss_pct, max_contracts"),
    ("risk conflicting buffer", "kind: Risk\nname: r2\nmargin_buffer_pct: 50\n", 3, 20, "conflicts with 30 set in Risk/limits"),
    ("risk duplicate limit name", "kind: Risk\nname: r2\nlimits:\n  - name: micro-size\n    scope: account\n    max_contracts: 3\n", 4, 11, "duplicate risk limit name 'micro-size'"),
    ("broker negative commission", BROKER + "commissions: {ES: -1}\n", 4, 19, "must be >= 0, got -1"),
    ("broker commission key not a root", BROKER + "commissions:\n  es: 1\n", 5, 3, "key \"es\" is not an instrument root"),
    ("broker commission for unknown root", BROKER + "commissions:\n  ZZZ: 1\n", 5, 3, "unknown instrument 'ZZZ'"),
    ("broker rate limit zero", BROKER + "rate_limit: {requests: 0, per_seconds: 60}\n", 4, 24, "must be >= 1, got 0"),
    ("live paper broker", BROKER + "environment: live\n", 3, 7, "\"paper\" is not allowed here"),
    ("instrument new root incomplete", "kind: Instrument\nname: ZN\nexchange: CBOT\n", 1, 1, "new instrument 'ZN' needs 'tick_size'"),
    ("unknown kind", "kind: Brokr\nname: x\n", 1, 7, "unknown kind \"Brokr\"; one of: Broker, Account, Instrument, Routing, Risk, Schedule (did you mean 'Broker'?)"),
    ("missing kind", "name: x\n", 1, 1, "missing required field 'kind'"),
    ("not a mapping", "- a\n- b\n", 1, 1, "a rule document must be a mapping"),
    ("YAML syntax error", "kind: Broker\nname: [oops\ntype: paper\n", 3, 5, "YAML syntax error"),
    ("duplicate key", "kind: Broker\nname: b2\ntype: paper\nname: b3\n", 4, 1, "duplicate key \"name\" (first defined at line 1)"),
]


@pytest.mark.parametrize("text,line,column,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_rule_is_reported_at_its_place(rules_dir: Path, text: str, line: int, column: int, words: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(rules_dir.parent)
    (rules_dir / "zz-case.yaml").write_text(text)
    result = load_rules(["rules"])
    assert result.ruleset is None and not result.ok
    here = [d for d in result.diagnostics if d.file == "rules/zz-case.yaml"]
    assert here, f"no diagnostic in zz-case.yaml: {[str(d) for d in result.diagnostics]}"
    matching = [d for d in here if words in d.message]
    assert matching, f"expected {words!r} in {[str(d) for d in here]}"
    assert (matching[0].line, matching[0].column) == (line, column), str(matching[0])
    assert "hunter2" not in "\n".join(str(d) for d in result.diagnostics)
    assert "12345" not in "\n".join(str(d) for d in result.diagnostics)


def test_every_error_is_reported_not_just_the_first(rules_dir: Path) -> None:
    (rules_dir / "zz-case.yaml").write_text(
        "kind: Account\nname: z\nbroker: nope\nbroker_account: Z\ncapital: 1\ninstruments: [QQ]\n"
        "---\nkind: Broker\nname: q\ntype: paper\nbogus: 1\n"
    )
    result = load_rules([rules_dir])
    messages = [d.message for d in result.diagnostics]
    assert any("unknown broker 'nope'" in m for m in messages)
    assert any("unknown instrument 'QQ'" in m for m in messages)
    assert any("unknown field 'bogus'" in m for m in messages)


def test_text_form_is_path_line_col_kind_name_message(rules_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(rules_dir.parent)
    (rules_dir / "zz-case.yaml").write_text(ACCOUNT.replace("paper-fast", "nowhere"))
    [diag] = load_rules(["rules"]).diagnostics
    assert str(diag) == "rules/zz-case.yaml:3:9: Account/acc-x: broker: unknown broker 'nowhere' (known: paper-cheap, paper-fast, paper-slow)"


def test_example_rules_are_valid_and_build_a_ruleset() -> None:
    from tests.conftest import EXAMPLE_RULES

    result = load_rules([EXAMPLE_RULES])
    assert result.diagnostics == []
    rs = result.ruleset
    assert rs is not None
    assert set(rs.brokers) == {"paper-fast", "paper-slow", "paper-cheap"}
    assert {b.type for b in rs.brokers.values()} == {"paper"}
    assert [r.name for r in rs.routing_rules] == ["mirror-scalper", "micros-cheapest", "default"]
    assert str(rs.brokers["paper-fast"].commission("MES")) == "0.25"
    assert str(rs.brokers["paper-fast"].commission("CL")) == "0.79"  # default
    assert str(rs.margin_buffer_pct) == "30"
    assert rs.accounts["apex-2"].size_multiplier.as_tuple().exponent == -1  # Decimal("0.5"), not a float
    assert len(rs.content_hash) == 64


def test_content_hash_changes_with_content(rules_dir: Path) -> None:
    before = load_rules([rules_dir]).content_hash
    risk = rules_dir / "risk.yaml"
    risk.write_text(risk.read_text().replace("max_contracts: 4", "max_contracts: 3"))
    after = load_rules([rules_dir])
    assert after.ok and after.content_hash != before


def test_credentials_hold_variable_names_not_values(rules_dir: Path) -> None:
    (rules_dir / "zz-case.yaml").write_text("kind: Broker\nname: tv\ntype: tradovate\ncredentials:\n"
                                         "  username: ${TV_USER}\n  password: ${TV_PASS}\n")
    result = load_rules([rules_dir])
    assert result.ok, [str(d) for d in result.diagnostics]
    assert dict(result.ruleset.brokers["tv"].credentials) == {"username": "TV_USER", "password": "TV_PASS"}


def test_instrument_document_overrides_and_adds(rules_dir: Path) -> None:
    (rules_dir / "zz-case.yaml").write_text(
        "kind: Instrument\nname: MES\ntick_value: 1.30\n---\n"
        "kind: Instrument\nname: ZN\nexchange: CBOT\ntick_size: 0.015625\ntick_value: 15.625\nmonths: [H, M, U, Z]\n"
    )
    result = load_rules([rules_dir])
    assert result.ok, [str(d) for d in result.diagnostics]
    catalog = result.ruleset.catalog
    assert str(catalog["MES"].tick_value) == "1.3" and str(catalog["MES"].tick_size) == "0.25"
    assert catalog["ZN"].point_value == 1000


def test_multi_document_and_yml_files_are_read(rules_dir: Path) -> None:
    (rules_dir / "extra.yml").write_text("---\n" + ACCOUNT + "---\n" + ACCOUNT.replace("acc-x", "acc-y"))
    result = load_rules([rules_dir])
    assert result.ok
    assert {"acc-x", "acc-y"} <= set(result.ruleset.accounts)


def test_json_report_shape(rules_dir: Path) -> None:
    from engine.diagnostics import render_json

    (rules_dir / "zz-case.yaml").write_text("kind: Brokr\nname: x\n")
    [entry] = json.loads(render_json(load_rules([rules_dir]).diagnostics))
    assert set(entry) == {"file", "line", "column", "kind", "name", "message"}
    assert (entry["line"], entry["column"], entry["kind"], entry["name"]) == (1, 7, "Brokr", "x")
