"""The worker process: an arq worker that wakes on enqueue instead of polling on a timer."""

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import queue, worker_exits
from shared.autopipeline import AutoPipelined
from shared.heap import tune_garbage_collector
from shared.jobstore import Claimed, JobStore
from shared.keys import Channels, is_job_id
from shared.settings import Settings
from shared.worker_exits import ExitReason
from worker.backends import create_backend
from worker.environment import forbid_inspection, forget_environment
from worker.heartbeat import HeartbeatLoop
from worker.leases import RunningJobs
from worker.session_files import SessionFiles
from worker.task import run_completion
from worker.workspace import finish_removals

log = logging.getLogger("gateway.worker")

CLOSE_REPORT_S = 5.0
CLOSE_BOUND_S = 9.0
"""After a signal's drain, how long the rest of the stop may take (the jobs still running
cancelled, the backend's CLIs closed): past `CLOSE_REPORT_S` the worker logs what it still waits
on; past `CLOSE_BOUND_S` it exits anyway (status 1), every thread's stack on stderr, so that a
stuck close never holds up a restart (inside compose's 60 s grace with the default 50 s drain).
Its sandboxed CLIs die with it."""


class GatewayWorker(Worker):
    """arq's worker with its poll sleep replaced by "until woken, or `fallback_s` at most".

    The job store places jobs (shared/jobstore.py): it pushes each new job, claimed, to the worker it
    chose (`Channels.worker_push`), which starts it at once; a job too large to push goes by its
    attempt's id on that worker's own channel (`Channels.worker_wakeup`), and the worker claims it
    (one script). An attempt for no one worker (all busy, a session's turn
    offered to the worker holding its workspace, or from a job store before placement) goes to
    `Channels.wakeup`, where every worker with a free slot tries to claim it and the losers learn
    it in that round trip. A missed wake-up (pub/sub is at-most-once) costs one fallback poll of
    the queue, which is also how a worker that knows no channel of its own gets its jobs.
    """

    def __init__(
        self,
        *,
        redis_url: str,
        settings: Settings,
        redis_settings: RedisSettings,
        worker_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(poll_delay=0, redis_settings=redis_settings, **kwargs)
        self._bounded_close = kwargs.get("handle_signals", True)  # a process of its own
        self.close_deadline: float | None = None  # `time.monotonic()` when a signal's stop runs out
        self._redis_url = redis_url
        self._channels = Channels(redis_settings.database)
        self._fallback_s = settings.poll_fallback_s
        self._wake = asyncio.Event()
        self._turned_away = False  # a job was left queued for want of a slot since the last poll
        self._background_tasks: set[asyncio.Task[None]] = set()
        self._slot_turn = asyncio.Lock()  # when all slots are busy, queued jobs get them in order
        self._slot_freed = asyncio.Event()
        self._claiming = 0  # claims in flight
        # Attempts other workers run: arq keeps them in its queue until they end, and each poll
        # would claim them in vain (a slot and a round trip each, every `fallback_s`).
        self._taken: set[bytes] = set()
        self.heartbeat = HeartbeatLoop(
            redis_url,
            settings,
            slots=self.max_jobs,
            jobs=lambda: [attempt.partition(".")[0] for attempt in self.job_tasks],
            idle=lambda: self.job_counter == 0 and self._claiming == 0,
            worker_id=worker_id,
        )
        self.ctx["heartbeat"] = self.heartbeat
        self._stop_signal: str | None = None
        self.on_stop = self._on_stop  # arq calls it when a signal stops the worker
        if self._bounded_close:  # a hangup (its terminal closed) drains it too, as SIGTERM does
            self._add_signal_handler(signal.SIGHUP, self.handle_sig_wait_for_completion)

    async def close(self) -> None:
        """arq's, but Redis out of reach skips nothing: arq deleted its health-check key first
        (it expires anyway), and the error skipped the backend's shutdown and exited a worker
        stopped by a plain SIGTERM with status 1 and a traceback (an outside probe)."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values())
        with contextlib.suppress(RedisError, OSError):
            await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None

    async def main(self) -> None:
        helpers = [asyncio.create_task(self._listen()), asyncio.create_task(self.heartbeat.run())]
        reason, detail = ExitReason.FINISHED, "the queue is empty (burst mode)"
        try:
            await super().main()
        except asyncio.CancelledError:
            if self._stop_signal is None:
                reason, detail = ExitReason.CANCELLED, "its main loop was cancelled with no signal to stop"
            else:
                reason, detail = ExitReason.SHUTDOWN, self._stop_signal
            raise
        except BaseException as exc:
            reason, detail = ExitReason.ERROR, f"{type(exc).__name__}: {exc}"
            raise
        finally:
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            await self._record_exit(reason, detail)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        self.heartbeat.drain()
        super().handle_sig_wait_for_completion(signum)

    def _on_stop(self, signum: signal.Signals) -> None:
        self._stop_signal = signal.Signals(signum).name
        if (running := self.ctx.get("running")) is not None:
            running.halt_all()  # arq has just cancelled their tasks; the cancellations come next
        if self._bounded_close:
            self.loop.call_later(CLOSE_REPORT_S, self._report_close)
            faulthandler.dump_traceback_later(CLOSE_BOUND_S, exit=True)
            self.close_deadline = time.monotonic() + CLOSE_BOUND_S

    def _report_close(self) -> None:
        tasks = "\n".join(" > ".join(_awaiting(task)) for task in asyncio.all_tasks(self.loop))
        log.error("worker still stopping after %g s; its tasks:\n%s", CLOSE_REPORT_S, tasks)

    async def _record_exit(self, reason: ExitReason, detail: str) -> None:
        """Says why this worker stops, in its log and in Redis (`claude-gateway status`, /metrics)."""
        beat = self.heartbeat
        level = logging.WARNING if reason in (ExitReason.SHUTDOWN, ExitReason.FINISHED) else logging.ERROR
        log.log(level, "worker %s exits: %s (%s)", beat.worker_id, reason.value, detail)
        gone = worker_exits.new_exit(beat.worker_id, beat.host, beat.pid, reason, detail)
        redis = Redis.from_url(self._redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            async with asyncio.timeout(3):
                await worker_exits.record_exit(redis, gone)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not record the worker's exit in Redis (%s)", type(exc).__name__)
        finally:
            await redis.aclose()

    async def _poll_iteration(self) -> None:
        self._wake.clear()
        self._turned_away = False
        try:
            await super()._poll_iteration()
        except RedisError as exc:
            # arq's worker would die here; ride out the outage (running jobs keep their state).
            log.warning("cannot reach Redis to poll the queue (%s); retrying", type(exc).__name__)
            await asyncio.sleep(1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._fallback_s):
                await self._wake.wait()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's `start_jobs` (its queue poll hands it every due attempt)."""
        self._taken.intersection_update(job_ids)  # the others have left the queue: ended
        await self._claim_each(job_ids)

    async def _claim_each(self, job_ids: list[bytes]) -> None:
        """arq's `start_jobs` loop, with the claim and the attempt's start as one script."""
        running: RunningJobs = self.ctx["running"]
        for raw in job_ids:
            job_id, _, attempt = raw.decode().partition(".")
            if (
                not (is_job_id(job_id) and attempt.isdigit())
                or raw.decode() in self.tasks
                or raw in self._taken
            ):
                continue  # not an attempt at a job of ours, or one running (still queued in arq)
            async with self._slot_turn:
                await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                self._turned_away = True
                return
            in_progress_ms = int(self.in_progress_timeout_s * 1000)
            self._claiming += 1
            try:
                claimed = await running.claim(job_id, int(attempt), in_progress_ms)
            except BaseException:  # Redis failed (full, gone): the slot is free again
                self.sem.release()
                raise
            finally:
                self._claiming -= 1
            if not isinstance(claimed, Claimed):
                self.sem.release()
                if claimed == "full":  # a job was pushed here for the slot that freed
                    self._turned_away = True
                    return
                if claimed == "taken":
                    self._taken.add(raw)
                continue
            self._start(raw.decode())

    def _start(self, attempt_id: str) -> None:
        """Runs a claimed attempt in a slot this worker has taken for it."""
        self.job_counter += 1
        task = self.loop.create_task(self._run_attempt(attempt_id))
        task.add_done_callback(partial(self._attempt_done, attempt_id))
        self.tasks[attempt_id] = task

    async def _run_attempt(self, job_id: str) -> None:
        """Runs a claimed attempt, in place of arq's `run_job` (which this worker never calls).

        arq's version starts by fetching the attempt's entry (GET, INCR, EXPIRE) to learn the
        function and its arguments, one more Redis round trip before every job's first token.
        The claim script has already loaded the job and the attempt id names the rest, so this
        runs `run_completion` at once. The attempt's arq keys go as arq's `finish_job` would
        remove them, and the attempt off this worker's load, with its terminal event; an attempt
        that wrote none does it in a round trip of its own. Time limits, retries and results are
        the job store's (arq's `max_tries`, `keep_result` and timeout are not used for attempts
        either way).
        """
        completion, _, attempt = job_id.partition(".")
        task = asyncio.current_task()
        assert task is not None
        self.job_tasks[job_id] = task
        # Nothing a job does may reach arq's main loop, which reads every finished task's result
        # and would close the worker on an exception: its outcome is in the job's event stream.
        finished = False
        try:
            self.heartbeat.poke()
            finished = await run_completion(self.ctx, completion, int(attempt))
            self.jobs_complete += 1
        except asyncio.CancelledError:  # only arq cancels this task, when the worker shuts down
            log.info("attempt %s stopped by the worker's shutdown", job_id)
        except Exception:
            self.jobs_failed += 1
            log.exception("attempt %s failed", job_id)
        finally:
            del self.job_tasks[job_id]
        if finished:
            return
        running: RunningJobs = self.ctx["running"]
        try:
            await asyncio.shield(running.store.finish_attempt(job_id, running.worker_id))
        except (Exception, asyncio.CancelledError) as exc:
            # Its arq keys expire on their own (in-progress mark) or are stale entries claims skip.
            log.warning("could not remove the arq keys of attempt %s (%r)", job_id, exc)

    async def _start_woken(self, attempt_id: bytes, *, chosen: bool) -> None:
        """Starts the attempt a wake-up named, without a trip through the queue's index. One this
        worker was `chosen` to run but takes no more jobs (it is shutting down) goes back to its
        place in the line, for every worker."""
        try:
            if self.allow_pick_jobs:
                await self._claim_each([attempt_id])
            elif chosen:
                job_id, _, attempt = attempt_id.decode().partition(".")
                running: RunningJobs = self.ctx["running"]
                await running.store.decline(job_id, int(attempt), running.worker_id, "routed")
        except RedisError as exc:
            log.warning("cannot reach Redis to start a job (%s); the poll will", type(exc).__name__)

    async def _start_pushed(self, message: bytes) -> None:
        """Starts an attempt the job store claimed for this worker and pushed here with its job, in
        the next free slot (the store counted one free). One this worker will not run (it is
        stopping, or cannot read the job) goes back to every worker."""
        running: RunningJobs = self.ctx["running"]
        self._claiming += 1
        try:
            job_id, attempt, claimed = running.store.pushed(message)
            if claimed is None or not self.allow_pick_jobs:
                await running.store.decline(job_id, attempt, running.worker_id)
                return
            async with self._slot_turn:
                await self.sem.acquire()
                # arq's semaphore has a permit beyond the slots (for its poll): a job pushed for a
                # slot the store counted free (the one an ending job frees) waits for it, so no
                # count gone astray makes this worker run more jobs than it has slots.
                while self.job_counter >= self.max_jobs:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
            running.claimed[job_id] = claimed
            self._start(f"{job_id}.{attempt}")
        except RedisError as exc:  # its lease runs out instead: recovered within LEASE_S
            log.warning("cannot reach Redis to give back a pushed job (%s)", type(exc).__name__)
        finally:
            self._claiming -= 1

    def _attempt_done(self, attempt_id: str, task: "asyncio.Task[None]") -> None:
        self.job_counter -= 1
        self.sem.release()
        self._slot_freed.set()
        if task.cancelled():  # by the shutdown, before it began (it handles every later outcome)
            del self.tasks[attempt_id]  # so arq never reads its result
            job_id, _, attempt = attempt_id.partition(".")
            running: RunningJobs = self.ctx["running"]
            running.claimed.pop(job_id, None)
            log.info("attempt %s stopped before it began; handing it back", attempt_id)
            self._background(self._hand_back(job_id, int(attempt)))
        if self._turned_away:  # a slot is free for a job this worker had no room for
            self._wake.set()
        self.heartbeat.poke()

    async def _hand_back(self, job_id: str, attempt: int) -> None:
        """An attempt stopped before it began goes back to the queue, and off this worker's load
        (its end never ran: the slot stayed counted taken, and claims were refused as full)."""
        running: RunningJobs = self.ctx["running"]
        try:
            await running.hand_back(job_id, attempt)
            await running.store.finish_attempt(f"{job_id}.{attempt}", running.worker_id)
        except RedisError as exc:  # its lease runs out instead: recovered within LEASE_S
            log.warning("could not hand back job %s (%s)", job_id, type(exc).__name__)

    def _background(self, step: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(step)
        self._background_tasks.add(task)  # referenced until done
        task.add_done_callback(self._background_tasks.discard)

    async def _listen(self) -> None:
        """Jobs pushed here, wake-ups (a job was queued, for this worker or any) and cancels (stop
        a job if it runs here)."""
        channels = self._channels
        own = channels.worker_wakeup(self.heartbeat.worker_id)
        pushed = channels.worker_push(self.heartbeat.worker_id)
        cancel = channels.cancel  # built once, not per message
        while True:
            redis = Redis.from_url(self._redis_url)
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(channels.wakeup, cancel, own, pushed)
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        channel = message["channel"].decode()
                        if channel == pushed:
                            self._background(self._start_pushed(message["data"]))
                        elif channel == cancel:
                            self.ctx["running"].cancel(message["data"].decode())
                        elif message["data"]:
                            self._background(self._start_woken(message["data"], chosen=channel == own))
                        else:
                            self._wake.set()
            except (OSError, RedisError) as exc:
                log.warning("lost Redis notifications (%s); polling every %.1f s", exc, self._fallback_s)
                await asyncio.sleep(1)
            finally:
                await redis.aclose()


def _awaiting(task: "asyncio.Task[Any]") -> list[str]:
    """Where a task waits: each coroutine of its chain of awaits (a task's own stack shows only the
    first; the chain stops at an async generator's step, which does not say whose it is)."""
    places: list[str] = []
    step: Any = task.get_coro()
    while step is not None:
        frame = getattr(step, "cr_frame", None) or getattr(step, "gi_frame", None)
        if frame is not None:
            places.append(f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})")
        step = getattr(step, "cr_await", None) or getattr(step, "gi_yieldfrom", None)
    return places


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    await queue.pack_in_c(ctx["redis"])
    # The jobs' steps (claims, appends, results) share round trips with the other jobs' in the
    # same turn; arq's own queue polling keeps its plain client.
    ctx["redis"] = AutoPipelined(ctx["redis"])
    ctx["backend"] = create_backend(settings, ctx["redis"])
    ctx["heartbeat"].sandbox = ctx["backend"].sandbox
    ctx["heartbeat"].poke()
    store = JobStore(
        ctx["redis"],
        queue_name=settings.queue_name,
        ttl_s=settings.event_ttl_s,
        push_lease_s=settings.lease_s,  # a slot that frees takes the line's first job pushed
        failures_kept=settings.recent_failures_kept,
    )
    running = RunningJobs(store, settings, worker_id=ctx["heartbeat"].worker_id)
    ctx["running"] = running
    ctx["maintain"] = asyncio.create_task(running.maintain())
    ctx["session_files"] = SessionFiles(settings, ctx["redis"], running.worker_id)
    ctx["sweep"] = asyncio.create_task(ctx["session_files"].maintain())
    tune_garbage_collector()
    log.info("worker %s ready (backend %s)", running.worker_id, settings.backend)


async def _shutdown(ctx: dict[str, Any]) -> None:
    for name in ("maintain", "sweep"):
        if (task := ctx.get(name)) is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if (files := ctx.get("session_files")) is not None:
        await files.close()
    if (backend := ctx.get("backend")) is not None:
        await backend.close()


def build_worker(
    settings: Settings,
    redis_url: str,
    *,
    worker_id: str | None = None,
    burst: bool = False,
    handle_signals: bool = True,
) -> GatewayWorker:
    return GatewayWorker(
        redis_url=redis_url,
        settings=settings,
        worker_id=worker_id,
        functions=[func(run_completion, name=queue.RUN_COMPLETION)],
        queue_name=settings.queue_name,
        redis_settings=queue.redis_settings(redis_url),
        job_serializer=queue.serialize,
        job_deserializer=queue.deserialize,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings},
        max_jobs=settings.jobs_per_worker,
        # How long arq's in-progress mark on a claimed attempt lasts: past the job's own limits.
        job_timeout=settings.job_timeout_s + 30,
        job_completion_wait=settings.drain_timeout_s,
        burst=burst,
        handle_signals=handle_signals,
    )


def run_worker(settings: Settings, redis_url: str, worker_id: str | None) -> None:
    forget_environment()  # settings are read: nothing in the environment is for the agent's eyes
    forbid_inspection()
    worker = build_worker(settings, redis_url, worker_id=worker_id)
    try:
        worker.run()
    except Exception:  # its reason is logged and recorded already; this is the traceback
        log.exception("worker %s stopped by an error", worker.heartbeat.worker_id)
        sys.exit(1)
    # The job folders' removals finish within the close's bound, and the bound's watchdog is
    # cancelled before the interpreter finalizes: firing then, in the threads' join at exit, it
    # crashed the worker (SIGSEGV, in a CI run under load).
    deadline = worker.close_deadline or time.monotonic() + CLOSE_BOUND_S
    removed = finish_removals(deadline - time.monotonic())
    faulthandler.cancel_dump_traceback_later()
    if not removed:
        log.error("worker %s exits with job folders still being removed", worker.heartbeat.worker_id)
        os._exit(1)  # as the bound's exit; the next worker on the machine removes them
