"""The soak benchmark's short version: a steady mix of streaming, plain, background, cancelled
and disconnecting requests against two workers, every outcome counted (bench/soak.py).

It asserts outcomes, never timings: no worker exits, no lost or repeated token, every request
ended with its terminal event. The full run (5 minutes, memory flatness too) is
`.venv/bin/python bench/soak.py --check`.
"""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_short_soak_ends_every_request_and_loses_no_worker(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "bench/soak.py", "--duration", "25", "--rate", "8", "--json", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_path.read_text())
    assert report["sent"] >= 150
    kinds = report["outcomes"]
    assert set(kinds) == {"stream", "plain", "background", "cancelled", "disconnect"}, kinds
    for kind, outcomes in kinds.items():
        assert set(outcomes) == {"ok"}, (kind, outcomes)
    assert sum(outcomes["ok"] for outcomes in kinds.values()) == report["sent"]
    assert report["worker_exits"] == 0
    assert report["exited_processes"] == []
    assert all(report["targets_met"].values()), report["targets_met"]
