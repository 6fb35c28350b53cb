"""Options shared by several commands, and what they turn into (keys, trust, limits)."""

from __future__ import annotations

from typing import Any

import click

from .. import defaults

__all__ = ["connect_to", "bind_to",
           "signing_option", "trust_option", "curve_options", "limit_option", "source_options",
           "curve_from", "load_signing_key", "load_trust", "parse_limits", "build_from_options",
           "built_release",
           "run_until_signalled"]


def _endpoint(bind: bool) -> Any:
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from ..errors import ZmqModelsError
        from ..transport.endpoints import check_endpoint

        if value is None:
            return value
        try:
            if isinstance(value, tuple):  # a repeatable option
                if len(set(value)) != len(value):
                    raise click.BadParameter(f"an address is given twice: {', '.join(value)}", ctx=ctx,
                                             param=param)
                return tuple(check_endpoint(v, "address", bind=bind) for v in value)
            return check_endpoint(value, "address", bind=bind)
        except ZmqModelsError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return check


connect_to = _endpoint(bind=False)  # click callbacks: --hub, --server
bind_to = _endpoint(bind=True)  # --bind


def _apply(fn: Any, opts: list[Any]) -> Any:
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def signing_option(fn: Any) -> Any:
    return click.option("--signing-key", type=click.Path(dir_okay=False),
                        help="Ed25519 secret key (keys generate): sign what this publishes.")(fn)


def trust_option(fn: Any) -> Any:
    return click.option("--trust", "trust", multiple=True, type=click.Path(exists=True),
                        help="Trusted signer: a .pub key or a directory of them; repeatable. "
                             "With any, unsigned or otherwise signed releases are refused.")(fn)


def curve_options(server: bool, client: bool) -> Any:
    """``--curve-key`` always; ``--curve-server`` for commands that connect to a server,
    ``--curve-allow`` for commands that run one."""
    def deco(fn: Any) -> Any:
        opts = [click.option("--curve-key", type=click.Path(exists=True, dir_okay=False),
                             help="This process's CURVE secret certificate (NAME.key_secret).")]
        if client:
            opts.append(click.option("--curve-server", type=click.Path(exists=True, dir_okay=False),
                                     help="The server's CURVE public certificate (NAME.key): "
                                          "connect with CURVE."))
        if server:
            opts.append(click.option("--curve-allow", multiple=True, type=click.Path(exists=True),
                                     help="Admit only these CURVE public certificates (files or "
                                          "directories of *.key); repeatable."))
        return _apply(fn, opts)
    return deco


def limit_option(fn: Any) -> Any:
    return click.option("--limit", "limits", multiple=True, metavar="NAME=VALUE",
                        help="Override a hard limit, e.g. max_archive_bytes=2G; repeatable "
                             "(see docs/protocol.md §Limits).")(fn)


def curve_from(curve_key: str | None, curve_server: str | None = None,
           curve_allow: tuple[str, ...] = ()) -> Any:
    """The :class:`Curve` these options describe, or None. A client given only the server's
    key gets a throwaway key pair: encrypted, the server proven, the client anonymous."""
    if not (curve_key or curve_server or curve_allow):
        return None
    from ..transport.curve import Curve

    if curve_key:
        return Curve.load(curve_key, curve_server, curve_allow)
    if curve_allow:
        raise click.UsageError("--curve-allow needs --curve-key (the server's own certificate)")
    return Curve.ephemeral(curve_server)  # type: ignore[arg-type]


def load_signing_key(path: str | None) -> Any:
    if not path:
        return None
    from ..release.signing import SigningKey

    return SigningKey.load(path)


def load_trust(paths: tuple[str, ...]) -> Any:
    from ..release.signing import Trust

    return Trust.load(paths)


