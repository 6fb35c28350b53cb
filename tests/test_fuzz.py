"""Every decoder turns arbitrary and mutated input into a clean ZmqModelsError, never a crash.
(More examples with --slow.)"""

from __future__ import annotations

import hashlib
import os
import time

import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_until
from tests.helpers import raw_release
from tests.models import Probe, probe_examples
from zmqmodels import Client, Hub, Node, Subscriber, build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.errors import ZmqModelsError
from zmqmodels.hub_client import HubClient
from zmqmodels.release import decode_manifest, decompress_chunk, encode_manifest
from zmqmodels.store import Store
from zmqmodels.tensors import decode

SLOW = os.environ.get("ZMQM_FUZZ_SLOW") == "1"
EXAMPLES = 3000 if SLOW else 300
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = {
    b"CHUNK": P.encode(P.ChunkHeader("m", 3, 1)),
    b"HEARTBEAT": P.encode(P.Heartbeat("hub", "m", 3, "a" * 64, "v1")),
    b"FETCH_MANIFEST": P.encode(P.FetchManifest("m", 2)),
    b"FETCH_CHUNKS": P.encode(P.FetchChunks("m", 2, [0, 1, 2])),
    b"REPORT": P.encode(P.Report("n", "m", "serving", 2, "v1")),
    b"INFER": P.encode(P.InferRequest("m", "1", {"t": "tuple", "items": []})),
    b"ERROR": P.encode(P.ErrorReply("bad_message", "x")),
    b"LOAD": P.encode(P.LoadCommand("m", 2, "/x")),
    b"LOADED": P.encode(P.LoadResult("w", "m", 2, "v1", True)),
    b"READY": P.encode(P.WorkerReady("w", 1, "cpu", {"m": [2, "v1"]})),
    b"OK": P.encode(P.InferReply("1", "m", "v1", 2, "w", {"t": "tuple", "items": []})),
    b"PUBLISH": P.encode(P.Publish(b"s" * 64)),
    b"PUBLISHED": P.encode(P.Published("m", 2, "v1", "a" * 64)),
    b"ROLLBACK": P.encode(P.Rollback("m", "v1")),
    b"RESERVE": P.encode(P.Reserve("m", "v1")),
    b"RESERVED": P.encode(P.Reserved("m", 2)),
    b"STATUS": P.encode(P.StatusRequest()),
    b"STATUS_REPLY": P.encode(P.StatusReply("hub", [P.ModelStatus("m", 2, "v1", "a" * 64, 10)], [
        P.NodeStatus("n", "m", "serving", 2, "v1", "", "h", 1, "cpu", 0.1)])),
}
MANIFEST = encode_manifest(raw_release("m", os.urandom(5000), chunk_bytes=1000).manifest)


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=20,
)


@pytest.mark.parametrize("kind", sorted(VALID))
@fuzz
@given(data=st.data())
def test_headers_reject_garbage_cleanly(kind: bytes, data: st.DataObject) -> None:
    choice = data.draw(st.integers(0, 2))
    if choice == 0:
        raw = data.draw(st.binary(max_size=200))
    elif choice == 1:
        raw = mutate(VALID[kind], data.draw(edits))
    else:
        raw = msgspec.msgpack.encode(data.draw(msgpack_values))
    try:
        P.decode_header(kind, raw)
    except ZmqModelsError:
        pass


@pytest.mark.parametrize("kind", [f.kind for f in P.FRAMING], ids=lambda k: k.decode())
@fuzz
@given(data=st.data())
def test_unpack_of_every_kind_raises_only_protocol_errors(kind: bytes, data: st.DataObject) -> None:
    """``unpack`` (the framing table) on a real kind with a garbage, mutated or valid header
    and any number of payload frames: a message, or a ProtocolError; nothing else escapes."""
    from zmqmodels.errors import ProtocolError

    valid = VALID.get(kind, b"")
    how = data.draw(st.integers(0, 3))
    header = (valid if how == 0 else mutate(valid, data.draw(edits)) if how == 1
              else msgspec.msgpack.encode(data.draw(msgpack_values)) if how == 2
              else data.draw(st.binary(max_size=64)))
    frames = [kind, header, *data.draw(st.lists(st.binary(max_size=32), max_size=4))]
    try:
        msg, payload = P.unpack(frames)
    except ProtocolError:
        return
    assert P.kind_of(msg) == kind and isinstance(payload, list)


