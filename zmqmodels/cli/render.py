"""How commands print: the fleet table, JSON, the verdict of a rollout."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..protocol import ModelState

__all__ = ["emit_json", "fleet_table", "model_head", "rollout_text", "stages_text", "release_cpu",
           "CPU_STAGES", "status_json", "to_jsonable", "failed_nodes", "finish_publish"]


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def fleet_table(status: Any, name: str | None = None) -> str:
    """The fleet as text: one row per (node, model)."""
    head = ("NODE", "HOST", "PID", "DEVICE", "LABELS", "MODEL", "VERSION", "SEQ", "STAGED", "STATE",
            "AGE", "LAST ROLLOUT (s)", "LAST ERROR")
    rows = [head]
    for n in status.nodes:
        if name is not None and n.model != name:
            continue
        if n.state in (ModelState.ERROR, ModelState.LOST) or not n.rejected_seq:
            err = n.reason  # what is wrong now comes before an older rejection
        else:
            err = f"seq {n.rejected_seq}: {n.last_error}"
        node = n.node + (f" (via {', '.join(n.via)})" if n.via else "")
        rows.append((node, n.host, str(n.pid), n.device or "-", ",".join(n.labels) or "-", n.model,
                     n.label or "-", str(n.seq), str(n.staged) if n.staged else "-", n.state,
                     f"{n.age_s:.1f}s", stages_text(n), err or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    models = ", ".join(model_head(m, status.nodes) for m in status.models if name is None or m.name == name)
    waves = [rollout_text(w) for w in status.rollouts if name is None or w.name == name]
    return f"hub {status.hub}: {models or 'no models'}\n" + "\n".join(lines + waves)


def model_head(m: Any, nodes: Any) -> str:
    """One model in the status header: its newest stored release and, when that is not what
    the fleet serves (refused by nodes, staged, still rolling out), what the nodes do serve."""
    rows = [n for n in nodes if n.model == m.name and n.state != ModelState.LOST]
    refused = sum(n.rejected_seq == m.seq for n in rows)
    newest = f"seq {m.seq} ({m.label or '-'})"
    if m.active == m.seq and not refused:
        return f"{m.name} {newest} active"
    served: dict[tuple[int, str], int] = {}
    for n in rows:
        if n.state == ModelState.SERVING:
            served[(n.seq, n.label)] = served.get((n.seq, n.label), 0) + 1
    serving = ", ".join(f"seq {s} ({lb or '-'}) on {k}" for (s, lb), k in sorted(served.items())[::-1])
    why = f"rejected by {refused} node(s)" if refused else "staged" if m.active < m.seq else "rolling out"
    active = f", active seq {m.active}" if m.active and m.active != m.seq else ""
    return f"{m.name} serving {serving or 'nowhere'}{active}; newest stored {newest}: {why}"


def rollout_text(w: Any) -> str:
    """One staged rollout: ``rollout m seq 5: running, wave 2/4 (4 of 40 nodes), 3 serving``."""
    total = w.waves[-1] if w.waves else 0
    line = (f"rollout {w.name} seq {w.seq}: {w.state}, wave {w.wave}/{len(w.waves)} "
            f"({len(w.activated)} of {total} node(s) activated, {len(w.serving)} serving)")
    if w.reason:
        line += f"; {w.reason}"
    if w.rollback_seq:
        line += f"; rolled back as seq {w.rollback_seq}"
    for node, why in sorted(w.failed.items()):
        line += f"\n  failed {node}: {why}"
    return line


_STAGE_NAMES = (("receive", "recv"), ("cache_write", "write"), ("load", "load"), ("apply", "apply"),
                ("check", "check"), ("roll", "roll"))


CPU_STAGES = ("receive_cpu", "cache_write_cpu", "workers_cpu")


def release_cpu(stages: dict[str, float]) -> float | None:
    """CPU seconds a node spent taking a release: its front's receiving and cache-writing
    threads and its workers' loads (None: the node measured none)."""
    found = [stages[k] for k in CPU_STAGES if k in stages]
    return sum(found) if found else None


