"""ServiceConfig: everything ``multibroker serve`` needs that is not a rule, with documented defaults.

Secrets come from the environment (``MULTIBROKER_WEBHOOK_SECRET``, ``MULTIBROKER_ADMIN_TOKEN``, and the per-strategy
variables the rules name) and are excluded from ``repr`` so that no log line or traceback shows them. For a
newcomer running ``multibroker serve`` with nothing set, ``ensure_secrets`` generates random values into files in
the data directory (mode 0600) and reuses them on the next start; it returns where they are, never the values.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

WEBHOOK_SECRET_ENV = "MULTIBROKER_WEBHOOK_SECRET"
ADMIN_TOKEN_ENV = "MULTIBROKER_ADMIN_TOKEN"
ALLOW_IPS_ENV = "MULTIBROKER_ALLOW_IPS"
NOTIFY_URL_ENV = "MULTIBROKER_NOTIFY_URL"
NOTIFY_FORMAT_ENV = "MULTIBROKER_NOTIFY_FORMAT"
NOTIFY_MIN_SEVERITY_ENV = "MULTIBROKER_NOTIFY_MIN_SEVERITY"
WEBHOOK_SECRET_FILE = "webhook-secret"
ADMIN_TOKEN_FILE = "admin-token"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting."""


def parse_networks(text: str | None) -> tuple[IPNetwork, ...]:
    """``"127.0.0.1, 52.89.214.238, 10.0.0.0/8"`` -> networks; empty means no allow-list."""
    out = []
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{ALLOW_IPS_ENV}: {part!r} is not an IP address or network") from None
    return tuple(out)


@dataclass(frozen=True)
class ServiceConfig:
    rules_dir: Path = Path("rules")
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    """Loopback by default: exposing the service is a deliberate act (a reverse proxy with TLS in front)."""
    port: int = 8787
    webhook_secret: str | None = field(default=None, repr=False)
    """Shared secret of every strategy the rules give no own variable (``routing.strategy_secrets``)."""
    admin_token: str | None = field(default=None, repr=False)
    """Bearer token of the admin API; None makes the admin API answer 503 rather than run unprotected."""
    max_body_bytes: int = 64 * 1024
    idempotency_window_s: float = 24 * 3600
    """How long a signal's ``id`` (or its content key, when it carries a ``time``) is remembered."""
    content_key_window_s: float = 300
    """Window for a key derived from a body with neither ``id`` nor ``time``: such a body may legitimately repeat
    later (the same "buy 1" an hour on), so only quick repeats (double fire, proxy retry) count as duplicates."""
    max_signal_age_s: float = 60
    """A signal whose ``time`` is further than this in the past (or the future) is refused as stale."""
    allow_ips: tuple[IPNetwork, ...] = ()
    """Source addresses allowed to post webhooks; empty allows any (the secret still applies)."""
    paper_tick_s: float = 1.0
    startup_check: bool = False
    """Run ``multibroker brokers check`` against every broker in the background at start-up and log the report
    (``multibroker serve`` turns it on; off here so tests and embedders opt in)."""
    """How often the shared paper price feed takes a random-walk step while paper brokers are configured (so
    marks and P&L move in a demo); 0 keeps prices still (tests, benchmarks)."""
    notify_url: str | None = field(default=None, repr=False)
    """Where alerts are pushed (``service.notify``); a secret (chat webhook URLs carry their token)."""
    notify_format: str = "auto"
    notify_min_severity: str = "info"
    env: Mapping[str, str] = field(default_factory=lambda: os.environ, repr=False, compare=False)
    """Where per-strategy secret variables are read (the process environment unless a test says otherwise)."""

    def __post_init__(self) -> None:
        if self.max_body_bytes < 256:
            raise ConfigError(f"max_body_bytes={self.max_body_bytes}: too small for any signal (>= 256)")
        if self.idempotency_window_s <= 0 or self.content_key_window_s <= 0:
            raise ConfigError("idempotency windows must be positive")
        if self.max_signal_age_s <= 0:
            raise ConfigError(f"max_signal_age_s={self.max_signal_age_s}: must be positive")
        if self.paper_tick_s < 0:
            raise ConfigError(f"paper_tick_s={self.paper_tick_s}: must be >= 0 (0 disables)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range")
        if self.notify_url is not None or (self.notify_format, self.notify_min_severity) != ("auto", "info"):
            from service.notify import notifier_for  # noqa: PLC0415 - notify imports aiohttp: only when used
            notifier_for(self)  # a wrong URL or format is said at start-up, not at the first alert

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ServiceConfig:
        """Secrets and the allow-list from the environment; everything else from ``overrides`` or defaults."""
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "webhook_secret": env.get(WEBHOOK_SECRET_ENV) or None,
            "admin_token": env.get(ADMIN_TOKEN_ENV) or None,
            "allow_ips": parse_networks(env.get(ALLOW_IPS_ENV)),
            "notify_url": env.get(NOTIFY_URL_ENV) or None,
            "notify_format": env.get(NOTIFY_FORMAT_ENV) or "auto",
            "notify_min_severity": env.get(NOTIFY_MIN_SEVERITY_ENV) or "info",
            "env": env,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("rules_dir", "data_dir"):
            if key in values:
                values[key] = Path(str(values[key]))
        return cls(**values)  # type: ignore[arg-type]

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.db"

    def strategy_secret(self, env_name: str) -> str | None:
        return self.env.get(env_name) or None

    def ensure_secrets(self) -> tuple[ServiceConfig, list[Path]]:
        """Fill a missing webhook secret / admin token from (or into) files in the data directory.

        Returns the completed config and the files it read or created, so the caller can say where they are.
        """
        used: list[Path] = []
        config = self
        if config.webhook_secret is None:
            path = self.data_dir / WEBHOOK_SECRET_FILE
            config = replace(config, webhook_secret=read_or_create_secret(path))
            used.append(path)
        if config.admin_token is None:
            path = self.data_dir / ADMIN_TOKEN_FILE
            config = replace(config, admin_token=read_or_create_secret(path))
            used.append(path)
        return config, used


def read_or_create_secret(path: Path) -> str:
    """The secret stored in ``path``; a new random one (created 0600, never world-readable) if there is none."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    if value:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)
    return value
