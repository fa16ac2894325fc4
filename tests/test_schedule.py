"""Schedule rules as a trader writes them: when they fire, what they block, and `multibroker schedule`."""

from __future__ import annotations

import json
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.loader import load_rules
from engine.model import Location, ScheduleRule
from engine.schedule import Firing, blocking_rule, firings, flatten_due, next_firing
from multibroker.cli import cli


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def write_schedule(directory: Path, rules_yaml: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    body = "kind: Schedule\nname: sessions\ntimezone: America/New_York\nrules:\n" + textwrap.indent(
        textwrap.dedent(rules_yaml).strip(), "  ") + "\n"
    (directory / "schedule.yaml").write_text(body)
    return directory


def load_schedule(tmp_path: Path, rules_yaml: str) -> tuple[ScheduleRule, ...]:
    result = load_rules([write_schedule(tmp_path / "rules", rules_yaml)])
    assert result.ruleset is not None, [str(d) for d in result.diagnostics]
    return result.ruleset.schedule_rules


def lines(found: list[Firing]) -> list[tuple[str, str, str]]:
    return [(f.rule.name, f.action, f.to_json()["at_et"]) for f in found]


LATE_ENTRIES = """
- name: no-late-entries
  between: ["15:50", "18:00"]
  days: [mon, tue, wed, thu, fri]
  action: block_entries
"""


# --- blocking_rule -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("at", "blocked"),
    [
        ("2026-01-14T20:49:59Z", False),  # 15:49:59 EST
        ("2026-01-14T20:50:00Z", True),  # 15:50:00 EST: the start is inside
        ("2026-01-14T22:59:59Z", True),  # 17:59:59 EST
        ("2026-01-14T23:00:00Z", False),  # 18:00:00 EST: the end is outside
        ("2026-07-15T19:49:59Z", False),  # 15:49:59 EDT
        ("2026-07-15T19:50:00Z", True),  # 15:50:00 EDT
        ("2026-07-15T21:59:59.999Z", True),  # 17:59:59.999 EDT
        ("2026-07-15T22:00:00Z", False),  # 18:00:00 EDT
        ("2026-03-09T19:50:00Z", True),  # Monday after spring-forward: 15:50 EDT
        ("2026-03-09T20:49:59Z", True),  # (15:50 EST would be a trap: this is 16:49:59 EDT, still inside)
        ("2026-03-06T20:49:59Z", False),  # Friday before: 15:49:59 EST
        ("2026-11-02T20:50:00Z", True),  # Monday after fall-back: 15:50 EST
        ("2026-11-02T19:50:00Z", False),  # 14:50 EST (15:50 if one forgot the change)
        ("2026-01-17T20:50:00Z", False),  # Saturday: not in days
    ],
)
def test_between_window_edges_in_est_and_edt(tmp_path: Path, at: str, blocked: bool) -> None:
    rules = load_schedule(tmp_path, LATE_ENTRIES)
    found = blocking_rule(rules, utc(at))
    assert (found is not None) is blocked
    if blocked:
        assert found is not None and found.name == "no-late-entries"


WRAP = """
- name: friday-night
  between: ["22:00", "02:00"]
  days: [fri]
  action: block_entries
"""


@pytest.mark.parametrize(
    ("at", "blocked"),
    [
        ("2026-01-17T02:59:59Z", False),  # Fri 21:59:59 EST
        ("2026-01-17T03:00:00Z", True),  # Fri 22:00 EST
        ("2026-01-17T05:00:00Z", True),  # Sat 00:00 EST: the window started Friday
        ("2026-01-17T06:59:59Z", True),  # Sat 01:59:59 EST
        ("2026-01-17T07:00:00Z", False),  # Sat 02:00 EST
        ("2026-01-18T03:00:00Z", False),  # Sat 22:00: Saturday is not a start day
        ("2026-01-16T06:00:00Z", False),  # Fri 01:00: that window would have started Thursday
    ],
)
def test_window_wrapping_past_midnight_belongs_to_its_start_day(tmp_path: Path, at: str, blocked: bool) -> None:
    rules = load_schedule(tmp_path, WRAP)
    assert (blocking_rule(rules, utc(at)) is not None) is blocked


