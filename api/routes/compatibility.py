"""`POST /v1/compatibility`: what the gateway would do with each parameter of a chat request,
without running it.

The verdict (`accepted`, and the error a real request would get) comes from the same checks a
`POST /v1/chat/completions` runs; the per-parameter notes say what an accepted parameter does.
The original wrapper's `compatibility_report` (its four lists) is derived from the same notes.
"""

from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.catalog import resolve_model
from api.chat.inbound import core_request
from api.chat.protocol import ChatCompletionRequest
from api.core.submit import plan
from api.deps import GatewayDep
from api.errors import ErrorInfo, ErrorResponse, OpenAIError
from shared.settings import Settings

router = APIRouter()

Handling = Literal["supported", "ignored", "refused", "extension"]


class ParameterReport(BaseModel):
    name: str
    handling: Handling
    detail: str


class OriginalReport(BaseModel):
    """The original wrapper's report shape."""

    supported_parameters: list[str]
    unsupported_parameters: list[str]
    warnings: list[str]
    suggestions: list[str]


class CompatibilityReport(BaseModel):
    object: Literal["compatibility_report"] = "compatibility_report"
    accepted: bool = Field(description="Whether POST /v1/chat/completions would accept this request.")
    error: ErrorInfo | None = Field(description="The error it would get instead, if any.")
    model: str | None = Field(description="The model the request would run; null if not served.")
    parameters: list[ParameterReport]
    compatibility_report: OriginalReport


def _always(handling: Handling, detail: str) -> Callable[[object], tuple[Handling, str]]:
    return lambda _: (handling, detail)


def _unless_zero(detail: str) -> Callable[[object], tuple[Handling, str]]:
    return lambda value: ("ignored", "0 has no effect") if not value else ("refused", detail)


_NO_SAMPLING = "accepted with no effect: Claude Code does not expose sampling settings"
_NOT_HONOURED = "400 unsupported_parameter: the gateway cannot honour it"
_FUNCTIONS = "function calling: the model's calls come back as tool_calls"
_AGENT = "checked against the operator's tool policy (400 when it asks for more)"

_PARAMETERS: dict[str, Callable[[object], tuple[Handling, str]]] = {
    "model": _always("supported", "a served model, an alias or a dated id of one; else 404"),
    "messages": _always("supported", "system and developer messages join Claude Code's system prompt"),
    "stream": _always("supported", "Server-Sent Events, token by token"),
    "stream_options": _always("supported", "include_usage adds a final usage chunk"),
    "max_tokens": _always("supported", "caps the reply; finish_reason length when reached"),
    "max_completion_tokens": _always("supported", "caps the reply; finish_reason length when reached"),
    "temperature": _always("ignored", _NO_SAMPLING),
    "top_p": _always("ignored", _NO_SAMPLING),
    "seed": _always("ignored", _NO_SAMPLING),
    "user": _always("ignored", "accepted; not used"),
    "metadata": _always("ignored", "checked (16 pairs, keys of 64 characters, values of 512); not stored"),
    "service_tier": _always("ignored", "checked; one tier here"),
    "verbosity": _always("ignored", "checked; Claude Code has no such setting"),
    "reasoning_effort": _always(
        "supported",
        "Claude Code's effort, sent to the models that take it; none and minimal turn thinking off; "
        "at most CLAUDE_MAX_EFFORT",
    ),
    "n": _always("supported", "n jobs run in parallel, up to MAX_CHOICES"),
    "stop": _always("supported", "up to 4 sequences; the reply ends before the first"),
    "presence_penalty": _unless_zero(_NOT_HONOURED),
    "frequency_penalty": _unless_zero(_NOT_HONOURED),
    "logit_bias": _unless_zero(_NOT_HONOURED),
    "logprobs": _unless_zero(_NOT_HONOURED),
    "top_logprobs": _always("refused", _NOT_HONOURED),
    "response_format": _always("supported", "asked for in the prompt; the reply is checked (502 if broken)"),
    "tools": _always("supported", _FUNCTIONS),
    "tool_choice": _always(
        "supported", "auto and none exactly; required, a named function and allowed_tools are asked for"
    ),
    "parallel_tool_calls": _always("supported", "false is asked for in the prompt"),
    "functions": _always("supported", _FUNCTIONS),
    "function_call": _always("supported", _FUNCTIONS),
    "modalities": lambda value: ("supported", "text") if value == ["text"] else ("refused", _NOT_HONOURED),
    "audio": _always("refused", _NOT_HONOURED),
    "prediction": _always("refused", _NOT_HONOURED),
    "web_search_options": _always("refused", _NOT_HONOURED),
    "background": _always("extension", "answer at once with the queued job"),
    "session_id": _always("extension", "continue a session kept by the gateway"),
    "enable_tools": _always("extension", _AGENT),
    "allowed_tools": _always("extension", _AGENT),
    "disallowed_tools": _always("extension", _AGENT),
    "max_turns": _always("extension", _AGENT),
    "permission_mode": _always("extension", _AGENT),
    "mcp_servers": _always("extension", _AGENT),
}


_UNKNOWN = _always("ignored", "not a parameter this gateway knows: ignored")


def _parameters(body: ChatCompletionRequest, sent: dict[str, Any]) -> list[ParameterReport]:
    """Each parameter of `sent` (the request's JSON), those the gateway does not know included."""
    reports = []
    for name in sorted(body.model_fields_set, key=list(ChatCompletionRequest.model_fields).index):
        handling, detail = _PARAMETERS.get(name, _always("ignored", "accepted; not used"))(
            getattr(body, name)
        )
        reports.append(ParameterReport(name=name, handling=handling, detail=detail))
    for name in sorted(sent.keys() - ChatCompletionRequest.model_fields.keys()):
        handling, detail = _UNKNOWN(None)
        reports.append(ParameterReport(name=name[:64], handling=handling, detail=detail))
    return reports


def _verdict(body: ChatCompletionRequest, request: Request, settings: Settings) -> ErrorInfo | None:
    """The first error `POST /v1/chat/completions` would answer before queueing, if any."""
    try:
        plan(core_request(body), request.headers, request.state.request_id, settings)
    except OpenAIError as refused:
        return refused.info
    return None


def _model(body: ChatCompletionRequest, settings: Settings) -> str | None:
    try:
        return resolve_model(body.model, settings)
    except OpenAIError:
        return None


def _original(parameters: list[ParameterReport]) -> OriginalReport:
    return OriginalReport(
        supported_parameters=[p.name for p in parameters if p.handling in ("supported", "extension")],
        unsupported_parameters=[p.name for p in parameters if p.handling in ("ignored", "refused")],
        warnings=[f"{p.name}: {p.detail}" for p in parameters if p.handling == "refused"],
        suggestions=[f"{p.name}: {p.detail}" for p in parameters if p.handling == "ignored"],
    )


@router.post(
    "/v1/compatibility", response_model=CompatibilityReport, responses={400: {"model": ErrorResponse}}
)
async def check_compatibility(
    body: ChatCompletionRequest, request: Request, gateway: GatewayDep
) -> CompatibilityReport:
    error = _verdict(body, request, gateway.settings)
    parameters = _parameters(body, await request.json())
    return CompatibilityReport(
        accepted=error is None,
        error=error,
        model=_model(body, gateway.settings),
        parameters=parameters,
        compatibility_report=_original(parameters),
    )
