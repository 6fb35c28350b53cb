"""Builders shared by tests."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from zmqmodels.release.manifest import CodecSpec, Manifest, Release, compress_archive, span_digests


def raw_release(name: str, archive: bytes, *, chunk_bytes: int = 1 << 20, label: str = "",
                codec: CodecSpec | None = None) -> Release:
    """A release of arbitrary bytes (for store and transport tests that never load it)."""
    codec = codec or CodecSpec()
    chunks = compress_archive(archive, codec, chunk_bytes)
    m = Manifest(
        name=name, label=label, created_at=time.time(),
        archive_sha256=hashlib.sha256(archive).hexdigest(), archive_bytes=len(archive),
        compressed_bytes=sum(len(c) for c in chunks), codec=codec, chunk_bytes=chunk_bytes,
        chunk_count=len(chunks), chunk_sizes=[len(c) for c in chunks],
        chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in chunks],
        chunk_raw_xxh3=span_digests(archive, chunk_bytes), torch_version="n/a",
        compile_method="none",
    )
    return Release(m.check(), [bytes(c) for c in chunks])


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
               what: str = "condition") -> object:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P+1 free too (a hub's ROUTER and its derived PUB)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair")


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def stop_and_expect_gone(parent: subprocess.Popen, stop: Callable[[], None], child: int, what: str,
                         timeout: float = 30.0) -> None:
    """``child`` (a pid) runs; ``stop()`` ends ``parent``; then ``child`` is gone within ``timeout``."""
    assert alive(child)
    stop()
    parent.wait(timeout)
    wait_until(lambda: not alive(child), timeout, what=what)


# -- the C++ node (cpp/) ----------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


BINARY = ROOT / "cpp" / "build" / "zmqmodels-node"


STARTED: list[subprocess.Popen] = []  # every C++ node these tests started


def built_binary() -> Path | None:
    """The built node, None if it was not built; fails if a source is newer than it."""
    if not BINARY.exists():
        return None
    sources = [p for p in (ROOT / "cpp").rglob("*") if "build" not in p.parts and "tests" not in p.parts
               and (p.suffix in (".cpp", ".hpp") or p.name == "CMakeLists.txt")]
    newest = max(sources, key=lambda p: p.stat().st_mtime)
    assert newest.stat().st_mtime <= BINARY.stat().st_mtime, \
        f"{BINARY} is older than {newest}: run scripts/build_cpp (scripts/test does)"
    return BINARY


class CppNode:
    def __init__(self, binary: Path, hub: str, cache: Path, *args: str, node_id: str = "cpp",
                 models: tuple[str, ...] = ("probe",)) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        cmd = [str(binary), "--hub", hub, "--bind", self.address, "--cache", str(cache), "--node-id", node_id,
               *args]
        for m in models:
            cmd += ["--model", m]
        self.log = cache.parent / f"{node_id}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        STARTED.append(self.proc)
        self.node_id = node_id

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def scrape(port: int) -> dict[str, float]:
    """A Prometheus endpoint on ``port``, as ``{name{labels}: value}``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
            out[key] = s.value
    return out


def cli(*args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m zmqmodels ARGS`` from the checkout, its output captured; ``env`` is added to
    this process's environment."""
    import sys

    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "zmqmodels", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full)
