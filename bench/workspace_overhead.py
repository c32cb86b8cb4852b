"""What a session turn adds for its workspace: staying on its worker vs moving to another.

Runs the worker's own code (`worker/session_files.py`) against a private Redis and each store
(the local one, and a SeaweedFS S3 server on loopback), for two workspaces: 1 MB in 1,000 files
and 50 MB in 10,000 files (text-like files in 100 folders). For each, side by side:

- first save: the turn that created all the files uploads them;
- staying (the next turn on the worker that holds the workspace): checkout (nothing to restore),
  then the save after the turn changed one file, and the save of a turn that changed nothing;
  both saves also with every file scanned, as a save does without inotify or after lost events;
- moving (the next turn on another worker): restore into an empty folder, then the save after
  the turn changed one file;
- for comparison, the whole folder as one tar.gz (the alternative to packs of changed files),
  written and extracted, and `cp -r` of it: the floor of writing that many files here.

Each figure is the median of `--rounds` runs, wall time and this process's CPU time.

    .venv/bin/python bench/workspace_overhead.py [--rounds 5] [--no-s3] [--folder /dev/shm]

`--folder` is where the workspaces, the local store and the S3 server's data go (default: the
system's temporary folder); on tmpfs (`/dev/shm`) the figures leave out the disk.
"""

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from cli.embedded_redis import EmbeddedRedis  # noqa: E402
from shared.jobs import CompletionJob, SessionRef, Turn  # noqa: E402
from shared.settings import Settings  # noqa: E402
from worker.session_files import SessionFiles  # noqa: E402

OWNER = "0" * 32
SIZES = {"1 MB / 1,000 files": (1_000, 1_000), "50 MB / 10,000 files": (10_000, 5_000)}


def make_files(work: Path, count: int, size: int) -> None:
    line = b"def function_%06d(argument):  return argument * 2  # some source text\n"
    for i in range(count):
        folder = work / f"pkg{i % 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        body = (line % i) * (size // len(line % i) + 1)
        (folder / f"module_{i}.py").write_bytes(body[:size])


class Measure:
    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def add(self, wall: float, cpu: float) -> None:
        """Records the time since `wall` (perf_counter) and `cpu` (process_time)."""
        self.wall.append((time.perf_counter() - wall) * 1000)
        self.cpu.append((time.process_time() - cpu) * 1000)

    def __str__(self) -> str:
        return f"{statistics.median(self.wall):9.1f} ms ({statistics.median(self.cpu):7.1f} CPU)"


@dataclass
class Session:
    """One benchmarked session: its job's identity and the version it is at."""

    id: str
    transcript: str
    version: str | None = None

    def job(self) -> CompletionJob:
        ref = SessionRef(
            owner=OWNER, id=self.id, history_len=0, transcript_id=self.transcript, workspace=self.version
        )
        return CompletionJob(request_id="bench", model="m", turns=[Turn(role="user", text="x")], session=ref)


async def a_turn(
    files: SessionFiles, session: Session, agent: Callable[[Path], None], timed: dict[str, Measure]
) -> None:
    """One turn's workspace work, timed by part (those named in `timed`): restore (or not), then
    the agent, then the save."""
    wall, cpu = time.perf_counter(), time.process_time()
    async with files.turn(session.job()) as turn:
        assert turn is not None
        if "restore" in timed:
            timed["restore"].add(wall, cpu)
        await asyncio.to_thread(agent, turn.work)  # the agent's part: not the gateway's cost
        wall, cpu = time.perf_counter(), time.process_time()
        session.version = await turn.save() or session.version
        if "save" in timed:
            timed["save"].add(wall, cpu)