BEFORE_CLOSE_BLOCK = """
- name: no-entries-near-close
  before_close: 10m
  action: block_entries
"""


@pytest.mark.parametrize(
    ("at", "blocked"),
    [
        ("2026-11-24T21:49:59Z", False),  # regular day: 16:49:59 EST
        ("2026-11-24T21:50:00Z", True),  # 16:50 EST = close 17:00 - 10m
        ("2026-11-24T21:59:59Z", True),
        ("2026-11-24T22:00:00Z", False),  # the close itself is outside
        ("2026-11-27T17:49:59Z", False),  # day after Thanksgiving, close 13:00 EST
        ("2026-11-27T17:50:00Z", True),  # 12:50 EST
        ("2026-11-27T21:50:00Z", False),  # 16:50 EST: the session closed at 13:00
        ("2026-12-25T21:50:00Z", False),  # Christmas: no session, no window
        ("2026-07-15T20:55:00Z", True),  # EDT: 16:55
    ],
)
def test_before_close_block_runs_until_the_close(tmp_path: Path, at: str, blocked: bool) -> None:
    rules = load_schedule(tmp_path, BEFORE_CLOSE_BLOCK)
    assert (blocking_rule(rules, utc(at)) is not None) is blocked


def test_long_before_close_window_starts_the_evening_before(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, """
        - name: whole-session
          before_close: 23h
          action: block_entries
        """)
    assert blocking_rule(rules, utc("2026-11-24T22:59:59Z")) is None  # Tue 17:59:59 EST: the break
    assert blocking_rule(rules, utc("2026-11-24T23:00:00Z")) is not None  # Tue 18:00 = Wed close 17:00 - 23h


def test_scopes_and_rule_order(rules_dir: Path) -> None:
    (rules_dir / "schedule.yaml").write_text(textwrap.dedent("""
        kind: Schedule
        name: sessions
        rules:
          - name: scalper-quiet
            between: ["15:00", "16:00"]
            strategies: [es-scalper]
            action: block_entries
          - name: apex-1-quiet
            between: ["15:30", "16:30"]
            accounts: [apex-1]
            action: block_entries
          - name: everyone-late
            between: ["15:45", "16:15"]
            action: block_entries
        """))
    result = load_rules([rules_dir])
    assert result.ruleset is not None, [str(d) for d in result.diagnostics]
    rules = result.ruleset.schedule_rules
    at_1510 = utc("2026-01-14T20:10:00Z")
    at_1540 = utc("2026-01-14T20:40:00Z")
    at_1550 = utc("2026-01-14T20:50:00Z")

    def name(at: datetime, **scope: str) -> str | None:
        found = blocking_rule(rules, at, **scope)
        return None if found is None else found.name

    assert name(at_1510, strategy="es-scalper", account="apex-2") == "scalper-quiet"
    assert name(at_1510, strategy="other", account="apex-1") is None
    assert name(at_1510) == "scalper-quiet"  # no strategy given: a scoped rule applies (safe side)
    assert name(at_1540, strategy="other", account="apex-1") == "apex-1-quiet"
    assert name(at_1540, strategy="other", account="apex-2") is None
    assert name(at_1550, strategy="other", account="apex-2") == "everyone-late"
    assert name(at_1550, strategy="es-scalper", account="apex-1") == "scalper-quiet"  # first in rule order


def test_flatten_rules_never_block(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, """
        - name: flatten-late
          at: "15:55"
          action: flatten
        """)
    assert blocking_rule(rules, utc("2026-01-14T20:55:00Z")) is None


def test_naive_time_is_refused(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, LATE_ENTRIES)
    with pytest.raises(ValueError, match="naive"):
        blocking_rule(rules, datetime(2026, 1, 14, 15, 50))
    with pytest.raises(ValueError, match="naive"):
        firings(rules, datetime(2026, 1, 14), utc("2026-01-15T00:00:00Z"))


