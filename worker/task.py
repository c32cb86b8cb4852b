"""Runs one attempt at a job: backend output in, the job's event stream out.

Every attempt ends the stream with one terminal event, unless the job moved on without it:
- cancelled by the caller: `Failed(cancelled)`;
- over its wall-clock or stall limit: `Failed(timeout | stalled)`;
- the worker shutting down: a job that has produced nothing is handed back to the queue for
  another worker, one that has output ends with `Failed(worker_shutdown)`;
- superseded (its lease was lost and the job retried or failed elsewhere): nothing more is written.
"""

import asyncio
import contextlib
import logging
import time
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import logs, sessions
from shared.events import EventWriter, Superseded, streamed_text
from shared.jobs import CompletionJob, Delta, Done, Failed, FailureCode
from shared.jobstore import CANCELLED, AttemptEnd
from shared.settings import Settings
from shared.transcripts import delete_transcript
from worker.backends import (
    Backend,
    BackendError,
    MessageBreak,
    Progress,
    TurnWrites,
    UsageReport,
    output_room,
    stored_chars,
)
from worker.leases import RunningJobs, StopReason
from worker.outcomes import outcome_record
from worker.session_files import SessionFiles, SessionTurn
from worker.stops import stop_at

log = logging.getLogger("gateway.worker")


async def run_completion(ctx: dict[str, Any], job_id: str, attempt: int) -> bool:
    """The arq function behind every attempt at a completion job. True if the attempt wrote the
    job's terminal event, which also finished the attempt and recorded its outcome (`AttemptEnd`)."""
    settings: Settings = ctx["settings"]
    running: RunningJobs = ctx["running"]
    started = running.claimed.pop(job_id, None)
    if started is None:  # not claimed through `GatewayWorker.start_jobs`: not ours to run
        log.warning("job %s attempt %d ran without a claim; skipped", job_id, attempt)
        return False
    job = started.job
    logs.bind_new(request_id=job.request_id, job_id=job.id)
    writer = EventWriter(
        running.store,
        job.id,
        attempt,
        outage_grace_s=settings.redis_outage_grace_s,
        full_grace_s=settings.job_timeout_s,
        end_grace_s=settings.event_ttl_s,  # past it, the job's record is gone anyway
    )
    backend: Backend = ctx["backend"]
    control = running.add(job.id, attempt, halt=partial(backend.stop, job.id))
    began = time.perf_counter()
    finished = False
    outcome = "superseded"
    terminal: Done | Failed | None = None
    stopped = False
    try:
        try:
            if started.cancelled is not None:  # while its previous attempt's worker was lost
                terminal = started.cancelled
            else:
                files = ctx["session_files"]
                terminal = await _produce(backend, settings, job, writer, ctx["redis"], files)
        except asyncio.CancelledError:
            stopped = True
        finally:
            control.settle()  # the outcome is decided: only the process ending stops it now
        if stopped:
            terminal = await _stopped(control.reason or StopReason.SHUTDOWN, running, job.id, attempt, writer)
            outcome = "handed back" if terminal is None and control.reason is None else outcome
        if terminal is not None:
            if isinstance(terminal, Done):
                terminal = terminal.model_copy(update={"completed_at": int(time.time())})

            async def end(terminal: Done | Failed) -> None:
                usage = terminal.usage if isinstance(terminal, Done) else None
                failure = terminal if isinstance(terminal, Failed) else None
                first_output = writer.first_output_at  # None if the terminal event is all it wrote
                record = outcome_record(
                    job, running.worker_id, started.score, began, first_output, usage, failure
                )
                writer.finish(terminal, AttemptEnd(running.worker_id, record, settings.recent_failures_kept))
                await asyncio.shield(writer.drain())

            try:
                await end(terminal)
            except OutOfMemoryError:  # its output found no room: its end goes alone, a failure
                terminal = terminal if isinstance(terminal, Failed) else _no_room(settings)
                await end(terminal)
            finished = True
            outcome = "completed" if isinstance(terminal, Done) else terminal.code.value
    except Superseded:
        outcome = "superseded"
    finally:
        running.remove(control)
        log.info(
            "job %s attempt %d %s in %.0f ms (%d events)",
            job.id,
            attempt,
            outcome,
            (time.perf_counter() - began) * 1000,
            writer.emitted,
        )
    return finished


