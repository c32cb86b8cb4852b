"""Per-worker heartbeats in Redis: which workers are alive, and what each is running.

Every worker process refreshes `worker_key(id)` (a JSON `Heartbeat`, with a TTL) every
`HEARTBEAT_INTERVAL_S`; a worker is alive while its key exists, so a killed or partitioned worker
drops out within one TTL without anyone cleaning up. `WORKERS_INDEX` (a sorted set: worker id ->
last beat, Unix seconds) lets readers find the keys without scanning the keyspace; members whose
key has expired are pruned by the next beat of any worker.
"""

import re
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from shared.backend_auth import BackendAuth
from shared.keys import LOAD_FIELDS, PREFIX, WORKER_LOAD

WORKERS_INDEX = f"{PREFIX}:workers"
# A letter or digit first: an id names the worker's folders too, and `..` had named its
# workspace root's parent, which the worker removed at its stop (a re-check probe).
_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Index members silent for this long are dropped: far beyond any TTL, so only the dead go.
_INDEX_RETENTION_S = 3600.0


# KEYS: the worker's key, WORKERS_INDEX, WORKER_LOAD
# ARGV: heartbeat, ttl ms, worker id, beat, index cut-off, slots ('' to leave the load), idle (1/0)
# A beat writes while Redis is full (`maxmemory`, noeviction: a few bytes over the last one): else
# every live worker and the jobs it runs would vanish from status and metrics, and from placement.
_BEAT = """#!lua flags=allow-oom
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('zadd', KEYS[2], ARGV[4], ARGV[3])
redis.call('zremrangebyscore', KEYS[2], '-inf', ARGV[5])
if ARGV[6] ~= '' then
  redis.call('hset', KEYS[3], ARGV[3] .. ':slots', ARGV[6])
  redis.call('hsetnx', KEYS[3], ARGV[3], 0)  -- placement finds workers by this count
  local counts = redis.call('hmget', KEYS[3], ARGV[3], ARGV[3] .. ':routed')
  local seen = (counts[1] or '0') .. ' ' .. (counts[2] or '0')
  if ARGV[7] ~= '1' then
    redis.call('hdel', KEYS[3], ARGV[3] .. ':idle')
  elseif redis.call('hget', KEYS[3], ARGV[3] .. ':idle') == seen then
    redis.call('hset', KEYS[3], ARGV[3], 0, ARGV[3] .. ':routed', 0)
  else
    redis.call('hset', KEYS[3], ARGV[3] .. ':idle', seen)
  end
end
return 0
"""


def worker_key(worker_id: str) -> str:
    if not valid_worker_id(worker_id):
        raise ValueError("malformed worker id")
    return f"{PREFIX}:worker:{worker_id}"


class SandboxReport(BaseModel):
    """Whether a worker runs its jobs in a sandbox (worker/sandbox.py), and why not."""

    model_config = ConfigDict(frozen=True)
    mode: Literal["on", "off"] = Field(description="`SANDBOX`: off only by the operator's choice.")
    ready: bool = Field(description="Jobs run sandboxed; false with mode on: the worker refuses them.")
    reason: str | None = Field(default=None, description="Why no sandbox can be built (or that it is off).")
    bwrap: str | None = None
    limits: dict[str, int | None] = Field(default={}, description="Per-job limits in force (0: none).")
    warnings: list[str] = []


