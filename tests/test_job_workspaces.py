"""Job workspaces and runtime directories a dead worker left behind, on the machine its live workers share."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from shared.settings import Settings
from tests.conftest import ROOT
from worker.sandbox import remove_runtime_dir, runtime_dir
from worker.workspace import job_workspace, remove_abandoned

_HOLD = """
import sys, time
from pathlib import Path
from worker.workspace import job_workspace
with job_workspace(Path(sys.argv[1]), sys.argv[2]):
    print("ready", flush=True)
    time.sleep(600)
"""


def _worker_holding(parent: Path, job: str) -> "subprocess.Popen[str]":
    """A worker process holding `job`'s workspace under `parent`, for the test to kill."""
    worker = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(parent), job], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert worker.stdout is not None
    assert worker.stdout.readline() == "ready\n"
    return worker


def test_a_dead_workers_workspaces_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead = _worker_holding(tmp_path, "job-of-a-killed-worker")
    left = tmp_path / "job-of-a-killed-worker"
    (left / "work" / "callers-file.txt").write_text("a caller's data")
    dead.send_signal(signal.SIGKILL)  # as up's restart finds it: nothing removed it
    dead.wait(timeout=10)
    with job_workspace(tmp_path, "job-of-this-worker") as live:
        assert remove_abandoned(tmp_path) == 1
        assert not left.exists()
        assert live.root.is_dir()  # its worker (this process) lives
    assert remove_abandoned(tmp_path) == 0


def test_what_the_agent_puts_in_its_workspace_cannot_stop_the_sweep(tmp_path: Path) -> None:
    # The agent writes in its workspace: a FIFO where a mark was read would block the next
    # worker's start for good (found by an outside probe), so the mark is kept beside it.
    dead = _worker_holding(tmp_path, "job-of-a-hostile-caller")
    left = tmp_path / "job-of-a-hostile-caller"
    (left / ".worker").unlink(missing_ok=True)  # as `rm -f .worker && mkfifo .worker` in its Bash
    os.mkfifo(left / ".worker")
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=10)
    sweep = threading.Thread(target=remove_abandoned, args=(tmp_path,), daemon=True)
    sweep.start()
    sweep.join(timeout=10)
    assert not sweep.is_alive()
    assert not left.exists()
    assert list(tmp_path.iterdir()) == []  # its mark went with it


def _deep_tree(top: Path, depth: int) -> None:
    """Folders `depth` deep, as the agent's Bash makes them (`cd` after each `mkdir`): deeper
    than Python's recursion limit and longer than PATH_MAX, so only opened one level at a time."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)


def _removed_within(parent: Path, seconds: float) -> None:
    """A job's folder is removed apart from the worker's loop: gone from `parent` soon after."""
    deadline = time.monotonic() + seconds
    while list(parent.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(parent.iterdir()) == []


def test_a_large_workspace_is_removed_without_holding_up_its_job_or_the_worker(tmp_path: Path) -> None:
    """Found by an outside probe: removing a tree of many files (400,000) in the worker's loop
    stalled every other job's stream on it for seconds. The job's name is free at once."""
    with job_workspace(tmp_path, "job-of-many-files") as workspace:
        for i in range(20_000):
            (workspace.tmp / str(i)).touch()
    assert not workspace.root.exists()  # moved apart at once, and removed in a thread:
    assert any(".removed-" in path.name for path in tmp_path.iterdir())  # 20,000 files take a while
    with job_workspace(tmp_path, "job-of-many-files") as again:  # a retry here: a fresh folder
        assert list(again.tmp.iterdir()) == []
    _removed_within(tmp_path, 30)


_EXIT_AFTER_A_JOB = """
import sys
from pathlib import Path
from worker.workspace import job_workspace
with job_workspace(Path(sys.argv[1]), "job-just-ended") as workspace:
    for i in range(20_000):
        (workspace.tmp / str(i)).touch()
"""


def test_a_worker_that_exits_cleanly_finishes_its_removals_first(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", _EXIT_AFTER_A_JOB, str(tmp_path)], cwd=ROOT, check=True, timeout=120
    )
    assert list(tmp_path.iterdir()) == []


def test_a_tree_deeper_than_pythons_stack_is_removed_at_the_jobs_end_and_after_its_worker(
    tmp_path: Path,
) -> None:
    # Found by an outside probe: removing it raised RecursionError, so the job failed with its
    # workspace left, and every later worker's start died in the sweep.
    with job_workspace(tmp_path, "job-of-a-deep-tree") as workspace:
        _deep_tree(workspace.cwd, 3200)
    _removed_within(tmp_path, 10)
    dead = _worker_holding(tmp_path, "job-of-a-killed-worker")
    _deep_tree(tmp_path / "job-of-a-killed-worker" / "work", 3200)
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=10)
    assert remove_abandoned(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


_RUNTIME = """
import time
from worker.sandbox import runtime_dir
print(runtime_dir(), flush=True)
time.sleep(600)
"""


def test_a_killed_workers_runtime_directory_is_removed_by_the_next_worker() -> None:
    # Found by an outside probe: each killed worker left its /tmp/gateway-worker-* behind (the
    # model API's socket, the sandboxes' launchers), one more with every restart.
    dead = subprocess.Popen([sys.executable, "-c", _RUNTIME], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert dead.stdout is not None
    left = Path(dead.stdout.readline().strip())
    assert left.is_dir()
    dead.kill()
    dead.wait(timeout=10)
    mine = runtime_dir()
    try:
        assert mine.parent == left.parent
        assert not left.exists()
        assert not left.with_name(left.name + ".worker").exists()
    finally:
        remove_runtime_dir(mine)
    assert not mine.exists()
    assert not mine.with_name(mine.name + ".worker").exists()


def test_what_a_job_leaves_in_its_workspace_is_out_of_other_users_reach() -> None:
    """As the sandbox's root (a worker running as root), the agent can make a program setuid root
    and open up its own folder: no other user of the machine may reach it (an outside probe)."""
    with tempfile.TemporaryDirectory() as folder:
        parent = Path(folder)
        parent.chmod(0o755)  # as WORKSPACE_ROOT usually is
        with job_workspace(parent, "job-of-a-hostile-caller") as workspace:
            planted = workspace.cwd / "id"
            planted.write_bytes(Path("/usr/bin/id").read_bytes())
            planted.chmod(0o4755)
            workspace.cwd.chmod(0o755)  # what the agent may do to its working directory
            assert workspace.root.stat().st_mode & 0o077 == 0
            if os.geteuid() == 0:  # as any other user: not even found
                other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh", "-c"]
                assert subprocess.run([*other, f"test -e {parent}"]).returncode == 0
                assert subprocess.run([*other, f"test -e {planted}"]).returncode == 1


def test_workspaces_live_with_the_machines_state_unless_set(tmp_path: Path) -> None:
    """Found by an outside probe: with STATE_DIR elsewhere, they were still `./.state/workspaces`."""
    assert Settings(state_dir=tmp_path).workspace_root == tmp_path / "workspaces"
    assert Settings(state_dir=tmp_path, workspace_root=tmp_path / "w").workspace_root == tmp_path / "w"
