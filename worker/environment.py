"""The worker forgets its environment once settings are read, so no CLI it starts inherits it,
and makes itself non-dumpable, so a tool running as the same user cannot read it either.

`claude-agent-sdk` starts the CLI with `{**os.environ, **options.env}`: everything the worker was
started with (`REDIS_URL`, `ANTHROPIC_API_KEY`, `API_KEYS`, whatever the host had) would be
readable by a tool the agent runs. After this, the CLI's environment is exactly what the backend
passes in `options.env`, plus the few neutral variables kept here. This module removes variables;
configuration is still read only by `shared/settings.py`.

Forgetting is not enough on its own: `/proc/<worker>/environ` keeps the environment the process
was started with, and `/proc/<worker>/mem` holds the real key, both readable by any process of
the same user. A non-dumpable process's `/proc` files belong to root, so the agent's tools (same
user, no CAP_SYS_PTRACE) cannot open them. A root agent still can: see `CLAUDE_JOB_USER`.
"""

import ctypes
import logging
import os
import sys

log = logging.getLogger("gateway.worker")

_PR_SET_DUMPABLE = 4

KEPT = frozenset({"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"})


def forget_environment() -> None:
    for name in list(os.environ):
        if name not in KEPT:
            del os.environ[name]


def forbid_inspection() -> None:
    if not sys.platform.startswith("linux"):
        log.warning("cannot make the worker non-dumpable on %s: tools may read its memory", sys.platform)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_DUMPABLE) failed (errno %d): tools may read the worker's memory", ctypes.get_errno()
        )
