"""`claude-gateway up | api | worker | status | keys`.

`up` is the one-machine deployment: a private Redis when `REDIS_URL` is unset, `API_PROCESSES`
API processes on one port and `WORKERS` worker processes, each restarted if it dies and all
stopped together on Ctrl-C (cli/supervisor.py). `api` and `worker` run one role
each against a shared `REDIS_URL`, for deployments across several machines. `status` shows the
queue, the workers and recent failures (`cli/status.py`); `keys` manages client API keys
(`cli/keys.py`).
"""

import argparse
import asyncio
import atexit
import contextlib
import fcntl
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING

from cli import add_commands, keys
from cli import children as children_env
from cli.reach import cli_redis, wait_for_redis
from shared import heartbeats
from shared.logs import configure_logging
from shared.settings import Settings, configured
from worker.environment import forbid_inspection

if TYPE_CHECKING:
    from cli.embedded_redis import EmbeddedRedis

PRIVATE_REDIS_URL_FILE = "url"
PRIVATE_REDIS_PASSWORD_FILE = "password"  # noqa: S105 (a file name)


def _found_redis_url(settings: Settings, role: str) -> str:
    """`REDIS_URL`, else the private Redis of a running `claude-gateway up` on this machine."""
    private = settings.state_dir / "redis" / PRIVATE_REDIS_URL_FILE
    if settings.redis_url is None:
        if private.is_file() and _up_runs(settings.state_dir):  # an `up` killed left its file behind
            return private.read_text().strip()
        sys.exit(
            f"claude-gateway {role}: set REDIS_URL; no `claude-gateway up` runs with its state in "
            f"{settings.state_dir.resolve()} (STATE_DIR, as up was given it)"
        )
    return settings.redis_url


def _require_redis_url(settings: Settings, role: str) -> str:
    if settings.redis_url is None:
        sys.exit(f"claude-gateway {role}: set REDIS_URL (or use `claude-gateway up` for a private Redis)")
    return settings.redis_url


def run_api(settings: Settings) -> None:
    import uvicorn

    from api.app import create_app
    from api.deps import Gateway
    from shared.http_head import MAX_HEAD_BYTES, BoundedHead

    redis_url = _require_redis_url(settings, "api")
    keys.configured_keys(settings)  # a mistake in them is said before Redis is waited for
    _check_folders("api", _store_folder(settings))  # the files API's
    wait_for_redis(redis_url, "api")
    _reserve_counters()
    if settings.api_shared_port and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        logging.getLogger("gateway.api").warning(
            "API_SHARED_PORT without PROMETHEUS_MULTIPROC_DIR: a scrape of this port reads one "
            "process's counters (docs/operations.md)"
        )
    keys.ensure_protected(settings, redis_url)
    app = create_app(settings, redis_url)
    children_env.drop_credentials()  # read into settings; no later code reads the environment
    forbid_inspection()
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1; the
    # gateway resolves client addresses itself, from TRUSTED_PROXIES only (api/access.py).
    # Several API processes (`up`'s API_PROCESSES) share the port by SO_REUSEPORT: the kernel spreads
    # connections over them (one shared listening socket left a burst to whichever accepted first).
    listener = _listener(settings.host, settings.port, shared=settings.api_shared_port)

    class Http(BoundedHead):
        max_message_bytes = settings.max_request_bytes + 2 * MAX_HEAD_BYTES
        send_timeout_s = settings.send_timeout_s

    config = uvicorn.Config(
        app,
        http=Http,
        log_level=settings.log_level,
        log_config=None,  # keep the gateway's own log format (shared/logs.py)
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # Open streams end at once (clients resume them by id) instead of holding the shutdown.
            gateway: Gateway | None = getattr(app.state, "gateway", None)
            if gateway is not None:
                gateway.streams.end(settings.drain_timeout_s)

    server = Server(config)
    # A hangup (its terminal closed) stops it as SIGTERM does; uvicorn handles only that and SIGINT.
    signal.signal(signal.SIGHUP, lambda _, frame: server.handle_exit(signal.SIGTERM, frame))
    server.run(sockets=[listener])


def run_worker(settings: Settings, worker_id: str | None) -> None:
    from worker.main import run_worker as run

    redis_url = _require_redis_url(settings, "worker")
    # A mistake of this machine's, before Redis is waited for.
    _check_folders("worker", {"WORKSPACE_ROOT": settings.workspace_root, **_store_folder(settings)})
    _check_job_folder("worker", settings)
    wait_for_redis(redis_url, "worker")  # one line if it never answers, not a traceback
    if worker_id is not None and not asyncio.run(_claimed(redis_url, worker_id, settings.heartbeat_ttl_s)):
        sys.exit(f"claude-gateway worker: a live worker has the id {worker_id}")
    run(settings, redis_url, worker_id)


async def _claimed(redis_url: str, worker_id: str, ttl_s: float) -> bool:
    """Whether `worker_id` is this worker's: a worker killed with it leaves it within a heartbeat's
    TTL, which a quick restart waits out rather than fail (a supervisor would give up)."""
    deadline = time.monotonic() + ttl_s + 1
    async with cli_redis(redis_url) as redis:
        while not await heartbeats.claim(redis, worker_id, ttl_s):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.5)
    return True


