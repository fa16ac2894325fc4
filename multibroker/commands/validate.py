"""``multibroker validate``: check rule files before they ever run (editor, pre-commit hook, pull request)."""

from __future__ import annotations

import sys

import click

from engine.diagnostics import render_github, render_json, render_text
from engine.loader import DEFAULT_RULES_DIR, load_rules


@click.command("validate")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=str))
@click.option("--format", "fmt", type=click.Choice(["text", "json", "github"]), default="text", show_default=True,
              help="text for people, json for bots, github for pull-request annotations.")
def command(paths: tuple[str, ...], fmt: str) -> None:
    """Validate rule files against the schemas and each other.

    PATHS are files or directories (default: rules/). Prints every error as path:line:col: Kind/name: message,
    then a one-line summary. Exit 0 when valid, 1 when any error, 2 on usage errors.

    Example: multibroker validate rules/ --format github
    """
    result = load_rules(list(paths) or [DEFAULT_RULES_DIR])
    if fmt == "json":
        click.echo(render_json(result.diagnostics))
    elif fmt == "github":
        if result.diagnostics:
            click.echo(render_github(result.diagnostics))
        summary = render_text(result.diagnostics, len(result.files), result.documents).splitlines()[-1]
        click.echo(summary, err=True)
    else:
        click.echo(render_text(result.diagnostics, len(result.files), result.documents))
    sys.exit(0 if result.ok else 1)
