"""Runs one completion job: backend output in, the job's event stream out."""

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis

from shared import quotas
from shared.events import EventWriter
from shared.jobs import CompletionJob, Done, Failed, FailureCode
from shared.settings import Settings
from worker.backends import Backend, BackendError

log = logging.getLogger("gateway.worker")


async def run_completion(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """The arq function behind every completion job. Always ends the stream with one terminal event."""
    settings: Settings = ctx["settings"]
    backend: Backend = ctx["backend"]
    redis: Redis = ctx["redis"]
    job = CompletionJob.model_validate(payload)
    writer = EventWriter(redis, job.id, settings.event_ttl_s)
    started = time.perf_counter()
    outcome = "completed"
    try:
        async with asyncio.timeout(settings.job_timeout_s):
            async for event in backend.stream(job):
                writer.emit(event)
                if isinstance(event, Done):
                    break
            else:
                raise BackendError(FailureCode.INTERNAL, "the backend ended without a result")
    except BackendError as exc:
        outcome = exc.code.value
        writer.emit(Failed(code=exc.code, message=exc.message))
    except TimeoutError:
        outcome = FailureCode.TIMEOUT.value
        message = f"the job exceeded its time limit of {settings.job_timeout_s:g} s"
        writer.emit(Failed(code=FailureCode.TIMEOUT, message=message))
    except asyncio.CancelledError:
        writer.emit(Failed(code=FailureCode.WORKER_SHUTDOWN, message="the worker stopped during the job"))
        await asyncio.shield(writer.drain())
        await asyncio.shield(quotas.release_job_slot(redis, job.id))
        raise
    except Exception:
        log.exception("job failed unexpectedly", extra={"job_id": job.id, "request_id": job.request_id})
        outcome = FailureCode.INTERNAL.value
        writer.emit(Failed(code=FailureCode.INTERNAL, message="the worker failed while running the job"))
    # Freed before the terminal event is flushed, so a caller who saw it can start its next job.
    await quotas.release_job_slot(redis, job.id)
    await writer.drain()
    log.info(
        "job %s %s in %.0f ms (%d events)",
        job.id,
        outcome,
        (time.perf_counter() - started) * 1000,
        writer.emitted,
        extra={"job_id": job.id, "request_id": job.request_id},
    )