# --- firings -------------------------------------------------------------------------------------------------------

FLATTEN_1555 = """
- name: flatten-before-close
  at: "15:55"
  days: [mon, tue, wed, thu, fri]
  action: flatten
"""


def test_at_rule_across_spring_forward(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, FLATTEN_1555)
    found = firings(rules, utc("2026-03-05T00:00:00Z"), utc("2026-03-11T00:00:00Z"))
    assert [f.at for f in found] == [utc("2026-03-05T20:55:00Z"), utc("2026-03-06T20:55:00Z"),
                                     utc("2026-03-09T19:55:00Z"), utc("2026-03-10T19:55:00Z")]
    assert {f.to_json()["at_et"][11:] for f in found} == {"15:55:00-05:00", "15:55:00-04:00"}


def test_at_rule_across_fall_back(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, FLATTEN_1555)
    found = firings(rules, utc("2026-10-29T00:00:00Z"), utc("2026-11-04T00:00:00Z"))
    assert [f.to_json()["at"] for f in found] == ["2026-10-29T19:55:00Z", "2026-10-30T19:55:00Z",
                                                  "2026-11-02T20:55:00Z", "2026-11-03T20:55:00Z"]


def test_wall_times_inside_a_dst_change_fire_once(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, """
        - name: small-hours
          at: "02:30"
          action: flatten
        - name: repeated-hour
          at: "01:30"
          action: flatten
        """)
    march = firings(rules, utc("2026-03-08T00:00:00Z"), utc("2026-03-09T00:00:00Z"))
    assert [(f.rule.name, f.to_json()["at"]) for f in march] == [("repeated-hour", "2026-03-08T06:30:00Z"),
                                                                 ("small-hours", "2026-03-08T07:00:00Z")]
    november = firings(rules, utc("2026-11-01T00:00:00Z"), utc("2026-11-02T00:00:00Z"))
    assert [(f.rule.name, f.to_json()["at"]) for f in november] == [("repeated-hour", "2026-11-01T05:30:00Z"),
                                                                    ("small-hours", "2026-11-01T07:30:00Z")]


def test_before_close_follows_early_closes_and_holidays(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, """
        - name: flatten-before-session-close
          before_close: 5m
          action: flatten
        """)
    thanksgiving_week = firings(rules, utc("2026-11-23T05:00:00Z"), utc("2026-11-30T05:00:00Z"))
    assert [f.to_json()["at_et"] for f in thanksgiving_week] == [
        "2026-11-23T16:55:00-05:00",
        "2026-11-24T16:55:00-05:00",
        "2026-11-25T16:55:00-05:00",
        "2026-11-26T12:55:00-05:00",  # Thanksgiving: CME equity closes 13:00 ET
        "2026-11-27T12:55:00-05:00",  # the day after: early close
    ]
    christmas = firings(rules, utc("2026-12-24T05:00:00Z"), utc("2026-12-26T05:00:00Z"))
    assert [f.to_json()["at_et"] for f in christmas] == ["2026-12-24T12:55:00-05:00"]  # none on the 25th


def test_before_close_days_filter_by_the_closing_date(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, """
        - name: friday-flatten
          before_close: 1h
          days: [fri]
          action: flatten
        """)
    found = firings(rules, utc("2026-11-16T05:00:00Z"), utc("2026-12-01T05:00:00Z"))
    assert [f.to_json()["at_et"] for f in found] == ["2026-11-20T16:00:00-05:00", "2026-11-27T12:00:00-05:00"]


def test_at_rules_are_clock_rules_even_on_holidays(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, FLATTEN_1555)
    found = firings(rules, utc("2026-12-25T05:00:00Z"), utc("2026-12-28T05:00:00Z"))
    assert [f.to_json()["at_et"] for f in found] == ["2026-12-25T15:55:00-05:00"]  # Friday yes, weekend no


