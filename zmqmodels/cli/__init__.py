"""The ``zmqmodels`` command: the only package that imports click. Each command parses its
options, calls the library and prints (``options``: shared options; ``render``: tables and
JSON; ``release``: inspect, build, publish, rollback; ``fleet``: hub, status; ``serving``:
serve, infer; ``keys``). Errors: one line on stderr, exit 1 (``--debug``: traceback)."""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click

from .. import __version__
from ..errors import ZmqModelsError

__all__ = ["main", "cli"]


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            kind = "error" if isinstance(exc, ZmqModelsError) else type(exc).__name__
            click.echo(f"{kind}: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="zmqmodels")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Roll TorchScript models out to a fleet over ZeroMQ."""
    ctx.obj = {"debug": debug}


def main() -> None:
    cli(prog_name="zmqmodels")


from . import fleet, keys, release, serving  # noqa: E402,F401  (they register their commands)

if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
