"""The base install (``pip install zmqmodels``, no extras) runs every role that moves releases
and asks about them, without torch: a hub, a relay, ``publish`` of a built release, ``status``,
``releases``, ``inspect``, ``infer``, ``rollback``. ``scripts/test`` makes that install in
``.venv-base``; a node (which runs models: ``zmqmodels[torch]``) follows the relay from here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, free_port_pair, wait_until
from zmqmodels import Node

BASE = ROOT / ".venv-base" / "bin"

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not (BASE / "zmqmodels").exists(),
                                 reason="no .venv-base: scripts/test makes the base install there")]


def base(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BASE / "zmqmodels"), *args], capture_output=True, text=True, timeout=timeout)


def test_the_base_install_has_no_torch_and_runs_hub_relay_and_the_control_commands(tmp_path) -> None:
    probe = subprocess.run([str(BASE / "python"), "-c", "import torch"], capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.l = torch.nn.Linear(4, 2)\n"
        "    def forward(self, x):\n        return self.l(x)\n"
        "def make():\n    torch.manual_seed(0); return M()\n")
    built = subprocess.run([sys.executable, "-m", "zmqmodels", "build", f"{tmp_path / 'm.py'}:make",
                            "--name", "m", "--label", "v1", "--example-input", "1x4",
                            "--store", str(tmp_path / "built")],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (zmr,) = (tmp_path / "built" / "m").glob("*.zmr")
    hub, relay = (f"tcp://127.0.0.1:{free_port_pair()}" for _ in range(2))
    procs = []
    for role, args in (("hub", ["--bind", hub, "--store", str(tmp_path / "hub")]),
                       ("relay", ["--hub", hub, "--bind", relay, "--store", str(tmp_path / "relay")])):
        with open(tmp_path / f"{role}.log", "w") as log:
            procs.append(subprocess.Popen([str(BASE / "zmqmodels"), role, *args], stdout=log, stderr=log))
    node = None
    try:
        wait_until(lambda: base("status", "--hub", hub, "--timeout", "2").returncode == 0, 60,
                   interval=0.5, what="the base install's hub")
        node = Node(relay, ["m"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "cache",
                    node_id="n").start()
        pub = base("publish", str(zmr), "--hub", hub, "--wait-for", "1", "--timeout", "120", "--json",
                   timeout=180)
        assert pub.returncode == 0, pub.stderr
        assert json.loads(pub.stdout)["seq"] == 1
        st = base("status", "--hub", hub, "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["nodes"][0]["via"], st.stderr  # via the relay
        rel = base("releases", "m", "--hub", hub)
        assert rel.returncode == 0 and "v1" in rel.stdout, rel.stderr
        ins = base("inspect", str(zmr))
        assert ins.returncode == 0 and "l.weight" in ins.stdout, ins.stderr
        inf = base("infer", "--server", node.address, "--model", "m", "--input", "1x4", "--json")
        assert inf.returncode == 0 and json.loads(inf.stdout)["seq"] == 1, inf.stderr
        back = base("rollback", "m", "--to", "v1", "--hub", hub, "--wait-for", "1", "--timeout", "120",
                    timeout=180)
        assert back.returncode == 0, back.stderr
    finally:
        if node is not None:
            node.close()
        for p in procs:
            p.terminate()
            p.wait(15)
