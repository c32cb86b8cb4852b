"""Following one job's events from Redis, with the waits a caller must not exceed.

A job that no worker starts within `queue_timeout_s` is withdrawn from the queue and fails with
`queue_timeout`; one that started but then falls silent for longer than the worker's own job
limit fails with `timeout`. Either way the caller gets a terminal event, never a hang.
"""

from collections.abc import AsyncIterator

from arq.connections import ArqRedis

from api.sessions import abandon
from shared import queue
from shared.events import JobEventValue, NoEventWithin, read_events
from shared.jobs import CompletionJob, Failed, FailureCode
from shared.settings import Settings

# Beyond the worker's own job limit, so its timeout event normally arrives first.
_SILENCE_GRACE_S = 30.0


async def follow_job(redis: ArqRedis, settings: Settings, job: CompletionJob) -> AsyncIterator[JobEventValue]:
    job_id = job.id
    after = 0
    idle_limit = settings.queue_timeout_s
    patient = False  # set once the job is known to be running: then wait out its full time limit
    while True:
        try:
            async for seq, event in read_events(redis, job_id, after=after, idle_timeout_s=idle_limit):
                after = seq
                yield event
            return
        except NoEventWithin:
            if patient:
                yield Failed(
                    code=FailureCode.TIMEOUT, message="The worker running the job stopped responding."
                )
                return
            if after == 0 and await queue.withdraw(redis, settings.queue_name, job_id):
                await abandon(redis, job)
                yield Failed(
                    code=FailureCode.QUEUE_TIMEOUT,
                    message=f"No worker started the job within {settings.queue_timeout_s:g} s; retry later.",
                )
                return
            patient = True
            idle_limit = settings.job_timeout_s + _SILENCE_GRACE_S