def parse_limits(pairs: tuple[str, ...]) -> Any:
    from ..defaults import Limits

    try:
        return Limits.parse(pairs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--limit") from None


def model_name(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Checked when parsed: a bad name is refused before anything is loaded or compiled."""
    from ..errors import ZmqModelsError
    from ..release.manifest import validate_name

    try:
        return validate_name(value) if value is not None else value
    except ZmqModelsError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def source_options(fn: Any) -> Any:
    """The options that say what to compile; shared by ``build`` and ``publish``."""
    opts = [
        click.argument("source", required=False),
        click.option("--name", callback=model_name,
                     help="Model name (topic and store key); required to compile SOURCE."),
        click.option("--label", "label", default="",
                     help="Your label for this release, e.g. v2 or a git sha."),
        click.option("--weights", type=click.Path(dir_okay=False), help="state_dict checkpoint."),
        click.option("--example-input", "example_specs", multiple=True,
                     help="DIMxDIM...[:dtype]; repeat for more examples, comma-join arguments."),
        click.option("--example-inputs", "example_file", type=click.Path(dir_okay=False),
                     help="A torch.save'd tensor, tuple (one example) or list (examples)."),
        click.option("--codec", default="auto", show_default=True,
                     help="auto, none, lz4, lz4hc, zstd, blosclz or zlib."),
        click.option("--chunk-mb", type=float, default=defaults.CHUNK_BYTES / 2**20, show_default=True),
        click.option("--no-trace", is_flag=True, help="Fail rather than fall back to tracing."),
        click.option("--trace", is_flag=True,
                     help="Compile by tracing, not scripting (one example suffices; a fallback "
                          "to tracing needs two that differ in every input)."),
        click.option("--meta", multiple=True, help="KEY=VALUE metadata; repeatable."),
        click.option("--format", "formats", multiple=True, metavar="torchscript|pt2",
                     help="Release format: torchscript (default), pt2 (torch.export + AOTInductor, "
                          "the weights kept apart from the compiled code), or both (repeat it, or "
                          "torchscript,pt2: one release carrying both; nodes serve the pt2 package "
                          "where it was compiled for their device, else the TorchScript)."),
        click.option("--batching", type=click.Choice(["auto", "on", "off"]), default="auto",
                     show_default=True,
                     help="auto: prove on the examples whether requests may be joined into one forward "
                          "and record it; on: also refuse a model that is not batch-invariant; off: "
                          "nodes serve it one request per forward."),
        click.option("--max-batch", "max_batch", type=int, default=defaults.PROOF_MAX_BATCH,
                     show_default=True, help="The largest batch to prove (nodes join no more)."),
    ]
    return _apply(fn, opts)


# what a compile option holds when it was not given
defaults_of_compile = (None, "", (), False, "auto", defaults.CHUNK_BYTES / 2**20, defaults.PROOF_MAX_BATCH)


def build_from_options(source: str, name: str, label: str, weights: str | None,
                       example_specs: tuple[str, ...], example_file: str | None, codec: str,
                       chunk_mb: float, no_trace: bool, trace: bool, meta: tuple[str, ...],
                       formats: tuple[str, ...] = (), batching: str = "auto",
                       max_batch: int = defaults.PROOF_MAX_BATCH,
                       progress: Any = None, timings: dict[str, float] | None = None,
                       base: Any = None, base_release: Any = None) -> Any:
    """:func:`zmqmodels.model.build.build_from_source` from CLI options. ``base``: the manifest of the
    release the fleet serves under that name, whose codec (unless ``--codec``) and examples
    (unless given) the new release takes; ``base_release()`` gives that release (a
    :class:`~zmqmodels.release.rebase.Base`) to build on when the code is the same."""
    from ..errors import SourceError
    from ..model.build import build_from_source, parse_metadata

    if not source:
        raise click.UsageError("missing SOURCE: a model file, module:attr, TorchScript file or built release")
    if trace and no_trace:
        raise click.UsageError("--trace and --no-trace contradict each other")
    if not name:
        raise click.UsageError("--name is required to compile SOURCE")
    try:
        metadata = parse_metadata(meta)
    except SourceError as exc:
        raise click.BadParameter(str(exc), param_hint="--meta") from None
    from ..errors import CompileError
    from ..model.pt2 import parse_formats

    try:
        formats = parse_formats(formats or ("torchscript",))
    except CompileError as exc:
        raise click.BadParameter(str(exc), param_hint="--format") from None
    import sys

    def chunk_bar(done: int, total: int) -> None:  # a live counter on a terminal only
        if progress is not None and sys.stderr.isatty() and total > 1:
            click.echo(f"\r  compressed {done}/{total} chunks", nl=done == total, err=True)

    if base is not None and codec == "auto":
        codec = base.codec  # a codec change would keep every chunk from matching the base's
    if base is not None and chunk_mb == defaults.CHUNK_BYTES / 2**20:
        chunk_mb = base.chunk_bytes / 2**20
    return build_from_source(source, name, label, weights=weights, example_specs=example_specs,
                             example_file=example_file, codec=codec, chunk_bytes=int(chunk_mb * 2**20),
                             base_examples=base, base=base_release,
                             allow_trace=not no_trace, method="trace" if trace else "auto",
                             metadata=metadata, progress=progress,
                             chunk_progress=chunk_bar, timings=timings, batching=batching,
                             max_batch=max_batch, formats=formats)


def built_release(source: str, name: str | None, **compile_opts: Any) -> Any:
    """The release in ``source`` if it is a built release file (``zmqmodels build`` wrote it),
    else None. Reading one imports neither torch nor blosc2: it is sent as it was built. An
    unsigned one takes the next seq where it is published; a signed one keeps its seq."""
    from pathlib import Path

    from ..release.store import MAGIC, read_release_file

    if not source:
        return None
    p = Path(source)
    try:
        with open(p, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
    except OSError:
        return None
    flags = {"example_specs": "--example-input", "example_file": "--example-inputs"}
    given = [flags.get(k, f"--{k.replace('_', '-')}") for k, v in compile_opts.items()
             if v not in defaults_of_compile]
    if given:
        raise click.UsageError(f"{', '.join(given)}: SOURCE is a built release; these apply to compiling")
    release = read_release_file(p)
    m = release.manifest
    if name and name != m.name:
        raise click.UsageError(f"--name {name}: {source} is a release of {m.name!r}")
    if not release.signature and m.seq:
        import msgspec

        from ..release.manifest import Release

        release = Release(msgspec.structs.replace(m, seq=0), release.chunks)
    return release


def run_until_signalled(stop_check: Any = None) -> None:
    """Sleep until SIGINT/SIGTERM (first: graceful; a second one exits at once)."""
    import signal
    import threading

    stop = threading.Event()
    count = [0]

    def handler(signum: int, _frame: Any) -> None:
        count[0] += 1
        if count[0] > 1:
            raise SystemExit(130)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop.wait(0.2):
        if stop_check is not None and stop_check():
            break
