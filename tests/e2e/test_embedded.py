"""The embedded subscriber: a Python object that keeps the newest valid model at hand."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.helpers import wait_until
from tests.models import Probe, explodes_on_nodes, probe_examples
from zmqmodels import (
    DeadlineError,
    Hub,
    NotReadyError,
    Subscriber,
    build_release,
    compile_model,
)
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(120)


def release(scale: float, label: str):
    return build_release(compile_model(Probe(scale), probe_examples()), "probe", label)


def test_predict_version_model_and_on_swap(tmp_path) -> None:
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s")) as hub:
        swaps: list[tuple[str, int, int | None]] = []
        with Subscriber(hub.address, ["probe"]) as sub:
            sub.on_swap(lambda name, new, old: swaps.append((name, new.seq, old.seq if old else None)))
            with pytest.raises(NotReadyError):
                sub.predict("probe", torch.ones(1, 4))
            assert sub.version("probe") is None
            with pytest.raises(DeadlineError):
                sub.wait_until_serving("probe", 0.2)
            m1 = hub.publish(release(2.0, "v1"))
            sub.wait_until_serving("probe", 30, seq=m1.seq)
            assert sub.version("probe") == ("v1", m1.seq)
            assert torch.equal(sub.predict("probe", torch.ones(1, 4)), torch.full((1, 4), 2.0))
            with sub.model("probe") as held:  # holds v1 for the block, whatever arrives
                m2 = hub.publish(release(3.0, "v2"))
                sub.wait_until_serving("probe", 30, seq=m2.seq)
                assert torch.equal(held(torch.ones(1, 4)), torch.full((1, 4), 2.0))
            assert torch.equal(sub.predict("probe", torch.ones(1, 4)), torch.full((1, 4), 3.0))
            # listeners run right after the swap is visible: give the second one its moment
            wait_until(lambda: len(swaps) == 2, 10, what="the second on_swap call")
            assert swaps == [("probe", m1.seq, None), ("probe", m2.seq, m1.seq)]
            assert hub.wait_for("probe", m2.seq, 1, 10)[0]


def test_bad_release_is_rejected_and_previous_keeps_serving(tmp_path) -> None:
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s")) as hub, \
            Subscriber(hub.address, ["probe"]) as sub:
        m1 = hub.publish(release(2.0, "v1"))
        sub.wait_until_serving("probe", 30, seq=m1.seq)
        bad = hub.publish(explodes_on_nodes("probe", "x"))
        ok, status = hub.wait_for("probe", bad.seq, 1, 30)
        assert not ok and status.nodes[0].rejected_seq == bad.seq
        assert sub.version("probe") == ("v1", m1.seq)


def test_swap_when_defers_and_declines(tmp_path) -> None:
    gate = threading.Event()
    decisions: list[int] = []

    def swap_when(m) -> bool:  # noqa: ANN001
        decisions.append(m.seq)
        if m.label == "skip":
            return False
        gate.wait(30)  # e.g. wait for a quiet moment between batches
        return True

    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s")) as hub, \
            Subscriber(hub.address, ["probe"], swap_when=swap_when) as sub:
        m1 = hub.publish(release(2.0, "v1"))
        with pytest.raises(DeadlineError):
            sub.wait_until_serving("probe", 0.5)  # deferred by the gate
        gate.set()
        sub.wait_until_serving("probe", 30, seq=m1.seq)
        skipped = hub.publish(release(5.0, "skip"))
        ok, status = hub.wait_for("probe", skipped.seq, 1, 30)
        assert not ok and "declined" in status.nodes[0].last_error
        assert sub.version("probe") == ("v1", m1.seq)


def test_cache_serves_at_once_after_restart_without_a_hub(tmp_path, short_tmp) -> None:
    addr = f"ipc://{short_tmp}/hub"
    with Hub(addr, Store(tmp_path / "s")) as hub, \
            Subscriber(addr, ["probe"], cache=tmp_path / "cache") as sub:
        m = hub.publish(release(2.0, "v1"))
        sub.wait_until_serving("probe", 30, seq=m.seq)
    # no hub now: a new subscriber with the same cache serves v1 before hearing from anyone
    with Subscriber(addr, ["probe"], cache=tmp_path / "cache") as again:
        assert again.version("probe") == ("v1", m.seq)
        assert torch.equal(again.predict("probe", torch.ones(1, 4)), torch.full((1, 4), 2.0))
    # a corrupted cache entry is not loaded
    (path,) = (tmp_path / "cache" / "probe").glob("*.pt")
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with Subscriber(addr, ["probe"], cache=tmp_path / "cache") as third:
        assert third.version("probe") is None
