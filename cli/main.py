"""`claude-gateway up | api | worker | keys`.

`up` is the one-machine deployment: a private Redis when `REDIS_URL` is unset, one API process
and `WORKERS` worker processes, all stopped together on Ctrl-C. `api` and `worker` run one role
each against a shared `REDIS_URL`, for deployments across several machines. `keys` manages
client API keys (see `cli/keys.py`).
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from pydantic import ValidationError

from cli import keys
from shared.logs import configure_logging
from shared.settings import Settings

PRIVATE_REDIS_URL_FILE = "url"


def _status_redis_url(settings: Settings) -> str:
    """`REDIS_URL`, else the private Redis of a running `claude-gateway up` on this machine."""
    private = settings.state_dir / "redis" / PRIVATE_REDIS_URL_FILE
    if settings.redis_url is None and private.is_file():
        return private.read_text().strip()
    return _require_redis_url(settings, "status")


def _require_redis_url(settings: Settings, role: str) -> str:
    if settings.redis_url is None:
        sys.exit(f"claude-gateway {role}: set REDIS_URL (or use `claude-gateway up` for a private Redis)")
    return settings.redis_url


def run_api(settings: Settings) -> None:
    import uvicorn

    from api.app import create_app

    redis_url = _require_redis_url(settings, "api")
    keys.ensure_protected(settings, redis_url)
    app = create_app(settings, redis_url)
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1; the
    # gateway resolves client addresses itself, from TRUSTED_PROXIES only (api/access.py).
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the gateway's own log format (shared/logs.py)
        access_log=False,
        proxy_headers=False,
    )


def run_worker(settings: Settings) -> None:
    from worker.main import run_worker as run

    run(settings, _require_redis_url(settings, "worker"))


def run_up(settings: Settings) -> None:
    from cli.embedded_redis import EmbeddedRedis

    embedded = None
    redis_url = settings.redis_url
    if redis_url is None:
        embedded = EmbeddedRedis(settings.state_dir / "redis")
        embedded.start()
        redis_url = embedded.url
        logging.info("started a private Redis on %s (data in %s)", redis_url, embedded.data_dir)
        # So that `claude-gateway status` on this machine finds it without REDIS_URL.
        (embedded.data_dir / PRIVATE_REDIS_URL_FILE).write_text(redis_url)
    keys.ensure_protected(settings, redis_url)  # here, where the terminal is, not in the children
    env = {**os.environ, "REDIS_URL": redis_url}
    command = [sys.executable, "-m", "cli.main"]
    # Own sessions: a terminal's Ctrl-C reaches only this process, which stops the API and the
    # workers (they drain), and Redis only once they have exited.
    # stdin from /dev/null: only this process may ask the terminal anything.
    roles = ["api"] + ["worker"] * settings.workers
    children = [
        subprocess.Popen([*command, role], env=env, start_new_session=True, stdin=subprocess.DEVNULL)
        for role in roles
    ]
    logging.info("gateway on http://%s:%d with %d workers", settings.host, settings.port, settings.workers)

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=settings.job_timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
        if embedded is not None:
            (embedded.data_dir / PRIVATE_REDIS_URL_FILE).unlink(missing_ok=True)
            embedded.stop()
    failed = [child.args for child in children if child.returncode not in (0, -signal.SIGTERM)]
    if failed and not stopping:
        sys.exit("a gateway process exited unexpectedly; stopped the others")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="claude-gateway", description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("up", help="run Redis (if REDIS_URL is unset), the API and WORKERS workers")
    roles.add_parser("api", help="run one API process against REDIS_URL")
    roles.add_parser("worker", help="run one worker process against REDIS_URL")
    status = roles.add_parser("status", help="queue depth, workers and their jobs, recent failures")
    status.add_argument("--json", action="store_true", help="print one JSON snapshot")
    status.add_argument(
        "--watch", type=float, nargs="?", const=2.0, metavar="SECONDS", help="refresh every SECONDS (2)"
    )
    keys.add_parser(roles)
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:  # a clear message, not a traceback (values are not echoed)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        sys.exit(f"invalid configuration: {problems}")
    configure_logging(settings)
    if args.role == "status":
        from cli.status import run_status

        run_status(settings, _status_redis_url(settings), as_json=args.json, watch_s=args.watch)
        return
    if args.role == "keys":
        keys.run_keys(settings, args)
        return
    {"up": run_up, "api": run_api, "worker": run_worker}[args.role](settings)


if __name__ == "__main__":
    main()
