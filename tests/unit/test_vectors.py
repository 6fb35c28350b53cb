"""The conformance vectors run through the Python cores: ``tests/vectors/follow.json`` (event
scripts with what the node must send and deliver after each event) and
``tests/vectors/batching.json`` (when a short batch waits for more). The C++ doctest runs the
same files through the C++ follower and batching evidence (``cpp/tests/core_tests.cpp``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from zmqmodels import protocol as P
from zmqmodels.core.assembly import Assembler, Deliver, Send, Unstage
from zmqmodels.defaults import Limits
from zmqmodels.release.manifest import decode_manifest

VECTORS = json.loads((Path(__file__).resolve().parent.parent / "vectors" / "follow.json").read_text())


def outputs(actions: list[Any]) -> list[dict[str, Any]]:
    """Actions as the vectors write them: what is sent (in order), then what is delivered, then
    what is unstaged (the order between kinds is a shell's, not a rule)."""
    out: list[dict[str, Any]] = []
    for a in actions:
        match a:
            case Send(P.FetchManifest(seq=seq)):
                out.append({"send": "fetch_manifest", "seq": seq})
            case Send(P.FetchChunks(seq=seq, indices=indices)):
                out.append({"send": "fetch_chunks", "seq": seq, "indices": list(indices)})
            case Send(P.Report(state=state, seq=seq, staged=staged)):
                out.append({"send": "report", "state": str(state), "seq": seq, "staged": staged})
            case Deliver(asm=asm, digest=digest, active=active):
                assert digest == asm.manifest.archive_sha256  # assembled right
                out.append({"deliver": asm.manifest.seq, "active": active})
            case Unstage(manifest=m):
                out.append({"unstage": m.seq})
            case _:
                raise AssertionError(f"an action the vectors do not name: {a!r}")
    return sorted(out, key=lambda o: 0 if "send" in o else 1 if "deliver" in o else 2)


def run(case: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Each event of ``case`` into an :class:`Assembler`; what it did after each."""
    rels = VECTORS["releases"]
    limits = Limits(**case.get("limits", {}))
    a = Assembler(["m"], node_id="n1", host="h", pid=1, device="cpu", limits=limits,
                  take=lambda name, size: bytearray(size), give=lambda name, buf: None)
    got = []
    for ev in case["events"]:
        t, do = ev["t"], ev["do"]
        r = rels.get(ev.get("release", ""))
        raw = bytes.fromhex(r["manifest"]) if r else b""
        match do:
            case "start":
                acts = a.start(t)
            case "manifest":
                acts = a.on_manifest(decode_manifest(raw), raw, b"", t, fetched=ev.get("fetched", False))
            case "chunk":
                payload = bytearray.fromhex(r["chunks"][ev["index"]])
                if ev.get("corrupt"):
                    payload[0] ^= 0xFF
                acts = a.on_chunk(P.ChunkHeader("m", r["seq"], ev["index"]), bytes(payload), t,
                                  fetched=ev.get("fetched", False))
            case "beat":
                sha = rels[ev["names"]]["sha256"] if "names" in ev else ev.get("sha256", "")
                acts = a.on_beat(P.Heartbeat("hub", "m", ev["seq"], sha, active=ev.get("active", 0)), t)
            case "activate":
                acts = a.on_activate(P.Activate("m", ev["seq"], ev.get("nodes", [])))
            case "tick":
                acts = a.tick(t)
            case "held":
                acts = a.hold(decode_manifest(raw))
            case "served":
                acts = a.set_state("m", P.ModelState.SERVING, seq=ev["seq"], label=ev.get("label", ""))
            case _:
                raise AssertionError(f"unknown event {do!r}")
        got.append(outputs(acts))
    return got


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_the_python_cores_follow_the_vectors(case: dict[str, Any]) -> None:
    got = run(case)
    for i, (ev, out) in enumerate(zip(case["events"], got, strict=True)):
        assert out == ev["expect"], f"event {i} ({ev['do']}): {out} != {ev['expect']}"


def test_the_vectors_release_bytes_are_current() -> None:
    import subprocess
    import sys

    gen = Path(__file__).resolve().parents[2] / "scripts" / "gen_vectors.py"
    assert subprocess.run([sys.executable, str(gen), "--check"], timeout=60).returncode == 0, \
        "tests/vectors/follow.json's releases are not current: run scripts/gen_vectors.py"


BATCHING = json.loads((Path(__file__).resolve().parent.parent / "vectors" / "batching.json").read_text())


@pytest.mark.parametrize("case", BATCHING["cases"], ids=[c["name"] for c in BATCHING["cases"]])
def test_the_python_batching_evidence_follows_the_vectors(case: dict[str, Any]) -> None:
    from zmqmodels.core.batching import Evidence

    e = Evidence(case["delay_s"])
    for i, ev in enumerate(case["events"]):
        if "arrived" in ev:
            e.arrived("m", ev["arrived"])
        elif "dispatched" in ev:
            e.dispatched("m", ev["dispatched"], ev["t"])
        elif "served" in ev:
            e.served("m", ev["served"])
        else:
            a = ev["ask"]
            got = e.hold_until("m", a["count"], a["rows"], a["cap"], a["oldest"], a["now"],
                               a.get("free_since", -math.inf))
            assert got == pytest.approx(ev["expect"]) if ev["expect"] is not None else got is None, (i, got)


FORMATS = json.loads((Path(__file__).resolve().parent.parent / "vectors" / "formats.json").read_text())


@pytest.mark.parametrize("case", FORMATS["cases"], ids=[c["name"] for c in FORMATS["cases"]])
def test_the_python_node_chooses_the_part_of_a_release_as_the_vectors_say(case: dict[str, Any]) -> None:
    from types import SimpleNamespace

    from zmqmodels.errors import CheckError
    from zmqmodels.model.pt2 import serve_format

    m = SimpleNamespace(name="m", seq=1, format=case["format"], devices=case["devices"])
    if case["serves"] is None:
        with pytest.raises(CheckError, match=f"compiled for {', '.join(case['devices'])}, this node runs"):
            serve_format(m, case["device"])
    else:
        assert serve_format(m, case["device"]) == case["serves"]
