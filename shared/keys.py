"""Every Redis key and channel the gateway owns, as pure functions of validated ids.

arq keeps its own keys (`arq:job:<id>`, `arq:in-progress:<id>`, ...) next to these; the queue
itself is the sorted set named by `Settings.queue_name`.
"""

import re

PREFIX = "gateway"
WAKEUP_CHANNEL = f"{PREFIX}:wakeup"
"""Published after every enqueue so idle workers poll at once instead of on arq's timer."""

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_job_id(value: str) -> bool:
    return _JOB_ID.fullmatch(value) is not None


def events_key(job_id: str) -> str:
    """The Redis stream holding one job's events; entry ids are `0-<seq>`."""
    if not is_job_id(job_id):
        raise ValueError("malformed job id")
    return f"{PREFIX}:job:{job_id}:events"
