"""``multibroker serve``: the service (webhooks in, orders out).

Until the HTTP service lands (issue 5), this validates the rules it would run and says so; the command line is
already the final one so the README's first command stays stable.
"""

from __future__ import annotations

import sys

import click

from engine.diagnostics import render_text
from engine.loader import DEFAULT_RULES_DIR, load_rules


@click.command("serve")
@click.option("--rules", "rules_dir", default=DEFAULT_RULES_DIR, show_default=True, help="Rules directory.")
@click.option("--data", "data_dir", default="data", show_default=True, help="Directory for the SQLite journal.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8787, show_default=True, type=int, help="Port to listen on.")
def command(rules_dir: str, data_dir: str, host: str, port: int) -> None:
    """Run the service on the given rules (default: the example rules on paper brokers).

    Example: multibroker serve --rules rules/ --port 8787
    """
    result = load_rules([rules_dir])
    click.echo(render_text(result.diagnostics, len(result.files), result.documents), err=not result.ok)
    if not result.ok:
        sys.exit(1)
    click.echo(f"rules ok; the HTTP service ({host}:{port}, data in {data_dir}/) is not built yet", err=True)