def test_window_gives_a_start_and_an_end_line(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, WRAP + BEFORE_CLOSE_BLOCK)
    found = firings(rules, utc("2026-01-16T05:00:00Z"), utc("2026-01-18T05:00:00Z"))
    assert lines(found) == [
        ("no-entries-near-close", "block_entries", "2026-01-16T16:50:00-05:00"),
        ("no-entries-near-close", "end_block_entries", "2026-01-16T17:00:00-05:00"),
        ("friday-night", "block_entries", "2026-01-16T22:00:00-05:00"),
        ("friday-night", "end_block_entries", "2026-01-17T02:00:00-05:00"),
    ]


def test_firings_window_is_half_open_and_ordered(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, LATE_ENTRIES + FLATTEN_1555)
    found = firings(rules, utc("2026-01-14T20:50:00Z"), utc("2026-01-14T23:00:00Z"))
    assert lines(found) == [("no-late-entries", "block_entries", "2026-01-14T15:50:00-05:00"),
                            ("flatten-before-close", "flatten", "2026-01-14T15:55:00-05:00")]
    assert firings(rules, utc("2026-01-14T23:00:00Z"), utc("2026-01-14T23:00:00Z")) == []
    ordered = firings(rules, utc("2026-01-01T00:00:00Z"), utc("2026-03-01T00:00:00Z"))
    assert [f.at for f in ordered] == sorted(f.at for f in ordered)
    assert len(ordered) == 3 * (22 + 20)  # weekdays in January and February 2026, 3 firings each


def test_next_firing(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, LATE_ENTRIES + FLATTEN_1555)
    friday_evening = utc("2026-01-16T23:30:00Z")
    upcoming = next_firing(rules, friday_evening)
    assert upcoming is not None and upcoming.to_json()["at_et"] == "2026-01-19T15:50:00-05:00"
    flatten = next_firing(rules, friday_evening, actions=["flatten"])
    assert flatten is not None and flatten.to_json()["at_et"] == "2026-01-19T15:55:00-05:00"
    assert next_firing(rules, upcoming.at) == Firing(rules[1], "flatten", utc("2026-01-19T20:55:00Z"))


# --- flatten_due (the service's executor) ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("now", "last_checked", "due"),
    [
        ("2026-01-14T20:55:00.4Z", "2026-01-14T20:54:59.4Z", True),  # on time
        ("2026-01-14T20:55:01Z", "2026-01-14T20:55:00Z", False),  # already handled at 15:55:00
        ("2026-01-14T21:30:00Z", None, True),  # started at 16:30 EST after missing it: same session, still open
        ("2026-01-14T22:10:00Z", None, False),  # 17:10 EST: the session closed since, too late
        ("2026-01-14T23:30:00Z", None, False),  # 18:30 EST: a new trading day
        ("2026-01-14T21:30:00Z", "2026-01-13T12:00:00Z", True),  # long outage, but this session's flatten
    ],
)
def test_flatten_due(tmp_path: Path, now: str, last_checked: str | None, due: bool) -> None:
    rules = load_schedule(tmp_path, FLATTEN_1555 + LATE_ENTRIES)
    found = flatten_due(rules, utc(now), None if last_checked is None else utc(last_checked))
    assert [f.to_json()["at"] for f in found] == (["2026-01-14T20:55:00Z"] if due else [])


def test_flatten_in_the_daily_break_is_not_dropped(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, """
        - name: flatten-in-break
          at: "17:30"
          action: flatten
        """)
    at_1730 = utc("2026-01-14T22:30:00Z")
    found = flatten_due(rules, at_1730 + timedelta(seconds=1), at_1730 - timedelta(seconds=1))
    assert [f.at for f in found] == [at_1730]


def test_flatten_due_refuses_naive_times(tmp_path: Path) -> None:
    rules = load_schedule(tmp_path, FLATTEN_1555)
    with pytest.raises(ValueError, match="naive"):
        flatten_due(rules, utc("2026-01-14T21:30:00Z"), datetime(2026, 1, 14, 12, 0))


# --- multibroker schedule ---------------------------------------------------------------------------------------------

EXAMPLE = LATE_ENTRIES + FLATTEN_1555 + """
- name: flatten-before-session-close
  before_close: 5m
  action: flatten
"""


