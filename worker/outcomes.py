"""Reports how a finished job went to the shared totals in Redis (shared/stats.py).

Best effort: the job's result is already in its event stream, so a failure to count it is logged
and never turns a good job into a failed one.
"""

import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import stats
from shared.jobs import CompletionJob, Failed, Usage
from shared.settings import Settings

log = logging.getLogger("gateway.worker")


async def report_outcome(
    ctx: dict[str, Any],
    job: CompletionJob,
    enqueued_ms: int,
    started: float,
    first_output: float | None,
    usage: Usage | None,
    failure: Failed | None,
) -> None:
    """`enqueued_ms` is the attempt's queue score (when it was queued, Unix ms); `started` and
    `first_output` are `time.perf_counter()` readings taken by the task."""
    settings: Settings = ctx["settings"]
    redis: Redis = ctx["redis"]
    now = time.perf_counter()
    # The queue score comes from the enqueuing process's clock: across machines, keep clocks in sync.
    queue_wait = max(0.0, time.time() - (now - started) - enqueued_ms / 1000)
    record = stats.JobRecord(
        job_id=job.id,
        request_id=job.request_id,
        worker_id=ctx["heartbeat"].worker_id,
        outcome="completed" if failure is None else failure.code.value,
        queue_wait_s=queue_wait,
        duration_s=now - started,
        first_token_s=None if first_output is None else queue_wait + (first_output - started),
        usage=usage,
        failure=failure,
    )
    try:
        await stats.record_job(redis, record, failures_kept=settings.recent_failures_kept)
    except (RedisError, OSError) as exc:
        log.warning("could not record the job's outcome (%s)", type(exc).__name__)
