"""Job outcomes that workers record in Redis, so every API process reports the same totals.

Each finished job adds to one hash, `STATS_KEY` (counters, and histograms as per-bucket counts
plus sum and count), and a failed one also to `FAILURES_KEY`, a capped stream that `status` shows
as "recent failures": `ADD_OUTCOME`, run by the script that writes the job's terminal event
(shared/jobstore.py), so it costs no round trip of its own; `ADD_ENDED` for a job the job store
ends without a worker. Nothing here runs per token.

Hash fields: `jobs|<outcome>`, `worker_exits|<reason>` (shared/worker_exits.py), `tokens|prompt`,
`tokens|completion`, `cost_usd`, and for each histogram `<name>|le|<bound>` (observations in that
bucket only; `read_stats` accumulates them), `<name>|sum` and `<name>|count`.
"""

import json
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel
from redis.asyncio import Redis

from shared.jobs import Failed, Usage
from shared.keys import PREFIX

STATS_KEY = f"{PREFIX}:stats"
FAILURES_KEY = f"{PREFIX}:failures"

HISTOGRAMS: dict[str, tuple[float, ...]] = {
    # enqueue -> a worker starts the job
    "queue_wait_seconds": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    # enqueue -> the backend's first output (what a streaming client waits for)
    "time_to_first_token_seconds": (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120),
    # a worker starts the job -> its terminal event is written
    "job_duration_seconds": (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
}


@dataclass(frozen=True)
class JobRecord:
    """How one job went, as its worker saw it."""

    job_id: str
    request_id: str
    worker_id: str
    outcome: str  # "completed", or the `FailureCode` it failed with
    queue_wait_s: float
    duration_s: float
    first_token_s: float | None = None  # from enqueue; None when the backend produced nothing
    usage: Usage | None = None
    failure: Failed | None = None


# Lua: `add_outcome(encoded)` adds one job's outcome (`encode_outcome`) to the totals. The
# amounts are strings: one with a point is a float field.
ADD_OUTCOME = f"""
local function add_outcome(encoded)
  local outcome = cjson.decode(encoded)
  local add = outcome['add']
  for i = 1, #add, 2 do
    if string.find(add[i + 1], '.', 1, true) then
      redis.call('hincrbyfloat', '{STATS_KEY}', add[i], add[i + 1])
    else
      redis.call('hincrby', '{STATS_KEY}', add[i], add[i + 1])
    end
  end
  if outcome['failure'] then
    redis.call('xadd', '{FAILURES_KEY}', 'MAXLEN', '~', outcome['kept'], '*', unpack(outcome['failure']))
  end
end
"""


# Lua: `add_ended(record, job_id, event, outcome, kept)` counts a job the job store ended itself,
# without a worker (withdrawn from the queue, cancelled before it started, its worker lost), as
# `add_outcome` counts a worker's: its outcome in the totals, its failure (`event`, the terminal
# event as written) among the recent ones, with the request and worker its record names.
ADD_ENDED = f"""
local function add_ended(record, job_id, event, outcome, kept)
  redis.call('hincrby', '{STATS_KEY}', 'jobs|' .. outcome, 1)
  local failure = cjson.decode(event)
  local rec = redis.call('hmget', record, 'request_id', 'worker')
  local t = redis.call('TIME')
  redis.call('xadd', '{FAILURES_KEY}', 'MAXLEN', '~', kept, '*', 'job_id', job_id, 'request_id', rec[1] or '',
    'worker_id', rec[2] or '', 'code', failure['code'], 'message', failure['message'],
    'at', string.format('%d.%06d', t[1], t[2]))
end
"""


def _bucket(bounds: tuple[float, ...], value: float) -> str:
    for bound in bounds:
        if value <= bound:
            return repr(float(bound))
    return "+Inf"


def encode_outcome(record: JobRecord, *, failures_kept: int) -> str:
    """`record` as `ADD_OUTCOME` takes it: the amounts to add, and a failure's entry."""
    observations = {
        "queue_wait_seconds": record.queue_wait_s,
        "time_to_first_token_seconds": record.first_token_s,
        "job_duration_seconds": record.duration_s,
    }
    added: dict[str, int | float] = {f"jobs|{record.outcome}": 1}
    for name, value in observations.items():
        if value is None:
            continue
        value = max(0.0, value)
        added[f"{name}|le|{_bucket(HISTOGRAMS[name], value)}"] = 1
        added[f"{name}|sum"] = value
        added[f"{name}|count"] = 1
    if record.usage is not None:
        added["tokens|prompt"] = record.usage.prompt_tokens
        added["tokens|completion"] = record.usage.completion_tokens
        if record.usage.cost_usd:
            added["cost_usd"] = record.usage.cost_usd
    outcome: dict[str, object] = {
        "add": [part for field, amount in added.items() for part in (field, _amount(amount))]
    }
    if record.failure is not None:
        entry = {
            "job_id": record.job_id,
            "request_id": record.request_id,
            "worker_id": record.worker_id,
            "code": record.failure.code.value,
            "message": record.failure.message[:300],
            "at": repr(time.time()),
        }
        outcome["failure"] = [part for item in entry.items() for part in item]
        outcome["kept"] = failures_kept
    return json.dumps(outcome)


def _amount(amount: int | float) -> str:
    """An integer's digits; a float with a point (`repr` may give "1e-05", which has none)."""
    return str(amount) if isinstance(amount, int) else f"{amount:.17f}"


class Histogram(BaseModel):
    # (upper bound, cumulative count); the last bound is +Inf, written as the string "+Inf"
    # (as Prometheus does) because JSON has no infinity.
    buckets: list[tuple[float | Literal["+Inf"], int]]
    sum: float
    count: int


class Stats(BaseModel):
    jobs: dict[str, int]  # outcome -> jobs
    worker_exits: dict[str, int] = {}  # reason -> exits (shared/worker_exits.py)
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    histograms: dict[str, Histogram]


class RecentFailure(BaseModel):
    job_id: str
    request_id: str
    worker_id: str
    code: str
    message: str
    at: float


async def read_stats(redis: Redis) -> Stats:
    fields: dict[bytes, bytes] = await redis.hgetall(STATS_KEY)  # type: ignore[misc]
    raw = {k.decode(): v.decode() for k, v in fields.items()}
    histograms: dict[str, Histogram] = {}
    for name, bounds in HISTOGRAMS.items():
        cumulative = 0
        buckets: list[tuple[float | Literal["+Inf"], int]] = []
        for bound in bounds:
            cumulative += int(raw.get(f"{name}|le|{float(bound)!r}", 0))
            buckets.append((float(bound), cumulative))
        buckets.append(("+Inf", cumulative + int(raw.get(f"{name}|le|+Inf", 0))))
        histograms[name] = Histogram(
            buckets=buckets, sum=float(raw.get(f"{name}|sum", 0)), count=int(raw.get(f"{name}|count", 0))
        )
    return Stats(
        jobs={k.removeprefix("jobs|"): int(v) for k, v in raw.items() if k.startswith("jobs|")},
        worker_exits={
            k.removeprefix("worker_exits|"): int(v) for k, v in raw.items() if k.startswith("worker_exits|")
        },
        prompt_tokens=int(raw.get("tokens|prompt", 0)),
        completion_tokens=int(raw.get("tokens|completion", 0)),
        cost_usd=float(raw.get("cost_usd", 0)),
        histograms=histograms,
    )


async def recent_failures(redis: Redis, count: int) -> list[RecentFailure]:
    """The latest failed jobs, newest first."""
    entries = await redis.xrevrange(FAILURES_KEY, count=count)
    return [
        RecentFailure.model_validate({k.decode(): v.decode() for k, v in fields.items()})
        for _id, fields in entries
    ]
