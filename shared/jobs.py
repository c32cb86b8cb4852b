"""The job contract between API and worker: what is enqueued, and the events a job emits.

A job's events form a sequence numbered from 1: any number of `Delta`s (the reply's text),
`Reasoning`s (the model's thinking), `ToolStep`s (the agent running its own tools) and, rarely,
`Retraction`s (text the model API took back), then exactly one terminal event, `Done` or `Failed`.
The API renders them into the wire format the caller asked for.
"""

import time
import uuid
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.agent import AgentRequest


def new_job_id() -> str:
    return uuid.uuid4().hex


class ImageSource(BaseModel):
    """An image of a user turn, as the Anthropic API takes it: inline base64, or a URL the model
    API fetches itself (only from hosts the operator allowed; the gateway never fetches)."""

    model_config = ConfigDict(frozen=True)
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class Turn(BaseModel):
    """One earlier or current message of the conversation, reduced to what the backend needs."""

    model_config = ConfigDict(frozen=True)
    role: Literal["user", "assistant"]
    text: str
    images: list[ImageSource] = []
    """A user turn's images, in the order sent; the model sees them before the turn's text."""


class SessionRef(BaseModel):
    """The session a job continues: whose it is, and how many turns it held when the job took it."""

    model_config = ConfigDict(frozen=True)
    owner: str
    id: str
    history_len: int = Field(ge=0)
    transcript_id: str
    """The Claude Code session (a UUID) holding the backend's own transcript of this session."""
    workspace: str | None = None
    """The version of the session's workspace the job starts from (None: empty)."""
    holder: str | None = None
    """The worker likely to hold that workspace already: it is offered the job first."""


class FunctionTool(BaseModel):
    """A function the caller offers the model; a call to it ends the job's turn (function calling)."""

    model_config = ConfigDict(frozen=True)
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class CompletionJob(BaseModel):
    """Everything a worker needs to run one completion; serialized to JSON on the queue."""

    model_config = ConfigDict(frozen=True)
    id: str = Field(default_factory=new_job_id)
    request_id: str
    model: str
    """The model id the caller sent, echoed in responses."""
    backend_model: str | None = None
    """The full model id an alias resolved to (`MODEL_ALIASES`); None: `model` as sent."""
    system_prompt: str | None = None
    turns: list[Turn]
    """The conversation; for a job that continues a session, only the turns new to the session."""
    max_tokens: int | None = None
    stop: list[str] = []
    """Stop sequences: the reply ends before the first one (`worker/stops.py`)."""
    agent: AgentRequest = AgentRequest()
    """What the agent may do in this job, already checked against the operator's policy."""
    session: SessionRef | None = None
    functions: list[FunctionTool] = Field(default_factory=list)
    """The caller's functions (`tools` of type function), offered alongside the agent's own tools."""
    n: int = 1
    """The jobs its request asked for (`n`, one per choice): they share its output bound
    (`JOB_MAX_OUTPUT_CHARS`), so a request's reply is bounded, not each choice's (an outside probe
    made one `n: 8` request answer 379 MB)."""
    owner: str | None = None
    """The caller's API key, as `sessions.owner_of` digests it: a warm CLI that ran a job of one
    key runs no other key's (`worker/warm.py`). None: a job no key queued (tests, benchmarks)."""
    created: int = Field(default_factory=lambda: int(time.time()))


class Usage(BaseModel):
    """Token counts and cost as the backend measured them (never estimated)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Of `prompt_tokens`, those read from the prompt cache."""
    cache_write_tokens: int = 0
    """Of `prompt_tokens`, those written to the prompt cache (Anthropic's `cache_creation_input_tokens`)."""
    cost_usd: float | None = None


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"


