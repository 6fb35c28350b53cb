"""The pt2 release format (issue 30): a ``torch.export`` + AOTInductor package published, served,
updated by weights alone and refused when it is bad, through the CLI against a hub and a node
whose worker is a real process. The package is compiled once a session (``pt2_release``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgspec
import pytest
import torch

from tests import helpers
from tests.helpers import wait_until
from tests.models import make_mlp
from zmqmodels import Client, Hub, HubClient, Node
from zmqmodels.release.archive import describe_tensors
from zmqmodels.release.manifest import CodecSpec, Release, compress_archive, span_digests
from zmqmodels.release.store import Store, read_release_file

pytestmark = pytest.mark.timeout(900)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return helpers.cli(*args, timeout=timeout, env=env)  # an AOTInductor compile may run in it


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pt2fleet")
    with Hub("tcp://127.0.0.1:0", Store(tmp / "hub"), heartbeat_interval_s=0.25) as hub:
        node = Node(hub.address, ["mlp", "duo"], "tcp://127.0.0.1:0", workers=1, cache=tmp / "c",
                    node_id="n").start()
        try:
            yield hub, node, tmp
        finally:
            node.close()


def row(hub: Hub, name: str):  # noqa: ANN201
    return next(n for n in hub.status().nodes if n.model == name)


def answer(node: Node, name: str, x: torch.Tensor) -> torch.Tensor:
    with Client(node.address, timeout=30) as c:
        return c.infer(name, x).outputs


def remade(release: Release, archive: bytes | None = None, **fields: object) -> Release:
    """``release`` with another archive and/or manifest fields, consistent (digests, chunks),
    unsigned, seq 0: what a careless or hostile publisher could send."""
    import hashlib

    m = release.manifest
    data = release.archive() if archive is None else archive
    code, tensors = describe_tensors(data)
    chunks = compress_archive(data, CodecSpec(), m.chunk_bytes)
    import xxhash

    m = msgspec.structs.replace(
        m, seq=0, signer="", archive_sha256=hashlib.sha256(data).hexdigest(), archive_bytes=len(data),
        codec=CodecSpec(), chunk_count=len(chunks), chunk_sizes=[len(c) for c in chunks],
        compressed_bytes=sum(len(c) for c in chunks),
        chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in chunks],
        chunk_raw_xxh3=span_digests(data, m.chunk_bytes), code_sha256=code, tensors=tensors, **fields)
    return Release(m.check(), chunks)


def test_a_pt2_release_serves_and_takes_new_weights_without_a_reload(fleet, pt2_release, tmp_path) -> None:
    """A .pt2 package published, verified and served by a node; new weights of it
    (a checkpoint ``--like`` it, and ``publish_weights``) are applied into the package loaded once
    (stage ``apply``, no recompile, no reload), as a delta that moves only the changed bytes."""
    hub, node, _tmp = fleet
    model, examples = make_mlp()
    one = cli("publish", str(pt2_release), "--hub", hub.address, "--wait-for", "1", "--json")
    assert one.returncode == 0, one.stderr
    first = json.loads(one.stdout)
    moved = first["moved"]["n"]
    assert moved["format"] == "pt2", (str(moved), one.stderr)
    x = torch.randn(3, 784)
    assert torch.allclose(answer(node, "mlp", x), model(x), atol=1e-5)
    full = moved["bytes_received"]
    # a fine-tune saved as a checkpoint: published into the same package, applied
    with torch.no_grad():
        model.b.bias.add_(0.5)
    torch.save(model.state_dict(), tmp_path / "ft.pt")
    two = cli("publish", "--weights", str(tmp_path / "ft.pt"), "--like", "mlp", "--label", "ft",
              "--hub", hub.address, "--wait-for", "1", "--json")
    assert two.returncode == 0, two.stderr
    got = json.loads(two.stdout)["moved"]["n"]
    assert got["how"] == "apply" and got["format"] == "pt2", got
    assert got["bytes_received"] < 0.5 * full, (got, full)
    assert torch.allclose(answer(node, "mlp", x), model(x), atol=1e-5)
    st = row(hub, "mlp")
    assert st.how == "apply" and "apply" in st.stages, st
    # the Python API: a module of the same architecture
    with torch.no_grad():
        model.a.weight.mul_(0.5)
    done = HubClient(hub.address, timeout=120).publish_weights("mlp", model)
    assert hub.wait_for("mlp", done.seq, 1, 120)[0]
    wait_until(lambda: row(hub, "mlp").stages_seq == done.seq and row(hub, "mlp").how == "apply", 30)
    assert torch.allclose(answer(node, "mlp", x), model(x), atol=1e-5)


def test_bad_pt2_inputs_get_one_line_and_the_last_good_release_keeps_serving(fleet, pt2_release,
                                                                          tmp_path) -> None:
    """A weights update whose shapes do not fit, a package compiled for another device and a
    tampered shared object: each refused with its reason; the release served stays."""
    hub, node, _tmp = fleet
    if "mlp" not in {m.name for m in hub.status().models}:
        assert cli("publish", str(pt2_release), "--hub", hub.address, "--wait-for", "1").returncode == 0
    serving = row(hub, "mlp").seq
    x = torch.randn(2, 784)
    before = answer(node, "mlp", x)
    bad = {k: v for k, v in make_mlp()[0].state_dict().items()}
    bad["b.bias"] = torch.zeros(11)
    torch.save(bad, tmp_path / "bad.pt")
    out = cli("publish", "--weights", str(tmp_path / "bad.pt"), "--like", "mlp", "--hub", hub.address)
    assert out.returncode != 0 and "b.bias: float32[11], the model has float32[10]" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    release = read_release_file(pt2_release)
    client = HubClient(hub.address, timeout=60)
    # compiled for another device kind: a CPU node refuses it, saying so
    cuda = client.publish(remade(release, devices=["cuda"], label="cuda-only"))
    wait_until(lambda: row(hub, "mlp").rejected_seq == cuda.seq, 60, what="the cuda-only release refused")
    assert "compiled for cuda" in row(hub, "mlp").last_error, row(hub, "mlp")
    # a shared object whose bytes were changed (its ELF header): the load fails, said whole
    data = bytearray(release.archive())
    at = data.find(b"\x7fELF")
    assert at > 0
    data[at + 1:at + 4] = b"XYZ"
    tampered = client.publish(remade(release, bytes(data), label="tampered"))
    wait_until(lambda: row(hub, "mlp").rejected_seq == tampered.seq, 60, what="the tampered release refused")
    assert "pt2 package does not load" in row(hub, "mlp").last_error, row(hub, "mlp")
    # the REJECTED report names the refused seq; the node's next report (still serving) follows it
    wait_until(lambda: row(hub, "mlp").seq == serving, 30, what="the row back on the release served")
    assert torch.equal(answer(node, "mlp", x), before)


def test_a_model_that_does_not_export_is_refused_with_the_exporters_error_whole(fleet) -> None:
    hub, _node, _tmp = fleet
    out = cli("publish", "tests/models.py:make_guarded", "--name", "guarded", "--format", "pt2",
              "--hub", hub.address)
    assert out.returncode != 0
    assert "torch.export failed" in out.stderr and "data-dependent" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert "guarded" not in {m.name for m in hub.status().models}


def test_one_release_carries_both_formats_and_each_node_serves_the_part_for_its_device(fleet) -> None:
    """``--format torchscript,pt2``: a CPU node serves the package compiled for the CPU; the same
    release whose package is for CUDA only is served as TorchScript (said in status)."""
    hub, node, _tmp = fleet
    model, _ = make_mlp()
    out = cli("publish", "tests/models.py:make_mlp", "--name", "duo", "--format", "torchscript,pt2",
              "--hub", hub.address, "--wait-for", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["moved"]["n"]["format"] == "pt2"
    x = torch.randn(5, 784)
    assert torch.allclose(answer(node, "duo", x), model(x), atol=1e-5)
    both = HubClient(hub.address, timeout=60).fetch("duo", json.loads(out.stdout)["seq"])
    assert both.manifest.format == "torchscript+pt2" and both.manifest.devices == ["cpu"]
    ts = HubClient(hub.address, timeout=60).publish(remade(both, devices=["cuda"], label="ts-here"))
    assert hub.wait_for("duo", ts.seq, 1, 120)[0]
    wait_until(lambda: row(hub, "duo").stages_seq == ts.seq and row(hub, "duo").format == "torchscript", 30)
    assert torch.allclose(answer(node, "duo", x), model(x), atol=1e-5)


def test_without_torch_jit_a_pt2_release_publishes_serves_and_updates(tmp_path) -> None:
    """With ``torch.jit.script``, ``trace``, ``save`` and ``load`` raising in
    every process (the PyTorch PR that makes each deprecated call an error;
    ``tests/jitless/sitecustomize.py``), ``--format pt2`` publishes, a node serves it and takes new
    weights, and the commands that never needed TorchScript keep working."""
    from tests.helpers import free_port_pair

    env = {"PYTHONPATH": f"{ROOT}/tests/jitless:{ROOT}"}
    proof = cli("build", "tests/models.py:make_lenet", "--name", "lenet", "--store", str(tmp_path / "x"),
                env=env)  # the TorchScript path is gone here, and says so
    assert proof.returncode != 0, proof.stderr
    assert "torch.jit.script` is deprecated and disabled" in proof.stderr, proof.stderr
    hub_addr, node_addr = (f"tcp://127.0.0.1:{free_port_pair()}" for _ in range(2))
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    logs = open(tmp_path / "procs.log", "w")  # noqa: SIM115
    hub_args = ["hub", "--bind", hub_addr, "--store", str(tmp_path / "hub"), "--heartbeat", "0.25"]
    node_args = ["serve", "--hub", hub_addr, "--model", "mlp", "--bind", node_addr, "--workers", "1",
                 "--cache", str(tmp_path / "c"), "--node-id", "j"]
    procs = [subprocess.Popen([sys.executable, "-m", "zmqmodels", *args], env=full, cwd=ROOT, stdout=logs,
                              stderr=subprocess.STDOUT) for args in (hub_args, node_args)]
    try:
        wait_until(lambda: cli("status", "--hub", hub_addr, timeout=60).returncode == 0, 60, interval=0.5,
                   what="the hub answering")
        one = cli("publish", "tests/models.py:make_mlp", "--name", "mlp", "--format", "pt2", "--label", "v1",
                  "--hub", hub_addr, "--wait-for", "1", "--json", env=env)
        assert one.returncode == 0, one.stderr
        assert json.loads(one.stdout)["moved"]["j"]["format"] == "pt2"
        model, _ = make_mlp()
        x = torch.randn(3, 784)
        with Client(node_addr, timeout=30) as c:
            assert torch.allclose(c.infer("mlp", x).outputs, model(x), atol=1e-5)
        with torch.no_grad():
            model.b.weight.mul_(-1)
        torch.save(model.state_dict(), tmp_path / "ft.pt")
        two = cli("publish", "--weights", str(tmp_path / "ft.pt"), "--like", "mlp", "--hub", hub_addr,
                  "--wait-for", "1", "--json", env=env)
        assert two.returncode == 0, two.stderr
        assert json.loads(two.stdout)["moved"]["j"]["how"] == "apply"
        out = cli("infer", "--server", node_addr, "--model", "mlp", "--input", "2x784", "--json", env=env)
        assert out.returncode == 0, out.stderr
        for args in (("status", "--hub", hub_addr), ("releases", "mlp", "--hub", hub_addr),
                     ("pin", "mlp", "1", "--hub", hub_addr),
                     ("inspect", str(next((tmp_path / "hub" / "mlp").glob("*.zmr"))))):
            done = cli(*args, env=env)
            assert done.returncode == 0, (args, done.stderr)
        back = cli("rollback", "mlp", "--to", "1", "--hub", hub_addr, "--wait-for", "1", env=env)
        assert back.returncode == 0, back.stderr
        with Client(node_addr, timeout=30) as c:
            assert torch.allclose(c.infer("mlp", x).outputs, make_mlp()[0](x), atol=1e-5)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        logs.close()


def test_the_cpp_node_serves_a_pt2_release_and_says_it_loaded_it_whole(binary, pt2_release, tmp_path) -> None:
    """The C++ node loads the package with ``AOTIModelPackageLoader``, binds its constants to the
    archive's weights, checks the examples and serves it; new weights are a full load there,
    and its status says so; a package for another device is refused with the reason."""
    from tests.helpers import CppNode

    model, _ = make_mlp()
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub"), heartbeat_interval_s=0.25) as hub:
        cpp = CppNode(binary, hub.address, tmp_path / "cache", models=("mlp",))
        try:
            one = cli("publish", str(pt2_release), "--hub", hub.address, "--wait-for", "1", "--json")
            assert one.returncode == 0, one.stderr + cpp.stderr()
            x = torch.randn(6, 784)
            with Client(cpp.address, timeout=30) as c:
                assert torch.allclose(c.infer("mlp", x).outputs, model(x), atol=1e-5)
            st = row(hub, "mlp")
            assert st.format == "pt2" and st.how == "load", st
            assert "C++ node loads every release whole" in st.how_reason
            with torch.no_grad():
                model.b.bias.add_(1.0)
            done = HubClient(hub.address, timeout=120).publish_weights("mlp", model.state_dict())
            assert hub.wait_for("mlp", done.seq, 1, 120)[0], cpp.stderr()
            with Client(cpp.address, timeout=30) as c:
                assert torch.allclose(c.infer("mlp", x).outputs, model(x), atol=1e-5)
            cuda = HubClient(hub.address).publish(remade(read_release_file(pt2_release), devices=["cuda"],
                                                         label="cuda-only"))
            wait_until(lambda: row(hub, "mlp").rejected_seq == cuda.seq, 60, what="cuda-only refused")
            assert "compiled for cuda" in row(hub, "mlp").last_error
            assert row(hub, "mlp").seq == done.seq
        finally:
            cpp.close()


def test_the_torchscript_path_says_the_deprecation_once_in_its_own_words(tmp_path) -> None:
    """Where torch.jit warns on every call (a user with warnings on), a TorchScript
    build prints one line pointing at ``--format pt2``, not PyTorch's warning per call."""
    out = cli("build", "tests/models.py:make_lenet", "--name", "lenet", "--store", str(tmp_path),
              env={"PYTHONWARNINGS": "default"})
    assert out.returncode == 0, out.stderr
    said = out.stdout + out.stderr
    assert "is deprecated. Please switch to" not in said, said
    assert said.count("--format pt2 publishes a torch.export/AOTInductor package instead") == 1, said


