"""Diagnostics: every problem found in rule files, with the place a trader must edit.

Checking *collects* diagnostics and never prints; the CLI picks a reporter (text, JSON, GitHub annotations). The
text form ``path:line:col: Kind/name: message`` is what editors and CI logs turn into clickable links.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass(frozen=True, order=True)
class Diagnostic:
    file: str
    line: int
    column: int
    kind: str
    """Document kind (``Broker``...), ``YAML`` for syntax errors, ``document`` when the kind is unknown."""
    name: str
    """Document name, or ``#N`` (the N-th document in its file) when it has none."""
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.kind}/{self.name}: {self.message}"


def render_text(diagnostics: Iterable[Diagnostic], files_checked: int, documents_checked: int) -> str:
    diags = list(diagnostics)
    lines = [str(d) for d in diags]
    if diags:
        files_with_errors = len({d.file for d in diags})
        noun = "error" if len(diags) == 1 else "errors"
        lines.append(f"{len(diags)} {noun} in {files_with_errors} of {files_checked} files "
                     f"({documents_checked} documents checked)")
    else:
        lines.append(f"ok: {documents_checked} documents in {files_checked} files are valid")
    return "\n".join(lines)


def render_json(diagnostics: Iterable[Diagnostic]) -> str:
    return json.dumps([asdict(d) for d in diagnostics], indent=2)


def _gh_escape(value: str, *, prop: bool) -> str:
    # GitHub workflow-command escaping: data escapes %, CR, LF; properties also escape ':' and ','.
    value = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        value = value.replace(":", "%3A").replace(",", "%2C")
    return value


def render_github(diagnostics: Iterable[Diagnostic]) -> str:
    return "\n".join(
        f"::error file={_gh_escape(d.file, prop=True)},line={d.line},col={d.column}::"
        f"{_gh_escape(f'{d.kind}/{d.name}: {d.message}', prop=False)}"
        for d in diagnostics
    )
