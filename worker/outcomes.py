"""How a finished job went, for the shared totals in Redis (shared/stats.py).

The record goes out with the job's terminal event, in the same round trip (`AttemptEnd` in
shared/jobstore.py); adding it is best effort there, so a failure to count a job never turns a
good job into a failed one.
"""

import time

from shared import stats
from shared.jobs import CompletionJob, Failed, Usage


def outcome_record(
    job: CompletionJob,
    worker_id: str,
    enqueued_ms: int,
    started: float,
    first_output: float | None,
    usage: Usage | None,
    failure: Failed | None,
) -> stats.JobRecord:
    """`enqueued_ms` is the attempt's queue score (when it was queued, Unix ms); `started` and
    `first_output` are `time.perf_counter()` readings taken by the task."""
    now = time.perf_counter()
    # The queue score comes from the enqueuing process's clock: across machines, keep clocks in sync.
    queue_wait = max(0.0, time.time() - (now - started) - enqueued_ms / 1000)
    return stats.JobRecord(
        job_id=job.id,
        request_id=job.request_id,
        worker_id=worker_id,
        outcome="completed" if failure is None else failure.code.value,
        queue_wait_s=queue_wait,
        duration_s=now - started,
        first_token_s=None if first_output is None else queue_wait + (first_output - started),
        usage=usage,
        failure=failure,
    )
