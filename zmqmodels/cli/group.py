"""The ``zmqmodels`` click group: one-line errors, ``--debug`` tracebacks, ``--version``.
Command modules register on it; ``zmqmodels.cli`` imports them and runs it."""

from __future__ import annotations

import traceback
from typing import Any

import click

from .. import __version__
from ..errors import ZmqModelsError

__all__ = ["cli"]


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
    """Roll PyTorch models (TorchScript or torch.export packages) out to a fleet over ZeroMQ."""
    ctx.obj = {"debug": debug}
