from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="run long fuzzing and soak tests")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--slow"):
        os.environ["ZMQM_FUZZ_SLOW"] = "1"  # tests/test_fuzz.py: 10x the examples


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="needs --slow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


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


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short directory for ipc:// endpoints (Unix socket paths are limited to ~107 bytes)."""
    d = tempfile.mkdtemp(prefix="zmqm-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs: a cache that fills up (remount it larger to free it)."""
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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
