"""Health for orchestrators on the ``--metrics`` port: ``/health/live`` and ``/health/ready``
(hub: its sockets bound and its store taking a write; node: every model held by a worker),
measured when asked, with the reason when not ready."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
import torch

from tests.helpers import free_port, wait_until
from tests.models import Rows
from zmqmodels import Hub, Node, build_release, compile_model
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(180)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_hub_on_a_full_store_is_live_but_not_ready_and_says_why(small_fs) -> None:
    port = free_port()
    with Hub("tcp://127.0.0.1:0", Store(small_fs / "store"), metrics=f"127.0.0.1:{port}"):
        assert get(port, "/health/ready") == (200, "ok\n")
        filler = small_fs / "filler"
        with open(filler, "wb") as f:  # fill the 8 MiB tmpfs
            try:
                while True:
                    f.write(bytes(1 << 20))
                    f.flush()
            except OSError:
                pass
        status, why = get(port, "/health/ready")
        assert status == 503 and "not writable: No space left on device" in why, why
        assert get(port, "/health/live")[0] == 200
        assert "zmqmodels_" in get(port, "/metrics")[1]
        os.unlink(filler)
        assert get(port, "/health/ready") == (200, "ok\n")


def test_a_node_is_ready_once_a_worker_holds_each_model(tmp_path) -> None:
    hub_port, node_port = free_port(), free_port()
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "store"), metrics=f"127.0.0.1:{hub_port}") as hub:
        node = Node(hub.address, ["rows"], "tcp://127.0.0.1:0", cache=tmp_path / "cache", workers=1,
                    metrics=f"127.0.0.1:{node_port}").start()
        try:
            status, why = get(node_port, "/health/ready")
            assert (status, why) == (503, "no worker holds rows yet\n")
            assert get(node_port, "/health/live")[0] == 200
            m = hub.publish(build_release(compile_model(Rows(2.0), [torch.ones(1, 4)]), "rows", "v1"))
            assert hub.wait_for("rows", m.seq, 1, 120)[0]
            wait_until(lambda: get(node_port, "/health/ready")[0] == 200, 30, what="the node ready")
        finally:
            node.close()


def test_the_example_kubernetes_manifests_in_the_docs_parse() -> None:
    """Checked for syntax only (docs/operations.md says so): each YAML block loads, each
    document is a Kubernetes object, and every probe names a path the shells answer."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    docs = [d for b in blocks for d in yaml.safe_load_all(b)]
    assert {d["kind"] for d in docs} >= {"StatefulSet", "DaemonSet", "Deployment", "Service"}
    probes = re.findall(r"path: (/[\w/]+)", "\n".join(blocks))
    answered = {"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"}
    assert set(probes) <= answered | {"/var/cache/zmqmodels"}
