"""Trust: signed releases, CURVE, limits. Unit checks in-process, then a secured fleet with
a real `zmqmodels serve` process that must refuse everything it should not load."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import msgspec
import pytest
import torch
from click.testing import CliRunner

from tests.fleet import ROOT
from tests.helpers import raw_release, wait_until
from tests.models import Probe, probe_examples
from zmqmodels import Client, FollowOptions, Hub, Subscriber, build_release, compile_model
from zmqmodels.cli import cli
from zmqmodels.clients.hub import HubClient
from zmqmodels.errors import DeadlineError, RemoteError, SignatureError, StoreError
from zmqmodels.release.cache import Cache
from zmqmodels.release.manifest import Release, encode_manifest
from zmqmodels.release.signing import SigningKey, Trust, generate_signing_key
from zmqmodels.release.store import Store
from zmqmodels.transport.curve import Curve, generate_curve_keys, public_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    """`zmqmodels keys generate` output, plus a rogue signer and a stranger's CURVE pair."""
    d = tmp_path_factory.mktemp("keys")
    out = CliRunner().invoke(cli, ["keys", "generate", "--out", str(d / "fleet")])
    assert out.exit_code == 0, out.output
    generate_signing_key(d / "rogue")
    generate_curve_keys(d / "other", ["stranger"])
    return d


def signer(keys, who: str = "fleet") -> SigningKey:  # noqa: ANN001
    return SigningKey.load(keys / who / "signing.key")


def trusted(keys) -> Trust:  # noqa: ANN001
    return Trust.load([keys / "fleet" / "signing.pub"])


def curve(keys, name: str, server: str | None = None, allow=()) -> Curve:  # noqa: ANN001
    base = keys / ("other" if name == "stranger" else "fleet")
    return Curve.load(base / "private_keys" / f"{name}.key_secret",
                      keys / "fleet" / "public_keys" / f"{server}.key" if server else None, allow)


def test_keys_generate_writes_private_files_and_never_overwrites(keys) -> None:  # noqa: ANN001
    fleet = keys / "fleet"
    for secret in (fleet / "signing.key", *(fleet / "private_keys").iterdir()):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert sorted(p.name for p in (fleet / "public_keys").iterdir()) == ["client.key", "hub.key", "node.key"]
    again = CliRunner().invoke(cli, ["keys", "generate", "--out", str(fleet)])
    assert again.exit_code == 1 and "not overwriting" in again.output
    # a trusted key may be the .pub file, a directory of them, or the raw key's 64 hex digits
    hexfile = keys / "raw.hex"
    hexfile.write_text(signer(keys).public_hex + "\n")
    assert Trust.load([hexfile]) == Trust.load([fleet]) == trusted(keys)


