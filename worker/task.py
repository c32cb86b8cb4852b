"""Runs one completion job: backend output in, the job's event stream out."""

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import sessions
from shared.events import EventWriter, streamed_text
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
    terminal: Done | Failed
    try:
        async with asyncio.timeout(settings.job_timeout_s):
            async for event in backend.stream(job):
                if isinstance(event, Done):
                    terminal = event
                    break
                writer.emit(event)
            else:
                raise BackendError(FailureCode.INTERNAL, "the backend ended without a result")
    except BackendError as exc:
        terminal = Failed(code=exc.code, message=exc.message)
    except TimeoutError:
        message = f"the job exceeded its time limit of {settings.job_timeout_s:g} s"
        terminal = Failed(code=FailureCode.TIMEOUT, message=message)
    except asyncio.CancelledError:
        failed = Failed(code=FailureCode.WORKER_SHUTDOWN, message="the worker stopped during the job")
        await asyncio.shield(_settle_session(redis, settings, job, writer, failed))
        writer.emit(failed)
        await asyncio.shield(writer.drain())
        raise
    except Exception:
        log.exception("job failed unexpectedly", extra={"job_id": job.id, "request_id": job.request_id})
        terminal = Failed(code=FailureCode.INTERNAL, message="the worker failed while running the job")
    terminal = await _settle_session(redis, settings, job, writer, terminal)
    writer.emit(terminal)
    await writer.drain()
    log.info(
        "job %s %s in %.0f ms (%d events)",
        job.id,
        "completed" if isinstance(terminal, Done) else terminal.code.value,
        (time.perf_counter() - started) * 1000,
        writer.emitted,
        extra={"job_id": job.id, "request_id": job.request_id},
    )


async def _settle_session(
    redis: Redis, settings: Settings, job: CompletionJob, writer: EventWriter, terminal: Done | Failed
) -> Done | Failed:
    """Before the terminal event goes out (so the client's next turn finds the session free):
    a completed job's turns join its session; a failed one leaves the session as it was."""
    if job.session is None:
        return terminal
    if isinstance(terminal, Failed):
        await sessions.release(redis, job.session.owner, job.session.id, job.id)
        return terminal
    await writer.drain()
    try:
        await sessions.commit(redis, job, await streamed_text(redis, job.id), settings.session_ttl_s)
    except sessions.SessionLost:
        message = "The session was deleted or expired while the job ran; this reply was not added to it."
        return Failed(code=FailureCode.INTERNAL, message=message)
    except RedisError:
        # Still report the job's end if Redis answers at all (a script error, say) rather than
        # leave the caller waiting; the lock, if it survived, times out.
        log.exception("could not commit a session turn", extra={"job_id": job.id})
        return Failed(code=FailureCode.INTERNAL, message="The reply could not be added to the session.")
    return terminal
