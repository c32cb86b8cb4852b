"""A core request → its queued jobs: the one path every front end's request takes.

1. the named session, and the stored tool defaults that apply;
2. `plan`: limits (messages, prompt size), the agent's controls against the operator's tool policy
   (`CLAUDE_TOOLS`, `CLAUDE_MAX_TURNS`, …), the caller's functions and the requested JSON format;
   `POST /v1/compatibility` runs the same checks without queueing;
4. the job, or `n` of them (`n > 1`: one per choice, each an ordinary job with its own slot);
5. the session taken, the `Idempotency-Key` honoured, each job queued in one of the caller's job
   slots (429 if none is free); whatever was taken is released if the request fails here.
"""

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request
from pydantic import BaseModel

from api.access import (
    STORED_GLOBAL_TOOLS,
    job_slot,
    key_revoked,
    no_job_slot,
    storage_limited,
    stored_ledger,
    stored_limit,
)
from api.core.functions import function_calling
from api.core.limits import check_prompt_limits
from api.core.policy import agent_request
from api.core.request import CompletionRequest
from api.core.run import JobRef, Run
from api.core.sessions import abandon, attach, requested_session_id
from api.core.translate import build_job
from api.deps import Caller, Gateway
from api.errors import OpenAIError
from shared import sessions, tool_config
from shared.jobs import CompletionJob, new_job_id
from shared.jobstore import KeyRevoked, NoJobSlot
from shared.quotas import StorageLimit
from shared.settings import Settings
from shared.tool_config import ToolConfig

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
"""The header in each job-creating route's OpenAPI document; read from the request, not declared as
a parameter: FastAPI validates each declared header through pydantic, about 40 µs per request on
the token path."""


@dataclass(frozen=True)
class Idempotency:
    """An `Idempotency-Key` and the fingerprint of the request that came with it."""

    key: str
    fingerprint: str

    @classmethod
    def of(cls, request: Request, body: BaseModel) -> "Idempotency | None":
        """The request's `Idempotency-Key`, if it has one (400 if malformed)."""
        key = request.headers.get("idempotency-key")
        if key is None:  # no fingerprint either: the body is not serialized for nothing
            return None
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            raise OpenAIError.invalid(
                "Idempotency-Key must be 1 to 255 printable ASCII characters.", param="Idempotency-Key"
            )
        # The session as named either way (the body's field or the X-Session-Id header): the same
        # request by either is the same request.
        session = requested_session_id(getattr(body, "session_id", None), request.headers) or ""
        request_json = body.model_dump_json(exclude={"session_id"})
        return cls(key, hashlib.sha256(f"{session}\n{request_json}".encode()).hexdigest())


class Companion(Protocol):
    """What a front end keeps beside its job (the Responses API's stored request): saved before
    the job is queued, forgotten if it never is."""

    async def save(self, job: CompletionJob) -> None: ...
    async def forget(self, job_id: str) -> None: ...


async def submit(
    request: CompletionRequest,
    http: Request,
    gateway: Gateway,
    caller: Caller,
    *,
    idempotency: Idempotency | None = None,
    companion: Companion | None = None,
) -> Run:
    """Validates the request, applies the operator's policy and queues its jobs (400/404/409/429)."""
    settings = gateway.settings
    session_id = requested_session_id(request.session_id, http.headers)
    if request.n > 1:
        _check_choices(request, settings, session_id, idempotency)
    owner = sessions.owner_of(caller.key_id)
    stored_global = getattr(http.state, STORED_GLOBAL_TOOLS, None)
    stored = await tool_config.configs(gateway.redis, owner, session_id, stored_global)
    job = plan(request, http.headers, http.state.request_id, settings, stored, session=session_id is not None)
    job = job.model_copy(update={"owner": owner, "n": request.n})
    response_format, reasoning = request.response_format, _shows_reasoning(request, settings)
    if request.n > 1:
        jobs = [job, *(job.model_copy(update={"id": new_job_id()}) for _ in range(request.n - 1))]
        queued = await _queue_all(jobs, http, gateway, caller)
        return Run(gateway, queued, request.background, response_format, reasoning)
    # A repeated request attaches to its earlier job before anything is taken for it: the session
    # (that job may hold it still: its client lost the stream and asks again), or room for a stored
    # request it would not store again (a re-check probe saw a Responses retry refused for it).
    rejoinable = idempotency is not None or session_id is not None
    if idempotency is not None and (earlier := await _earlier(idempotency, gateway, caller)) is not None:
        return Run(
            gateway,
            [earlier],
            request.background,
            response_format,
            reasoning,
            rejoinable=rejoinable,
            repeated=True,
        )
    ledger = stored_ledger(gateway, http) if session_id is not None else None  # its session's
    if session_id is not None:
        job = await attach(
            gateway.redis, settings, caller.key_id, session_id, job, ledger, background=request.background
        )
    try:
        if companion is not None:
            await companion.save(job)
        ref = await _queue(job, http, gateway, caller, background=request.background, idempotency=idempotency)
    except BaseException:
        await abandon(gateway.redis, job, settings.session_ttl_s, ledger)  # never queued: the session is free
        if companion is not None:
            await companion.forget(job.id)
        raise
    if ref.id != job.id:  # attached to the key's earlier job: this one was never queued
        await abandon(gateway.redis, job, settings.session_ttl_s, ledger)
        if companion is not None:
            await companion.forget(job.id)
    repeated = ref.id != job.id
    return Run(
        gateway,
        [ref],
        request.background,
        response_format,
        reasoning,
        rejoinable=rejoinable,
        repeated=repeated,
    )


