"""What ``zmqmodels publish`` does once it has a hub: the release made ready (a delta on what
the fleet serves, the base's codec and examples), the weights path, the wait, and what reached
each node."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import ZmqModelsError
from ..protocol import ModelState
from .render import emit_json, finish_publish

__all__ = ["after_store", "accepted", "moved_by_node", "moved_lines", "publish_weights", "Ticker",
           "wait_with_progress", "watch_waves", "warn_reused_label"]


def publish_weights(client: Any, name: str, opts: dict[str, Any], timings: dict[str, float], say: Any,
                    partial: bool = False, **kw: Any) -> Any:
    """``publish --weights CKPT --like NAME``: the checkpoint read as every path reads one
    (:mod:`zmqmodels.model.checkpoint`: weights only, nesting and the DDP prefix said), published
    through :meth:`HubClient.publish_weights` (every tensor of the release unless
    ``--partial``)."""
    import time

    from ..errors import SourceError
    from ..model.build import parse_metadata

    try:
        metadata = parse_metadata(opts.get("meta") or ())
    except SourceError as exc:
        raise click.BadParameter(str(exc), param_hint="--meta") from None
    t0 = time.perf_counter()
    from ..model.checkpoint import read_checkpoint, state_of

    timings["import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt = opts["weights"]
    state, lines = state_of(read_checkpoint(ckpt), ckpt)
    for line in lines:
        say(f"--weights {ckpt}: {line}")
    timings["load"] = time.perf_counter() - t0
    say(f"read {ckpt}; publishing its tensors in the code of the {name} release the fleet serves")
    steps: dict[str, float] = {}
    done = client.publish_weights(name, state, label=opts.get("label") or "", metadata=metadata,
                                  timings=steps, partial=partial, **kw)
    timings.update({f"weights_{k}": v for k, v in steps.items()})
    timings["hub_store"], timings["broadcast"] = done.store_s, done.broadcast_s
    return done


def after_store(client: Any, hub_addr: str, done: Any, wave_list: list[str], staged: bool,
                wait_for: int, timeout: float, as_json: bool, say: Any, timings: dict[str, float],
                reuse_label: bool = False, sent_bytes: int = 0) -> None:
    """What ``publish --hub`` does once the hub stored the release: notes, waves or the wait
    (``--staged``: for nodes holding it staged), then what reached each node (as each node
    counted it) and ``sent_bytes``, what this publisher sent the hub."""
    import time

    from .. import IMPORTED_AT

    name, seq, label = done.name, done.seq, done.label
    if done.note:
        say(f"note: {done.note}")
    if reuse_label:
        warn_reused_label(client, name, seq, label, say)
    if wave_list:
        watch_waves(client.status, name, seq, timeout, as_json, say)
        return
    if staged:
        say(f"staged: nodes cache seq {seq} and serve it once activated "
            f"(zmqmodels activate {name} --seq {seq} --hub {hub_addr})"
            + (f"; waiting for {wait_for} node(s) to hold it" if wait_for else ""))
    t2 = time.perf_counter()
    try:
        ok, status = (wait_with_progress(client, name, seq, wait_for, timeout, say, staged=staged)
                      if wait_for else (True, client.status()))
        if ok and wait_for:
            status = _settled(client, status, name, seq)
    except KeyboardInterrupt:
        say(f"interrupted while waiting: the hub had stored {name} seq {seq}; it keeps rolling it out")
        sys.exit(130)
    timings["wait"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - IMPORTED_AT
    if not as_json:
        for line in moved_lines(status, name, seq):
            say(line)
    finish_publish(ok, status, name, seq, label, wait_for, as_json, say, staged=staged, timings=timings,
                   extra={"moved": moved_by_node(status, name, seq), "sent_bytes": sent_bytes})


def _settled(client: Any, status: Any, name: str, seq: int, wait_s: float = 3.0) -> Any:
    """The status once every node serving (or holding) ``seq`` has reported how it took it in
    (its report follows its state by up to one heartbeat): asked, not assumed."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        rows = [n for n in status.nodes if n.model == name and (n.seq == seq or n.staged == seq)
                and n.state != ModelState.LOST]
        if all(n.stages_seq == seq and n.moved for n in rows) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)
        status = client.status()


