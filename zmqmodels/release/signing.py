"""Signed releases: Ed25519 over the manifest, which binds the archive sha256, every chunk
digest, the name and the seq.

A signature covers the manifest frame's exact bytes (never a re-encoding), prefixed with a
context string so it cannot be replayed into another protocol::

    signature = Ed25519-sign(secret, b"zmqmodels/manifest/v1\\0" + manifest_bytes)

The signer's public key (32 bytes, hex) is a field of the manifest, so it is signed too and
cannot be swapped. Signatures sign content, not connections: a hub, a relay or a node cache
passes the same bytes on and any holder of the public key checks them again.

Key files are PEM (PKCS#8 secret, SubjectPublicKeyInfo public), what ``openssl pkey`` reads.
A trusted key is given as such a ``.pub`` file, a file holding the 64 hex digits of the raw
public key, or a directory of ``*.pub`` files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import SignatureError, SourceError
from .manifest import Manifest, Release, encode_manifest

__all__ = ["CONTEXT", "SigningKey", "Trust", "generate_signing_key"]

CONTEXT = b"zmqmodels/manifest/v1\0"


def _raw_public(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


class SigningKey:
    """An Ed25519 secret key that signs manifests: ``SigningKey.load("keys/signing.key")``."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_hex = _raw_public(key.public_key())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SourceError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SourceError(f"{path} is not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SourceError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def sign(self, manifest_bytes: bytes) -> bytes:
        return self._key.sign(CONTEXT + bytes(manifest_bytes))

    def seal(self, release: Release, seq: int) -> Release:
        """``release`` as ``seq``, signed: the seq is signed too, so an old release cannot be
        replayed as a newer one."""
        m = msgspec.structs.replace(release.manifest, seq=seq, signer=self.public_hex)
        raw = encode_manifest(m)
        return Release(m, release.chunks, raw, self.sign(raw))


@dataclass(frozen=True)
class Trust:
    """The public keys whose releases a node loads. ``Trust()`` (no keys) trusts everything,
    signed or not, as before signing existed; with keys, a release must carry a valid
    signature by one of them."""

    keys: frozenset[str] = frozenset()  # raw public keys, hex

    @property
    def required(self) -> bool:
        return bool(self.keys)

    @classmethod
    def load(cls, paths: Iterable[str | os.PathLike[str]]) -> Trust:
        """Trusted keys from files (PEM public key, or 64 hex digits) and directories of ``*.pub``."""
        keys: set[str] = set()
        for p in map(Path, paths):
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
            if p.is_dir() and not files:
                raise SourceError(f"no *.pub keys in {p}")
            keys.update(_read_public(f) for f in files)
        return cls(frozenset(keys))

    def verify(self, m: Manifest, manifest_bytes: bytes, signature: bytes) -> None:
        """Raise :class:`SignatureError` unless this node may load the release: with trusted
        keys, signed by one of them and the signature verifies; without, any signature present
        must verify."""
        what = f"{m.name} seq {m.seq}"
        if not signature and not m.signer:
            if self.required:
                raise SignatureError(f"{what} is unsigned; this node loads only releases signed by "
                                     f"{len(self.keys)} trusted key(s)")
            return
        if self.required and m.signer not in self.keys:
            raise SignatureError(f"{what} is signed by {m.signer[:16]}…, which this node does not trust")
        try:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(m.signer))
            key.verify(bytes(signature), CONTEXT + bytes(manifest_bytes))
        except (ValueError, InvalidSignature):
            raise SignatureError(f"{what}: the signature does not verify for key {m.signer[:16]}…") \
                from None


def _read_public(path: Path) -> str:
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise SourceError(f"cannot read trusted key {path}: {exc.strerror or exc}") from None
    if len(data) == 64:
        try:
            bytes.fromhex(data.decode())
            return data.decode().lower()
        except ValueError:
            pass
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SourceError(f"{path} is neither a PEM public key nor 64 hex digits: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SourceError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return _raw_public(key)


def generate_signing_key(out: str | os.PathLike[str], name: str = "signing") -> tuple[Path, Path]:
    """Write ``OUT/NAME.key`` (secret, mode 0600) and ``OUT/NAME.pub``; refuse to overwrite."""
    out = Path(out)
    secret_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (secret_path, public_path):
        if p.exists():
            raise SourceError(f"{p} exists; not overwriting a key")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    secret = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    public_path.write_bytes(public)
    return secret_path, public_path
