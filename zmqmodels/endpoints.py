"""ZeroMQ endpoints as users type them: checked before a socket sees them, so a missing scheme
or a host that does not resolve is one line with the likely fix, not ``ZMQError: Invalid
argument`` (or, for a connect, silence until a timeout)."""

from __future__ import annotations

import re
import socket

from .errors import ZmqModelsError

__all__ = ["check_endpoint"]

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
