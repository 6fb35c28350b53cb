"""The catalog an operator relies on: pins, retention that says what it did, a hub on S3 that
can be replaced empty-handed, and a store outage that loses nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import raw_release, wait_until
from tests.models import Probe, probe_examples
from tests.s3server import SeaweedS3
from zmqmodels import Client, HubClient, Node, RemoteError
from zmqmodels.hub.hub import Hub
from zmqmodels.model.build import build_release
from zmqmodels.model.compile import compile_model
from zmqmodels.release.catalog import Retention
from zmqmodels.release.s3 import S3Store
from zmqmodels.transport.health import hub_ready

pytestmark = pytest.mark.timeout(300)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zmqmodels", *args], capture_output=True, text=True,
                          timeout=120)


def test_a_pinned_base_survives_a_publish_loop_and_retention_says_what_it_pruned(s3server) -> None:
    """Milestone 3: after quick publishes `rollback --to` found nothing: --retain pruned the
    target without a log line or a note at publish, and nothing could pin a release."""
    with Hub("tcp://127.0.0.1:0", S3Store(s3server.url(), retention=Retention(2))) as h:
        c = HubClient(h.address)
        c.publish(raw_release("m", b"base" * 1000, label="known-good"))
        out = _cli("pin", "m", "known-good", "--hub", h.address)
        assert out.returncode == 0 and "m seq 1 pinned (pinned now: 1)" in out.stdout, out.stderr
        notes = [c.publish(raw_release("m", f"step{i}".encode() * 1000, label=f"s{i}")).note
                 for i in range(7)]
        assert "retention pruned m seq 2 " in notes[2] and "pin" in notes[2], notes
        listed = _cli("releases", "m", "--hub", h.address)
        rows = [line.split() for line in listed.stdout.splitlines()[1:]]
        assert [(r[1], r[2], r[-1]) for r in rows][0] == ("1", "known-good", "pinned"), listed.stdout
        assert [r[1] for r in rows] == ["1", "7", "8"]
        back = _cli("rollback", "m", "--to", "known-good", "--hub", h.address)
        assert back.returncode == 0, back.stderr
        assert _cli("unpin", "m", "1", "--hub", h.address).returncode == 0
        assert HubClient(h.address).pin("m", "known-good").pins == [9]  # the newest with that label
        refused = _cli("pin", "m", "v404", "--hub", h.address)
        assert refused.returncode == 1 and "no stored release of m with label or seq 'v404'" in refused.stderr


def test_a_hub_restarted_empty_handed_on_the_same_bucket_serves_the_fleet(s3server, tmp_path) -> None:
    """The hub's machine is gone with its disk: a new hub on the same bucket has no local state
    and serves the fleet as before (the newest release, older ones, numbering)."""
    url = s3server.url()
    first = Hub("tcp://127.0.0.1:0", S3Store(url), heartbeat_interval_s=0.25).start()
    address = first.address
    node = Node(address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "c",
                node_id="n1").start()
    try:
        v1 = first.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        assert first.wait_for("probe", v1.seq, 1, 60)[0]
        first.close()
        with Hub(address, S3Store(url), heartbeat_interval_s=0.25) as again:
            ok, status = again.wait_for("probe", v1.seq, 1, 60)
            assert ok, status
            v2 = HubClient(address).publish(build_release(compile_model(Probe(2.0), probe_examples()),
                                                          "probe", "v2"))
            assert v2.seq == v1.seq + 1
            assert again.wait_for("probe", v2.seq, 1, 60)[0]
            with Client(node.address, timeout=10) as client:
                r = client.infer("probe", probe_examples()[0])
                assert (r.label, r.seq, float(r.outputs[0, 0])) == ("v2", v2.seq, 2.0)
            fresh = Node(address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "c2",
                         node_id="n2").start()
            try:
                wait_until(lambda: sum(n.seq == v2.seq and n.state == "serving"
                                       for n in again.status().nodes) == 2, 60, what="both nodes on v2")
            finally:
                fresh.close()
    finally:
        node.close()
        first.close()


def test_a_store_outage_refuses_publishes_in_one_line_and_loses_nothing(tmp_path) -> None:
    """The bucket's server stops: the hub keeps beating what it holds, is not ready (saying why)
    and refuses publishes in one line; nodes keep serving; once it is back all converge."""
    server = SeaweedS3(tmp_path / "s3").start()
    import os

    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    node = None
    try:
        with Hub("tcp://127.0.0.1:0", S3Store(server.url()), heartbeat_interval_s=0.25) as h:
            node = Node(h.address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "c",
                        node_id="n").start()
            v1 = h.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
            assert h.wait_for("probe", v1.seq, 1, 60)[0]
            assert hub_ready(h) == ""
            server.stop()
            why = hub_ready(h)
            assert "is not reachable" in why and "\n" not in why, why
            v2 = build_release(compile_model(Probe(2.0), probe_examples()), "probe", "v2")
            with pytest.raises(RemoteError) as refused:
                HubClient(h.address, timeout=30).publish(v2)
            assert "not reachable" in str(refused.value) and "\n" not in str(refused.value)
            with Client(node.address, timeout=10) as client:
                assert client.infer("probe", probe_examples()[0]).seq == v1.seq
            assert h.status().nodes[0].seq == v1.seq  # still beaten and reported
            server.start()
            wait_until(lambda: hub_ready(h) == "", 60, interval=0.5, what="the hub ready again")
            done = HubClient(h.address, timeout=30).publish(v2)
            assert done.seq == v1.seq + 1
            assert h.wait_for("probe", done.seq, 1, 60)[0]
    finally:
        if node is not None:
            node.close()
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
