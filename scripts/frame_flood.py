#!/usr/bin/env python3
"""What one peer can make a hub hold by never finishing a multipart message.

ZeroMQ caps each frame (ZMQ_MAXMSGSIZE) and counts whole messages against its high-water
marks, and it delivers a message only once its last frame has arrived, so the frames of an
unfinished message pile up inside libzmq where no application check can see them. This
script starts `zmqmodels hub` twice, plain and with a CURVE allowlist, connects a raw ZMTP
3.0 peer (NULL mechanism, no keys) to its ROUTER, streams ``--mb`` of 255-byte frames that
all say "more follows", and prints the hub's RSS before and after.

Usage: scripts/frame_flood.py [--mb 400]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024


def _read(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = s.recv(n - len(data))
        if not more:
            raise ConnectionResetError("closed by the server")
        data += more
    return data


def flood(port: int, mb: int) -> str:
    """Speak ZMTP 3.0 by hand: greeting, READY as a DEALER, then frames flagged MORE."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    try:
        _read(s, 64)  # the server's greeting (a CURVE server hangs up here)
        prop = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        body = b"\x05READY" + prop
        s.sendall(b"\x04" + bytes([len(body)]) + body)
        flags, size = _read(s, 2)  # the server's READY
        _read(s, size if not flags & 0x02 else struct.unpack(">Q", bytes([size]) + _read(s, 7))[0])
    except OSError as exc:
        s.close()
        return f"refused in the handshake ({exc.strerror or exc})"
    batch = (b"\x01\xff" + b"x" * 255) * 4096  # 1 MiB of 255-byte frames, each with MORE set
    sent = 0
    try:
        for _ in range(mb):
            s.sendall(batch)
            sent += 1
        return f"sent {sent} MiB"
    except OSError as exc:
        return f"disconnected after {sent} MiB ({exc.strerror or exc})"
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400)
    args = ap.parse_args()
    from demo import free_port_pair  # scripts/ is this script's directory

    from zmqmodels.transport.curve import generate_curve_keys

    tmp = tempfile.mkdtemp(prefix="zmqm-flood-")
    generate_curve_keys(tmp, ["hub", "node"])
    env = {**os.environ, "PYTHONPATH": ROOT}
    print("| hub | RSS before MB | RSS after MB | the flooding peer |\n|---|---|---|---|")
    for label, extra in (("plain", []), ("CURVE + allowlist", [
            "--curve-key", f"{tmp}/private_keys/hub.key_secret", "--curve-allow", f"{tmp}/public_keys"])):
        port = free_port_pair()
        hub = subprocess.Popen([sys.executable, "-m", "zmqmodels", "hub", "--bind", f"tcp://127.0.0.1:{port}",
                                "--store", f"{tmp}/store", *extra], env=env, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2.0)
            before = rss_mb(hub.pid)
            outcome = flood(port, args.mb)
            time.sleep(2.0)
            print(f"| {label} | {before} | {rss_mb(hub.pid)} | {outcome} |", flush=True)
        finally:
            hub.terminate()
            hub.wait(10)


if __name__ == "__main__":
    main()