def run(*args: str) -> tuple[int, list[dict[str, str]], str]:
    result = CliRunner().invoke(cli, ["schedule", *args])
    parsed = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.exit_code, parsed, result.stderr


def test_cli_prints_json_lines_across_spring_forward(tmp_path: Path) -> None:
    rules = write_schedule(tmp_path / "rules", EXAMPLE)
    code, out, err = run("--rules", str(rules), "--from", "2026-03-06T12:00:00-05:00",
                         "--to", "2026-03-09T18:00:00-04:00")
    assert code == 0, err
    assert out == [
        {"rule": "no-late-entries", "action": "block_entries", "at": "2026-03-06T20:50:00Z",
         "at_et": "2026-03-06T15:50:00-05:00"},
        {"rule": "flatten-before-close", "action": "flatten", "at": "2026-03-06T20:55:00Z",
         "at_et": "2026-03-06T15:55:00-05:00"},
        {"rule": "flatten-before-session-close", "action": "flatten", "at": "2026-03-06T21:55:00Z",
         "at_et": "2026-03-06T16:55:00-05:00"},
        {"rule": "no-late-entries", "action": "end_block_entries", "at": "2026-03-06T23:00:00Z",
         "at_et": "2026-03-06T18:00:00-05:00"},
        {"rule": "no-late-entries", "action": "block_entries", "at": "2026-03-09T19:50:00Z",
         "at_et": "2026-03-09T15:50:00-04:00"},
        {"rule": "flatten-before-close", "action": "flatten", "at": "2026-03-09T19:55:00Z",
         "at_et": "2026-03-09T15:55:00-04:00"},
        {"rule": "flatten-before-session-close", "action": "flatten", "at": "2026-03-09T20:55:00Z",
         "at_et": "2026-03-09T16:55:00-04:00"},
    ]


def test_cli_fall_back_and_early_close(tmp_path: Path) -> None:
    rules = write_schedule(tmp_path / "rules", EXAMPLE)
    code, out, _ = run("--rules", str(rules), "--from", "2026-10-30T00:00:00Z", "--to", "2026-11-03T00:00:00Z")
    assert code == 0
    assert [(line["rule"], line["at"]) for line in out if line["action"] == "flatten"] == [
        ("flatten-before-close", "2026-10-30T19:55:00Z"),
        ("flatten-before-session-close", "2026-10-30T20:55:00Z"),  # 16:55 EDT
        ("flatten-before-close", "2026-11-02T20:55:00Z"),
        ("flatten-before-session-close", "2026-11-02T21:55:00Z"),  # 16:55 EST
    ]
    code, out, _ = run("--rules", str(rules), "--from", "2026-12-24T00:00:00Z", "--to", "2026-12-26T00:00:00Z")
    assert [line["at_et"] for line in out if line["rule"] == "flatten-before-session-close"] == [
        "2026-12-24T12:55:00-05:00"]


def test_cli_rules_default_to_the_rules_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_schedule(tmp_path / "rules", FLATTEN_1555)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run("--from", "2026-01-14T00:00:00Z", "--to", "2026-01-15T00:00:00Z")
    assert code == 0
    assert out == [{"rule": "flatten-before-close", "action": "flatten", "at": "2026-01-14T20:55:00Z",
                    "at_et": "2026-01-14T15:55:00-05:00"}]


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-01-14T00:00:00", "2026-01-15T00:00:00Z", "'2026-01-14T00:00:00' has no UTC offset"),
        ("2026-01-14T00:00:00Z", "2026-01-15", "'2026-01-15' has no UTC offset"),
        ("yesterday", "2026-01-15T00:00:00Z", "'yesterday' is not an ISO-8601 time"),
        ("2026-01-15T00:00:00Z", "2026-01-14T00:00:00Z", "is not after --from"),
    ],
)
def test_cli_refuses_bad_windows(tmp_path: Path, start: str, end: str, message: str) -> None:
    rules = write_schedule(tmp_path / "rules", FLATTEN_1555)
    code, out, err = run("--rules", str(rules), "--from", start, "--to", end)
    assert code == 2
    assert out == []
    assert message in err
    assert "Traceback" not in err