def _check_job_folder(role: str, settings: Settings) -> None:
    """Exits with one line unless CLAUDE_CWD, where set, is a folder: every job had failed with
    "Claude Code exited unexpectedly" while the worker said it was ready (an outside probe)."""
    if settings.claude_cwd is not None and not settings.claude_cwd.is_dir():
        sys.exit(
            f"claude-gateway {role}: cannot use CLAUDE_CWD={settings.claude_cwd} (not an existing folder)"
        )


def _check_folders(role: str, folders: dict[str, Path]) -> None:
    """Exits with one line unless each setting's folder takes writes (an outside probe: workers
    restarted for good on a WORKSPACE_ROOT they could not use, and with a WORKSPACE_STORE folder
    they could not use every session turn failed while /ready said ready)."""
    for name, folder in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryDirectory(dir=folder).cleanup()
        except OSError as exc:
            sys.exit(f"claude-gateway {role}: cannot use {name}={folder} ({exc.strerror})")


def _store_folder(settings: Settings) -> dict[str, Path]:
    """A `file://` WORKSPACE_STORE's folder (an S3 store is checked at its first use)."""
    from shared.workspace_store import file_store_folder  # with obstore: only where one is named

    folder = file_store_folder(settings)
    return {} if folder is None else {"WORKSPACE_STORE": folder}


def run_up(settings: Settings) -> None:
    from cli.embedded_redis import EmbeddedRedis, RedisStartError
    from cli.supervisor import Child, Supervisor

    if settings.port == 0:  # each API process would take a port of its own, and none be said
        sys.exit("claude-gateway up: PORT=0 picks no one port for its API processes; choose one")
    # Shared by SO_REUSEPORT, the port would also take in the API processes of another gateway
    # started on it by mistake: it must be free now.
    _listener(settings.host, settings.port).close()
    held = _hold(settings.state_dir)  # until this process ends
    # Its folders, before anything starts (a file in the way ended `up` with a traceback, once
    # after its Redis had started).
    counters = _counters_folder(settings)
    # Said once here: the workers would each exit on it, restarted by `up` for good (an outside probe).
    _check_folders("up", {"WORKSPACE_ROOT": settings.workspace_root, **_store_folder(settings)})
    _check_job_folder("up", settings)
    embedded = None
    redis_url = settings.redis_url
    children: list[Child] = []
    if redis_url is None:
        data_dir = _state_folder(settings.state_dir / "redis")
        try:
            password = _private_redis_password(data_dir)
        except OSError as exc:  # another user's file (a traceback before: an outside probe)
            sys.exit(f"claude-gateway up: cannot use STATE_DIR: {exc.filename} ({exc.strerror})")
        embedded = EmbeddedRedis(data_dir, password=password, maxmemory=settings.redis_maxmemory)
        try:
            embedded.start()
        except RedisStartError as exc:  # the reason, not a traceback (an outside probe)
            raise SystemExit(f"claude-gateway up: {exc}") from None
        redis_url = embedded.url
        logging.info("started a private Redis on 127.0.0.1:%d (data in %s)", embedded.port, data_dir)
        # So that `claude-gateway status` on this machine finds it without REDIS_URL.
        _write_private(data_dir / PRIVATE_REDIS_URL_FILE, redis_url)
        children.append(Child("redis", lambda: _restarted(embedded)))
        assert embedded.process is not None
        children[0].process, children[0].started = embedded.process, time.monotonic()
    if embedded is None:  # one line if it never answers (a wrong password is not retried for good)
        wait_for_redis(redis_url, "up")
    try:
        keys.ensure_protected(settings, redis_url)  # here, where the terminal is, not in the children
    except SystemExit:  # refused to start: nothing of this start stays behind
        if embedded is not None:
            embedded.stop()
            (embedded.data_dir / PRIVATE_REDIS_URL_FILE).unlink(missing_ok=True)
        raise
    environ = {**os.environ, "REDIS_URL": redis_url}
    api_env, worker_env = children_env.api_environment(environ), children_env.worker_environment(environ)
    if counters is not None:
        api_env["API_SHARED_PORT"] = "true"
        # A scrape reaches any one of them: they count in one folder (a new `up`, new totals),
        # each reporting the sum.
        api_env["PROMETHEUS_MULTIPROC_DIR"] = str(counters)
    children_env.drop_credentials()  # held for the children in memory only
    forbid_inspection()
    command = [sys.executable, "-m", "cli.main"]

    def spawner(role: str, env: dict[str, str]) -> Callable[[], subprocess.Popen[bytes]]:
        def spawn() -> subprocess.Popen[bytes]:
            # Each worker started gets a new id: `up` names it when it records the worker killed.
            named = ["--id", heartbeats.new_worker_id(socket.gethostname())] if role == "worker" else []
            # Own sessions: a terminal's Ctrl-C reaches only this process, which stops the API and
            # the workers (they drain), and Redis only once they have exited. stdin from /dev/null:
            # only this process may ask the terminal anything.
            return subprocess.Popen(
                [*command, role, *named],
                env=env,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                preexec_fn=children_env.die_with_parent(),
            )

        return spawn

    apis = settings.api_processes
    children += [
        Child("api" if apis == 1 else f"api {i}", spawner("api", api_env)) for i in range(1, apis + 1)
    ]
    children += [Child(f"worker {i}", spawner("worker", worker_env)) for i in range(1, settings.workers + 1)]
    for child in children:
        if child.process is None:
            child.start()
    logging.info(
        "gateway on http://%s:%d with %d API processes and %d workers",
        settings.host,
        settings.port,
        apis,
        settings.workers,
    )
    supervisor = Supervisor(children, redis_url=redis_url, drain_timeout_s=settings.drain_timeout_s)
    # SIGHUP too: a closed terminal or a dropped ssh session stops it as Ctrl-C does, draining the
    # running jobs (its default ended `up` at once, and Redis with it under a draining worker).
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, supervisor.request_stop)
    try:
        supervisor.run()
    finally:
        supervisor.stop(embedded)
        if embedded is not None:
            (embedded.data_dir / PRIVATE_REDIS_URL_FILE).unlink(missing_ok=True)
        held.close()  # everything of it is stopped: the folder is free for another `up`


