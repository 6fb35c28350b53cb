"""The annotations are checked: ``mypy --strict`` (pyproject's [tool.mypy]) passes on the
packages that decide and describe (core, protocol, release) and on model, errors and defaults.
transport, clients, hub, node, oip and cli are not yet clean (pyzmq's generic sockets and the
CLI's click callbacks account for most of what is left)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ["zmqmodels/core", "zmqmodels/protocol", "zmqmodels/release", "zmqmodels/model",
           "zmqmodels/errors.py", "zmqmodels/defaults.py", "zmqmodels/__init__.py"]


def test_mypy_strict_passes_where_it_is_required() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", *CHECKED], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_package_says_it_is_typed() -> None:
    assert (ROOT / "zmqmodels" / "py.typed").exists()
    assert 'zmqmodels = ["py.typed"' in (ROOT / "pyproject.toml").read_text()
