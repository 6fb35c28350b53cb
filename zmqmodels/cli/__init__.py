"""The ``zmqmodels`` command: the only package that imports click. Each command parses its
options, calls the library and prints (``options``: shared options; ``render``: tables and
JSON; ``release``: inspect, build, publish, rollback; ``fleet``: hub, status; ``serving``:
serve, infer; ``keys``). Errors, usage errors too: one line on stderr, exit 1 (``--debug``:
traceback). Ctrl-C: exit 130 (``status --watch``: 0, it is how one stops it)."""

from __future__ import annotations

import os
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
        except (click.exceptions.Exit, click.ClickException, click.Abort, BrokenPipeError):
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
    try:
        code = cli.main(prog_name="zmqmodels", standalone_mode=False)
    except click.ClickException as exc:  # usage errors too: one line, like every other error
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see {exc.ctx.command_path} --help)"
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(1)
    except click.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:  # `zmqmodels ... | head -1`: the reader left; nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code if isinstance(code, int) else 0)


from . import fleet, keys, release, serving  # noqa: E402,F401  (they register their commands)

if __name__ == "__main__":  # pragma: no cover
    main()
