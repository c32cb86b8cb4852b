"""Every Redis key and channel the gateway owns, as pure functions of validated ids.

arq keeps its own keys (`arq:job:<id>`, `arq:in-progress:<id>`, ...) next to these; the queue
itself is the sorted set named by `Settings.queue_name`. Each attempt at a job is its own arq job,
`<job id>.<attempt>`, so arq runs every attempt at most once and a retry never inherits arq state.
"""

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import quote

from redis.asyncio import Redis

PREFIX = "gateway"
WORKER_LOAD = f"{PREFIX}:workers:load"
"""Hash: worker id -> jobs it runs (kept by the claim and the end of each attempt, reset by a
heartbeat when it is drift), `<worker id>:routed` -> queued jobs it was chosen to run,
`<worker id>:slots` -> its job slots, `<worker id>:idle` -> the counts its last idle heartbeat saw;
the job store places jobs by it (shared/jobstore.py)."""
LOAD_FIELDS = ("", ":slots", ":routed", ":idle")
"""A worker's fields in `WORKER_LOAD`, after its id."""
WAITING = f"{PREFIX}:waiting"
"""Sorted set: queued attempt id -> when it was queued (ms), for attempts that found no free slot
and those queued behind them: the line a freed slot serves first, oldest first (shared/jobstore.py)."""
QUEUE_DEADLINES = f"{PREFIX}:queue:deadlines"
"""Sorted set: queued job id -> when it is withdrawn if no worker has started it (ms): its request's
`QUEUE_TIMEOUT_S`, or `BACKGROUND_QUEUE_TIMEOUT_S`, after it was queued. Workers sweep it."""
RUNNING = f"{PREFIX}:running"
"""Sorted set: running job id -> its lease deadline (ms). Workers renew; any worker sweeps."""
SWEPT = f"{PREFIX}:running:swept"
"""When a process last swept `RUNNING` (ms): a longer silence was an outage (`JobStore.recover_expired`)."""
UPSTREAM_MODELS = f"{PREFIX}:upstream-models"
"""The model API's own model list as a worker fetched it (`shared/upstream_models.py`)."""
TOOL_CONFIG_GLOBAL = f"{PREFIX}:tools:global"
"""The operator's runtime tool defaults (`shared/tool_config.py`); sessions keep theirs in their record."""


@dataclass(frozen=True)
class Channels:
    """The pub/sub channels of the gateway whose keys are in one Redis database.

    Keys live in a database, channels are server-wide: each name carries the database's number, so
    that gateways sharing a Redis server (a database each) never hear each other's wake-ups, which
    would queue vain claims on their busy workers, or cancels.
    """

    database: int

    @classmethod
    def of(cls, redis: Redis) -> "Channels":
        """The channels of the database `redis` works in."""
        return cls(int(redis.connection_pool.connection_kwargs.get("db", 0)))

    @property
    def wakeup(self) -> str:
        """Carries a queued attempt's id to every worker: when no one worker was chosen to run it
        (see `worker_wakeup`), so all try to claim it at once instead of polling on arq's timer."""
        return f"{PREFIX}:db{self.database}:wakeup"

    @property
    def cancel(self) -> str:
        """Carries the id of a job to cancel to whichever worker runs it."""
        return f"{PREFIX}:db{self.database}:cancel"

    def worker_wakeup(self, worker_id: str) -> str:
        """Carries the ids of queued attempts the job store chose this worker to run (its own
        wake-ups; the job store's scripts build the same name)."""
        return f"{self.wakeup}:{worker_id}"

    def worker_push(self, worker_id: str) -> str:
        """Carries the attempts the job store claimed for this worker, each with its payload, so
        that it starts them at once (`push_to` in shared/jobstore.py builds the same name)."""
        return f"{self.wakeup}:{worker_id}:jobs"


_JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_job_id(value: str) -> bool:
    return _JOB_ID.fullmatch(value) is not None


def _checked(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError("malformed job id")
    return job_id


def events_key(job_id: str) -> str:
    """The Redis stream holding one job's events; entry ids are `0-<seq>`."""
    return f"{PREFIX}:job:{_checked(job_id)}:events"


def reader_wakeup_key(reader_id: str) -> str:
    """The stream an API process appends to so that its event reader's blocked `XREAD` returns."""
    return f"{PREFIX}:event-reader:{reader_id}:wakeup"


def record_key(job_id: str) -> str:
    """The hash describing one job: owner, payload, attempt, where it runs, how it ended."""
    return f"{PREFIX}:job:{_checked(job_id)}"


def response_key(job_id: str) -> str:
    """The Responses API's request beside its job (api/responses/response.py's `StoredResponse`)."""
    return f"{PREFIX}:response:{_checked(job_id)}"


def idempotency_key(owner: str, key: str) -> str:
    """Where an `Idempotency-Key` of one caller points to its job (hashed: the key is caller text)."""
    digest = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
    return f"{PREFIX}:idempotency:{digest}"


def attempt_id(job_id: str, attempt: int) -> str:
    """The arq job id of one attempt at a job."""
    return f"{_checked(job_id)}.{attempt}"


_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_OWNER = re.compile(r"[0-9a-f]{32}")


def is_session_id(value: str) -> bool:
    """1-128 letters, digits, `.`, `_`, `-`, starting alphanumeric: never a path or key separator."""
    return _SESSION_ID.fullmatch(value) is not None


def _session_base(owner: str, session_id: str) -> str:
    if _OWNER.fullmatch(owner) is None or not is_session_id(session_id):
        raise ValueError("malformed session owner or id")
    return f"{PREFIX}:session:{owner}:{session_id}"


def session_key(owner: str, session_id: str) -> str:
    """A hash: the session's record (created, last used, turns, transcript id)."""
    return _session_base(owner, session_id)


def session_history_key(owner: str, session_id: str) -> str:
    """A list: the session's turns as JSON, oldest first."""
    return f"{_session_base(owner, session_id)}:history"


def session_lock_key(owner: str, session_id: str) -> str:
    """A string: the id of the one job allowed to extend the session right now."""
    return f"{_session_base(owner, session_id)}:lock"


def sessions_index_key(owner: str) -> str:
    """A sorted set: one owner's session ids, scored by expiry time (epoch ms)."""
    if _OWNER.fullmatch(owner) is None:
        raise ValueError("malformed session owner")
    return f"{PREFIX}:sessions:{owner}"


def transcript_key(project: str, session: str) -> str:
    """The prefix of one Claude Code transcript's keys in the SDK session store.

    Components are percent-encoded: a `:` or `/` inside either cannot reach another key.
    """
    return f"{PREFIX}:sdk:{quote(project, safe='')}:{quote(session, safe='')}"


def transcript_index_key(project: str) -> str:
    """A sorted set: one project's transcripts, scored by last write (epoch ms)."""
    return f"{PREFIX}:sdk:{quote(project, safe='')}:sessions"


WORKSPACES_INDEX = f"{PREFIX}:workspaces"
"""Sorted set: `<owner>/<session>/<transcript id>` of every stored session workspace -> when the
sweep should look whether its session still exists (epoch ms; `shared/workspaces.py`)."""