def moved_by_node(status: Any, name: str, seq: int) -> dict[str, Any]:
    """Per node: what release ``seq`` cost its link (as the node counted it) and how it was
    taken in (``apply``/``load`` and why)."""
    return {n.node: {**n.moved, "how": n.how, "why": n.how_reason, "format": n.format}
            for n in status.nodes if n.model == name and n.stages_seq == seq}


def moved_lines(status: Any, name: str, seq: int) -> list[str]:
    """``k1: received 1.2 MiB in 2 chunk(s) (1 patched, 0 fetched), 11 reused (44.0 MiB); apply``."""
    out = []
    for node, m in sorted(moved_by_node(status, name, seq).items()):
        got, reused = m.get("bytes_received", 0), m.get("bytes_reused", 0)
        line = (f"  {node}: received {got / 2**20:.2f} MiB in {m.get('chunks_received', 0)} chunk(s) "
                f"({m.get('chunks_patched', 0)} patched, {m.get('chunks_fetched', 0)} fetched), "
                f"{m.get('chunks_reused', 0)} reused ({reused / 2**20:.1f} MiB)")
        if m.get("bytes_duplicate"):
            line += f", {m['bytes_duplicate'] / 2**20:.2f} MiB it already had"
        how = m.get("how") or "-"
        how += f" as {m['format']}" if m.get("format") not in (None, "", "torchscript") else ""
        out.append(line + f"; {how}" + (f" ({m['why']})" if how.startswith("load") and m.get("why") else ""))
    return out


def watch_waves(status: Any, name: str, seq: int, timeout: float, as_json: bool, say: Any) -> None:
    """Follow the hub's rollout in waves of ``name`` ``seq`` to its end
    (:func:`~zmqmodels.core.fleet.wait_rollout`), printing each change; exit 1 if it halted
    (the failed nodes and why are printed) or did not end in time."""
    import time

    from .. import protocol as P
    from ..core.fleet import wait_rollout
    from .render import rollout_text, status_json

    last = [""]

    def show(st: Any) -> None:
        wave = next((w for w in st.rollouts if w.name == name and w.seq == seq), None)
        text = rollout_text(wave) if wave is not None else f"rollout {name} seq {seq}: not started"
        if text != last[0]:
            say(text)
            last[0] = text

    wave, st = wait_rollout(status, name, seq, timeout, clock=time.monotonic, pause=time.sleep,
                            on_status=show)
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


class Ticker:
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


def accepted(client: Any, m: Any) -> str:
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


def warn_reused_label(client: Any, name: str, seq: int, label: str, say: Any) -> None:
    if not label:
        return
    try:
        same = [r.seq for r in client.releases(name, timeout=5.0) if r.label == label and r.seq != seq]
    except ZmqModelsError:
        return
    if same:
        say(f"warning: label {label!r} is also on {name} seq {', '.join(map(str, same))}; "
            f"`rollback --to {label}` takes the newest")


def wait_with_progress(client: Any, name: str, seq: int, count: int, timeout: float,
                       say: Any, *, staged: bool = False) -> tuple[bool, Any]:
    """:meth:`HubClient.wait_for`, printing the :class:`~zmqmodels.core.fleet.Tally` each
    time it changes."""
    from ..core.fleet import tally

    last: list[Any] = [None]

    def progress(st: Any) -> None:
        t = tally(st.nodes, name, seq)
        if t != last[0]:
            last[0] = t
            known = f", {t.rows} of {count} nodes known" if t.rows < count else ""
            held = f"{t.serving + t.held}/{count} hold" if staged else f"{t.serving}/{count} serving"
            say(f"rollout: {held} seq {seq}, {t.on_the_way} on the way, "
                f"{len(t.rejected)} rejected, {t.broken} lost or in error{known}")

    return client.wait_for(name, seq, count, timeout, on_status=progress, staged=staged)


