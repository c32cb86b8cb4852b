"""Queues one completion job for a chat request: the step every front end shares.

The Responses and Anthropic Messages endpoints (and `n > 1` fan-out) translate their requests into
a `ChatCompletionRequest` and queue it here, so every format gets the same validation, model
mapping, prompt limits and job slots as `/v1/chat/completions`.
"""

from fastapi import Request

from api.access import job_slot
from api.deps import Caller, Gateway
from api.hygiene import check_prompt_limits
from api.protocol import ChatCompletionRequest
from api.translate import build_job
from shared.jobs import CompletionJob


def prepare_job(body: ChatCompletionRequest, request: Request, gateway: Gateway) -> CompletionJob:
    """Validates the request and builds its job (400/404 on what the gateway cannot run)."""
    check_prompt_limits(body, gateway.settings)
    return build_job(body, request.state.request_id, gateway.settings)


async def queue_job(job: CompletionJob, request: Request, gateway: Gateway, caller: Caller) -> None:
    """Takes a job slot for the job and queues it, owned by the caller's key."""
    async with job_slot(gateway, request, job.id):
        await gateway.store.create(job, owner=caller.key_id)
