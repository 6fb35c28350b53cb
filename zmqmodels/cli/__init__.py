"""The ``zmqmodels`` command: the only package that imports click. Each command parses its
options, calls the library and prints (``options``: shared options; ``render``: tables and
JSON; ``release``: inspect, build, publish, rollback; ``fleet``: hub, status; ``serving``:
serve, infer; ``keys``). Errors, usage errors too: one line on stderr, exit 1 (``--debug``:
traceback). Ctrl-C: exit 130 (``status --watch``: 0, it is how one stops it)."""

from __future__ import annotations

import os
import sys

import click

from . import fleet, keys, release, serving  # noqa: F401  (they register their commands)
from .group import cli

__all__ = ["main", "cli"]


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


if __name__ == "__main__":  # pragma: no cover
    main()
