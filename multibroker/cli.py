"""The ``multibroker`` command line.

Each subcommand lives in its own module under ``multibroker.commands`` and exposes a click command as ``command``;
this group adds every one it finds, so a new command never needs an edit here. Exit codes are the same everywhere:
0 success, 1 the thing checked is not OK (invalid rules, a failing broker), 2 usage or input errors.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import click

import multibroker.commands
from multibroker import __version__


class _Group(click.Group):
    """Commands are found in ``multibroker.commands`` and imported only when used.

    Lazy import keeps ``multibroker validate`` (a pre-commit hook, run on every commit) free of the service's heavy
    imports (pandas for the exchange calendar, aiohttp, durable-rules). Usage errors exit 2 with click's message;
    anything unexpected is one line on stderr, not a traceback.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [m.name for m in pkgutil.iter_modules(multibroker.commands.__path__) if not m.name.startswith("_")]
        return sorted(set(names) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if not cmd_name.isidentifier() or cmd_name not in self.list_commands(ctx):
            return None
        module = importlib.import_module(f"multibroker.commands.{cmd_name}")
        command = getattr(module, "command", None)
        return command if isinstance(command, click.Command) else None

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        except Exception as exc:  # pragma: no cover - last line of defence
            logging.getLogger("multibroker").debug("unhandled error", exc_info=True)
            click.echo(f"multibroker: internal error: {type(exc).__name__}: {exc}", err=True)
            raise SystemExit(70) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="multibroker")
def cli() -> None:
    """Route TradingView-style signals to futures accounts at several brokers, under YAML rules."""


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    cli.main(args=argv, prog_name="multibroker")


if __name__ == "__main__":  # pragma: no cover
    main()
