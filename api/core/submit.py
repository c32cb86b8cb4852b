"""Queues one completion job for a chat request: the step every front end shares.

The Responses and Anthropic Messages endpoints (and `n > 1` fan-out) translate their requests into
a `ChatCompletionRequest` and queue it here, so every format gets the same validation, model
mapping, prompt limits and job slots as `/v1/chat/completions`.
"""

from typing import Any

from fastapi import Request
from pydantic import ValidationError

from api.access import job_slot, no_job_slot
from api.chat.protocol import ChatCompletionRequest
from api.core.limits import check_prompt_limits
from api.core.translate import build_job
from api.deps import Caller, Gateway
from api.errors import OpenAIError
from shared.jobs import CompletionJob
from shared.jobstore import NoJobSlot


def chat_request(**fields: Any) -> ChatCompletionRequest:
    """A chat request translated from another format; 400 if the translation is not a valid one."""
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise OpenAIError.invalid(f"Invalid request: {param}: {error['msg']}.", param=param) from None


def prepare_job(body: ChatCompletionRequest, request: Request, gateway: Gateway) -> CompletionJob:
    """Validates the request and builds its job (400/404 on what the gateway cannot run)."""
    check_prompt_limits(body, gateway.settings)
    return build_job(body, request.state.request_id, gateway.settings)


async def queue_job(
    job: CompletionJob,
    request: Request,
    gateway: Gateway,
    caller: Caller,
    *,
    idempotency: tuple[str, str] | None = None,
) -> tuple[str, str] | None:
    """Queues the job, owned by the caller's key, in one of its job slots (429 if none is free).

    With `idempotency=(key, fingerprint)` a key the caller used before returns the earlier
    `(job id, fingerprint)` and queues nothing (`JobStore.create`).
    """
    slot = job_slot(gateway, request)
    try:
        return await gateway.store.create(job, owner=caller.key_id, idempotency=idempotency, slot=slot)
    except NoJobSlot as refused:
        raise no_job_slot(refused) from None