def test_signature_binds_every_byte_the_signer_and_the_seq(keys) -> None:  # noqa: ANN001
    sealed = signer(keys).seal(raw_release("m", os.urandom(3000), chunk_bytes=1000), 7)
    trust = trusted(keys)
    trust.verify(sealed.manifest, sealed.raw, sealed.signature)
    assert sealed.manifest.seq == 7 and sealed.manifest.signer == signer(keys).public_hex
    raw = bytearray(sealed.raw)
    for pos in range(0, len(raw), max(1, len(raw) // 40)):  # any flipped byte: refused
        raw[pos] ^= 0x01
        with pytest.raises((SignatureError, Exception)):
            trust.verify(sealed.manifest, bytes(raw), sealed.signature)
        raw[pos] ^= 0x01
    # the same release as another seq (a replay dressed as newer) needs a new signature
    newer = msgspec.structs.replace(sealed.manifest, seq=8)
    with pytest.raises(SignatureError, match="does not verify"):
        trust.verify(newer, encode_manifest(newer), sealed.signature)
    rogue = signer(keys, "rogue").seal(raw_release("m", b"x" * 10), 1)
    with pytest.raises(SignatureError, match="does not trust"):
        trust.verify(rogue.manifest, rogue.raw, rogue.signature)
    # a rogue signature under the trusted signer's name
    posing = msgspec.structs.replace(rogue.manifest, signer=signer(keys).public_hex)
    raw_posing = encode_manifest(posing)
    with pytest.raises(SignatureError, match="does not verify"):
        trust.verify(posing, raw_posing, signer(keys, "rogue").sign(raw_posing))
    unsigned = raw_release("m", b"y" * 10)
    with pytest.raises(SignatureError, match="unsigned"):
        trust.verify(unsigned.manifest, unsigned.manifest_bytes, b"")
    # without trusted keys: unsigned passes, but a signature present must still verify
    Trust().verify(unsigned.manifest, unsigned.manifest_bytes, b"")
    Trust().verify(rogue.manifest, rogue.raw, rogue.signature)
    with pytest.raises(SignatureError):
        Trust().verify(posing, raw_posing, rogue.signature)


def test_store_keeps_signed_bytes_and_refuses_an_old_seq(keys, tmp_path) -> None:  # noqa: ANN001
    store = Store(tmp_path)
    seq = store.reserve("m")
    sealed = signer(keys).seal(raw_release("m", os.urandom(2500), chunk_bytes=1000), seq)
    store.put(sealed)
    back = store.read("m", seq)
    assert bytes(back.raw) == sealed.raw and back.signature == sealed.signature
    trusted(keys).verify(back.manifest, back.raw, back.signature)
    with pytest.raises(StoreError, match="not newer"):
        store.put(sealed)  # replayed with its original seq
    assert store.put(raw_release("m", b"z" * 10)).release.manifest.seq == seq + 1  # unsigned: next seq
    with pytest.raises(StoreError, match="must carry its seq"):
        store.put(Release(sealed.manifest.__class__(**{**msgspec.structs.asdict(sealed.manifest),
                                                        "seq": 0}), sealed.chunks, None, b"sig"))


def test_cache_checks_signatures_again_on_restart(keys, tmp_path) -> None:  # noqa: ANN001
    archive = os.urandom(2000)
    sealed = signer(keys).seal(raw_release("m", archive), 4)
    cache = Cache(tmp_path)
    path = cache.put(sealed.manifest, archive, sealed.raw, sealed.signature)
    assert cache.latest("m", trust=trusted(keys)) == (sealed.manifest, path)
    sig = path.with_suffix(".sig")
    sig.write_bytes(bytes(64))  # a damaged or swapped signature: discarded, never loaded
    assert cache.latest("m", trust=trusted(keys)) is None
    assert not path.exists() and not path.with_suffix(".manifest").exists()
    plain = raw_release("m", archive)
    cache.put(msgspec.structs.replace(plain.manifest, seq=5), archive)
    assert cache.latest("m", trust=trusted(keys)) is None  # unsigned, and this node needs signatures


def test_hub_with_trust_refuses_unsigned_and_forbids_control_to_plain_peers(keys, short_tmp,
                                                                            tmp_path) -> None:  # noqa: ANN001
    addr = f"ipc://{short_tmp}/hub"
    fleet = keys / "fleet"
    hub_curve = curve(keys, "hub", allow=[fleet / "public_keys"])
    control = public_keys([fleet / "public_keys" / "client.key"])
    with Hub(addr, Store(tmp_path), trust=trusted(keys), curve=hub_curve, control_keys=control):
        client = HubClient(addr, timeout=10, curve=curve(keys, "client", "hub"))
        node = HubClient(addr, timeout=10, curve=curve(keys, "node", "hub"))
        rel = raw_release("m", os.urandom(3000), chunk_bytes=1000)
        with pytest.raises(RemoteError, match="bad_signature: .*unsigned"):
            client.publish(rel)
        with pytest.raises(RemoteError, match="forbidden"):
            node.publish(rel, signing_key=signer(keys))  # admitted, but not a publisher
        done = client.publish(rel, signing_key=signer(keys))
        assert done.seq == 1 and node.status().models[0].seq == 1  # nodes still read status
        with pytest.raises(DeadlineError):  # not in the allowlist: the handshake never completes
            HubClient(addr, timeout=1, curve=curve(keys, "stranger", "hub")).status()
        with pytest.raises(DeadlineError):
            HubClient(addr, timeout=1).status()  # no CURVE at all


# -- a secured fleet, end to end ------------------------------------------------------------
def probe(scale: float, label: str, ballast_mb: int = 0) -> Release:
    return build_release(compile_model(Probe(scale, ballast_mb), probe_examples()), "probe", label,
                         codec="none")


def rejected_with(ctl: HubClient, seq: int, words: str) -> str:
    def check() -> str:
        rows = [n for n in ctl.status().nodes if n.rejected_seq == seq]
        return rows[0].last_error if rows else ""

    reason = wait_until(check, 60, interval=0.1, what=f"a node rejecting seq {seq}")
    assert words in reason, reason
    return reason


@pytest.mark.timeout(300)
def test_secured_fleet_serves_only_trusted_releases(keys, short_tmp, tmp_path) -> None:  # noqa: ANN001
    fleet = keys / "fleet"
    hub_addr, node_addr = f"ipc://{short_tmp}/hub", f"ipc://{short_tmp}/node"
    store = Store(tmp_path / "store", retain=20)
    hub_curve = curve(keys, "hub", allow=[fleet / "public_keys"])
    env = {**os.environ, "PYTHONPATH": ROOT}
    node = subprocess.Popen(
        [sys.executable, "-m", "zmqmodels", "serve", "--hub", hub_addr, "--model", "probe",
         "--bind", node_addr, "--workers", "1", "--cache", str(tmp_path / "cache"), "--node-id", "n1",
         "--trust", str(fleet / "signing.pub"),
         "--curve-key", str(fleet / "private_keys" / "node.key_secret"),
         "--curve-server", str(fleet / "public_keys" / "hub.key"),
         "--curve-allow", str(fleet / "public_keys" / "client.key"),
         "--limit", "max_archive_bytes=4M"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ctl = HubClient(hub_addr, timeout=30, curve=curve(keys, "client", "hub"))
    client = Client(node_addr, timeout=10, retries=3, curve=curve(keys, "client", "node"))

    def served() -> tuple[str, int, float]:
        r = client.infer("probe", torch.ones(1, 4))
        return r.label, r.seq, float(r.outputs[0, 0])

    hub = Hub(hub_addr, store, curve=hub_curve).start()
    try:
        v1 = ctl.publish(probe(2.0, "v1"), signing_key=signer(keys))
        ok, status = ctl.wait_for("probe", v1.seq, 1, 120)
        assert ok, status
        assert served() == ("v1", v1.seq, 2.0)

        # unsigned, signed by an untrusted key, over the node's size limit: each refused before
        # a byte of the archive is allocated, the reason at the hub, v1 answering throughout
        unsigned = hub.publish(probe(3.0, "unsigned"))
        rejected_with(ctl, unsigned.seq, "unsigned")
        rogue = ctl.publish(probe(4.0, "rogue"), signing_key=signer(keys, "rogue"))
        rejected_with(ctl, rogue.seq, "does not trust")
        big = ctl.publish(probe(4.5, "big", ballast_mb=8), signing_key=signer(keys))
        rejected_with(ctl, big.seq, "exceeds")
        assert served() == ("v1", v1.seq, 2.0)

        # an old signed release replayed to the hub: refused there
        old = store.read("probe", v1.seq)
        with pytest.raises(RemoteError, match="not newer"):
            ctl.publish(Release(old.manifest, [bytes(c) for c in old.chunks], bytes(old.raw),
                                old.signature))

        # a tampered manifest in the hub's store (the signature no longer matches)
        hub.close()
        good = signer(keys).seal(probe(5.0, "v5"), store.reserve("probe"))
        forged = msgspec.structs.replace(good.manifest, label="v5-forged")
        store.put(Release(forged, good.chunks, encode_manifest(forged), good.signature))
        hub = Hub(hub_addr, store, curve=hub_curve).start()
        rejected_with(ctl, forged.seq, "does not verify")

        # a tampered chunk in the hub's store, under a valid signature: the digest refuses it
        hub.close()
        good = signer(keys).seal(probe(6.0, "v6"), store.reserve("probe"))
        chunks = [bytes(c) for c in good.chunks]
        chunks[0] = bytes([chunks[0][0] ^ 0xFF]) + chunks[0][1:]
        store.put(Release(good.manifest, chunks, good.raw, good.signature))
        hub = Hub(hub_addr, store, curve=hub_curve).start()
        rejected_with(ctl, good.manifest.seq, "corrupt at its source")
        assert served() == ("v1", v1.seq, 2.0)

        # a rollback is a new seq, signed anew by the publisher (the hub holds no key)
        rb = ctl.rollback("probe", "v1", signing_key=signer(keys))
        ok, status = ctl.wait_for("probe", rb.seq, 1, 120)
        assert ok, status
        assert rb.seq > good.manifest.seq and served() == ("v1", rb.seq, 2.0)
        assert store.read("probe", rb.seq).manifest.metadata["rollback_of"] == str(v1.seq)

        # a hub restored from an old store replays v1 with its original seq: ignored, not loaded
        hub.close()
        old_store = tmp_path / "old"
        (old_store / "probe").mkdir(parents=True)
        shutil.copy(store.path("probe", v1.seq), old_store / "probe")
        hub = Hub(hub_addr, Store(old_store), curve=hub_curve).start()
        wait_until(lambda: any(n.seq == rb.seq and n.state == "serving" and n.age_s < 0.5
                               for n in ctl.status().nodes), 30, what="the node reporting to the old hub")
        assert served() == ("v1", rb.seq, 2.0)
        assert not [n for n in ctl.status().nodes if n.rejected_seq == v1.seq]

        # CURVE: a client whose key is not allowed, or with no key, never gets an answer
        for who in (curve(keys, "stranger"), None):
            if who is not None:
                who = Curve(who.public, who.secret, curve(keys, "client", "node").server_key)
            with pytest.raises(DeadlineError), Client(node_addr, timeout=1, retries=0, curve=who) as c:
                c.infer("probe", torch.ones(1, 4))
        assert served() == ("v1", rb.seq, 2.0)
    finally:
        client.close()
        hub.close()
        node.terminate()
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(10)


def test_cli_publishes_signed_over_curve_and_reads_status(keys, short_tmp, tmp_path) -> None:  # noqa: ANN001
    fleet = keys / "fleet"
    addr = f"ipc://{short_tmp}/hub"
    client_opts = ["--curve-key", str(fleet / "private_keys" / "client.key_secret"),
                   "--curve-server", str(fleet / "public_keys" / "hub.key")]
    store = Store(tmp_path)
    with Hub(addr, store, trust=trusted(keys), curve=curve(keys, "hub", allow=[fleet / "public_keys"])):
        run = CliRunner().invoke
        out = run(cli, ["publish", "tests/models.py:make_probe", "--name", "probe", "--label", "v1",
                        "--hub", addr, "--signing-key", str(fleet / "signing.key"), "--json", *client_opts])
        assert out.exit_code == 0, out.output
        rel = store.latest("probe")
        assert rel.manifest.signer == signer(keys).public_hex
        trusted(keys).verify(rel.manifest, rel.raw, rel.signature)
        out = run(cli, ["publish", "tests/models.py:make_probe", "--name", "probe", "--hub", addr,
                        *client_opts])
        assert out.exit_code == 1 and "bad_signature" in out.output  # this hub takes signed releases only
        out = run(cli, ["rollback", "probe", "--to", "v1", "--hub", addr,
                        "--signing-key", str(fleet / "signing.key"), *client_opts])
        assert out.exit_code == 0, out.output
        out = run(cli, ["status", "--hub", addr, "--json", *client_opts])
        assert out.exit_code == 0, out.output
        assert '"seq": 2' in out.output and store.latest("probe").manifest.metadata["rollback_of"] == "1"
        out = run(cli, ["inspect", str(store.path("probe", 2)), "--json"])
        assert out.exit_code == 0 and rel.manifest.signer in out.output
        out = run(cli, ["status", "--hub", addr, "--timeout", "1",
                        "--curve-server", str(fleet / "public_keys" / "hub.key")])
        # a throwaway key is not admitted: the handshake is refused before the request is queued
        # ("could not reach") or after ("no reply"), as the two processes' timing has it
        assert out.exit_code == 1 and ("no reply" in out.output or "could not reach" in out.output)
        assert "CURVE: is this key allowed there?" in out.output


def test_a_hub_with_a_signing_key_signs_its_own_publishes_and_rollbacks(keys, short_tmp,
                                                                        tmp_path) -> None:  # noqa: ANN001
    addr = f"ipc://{short_tmp}/hub"
    store = Store(tmp_path)
    with Hub(addr, store, signing_key=signer(keys), trust=trusted(keys)) as hub:
        v1 = hub.publish(raw_release("m", os.urandom(3000), label="v1", chunk_bytes=1000))
        hub.publish(raw_release("m", os.urandom(3000), label="v2", chunk_bytes=1000))
        done = HubClient(addr, timeout=10).rollback("m", "v1")  # the operator holds no key
        for seq in (v1.seq, done.seq):
            rel = store.read("m", seq)
            trusted(keys).verify(rel.manifest, rel.raw, rel.signature)
        back = store.read("m", done.seq).manifest
        assert (back.label, back.archive_sha256, back.metadata["rollback_of"]) == \
            ("v1", v1.archive_sha256, str(v1.seq))
    with Hub(addr, store, trust=trusted(keys)), \
            pytest.raises(RemoteError, match="signed releases only"):
        HubClient(addr, timeout=10).rollback("m", "v1")  # no key anywhere: refused, not unsigned


def test_embedded_subscriber_trusts_and_rechecks_its_cache(keys, short_tmp, tmp_path) -> None:  # noqa: ANN001
    addr = f"ipc://{short_tmp}/hub"
    cache = tmp_path / "cache"
    with Hub(addr, Store(tmp_path / "store")) as hub:
        with Subscriber(addr, ["probe"], follow=FollowOptions(trust=trusted(keys)), cache=cache) as sub:
            hub.publish(probe(3.0, "unsigned"))
            wait_until(lambda: sub.stats["untrusted"] >= 1, 30, what="the unsigned release refused")
            assert sub.version("probe") is None
            signed = HubClient(addr, timeout=30).publish(probe(2.0, "v1"), signing_key=signer(keys))
            sub.wait_until_serving("probe", 60, seq=signed.seq)
            assert float(sub.predict("probe", torch.ones(1, 4))[0, 0]) == 2.0
    # restarted without a hub: serves the cached release at once, after checking it again ...
    with Subscriber("ipc:///nonexistent/hub", ["probe"], follow=FollowOptions(trust=trusted(keys)),
                    cache=cache) as sub:
        assert sub.version("probe") == ("v1", signed.seq)
    # ... and not once its signature is damaged
    Cache(cache).path("probe", signed.seq).with_suffix(".sig").write_bytes(bytes(64))
    with Subscriber("ipc:///nonexistent/hub", ["probe"], follow=FollowOptions(trust=trusted(keys)),
                    cache=cache) as sub:
        assert sub.version("probe") is None
