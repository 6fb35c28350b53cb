"""Fuzzing shared by tests: hypothesis settings, valid headers to mutate, frame-list strategies,
a fake hub and a front fuzzer."""


from __future__ import annotations

import os
import time

import msgspec
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import raw_release
from zmqmodels import protocol as P
from zmqmodels.release.manifest import encode_manifest

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