async def _produce(
    backend: Backend,
    settings: Settings,
    job: CompletionJob,
    writer: EventWriter,
    redis: Redis,
    files: SessionFiles,
) -> Done | Failed:
    """Runs the job (a session's in its restored workspace) and commits a session's completed
    turn with the files it left; returns the terminal event."""
    deferred: TurnWrites = []
    try:
        async with files.turn(job) as turn:
            terminal = await _run(backend, settings, job, writer, turn.work if turn else None, deferred)
            if isinstance(terminal, Done) and job.session is not None:
                terminal = await _commit_turn(redis, settings, job, writer, terminal, turn, deferred)
    except BackendError as exc:  # the session's files could not be restored
        return Failed(code=exc.code, message=exc.message)
    return terminal


async def _run(
    backend: Backend,
    settings: Settings,
    job: CompletionJob,
    writer: EventWriter,
    work: Path | None,
    deferred: TurnWrites,
) -> Done | Failed:
    """Streams the backend into the writer within the job's time limits; returns the terminal
    event, with the backend closed (its CLI stopped), so what it left in `work` is final."""
    loop = asyncio.get_running_loop()
    stall = asyncio.timeout(settings.stall_timeout_s)
    rescheduled, step = loop.time(), min(1.0, settings.stall_timeout_s / 10)
    # Bounded whatever the backend says: a job's tools can write to its CLI's own pipes (they run
    # as the CLI's user), and so make it report any output at no cost in tokens (an outside probe
    # put 180 MB in Redis from one job).
    room = limit = output_room(settings, job)
    terminal: Done | Failed
    try:
        run = aclosing(backend.stream(job, work, deferred))
        async with asyncio.timeout(settings.job_timeout_s), stall, run as events:
            async for event in stop_at(events, job.stop) if job.stop else events:
                # Push the stall limit back at most every `step` (≤ 1 s): rescheduling costs a
                # timer per event (~3.5 µs, a third of a token's cost here). The deadline gets
                # one step of slack, so the limit is never shorter than set, at most a step longer.
                if (now := loop.time()) - rescheduled >= step:
                    stall.reschedule(now + step + settings.stall_timeout_s)
                    rescheduled = now
                if isinstance(event, UsageReport):
                    writer.prompt(event.usage)
                    continue
                if isinstance(event, Progress):
                    continue
                if isinstance(event, MessageBreak):
                    event = Delta(text=event.text)
                room -= stored_chars(event)
                if room < 0:
                    share = "" if job.n == 1 else f" shared by {job.n} choices: {limit:,} each"
                    raise BackendError(
                        FailureCode.OUTPUT_TOO_LARGE,
                        f"the job's output passed JOB_MAX_OUTPUT_CHARS ({settings.job_max_output_chars:,} "
                        f"characters{share})",
                    )
                if isinstance(event, Done):
                    terminal = event
                    break
                writer.emit(event)
            else:
                raise BackendError(FailureCode.INTERNAL, "the backend ended without a result")
    except BackendError as exc:
        terminal = Failed(code=exc.code, message=exc.message)
    except TimeoutError:
        if stall.expired():
            message = f"the job produced nothing for {settings.stall_timeout_s:g} s"
            terminal = Failed(code=FailureCode.STALLED, message=message)
        else:
            message = f"the job exceeded its time limit of {settings.job_timeout_s:g} s"
            terminal = Failed(code=FailureCode.TIMEOUT, message=message)
    except Superseded:
        raise
    except (RedisConnectionError, RedisTimeoutError):  # a write gave up: Redis is gone past the grace
        terminal = _redis_out_of_reach(settings)
    except OutOfMemoryError:  # a write found no room for as long as the job may run
        terminal = _no_room(settings)
    except Exception:
        log.exception("job failed unexpectedly")
        terminal = Failed(code=FailureCode.INTERNAL, message="the worker failed while running the job")
    return terminal