def stages_text(n: Any) -> str:
    """``seq 4: recv 0.12 write 0.05 load 0.15 check 0.02 roll 0.40 cpu 0.31`` (the wall time
    of each stage of the node's newest release, and the CPU the node spent on it; ``seq 4 as
    pt2: ...`` when it serves a release's pt2 package), or ``-``."""
    if not n.stages:
        return "-"
    parts = [f"{short} {n.stages[key]:.2f}" for key, short in _STAGE_NAMES if key in n.stages]
    cpu = release_cpu(n.stages)
    if cpu is not None:
        parts.append(f"cpu {cpu:.2f}")
    fmt = getattr(n, "format", "")  # said when it is not the default (status --json has it always)
    return f"seq {n.stages_seq}{' as ' + fmt if fmt and fmt != 'torchscript' else ''}: " + " ".join(parts)


def status_json(status: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(status)


def to_jsonable(x: Any) -> Any:
    """Outputs as JSON: each array as dtype, shape and nested lists (numpy arrays, or torch
    tensors if the caller has torch)."""
    import numpy as np

    if isinstance(x, np.ndarray):
        if np.iscomplexobj(x):
            return {"dtype": str(x.dtype), "shape": list(x.shape),
                    "data": np.stack([x.real, x.imag], axis=-1).tolist()}
        return {"dtype": str(x.dtype), "shape": list(x.shape), "data": x.tolist()}
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape),
                "data": x.float().tolist() if x.dtype == torch.bfloat16 else x.tolist()}
    if isinstance(x, tuple | list):
        return [to_jsonable(i) for i in x]
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    return x


def failed_nodes(status: Any, name: str, seq: int) -> dict[str, str]:
    """Each node of ``name`` that failed ``seq`` (rejected it, or is in error or lost while not
    serving it), with why, as the node reported it."""
    out = {}
    for n in status.nodes:
        if n.model != name or (n.seq == seq and n.state == ModelState.SERVING):
            continue
        if n.rejected_seq == seq:
            out[n.node] = f"rejected: {n.last_error or n.reason or 'no reason given'}"
        elif n.state in (ModelState.ERROR, ModelState.LOST):
            out[n.node] = f"{n.state}: {n.reason or 'no reason given'}"
    return out


def finish_publish(ok: bool, status: Any, name: str, seq: int, label: str, wait_for: int,
                    as_json: bool, say: Any, *, staged: bool = False,
                    timings: dict[str, float] | None = None, extra: dict[str, Any] | None = None) -> None:
    from ..core.fleet import tally

    t = tally(status.nodes, name, seq)
    serving, rejected = t.serving, t.rejected
    failed = failed_nodes(status, name, seq)
    held = sum(n.model == name and n.staged == seq for n in status.nodes)
    if as_json:
        emit_json({"ok": ok, "name": name, "seq": seq, "label": label, "serving": serving,
                    "rejected": rejected, "failed": failed, "staged": staged, "holding": held,
                    "known": t.rows,
                    "wait_for": wait_for, "status": status_json(status), **(extra or {}),
                    **({"timings": {k: round(v, 4) for k, v in timings.items()}} if timings else {})})
    else:
        say(fleet_table(status, name))
        verdict = "ok" if ok else "FAILED"
        if staged:
            say(f"{verdict}: {name} seq {seq} staged: {held} node(s) hold it, {serving} serve it "
                f"(it is served once activated)" + (f", wanted {wait_for}" if wait_for else ""))
        else:
            say(f"{verdict}: {name} seq {seq} serving on {serving} node(s)"
                + (f", wanted {wait_for}" if wait_for else ""))
        for node, why in sorted(failed.items()):
            say(f"  {node}: {why}")
        if not ok and t.rows < wait_for:
            known = sorted({n.node for n in status.nodes if n.model == name})
            say(f"  {wait_for - t.rows} of {wait_for} node(s) never seen by the hub; it knows "
                f"{t.rows}: {', '.join(known) or 'none'}")
    if not ok:
        sys.exit(1)
