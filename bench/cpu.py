"""CPU time of a process and everything it starts, sandboxed or not.

bwrap's namespace init does not hand its children's CPU time up to its parent, so a worker's
`cutime + cstime` misses its sandboxed CLIs. A cgroup of its own (cpuacct on cgroup v1, cpu.stat on
v2; needs root) counts every process started in it, whatever reaps them.
"""

import atexit
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def own_and_reaped(pid: int) -> tuple[float, float]:
    """CPU seconds of a live process itself (every thread), and of its children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S, (int(fields[13]) + int(fields[14])) * TICK_S


def cpu_meter(pid: int) -> tuple[Callable[[], float], str]:
    """A reader of the CPU seconds of `pid` and everything it starts from now on, and how."""
    v1, v2 = Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup")
    for base, usage in ((v1, "cpuacct.usage"), (v2, "cpu.stat")):
        group = base / f"gateway-bench-{pid}"
        try:
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            continue
        atexit.register(_remove, group)  # empty by then: the benchmarks stop what they start
        counter = group / usage
        if usage == "cpu.stat":  # its first line: usage_usec
            return lambda path=counter: int(path.read_text().split()[1]) / 1e6, "cgroup v2"
        return lambda path=counter: int(path.read_text()) / 1e9, "cgroup v1 cpuacct"
    return lambda: sum(own_and_reaped(pid)), "the process and its reaped children (undercounts sandboxes)"


def _remove(group: Path) -> None:
    with contextlib.suppress(OSError):
        group.rmdir()
