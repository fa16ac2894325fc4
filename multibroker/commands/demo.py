"""``multibroker demo``: post a stream of sample signals to a running ``multibroker serve`` and show what happens.

Meant for the first minute with the project: start ``multibroker serve`` in one terminal, run ``multibroker demo``
in another, and watch es-scalper mirrored into three accounts, micro-trend routed to the cheapest broker, entries
and exits, then the positions and the day's P&L. The secret and admin token are read from the environment or from
the files ``serve`` generated in the data directory; they are never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from service.config import ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE, WEBHOOK_SECRET_ENV, WEBHOOK_SECRET_FILE

SCRIPT: list[dict[str, Any]] = [
    {"strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 2, "comment": "mirror: 3 accounts"},
    {"strategy": "micro-trend", "ticker": "MES1!", "action": "buy", "quantity": 1, "comment": "best: cheapest"},
    {"strategy": "micro-trend", "ticker": "MNQ1!", "action": "buy", "quantity": 2, "comment": "best: cheapest"},
    {"strategy": "es-scalper", "ticker": "MES1!", "action": "sell", "quantity": 2, "position": "flat",
     "position_size": 0, "comment": "target: flat"},
    {"strategy": "es-scalper", "ticker": "MES1!", "action": "sell", "quantity": 1, "comment": "short entry"},
    {"strategy": "micro-trend", "ticker": "MES1!", "action": "exit", "comment": "exit where held"},
    {"strategy": "es-scalper", "ticker": "MES1!", "action": "exit", "comment": "exit"},
    {"strategy": "micro-trend", "ticker": "MNQ1!", "action": "exit", "comment": "exit"},
]


def _secret(env_name: str, data_dir: Path, file_name: str) -> str | None:
    value = os.environ.get(env_name)
    if value:
        return value
    try:
        return (data_dir / file_name).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def _line(n: int, signal: dict[str, Any], status: int, body: dict[str, Any]) -> str:
    what = f"{signal['strategy']:<11} {signal['action']:<4} {signal.get('quantity', ''):>2} {signal['ticker']:<6}"
    if "error" in body:
        return f"{n:>3} {what} -> {status} {body['error']['message']}"
    decision = body.get("decision") or {}
    orders = ", ".join(f"{o['account']} {o['side']} {o['quantity']} {o['contract']}" for o in decision["orders"])
    tag = " (duplicate)" if body.get("duplicate") else ""
    return f"{n:>3} {what} -> {status}{tag} {decision.get('reason', '')}" + (f" [{orders}]" if orders else "")


async def _run(url: str, count: int, interval_s: float, secret: str, token: str | None) -> int:
    import aiohttp  # noqa: PLC0415

    failures = 0
    ordered = 0
    blocked: dict[str, str] = {}  # rule -> reason, for signals whose every entry a rule refused
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for n in range(count):
            signal = dict(SCRIPT[n % len(SCRIPT)])
            signal.update(id=f"demo-{uuid.uuid4().hex[:12]}", time=datetime.now(timezone.utc).isoformat(),
                          secret=secret)
            try:
                async with session.post(f"{url}/webhook", data=json.dumps(signal),
                                        headers={"Content-Type": "text/plain"}) as r:
                    body = await r.json()
                    click.echo(_line(n + 1, signal, r.status, body))
                    failures += r.status >= 400
                    decision = body.get("decision") or {}
                    ordered += len(decision.get("orders") or ())
                    if decision.get("blocked_by"):
                        blocked[str(decision["blocked_by"])] = str(decision.get("reason") or "")
            except aiohttp.ClientError as exc:
                click.echo(f"cannot reach {url}: {exc} (is `multibroker serve` running?)", err=True)
                return 2
            if n + 1 < count:
                await asyncio.sleep(interval_s)
        if not ordered and blocked:
            # A newcomer running the demo in the evening sees nothing move and deserves to know why.
            click.echo(f"\nno signal made an order: the rules block entries right now "
                       f"({'; '.join(blocked.values())}). The example schedule (rules/schedule.yaml) blocks "
                       f"entries from 15:50 to 18:00 ET; edit it while `serve` runs (it reloads) or try later.")
        if token is None:
            click.echo("(no admin token found: skipping positions and P&L)")
            return 1 if failures else 0
        await asyncio.sleep(min(interval_s, 1.0))  # let the last fills land
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(f"{url}/api/positions", headers=headers) as r:
            positions = (await r.json()).get("positions", [])
        async with session.get(f"{url}/api/accounts", headers=headers) as r:
            accounts = (await r.json()).get("accounts", [])
    click.echo("\npositions:" if positions else "\npositions: all flat")
    for p in positions:
        click.echo(f"  {p['account']:<10} {p['strategy']:<11} {p['contract']:<6} {p['quantity']:>3} "
                   f"avg {p.get('avg_price')} mark {p.get('mark')}")
    click.echo("accounts (daily P&L, USD):")
    for a in accounts:
        click.echo(f"  {a['name']:<10} {a.get('broker', ''):<12} {a.get('daily_pnl')}")
    return 1 if failures else 0


@click.command("demo")
@click.option("--url", default="http://127.0.0.1:8787", show_default=True, help="Where `multibroker serve` runs.")
@click.option("--count", default=16, show_default=True, type=click.IntRange(1, 10000), help="Signals to post.")
@click.option("--interval", "interval_s", default=2.0, show_default=True, type=click.FloatRange(0, 60),
              help="Seconds between signals.")
@click.option("--data", "data_dir", default="data", show_default=True,
              help="The server's data directory (to read the generated secret and admin token).")
def command(url: str, count: int, interval_s: float, data_dir: str) -> None:
    """Post sample signals (mirrored, cost-routed, entries and exits) and print each answer, then positions and P&L.

    Example: multibroker demo --count 8 --interval 1
    """
    data = Path(data_dir)
    secret = _secret(WEBHOOK_SECRET_ENV, data, WEBHOOK_SECRET_FILE)
    if secret is None:
        click.echo(f"no webhook secret: set {WEBHOOK_SECRET_ENV} or start `multibroker serve` (which writes "
                   f"{data / WEBHOOK_SECRET_FILE}) first", err=True)
        sys.exit(2)
    token = _secret(ADMIN_TOKEN_ENV, data, ADMIN_TOKEN_FILE)
    sys.exit(asyncio.run(_run(url.rstrip("/"), count, interval_s, secret, token)))
