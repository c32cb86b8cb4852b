"""Why workers stopped: every exit a worker (or `claude-gateway up`, for one killed outright) sees.

Each exit adds to the `worker_exits|<reason>` counter of the shared totals (shared/stats.py,
`gateway_worker_exits_total` in /metrics) and to `EXITS_KEY`, a capped stream that
`claude-gateway status` and `/status` show as "recent worker exits". Reasons are a small fixed
set, so they can label a metric; the detail says the rest (an exception, a signal, a status).
"""

import time
from enum import StrEnum

from pydantic import BaseModel
from redis.asyncio import Redis

from shared.keys import PREFIX
from shared.stats import STATS_KEY

EXITS_KEY = f"{PREFIX}:worker-exits"
EXITS_KEPT = 100
_DETAIL_CHARS = 300


class ExitReason(StrEnum):
    SHUTDOWN = "shutdown"  # a signal asked it to stop (SIGTERM, SIGINT)
    ERROR = "error"  # an exception ended its main loop
    CANCELLED = "cancelled"  # its main loop was cancelled with no signal to stop
    FINISHED = "finished"  # burst mode: the queue was empty
    KILLED = "killed"  # seen by `up`: ended by a signal it could not handle (SIGKILL, OOM, crash)


class WorkerExit(BaseModel):
    worker_id: str
    host: str
    pid: int
    reason: ExitReason
    detail: str
    at: float


async def record_exit(redis: Redis, worker_exit: WorkerExit) -> None:
    entry = worker_exit.model_copy(update={"detail": worker_exit.detail[:_DETAIL_CHARS]})
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(STATS_KEY, f"worker_exits|{entry.reason.value}", 1)
        fields = {k: str(v) for k, v in entry.model_dump(mode="json").items()}
        pipe.xadd(EXITS_KEY, fields, maxlen=EXITS_KEPT, approximate=True)  # type: ignore[arg-type]
        await pipe.execute()


async def recent_exits(redis: Redis, count: int) -> list[WorkerExit]:
    """The latest worker exits, newest first."""
    entries = await redis.xrevrange(EXITS_KEY, count=count)
    return [
        WorkerExit.model_validate({k.decode(): v.decode() for k, v in fields.items()})
        for _id, fields in entries
    ]


def new_exit(worker_id: str, host: str, pid: int, reason: ExitReason, detail: str) -> WorkerExit:
    return WorkerExit(worker_id=worker_id, host=host, pid=pid, reason=reason, detail=detail, at=time.time())
