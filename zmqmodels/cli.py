"""The ``zmqmodels`` command. The only module that imports click; each command parses its
options, calls the library and prints. Errors: one line on stderr, exit 1 (``--debug``: traceback)."""

from __future__ import annotations

import io
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from . import __version__, defaults
from .errors import ZmqModelsError

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


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, as_json: bool) -> None:
    """Print a TorchScript file's or stored release's headers and parameters."""
    import msgspec
    import torch

    from .store import MAGIC, read_release_file

    p = Path(path)
    if not p.is_file():
        raise click.ClickException(f"no such file: {path}")
    with open(p, "rb") as f:
        is_release = f.read(len(MAGIC)) == MAGIC
    headers: dict[str, Any] | None = None
    if is_release:
        release = read_release_file(p)
        headers = msgspec.to_builtins(release.manifest)
        for key in ("examples", "expected"):  # tensors: summarise, do not dump bytes
            pack = headers.pop(key, None)
            headers[f"{key}_count"] = len(pack["spec"]["items"]) if pack else 0
        headers["signature"] = release.manifest.signature.hex()
        module = torch.jit.load(io.BytesIO(release.archive()), map_location="cpu")
    else:
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:
            raise ZmqModelsError(f"{path} is neither a release nor a TorchScript archive: "
                                 f"{str(exc).strip().splitlines()[0]}") from exc
    rows = [{"name": n, "kind": "parameter", "shape": list(t.shape),
             "dtype": str(t.dtype).removeprefix("torch."), "numel": t.numel(),
             "bytes": t.numel() * t.element_size()} for n, t in module.named_parameters()]
    rows += [{"name": n, "kind": "buffer", "shape": list(t.shape),
              "dtype": str(t.dtype).removeprefix("torch."), "numel": t.numel(),
              "bytes": t.numel() * t.element_size()} for n, t in module.named_buffers()]
    params = [r for r in rows if r["kind"] == "parameter"]
    totals = {"parameters": sum(r["numel"] for r in params),
              "parameter_bytes": sum(r["bytes"] for r in params),
              "tensors": len(rows)}
    if as_json:
        _emit_json({"path": path, "release": headers, "tensors": rows, "totals": totals})
        return
    if headers:
        for key, value in headers.items():
            click.echo(f"{key:18} {value}")
        click.echo("")
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        tag = "" if r["kind"] == "parameter" else "  (buffer)"
        click.echo(f"{r['name']:{width}}  {shape:>16}  {r['dtype']}{tag}")
    click.echo(f"total: {totals['parameters']:,} parameters, {totals['parameter_bytes']:,} bytes "
               f"in {len(params)} parameter tensors")


def source_options(fn: Any) -> Any:
    """The options that say what to compile; shared by ``build`` and ``publish``."""
    opts = [
        click.argument("source"),
        click.option("--name", required=True, help="Model name (topic and store key)."),
        click.option("--version", "label", default="", help="Your version label, e.g. v2 or a git sha."),
        click.option("--weights", type=click.Path(dir_okay=False), help="state_dict checkpoint."),
        click.option("--example-input", "example_specs", multiple=True,
                     help="DIMxDIM...[:dtype]; repeat for more examples, comma-join arguments."),
        click.option("--example-inputs", "example_file", type=click.Path(dir_okay=False),
                     help="A torch.save'd tensor, tuple (one example) or list (examples)."),
        click.option("--codec", default="auto", show_default=True,
                     help="auto, none, lz4, lz4hc, zstd, blosclz or zlib."),
        click.option("--chunk-mb", type=float, default=defaults.CHUNK_BYTES / 2**20, show_default=True),
        click.option("--no-trace", is_flag=True, help="Fail rather than fall back to tracing."),
        click.option("--meta", multiple=True, help="KEY=VALUE metadata; repeatable."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_from_options(source: str, name: str, label: str, weights: str | None,
                       example_specs: tuple[str, ...], example_file: str | None, codec: str,
                       chunk_mb: float, no_trace: bool, meta: tuple[str, ...],
                       progress: Any = None) -> Any:
    """Load, compile and build a release from CLI options (progress: a callable taking a str)."""
    from .compile import compile_model
    from .release import build_release
    from .sources import load_example_file, load_source, parse_example_spec

    say = progress or (lambda _msg: None)
    metadata = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        metadata[key] = value
    say(f"loading {source}")
    module, examples = load_source(source, weights=weights)
    if example_file:
        examples = load_example_file(example_file)
    elif example_specs:
        examples = [parse_example_spec(s, seed=i) for i, s in enumerate(example_specs)]
    if examples is None:
        raise click.UsageError("no example inputs: give --example-input or --example-inputs, "
                               "or return (module, examples) from the factory")
    say("compiling")
    compiled = compile_model(module, examples, allow_trace=not no_trace)
    say(f"compiled by {compiled.method}, parity max abs diff {compiled.max_abs_diff:.3g} "
        f"on {len(compiled.examples)} example(s)")
    for w in compiled.warnings:
        say(f"warning: {w}")
    say("compressing")
    release = build_release(compiled, name, label, codec=codec,
                            chunk_bytes=int(chunk_mb * 2**20), metadata=metadata)
    m = release.manifest
    say(f"archive {m.archive_bytes:,} B -> {m.compressed_bytes:,} B in {m.chunk_count} chunk(s), "
        f"codec {m.codec.name}/{m.codec.filter}")
    return release


@cli.command()
@source_options
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Release store directory.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def build(store_dir: str, as_json: bool, **opts: Any) -> None:
    """Compile SOURCE, prove parity, and store the release (no hub needed)."""
    from .store import Store

    store = Store(store_dir)
    release = build_from_options(**opts, progress=None if as_json else click.echo)
    stored = store.put(release)
    m = stored.manifest
    if as_json:
        _emit_json({"name": m.name, "label": m.label, "seq": m.seq, "sha256": m.archive_sha256,
                    "path": str(store.path(m.name, m.seq))})
    else:
        click.echo(f"stored {m.name} {m.label or '-'} seq {m.seq} at {store.path(m.name, m.seq)}")


def main() -> None:
    cli(prog_name="zmqmodels")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