async def _commit_turn(
    redis: Redis,
    settings: Settings,
    job: CompletionJob,
    writer: EventWriter,
    done: Done,
    turn: SessionTurn | None,
    deferred: TurnWrites,
) -> Done | Failed:
    """Adds a completed job's turn to its session: its files first, then what the backend
    `deferred` (Claude Code's transcript), then its history, so a turn refused on the way (over
    the workspace limits) leaves the session as it was; all before the terminal event goes out
    (so the client's next turn finds the session free). A job that ends any other way commits
    nothing: the step that ends it frees the session's lock (shared/jobstore.py)."""
    session = job.session
    assert session is not None
    try:
        await writer.drain()
        saved = await turn.save() if turn is not None else None
    except (RedisConnectionError, RedisTimeoutError):  # the reply's last writes gave up on Redis
        return _redis_out_of_reach(settings, _TURN_NOT_ADDED)
    except OutOfMemoryError:
        return _no_room(settings, _TURN_NOT_ADDED)
    except BackendError as exc:  # over the workspace limits, or the store failed
        return Failed(code=exc.code, message=exc.message)
    holder = turn.holder if turn is not None else None
    wrote = committed = False
    try:
        for write in deferred:
            wrote = True
            await write()
        reply = await streamed_text(redis, job.id)
        await sessions.commit(redis, job, reply, settings.session_ttl_s, workspace=saved, holder=holder)
        committed = True
    except sessions.SessionLost:
        message = "The session was deleted or expired while the job ran; this reply was not added to it."
        return Failed(code=FailureCode.INTERNAL, message=message)
    except OutOfMemoryError:  # Redis full: it refused the writes, nothing is half-written
        message = "The gateway's storage is full: the reply could not be added to the session; retry later."
        return Failed(code=FailureCode.STORAGE_FULL, message=message)
    except (RedisConnectionError, RedisTimeoutError):
        return _redis_out_of_reach(settings, _TURN_NOT_ADDED)
    except RedisError:
        log.exception("could not commit a session turn")
        return Failed(code=FailureCode.INTERNAL, message="The reply could not be added to the session.")
    finally:
        if wrote and not committed:  # failed, or cancelled on the way (a re-check probe's concern)
            # A transcript with a turn the history lacks: deleted, the next turn starts one anew.
            with contextlib.suppress(RedisError):
                await asyncio.shield(delete_transcript(redis, session.owner, session.transcript_id))
    if turn is not None:
        turn.collect_garbage()
    return done


_TURN_NOT_ADDED = ": the reply was not added to the session; send the turn again"


def _redis_out_of_reach(settings: Settings, outcome: str = "") -> Failed:
    """A job's end when Redis stayed away past the grace (its end is written once Redis is back)."""
    message = f"the gateway's Redis was out of reach for over {settings.redis_outage_grace_s:g} s{outcome}"
    log.warning("job stopped: %s", message)
    return Failed(code=FailureCode.QUEUE_UNAVAILABLE, message=message)


def _no_room(settings: Settings, outcome: str = "") -> Failed:
    """A job's end when its output found Redis full for as long as the job may run: the output
    not stored is lost, and the end is written in the room Redis keeps for bookkeeping."""
    message = (
        f"The gateway's storage is full: the job's output found no room for {settings.job_timeout_s:g} s"
        f"{outcome or '; retry later'}."
    )
    log.warning("job stopped: %s", message)
    return Failed(code=FailureCode.STORAGE_FULL, message=message)


async def _stopped(
    reason: StopReason, running: RunningJobs, job_id: str, attempt: int, writer: EventWriter
) -> Failed | None:
    """The terminal event of an attempt stopped from outside, or None if it writes none."""
    if reason is StopReason.SUPERSEDED:
        return None
    if reason is StopReason.SHUTDOWN and writer.emitted == 0:
        await asyncio.shield(running.hand_back(job_id, attempt))
        return None
    if reason is StopReason.CANCELLED:  # saying why, as its canceller did (a key's revoke)
        try:
            return await asyncio.shield(running.store.cancellation(job_id)) or CANCELLED
        except RedisError:  # the end's write waits for Redis; the reason is not worth that wait
            return CANCELLED
    return Failed(code=FailureCode.WORKER_SHUTDOWN, message="The worker stopped during the job.")
