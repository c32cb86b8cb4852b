"""A core request → its queued jobs: the one path every front end's request takes.

1. limits (messages, prompt size) and the named session;
2. the agent's controls against the operator's tool policy (`CLAUDE_TOOLS`, `CLAUDE_MAX_TURNS`, …);
3. the caller's functions and the requested JSON format, instructed into the job;
4. the job, or `n` of them (`n > 1`: one per choice, each an ordinary job with its own slot);
5. the session taken, the `Idempotency-Key` honoured, each job queued in one of the caller's job
   slots (429 if none is free); whatever was taken is released if the request fails here.
"""

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from api.access import job_slot, no_job_slot
from api.core.functions import function_calling
from api.core.limits import check_prompt_limits
from api.core.policy import agent_request
from api.core.request import CompletionRequest
from api.core.run import JobRef, Run
from api.core.sessions import abandon, attach, requested_session_id
from api.core.translate import build_job
from api.deps import Caller, Gateway
from api.errors import OpenAIError
from shared.jobs import CompletionJob, new_job_id
from shared.jobstore import NoJobSlot

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@dataclass(frozen=True)
class Idempotency:
    """An `Idempotency-Key` and the fingerprint of the request that came with it."""

    key: str
    fingerprint: str

    @classmethod
    def of(cls, key: str | None, body: str) -> "Idempotency | None":
        if key is None:
            return None
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            raise OpenAIError.invalid(
                "Idempotency-Key must be 1 to 255 printable ASCII characters.", param="Idempotency-Key"
            )
        return cls(key, hashlib.sha256(body.encode()).hexdigest())


class Companion(Protocol):
    """What a front end keeps beside its job (the Responses API's stored request): saved before
    the job is queued, forgotten if it never is."""

    async def save(self, job_id: str) -> None: ...
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
    check_prompt_limits(request.messages, settings)
    session_id = requested_session_id(request.session_id, http.headers)
    if request.n > 1:
        _check_choices(request, settings.max_choices, session_id, idempotency)
    agent = agent_request(request.agent, http.headers, settings)
    plain, calling = function_calling(request)
    job = build_job(plain, http.state.request_id, settings, agent)
    if calling is not None:
        if session_id is not None:
            raise OpenAIError.invalid("Function calling does not continue sessions yet.", param="session_id")
        job = calling.instruct(job)
    if (response_format := request.response_format) is not None:
        if request.background:
            raise OpenAIError.invalid(
                f"{response_format.param} cannot be checked on a background job.", param=response_format.param
            )
        job = response_format.instruct(job)
    if request.n > 1:
        jobs = [job, *(job.model_copy(update={"id": new_job_id()}) for _ in range(request.n - 1))]
        return Run(
            gateway, await _queue_all(jobs, http, gateway, caller), request.background, response_format
        )
    if session_id is not None:
        job = await attach(gateway.redis, settings, caller.key_id, session_id, job)
    try:
        if companion is not None:
            await companion.save(job.id)
        ref = await _queue(job, http, gateway, caller, idempotency)
    except BaseException:
        await abandon(gateway.redis, job)  # never queued: the session is free again
        if companion is not None:
            await companion.forget(job.id)
        raise
    if ref.id != job.id:  # attached to the key's earlier job: this one was never queued
        await abandon(gateway.redis, job)
    return Run(gateway, [ref], request.background, response_format)


def _check_choices(
    request: CompletionRequest, max_choices: int, session_id: str | None, idempotency: Idempotency | None
) -> None:
    if request.n > max_choices:
        raise OpenAIError.invalid(f"n must be at most {max_choices}.", param="n")
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
        for job in jobs:
            await _queue(job, http, gateway, caller, None)
            queued.append(job)
    except BaseException:
        await Run(gateway, queued).cancel("Another choice of the request could not be queued.")
        raise
    return queued


async def _queue(
    job: CompletionJob, http: Request, gateway: Gateway, caller: Caller, idempotency: Idempotency | None
) -> JobRef:
    """Queues the job, owned by the caller's key, in one of its job slots (429 if none is free);
    with an `Idempotency-Key` seen before, returns that key's job instead and queues nothing."""
    slot = job_slot(gateway, http)
    key = (idempotency.key, idempotency.fingerprint) if idempotency is not None else None
    try:
        existing = await gateway.store.create(job, owner=caller.key_id, idempotency=key, slot=slot)
    except NoJobSlot as refused:
        raise no_job_slot(refused) from None
    if existing is None:
        return job
    job_id, used_with = existing
    assert idempotency is not None
    if used_with != idempotency.fingerprint:
        raise OpenAIError.invalid(
            "This Idempotency-Key was already used with a different request.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    record = await gateway.store.get(job_id)
    if record is None:  # its job expired a moment ago; the key goes with it
        raise OpenAIError(409, "Retry: the earlier request's job just expired.", type="invalid_request_error")
    return record
