"""`n > 1`: one chat request, n jobs run in parallel by the worker pool, merged into n choices.

Each choice is an ordinary job (its own slot, attempts, limits); the completion takes the first
job's id. Streamed, the jobs' chunks interleave as they arrive, each with its choice's `index`,
and the usage chunk (with `include_usage`) sums all of them. A fan-out is one request, not a
durable job: it cannot run in the background, continue a session or be resumed by id, and when
any choice fails the others are cancelled and the request fails with that choice's error.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.chat.outbound import ChunkRenderer, completion_id, error_chunk, usage_body
from api.chat.protocol import ChatCompletion, ChatCompletionRequest, Choice, ResponseMessage
from api.core.relay import follow_job
from api.core.structured import ResponseFormat
from api.core.submit import prepare_job, queue_job
from api.deps import Caller, Gateway
from api.errors import OpenAIError
from shared.events import JobEventValue
from shared.jobs import CompletionJob, Delta, Done, Failed, FailureCode, FinishReason, Usage

log = logging.getLogger("gateway.api")

_abandoned: set["asyncio.Task[None]"] = set()  # strong references until they finish


async def fan_out(
    body: ChatCompletionRequest, request: Request, gateway: Gateway, caller: Caller, has_extras: bool
) -> JSONResponse | EventSourceResponse:
    """Answers a chat request with `n > 1`; `has_extras`: it named a session or an idempotency key."""
    n = body.n or 1
    if n > gateway.settings.max_choices:
        raise OpenAIError.invalid(f"n must be at most {gateway.settings.max_choices}.", param="n")
    if body.background or has_extras or ResponseFormat.from_request(body.response_format) is not None:
        raise OpenAIError.invalid(
            "n > 1 cannot run in the background, continue a session, take an Idempotency-Key "
            "or a JSON response_format.",
            param="n",
            code="unsupported_parameter",
        )
    jobs = [prepare_job(body, request, gateway) for _ in range(n)]
    queued: list[CompletionJob] = []
    try:
        for job in jobs:
            await queue_job(job, request, gateway, caller)
            queued.append(job)
    except BaseException:
        await _cancel(gateway, queued, "Another choice of the request could not be queued.")
        raise
    log.info("queued %d jobs for n=%d (model %s, stream %s)", n, n, body.model, body.stream)
    merged: asyncio.Queue[tuple[int, JobEventValue]] = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(gateway, job, index, merged)) for index, job in enumerate(jobs)]
    if not body.stream:
        try:
            return JSONResponse((await _collect(jobs, merged)).model_dump())
        except BaseException:
            await _cancel(gateway, jobs, "Another choice of the request failed.")
            raise
        finally:
            for pump in pumps:
                pump.cancel()
    first: tuple[int, JobEventValue] | None = None
    with contextlib.suppress(TimeoutError):  # a slow start gets its headers, then pings
        first = await asyncio.wait_for(merged.get(), gateway.settings.stream_commit_after_s)
    if first is not None and isinstance(first[1], Failed):
        await _cancel(gateway, jobs, "Another choice of the request failed.")
        for pump in pumps:
            pump.cancel()
        raise OpenAIError.from_failure(first[1])
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunks = _chunks(gateway, jobs, merged, pumps, first, include_usage)
    return EventSourceResponse(chunks, ping=15)


async def _pump(
    gateway: Gateway, job: CompletionJob, index: int, merged: "asyncio.Queue[tuple[int, JobEventValue]]"
) -> None:
    try:
        async for _, event in follow_job(gateway.store, gateway.settings, job.id, withdraw=True):
            await merged.put((index, event))
    except Exception:  # e.g. Redis gone for longer than its grace: the choice cannot be followed
        log.exception("lost track of a choice")
        failure = Failed(code=FailureCode.INTERNAL, message="The gateway lost track of a choice.")
        await merged.put((index, failure))


async def _cancel(gateway: Gateway, jobs: list[CompletionJob], message: str) -> None:
    failure = Failed(code=FailureCode.CANCELLED, message=message)
    for job in jobs:
        await gateway.store.stop(job.id, withdraw_only=False, failure=failure)


def _total(usages: list[Usage]) -> Usage:
    costs = [usage.cost_usd for usage in usages if usage.cost_usd is not None]
    return Usage(
        prompt_tokens=sum(usage.prompt_tokens for usage in usages),
        completion_tokens=sum(usage.completion_tokens for usage in usages),
        cached_prompt_tokens=sum(usage.cached_prompt_tokens for usage in usages),
        cost_usd=sum(costs) if costs else None,
    )


async def _collect(
    jobs: list[CompletionJob], merged: "asyncio.Queue[tuple[int, JobEventValue]]"
) -> ChatCompletion:
    texts: list[list[str]] = [[] for _ in jobs]
    finished: dict[int, Done] = {}
    while len(finished) < len(jobs):
        index, event = await merged.get()
        if isinstance(event, Delta):
            texts[index].append(event.text)
        elif isinstance(event, Done):
            finished[index] = event
        else:
            raise OpenAIError.from_failure(event)
    choices = [
        Choice(
            index=index,
            message=ResponseMessage(content="".join(texts[index])),
            finish_reason=finished[index].finish_reason.value,
        )
        for index in range(len(jobs))
    ]
    first = jobs[0]
    usage = _total([done.usage for done in finished.values()])
    return ChatCompletion(
        id=completion_id(first),
        created=first.created,
        model=first.model,
        choices=choices,
        usage=usage_body(usage),
    )


async def _chunks(
    gateway: Gateway,
    jobs: list[CompletionJob],
    merged: "asyncio.Queue[tuple[int, JobEventValue]]",
    pumps: "list[asyncio.Task[None]]",
    first: tuple[int, JobEventValue] | None,
    include_usage: bool,
) -> AsyncIterator[ServerSentEvent]:
    renderers = [ChunkRenderer(jobs[0], include_usage=include_usage, index=i) for i in range(len(jobs))]
    usages: list[Usage] = []
    finished = False
    try:
        for renderer in renderers:
            yield ServerSentEvent(renderer.role())
        while len(usages) < len(jobs):
            index, event = first if first is not None else await merged.get()
            first = None
            if isinstance(event, Delta):
                yield ServerSentEvent(renderers[index].content(event.text))
            elif isinstance(event, Done):
                usages.append(event.usage)
                yield ServerSentEvent(renderers[index].finish(event))
            else:
                await _cancel(gateway, jobs, "Another choice of the request failed.")
                yield ServerSentEvent(error_chunk(OpenAIError.from_failure(event).info))
                break
        else:
            if include_usage:
                total = Done(finish_reason=FinishReason.STOP, usage=_total(usages))
                yield ServerSentEvent(renderers[0].usage(total))
        finished = True
    finally:
        for pump in pumps:
            pump.cancel()
        if not finished and gateway.settings.cancel_on_disconnect:
            # The client went away mid-stream; this task is being cancelled, so run it apart.
            task = asyncio.get_running_loop().create_task(_cancel(gateway, jobs, "The client disconnected."))
            _abandoned.add(task)
            task.add_done_callback(_abandoned.discard)
    yield ServerSentEvent("[DONE]")
