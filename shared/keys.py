"""Every Redis key and channel the gateway owns, as pure functions of validated ids.

arq keeps its own keys (`arq:job:<id>`, `arq:in-progress:<id>`, ...) next to these; the queue
itself is the sorted set named by `Settings.queue_name`. Each attempt at a job is its own arq job,
`<job id>.<attempt>`, so arq runs every attempt at most once and a retry never inherits arq state.
"""

import hashlib
import re

PREFIX = "gateway"
WAKEUP_CHANNEL = f"{PREFIX}:wakeup"
"""Published after every enqueue so idle workers poll at once instead of on arq's timer."""
CANCEL_CHANNEL = f"{PREFIX}:cancel"
"""Carries the id of a job to cancel to whichever worker runs it."""
RUNNING = f"{PREFIX}:running"
"""Sorted set: running job id -> its lease deadline (ms). Workers renew; any worker sweeps."""

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_job_id(value: str) -> bool:
    return _JOB_ID.fullmatch(value) is not None


def _checked(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError("malformed job id")
    return job_id


def events_key(job_id: str) -> str:
    """The Redis stream holding one job's events; entry ids are `0-<seq>`."""
    return f"{PREFIX}:job:{_checked(job_id)}:events"


def record_key(job_id: str) -> str:
    """The hash describing one job: owner, payload, attempt, where it runs, how it ended."""
    return f"{PREFIX}:job:{_checked(job_id)}"


def idempotency_key(owner: str, key: str) -> str:
    """Where an `Idempotency-Key` of one caller points to its job (hashed: the key is caller text)."""
    digest = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
    return f"{PREFIX}:idempotency:{digest}"


def attempt_id(job_id: str, attempt: int) -> str:
    """The arq job id of one attempt at a job."""
    return f"{_checked(job_id)}.{attempt}"
