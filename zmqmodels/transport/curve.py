"""CURVE on ZeroMQ sockets: encryption, the server's identity proven to clients, and an
allowlist of client keys on servers (ZAP, answered by ``zmq.auth``).

Key files are ZeroMQ certificates (czmq's format, what ``zmq.auth`` writes): ``NAME.key``
holds the public key, ``NAME.key_secret`` both. An allowlist is public certificates: files,
or directories of ``*.key`` files (secret certificates never end in ``.key``).

Servers (the hub's PUB and ROUTER, a node's inference ROUTER) use their own secret key; with
an allowlist only listed clients complete the handshake, without one any client that knows
the server's public key does. Clients (nodes towards the hub, CLI, inference clients) use
their own key pair and the server's public key.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..errors import SourceError

__all__ = ["Curve", "ServerContext", "generate_curve_keys", "public_keys", "peer_allowed"]

log = logging.getLogger("zmqmodels.curve")


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read CURVE certificate {path}: {exc}") from None


def public_keys(paths: Iterable[str | os.PathLike[str]]) -> frozenset[bytes]:
    """The public keys (z85) in these certificates and directories of ``*.key`` certificates."""
    keys: set[bytes] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = zmq.auth.load_certificates(p)
            if not found:
                raise SourceError(f"no *.key certificates in {p}")
            keys.update(found)
        else:
            keys.add(_load(p)[0])
    return frozenset(keys)


@dataclass(frozen=True)
class Curve:
    """This process's CURVE identity and what it checks. Build with :meth:`load`."""

    public: bytes  # z85, 40 bytes
    secret: bytes
    server_key: bytes | None = None  # the server's public key, for sockets that connect
    allow: frozenset[bytes] | None = None  # client keys a server accepts; None = any

    @classmethod
    def load(cls, key: str | os.PathLike[str], server: str | os.PathLike[str] | None = None,
             allow: Iterable[str | os.PathLike[str]] = ()) -> Curve:
        """``key``: this process's secret certificate; ``server``: the public certificate of
        the server it connects to; ``allow``: public certificates or directories of them."""
        public, secret = _load(Path(key))
        if not secret:
            raise SourceError(f"{key} holds no secret key (give NAME.key_secret)")
        server_key = _load(Path(server))[0] if server else None
        allow = list(allow)
        return cls(public, secret, server_key, public_keys(allow) if allow else None)

    @classmethod
    def ephemeral(cls, server: str | os.PathLike[str]) -> Curve:
        """A throwaway key pair for a client that only needs the server proven and the link
        encrypted (a server with an allowlist will not admit it)."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret, _load(Path(server))[0])

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it binds) a CURVE server."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def connect(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it connects) a CURVE client of :attr:`server_key`."""
        if self.server_key is None:
            raise SourceError("a CURVE client needs the server's public key")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_key

    def authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator | None:
        """Start the ZAP handler of ``ctx`` enforcing :attr:`allow` (None without an allowlist).
        One per context: a process with two secured servers gives each its own context."""
        if self.allow is None:
            return None
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("zmqmodels.curve.zap"))
        auth.start()
        auth.configure_curve_callback("*", credentials_provider=_Allow(self.allow))
        return auth


class ServerContext:
    """The context a server's sockets live in. With a CURVE allowlist it is a context of its
    own (ZAP handlers are per context, so two secured servers in one process cannot share
    one), its authenticator running from :meth:`start` to :meth:`close`; otherwise it is
    ``context`` or the process-wide one."""

    def __init__(self, curve: Curve | None, context: zmq.Context | None = None) -> None:
        self._curve = curve
        self._own = context is None and curve is not None and curve.allow is not None
        self.ctx = zmq.Context() if self._own else (context or zmq.Context.instance())
        self._auth: ThreadAuthenticator | None = None

    def start(self) -> None:
        if self._curve is not None:
            self._auth = self._curve.authenticator(self.ctx)

    def close(self) -> None:
        """After the server's own sockets are closed."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own:
            self.ctx.destroy(linger=0)


class _Allow:
    """ZAP credentials check; a refused key is logged once a minute, not on every reconnect."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys
        self._logged: dict[bytes, float] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        now = time.monotonic()
        if now - self._logged.get(key, -60.0) >= 60.0:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[key] = now
            log.warning("refused a CURVE client with key %s: not in the allowlist",
                        key.decode(errors="replace"))
        return False


def generate_curve_keys(out: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Write ``OUT/public_keys/NAME.key`` and ``OUT/private_keys/NAME.key_secret`` (mode 0600)
    for each name (the layout of the ZeroMQ guide's Ironhouse); refuse to overwrite."""
    out = Path(out)
    pub_dir, sec_dir = out / "public_keys", out / "private_keys"
    names = list(names)
    for n in names:
        for p in (pub_dir / f"{n}.key", sec_dir / f"{n}.key_secret"):
            if p.exists():
                raise SourceError(f"{p} exists; not overwriting a key")
    pub_dir.mkdir(parents=True, exist_ok=True)
    sec_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(sec_dir, 0o700)
    written = []
    for n in names:
        public, secret = zmq.auth.create_certificates(sec_dir, n)
        os.chmod(secret, 0o600)
        dest = pub_dir / f"{n}.key"
        os.replace(public, dest)
        written += [dest, Path(secret)]
    return written


def peer_allowed(frame: zmq.Frame, keys: frozenset[bytes] | None) -> bool:
    """Whether the CURVE peer that sent ``frame`` has one of ``keys`` (z85; None: anyone)."""
    if keys is None:
        return True
    try:
        return frame.get("User-Id").encode() in keys
    except zmq.ZMQError:
        return False
