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
    """Usage errors exit 2 with click's message; anything unexpected is one line on stderr, not a traceback."""

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


def _add_commands() -> None:
    for info in sorted(pkgutil.iter_modules(multibroker.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"multibroker.commands.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            cli.add_command(command)


_add_commands()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    cli.main(args=argv, prog_name="multibroker")


if __name__ == "__main__":  # pragma: no cover
    main()
