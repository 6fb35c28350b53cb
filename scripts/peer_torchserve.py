"""TorchServe as a peer in benchmarks: archive a TorchScript file, run a server with one
worker per model version, answer raw float32 bodies, and swap versions the way its users do
(register the new version, then set it as the default).

Needs ``pip install torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml`` (its worker
imports yaml) and Java 17; every function raises ``RuntimeError`` saying what is missing
otherwise.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HANDLER = '''
import json, os
import torch

_model = None


def handle(data, context):
    """Raw little-endian float32 bodies (one row each) -> {"v": model version, "y": the row's
    first output value}; the rows TorchServe batched (batch_size > 1) run as one forward."""
    global _model
    if _model is None:
        torch.set_num_threads(1)
        d = context.system_properties.get("model_dir")
        _model = torch.jit.load(os.path.join(d, context.manifest["model"]["serializedFile"])).eval()
    if data is None:
        return None
    version = context.manifest["model"].get("modelVersion", "")
    rows = [torch.frombuffer(bytearray(r.get("body") or r.get("data")), dtype=torch.float32) for r in data]
    with torch.inference_mode():
        y = _model(torch.stack(rows))
    n = len(rows)
    return [json.dumps({"v": version, "y": float(y[i].flatten()[0]), "n": n}) for i in range(n)]
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchServe:
    """One TorchServe instance in a temporary directory (``with TorchServe() as ts``)."""

    def __init__(self) -> None:
        bindir = os.path.dirname(sys.executable)
        self.torchserve = shutil.which("torchserve", path=bindir) or shutil.which("torchserve")
        self.archiver = (shutil.which("torch-model-archiver", path=bindir)
                         or shutil.which("torch-model-archiver"))
        if not self.torchserve or not self.archiver or not shutil.which("java"):
            raise RuntimeError("TorchServe needs torchserve, torch-model-archiver (pip) and java on PATH")
        self.dir = tempfile.mkdtemp(prefix="zmqm-ts-")
        self.store = os.path.join(self.dir, "store")
        os.makedirs(self.store)
        self.port, self.mport = _free_port(), _free_port()
        with open(os.path.join(self.dir, "handler.py"), "w") as f:
            f.write(HANDLER)
        with open(os.path.join(self.dir, "config.properties"), "w") as f:
            f.write(f"inference_address=http://127.0.0.1:{self.port}\n"
                    f"management_address=http://127.0.0.1:{self.mport}\n"
                    f"metrics_address=http://127.0.0.1:{_free_port()}\n"
                    "default_workers_per_model=1\nnumber_of_netty_threads=2\njob_queue_size=100\n"
                    "disable_system_metrics=true\n")

    def __enter__(self) -> TorchServe:
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               "OMP_NUM_THREADS": "1", "LOG_LOCATION": self.dir, "METRICS_LOCATION": self.dir}
        config = os.path.join(self.dir, "config.properties")
        subprocess.run([self.torchserve, "--start", "--ncs", "--disable-token-auth", "--enable-model-api",
                        "--model-store", self.store, "--ts-config", config],
                       cwd=self.dir, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("TorchServe did not answer /ping within 120 s")

    def __exit__(self, *exc: object) -> None:
        subprocess.run([self.torchserve, "--stop"], cwd=self.dir, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def archive(self, scripted_path: str, version: str) -> str:
        """A .mar of ``scripted_path`` as version ``version``; its file name."""
        name = f"m_v{version}"
        subprocess.run([self.archiver, "--model-name", "m", "--version", version, "--serialized-file",
                        scripted_path, "--handler", os.path.join(self.dir, "handler.py"), "--export-path",
                        self.store, "--force"], check=True, cwd=self.dir)
        os.replace(os.path.join(self.store, "m.mar"), os.path.join(self.store, f"{name}.mar"))
        return f"{name}.mar"

    def _manage(self, method: str, path: str) -> None:
        c = http.client.HTTPConnection("127.0.0.1", self.mport, timeout=300)
        c.request(method, path)
        r = c.getresponse()
        body = r.read()
        if r.status >= 300:
            raise RuntimeError(f"TorchServe {method} {path}: {r.status} {body[:300]!r}")

    def register(self, mar: str, batch_size: int = 1, max_batch_delay_ms: int = 100) -> None:
        """Register ``mar`` with one worker; ``batch_size`` > 1 turns on TorchServe's batching
        (a worker gets up to that many requests, waiting up to ``max_batch_delay_ms``)."""
        self._manage("POST", f"/models?url={mar}&initial_workers=1&synchronous=true"
                             f"&batch_size={batch_size}&max_batch_delay={max_batch_delay_ms}")

    def unregister(self, version: str) -> None:
        self._manage("DELETE", f"/models/m/{version}")

    def set_default(self, version: str) -> None:
        self._manage("PUT", f"/models/m/{version}/set-default")


class HttpClient:
    """One keep-alive connection: ``infer(body)`` -> the model version that answered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def infer(self, body: bytes) -> str:
        return self.call(body)["v"]

    def call(self, body: bytes) -> dict:
        """The handler's answer: ``{"v": version, "y": value, "n": rows in its forward}``."""
        self.c.request("POST", "/predictions/m", body=body,
                       headers={"Content-Type": "application/octet-stream"})
        r = self.c.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data[:200]!r}")
        return json.loads(data)
