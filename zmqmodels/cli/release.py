"""Commands that make and publish releases: inspect, build, publish, rollback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import ZmqModelsError
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

    from ..archive import tensor_table
    from ..store import MAGIC, read_release_file

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
    from ..store import Store

    store = Store(store_dir)
    key = load_signing_key(signing_key)
    release = build_from_options(**opts, progress=None if as_json else click.echo)
    if key is not None:
        release = key.seal(release, store.reserve(release.manifest.name))
    stored = store.put(release)
    m = stored.manifest
    if as_json:
        emit_json({"name": m.name, "label": m.label, "seq": m.seq, "sha256": m.archive_sha256,
                    "path": str(store.path(m.name, m.seq))})
    else:
        click.echo(f"stored {m.name} {m.label or '-'} seq {m.seq} at {store.path(m.name, m.seq)}")


@cli.command()
@source_options
@click.option("--hub", "hub_addr", callback=connect_to, help="Hand the release to the hub at this address.")
@click.option("--bind", "bind_addr", callback=bind_to,
              help="No hub: publish from this process on this address.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=".zmqmodels/releases",
              show_default=True, help="Store for --bind mode.")
@click.option("--wait-for", "wait_for", type=int, default=0,
              help="Return once this many nodes serve the new release (a rejection fails).")
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
              help="No SOURCE: publish the --weights checkpoint in the code of NAME's newest "
                   "release on the hub (no compiling; only changed bytes move).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@signing_option
@curve_options(server=False, client=True)
def publish(hub_addr: str | None, bind_addr: str | None, store_dir: str, wait_for: int,
            timeout: float, staged: bool, waves: str, wave_wait: float, halt_on: tuple[str, ...],
            confirm_s: float, like: str | None, as_json: bool, signing_key: str | None,
            curve_key: str | None, curve_server: str | None, **opts: Any) -> None:
    """Compile SOURCE (or take a release `build` stored) and broadcast it; or, with --weights
    CKPT --like NAME, new weights for NAME's current code. Optionally wait for the rollout.
    --json adds the seconds of each step under "timings"."""
    import time

    from .. import IMPORTED_AT

    timings = {"cli_import": time.perf_counter() - IMPORTED_AT}

    if bool(hub_addr) == bool(bind_addr):
        raise click.UsageError("give exactly one of --hub ADDR or --bind ADDR")
    wave_list = [w for w in waves.split(",") if w.strip()]
    if wave_list and wait_for:
        raise click.UsageError("--waves waits for its own waves; drop --wait-for")
    if halt_on and not wave_list:
        raise click.UsageError("--halt-on needs --waves")
    plan = None
    if wave_list:
        from .. import protocol as P
        from ..core.waves import check_plan

        plan = P.WavePlan(wave_list, wave_wait, list(halt_on), confirm_s)
        check_plan(plan)  # bad syntax fails before compiling
    staged = staged or plan is not None
    if bind_addr and curve_server:
        raise click.UsageError("--curve-server is for --hub; with --bind this process is the hub")
    if like:
        given = [f"--{k.replace('_', '-')}" for k, v in opts.items()
                 if k not in ("weights", "label", "meta") and v not in defaults_of_compile]
        if given or not opts.get("weights") or not hub_addr:
            drop = f": drop {', '.join(given)}" if given else ""
            raise click.UsageError("--like NAME takes --weights CKPT and --hub ADDR (and --label, "
                                   f"--meta), no SOURCE or compile options{drop}")
    key = load_signing_key(signing_key)
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    t0 = time.monotonic()
    # a release `build` stored: checked before the hub is asked
    release = None if like else built_release(**opts)
    timings["read"] = time.monotonic() - t0
    client = None
    if hub_addr:  # before compiling: a hub that does not answer is an error in seconds, not minutes
        from ..hub_client import HubClient

        client = HubClient(hub_addr, timeout=timeout, curve=curve_from(curve_key, curve_server))
        try:
            client.status(timeout=min(timeout, 5.0))
        except ZmqModelsError as exc:
            raise ZmqModelsError(f"hub {hub_addr} does not answer ({exc}); nothing was compiled") from None
    t0 = time.monotonic()
    if like:
        assert client is not None
        done = _publish_weights(client, like, opts, timings, say, timeout=timeout, signing_key=key,
                                staged=staged, plan=plan)
        name, seq, label = done.name, done.seq, done.label
        say(f"hub stored {name} seq {seq} ({label}: new weights in the code of the current release) "
            f"in {time.monotonic() - t0:.2f}s; broadcasting")
        _after_store(client, hub_addr, done, wave_list, staged, wait_for, timeout, as_json, say, timings)
        return
    if release is None:
        del timings["read"]
        release = build_from_options(**opts, progress=say, timings=timings)
        m = release.manifest
        ready = (f"built in {time.monotonic() - t0:.2f}s; sending {m.compressed_bytes / 2**20:.1f} MiB "
                 f"in {m.chunk_count} chunk(s)")
    else:
        m = release.manifest
        ready = (f"read {opts['source']}: {m.name} {m.label or '-'}, "
                 f"{m.compressed_bytes / 2**20:.1f} MiB in {m.chunk_count} chunk(s)")
    if client is None:
        say(ready)
    else:
        ticker = None
        t1 = time.perf_counter()
        try:  # from the moment it says it is sending, Ctrl-C asks the hub what became of it
            say(ready)
            ticker = _Ticker("sending and waiting for the hub to verify and store it")
            done = client.publish(release, timeout=timeout, signing_key=key, staged=staged, plan=plan)
        except KeyboardInterrupt:
            if ticker is not None:
                ticker.stop()
            say(f"interrupted while sending: {_accepted(client, m)}")
            sys.exit(130)
        finally:
            if ticker is not None:
                ticker.stop()
        timings["hub_store"], timings["broadcast"] = done.store_s, done.broadcast_s
        timings["send"] = max(0.0, time.perf_counter() - t1 - done.store_s - done.broadcast_s)
        say(f"hub stored {done.name} seq {done.seq} in {time.monotonic() - t0:.2f}s; broadcasting")
        _after_store(client, hub_addr, done, wave_list, staged, wait_for, timeout, as_json, say, timings)
        return
    from ..hub import Hub
    from ..store import Store

    curve = curve_from(curve_key) if curve_key else None
    with Hub(bind_addr, Store(store_dir), signing_key=key,  # type: ignore[arg-type]
             curve=curve) as pub:
        m = pub.publish(release, timeout=timeout, staged=staged, plan=plan)
        say(f"publishing {m.name} seq {m.seq} on {pub.address} (PUB {pub.pub_address})")
        if wave_list:
            _watch_waves(pub.status, m.name, m.seq, timeout, as_json, say)
            return
        if wait_for:
            ok, status = pub.wait_for(m.name, m.seq, wait_for, timeout)
        else:
            say("serving until Ctrl-C (or --timeout)")
            deadline = time.monotonic() + timeout
            run_until_signalled(lambda: time.monotonic() > deadline)
            ok, status = True, pub.status()
        finish_publish(ok, status, m.name, m.seq, m.label, wait_for, as_json, say, staged=staged)


def _publish_weights(client: Any, name: str, opts: dict[str, Any], timings: dict[str, float], say: Any,
                     **kw: Any) -> Any:
    """``publish --weights CKPT --like NAME``: the checkpoint, read with ``weights_only=True``,
    through :meth:`HubClient.publish_weights`."""
    import time

    from ..build import parse_metadata
    from ..errors import SourceError

    try:
        metadata = parse_metadata(opts.get("meta") or ())
    except SourceError as exc:
        raise click.BadParameter(str(exc), param_hint="--meta") from None
    t0 = time.perf_counter()
    import torch

    timings["import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        state = torch.load(opts["weights"], map_location="cpu", weights_only=True)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot read checkpoint {opts['weights']}: {why}") from None
    timings["load"] = time.perf_counter() - t0
    say(f"read {opts['weights']}; publishing its tensors in the code of {name}'s newest release")
    steps: dict[str, float] = {}
    done = client.publish_weights(name, state, label=opts.get("label") or "", metadata=metadata,
                                  timings=steps, **kw)
    timings.update({f"weights_{k}": v for k, v in steps.items()})
    timings["hub_store"], timings["broadcast"] = done.store_s, done.broadcast_s
    return done


def _after_store(client: Any, hub_addr: str, done: Any, wave_list: list[str], staged: bool,
                 wait_for: int, timeout: float, as_json: bool, say: Any, timings: dict[str, float]) -> None:
    """What ``publish --hub`` does once the hub stored the release: notes, waves or the wait."""
    import time

    from .. import IMPORTED_AT

    name, seq, label = done.name, done.seq, done.label
    if done.note:
        say(f"note: {done.note}")
    _warn_reused_label(client, name, seq, label, say)
    if wave_list:
        _watch_waves(client.status, name, seq, timeout, as_json, say)
        return
    if staged:
        say(f"staged: nodes cache seq {seq} and serve it once activated "
            f"(zmqmodels activate {name} --seq {seq} --hub {hub_addr})")
    t2 = time.perf_counter()
    try:
        ok, status = (_wait_with_progress(client, name, seq, wait_for, timeout, say) if wait_for
                      else (True, client.status()))
    except KeyboardInterrupt:
        say(f"interrupted while waiting: the hub had stored {name} seq {seq}; it keeps rolling it out")
        sys.exit(130)
    timings["wait"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - IMPORTED_AT
    finish_publish(ok, status, name, seq, label, wait_for, as_json, say, staged=staged, timings=timings)


def _watch_waves(status: Any, name: str, seq: int, timeout: float, as_json: bool, say: Any) -> None:
    """Follow the hub's rollout in waves of ``name`` ``seq`` to its end
    (:func:`~zmqmodels.hub_client.wait_rollout`), printing each change; exit 1 if it halted
    (the failed nodes and why are printed) or did not end in time."""
    from .. import protocol as P
    from ..hub_client import wait_rollout
    from .render import rollout_text, status_json

    last = [""]

    def show(st: Any) -> None:
        wave = next((w for w in st.rollouts if w.name == name and w.seq == seq), None)
        text = rollout_text(wave) if wave is not None else f"rollout {name} seq {seq}: not started"
        if text != last[0]:
            say(text)
            last[0] = text

    wave, st = wait_rollout(status, name, seq, timeout, on_status=show)
    ok = wave is not None and wave.state == P.WaveState.DONE
    if as_json:
        import msgspec

        emit_json({"ok": ok, "name": name, "seq": seq, "rollout": msgspec.to_builtins(wave) if wave else None,
                   "status": status_json(st)})
    elif wave is None or wave.state == P.WaveState.RUNNING:
        say(f"FAILED: the rollout of {name} seq {seq} did not end within {timeout:.0f}s")
    else:
        say(("ok: " if ok else "FAILED: ") + rollout_text(wave))
    if not ok:
        sys.exit(1)


class _Ticker:
    """On a terminal, a live line with the seconds spent in a step that reports no progress of
    its own (ZeroMQ hands a whole PUBLISH to its I/O thread; the hub answers once stored)."""

    def __init__(self, what: str) -> None:
        import threading
        import time

        self._stop = threading.Event()
        self._thread = None
        if sys.stderr.isatty():
            t0 = time.monotonic()

            def run() -> None:
                while not self._stop.wait(0.5):
                    click.echo(f"\r  {what}: {time.monotonic() - t0:.1f}s", nl=False, err=True)

            self._thread = threading.Thread(target=run, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            click.echo("", err=True)


def _accepted(client: Any, m: Any) -> str:
    """After Ctrl-C during a publish: did the hub store it? (asked, not assumed). The hub
    answers RELEASES after any store job already under way, so the answer is final."""
    from ..errors import RemoteError

    try:
        rows = client.releases(m.name, timeout=30.0)
    except RemoteError as exc:
        if exc.code != "bad_release":  # bad_release: it stores nothing of that name
            return f"the hub answered {exc}; it may or may not have stored the release"
        rows = []
    except (ZmqModelsError, KeyboardInterrupt):
        return "the hub did not answer; it may or may not have stored the release"
    stored = [r for r in rows if r.sha256 == m.archive_sha256 and r.created_at >= m.created_at]
    if stored:
        r = stored[-1]
        return f"the hub had already stored {r.name} seq {r.seq}; it is rolling it out"
    return "the hub has not stored it; nothing was published"


def _warn_reused_label(client: Any, name: str, seq: int, label: str, say: Any) -> None:
    if not label:
        return
    try:
        same = [r.seq for r in client.releases(name, timeout=5.0) if r.label == label and r.seq != seq]
    except ZmqModelsError:
        return
    if same:
        say(f"warning: label {label!r} is also on {name} seq {', '.join(map(str, same))}; "
            f"`rollback --to {label}` takes the newest")


def _wait_with_progress(client: Any, name: str, seq: int, count: int, timeout: float,
                        say: Any) -> tuple[bool, Any]:
    """:meth:`HubClient.wait_for`, printing the :class:`~zmqmodels.core.fleet.Tally` each
    time it changes."""
    from ..core.fleet import tally

    last: list[Any] = [None]

    def progress(st: Any) -> None:
        t = tally(st.nodes, name, seq)
        if t != last[0]:
            last[0] = t
            known = f", {t.rows} of {count} nodes known" if t.rows < count else ""
            say(f"rollout: {t.serving}/{count} serving seq {seq}, {t.on_the_way} on the way, "
                f"{len(t.rejected)} rejected, {t.broken} lost or in error{known}")

    return client.wait_for(name, seq, count, timeout, on_status=progress)


@cli.command()
@click.argument("name")
@click.option("--to", "to", required=True, help="The label or seq of a stored release.")
@click.option("--hub", "hub_addr", callback=connect_to, required=True)
@click.option("--wait-for", "wait_for", type=int, default=0)
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@signing_option
@curve_options(server=False, client=True)
def rollback(name: str, to: str, hub_addr: str, wait_for: int, timeout: float, as_json: bool,
             signing_key: str | None, curve_key: str | None, curve_server: str | None) -> None:
    """Re-broadcast stored content of NAME under a new seq (signed anew with --signing-key)."""
    from ..hub_client import HubClient

    client = HubClient(hub_addr, timeout=timeout, curve=curve_from(curve_key, curve_server))
    done = client.rollback(name, to, timeout=timeout, signing_key=load_signing_key(signing_key))
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    say(f"rolled {name} back to {to!r} as seq {done.seq}")
    ok, st = client.wait_for(name, done.seq, wait_for, timeout) if wait_for else (True, client.status())
    finish_publish(ok, st, name, done.seq, done.label, wait_for, as_json, say)