def _reserve_counters() -> None:
    """Takes this API process's counters file's room at start (prometheus_client's multiprocess
    mode: `counter_<pid>.db`, written through `mmap`, sized by its length): a first write to a page
    of a file on a full filesystem is a SIGBUS, which killed the process on the next error answered
    (outside probes, a full STATE_DIR and then a full /dev/shm). No room now ends it in a line."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    try:
        fd = os.open(Path(folder) / f"counter_{os.getpid()}.db", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, _COUNTERS_BYTES)
        finally:
            os.close(fd)
    except OSError as exc:
        sys.exit(f"claude-gateway api: no room for its metrics' counters in {folder} ({exc.strerror})")


_COUNTERS_BYTES = 1 << 16  # prometheus_client's first size: some 70 series of ~200 bytes fill a fifth
# Each API process `up` restarts leaves its file (its counts are in the totals): a small /dev/shm
# (a container's 64 MiB) filled after 60 restarts at 1 MiB each (a re-check probe).


def _counters_folder(settings: Settings) -> Path | None:
    """A new folder for the API processes' shared counters (prometheus_client's multiprocess files,
    written through `mmap`) when there are several, removed when `up` exits: in memory (`/dev/shm`)
    where there is one, as on a full disk a counter's first write to a new page kills its process
    with SIGBUS (an outside probe's full STATE_DIR: every 404 killed an API process). The one an
    `up` of this STATE_DIR killed with SIGKILL left goes first, unless its `up` still holds it (a
    copied STATE_DIR names a folder another `up` uses: a re-check probe's lost its counters)."""
    memory, prefix = Path("/dev/shm"), "claude-gateway-counters-"  # noqa: S108 (random names, 0700)
    named = settings.state_dir / "api-counters"
    with contextlib.suppress(OSError, ValueError):
        earlier = Path(named.read_text())
        ours = earlier.parent == memory and earlier.name.startswith(prefix)
        if ours and earlier.lstat().st_uid == os.getuid():
            with (earlier / _COUNTERS_LOCK).open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while it runs
                shutil.rmtree(earlier)
    if settings.api_processes == 1:
        return None
    if memory.is_dir() and os.access(memory, os.W_OK | os.X_OK):
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=memory))
        with contextlib.suppress(OSError):  # a full disk: it outlives only an `up` killed with SIGKILL
            named.write_text(str(folder))
    else:
        folder = _state_folder(settings.state_dir / "api-metrics", fresh=True)
    lock = (folder / _COUNTERS_LOCK).open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # held as long as this process runs
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    atexit.register(lock.close)
    return folder


