"""Per-job workspaces: a private working directory, home, config and temp dir for one CLI run.

Nothing of one job is visible to another through the filesystem paths the gateway hands out,
and everything is removed when the job ends (a killed CLI otherwise leaves `/tmp/claude-*`).
Every process started for the job carries `MARKER=<workspace>` in its environment, inherited by
whatever the agent spawns; when the job ends, any of them still running is killed, so a
cancelled CLI never leaves a tool's process tree behind.
"""

import contextlib
import functools
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path
    work: Path | None = None
    """A session's kept directory (`worker/session_files.py`) to run in instead of a fresh one."""

    @property
    def cwd(self) -> Path:
        """The job's working directory: the agent's files, and all of the job it reads back."""
        return self.work if self.work is not None else self.root / "work"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def config(self) -> Path:
        return self.root / "home" / ".claude"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"


def session_view(workspace_root: Path) -> Path:
    """Where a session's directory appears inside its job's sandbox, on every worker: the absolute
    paths of its earlier turns (the agent's Read, Write and Edit take nothing else) still hold once
    the session moves. They named the worker's own copy, and broke when a turn ran on another (an
    outside probe). Outside, an empty directory: where the sandbox's launcher starts."""
    return workspace_root.resolve() / "sessions" / "current"


MARKER = "GATEWAY_WORKSPACE"
_OWNER = ".worker"
"""`<directory>.worker`, beside a worker's directory: the worker process that made it (pid and
start time), so a worker on the same machine knows the directories of a dead one
(`remove_abandoned`). Beside it, not in it: the agent writes in its workspace, and a mark it
replaced (a FIFO that blocks the read, another process's identity) would stop or fool the next
worker's start."""


def processes_of(workspace: Workspace) -> list[int]:
    """Pids of the live processes (readable by this user) started for `workspace`."""
    needle = f"{MARKER}={workspace.root}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def children_for(workspace: Workspace) -> list[int]:
    """Pids of this process's own children started for `workspace` and of their descendants (the
    sandbox's launcher and the CLI it runs): unlike `processes_of`, it reads a few files, not
    every process's on the host."""
    needle = f"{MARKER}={workspace.root}".encode()
    pids: list[int] = []
    for pid in _children(os.getpid()):
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
    todo = list(pids)
    while todo:
        descendants = _children(todo.pop())
        pids += descendants
        todo += descendants
    return pids


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def kill_processes_of(workspace: Workspace) -> None:
    for pid in processes_of(workspace):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def job_workspace(
    parent: Path, job_id: str, owner: str | None = None, work: Path | None = None
) -> Iterator[Workspace]:
    """The one place a job's directories are prepared: everything is removed at the end, except
    `work`, a session's directory that outlives the job (its files are saved after the turn).

    `owner`: the user the job runs as (`CLAUDE_JOB_USER`), who must own what it writes to.
    """
    workspace = Workspace(parent.resolve() / job_id, work)
    if workspace.root.exists():  # an earlier attempt's, whose worker died on this machine
        kill_processes_of(workspace)
        removed(workspace.root)
    # Not even traversable by others: the agent may open up its own folders (`chmod 755 .`) and
    # leave in them a program it made setuid, as the sandbox's root when the worker runs as root.
    workspace.root.mkdir(parents=True, mode=0o700)
    for directory in (workspace.cwd, workspace.config, workspace.tmp):
        directory.mkdir(parents=True, mode=0o700, exist_ok=directory == work)
    if work is not None:
        session_view(parent).mkdir(parents=True, exist_ok=True)
    mark_owned(workspace.root)
    if owner is not None:
        user = pwd.getpwnam(owner)
        for path in (workspace.root, workspace.cwd, workspace.home, workspace.config, workspace.tmp):
            os.chown(path, user.pw_uid, user.pw_gid)
        if work is not None:  # restored by the worker: the job's user must be able to change it
            _walk_with("chown", "-R", "-h", "-P", f"{user.pw_uid}:{user.pw_gid}", path=work, check=True)
    try:
        yield workspace
    finally:
        kill_processes_of(workspace)
        _remove_apart(workspace.root)


def _remove_apart(root: Path) -> None:
    """Removes a job's folder in a thread: in the worker's loop, a tree of many files (400,000
    small ones) stalled every other job's stream on the worker for 6-8 s (an outside probe). It
    is renamed first, so the job's name is free at once (a retry here makes it anew), and its mark
    goes with it: a worker that dies meanwhile leaves it to the next one (`remove_abandoned`)."""
    apart = root.with_name(f"{root.name}.removed-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(root, apart)
        os.rename(_owner_mark(root), _owner_mark(apart))
    except OSError:  # not there, or not this worker's to move: removed where it is
        apart = root
    # Not a daemon: a worker that exits cleanly finishes its removals first (a daemon one was cut
    # at the exit, its folder left to the next worker on the machine: an outside probe).
    threading.Thread(target=_remove_marked, args=(apart,), name=_REMOVAL).start()


_REMOVAL = "workspace-removal"


def finish_removals(timeout_s: float) -> bool:
    """Waits up to `timeout_s` for the folders being removed in threads; False if some are not."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name == _REMOVAL:
            thread.join(max(0.0, deadline - time.monotonic()))
    return not any(thread.name == _REMOVAL for thread in threading.enumerate())


def _remove_marked(directory: Path) -> None:
    removed(directory)
    unmark(directory)


def removed(path: Path) -> None:
    """Removes a directory, however deep, with folders in it the agent made unreadable
    (`chmod 000`). Never raises: what the agent made must not stop a job's end or a worker's start.
    """
    with contextlib.suppress(RecursionError):  # a tree deeper than Python's stack
        shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        _walk_with("chmod", "-R", "u+rwx", path=path)
        _walk_with("rm", "-rf", path=path)


def _walk_with(*command: str, path: Path, check: bool = False) -> None:
    """Runs a coreutils command over the tree at `path`: they walk any depth, never through a link."""
    subprocess.run(
        [*command, "--", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=check,
    )


def mark_owned(directory: Path) -> None:
    """Marks `directory` as this worker's, until it is removed (`remove_abandoned`)."""
    _owner_mark(directory).write_text(_this_worker())


def unmark(directory: Path) -> None:
    """`directory` (removed) is no worker's any more."""
    _owner_mark(directory).unlink(missing_ok=True)


def _owner_mark(directory: Path) -> Path:
    return directory.with_name(directory.name + _OWNER)


def remove_abandoned(parent: Path) -> int:
    """Removes the directories under `parent` whose worker is dead (killed: it could not remove
    them), with any process left in them; returns how many. The machine's workers share `parent`,
    and each one's are its callers' files."""
    count = 0
    for owner in parent.glob(f"*{_OWNER}"):
        try:
            identity = owner.read_text().strip()
        except OSError:
            continue
        pid = identity.split(" ", 1)[0]
        if not pid.isdigit() or _process_identity(int(pid)) == identity:
            continue  # its worker lives (or the mark is not one): still in use
        workspace = Workspace(owner.with_name(owner.name.removesuffix(_OWNER)))
        kill_processes_of(workspace)
        removed(workspace.root)
        unmark(workspace.root)
        count += 1
    return count


@functools.cache
def _this_worker() -> str:
    """This process's identity, read once (not at every job's start)."""
    return _process_identity(os.getpid()) or ""


def _process_identity(pid: int) -> str | None:
    """`<pid> <start time>`: a process, not its pid, which the kernel reuses."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid} {stat.rpartition(')')[2].split()[19]}"  # starttime: field 22, after the name