@pytest.mark.cuda
def test_a_pt2_package_compiled_for_cuda_serves_on_a_cuda_worker_and_takes_new_weights(tmp_path) -> None:
    """The package for ``cuda`` (compiled where the model's weights are): a CUDA worker serves
    it (format pt2) and applies new weights into its second runner."""
    from zmqmodels import build_release, compile_model

    model, examples = make_mlp()
    model = model.cuda()
    release = build_release(compile_model(model, [e.cuda() for e in examples], formats=["pt2"]), "mlp", "g1")
    assert release.manifest.devices == ["cuda"]
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub"), heartbeat_interval_s=0.25) as hub:
        node = Node(hub.address, ["mlp"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "c", node_id="g",
                    devices=["cuda:0"]).start()
        try:
            assert hub.wait_for("mlp", hub.publish(release).seq, 1, 300)[0]
            assert row(hub, "mlp").format == "pt2"
            x = torch.randn(3, 784)
            assert torch.allclose(answer(node, "mlp", x), model(x.cuda()).cpu(), atol=1e-3)
            with torch.no_grad():
                model.b.bias.add_(1.0)
            done = HubClient(hub.address, timeout=300).publish_weights("mlp", model.state_dict())
            assert hub.wait_for("mlp", done.seq, 1, 300)[0]
            wait_until(lambda: row(hub, "mlp").how == "apply", 30)
            assert torch.allclose(answer(node, "mlp", x), model(x.cuda()).cpu(), atol=1e-3)
        finally:
            node.close()
