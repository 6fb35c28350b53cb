"""Commands that make and publish releases: inspect, build, publish, rollback."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..errors import ZmqModelsError
from . import publishing
from .group import cli
from .options import (
    bind_to,
    build_from_options,
    built_release,
    connect_to,
    curve_from,
    curve_options,
    defaults_of_compile,
    load_signing_key,
    model_name,
    run_until_signalled,
    signing_option,
    source_options,
)
from .render import emit_json, finish_publish

__all__: list[str] = []


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, as_json: bool) -> None:
    """Print a TorchScript file's or stored release's headers and parameters (without torch:
    the archive's tensor table is read from its zip, nothing in it runs)."""
    import msgspec

    from ..release.archive import tensor_table
    from ..release.store import MAGIC, read_release_file

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
        table = tensor_table(release.archive())
    else:
        try:
            table = tensor_table(str(p))
        except ZmqModelsError as exc:
            raise ZmqModelsError(f"{path} is neither a release nor a TorchScript archive: {exc}") from None
    rows = [{"name": t.name, "kind": t.kind, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel,
             "bytes": t.nbytes} for t in table]
    params = [r for r in rows if r["kind"] == "parameter"]
    totals = {"parameters": sum(r["numel"] for r in params),
              "parameter_bytes": sum(r["bytes"] for r in params),
              "tensors": len(rows)}
    if as_json:
        emit_json({"path": path, "release": headers, "tensors": rows, "totals": totals})
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


@cli.command()
@source_options
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Release store directory.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@signing_option
def build(store_dir: str, as_json: bool, signing_key: str | None, **opts: Any) -> None:
    """Compile SOURCE, prove parity, and store the release (no hub needed)."""
    from ..release.store import Store

    store = Store(store_dir)
    key = load_signing_key(signing_key)
    release = build_from_options(**opts, progress=None if as_json else click.echo)
    if key is not None:
        release = key.seal(release, store.reserve(release.manifest.name))
    stored, pruned = store.put(release)
    m = stored.manifest
    if as_json:
        emit_json({"name": m.name, "label": m.label, "seq": m.seq, "sha256": m.archive_sha256,
                    "path": str(store.path(m.name, m.seq)), "pruned": pruned})
    else:
        click.echo(f"stored {m.name} {m.label or '-'} seq {m.seq} at {store.path(m.name, m.seq)}")
        if pruned:
            click.echo(f"retention pruned seq {', '.join(map(str, pruned))} (keeps "
                       f"{store.retention.describe()}, the active, staged and pinned ones)")


@cli.command()
@source_options
@click.option("--hub", "hub_addr", callback=connect_to, multiple=True,
              help="Hand the release to the hub at this address (repeat it for hubs on one shared "
                   "store: tried in turn).")
@click.option("--bind", "bind_addr", callback=bind_to,
              help="No hub: publish from this process on this address.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=".zmqmodels/releases",
              show_default=True, help="Store for --bind mode.")
@click.option("--wait-for", "wait_for", type=int, default=0,
              help="Return once this many nodes serve the new release (with --staged: hold it "
                   "staged); a rejection fails.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait.")
@click.option("--staged", is_flag=True,
              help="Nodes receive, verify and cache it but keep serving what they serve until "
                   "`zmqmodels activate` (or --waves).")
@click.option("--waves", default="", metavar="1,10%,50%,100%",
              help="Activate it in cumulative waves of nodes (counts or shares; canary-labelled "
                   "nodes first), halting on a failure. Implies --staged.")
@click.option("--wave-wait", "wave_wait", type=float, default=30.0, show_default=True,
              help="Seconds to watch each wave once it serves, before the next.")
@click.option("--halt-on", "halt_on", multiple=True, metavar="rejected|error-rate>1%",
              help="Halt the waves on this (rejected is always on). Repeatable.")
@click.option("--confirm-timeout", "confirm_s", type=float, default=120.0, show_default=True,
              help="Seconds a wave's node has to serve it before the wave fails.")
@click.option("--like", "like", callback=model_name, metavar="NAME",
              help="No SOURCE: publish the --weights checkpoint in the code of the NAME release "
                   "the fleet serves (no compiling; only changed bytes move).")
@click.option("--partial", is_flag=True,
              help="With --like: the checkpoint may hold a subset of the tensors (the others keep "
                   "their bytes); without it a missing tensor is an error.")
@click.option("--reuse-label", "reuse_label", is_flag=True,
              help="Store it even if a stored release of the model already has its --label.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@signing_option
@curve_options(server=False, client=True)
def publish(**options: Any) -> None:
    """Compile SOURCE (or take a release `build` stored) and broadcast it; or, with --weights
    CKPT --like NAME, new weights for the code NAME serves. A release of the code the fleet
    serves goes as a delta (only changed tensors move). Optionally wait for the rollout.
    --json adds the seconds of each step under "timings" and what reached each node."""
    import time

    from .. import IMPORTED_AT

    timings = {"cli_import": time.perf_counter() - IMPORTED_AT}
    p = PublishPlan.from_options(**options)  # usage errors before anything is read
    key = load_signing_key(p.signing_key)
    say = (lambda msg: click.echo(msg, err=True)) if p.as_json else click.echo
    if p.bind:
        return _publish_bound(p, key, say)
    assert p.hub
    t0 = time.monotonic()
    release = None if p.like else built_release(**p.opts)  # checked before the hub is asked
    timings["read"] = time.monotonic() - t0
    from ..clients.hub import HubClient

    client = HubClient(p.hub, timeout=p.timeout, curve=curve_from(p.curve_key, p.curve_server))
    try:  # before compiling: a hub that does not answer is an error in seconds, not minutes
        status = client.status(timeout=min(p.timeout, 5.0))
    except ZmqModelsError as exc:
        hubs = ", ".join(p.hub)
        raise ZmqModelsError(f"hub {hubs} does not answer ({exc}); nothing was compiled") from None
    t0 = time.monotonic()
    kw = {"timeout": p.timeout, "signing_key": key, "staged": p.staged, "plan": p.plan,
          "reuse_label": p.reuse_label}
    if p.like:
        done = publishing.publish_weights(client, p.like, p.opts, timings, say, partial=p.partial, **kw)
        sent = 0
        say(f"hub stored {done.name} seq {done.seq} ({done.label}: new weights in the code the fleet "
            f"serves) in {time.monotonic() - t0:.2f}s; broadcasting")
    else:
        if release is None:
            del timings["read"]
            release = _compile_on_base(client, status, p.opts, timings, say)
        release, line = _prepared(client, status, release, timings)
        sent = release.manifest.compressed_bytes
        done = _send(client, release, line, kw, timings, say)
        say(f"hub stored {done.name} seq {done.seq} in {time.monotonic() - t0:.2f}s; broadcasting")
    publishing.after_store(client, " --hub ".join(p.hub), done, p.waves, p.staged, p.wait_for, p.timeout,
                           p.as_json, say,
                           timings, reuse_label=p.reuse_label, sent_bytes=sent)


@dataclass(frozen=True)
class PublishPlan:
    """What one ``zmqmodels publish`` is to do, from its options, with the rules between them
    checked (:meth:`from_options` raises the usage error before anything is read). ``opts``:
    what builds or reads the release (SOURCE, --weights, compile options)."""

    hub: list[str]  # several: hubs on one shared store, tried in turn
    bind: str | None
    store_dir: str
    wait_for: int
    timeout: float
    staged: bool
    waves: list[str]
    plan: Any  # the wave plan (protocol.WavePlan), None without --waves
    like: str | None
    partial: bool
    reuse_label: bool
    as_json: bool
    signing_key: str | None
    curve_key: str | None
    curve_server: str | None
    opts: dict[str, Any]

    @classmethod
    def from_options(cls, *, hub_addr: tuple[str, ...], bind_addr: str | None, store_dir: str,
                     wait_for: int, timeout: float, staged: bool, waves: str, wave_wait: float,
                     halt_on: tuple[str, ...],
                     confirm_s: float, like: str | None, partial: bool, reuse_label: bool, as_json: bool,
                     signing_key: str | None, curve_key: str | None, curve_server: str | None,
                     **opts: Any) -> PublishPlan:
        wave_list = [w for w in waves.split(",") if w.strip()]
        plan = _check_publish(hub_addr, bind_addr, wave_list, wait_for, halt_on, wave_wait, confirm_s,
                              curve_server, like, partial, opts)
        return cls(list(hub_addr), bind_addr, store_dir, wait_for, timeout, staged or plan is not None,
                   wave_list,
                   plan, like, partial, reuse_label, as_json, signing_key, curve_key, curve_server, opts)


def _check_publish(hub_addr: tuple[str, ...], bind_addr: str | None, wave_list: list[str],
                   wait_for: int, halt_on: tuple[str, ...], wave_wait: float, confirm_s: float,
                   curve_server: str | None,
                   like: str | None, partial: bool, opts: dict[str, Any]) -> Any:
    """The option rules of ``publish`` (usage errors before anything is read); the wave plan."""
    if bool(hub_addr) == bool(bind_addr):
        raise click.UsageError("give exactly one of --hub ADDR or --bind ADDR")
    if wave_list and wait_for:
        raise click.UsageError("--waves waits for its own waves; drop --wait-for")
    if halt_on and not wave_list:
        raise click.UsageError("--halt-on needs --waves")
    if bind_addr and curve_server:
        raise click.UsageError("--curve-server is for --hub; with --bind this process is the hub")
    if partial and not like:
        raise click.UsageError("--partial is for --weights CKPT --like NAME")
    if like:
        given = [f"--{k.replace('_', '-')}" for k, v in opts.items()
                 if k not in ("weights", "label", "meta") and v not in defaults_of_compile]
        if given or not opts.get("weights") or not hub_addr:
            drop = f": drop {', '.join(given)}" if given else ""
            raise click.UsageError("--like NAME takes --weights CKPT and --hub ADDR (and --label, "
                                   f"--meta, --partial), no SOURCE or compile options{drop}")
    if not wave_list:
        return None
    from .. import protocol as P
    from ..core.waves import check_plan

    plan = P.WavePlan(wave_list, wave_wait, list(halt_on), confirm_s)
    check_plan(plan)  # bad syntax fails before compiling
    return plan


def _compile_on_base(client: Any, status: Any, opts: dict[str, Any], timings: dict[str, float],
                     say: Any) -> Any:
    """Compile SOURCE as the model the fleet serves under that name would have it: its codec
    (unless --codec), chunking and examples (unless given), and built on it when the code is
    the same but the tensors lie elsewhere (then, and only then, that release is fetched)."""
    import time

    from ..core.fleet import base_seq

    t0 = time.perf_counter()
    head = None
    try:
        seq = base_seq(status, opts["name"]) if opts.get("name") else None
        if seq is not None:
            head = client.fetch(opts["name"], seq, manifest_only=True).manifest
    except ZmqModelsError as exc:
        say(f"no base release: {exc}")
    timings["base"] = time.perf_counter() - t0

    def base() -> Any:
        try:
            return client.base_of(head)
        except ZmqModelsError as exc:
            say(f"whole release: the base did not come ({exc})")
            return None

    return build_from_options(**opts, base=head, base_release=base if head is not None else None,
                              progress=say, timings=timings)


def _prepared(client: Any, status: Any, release: Any, timings: dict[str, float]) -> tuple[Any, str]:
    """``release`` as a delta on the release the fleet serves, when it holds the same code
    (built on it already, or rebuilt here), and the line that says so."""
    import time

    if release.signature:
        return release, "signed as built: sent as it is"
    t0 = time.perf_counter()
    m = release.manifest
    built_on = int(m.metadata.get("weights_of") or 0) if m.compile_method != "weights" else 0
    if built_on:
        from ..release.rebase import delta_line

        line = delta_line(client.fetch(m.name, built_on, manifest_only=True).manifest, m)
    else:
        release, line = client.prepare(release, status=status)
    timings["delta"] = time.perf_counter() - t0
    return release, line


def _send(client: Any, release: Any, line: str, kw: dict[str, Any], timings: dict[str, float],
          say: Any) -> Any:
    """Hand ``release`` to the hub, saying ``line`` first; from the moment it says it is
    sending, Ctrl-C asks the hub what became of it."""
    import time

    ticker = None
    t1 = time.perf_counter()
    m = release.manifest
    try:
        say(f"{line}; sending {m.compressed_bytes / 2**20:.1f} MiB in {m.chunk_count} chunk(s) to the hub")
        ticker = publishing.Ticker("sending and waiting for the hub to verify and store it")
        done = client.publish(release, rebase=False, **kw)
    except KeyboardInterrupt:
        if ticker is not None:
            ticker.stop()
        say(f"interrupted while sending: {publishing.accepted(client, release.manifest)}")
        sys.exit(130)
    finally:
        if ticker is not None:
            ticker.stop()
    timings["hub_store"], timings["broadcast"] = done.store_s, done.broadcast_s
    timings["send"] = max(0.0, time.perf_counter() - t1 - done.store_s - done.broadcast_s)
    return done


def _publish_bound(p: PublishPlan, key: Any, say: Any) -> None:
    """``publish --bind``: this process is the hub, over ``p.store_dir``."""
    import time

    from ..hub.hub import Hub
    from ..release.store import Store

    assert p.bind
    release = built_release(**p.opts) or build_from_options(**p.opts, progress=say)
    curve = curve_from(p.curve_key) if p.curve_key else None
    with Hub(p.bind, Store(p.store_dir), signing_key=key, curve=curve) as pub:  # type: ignore[arg-type]
        m = pub.publish(release, timeout=p.timeout, staged=p.staged, plan=p.plan, reuse_label=p.reuse_label)
        say(f"publishing {m.name} seq {m.seq} on {pub.address} (PUB {pub.pub_address})")
        if p.waves:
            publishing.watch_waves(pub.status, m.name, m.seq, p.timeout, p.as_json, say)
            return
        if p.wait_for:
            ok, status = pub.wait_for(m.name, m.seq, p.wait_for, p.timeout, staged=p.staged)
        else:
            say("serving until Ctrl-C (or --timeout)")
            deadline = time.monotonic() + p.timeout
            run_until_signalled(lambda: time.monotonic() > deadline)
            ok, status = True, pub.status()
        finish_publish(ok, status, m.name, m.seq, m.label, p.wait_for, p.as_json, say, staged=p.staged)


@cli.command()
@click.argument("name")
@click.option("--to", "to", required=True, help="The label or seq of a stored release.")
@click.option("--hub", "hub_addr", callback=connect_to, required=True, multiple=True,
              help="A hub's address; repeat it for hubs on one shared store (tried in turn).")
@click.option("--wait-for", "wait_for", type=int, default=0)
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@signing_option
@curve_options(server=False, client=True)
def rollback(name: str, to: str, hub_addr: tuple[str, ...], wait_for: int, timeout: float, as_json: bool,
             signing_key: str | None, curve_key: str | None, curve_server: str | None) -> None:
    """Re-broadcast stored content of NAME under a new seq (signed anew with --signing-key)."""
    from ..clients.hub import HubClient

    client = HubClient(hub_addr, timeout=timeout, curve=curve_from(curve_key, curve_server))
    done = client.rollback(name, to, timeout=timeout, signing_key=load_signing_key(signing_key))
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    say(f"rolled {name} back to {to!r} as seq {done.seq}")
    ok, st = client.wait_for(name, done.seq, wait_for, timeout) if wait_for else (True, client.status())
    finish_publish(ok, st, name, done.seq, done.label, wait_for, as_json, say)
