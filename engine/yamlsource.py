"""Reading rule files with positions: every YAML node keeps the line and column it came from.

ruamel.yaml's round-trip loader is used because it records ``.lc`` positions on every mapping and sequence;
that is what lets a diagnostic point at the offending *value* rather than at the document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from engine.diagnostics import Diagnostic

RULE_SUFFIXES = (".yaml", ".yml")


@dataclass
class SourceDoc:
    """One YAML document of a rule file, with its raw node tree for position look-ups."""

    file: str
    index: int
    """1-based position of the document in its file."""
    data: Any
    line: int
    column: int
    schema_ok: bool = field(default=False)

    @property
    def kind(self) -> str:
        kind = self.data.get("kind") if isinstance(self.data, dict) else None
        return kind if isinstance(kind, str) and kind else "document"

    @property
    def name(self) -> str:
        name = self.data.get("name") if isinstance(self.data, dict) else None
        return name if isinstance(name, str) and name else f"#{self.index}"

    def position(self, path: Sequence[Any], *, key: bool = False) -> tuple[int, int]:
        """1-based (line, column) of the node at ``path``; the nearest existing ancestor when it is missing.

        With ``key=True`` and a mapping entry as the last step, the position of the key rather than its value
        (used for "unknown field" errors, where the key is what is wrong).
        """
        node: Any = self.data
        line, column = self.line, self.column
        for i, step in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, CommentedMap) and step in node:
                kl, kc = node.lc.key(step)
                if last and key:
                    return kl + 1, kc + 1
                vl, vc = node.lc.value(step)
                line, column = vl + 1, vc + 1
                node = node[step]
            elif isinstance(node, CommentedSeq) and isinstance(step, int) and 0 <= step < len(node):
                il, ic = node.lc.item(step)
                line, column = il + 1, ic + 1
                node = node[step]
            else:
                break
        return line, column

    def diag(self, path: Sequence[Any], message: str, *, key: bool = False) -> Diagnostic:
        line, column = self.position(path, key=key)
        return Diagnostic(self.file, line, column, self.kind, self.name, message)


def discover(paths: Iterable[str | Path]) -> tuple[list[Path], list[Diagnostic]]:
    """Rule files under ``paths`` (directories searched recursively, hidden entries skipped), sorted."""
    files: list[Path] = []
    problems: list[Diagnostic] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                rel = candidate.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if candidate.is_file() and candidate.suffix in RULE_SUFFIXES:
                    files.append(candidate)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Diagnostic(str(path), 1, 1, "YAML", "file", "no such file or directory"))
    unique = sorted(dict.fromkeys(files), key=lambda p: str(p))
    return unique, problems


_DUP_KEY = re.compile(r'found duplicate key "(.*?)"')


def _yaml_error(file: str, exc: YAMLError) -> Diagnostic:
    """A YAML error as a Diagnostic. Values are never quoted back: a duplicated key may hold a secret."""
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problem = exc.problem or "invalid YAML"
        dup = _DUP_KEY.search(problem)
        if dup:
            first = exc.context_mark
            where = f" (first defined at line {first.line + 1})" if first is not None else ""
            message = f'duplicate key "{dup.group(1)}"{where}'
        else:
            context = f" {exc.context}" if exc.context else ""
            message = f"YAML syntax error: {problem}{context}"
        return Diagnostic(file, line, column, "YAML", "syntax", message)
    return Diagnostic(file, 1, 1, "YAML", "syntax", f"YAML error: {type(exc).__name__}")


def read_documents(path: Path, display: str | None = None) -> tuple[list[SourceDoc], list[Diagnostic], bytes]:
    """Parse every document of one file. Documents before a syntax error are kept; the error is reported."""
    name = display or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return [], [Diagnostic(name, 1, 1, "YAML", "file", f"cannot read file: {exc.strerror}")], b""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [Diagnostic(name, 1, 1, "YAML", "file", f"not UTF-8 text (byte {exc.start})")], raw
    return parse_text(text, name) + (raw,)


def parse_text(text: str, name: str) -> tuple[list[SourceDoc], list[Diagnostic]]:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    docs: list[SourceDoc] = []
    problems: list[Diagnostic] = []
    index = 0
    try:
        for data in yaml.load_all(text):
            index += 1
            if data is None:
                continue  # an empty document (a stray `---`) is harmless
            if isinstance(data, (CommentedMap, CommentedSeq)):
                line, column = data.lc.line + 1, data.lc.col + 1
            else:
                line, column = 1, 1
            docs.append(SourceDoc(name, index, data, line, column))
    except YAMLError as exc:
        problems.append(_yaml_error(name, exc))
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # ruamel raises plain Python errors for a few malformed scalars (e.g. out-of-range timestamps).
        problems.append(Diagnostic(name, 1, 1, "YAML", "syntax", f"unreadable YAML value: {type(exc).__name__}"))
    return docs, problems
