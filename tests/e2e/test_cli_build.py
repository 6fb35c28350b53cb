from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.models import LeNet

CLI = [sys.executable, "-m", "zmqmodels"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}  # so `tests.models:factory` imports from any cwd
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env)


def test_inspect_torchscript_file_lists_lenet_parameters(tmp_path) -> None:
    path = tmp_path / "lenet.pt"
    torch.jit.script(LeNet().eval()).save(str(path))
    out = run("inspect", str(path))
    assert out.returncode == 0, out.stderr
    assert "conv1.weight" in out.stdout and "6x1x5x5" in out.stdout
    assert "fc1.weight" in out.stdout and "120x400" in out.stdout
    assert "total: 61,706 parameters" in out.stdout
    data = json.loads(run("inspect", str(path), "--json").stdout)
    assert data["totals"]["parameters"] == 61706
    assert {"name": "fc3.bias", "kind": "parameter", "shape": [10], "dtype": "float32",
            "numel": 10, "bytes": 40} in data["tensors"]


def test_build_then_inspect_release(tmp_path) -> None:
    store = tmp_path / "store"
    out = run("build", "tests.models:make_lenet", "--name", "lenet", "--label", "v1",
              "--store", str(store), "--meta", "run=42", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["seq"] == 1
    shown = run("inspect", info["path"])
    assert shown.returncode == 0, shown.stderr
    assert "label              v1" in shown.stdout and "seq                1" in shown.stdout
    assert "conv2.weight" in shown.stdout and "{'run': '42'}" in shown.stdout
    again = json.loads(run("build", "tests.models:make_lenet", "--name", "lenet", "--store",
                           str(store), "--json").stdout)
    assert again["seq"] == 2


def test_build_from_file_factory_with_weights_and_specs(tmp_path) -> None:
    (tmp_path / "fac.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())\n"
    )
    torch.manual_seed(1)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    out = run("build", "fac.py:make", "--name", "m", "--store", "s", "--weights", "w.pt",
              "--example-input", "1x8", "--example-input", "5x8:float32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "stored m - seq 1" in out.stdout


def _one_line_error(out: subprocess.CompletedProcess, needle: str) -> None:
    assert out.returncode != 0
    assert needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_bad_input_gives_one_line_errors(tmp_path) -> None:
    (tmp_path / "notts.pt").write_bytes(b"not a zip")
    (tmp_path / "fac.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(8, 4)\n")
    torch.save({"weight": torch.zeros(4, 8)}, tmp_path / "partial.pt")
    (tmp_path / "file").write_text("x")
    _one_line_error(run("build", "tests.models:make_broken", "--name", "m", "--store", "s",
                        "--example-input", "1x4", cwd=tmp_path), "factory exploded")
    _one_line_error(run("inspect", "notts.pt", cwd=tmp_path), "neither a release nor a TorchScript")
    _one_line_error(run("build", "notts.pt", "--name", "m", "--store", "s", "--example-input",
                        "1x4", cwd=tmp_path), "not a TorchScript archive")
    _one_line_error(run("build", "fac.py:make", "--name", "m", "--store", "s", "--weights",
                        "partial.pt", "--example-input", "1x8", cwd=tmp_path), "missing keys bias")
    _one_line_error(run("build", "fac.py:make", "--name", "m", "--store", "s",
                        "--example-input", "1xq8", cwd=tmp_path), "bad example-input spec")
    _one_line_error(run("build", "fac.py:make", "--name", "m", "--store", "file/store",
                        "--example-input", "1x8", cwd=tmp_path), "cannot create store")
    debug = run("--debug", "build", "tests.models:make_broken", "--name", "m", "--store", "s",
                "--example-input", "1x4", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_version_flag() -> None:
    out = run("--version")
    assert out.returncode == 0 and "zmqmodels, version" in out.stdout


def test_weights_from_a_training_checkpoint_are_unwrapped_and_said(tmp_path) -> None:
    """A training checkpoint nests the state dict and DDP prefixes its keys: both are undone,
    and the build says so."""
    import torch

    from tests.models import make_affine
    from zmqmodels.model.build import build_from_source

    module, _ = make_affine()
    ckpt = tmp_path / "ckpt.pt"
    state = {f"module.{k}": v * 0 + 7 for k, v in module.state_dict().items()}
    torch.save({"epoch": 3, "model": state}, ckpt)
    said: list[str] = []
    rel = build_from_source("tests.models:make_affine", "affine", "v1", weights=str(ckpt),
                            progress=said.append)
    assert any("under 'model'" in s for s in said) and any("'module.' prefix" in s for s in said)
    assert rel.manifest.parameter_count == 8