def _shows_reasoning(request: CompletionRequest, settings: Settings) -> bool:
    """The agent's thinking and tool steps reach the caller unless the operator or request says no."""
    return settings.stream_reasoning and request.agent.include_reasoning is not False


def plan(
    request: CompletionRequest,
    headers: Mapping[str, str],
    request_id: str,
    settings: Settings,
    configs: Sequence[ToolConfig] = (),
    *,
    session: bool = False,
) -> CompletionJob:
    """The request's job, checked against the limits and the operator's policy; nothing is queued.
    `configs`: the stored tool defaults that apply; `session`: the request continues a session."""
    check_prompt_limits(request, settings)
    agent = agent_request(request.agent, headers, settings, configs)
    plain, calling = function_calling(request)
    job = build_job(plain, request_id, settings, agent)
    if calling is not None:
        if session:
            raise OpenAIError.invalid("Function calling does not continue sessions yet.", param="session_id")
        job = calling.instruct(job)
    if (response_format := request.response_format) is not None:
        param = response_format.param
        if request.background:
            raise OpenAIError.invalid(f"{param} cannot be checked on a background job.", param=param)
        if session:  # the turn is the session's before its reply is checked here: a broken one would stay
            raise OpenAIError.invalid(f"{param} does not continue sessions yet.", param=param)
        job = response_format.instruct(job)
    return job


def _check_choices(
    request: CompletionRequest, settings: Settings, session_id: str | None, idempotency: Idempotency | None
) -> None:
    if request.n > settings.max_choices:
        raise OpenAIError.invalid(f"n must be at most {settings.max_choices}.", param="n")
    if 0 < (cap := settings.max_concurrent_jobs_per_key) < request.n:  # never: not a 429 to retry
        raise OpenAIError.invalid(
            f"n must be at most {cap}: each choice is a job, and a key runs at most {cap} at once.", param="n"
        )
    if request.background or session_id is not None or idempotency or request.response_format is not None:
        raise OpenAIError.invalid(
            "n > 1 cannot run in the background, continue a session, take an Idempotency-Key "
            "or a JSON response_format.",
            param="n",
            code="unsupported_parameter",
        )


async def _queue_all(
    jobs: list[CompletionJob], http: Request, gateway: Gateway, caller: Caller
) -> list[JobRef]:
    queued: list[JobRef] = []
    try:
        for job in jobs:  # the first takes every choice's slot, so the request gets all or none
            choices = [other.id for other in jobs[1:]] if job is jobs[0] else []
            await _queue(job, http, gateway, caller, background=False, choices=choices)
            queued.append(job)
        await gateway.store.link_choices(jobs[0].id, [job.id for job in jobs[1:]])  # deleted together
    except BaseException:
        await Run(gateway, queued).cancel("Another choice of the request could not be queued.")
        raise
    return queued


async def _queue(
    job: CompletionJob,
    http: Request,
    gateway: Gateway,
    caller: Caller,
    *,
    background: bool,
    idempotency: Idempotency | None = None,
    choices: list[str] | None = None,
) -> JobRef:
    """Queues the job, owned by the caller's key, in one of its job slots, and the request's other
    `choices`' slots with it (429 if not all are free, or if the key keeps its limit of ended jobs'
    bytes), to be withdrawn if no worker starts it within its queue timeout (`background`: the
    longer one, as no request waits on it); with an `Idempotency-Key` seen before, returns that
    key's job instead and queues nothing."""
    settings = gateway.settings
    queue_timeout_s = settings.queue_timeout(background=background)
    slot = job_slot(gateway, http)
    key = (idempotency.key, idempotency.fingerprint) if idempotency is not None else None
    for _ in range(2):  # a second time once a gone job's key is released
        try:
            existing = await gateway.store.create(
                job,
                owner=caller.key_id,
                idempotency=key,
                slot=slot,
                choices=choices or (),
                queue_timeout_s=queue_timeout_s,
                stored=stored_limit(gateway, http),
            )
        except NoJobSlot as refused:
            raise no_job_slot(refused) from None
        except StorageLimit as refused:
            raise storage_limited(refused) from None
        except KeyRevoked:
            raise key_revoked() from None
        if existing is None:
            return job
        assert idempotency is not None
        if (record := await _earlier_job(existing, idempotency, gateway, caller)) is not None:
            return record
    raise OpenAIError(409, "Retry: the earlier request's job just ended.", type="invalid_request_error")


async def _earlier(idempotency: Idempotency, gateway: Gateway, caller: Caller) -> JobRef | None:
    """The job an earlier request with this `Idempotency-Key` queued, if it is still there."""
    existing = await gateway.store.idempotent_job(caller.key_id, idempotency.key)
    return None if existing is None else await _earlier_job(existing, idempotency, gateway, caller)


async def _earlier_job(
    existing: tuple[str, str], idempotency: Idempotency, gateway: Gateway, caller: Caller
) -> JobRef | None:
    """The job the key names, `existing` (its id and request's fingerprint); None if it is gone,
    and the key is then free. A different request under the same key is a 400."""
    job_id, used_with = existing
    if used_with != idempotency.fingerprint:
        raise OpenAIError.invalid(
            "This Idempotency-Key was already used with a different request.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    if (record := await gateway.store.get(job_id)) is not None:
        return record
    # Its job is gone (deleted, or expired a moment before its key): the key is this request's.
    await gateway.store.release_idempotency(caller.key_id, idempotency.key, job_id)
    return None
