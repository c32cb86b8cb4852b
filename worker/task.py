"""Runs one completion job: backend output in, the job's event stream out."""

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis

from shared import logs
from shared.events import EventWriter
from shared.jobs import CompletionJob, Done, Failed, FailureCode, Usage
from shared.settings import Settings
from worker.backends import Backend, BackendError
from worker.outcomes import report_outcome

log = logging.getLogger("gateway.worker")


async def run_completion(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """The arq function behind every completion job. Always ends the stream with one terminal event."""
    settings: Settings = ctx["settings"]
    backend: Backend = ctx["backend"]
    redis: Redis = ctx["redis"]
    job = CompletionJob.model_validate(payload)
    logs.bind_new(request_id=job.request_id, job_id=job.id)
    writer = EventWriter(redis, job.id, settings.event_ttl_s)
    started = time.perf_counter()
    outcome = "completed"
    first_output: float | None = None  # for time to first token
    usage: Usage | None = None
    failure: Failed | None = None
    try:
        async with asyncio.timeout(settings.job_timeout_s):
            async for event in backend.stream(job):
                if first_output is None:
                    first_output = time.perf_counter()
                writer.emit(event)
                if isinstance(event, Done):
                    usage = event.usage
                    break
            else:
                raise BackendError(FailureCode.INTERNAL, "the backend ended without a result")
    except BackendError as exc:
        outcome = exc.code.value
        writer.emit(failure := Failed(code=exc.code, message=exc.message))
    except TimeoutError:
        outcome = FailureCode.TIMEOUT.value
        message = f"the job exceeded its time limit of {settings.job_timeout_s:g} s"
        writer.emit(failure := Failed(code=FailureCode.TIMEOUT, message=message))
    except asyncio.CancelledError:
        failure = Failed(code=FailureCode.WORKER_SHUTDOWN, message="the worker stopped during the job")
        writer.emit(failure)
        await asyncio.shield(writer.drain())
        await asyncio.shield(report_outcome(ctx, job, started, first_output, None, failure))
        raise
    except Exception:
        log.exception("job failed unexpectedly", extra={"job_id": job.id, "request_id": job.request_id})
        outcome = FailureCode.INTERNAL.value
        failure = Failed(code=FailureCode.INTERNAL, message="the worker failed while running the job")
        writer.emit(failure)
    await writer.drain()
    await report_outcome(ctx, job, started, first_output, usage, failure)
    log.info(
        "job %s %s in %.0f ms (%d events)",
        job.id,
        outcome,
        (time.perf_counter() - started) * 1000,
        writer.emitted,
        extra={"job_id": job.id, "request_id": job.request_id},
    )
