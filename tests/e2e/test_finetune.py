"""Publishing a fine-tune as users do after training (issue 32): saved TorchScript files,
factories with ``--weights``, ``--like`` checkpoints and ``publish_weights``, through the CLI
against a hub and two nodes. Bytes are the nodes' own counters; every path runs the same checks
and refuses bad weights before anything is stored."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import cli, wait_until
from tests.models import LeNet, Stack
from zmqmodels import Hub, HubClient, Node, build_release, compile_model
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(600)
MODELS = ["head", "lenet", "stg", "lbl"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    with Hub("tcp://127.0.0.1:0", Store(tmp / "hub"), heartbeat_interval_s=0.25) as hub:
        nodes = [Node(hub.address, MODELS, "tcp://127.0.0.1:0", workers=1, cache=tmp / n,
                      node_id=n).start() for n in ("a", "b")]
        try:
            yield hub, nodes, tmp
        finally:
            for n in nodes:
                n.close()


def received(nodes: list[Node]) -> list[int]:
    return [n.follower_stats().get("bytes_received", 0) for n in nodes]


def seqs(hub: Hub, name: str) -> list[int]:
    return [r.seq for r in hub.releases(name)] if name in {m.name for m in hub.status().models} else []


def lenet_publish(hub: Hub, label: str) -> int:
    torch.manual_seed(0)
    m = LeNet().eval()
    done = hub.publish(build_release(compile_model(m, [torch.randn(1, 1, 28, 28)]), "lenet", label))
    assert hub.wait_for("lenet", done.seq, 2, 120)[0]
    return done.seq


def test_a_head_only_update_saved_to_a_file_moves_only_what_changed_and_is_applied(fleet) -> None:
    """Why 1 and 7: `publish vN.pt` of a head-only update moved every byte; the codec and the
    examples now stay the base's, and the node applies it."""
    hub, nodes, tmp = fleet
    torch.manual_seed(0)
    model = Stack().eval()
    torch.jit.script(model).save(str(tmp / "v1.pt"))
    with torch.no_grad():
        model.layers[11].weight.add_(1e-3)
    torch.jit.script(model).save(str(tmp / "v2.pt"))
    before = received(nodes)
    one = cli("publish", str(tmp / "v1.pt"), "--name", "head", "--example-input", "1x256", "--codec", "lz4",
              "--chunk-mb", "0.125", "--label", "v1", "--hub", hub.address, "--wait-for", "2", "--json")
    assert one.returncode == 0, one.stderr
    first = json.loads(one.stdout)["moved"]["a"]  # a load, and why: what the operator sees
    assert first["how"] == "load", first  # a worker still starting reads it from the cache instead
    assert first["why"] in ("nothing of this model served here yet",
                            "the worker started after it came: read from this node's cache"), first
    assert "whole release: the first of its name" in one.stderr
    full = min(a - b for a, b in zip(received(nodes), before, strict=True))
    before = received(nodes)
    two = cli("publish", str(tmp / "v2.pt"), "--name", "head", "--example-input", "1x256", "--label", "v2",
              "--hub", hub.address, "--wait-for", "2", "--json")
    assert two.returncode == 0, two.stderr
    moved = [a - b for a, b in zip(received(nodes), before, strict=True)]
    out = json.loads(two.stdout)
    print(f"full {full} B, head-only {moved} B; {two.stderr}")
    assert max(moved) <= 0.10 * full, (moved, full)
    assert "delta on seq 1 (v1), same code: 1 of 24 tensor(s) changed" in two.stderr, two.stderr
    for node in ("a", "b"):
        row = out["moved"][node]
        assert row["how"] == "apply" and row["bytes_received"] == moved["ab".index(node)], row
        assert row["chunks_reused"] > 0
    # the file saved again, without examples and with --codec auto: the base's examples and codec
    back = cli("publish", str(tmp / "v1.pt"), "--name", "head", "--hub", hub.address, "--wait-for", "2",
               "--json")
    assert back.returncode == 0 and "examples: the 1 of head seq 2 (none given)" in back.stderr, back.stderr
    (info,) = [r for r in hub.releases("head") if r.seq == json.loads(back.stdout)["seq"]]
    assert info.codec.startswith("lz4/")
    # the same through the Python API, from a module: a delta on what serves, applied
    with torch.no_grad():
        model.layers[11].bias.add_(1e-3)
    before = received(nodes)
    client = HubClient(hub.address)
    done = client.publish(build_release(compile_model(model, [torch.randn(1, 256)]), "head", "v3"))
    assert hub.wait_for("head", done.seq, 2, 120)[0]
    assert max(a - b for a, b in zip(received(nodes), before, strict=True)) <= 0.10 * full  # v1 -> v3
    wait_until(lambda: all(r.how == "apply" for r in hub.status().nodes
                           if r.model == "head" and r.stages_seq == done.seq), 10)


