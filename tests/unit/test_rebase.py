"""The rules behind fine-tune publishing, sans I/O: which release new weights build on
(:func:`~zmqmodels.core.fleet.base_seq`), when a node's last error clears, who counts as holding a
staged release, and :func:`~zmqmodels.release.rebase.rebase` (a release of the same code rebuilt on its
base keeps every unchanged tensor's span and chunk)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.models import Stack
from zmqmodels import build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.core.fleet import Fleet, base_seq, tally
from zmqmodels.errors import ReleaseError
from zmqmodels.release.rebase import Base, rebase

S = P.ModelState


def report(node: str, state: S, seq: int, staged: int = 0, reason: str = "") -> P.Report:
    return P.Report(node, "m", state, seq, reason=reason, staged=staged)


def status(fleet: Fleet, newest: int, active: int) -> P.StatusReply:
    return P.StatusReply("hub", [P.ModelStatus("m", newest, "", "", 0, active)], fleet.rows(0.0))


# a node's event: it serves a seq, rejects one, or receives one
events = st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([S.SERVING, S.REJECTED, S.RECEIVING]),
                            st.integers(1, 6)), max_size=25)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(1, 6), st.integers(0, 6))
def test_the_base_is_served_or_active_and_never_a_release_the_fleet_refused(evs, newest, active) -> None:
    active = min(active, newest)
    fleet = Fleet()
    for node, state, seq in evs:
        fleet.report(report(node, state, seq), 0.0)
    rows = fleet.rows(0.0)
    serving = {r.seq for r in rows if r.state == S.SERVING}
    refused = {r.rejected_seq for r in rows if r.rejected_seq} - serving
    try:
        base = base_seq(status(fleet, newest, active), "m")
    except ReleaseError as exc:  # only when the newest is refused and nothing else qualifies
        assert not serving and (not active or active in refused) and newest in refused, exc
        return
    assert base is not None and base not in refused
    assert base in serving or base == active or \
        (not serving and (not active or active in refused) and base == newest)
    assert base >= max(serving, default=0)  # never behind what some node serves


def test_no_release_stored_means_no_base() -> None:
    assert base_seq(P.StatusReply("hub", [], []), "m") is None


def test_a_nodes_last_error_clears_once_it_serves_a_newer_release_and_not_before() -> None:
    fleet = Fleet()
    fleet.report(report("a", S.SERVING, 1), 0.0)
    fleet.report(report("a", S.REJECTED, 2, reason="NaN"), 0.0)
    fleet.report(report("a", S.SERVING, 1), 0.0)  # back on the old one: the error stays
    (row,) = fleet.rows(0.0)
    assert (row.rejected_seq, row.last_error) == (2, "NaN")
    fleet.report(report("a", S.SERVING, 3), 0.0)
    (row,) = fleet.rows(0.0)
    assert (row.rejected_seq, row.last_error) == (0, "")


def test_nodes_holding_a_staged_release_count_toward_a_staged_wait_only() -> None:
    fleet = Fleet()
    fleet.report(report("a", S.SERVING, 1, staged=2), 0.0)
    fleet.report(report("b", S.SERVING, 2), 0.0)
    t = tally(fleet.rows(0.0), "m", 2)
    assert (t.serving, t.held) == (1, 1)
    assert t.reached(2, staged=True) and not t.reached(2)


@pytest.fixture(scope="module")
def base() -> Base:
    torch.manual_seed(0)
    rel = build_release(compile_model(Stack(64, 6).eval(), [torch.randn(1, 64)]), "m", "v1",
                        chunk_bytes=16 << 10)
    return Base(rel, rel.archive())


@settings(max_examples=15, deadline=None)
@given(st.sets(st.integers(0, 11), max_size=4), st.sampled_from(["lz4", "zstd", "none"]))
def test_a_rebuilt_release_keeps_every_unchanged_span_and_chunk_of_its_base(base, changed, codec) -> None:
    model = torch.jit.load(io.BytesIO(base.archive)).eval()
    params = list(model.parameters())
    with torch.no_grad():
        for i in changed:
            params[i].add_(0.5)
    x = torch.randn(3, 64)
    new = build_release(compile_model(model, [x]), "m", "v2", codec=codec, chunk_bytes=64 << 10)
    done = rebase(base, new)
    assert not isinstance(done, str), done
    b, m = base.release.manifest, done.manifest
    assert (m.codec, m.chunk_bytes, m.metadata["weights_of"]) == (b.codec, b.chunk_bytes, str(b.seq))
    names = {name for i, (name, _) in enumerate(torch.jit.load(io.BytesIO(base.archive)).named_parameters())
             if i in changed}
    for old, t in zip(b.tensors, m.tensors, strict=True):
        assert t.start == old.start and (t.xxh3 != old.xxh3) == (t.name in names)
    spans = [(t.start, t.start + t.nbytes) for t in m.tensors if t.name in names]
    for i, chunk in enumerate(done.chunks):
        lo, hi = i * b.chunk_bytes, (i + 1) * b.chunk_bytes
        if not any(s < hi and e > lo for s, e in spans) and i < len(done.chunks) - 1:
            assert chunk is base.release.chunks[i]  # the base's own bytes: the hub leaves them out
    served = torch.jit.load(io.BytesIO(done.archive())).eval()
    assert torch.equal(served(x), model(x))  # the rebuilt archive is the new model


def test_other_code_is_sent_whole_and_says_why(base) -> None:
    class Other(Stack):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    new = build_release(compile_model(Other(64, 6).eval(), [torch.randn(1, 64)]), "m", "v2")
    assert rebase(base, new) == "its code differs from seq 0's (code digest)"
