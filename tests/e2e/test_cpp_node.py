"""The C++ node (cpp/, `zmqmodels-node`) against the Python hub, node and client: same wire,
same outputs, same codes. `scripts/test` builds it before pytest starts (never inside a test's
timeout); here a missing binary skips, saying how to build it, and a stale one fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch
import zmq

from tests.fuzzing import fake_hub, fuzz_as_hub, fuzz_front
from tests.helpers import ROOT, STARTED, CppNode, free_port, wait_until
from tests.models import DictTuple, Probe, probe_examples
from zmqmodels import Client, Hub, HubClient, Node, build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.errors import RemoteError, ZmqModelsError
from zmqmodels.release.manifest import encode_manifest
from zmqmodels.release.signing import SigningKey, Trust, generate_signing_key
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(300)


def test_core_unit_tests(binary) -> None:
    """The C++ library's own tests: repair rules, manifest limits, staging, the tensor codec,
    and the slot's ordering across serving threads (cpp/tests/core_tests.cpp)."""
    tests = binary.parent / "zmqmodels-core-tests"
    assert tests.stat().st_mtime >= (ROOT / "cpp" / "tests" / "core_tests.cpp").stat().st_mtime, \
        f"{tests} is older than its source: run scripts/build_cpp"
    out = subprocess.run([str(tests)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Status: SUCCESS!" in out.stdout, out.stdout
    cases = int(re.search(r"test cases:\s+(\d+) \|\s+(\d+) passed", out.stdout).group(2))
    assert cases >= 15, out.stdout


def test_the_cpp_node_is_composed_of_units_its_tests_reach() -> None:
    """The node is units its doctest reaches: INFER parsed once, kinds from the framing table,
    typed headers, states as an enum, old versions released by their last reference."""
    src = ROOT / "cpp" / "src"
    kinds = ("MANIFEST", "CHUNK", "HEARTBEAT", "ACTIVATE", "FETCH_MANIFEST", "FETCH_CHUNKS", "REPORT",
             "ERROR", "INFER", "OK")
    literal = re.compile('"({})"'.format("|".join(kinds)))
    for path in src.glob("*.[ch]pp"):
        text = path.read_text()
        if path.name not in ("frames.cpp", "generated.hpp"):  # the table, and the one it is generated from
            assert not literal.search(text), f"{path.name} names a message kind outside the framing table"
        assert "use_count()" not in text, path.name
        assert "MapWriter w(17)" not in text and '.kv("state"' not in text, path.name
    header = (src / "node.hpp").read_text()
    for unit in ("class Requests", "class Loads", "class Follows", "class Node", "class WorkQueue"):
        assert unit in header
    assert len((src / "main.cpp").read_text().splitlines()) < 200  # arguments and main() only
    assert "enum class State" in (src / "follower.hpp").read_text()
    assert "MSGPACK_DEFINE_MAP" in (src / "frames.hpp").read_text()
    tests = (ROOT / "cpp" / "tests" / "core_tests.cpp").read_text()
    assert "#include <doctest/doctest.h>" in tests and "#define EXPECT" not in tests


def probe(scale: float, label: str):
    torch.manual_seed(0)
    return build_release(compile_model(Probe(scale), probe_examples()), "probe", label)


def started(binary: Path, hub, tmp_path: Path, scale: float, *args: str) -> tuple[CppNode, int]:
    """A C++ node serving ``probe`` at ``scale`` (label v1); its seq."""
    cpp = CppNode(binary, hub.address, tmp_path / "cache", *args)
    try:
        seq = hub.publish(probe(scale, "v1")).seq
        assert hub.wait_for("probe", seq, 1, 120)[0], cpp.stderr()
    except BaseException:
        cpp.close()
        raise
    return cpp, seq


def answer_or_none(address: str):
    """A reply to ``probe(ones(1, 4))``, or None while the node cannot answer yet."""
    with Client(address, timeout=2, retries=0) as c:
        try:
            return c.infer("probe", torch.ones(1, 4))
        except Exception:  # noqa: BLE001 (not up, or not loaded, yet)
            return None


def row(hub, node: str, model: str = "probe"):
    return next((r for r in hub.status().nodes if r.node == node and r.model == model), None)


def serving(hub, node: str, seq: int, model: str = "probe") -> bool:
    r = row(hub, node, model)
    return r is not None and r.state == "serving" and r.seq == seq


def test_cpp_and_python_nodes_receive_the_same_release_and_answer_bit_identically(binary, hub,
                                                                                  tmp_path) -> None:
    cpp = CppNode(binary, hub.address, tmp_path / "cpp-cache", models=("probe", "dt"))
    py = Node(hub.address, ["probe", "dt"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "py-cache",
              node_id="py").start()
    try:
        torch.manual_seed(1)
        dt = hub.publish(build_release(compile_model(DictTuple(), [torch.randn(3, 4)]), "dt", "d1")).seq
        v1 = hub.publish(probe(2.0, "v1")).seq
        for name, seq in (("probe", v1), ("dt", dt)):
            ok, st = hub.wait_for(name, seq, 2, 120)
            assert ok, (st, cpp.stderr())
        r = row(hub, "cpp")
        assert (r.device, r.label, r.host != "", r.pid == cpp.proc.pid) == ("cpu", "v1", True, True)
        x = torch.randn(5, 4)
        with Client(cpp.address, timeout=10) as a, Client(py.address, timeout=10) as b:
            ra, rb = a.infer("probe", x), b.infer("probe", x)
            assert torch.equal(ra.outputs, rb.outputs)
            assert (ra.seq, ra.label) == (rb.seq, rb.label) == (v1, "v1")
            da, db = a.infer("dt", x), b.infer("dt", x)
            assert da.outputs[0].keys() == db.outputs[0].keys() == {"logits", "probs"}
            for k in ("logits", "probs"):
                assert torch.equal(da.outputs[0][k], db.outputs[0][k])
            assert torch.equal(da.outputs[1], db.outputs[1])
            # the same codes and messages for what the Python node refuses
            cases = (((torch.ones(2, 5),), {}, "bad_input"),
                     ((torch.ones(2, 4, dtype=torch.int64),), {}, "bad_input"),
                     ((torch.full((1, 4), -1.0),), {}, "model_error"),
                     ((x,), {"seq": 99}, "version_unavailable"))
            for args, kw, code in cases:
                errs = []
                for c in (a, b):
                    with pytest.raises(RemoteError) as e:
                        c.infer("probe", *args, **kw)
                    errs.append((e.value.code, str(e.value)))
                assert errs[0][0] == errs[1][0] == code, errs
                assert errs[0][1] == errs[1][1], errs
            with pytest.raises(RemoteError, match="unknown_model"):
                a.infer("nope", x)
    finally:
        cpp.close()
        py.close()


def test_a_weights_update_is_served_by_both_kinds_and_status_says_which_path_each_took(binary, hub,
                                                                                     tmp_path) -> None:
    """publish_weights: the Python node applies the tensors to its code (stage ``apply``); the
    C++ node takes the full path (stage ``load``) and says so in the status table."""
    cpp, v1 = started(binary, hub, tmp_path, 2.0)
    py = Node(hub.address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "py-cache",
              node_id="py").start()
    try:
        assert hub.wait_for("probe", v1, 2, 120)[0]
        done = HubClient(hub.address).publish_weights("probe", {"scale": torch.full((4,), 5.0)})
        ok, st = hub.wait_for("probe", done.seq, 2, 120)
        assert ok, (st, cpp.stderr())
        wait_until(lambda: row(hub, "py").stages_seq == done.seq and "apply" in row(hub, "py").stages
                   and row(hub, "cpp").stages_seq == done.seq and "load" in row(hub, "cpp").stages, 30,
                   what="both nodes to report how they swapped it in")
        assert "load" not in row(hub, "py").stages and "apply" not in row(hub, "cpp").stages
        for address in (cpp.address, py.address):
            with Client(address, timeout=10) as c:
                r = c.infer("probe", torch.ones(1, 4))
            assert r.seq == done.seq and torch.equal(r.outputs, torch.full((1, 4), 5.0))
    finally:
        cpp.close()
        py.close()


def test_dropped_chunk_is_repaired(binary, tmp_path) -> None:
    last = [4]  # set to the release's last chunk below, before the publish

    def fault(name, seq, index, payload):  # the broadcast loses chunks 1 and the last
        return b"" if index in (1, last[0]) else payload

    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub"), fault=fault) as hub:
        cpp = CppNode(binary, hub.address, tmp_path / "cache", "--load-from", "memory")
        try:
            torch.manual_seed(0)
            rel = build_release(compile_model(Probe(3.0, ballast_mb=8), probe_examples()), "probe", "big",
                                chunk_bytes=2 << 20, codec="lz4")
            assert rel.manifest.chunk_count >= 5
            last[0] = rel.manifest.chunk_count - 1
            m = hub.publish(rel)
            ok, st = hub.wait_for("probe", m.seq, 1, 120)
            assert ok, (st, cpp.stderr())
            assert hub.stats["fetch_chunks"] >= 2
            with Client(cpp.address, timeout=10) as c:
                assert torch.equal(c.infer("probe", torch.ones(1, 4)).outputs, torch.full((1, 4), 3.0))
        finally:
            cpp.close()


def test_a_cpp_node_that_joins_after_a_staged_publish_serves_the_active_release(binary, hub,
                                                                                tmp_path) -> None:
    """A node that took the staged seq 2 (the newest) fetches the active seq 1 too and serves
    it, as the Python node does (docs/protocol.md, staged releases; tests/vectors/follow.json)."""
    v1 = hub.publish(probe(1.0, "v1")).seq
    v2 = hub.publish(probe(2.0, "v2"), staged=True).seq
    late = CppNode(binary, hub.address, tmp_path / "cache", node_id="late")
    try:
        wait_until(lambda: serving(hub, "late", v1) and row(hub, "late").staged == v2, 90,
                   what=f"the late C++ node serving v1 and holding v2 ({late.stderr()[-300:]})")
        assert answer_or_none(late.address).seq == v1
        hub.activate("probe", v2)
        wait_until(lambda: serving(hub, "late", v2), 90, what="v2 once activated")
        assert answer_or_none(late.address).seq == v2
    finally:
        late.close()


def test_unsigned_release_is_refused_under_trust(binary, hub, tmp_path) -> None:
    generate_signing_key(tmp_path / "keys")
    key = SigningKey.load(tmp_path / "keys" / "signing.key")
    # --trust takes a key, a key file or (here) a directory of .pub files, as the Python node does
    cpp = CppNode(binary, hub.address, tmp_path / "cache", "--trust", str(tmp_path / "keys"))
    try:
        unsigned = hub.publish(probe(2.0, "unsigned"))
        wait_until(lambda: (r := row(hub, "cpp")) is not None and r.rejected_seq == unsigned.seq, 60,
                   what="the refusal")
        assert "unsigned" in row(hub, "cpp").last_error
        signed = hub.publish(key.seal(probe(4.0, "signed"), hub.store.reserve("probe")))
        ok, st = hub.wait_for("probe", signed.seq, 1, 60)
        assert ok, (st, cpp.stderr())
        with Client(cpp.address, timeout=10) as c:
            assert c.infer("probe", torch.ones(1, 4)).label == "signed"
        assert Trust.load([tmp_path / "keys" / "signing.pub"]).required
    finally:
        cpp.close()


def test_swap_under_four_clients_fails_nothing_and_replies_name_their_version(binary, hub, tmp_path) -> None:
    cpp, v1 = started(binary, hub, tmp_path, 2.0, "--threads", "2")
    scales = {v1: 2.0}
    stop, failures, seen = threading.Event(), [], []
    per_client: list[list[int]] = [[] for _ in range(4)]
    try:

        def client(mine: list[int]) -> None:
            with Client(cpp.address, timeout=10) as c:
                while not stop.is_set():
                    try:
                        r = c.infer("probe", torch.ones(1, 4))
                    except Exception as exc:  # noqa: BLE001 (counted: the test asserts there are none)
                        failures.append(repr(exc))
                        continue
                    seen.append((r.seq, float(r.outputs[0, 0])))
                    mine.append(r.seq)

        threads = [threading.Thread(target=client, args=(per_client[i],)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        for scale in (3.0, 4.0):
            torch.manual_seed(0)
            heavy = compile_model(Probe(scale, ballast_mb=8), probe_examples())
            m = hub.publish(build_release(heavy, "probe", f"s{scale}"))
            scales[m.seq] = scale
            assert hub.wait_for("probe", m.seq, 1, 60)[0], cpp.stderr()
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert failures == []
        assert {s for s, _ in seen} == set(scales)
        assert all(out == scales[s] for s, out in seen)  # each reply names the version it came from
        assert all(seqs == sorted(seqs) for seqs in per_client)  # no client saw a version step back
    finally:
        stop.set()
        cpp.close()


def test_kill9_and_restart_serves_from_the_cache_before_the_hub_answers(binary, hub, tmp_path) -> None:
    cpp, v1 = started(binary, hub, tmp_path, 5.0)
    try:
        cpp.proc.send_signal(signal.SIGKILL)
        cpp.proc.wait(10)
        dead_hub = f"tcp://127.0.0.1:{free_port()}"
        again = CppNode(binary, dead_hub, tmp_path / "cache", node_id="cpp2")
        try:
            r = wait_until(lambda: answer_or_none(again.address), 60, interval=0.2, what="the restarted node")
            assert (r.seq, r.label, float(r.outputs[0, 0])) == (v1, "v1", 5.0)
        finally:
            again.close()
        listed = subprocess.run([str(binary), "--list", str(tmp_path / "cache" / "probe" / f"{v1:012d}.pt")],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "scale\tfloat32\t[4]" in listed.stdout, listed
    finally:
        cpp.close()


def test_garbage_frames_leave_it_serving(binary, hub, tmp_path) -> None:
    cpp, v1 = started(binary, hub, tmp_path, 2.0)
    try:
        codes = fuzz_front(cpp.address)
        # a model name that is not UTF-8: refused, and the reply (which names it) still decodes
        bad = P.encode(P.InferRequest("probe", "1", {"t": "tuple", "items": []}))
        bad = bad.replace(b"probe", b"pr\xa3be")
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(cpp.address)
        try:
            dealer.send_multipart([b"", b"INFER", bad])
            assert dealer.poll(10_000)
            reply, _ = P.unpack(dealer.recv_multipart()[1:])
            assert reply.code == "bad_request" and "UTF-8" in reply.message
        finally:
            dealer.close()
        assert "bad_request" in codes and cpp.proc.poll() is None
        with Client(cpp.address, timeout=10) as c:
            r = c.infer("probe", torch.ones(1, 4))
        assert (r.label, r.seq, float(r.outputs[0, 0])) == ("v1", v1, 2.0)
    finally:
        cpp.close()


def test_garbage_from_a_fake_hub_leaves_it_following(binary, tmp_path, short_tmp) -> None:
    """A fake hub feeds the node's SUB and DEALER the Python tests' fuzz frames, then a real
    release: the node takes it and serves it."""
    addr = f"ipc://{short_tmp}/fake"
    router, pub = fake_hub(addr)
    cpp = CppNode(binary, addr, tmp_path / "cache")
    try:
        assert router.poll(30_000), cpp.stderr()
        ident = router.recv_multipart()[0]  # its first FETCH_MANIFEST: now it can be answered
        time.sleep(0.3)  # the SUB's subscriptions reach the PUB
        fuzz_as_hub(router, pub, ident, b"probe")
        assert cpp.proc.poll() is None, cpp.stderr()
        rel = probe(6.0, "after")
        m = msgspec.structs.replace(rel.manifest, seq=10**6)
        pub.send_multipart([b"probe\0", b"MANIFEST", encode_manifest(m), b""])
        for i, c in enumerate(rel.chunks):
            pub.send_multipart([b"probe\0", b"CHUNK", P.encode(P.ChunkHeader("probe", m.seq, i)), bytes(c)])

        r = wait_until(lambda: answer_or_none(cpp.address), 60, interval=0.2,
                       what="the real release after the garbage")
        assert (r.seq, r.label, float(r.outputs[0, 0])) == (10**6, "after", 6.0)
        log = cpp.stderr()
        assert "dropped a broadcast" in log and log.isascii()  # peers' bytes are escaped in the log
    finally:
        cpp.close()
        router.close()
        pub.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_serves_and_matches_cpu(binary, hub, tmp_path) -> None:
    cpp, _ = started(binary, hub, tmp_path, 2.0, "--device", "cuda:0")
    try:
        assert row(hub, "cpp").device == "cuda:0"
        with Client(cpp.address, timeout=10) as c:
            assert torch.equal(c.infer("probe", torch.ones(1, 4)).outputs, torch.full((1, 4), 2.0))
    finally:
        cpp.close()


@pytest.mark.parametrize("args,needle", [
    (["--hub", "127.0.0.1:21000", "--model", "m", "--bind", "tcp://127.0.0.1:0"],
     "--hub 127.0.0.1:21000 has no scheme: did you mean tcp://127.0.0.1:21000?"),
    (["--model", "m", "--bind", "tcp://127.0.0.1:70000"], "port of 0-65535"),
    (["--model", "m"], "--bind is required"),
    (["--model", "a b", "--bind", "tcp://127.0.0.1:0"], "--model a b: names are"),
    (["--model", "m", "--bind", "tcp://127.0.0.1:0", "--threads", "x"], "--threads x"),
    (["--model", "m", "--bind", "tcp://127.0.0.1:0", "--device", "gpu"], "--device gpu"),
    (["--model", "m", "--bind", "tcp://127.0.0.1:0", "--frobnicate"], "unknown option --frobnicate"),
])
def test_every_bad_argument_is_one_line_and_rc_1_before_anything_is_bound(binary, tmp_path, args,
                                                                           needle) -> None:
    """A bad argument is one line on stderr and rc 1, before anything is bound."""
    out = subprocess.run([str(binary), *args, "--cache", str(tmp_path / "c")], capture_output=True,
                         text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and needle in lines[0], out.stderr
    assert out.stdout == "" and not (tmp_path / "c").exists()  # nothing bound, printed or created


def test_one_cache_serves_one_node_of_either_kind(binary, hub, tmp_path) -> None:
    """One --cache, one node: a second node of either kind is refused, naming the holder."""
    cache = tmp_path / "shared"
    first = CppNode(binary, hub.address, cache, node_id="first")
    try:
        wait_until(lambda: row(hub, "first") is not None, 60, what="the first node's report")
        second = subprocess.run([str(binary), "--hub", hub.address, "--model", "probe", "--bind",
                                 f"tcp://127.0.0.1:{free_port()}", "--cache", str(cache)],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr
        assert f"is in use by pid {first.proc.pid}: give each node its own --cache" in second.stderr
        with pytest.raises(ZmqModelsError, match=f"is in use by pid {first.proc.pid}"):
            Node(hub.address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=cache).start()
    finally:
        first.close()
    py = Node(hub.address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=cache, node_id="py").start()
    try:
        refused = subprocess.run([str(binary), "--hub", hub.address, "--model", "probe", "--bind",
                                  f"tcp://127.0.0.1:{free_port()}", "--cache", str(cache)],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and f"in use by pid {os.getpid()}" in refused.stderr, refused.stderr
    finally:
        py.close()


def test_a_failed_cache_write_is_written_again_from_memory_and_stays_error(binary, hub, tmp_path,
                                                                          small_fs) -> None:
    """The C++ mirror of the Python node's rule: before, each retry fetched the whole release
    again and the state flipped between `error` and `receiving`."""
    cpp = CppNode(binary, hub.address, small_fs / "cache", node_id="cfull")
    try:
        v1 = hub.publish(probe(2.0, "v1")).seq
        assert hub.wait_for("probe", v1, 1, 120)[0], cpp.stderr()
        big = build_release(compile_model(Probe(3.0, ballast_mb=16), probe_examples()), "probe", "big",
                            codec="none")
        v2 = hub.publish(big).seq
        first = wait_until(lambda: (r := row(hub, "cfull")) is not None and r.state == "error" and r, 60,
                           what="the node reporting error")
        assert first.seq == v2 and "No space left on device" in first.reason, first
        fetched = hub.stats["fetch_manifest"], hub.stats["fetch_chunks"]
        states = []
        deadline = time.monotonic() + 5  # back-off 1, 2, 4 s: two writes again at least
        while time.monotonic() < deadline:
            states.append(row(hub, "cfull").state)
            time.sleep(0.05)
        assert set(states) == {"error"}, states
        assert (hub.stats["fetch_manifest"], hub.stats["fetch_chunks"]) == fetched
        assert answer_or_none(cpp.address).seq == v1  # still serving v1
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
        wait_until(lambda: serving(hub, "cfull", v2), 120, what="v2 written from memory and served")
        assert (hub.stats["fetch_manifest"], hub.stats["fetch_chunks"]) == fetched
    finally:
        cpp.close()


def test_the_readme_says_where_the_binary_finds_libtorch(binary) -> None:
    """The binary's RUNPATH and where it finds LibTorch are what the README says."""
    runpath = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True,
                             timeout=60).stdout
    line = next(x for x in runpath.splitlines() if "RUNPATH" in x)
    assert str(ROOT / ".venv") in line and "torch/lib" in line
    doc = (ROOT / "cpp" / "README.md").read_text()
    assert "RUNPATH" in doc and "LD_LIBRARY_PATH" in doc and ".venv" in doc


def stray_nodes(started: list[subprocess.Popen]) -> list[int]:
    """The pids of the nodes in ``started`` still running: the processes these tests started,
    never the machine's (anyone may run a zmqmodels-node beside the tests)."""
    return [p.pid for p in started if p.poll() is None]


def test_no_node_these_tests_started_is_left_running() -> None:
    """The C++ nodes above were all stopped."""
    assert stray_nodes(STARTED) == []


def test_the_stray_check_sees_only_the_tests_own_nodes(tmp_path) -> None:
    """It was `pgrep -f zmqmodels-node`, machine-wide: it failed on the compilers of a build
    (their command lines name the target) and on anyone's node running beside the tests."""
    foreign = subprocess.Popen(["bash", "-c", "exec -a zmqmodels-node sleep 60"])
    ours = subprocess.Popen(["sleep", "60"])
    try:
        assert stray_nodes([ours]) == [ours.pid]  # one of ours still running: reported
        ours.kill()
        ours.wait(10)
        assert stray_nodes([ours]) == []  # the foreign "zmqmodels-node" is not ours
        assert foreign.poll() is None
    finally:
        for p in (foreign, ours):
            p.kill()
            p.wait(10)