def test_like_refuses_a_missing_key_unless_partial_and_reads_ddp_and_nested_checkpoints(fleet) -> None:
    """Why 2 and 3: a missing key went to production through --like; a DDP checkpoint failed
    there; a nested one was taken without a word."""
    hub, nodes, tmp = fleet
    lenet_publish(hub, "v1")
    sd = LeNet().state_dict()
    missing = {k: v for k, v in sd.items() if k != "fc3.bias"}
    torch.save(missing, tmp / "missing.pt")
    stored = seqs(hub, "lenet")
    out = cli("publish", "--weights", str(tmp / "missing.pt"), "--like", "lenet", "--hub", hub.address,
              "--wait-for", "2")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: weights do not fit lenet seq") and "missing keys fc3.bias" in last, last
    assert "--partial" in last and seqs(hub, "lenet") == stored
    part = cli("publish", "--weights", str(tmp / "missing.pt"), "--like", "lenet", "--partial",
               "--hub", hub.address, "--wait-for", "2")
    assert part.returncode == 0, part.stderr
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp / "ddp.pt")
    ddp = cli("publish", "--weights", str(tmp / "ddp.pt"), "--like", "lenet", "--hub", hub.address,
              "--wait-for", "2")
    assert ddp.returncode == 0, ddp.stderr
    assert "stripped the 'module.' prefix (a DataParallel/DDP checkpoint)" in ddp.stdout
    torch.save({"model": sd, "optimizer": {"lr": torch.tensor(0.1)}, "step": 7}, tmp / "nested.pt")
    nested = cli("publish", "--weights", str(tmp / "nested.pt"), "--like", "lenet", "--hub", hub.address,
                 "--wait-for", "2")
    assert nested.returncode == 0, nested.stderr
    assert "took the state dict under 'model' (left out: optimizer, step)" in nested.stdout


def test_a_nan_checkpoint_is_refused_on_every_path_before_anything_is_stored(fleet) -> None:
    """Why 4: the factory path compared NaN with NaN, called it parity and stored the release."""
    hub, nodes, tmp = fleet
    lenet_publish(hub, "nan-base")
    sd = LeNet().state_dict()
    sd["fc3.bias"][0] = float("nan")
    torch.save(sd, tmp / "nan.pt")
    stored = seqs(hub, "lenet")
    factory = cli("publish", "tests.models:make_lenet", "--weights", str(tmp / "nan.pt"), "--name", "lenet",
                  "--hub", hub.address)
    like = cli("publish", "--weights", str(tmp / "nan.pt"), "--like", "lenet", "--hub", hub.address)
    for out in (factory, like):
        assert out.returncode == 1
        assert "NaN or Inf in fc3.bias" in out.stderr.strip().splitlines()[-1], out.stderr
    with pytest.raises(Exception, match="NaN or Inf"):
        HubClient(hub.address).publish_weights("lenet", sd)
    assert seqs(hub, "lenet") == stored


def refused_by_nodes(hub: Hub) -> int:
    """A release that passes every publisher check but that every node refuses (its recorded
    outputs disagree with what the nodes compute: a node whose numbers differ)."""
    import msgspec

    from zmqmodels.release.manifest import Release, pack_tensors

    torch.manual_seed(1)
    rel = build_release(compile_model(LeNet().eval(), [torch.randn(1, 1, 28, 28)]), "lenet", "bad")
    wrong = pack_tensors([torch.full((1, 10), 5.0)])
    rel = Release(msgspec.structs.replace(rel.manifest, expected=wrong).check(), rel.chunks)
    return hub.publish(rel).seq