_COUNTERS_LOCK = "up.lock"


def _up_runs(state_dir: Path) -> bool:
    """Whether an `up` holds the state folder (`_hold`)."""
    try:
        with (state_dir / "up.lock").open("r") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file: no `up` ever ran there
        return False
    return False


def _hold(state_dir: Path) -> IO[str]:
    """The state folder, for this `up` alone while it runs. A second `up` on it (another port) ran a
    second Redis on the same data, emptied the first's metric counters and removed its Redis URL
    file on the way out (an outside probe)."""
    lock_file = _state_folder(state_dir) / "up.lock"
    try:
        lock = lock_file.open("a")
    except OSError as exc:
        sys.exit(f"claude-gateway up: cannot use STATE_DIR: {lock_file} ({exc.strerror})")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"claude-gateway up: another `up` runs on STATE_DIR={state_dir}; stop it or set another")
    return lock


def _state_folder(path: Path, *, fresh: bool = False) -> Path:
    """A folder of `up`'s state, made (emptied first if `fresh`); one it cannot use (a file in the
    way, not writable) ends `up` in a line, as a bad setting does."""
    try:
        if fresh:
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        sys.exit(f"claude-gateway up: cannot use STATE_DIR: {path} ({exc.strerror})")
    return path


def _listener(host: str, port: int, *, shared: bool = False) -> socket.socket:
    try:
        return socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            backlog=2048,  # uvicorn's own default
            reuse_port=shared,
        )
    except OSError as exc:
        sys.exit(f"claude-gateway: cannot listen on {host}:{port}: {exc.strerror}")


def _restarted(embedded: "EmbeddedRedis") -> "subprocess.Popen[bytes]":
    embedded.restart()
    assert embedded.process is not None
    return embedded.process


def _write_private(path: Path, text: str) -> None:
    """Writes a file only its owner can read (it holds the private Redis password)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def _private_redis_password(data_dir: Path) -> str:
    """The private Redis's password: generated once, kept 0600 in its data folder."""
    path = data_dir / PRIVATE_REDIS_PASSWORD_FILE
    if path.is_file() and (path.stat().st_mode & 0o077) == 0 and (password := path.read_text().strip()):
        return password
    data_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    _write_private(path, password)
    return password


def _open_files_to_the_hard_limit() -> None:
    """An API process holds a file per connection, a worker one per folder of a session's files it
    saves or restores (up to WORKSPACE_MAX_FILES): the soft limit's usual 1,024 refused both (an
    outside probe's session of 1,200 folders could not be saved); the hard limit is the operator's.
    `up` raises its own, which its children inherit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


_MAX_OPEN_FILES = 1 << 20


def _worker_id(value: str) -> str:
    if not heartbeats.valid_worker_id(value):
        raise argparse.ArgumentTypeError(
            "a worker id is 1 to 128 of A-Z a-z 0-9 . _ -, a letter or digit first"
        )
    return value


def _seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:  # 0 or less refreshed without a pause, a query of Redis each time
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="claude-gateway", description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    add_commands(
        roles,
        {
            "up": "run Redis (if REDIS_URL is unset), the API and WORKERS workers",
            "api": "run one API process against REDIS_URL (API_PROCESSES share a port)",
            "worker": "run one worker process against REDIS_URL",
            "status": "queue depth, workers and their jobs, recent failures",
        },
    )
    status = roles.choices["status"]
    status.add_argument("--json", action="store_true", help="print one JSON snapshot")
    status.add_argument(
        "--watch", type=_seconds, nargs="?", const=2.0, metavar="SECONDS", help="refresh every SECONDS (2)"
    )
    roles.choices["worker"].add_argument(
        "--id",
        type=_worker_id,
        help="its id in status and the logs, unique (default: host and a random part)",
    )
    keys.add_parser(roles)
    args = parser.parse_args(argv)
    settings = configured()
    configure_logging(settings)
    if args.role == "status":
        from cli.status import run_status

        run_status(settings, _found_redis_url(settings, "status"), as_json=args.json, watch_s=args.watch)
        return
    if args.role == "keys":
        keys.run_keys(_found_redis_url(settings, "keys"), args, settings)
        return
    _open_files_to_the_hard_limit()
    held = children_env.held_by(args.role, settings)
    if args.role == "worker":
        run_worker(held, args.id)
    else:
        {"up": run_up, "api": run_api}[args.role](held)


if __name__ == "__main__":
    main()