@fuzz
@given(data=st.data())
def test_manifest_rejects_garbage_cleanly(data: st.DataObject) -> None:
    raw = mutate(MANIFEST, data.draw(edits)) if data.draw(st.booleans()) else \
        msgspec.msgpack.encode(data.draw(msgpack_values))
    try:
        m = decode_manifest(raw)
    except ZmqModelsError:
        return
    # whatever decodes is consistent enough to allocate and assemble safely
    assert m.chunk_count == len(m.chunk_sizes) == len(m.chunk_xxh3)
    assert m.archive_bytes <= 8 * 1024**3


@fuzz
@given(data=st.data())
def test_chunks_reject_garbage_cleanly(data: st.DataObject) -> None:
    rel = raw_release("m", bytes(range(256)) * 20, chunk_bytes=1000,
                      codec=data.draw(st.sampled_from([None, "lz4"])) and __import__(
                          "zmqmodels.release", fromlist=["CodecSpec"]).CodecSpec("lz4", 5, "shuffle", 4))
    m = rel.manifest
    index = data.draw(st.integers(-2, m.chunk_count + 2))
    payload = mutate(bytes(rel.chunks[index % m.chunk_count]), data.draw(edits)) \
        if data.draw(st.booleans()) else data.draw(st.binary(max_size=2000))
    out = memoryview(bytearray(m.archive_bytes))
    try:
        decompress_chunk(m, index, payload, out)
    except ZmqModelsError:
        pass


@fuzz
@given(spec=msgpack_values, n=st.integers(0, 3), size=st.integers(0, 64))
def test_tensor_specs_reject_garbage_cleanly(spec, n: int, size: int) -> None:  # noqa: ANN001
    try:
        decode(spec, [bytes(size)] * n)
    except ZmqModelsError:
        pass


@fuzz
@given(shape=st.lists(st.integers(0, 2**40), max_size=6), dtype=st.sampled_from(["float32", "int8"]))
def test_declared_tensor_sizes_are_checked_before_allocation(shape, dtype) -> None:  # noqa: ANN001
    spec = {"t": "tensor", "dtype": dtype, "shape": shape, "f": 0}
    try:
        decode(spec, [b"\0" * 16])
    except ZmqModelsError:
        pass


# -- live processes: fuzzed frame lists, then a normal request must still be served ----------
LIVE = 3000 if SLOW else 500
live_fuzz = settings(max_examples=LIVE, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))
KINDS = sorted(P.KINDS) + [b"MANIFEST", b"", b"\xff" * 3]


@st.composite
def frame_lists(draw: st.DrawFn, kinds: list[bytes] = KINDS) -> list[bytes]:
    """[kind, header, extra...]: a real kind or not; a valid, mutated, random-msgpack or random
    header; up to three extra frames (chunk payloads, tensors, signatures)."""
    kind = draw(st.sampled_from(kinds))
    valid = VALID.get(kind, MANIFEST if kind == b"MANIFEST" else b"")
    how = draw(st.integers(0, 3))
    header = (valid if how == 0 else mutate(valid, draw(edits)) if how == 1
              else msgspec.msgpack.encode(draw(msgpack_values)) if how == 2 else draw(st.binary(max_size=64)))
    extra = draw(st.lists(st.binary(max_size=64), max_size=3))
    return [kind, header, *extra]


def _drain(sock: zmq.Socket) -> int:
    n = 0
    while sock.poll(0):
        sock.recv_multipart()
        n += 1
    return n


def test_live_hub_keeps_serving_after_fuzzed_frames(short_tmp, tmp_path) -> None:
    addr = f"ipc://{short_tmp}/hub"
    rel = raw_release("m", os.urandom(5000), chunk_bytes=1000)
    with Hub(addr, Store(tmp_path)) as hub:
        seq = hub.publish(rel).seq
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(addr)
        sent = [0]

        @live_fuzz
        @given(frames=frame_lists())
        def send(frames: list[bytes]) -> None:
            if frames[0] in (b"PUBLISH", b"ROLLBACK", b"RESERVE"):
                frames[0] = b"STATUS"  # keep the store out of it: control is fuzzed as headers
            dealer.send_multipart(frames)
            sent[0] += 1
            _drain(dealer)

        try:
            send()
            wait_until(lambda: hub.stats["error_bad_message"] + hub.stats["error_too_large"] > 0, 10)
            _drain(dealer)
        finally:
            dealer.close()
        assert sent[0] >= LIVE * 0.9
        client = HubClient(addr, timeout=10)
        assert client.status().models[0].seq == seq  # still answering, nothing lost
        assert hub.stats["fetch_manifest"] >= 0 and hub._thread.is_alive()


def fake_hub(addr: str) -> tuple[zmq.Socket, zmq.Socket]:
    """A hub's two sockets at ``addr`` (ROUTER) and its PUB, driven by the test itself."""
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.linger = 0
    router.bind(addr)
    pub.bind(P.pub_endpoint(addr))
    return router, pub