class FailureCode(StrEnum):
    """Why a job failed; the API maps each to an HTTP status and an OpenAI error type."""

    UPSTREAM_AUTH = "upstream_authentication_error"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_REFUSED = "upstream_invalid_request"
    """The model API refused the request as invalid (a prompt over the model's context, say): its
    reason is passed on, as the caller can act on it."""
    BACKEND_UNAVAILABLE = "backend_unavailable"
    QUEUE_TIMEOUT = "queue_timeout"
    TIMEOUT = "timeout"
    STALLED = "stalled"
    WORKER_SHUTDOWN = "worker_shutdown"
    WORKER_LOST = "worker_lost"
    QUEUE_UNAVAILABLE = "queue_unavailable"
    """Redis stayed out of the worker's reach past `REDIS_OUTAGE_GRACE_S`: the job was stopped,
    and its end written once Redis was back (it was taken for a lost worker's: an outside probe).
    Or Redis lost the job's record while a client followed it (restarted without its data)."""
    CANCELLED = "cancelled"
    RETRY_DIVERGED = "retry_diverged"
    """Not a job's end: a stream that cannot go on after a `Retraction` ends with it."""
    WORKSPACE_TOO_LARGE = "workspace_too_large"
    """A session turn's files exceed the workspace limits: not saved, the session unchanged."""
    OUTPUT_TOO_LARGE = "output_too_large"
    """The job's output passed `JOB_MAX_OUTPUT_CHARS`: stopped there."""
    WORKSPACE_UNAVAILABLE = "workspace_unavailable"
    """A session's files are not in the store this process has: deleted meanwhile, or the
    gateway's processes do not share one store (`WORKSPACE_STORE`). A retry meets the same."""
    STORAGE_FULL = "storage_full"
    """Redis at its `maxmemory` refused a session turn's commit: the session is as it was."""
    INTERNAL = "internal_error"


class JobStatus(StrEnum):
    """Where a job is in its life, as OpenAI's background mode names it."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Delta(BaseModel):
    type: Literal["delta"] = "delta"
    text: str


class Reasoning(BaseModel):
    """The model's thinking, as it streams; never part of the reply's text."""

    type: Literal["reasoning"] = "reasoning"
    text: str


class ToolStep(BaseModel):
    """The agent runs one of its own tools: its start (the tool and its main argument, such as the
    command or the file), then its end (and whether it failed). Not the caller's functions."""

    type: Literal["tool_step"] = "tool_step"
    id: str
    name: str
    argument: str = ""
    ended: bool = False
    failed: bool = False


class Retraction(BaseModel):
    """The model API cut its message and the retry said something else: the last `chars`
    characters of the reply's text are withdrawn, and the deltas that follow replace them."""

    type: Literal["retraction"] = "retraction"
    chars: int = Field(gt=0)


class ToolCall(BaseModel):
    """A call to one of the caller's functions; `arguments` is a JSON object as text."""

    id: str
    name: str
    arguments: str


class Done(BaseModel):
    type: Literal["done"] = "done"
    finish_reason: FinishReason
    usage: Usage
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """With `finish_reason: tool_calls`: the calls the turn ended on, for the caller to run."""
    completed_at: int | None = None
    """When the worker wrote it (Unix seconds): a Response's `completed_at`, on every path."""
    stop_sequence: str | None = None
    """The caller's stop sequence that ended the reply (Messages' `stop_sequence`)."""
    context_window_full: bool = False
    """With `finish_reason: length`: the reply filled the model's context window, not its token
    limit (Messages' `model_context_window_exceeded`)."""


class Failed(BaseModel):
    type: Literal["failed"] = "failed"
    code: FailureCode
    message: str


class PromptUsage(BaseModel):
    """What the model was given, as the model API reports it at the start of the reply's first
    message: its input tokens and the prompt cache's reads and writes (what Anthropic's
    `message_start` carries; the totals come with `Done`). Written with the job's first output,
    never alone (`EventWriter.prompt`), so a job with it has output."""

    type: Literal["prompt_usage"] = "prompt_usage"
    usage: Usage


JobEvent = Annotated[
    Delta | Reasoning | ToolStep | Retraction | Done | Failed | PromptUsage, Field(discriminator="type")
]
_EVENT = TypeAdapter[JobEvent](JobEvent)
JobEventValue = Delta | Reasoning | ToolStep | Retraction | Done | Failed | PromptUsage
Activity = Reasoning | ToolStep
"""What the agent does besides writing its reply."""


def encode_event(event: JobEventValue) -> bytes:
    return event.__pydantic_serializer__.to_json(event)


def decode_event(raw: bytes) -> JobEventValue:
    return _EVENT.validate_json(raw)


def settled(events: Iterable[JobEventValue]) -> list[JobEventValue]:
    """The events with each `Retraction` applied to the text before it (and left out, as the
    `PromptUsage` is): what a collected reply, a retrieval and a session's history are built from."""
    kept: list[JobEventValue] = []
    for event in events:
        if isinstance(event, PromptUsage):  # the reply's `Done` has its whole usage
            continue
        if not isinstance(event, Retraction):
            kept.append(event)
            continue
        owed = event.chars
        for index in range(len(kept) - 1, -1, -1):
            if owed == 0:
                break
            if isinstance(earlier := kept[index], Delta):
                cut = min(owed, len(earlier.text))
                kept[index] = Delta(text=earlier.text[: len(earlier.text) - cut])
                owed -= cut
        kept = [event for event in kept if not (isinstance(event, Delta) and not event.text)]
    return kept