def test_cli_invalid_rules_exit_2_with_locations(tmp_path: Path) -> None:
    rules = write_schedule(tmp_path / "rules", """
        - name: broken
          at: "25:00"
          action: flatten
        """)
    code, out, err = run("--rules", str(rules), "--from", "2026-01-14T00:00:00Z", "--to", "2026-01-15T00:00:00Z")
    assert code == 2
    assert out == []
    assert "schedule.yaml:" in err and "the rules are invalid" in err


def test_cli_help_has_an_example() -> None:
    result = CliRunner().invoke(cli, ["schedule", "--help"])
    assert result.exit_code == 0
    assert "Example: multibroker schedule" in result.stdout


# --- blocking_rule and firings tell the same story ------------------------------------------------------------------

WALL_TIMES = [f"{h:02d}:{m:02d}" for h in (0, 1, 2, 3, 9, 12, 15, 16, 17, 18, 22, 23) for m in (0, 30, 59)]


def _rule(between: tuple[str, str] | None, before_close: int | None, days: tuple[str, ...]) -> ScheduleRule:
    return ScheduleRule(name="w", action="block_entries", at=None, between=between, before_close_minutes=before_close,
                        days=days, strategies=None, accounts=None, schedule="s",
                        source=Location("schedule.yaml", 1, 1))


@settings(max_examples=300, deadline=None)
@given(
    start=st.sampled_from(WALL_TIMES),
    end=st.sampled_from(WALL_TIMES),
    # Up to 20h: closes are at least 20h apart (17:00 ET, then a 13:00 early close), so windows never overlap and
    # "the last edge was a start" is a valid oracle. Overlapping windows are covered by the explicit test below.
    before_close=st.one_of(st.none(), st.integers(min_value=1, max_value=20 * 60)),
    days=st.sets(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), min_size=1),
    # Around both 2026 DST changes and the Thanksgiving early close, at second resolution.
    base=st.sampled_from(["2026-03-06T00:00:00Z", "2026-10-30T00:00:00Z", "2026-11-25T00:00:00Z"]),
    offset_s=st.integers(min_value=0, max_value=4 * 86400),
    snap=st.one_of(st.none(), st.tuples(st.integers(min_value=0, max_value=20), st.sampled_from([-1, 0, 1]))),
)
def test_blocking_rule_agrees_with_firings(start: str, end: str, before_close: int | None, days: set[str],
                                           base: str, offset_s: int, snap: tuple[int, int] | None) -> None:
    assume(before_close is not None or start != end)
    rule = _rule(None if before_close is not None else (start, end), before_close, tuple(sorted(days)))
    at = utc(base) + timedelta(seconds=offset_s)
    if snap is not None:  # exactly on a window edge, or a second either side of it
        all_edges = firings([rule], utc(base), utc(base) + timedelta(days=5))
        assume(all_edges)
        at = all_edges[snap[0] % len(all_edges)].at + timedelta(seconds=snap[1])
    edges = firings([rule], at - timedelta(days=2), at + timedelta(microseconds=1))
    open_by_firings = bool(edges) and edges[-1].action == "block_entries"
    assert (blocking_rule([rule], at) is not None) is open_by_firings


def test_overlapping_before_close_windows_still_block() -> None:
    """A 22h window before the Thanksgiving early close (13:00 ET on Thu 2026-11-26) opens on Wednesday at 14:59 ET,
    before Wednesday's own window ends at 17:00 ET: at that end the market is still blocked by Thursday's window."""
    rule = _rule(None, 22 * 60 + 1, ("mon", "tue", "wed", "thu"))
    wednesday_close = utc("2026-11-25T22:00:00Z")  # 17:00 ET
    assert blocking_rule([rule], wednesday_close) is rule
    assert blocking_rule([rule], utc("2026-11-26T18:00:00Z")) is None  # Thursday 13:00 ET: the early close
