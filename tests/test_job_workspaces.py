"""Job workspaces a dead worker left behind, on the machine its live workers share."""

import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from worker.workspace import job_workspace, remove_abandoned

_HOLD = """
import sys, time
from pathlib import Path
from worker.workspace import job_workspace
with job_workspace(Path(sys.argv[1]), sys.argv[2]):
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_dead_workers_workspaces_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path), "job-of-a-killed-worker"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert dead.stdout is not None
    assert dead.stdout.readline() == "ready\n"
    left = tmp_path / "job-of-a-killed-worker"
    (left / "work" / "callers-file.txt").write_text("a caller's data")
    dead.send_signal(signal.SIGKILL)  # as up's restart finds it: nothing removed it
    dead.wait(timeout=10)
    with job_workspace(tmp_path, "job-of-this-worker") as live:
        assert remove_abandoned(tmp_path) == 1
        assert not left.exists()
        assert live.root.is_dir()  # its worker (this process) lives
    assert remove_abandoned(tmp_path) == 0
