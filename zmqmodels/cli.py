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
        headers["signature"] = release.signature.hex() or "(unsigned)"
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


def _curve(curve_key: str | None, curve_server: str | None = None,
           curve_allow: tuple[str, ...] = ()) -> Any:
    """The :class:`Curve` these options describe, or None. A client given only the server's
    key gets a throwaway key pair: encrypted, the server proven, the client anonymous."""
    if not (curve_key or curve_server or curve_allow):
        return None
    from .curve import Curve

    if curve_key:
        return Curve.load(curve_key, curve_server, curve_allow)
    if curve_allow:
        raise click.UsageError("--curve-allow needs --curve-key (the server's own certificate)")
    return Curve.ephemeral(curve_server)  # type: ignore[arg-type]


def _signing_key(path: str | None) -> Any:
    if not path:
        return None
    from .signing import SigningKey

    return SigningKey.load(path)


def _trust(paths: tuple[str, ...]) -> Any:
    from .signing import Trust

    return Trust.load(paths)


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def _limits(pairs: tuple[str, ...]) -> Any:
    import dataclasses

    from .defaults import Limits

    names = {f.name for f in dataclasses.fields(Limits)}
    values: dict[str, int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in names:
            raise click.BadParameter(f"{pair!r}: use NAME=VALUE with NAME one of {', '.join(sorted(names))}",
                                     param_hint="--limit")
        scale = _UNITS.get(value[-1:].upper(), 1)
        try:
            values[key] = int(float(value[:-1] if scale > 1 else value) * scale)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: {value!r} is not a number", param_hint="--limit") from None
        if values[key] <= 0:
            raise click.BadParameter(f"{pair!r}: a limit must be positive", param_hint="--limit")
    return Limits(**values)


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
    return _apply(fn, opts)


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
@signing_option
def build(store_dir: str, as_json: bool, signing_key: str | None, **opts: Any) -> None:
    """Compile SOURCE, prove parity, and store the release (no hub needed)."""
    from .store import Store

    store = Store(store_dir)
    key = _signing_key(signing_key)
    release = build_from_options(**opts, progress=None if as_json else click.echo)
    if key is not None:
        release = key.seal(release, store.reserve(release.manifest.name))
    stored = store.put(release)
    m = stored.manifest
    if as_json:
        _emit_json({"name": m.name, "label": m.label, "seq": m.seq, "sha256": m.archive_sha256,
                    "path": str(store.path(m.name, m.seq))})
    else:
        click.echo(f"stored {m.name} {m.label or '-'} seq {m.seq} at {store.path(m.name, m.seq)}")


def _fleet_table(status: Any, name: str | None = None) -> str:
    """The fleet as text: one row per (node, model)."""
    head = ("NODE", "HOST", "PID", "DEVICE", "MODEL", "VERSION", "SEQ", "STATE", "AGE", "LAST ERROR")
    rows = [head]
    for n in status.nodes:
        if name is not None and n.model != name:
            continue
        err = n.last_error or n.reason
        if n.rejected_seq:
            err = f"seq {n.rejected_seq}: {err}"
        rows.append((n.node, n.host, str(n.pid), n.device or "-", n.model, n.label or "-",
                     str(n.seq), n.state, f"{n.age_s:.1f}s", err[:60] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    models = ", ".join(f"{m.name} seq {m.seq} ({m.label or '-'})" for m in status.models)
    return f"hub {status.hub}: {models or 'no models'}\n" + "\n".join(lines)


def _status_json(status: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(status)


def _run_until_signalled(stop_check: Any = None) -> None:
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


@cli.command()
@click.option("--bind", "bind_addr", required=True, help="tcp://HOST:PORT or ipc://PATH (PUB: derived).")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("--heartbeat", type=float, default=defaults.HEARTBEAT_INTERVAL_S, show_default=True,
              help="Seconds between heartbeats.")
@click.option("--retain", type=int, default=defaults.RETAIN_PER_NAME, show_default=True,
              help="Releases kept per model.")
@signing_option
@trust_option
@curve_options(server=True, client=False)
@click.option("--curve-publisher", "curve_publishers", multiple=True, type=click.Path(exists=True),
              help="Only these CURVE keys may publish, roll back or reserve (else: any admitted).")
@limit_option
def hub(bind_addr: str, store_dir: str, heartbeat: float, retain: int, signing_key: str | None,
        trust: tuple[str, ...], curve_key: str | None, curve_allow: tuple[str, ...],
        curve_publishers: tuple[str, ...], limits: tuple[str, ...]) -> None:
    """Run a hub: store releases, broadcast them, repair nodes, collect fleet status."""
    import logging

    from .hub import Publisher
    from .store import Store

    curve = _curve(curve_key, None, curve_allow)
    control = None
    if curve_publishers:
        from .curve import public_keys

        if curve is None or curve.allow is None:
            raise click.UsageError("--curve-publisher needs --curve-key and --curve-allow")
        control = public_keys(curve_publishers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with Publisher(bind_addr, Store(store_dir, retain=retain), heartbeat_interval_s=heartbeat,
                   signing_key=_signing_key(signing_key), trust=_trust(trust), curve=curve,
                   control_keys=control, limits=_limits(limits)) as h:
        click.echo(f"hub {h.hub_id} listening on {h.address} (PUB {h.pub_address}); Ctrl-C stops",
                   err=True)
        _run_until_signalled()


@cli.command()
@source_options
@click.option("--hub", "hub_addr", help="Hand the release to the hub at this address.")
@click.option("--bind", "bind_addr", help="No hub: publish from this process on this address.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=".zmqmodels/releases",
              show_default=True, help="Store for --bind mode.")
@click.option("--wait-for", "wait_for", type=int, default=0,
              help="Return once this many nodes serve the new release (a rejection fails).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@signing_option
@curve_options(server=False, client=True)
def publish(hub_addr: str | None, bind_addr: str | None, store_dir: str, wait_for: int,
            timeout: float, as_json: bool, signing_key: str | None, curve_key: str | None,
            curve_server: str | None, **opts: Any) -> None:
    """Compile SOURCE, build a release and broadcast it; optionally wait for the rollout."""
    import time

    if bool(hub_addr) == bool(bind_addr):
        raise click.UsageError("give exactly one of --hub ADDR or --bind ADDR")
    if bind_addr and curve_server:
        raise click.UsageError("--curve-server is for --hub; with --bind this process is the hub")
    key = _signing_key(signing_key)
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    t0 = time.monotonic()
    release = build_from_options(**opts, progress=say)
    say(f"built in {time.monotonic() - t0:.2f}s; sending")
    if hub_addr:
        from .control import HubClient

        client = HubClient(hub_addr, timeout=timeout, curve=_curve(curve_key, curve_server))
        done = client.publish(release, timeout=timeout, signing_key=key)
        name, seq, label = done.name, done.seq, done.label
        say(f"hub stored {name} seq {seq}; broadcasting")
        ok, status = (client.wait_for(name, seq, wait_for, timeout) if wait_for
                      else (True, client.status()))
        _finish_publish(ok, status, name, seq, label, wait_for, as_json, say)
        return
    from .hub import Publisher
    from .store import Store

    curve = _curve(curve_key) if curve_key else None
    with Publisher(bind_addr, Store(store_dir), signing_key=key,  # type: ignore[arg-type]
                   curve=curve) as pub:
        m = pub.publish(release, timeout=timeout)
        say(f"publishing {m.name} seq {m.seq} on {pub.address} (PUB {pub.pub_address})")
        if wait_for:
            ok, status = pub.wait_for(m.name, m.seq, wait_for, timeout)
        else:
            say("serving until Ctrl-C (or --timeout)")
            deadline = time.monotonic() + timeout
            _run_until_signalled(lambda: time.monotonic() > deadline)
            ok, status = True, pub.status()
        _finish_publish(ok, status, m.name, m.seq, m.label, wait_for, as_json, say)


def _finish_publish(ok: bool, status: Any, name: str, seq: int, label: str, wait_for: int,
                    as_json: bool, say: Any) -> None:
    from .protocol import rollout

    serving, rejected = rollout(status, name, seq)
    if as_json:
        _emit_json({"ok": ok, "name": name, "seq": seq, "label": label, "serving": serving,
                    "rejected": rejected, "wait_for": wait_for, "status": _status_json(status)})
    else:
        say(_fleet_table(status, name))
        verdict = "ok" if ok else "FAILED"
        say(f"{verdict}: {name} seq {seq} serving on {serving} node(s)"
            + (f", wanted {wait_for}" if wait_for else "")
            + (f"; rejected by {', '.join(rejected)}" if rejected else ""))
    if not ok:
        sys.exit(1)


@cli.command()
@click.option("--hub", "hub_addr", required=True)
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@curve_options(server=False, client=True)
def status(hub_addr: str, timeout: float, as_json: bool, curve_key: str | None,
           curve_server: str | None) -> None:
    """Print the fleet table: what every node serves, its state and its last error."""
    from .control import HubClient

    st = HubClient(hub_addr, timeout=timeout, curve=_curve(curve_key, curve_server)).status()
    if as_json:
        _emit_json(_status_json(st))
    else:
        click.echo(_fleet_table(st))


@cli.command()
@click.argument("name")
@click.option("--to", "to", required=True, help="The label or seq of a stored release.")
@click.option("--hub", "hub_addr", required=True)
@click.option("--wait-for", "wait_for", type=int, default=0)
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@signing_option
@curve_options(server=False, client=True)
def rollback(name: str, to: str, hub_addr: str, wait_for: int, timeout: float, as_json: bool,
             signing_key: str | None, curve_key: str | None, curve_server: str | None) -> None:
    """Re-broadcast stored content of NAME under a new seq (signed anew with --signing-key)."""
    from .control import HubClient

    client = HubClient(hub_addr, timeout=timeout, curve=_curve(curve_key, curve_server))
    done = client.rollback(name, to, timeout=timeout, signing_key=_signing_key(signing_key))
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    say(f"rolled {name} back to {to!r} as seq {done.seq}")
    ok, st = client.wait_for(name, done.seq, wait_for, timeout) if wait_for else (True, client.status())
    _finish_publish(ok, st, name, done.seq, done.label, wait_for, as_json, say)


@cli.command()
@click.option("--hub", "hub_addr", help="The hub's address (omit to serve the cache alone).")
@click.option("--model", "models", multiple=True, required=True, help="Model name; repeatable.")
@click.option("--bind", "bind_addr", required=True, help="Address clients (REQ) connect to.")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Worker processes; with 2+ no request waits for a model load.")
@click.option("--device", "devices", multiple=True, default=("cpu",), show_default=True,
              help="cpu, cuda or cuda:N; once for all workers or once per worker.")
@click.option("--cache", "cache_dir", default=".zmqmodels/cache", show_default=True,
              type=click.Path(file_okay=False), help="Last validated release of each model.")
@click.option("--node-id", help="Name in the fleet table (default HOST-PID).")
@click.option("--swap-policy", type=click.Choice(["availability", "unload-first"]),
              default="availability", show_default=True,
              help="availability: load the new version beside the old; unload-first: free the "
                   "old one first (a GPU that cannot hold two).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per worker.")
@trust_option
@curve_options(server=True, client=True)
@limit_option
def serve(hub_addr: str | None, models: tuple[str, ...], bind_addr: str, workers: int,
          devices: tuple[str, ...], cache_dir: str, node_id: str | None, swap_policy: str,
          threads: int, trust: tuple[str, ...], curve_key: str | None, curve_server: str | None,
          curve_allow: tuple[str, ...], limits: tuple[str, ...]) -> None:
    """Serve inference (REQ/REP) with the newest valid release of each model.

    CURVE: --curve-key is this node's certificate, --curve-server the hub's, --curve-allow
    the clients admitted to --bind."""
    import logging

    from .node import Node

    if curve_server and not curve_key:
        raise click.UsageError("--curve-server needs --curve-key: the node's certificate also "
                               "secures its inference socket")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with Node(hub_addr, list(models), bind_addr, workers=workers, devices=list(devices),
              cache=cache_dir, node_id=node_id, swap_policy=swap_policy,
              threads_per_worker=threads, trust=_trust(trust),
              curve=_curve(curve_key, curve_server, curve_allow), limits=_limits(limits)) as node:
        click.echo(f"node {node.node_id} serving {', '.join(models)} on {node.address}; "
                   "Ctrl-C stops", err=True)
        _run_until_signalled()


def _parse_inputs(specs: tuple[str, ...]) -> tuple[Any, ...]:
    from .sources import load_example_file, parse_example_spec

    args: list[Any] = []
    for i, spec in enumerate(specs):
        if Path(spec).is_file():
            data = load_example_file(spec)
            args.extend(data if isinstance(data, tuple) else [data])
        else:
            args.extend(parse_example_spec(spec, seed=i))
    return tuple(args)


def _to_jsonable(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape),
                "data": x.float().tolist() if x.dtype == torch.bfloat16 else x.tolist()}
    if isinstance(x, tuple | list):
        return [_to_jsonable(i) for i in x]
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    return x


@cli.command()
@click.option("--server", required=True, help="A serving node's address.")
@click.option("--model", required=True)
@click.option("--input", "inputs", multiple=True, required=True,
              help="DIMx...[:dtype] (random) or a torch.save'd tensor/tuple file; one per argument.")
@click.option("--version", "version", type=int, default=0, help="Pin a seq (0: whatever is served).")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option("--retries", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@curve_options(server=False, client=True)
def infer(server: str, model: str, inputs: tuple[str, ...], version: int, timeout: float,
          retries: int, as_json: bool, curve_key: str | None, curve_server: str | None) -> None:
    """Send one inference request and print the outputs and the version that served them."""
    from .client import Client

    args = _parse_inputs(inputs)
    with Client(server, timeout=timeout, retries=retries,
                curve=_curve(curve_key, curve_server)) as client:
        r = client.infer(model, *args, version=version)
    if as_json:
        _emit_json({"model": r.model, "label": r.label, "seq": r.seq, "worker": r.worker,
                    "latency_ms": round(r.latency_ms, 3), "queue_ms": r.queue_ms,
                    "infer_ms": r.infer_ms, "attempts": r.attempts, "outputs": _to_jsonable(r.outputs)})
        return
    click.echo(f"{r.model} {r.label or '-'} (seq {r.seq}) served by {r.worker} in "
               f"{r.latency_ms:.2f} ms (model {r.infer_ms:.2f} ms)")
    click.echo(str(r.outputs))


@cli.group()
def keys() -> None:
    """Make the keys that secure a fleet."""


@keys.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write into (created; existing keys are never overwritten).")
@click.option("--curve", "curve_names", multiple=True, default=("hub", "node", "client"),
              show_default=True, help="CURVE certificates to make, by name; repeatable.")
@click.option("--no-signing", is_flag=True, help="CURVE certificates only.")
def keys_generate(out_dir: str, curve_names: tuple[str, ...], no_signing: bool) -> None:
    """Write an Ed25519 signing pair (signing.key, signing.pub) and CURVE certificates
    (public_keys/NAME.key, private_keys/NAME.key_secret). Secret files are mode 0600."""
    from .curve import generate_curve_keys
    from .signing import generate_signing_key

    out = Path(out_dir)
    planned = [out / "public_keys" / f"{n}.key" for n in curve_names]
    planned += [] if no_signing else [out / "signing.key", out / "signing.pub"]
    if any(p.exists() for p in planned):
        raise ZmqModelsError(f"{next(p for p in planned if p.exists())} exists; not overwriting keys")
    written: list[Path] = []
    if not no_signing:
        written += generate_signing_key(out_dir)
    written += generate_curve_keys(out_dir, curve_names)
    for p in written:
        click.echo(str(p))


def main() -> None:
    cli(prog_name="zmqmodels")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
