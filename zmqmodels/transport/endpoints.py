"""ZeroMQ endpoints: as users type them (checked before a socket sees them, so a missing scheme
or a host that does not resolve is one line with the likely fix, not ``ZMQError: Invalid
argument`` or, for a connect, silence until a timeout), and as a hub or relay binds them (a
ROUTER and its PUB on the derived address)."""

from __future__ import annotations

import re
import socket

import zmq

from ..errors import ZmqModelsError
from ..protocol import pub_endpoint

__all__ = ["check_endpoint", "bind_hub_sockets", "parse_listen"]

_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):(\d{1,5})$")


def check_endpoint(addr: str, what: str = "address", *, bind: bool = False) -> str:
    """Return ``addr`` if ZeroMQ can use it (``tcp://HOST:PORT``, ``ipc://PATH``,
    ``inproc://NAME``); raise :class:`ZmqModelsError` saying why not. A connect's host must
    resolve; a bind may use ``*``."""
    if addr.startswith(("ipc://", "inproc://")):
        if addr.split("://", 1)[1]:
            return addr
        raise ZmqModelsError(f"{what} {addr}: the endpoint needs a path")
    if "://" not in addr:
        fix = f"tcp://{addr}" if re.match(r"^[^/\s]+:\d+$", addr) else f"tcp://HOST:PORT or ipc://{addr}"
        raise ZmqModelsError(f"{what} {addr} has no scheme: did you mean {fix}?")
    m = _TCP.match(addr)
    if not addr.startswith("tcp://"):
        raise ZmqModelsError(f"{what} {addr}: use tcp://HOST:PORT or ipc://PATH")
    if m is None or int(m.group(2)) > 65535:
        raise ZmqModelsError(f"{what} {addr}: use tcp://HOST:PORT with a port of 0-65535")
    host = m.group(1).strip("[]")
    if host == "*" or (bind and host in ("0.0.0.0", "::")):
        return addr
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as exc:
        raise ZmqModelsError(f"{what} {addr}: host {host!r} does not resolve ({exc.strerror or exc})") \
            from None
    return addr


def bind_hub_sockets(router: zmq.Socket, pub: zmq.Socket, addr: str) -> str:
    """Bind ``router`` to ``addr`` and ``pub`` to its derived address; return the ROUTER's
    actual endpoint. ``tcp://HOST:0`` retries until a free pair (P, P+1) is found."""
    if addr.startswith("tcp://") and addr.endswith(":0"):
        host = addr[len("tcp://"):-2]
        for _ in range(50):
            port = router.bind_to_random_port(f"tcp://{host}")
            try:
                pub.bind(f"tcp://{host}:{port + 1}")
                return f"tcp://{host}:{port}"
            except zmq.ZMQError:
                router.unbind(f"tcp://{host}:{port}")
        raise ZmqModelsError(f"no free port pair on {host}")
    router.bind(addr)
    pub.bind(pub_endpoint(addr))
    return addr


def parse_listen(spec: str, what: str = "listen address") -> tuple[str, int]:
    """An HTTP or gRPC listen address: ``PORT`` or ``:PORT`` (all interfaces), ``HOST:PORT``,
    ``[::]:PORT`` -> ``(host, port)``."""
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ZmqModelsError(f"{what} {spec!r}: give PORT, :PORT or HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