def test_like_builds_on_what_serves_the_header_says_so_and_last_error_clears(fleet) -> None:
    """Why 5: --like built on a release every node had rejected; the header named it current;
    LAST ERROR stayed through later releases."""
    hub, nodes, tmp = fleet
    good = lenet_publish(hub, "good")
    bad = refused_by_nodes(hub)
    wait_until(lambda: all(r.rejected_seq == bad for r in hub.status().nodes if r.model == "lenet"), 60)
    head = cli("status", "--hub", hub.address)
    want = f"lenet serving seq {good} (good) on 2; newest stored seq {bad} (bad): rejected by 2 node(s)"
    assert want in head.stdout.splitlines()[0], head.stdout
    torch.save(LeNet().state_dict(), tmp / "step2000.pt")
    out = cli("publish", "--weights", str(tmp / "step2000.pt"), "--like", "lenet", "--hub", hub.address,
              "--wait-for", "2", "--json")
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    m = HubClient(hub.address).fetch("lenet", done["seq"], manifest_only=True).manifest
    assert m.metadata["weights_of"] == str(good) and done["label"] == f"good+w{done['seq']}"
    rows = [r for r in hub.status().nodes if r.model == "lenet"]
    assert all(r.rejected_seq == 0 and r.last_error == "" for r in rows), rows
    now = cli("status", "--hub", hub.address).stdout
    assert f"lenet seq {done['seq']} (good+w{done['seq']}) active" in now, now


def test_staged_wait_for_waits_for_nodes_holding_it(fleet) -> None:
    """Why 6: `publish --staged --wait-for N` always failed after its whole timeout."""
    hub, nodes, tmp = fleet
    torch.manual_seed(0)
    torch.jit.script(LeNet().eval()).save(str(tmp / "stg.pt"))
    first = cli("publish", str(tmp / "stg.pt"), "--name", "stg", "--example-input", "1x1x28x28",
                "--hub", hub.address, "--wait-for", "2")
    assert first.returncode == 0, first.stderr
    out = cli("publish", str(tmp / "stg.pt"), "--name", "stg", "--example-input", "1x1x28x28", "--staged",
              "--hub", hub.address, "--wait-for", "2", "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "waiting for 2 node(s) to hold it" in out.stdout and "2/2 hold" in out.stdout
    assert "staged: 2 node(s) hold it, 0 serve it" in out.stdout


def test_labels_stay_unique_and_checkpoint_errors_speak_this_tool(fleet) -> None:
    """Why 8 and 9: every --like was `<base>+w1`; a duplicate label was only a warning; torch's
    own advice (re-run with weights_only=False) reached the user."""
    hub, nodes, tmp = fleet
    torch.manual_seed(0)
    m = LeNet().eval()
    base = hub.publish(build_release(compile_model(m, [torch.randn(1, 1, 28, 28)]), "lbl", "v8"))
    assert hub.wait_for("lbl", base.seq, 2, 120)[0]
    torch.save(m.state_dict(), tmp / "same.pt")
    labels = []
    for _ in range(2):
        out = cli("publish", "--weights", str(tmp / "same.pt"), "--like", "lbl", "--hub", hub.address,
                  "--wait-for", "2", "--json")
        assert out.returncode == 0, out.stderr
        labels.append(json.loads(out.stdout)["label"])
    assert len(set(labels)) == 2 and all(lb.startswith("v8+w") for lb in labels), labels
    same = ("publish", "--weights", str(tmp / "same.pt"), "--like", "lbl", "--label", "v8",
            "--hub", hub.address)
    dup = cli(*same)
    assert dup.returncode == 1 and "label 'v8' is already on lbl seq" in dup.stderr, dup.stderr
    again = cli(*same, "--reuse-label")
    assert again.returncode == 0 and "warning: label 'v8' is also on lbl seq" in again.stdout, again.stderr
    (tmp / "garbage.pt").write_bytes(os.urandom(2000))
    torch.save(m, tmp / "whole.pt")
    for name, want in (("garbage.pt", "is not a torch.save checkpoint"),
                       ("whole.pt", "pickles a tests.models.LeNet")):
        for args in (("--like", "lbl"), ("tests.models:make_lenet", "--name", "lbl")):
            out = cli("publish", "--weights", str(tmp / name), *args, "--hub", hub.address)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 1 and want in lines[-1], out.stderr
            assert "weights_only" not in out.stderr and len(lines[-1]) < 400, lines[-1]