def fuzz_as_hub(router: zmq.Socket, pub: zmq.Socket, ident: bytes, model: bytes) -> None:
    """Send a subscriber, from a fake hub, fuzzed frames on both sockets: broadcasts on its
    model's topic, the hub topic, a stranger's and an unterminated one; replies to its DEALER."""

    @live_fuzz
    @given(frames=frame_lists(), topic=st.sampled_from([model + b"\0", b"\0", b"x\0", model]),
           on_pub=st.booleans())
    def send(frames: list[bytes], topic: bytes, on_pub: bool) -> None:
        if on_pub:
            pub.send_multipart([topic, *frames])
        else:
            router.send_multipart([ident, *frames])
        time.sleep(0.0005)  # stay under the SUB's high-water mark

    send()


def test_live_subscriber_keeps_receiving_after_fuzzed_frames(short_tmp) -> None:
    """A fake hub feeds the subscriber garbage on both sockets, then a real release."""
    addr = f"ipc://{short_tmp}/fake"
    router, pub = fake_hub(addr)
    got: list[tuple[int, str]] = []
    sub = Subscriber(addr, ["m"], on_release=lambda m, a: got.append((m.seq, hashlib.sha256(a).hexdigest())),
                     load=False, hub_ttl_s=60)
    try:
        sub.start()
        ident = router.recv_multipart()[0]  # its first FETCH_MANIFEST: now we can answer it
        wait_until(lambda: pub.poll(0, zmq.POLLOUT), 5)
        time.sleep(0.2)  # the SUB's subscription reaches the PUB
        fuzz_as_hub(router, pub, ident, b"m")
        wait_until(lambda: sum(v for k, v in sub.stats.items() if k.startswith("dropped_")) > 0, 10)
        archive = os.urandom(3000)
        rel = raw_release("m", archive, chunk_bytes=1000)
        m = msgspec.structs.replace(rel.manifest, seq=10**6)
        pub.send_multipart([b"m\0", b"MANIFEST", encode_manifest(m), b""])
        for i, c in enumerate(rel.chunks):
            pub.send_multipart([b"m\0", b"CHUNK", P.encode(P.ChunkHeader("m", m.seq, i)), c])
        wait_until(lambda: (m.seq, hashlib.sha256(archive).hexdigest()) in got, 20,
                   what="the real release after the garbage")
    finally:
        sub.close()
        router.close()
        pub.close()


def fuzz_front(address: str) -> list[str]:
    """Send a node's inference socket fuzzed requests (with and without the REQ envelope; and
    well-formed INFER headers whose tensor frames are wrong); return the error codes answered."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(address)
    infer = P.encode(P.InferRequest("probe", "1", {"t": "tuple", "items": [
        {"t": "tensor", "dtype": "float32", "shape": [1, 4], "f": 0}]}))
    codes: list[str] = []

    def drain() -> None:
        while dealer.poll(0):
            reply = dealer.recv_multipart()
            if len(reply) >= 3 and reply[1] == b"ERROR":
                codes.append(P.unpack(reply[1:])[0].code)

    @live_fuzz
    @given(frames=frame_lists([b"INFER", b"OK", b""]), envelope=st.booleans(),
           tensors=st.lists(st.binary(max_size=32), max_size=2), valid=st.booleans())
    def send(frames: list[bytes], envelope: bool, tensors: list[bytes], valid: bool) -> None:
        if valid:  # a well-formed header: the tensor frames are what is wrong
            frames = [b"INFER", infer, *tensors]
        dealer.send_multipart(([b""] if envelope else []) + frames)
        drain()

    try:
        send()
        time.sleep(0.5)
        drain()
    finally:
        dealer.close()
    return codes


@pytest.mark.timeout(180)
def test_live_node_keeps_serving_after_fuzzed_requests(short_tmp, tmp_path) -> None:
    hub_addr, node_addr = f"ipc://{short_tmp}/hub", f"ipc://{short_tmp}/node"
    with Hub(hub_addr, Store(tmp_path / "store")) as hub, \
            Node(hub_addr, ["probe"], node_addr, workers=1, cache=tmp_path / "cache") as node:
        m = hub.publish(build_release(compile_model(Probe(2.0), probe_examples()), "probe", "v1"))
        assert hub.wait_for("probe", m.seq, 1, 90)[0]
        codes = fuzz_front(node_addr)
        assert node.stats["error_bad_request"] > 0 and "bad_request" in codes
        with Client(node_addr, timeout=10) as c:
            r = c.infer("probe", torch.ones(1, 4))
        assert (r.label, r.seq, float(r.outputs[0, 0])) == ("v1", m.seq, 2.0)