class Heartbeat(BaseModel):
    """What one worker process says about itself on every beat."""

    model_config = ConfigDict(frozen=True)
    id: str
    host: str
    pid: int
    started: float = Field(description="Unix time the worker started.")
    beat: float = Field(description="Unix time of this beat.")
    slots: int = Field(description="Jobs it runs at once (`JOBS_PER_WORKER`).")
    jobs: list[str] = Field(description="Ids of the jobs it is running.")
    backend: str | None = Field(default=None, description="`BACKEND` (None from workers predating it).")
    auth: BackendAuth | None = Field(
        default=None, description="Its backend auth as it checked it for this beat (no secret values)."
    )
    sandbox: SandboxReport | None = Field(
        default=None, description="Its job sandbox (None: the backend runs no CLI, or not yet started)."
    )
    draining: bool = Field(
        default=False, description="It is stopping: it finishes the jobs it runs and takes no other."
    )
    workspace_store: str | None = Field(
        default=None, description="Where it keeps sessions' files (every process must use the same)."
    )

    @property
    def capacity(self) -> int:
        """Jobs it can run at once now: a draining worker only those it runs."""
        return len(self.jobs) if self.draining else self.slots


async def beat(
    redis: Redis, heartbeat: Heartbeat, ttl_s: float, *, load: bool = False, idle: bool = False
) -> None:
    """Refreshes the worker's heartbeat; with `load`, also its slots in `WORKER_LOAD`, and when
    `idle` (it runs no job and is claiming none) at two beats in a row with the same counts there
    (the jobs it runs and the queued ones it was chosen for), resets them to 0. The job store's
    scripts keep them between beats; what they count while the worker is idle for a whole beat is
    drift (a push lost with a connection, a step lost to an error, a job a worker of an earlier
    version took or stopped). A job placed after the worker found itself idle, and before the beat
    ran, is no drift: the counts changed (a reset on one idle beat wiped such jobs, and the worker
    was then counted a free slot it did not have: a re-check probe saw it run 3 jobs on 2 slots)."""
    keys = [worker_key(heartbeat.id), WORKERS_INDEX, WORKER_LOAD]
    args: list[str | int | float] = [heartbeat.model_dump_json(), int(ttl_s * 1000), heartbeat.id]
    slots = 0 if heartbeat.draining else heartbeat.slots  # placement gives a draining worker nothing
    args += [heartbeat.beat, heartbeat.beat - _INDEX_RETENTION_S, slots if load else "", int(idle)]
    await redis.register_script(_BEAT)(keys=keys, args=args)


async def claim(redis: Redis, worker_id: str, ttl_s: float) -> bool:
    """Takes `worker_id` for a starting worker until its first beat (within `ttl_s`); False if a
    live worker has it. At once: two workers started together with one id had both checked it
    free (a re-check probe). Not in the index until that beat, so no reader sees the placeholder."""
    return bool(await redis.set(worker_key(worker_id), "starting", nx=True, px=int(ttl_s * 1000)))


async def retire(redis: Redis, worker_id: str) -> None:
    """A worker stopping cleanly leaves at once instead of when its heartbeat expires."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(worker_key(worker_id))
        pipe.zrem(WORKERS_INDEX, worker_id)
        pipe.hdel(WORKER_LOAD, *(worker_id + field for field in LOAD_FIELDS))
        await pipe.execute()


async def alive_workers(redis: Redis) -> list[Heartbeat]:
    """The workers whose heartbeat has not expired, oldest first."""
    ids = [m.decode() if isinstance(m, bytes) else m for m in await redis.zrange(WORKERS_INDEX, 0, -1)]
    ids = [i for i in ids if valid_worker_id(i)]
    if not ids:
        return []
    records = await redis.mget([worker_key(i) for i in ids])
    beats = [Heartbeat.model_validate_json(raw) for raw in records if raw]
    return sorted(beats, key=lambda b: (b.started, b.id))


def new_worker_id(host: str) -> str:
    """Readable and unique: the host and a random part. Workers in pid namespaces of one host
    (containers on the host's network) share host names and pids, and may start in one second:
    ids of host, pid and start time had named two of them alike (an outside probe)."""
    safe_host = re.sub(r"[^A-Za-z0-9.-]", "-", host).lstrip(".-")[:64] or "host"
    return f"{safe_host}-{secrets.token_hex(4)}"


def valid_worker_id(worker_id: str) -> bool:
    return _WORKER_ID.fullmatch(worker_id) is not None
