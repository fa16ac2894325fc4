"""``multibroker serve``: the service (webhooks in, orders out), hot-reloading its rules while it runs.

With no arguments it runs the example rules (``rules/``, paper brokers) with its journal in ``./data``. Secrets come
from the environment; when ``MULTIBROKER_WEBHOOK_SECRET`` or ``MULTIBROKER_ADMIN_TOKEN`` is unset, a random value is
generated once into ``data/webhook-secret`` / ``data/admin-token`` (mode 0600) and reused, and the log says where
it is (never what it is).
"""

from __future__ import annotations

import logging
import sys

import click

from engine.diagnostics import render_text
from engine.loader import DEFAULT_RULES_DIR, load_rules
from service.config import ADMIN_TOKEN_ENV, WEBHOOK_SECRET_ENV, ConfigError, ServiceConfig

logger = logging.getLogger("multibroker.serve")


@click.command("serve")
@click.option("--rules", "rules_dir", default=DEFAULT_RULES_DIR, show_default=True, help="Rules directory.")
@click.option("--data", "data_dir", default="data", show_default=True,
              help="Directory for the SQLite journal, paper broker state and generated secrets.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8787, show_default=True, type=int, help="Port to listen on.")
@click.option("--paper-tick", "paper_tick_s", default=1.0, show_default=True, type=float,
              help="Seconds between paper price moves (0: prices stay still).")
@click.option("--startup-check/--no-startup-check", default=True, show_default=True,
              help="At start-up, run `multibroker brokers check` against every broker in the background and log it.")
def command(rules_dir: str, data_dir: str, host: str, port: int, paper_tick_s: float, startup_check: bool) -> None:
    """Run the service on the given rules (default: the example rules on paper brokers).

    POST signals to /webhook; the admin API is under /api (see docs/openapi.yaml). Rules are re-read when their
    files change; an invalid edit keeps the running rules and is shown in /api/status.

    Example: multibroker serve --rules rules/ --port 8787
    """
    result = load_rules([rules_dir])
    if not result.ok:
        click.echo(render_text(result.diagnostics, len(result.files), result.documents), err=True)
        sys.exit(1)
    try:
        config = ServiceConfig.from_env(rules_dir=rules_dir, data_dir=data_dir, host=host, port=port,
                                        paper_tick_s=paper_tick_s, startup_check=startup_check)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    config, files = config.ensure_secrets()
    for path in files:
        what = f"webhook secret (${WEBHOOK_SECRET_ENV} unset)" if path.name == "webhook-secret" else \
            f"admin token (${ADMIN_TOKEN_ENV} unset)"
        logger.info("%s: using the value in %s", what, path)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: put a TLS reverse proxy in front and set MULTIBROKER_ALLOW_IPS", host)

    from engine.reload import RulesLoadError  # noqa: PLC0415 - aiohttp and the runtime load only when serving
    from service.app import run  # noqa: PLC0415
    from service.journal import JournalError  # noqa: PLC0415

    try:
        run(config)
    except (JournalError, RulesLoadError) as exc:
        click.echo(f"multibroker serve: {exc}", err=True)
        sys.exit(1)
