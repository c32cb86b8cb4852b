"""The jobs one worker runs: their leases, and stopping them from outside.

A running job holds a lease in Redis (`keys.RUNNING`) that this worker renews every
`lease_renew_s`. A worker that dies stops renewing; within `lease_s` any other worker's sweep
finds the lease expired and retries the job (if it produced nothing) or fails it. Renewing is
also how a worker learns that a job was cancelled (when the pub/sub notice was missed) or that
the job moved on without this attempt.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from redis.exceptions import RedisError

from shared.jobstore import Claimed, JobStore
from shared.settings import Settings

log = logging.getLogger("gateway.worker")


class StopReason(Enum):
    SHUTDOWN = "shutdown"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"


@dataclass
class RunningJob:
    job_id: str
    attempt: int
    task: "asyncio.Task[object]"
    reason: StopReason | None = None
    """Why we stopped the task; a task cancelled without one is the worker shutting down."""
    producing: bool = True
    """Until the attempt's outcome is decided; only then may a stop cancel its task."""
    halt: Callable[[], None] = lambda: None
    """Ends what the job runs outside the worker's loop (its CLI) before its task is cancelled."""

    def settle(self) -> None:
        """The attempt's outcome is decided: nothing stops it any more. Its lease is still renewed
        until it is removed: its terminal event may wait for room in a full Redis for long."""
        self.producing = False

    def stop(self, reason: StopReason) -> None:
        # The first stop wins, and none reaches the attempt's finishing steps: a task cancelled
        # there (a renewal finding the job ended by its own terminal event, a late cancel) would
        # end with a CancelledError that nothing of the attempt's is left to handle.
        if self.producing and self.reason is None:
            self.reason = reason
            self.halt()
            self.task.cancel()


@dataclass
class RunningJobs:
    store: JobStore
    settings: Settings
    worker_id: str
    jobs: dict[str, RunningJob] = field(default_factory=dict)
    claimed: dict[str, Claimed] = field(default_factory=dict)

    async def claim(
        self, job_id: str, attempt: int, in_progress_ms: int
    ) -> Claimed | Literal["taken", "full"] | None:
        """Claims a queued attempt for this worker; `run_completion` then takes it from `claimed`."""
        claimed = await self.store.claim(
            job_id,
            attempt,
            worker_id=self.worker_id,
            in_progress_ms=in_progress_ms,
            lease_s=self.settings.lease_s,
        )
        if isinstance(claimed, Claimed):
            self.claimed[job_id] = claimed
        return claimed

    def add(self, job_id: str, attempt: int, halt: Callable[[], None] = lambda: None) -> RunningJob:
        """The attempt the current task runs; `halt`: see `RunningJob.halt`."""
        task = asyncio.current_task()
        assert task is not None
        job = self.jobs[job_id] = RunningJob(job_id, attempt, task, halt=halt)
        return job

    def remove(self, job: RunningJob) -> None:
        """The attempt is over: its lease is not renewed any more."""
        job.producing = False
        if self.jobs.get(job.job_id) is job:  # not a later attempt at the same job
            del self.jobs[job.job_id]

    def halt_all(self) -> None:
        """The worker stops, and arq is cancelling the jobs' tasks: ends what each runs outside the
        loop first (`RunningJob.halt`), or its cancellation waits on a CLI still streaming."""
        for job in self.jobs.values():
            if job.producing:
                job.halt()

    def cancel(self, job_id: str) -> None:
        """A caller cancelled the job; stop it if it runs here."""
        if (job := self.jobs.get(job_id)) is not None:
            job.stop(StopReason.CANCELLED)

    async def hand_back(self, job_id: str, attempt: int) -> None:
        """Gives up an attempt that produced nothing, so another worker runs the job now."""
        await self.store.expire_lease(job_id, attempt)
        await self.store.recover_expired(self.settings.max_attempts, self.settings.lease_s)

    async def maintain(self) -> None:
        """Renews this worker's leases and recovers expired ones, every `lease_renew_s`."""
        while True:
            await asyncio.sleep(self.settings.lease_renew_s)
            try:
                await self._renew_all()
                for job_id, outcome in await self.store.recover_expired(
                    self.settings.max_attempts, self.settings.lease_s
                ):
                    log.warning("job %s lost its worker: %s", job_id, outcome, extra={"job_id": job_id})
                for job_id in await self.store.withdraw_due():
                    log.warning("job %s was never started: withdrawn", job_id, extra={"job_id": job_id})
            except RedisError as exc:
                log.warning("cannot reach Redis to renew leases (%s); retrying", type(exc).__name__)
            except Exception:  # never stop renewing: every running job would be recovered as lost
                log.exception("renewing leases failed; retrying")

    async def _renew_all(self) -> None:
        for job in list(self.jobs.values()):
            state = await self.store.renew(job.job_id, job.attempt, self.settings.lease_s)
            if state == "cancel":
                job.stop(StopReason.CANCELLED)
            elif state == "superseded":
                job.stop(StopReason.SUPERSEDED)