async def one_case(
    settings: Settings, redis: Redis, count: int, size: int, rounds: int
) -> dict[str, Measure]:
    names = ["first save", "staying: checkout", "staying: save 1 changed", "staying: save unchanged"]
    names += [
        "  every file scanned: 1",
        "  every file scanned: 0",
        "moving: restore",
        "moving: save 1 changed",
    ]
    results = {name: Measure() for name in names}
    holder = SessionFiles(settings, redis, "bench-holder")
    scanner = SessionFiles(settings, redis, "bench-scanner")
    if scanner.changes is not None:  # as without inotify
        scanner.changes.close()
        scanner.changes = None

    def change_one(work: Path) -> None:
        (work / "pkg07" / "module_7.py").write_bytes(os.urandom(size))

    for n in range(rounds):
        session = Session(f"bench-{count}-{n}", f"00000000-0000-0000-0000-{n:012d}")
        await a_turn(
            holder, session, lambda work: make_files(work, count, size), {"save": results["first save"]}
        )
        staying = {"restore": results["staying: checkout"], "save": results["staying: save 1 changed"]}
        await a_turn(holder, session, change_one, staying)
        await a_turn(holder, session, lambda work: None, {"save": results["staying: save unchanged"]})
        await a_turn(scanner, session, lambda work: None, {})  # now held there too
        await a_turn(scanner, session, change_one, {"save": results["  every file scanned: 1"]})
        await a_turn(scanner, session, lambda work: None, {"save": results["  every file scanned: 0"]})
        mover = SessionFiles(settings, redis, f"bench-mover-{n}")
        moving = {"restore": results["moving: restore"], "save": results["moving: save 1 changed"]}
        await a_turn(mover, session, change_one, moving)
        await mover.close()
    await holder.close()
    await scanner.close()
    return results


def archive_case(count: int, size: int, rounds: int, base: Path) -> dict[str, Measure]:
    """The alternative: the whole folder as one tar.gz, written and extracted; and `cp -r` of it,
    the floor of writing that many files on this machine's filesystem."""
    results = {name: Measure() for name in ("tar.gz write", "tar.gz extract", "cp -r (floor)")}
    with tempfile.TemporaryDirectory(dir=base) as folder:
        work = Path(folder) / "work"
        make_files(work, count, size)
        for n in range(rounds):
            data = io.BytesIO()
            wall, cpu = time.perf_counter(), time.process_time()
            with tarfile.open(fileobj=data, mode="w:gz", compresslevel=1) as tar:
                tar.add(work, arcname=".")
            results["tar.gz write"].add(wall, cpu)
            data.seek(0)
            wall, cpu = time.perf_counter(), time.process_time()
            with tarfile.open(fileobj=data, mode="r:gz") as tar:
                tar.extractall(Path(folder) / f"out{n}", filter="data")
            results["tar.gz extract"].add(wall, cpu)
            wall, cpu = time.perf_counter(), time.process_time()
            subprocess.run(["cp", "-r", str(work), str(Path(folder) / f"copy{n}")], check=True)
            results["cp -r (floor)"].add(wall, cpu)
        print(f"    (tar.gz of the whole workspace: {len(data.getvalue()) / 1e6:.1f} MB)")
    return results


def start_s3(folder: Path) -> tuple[object, dict[str, str]]:
    from tests.s3_server import SeaweedS3

    server = SeaweedS3(folder)
    server.start()
    server.create_bucket("bench")
    env = {
        "workspace_store": "s3://bench/ws",
        "workspace_s3_endpoint": server.endpoint,
        "workspace_s3_access_key_id": "bench",
        "workspace_s3_secret_access_key": "bench-secret",
    }
    return server, env


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        base = Path(folder)
        redis_server = EmbeddedRedis(base / "redis", persistent=False)
        redis_server.start()
        redis = Redis.from_url(redis_server.url)
        stores = {"local": {"workspace_store": f"file://{base / 'store'}"}}
        s3 = None
        if not args.no_s3:
            (base / "s3").mkdir()
            s3, env = start_s3(base / "s3")
            stores["s3"] = env
        try:
            print(f"load average before: {Path('/proc/loadavg').read_text().strip()}; folder {base}")
            print(f"{args.rounds} rounds each; median wall time (this process's CPU time)\n")
            for label, (count, size) in SIZES.items():
                print(f"{label}")
                for store, env in stores.items():
                    settings = Settings(workspace_root=base / f"workspaces-{store}", **env)  # type: ignore[arg-type]
                    results = await one_case(settings, redis, count, size, args.rounds)
                    for name, measure in results.items():
                        print(f"  {store:5s} {name:24s} {measure}")
                for name, measure in archive_case(count, size, args.rounds, base).items():
                    print(f"  {'-':5s} {name:24s} {measure}")
                print()
            print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
        finally:
            await redis.aclose()
            redis_server.stop()
            if s3 is not None:
                s3.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    asyncio.run(main())
