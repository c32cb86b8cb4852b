"""The worker forgets its environment once settings are read, so no CLI it starts inherits it.

`claude-agent-sdk` starts the CLI with `{**os.environ, **options.env}`: everything the worker was
started with (`REDIS_URL`, `ANTHROPIC_API_KEY`, `API_KEYS`, whatever the host had) would be
readable by a tool the agent runs. After this, the CLI's environment is exactly what the backend
passes in `options.env`, plus the few neutral variables kept here. This module removes variables;
configuration is still read only by `shared/settings.py`.
"""

import os

KEPT = frozenset({"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"})


def forget_environment() -> None:
    for name in list(os.environ):
        if name not in KEPT:
            del os.environ[name]
