"""The OpenAI Chat Completions wire format, as far as the gateway speaks it (schemas from the
official OpenAPI spec).

Requests are validated here; parameters that would change the meaning of a request but that the
gateway cannot honour yet are rejected by `unsupported_parameter`, never silently dropped.
Unknown fields are ignored, as newer clients send fields older servers do not know.
"""

from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from api.core.conversation import ChatMessage
from api.core.request import AgentControls, SessionId
from api.core.wire import STRICT, Metadata, NullIsFalse, ServiceTier
from api.errors import ErrorInfo, OpenAIError
from shared.jobs import JobStatus

# --- Requests -------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ChatCompletionRequest(AgentControls):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: NullIsFalse = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None
    metadata: Metadata | None = None
    service_tier: ServiceTier | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Declared to be refused (`unsupported_parameter`): undeclared, they were dropped unseen.
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Extension: answer at once with the queued job; poll or stream it by id.
    background: bool = False
    session_id: SessionId = None

    def unsupported_parameter(self) -> str | None:
        """The first parameter whose meaning the gateway cannot honour, if any."""
        checks = {
            "logprobs": bool(self.logprobs),
            "top_logprobs": self.top_logprobs is not None,
            "logit_bias": bool(self.logit_bias),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "modalities": any(modality != "text" for modality in self.modalities or []),
            "audio": self.audio is not None,
            "prediction": self.prediction is not None,
            "web_search_options": self.web_search_options is not None,
        }
        return next((name for name, unsupported in checks.items() if unsupported), None)

    def stop_sequences(self) -> list[str]:
        """`stop` as a list: up to 4 non-empty sequences, as OpenAI takes."""
        if not self.stop:
            return []
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stop) > 4 or not all(stop):
            raise OpenAIError.invalid("'stop' takes up to 4 non-empty sequences.", param="stop")
        return stop

    @property
    def legacy_functions(self) -> bool:
        """Offered `functions`, not `tools`: answered in that form (`function_call`), as OpenAI does."""
        return self.functions is not None and not self.tools

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- Responses ------------------------------------------------------------------------------


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None
    cost_usd: float | None = Field(default=None, description="Extension: the backend's reported cost.")


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    reasoning_content: str | None = Field(
        default=None,
        exclude_if=lambda text: text is None,
        description="Extension: the agent's thinking and tool steps (as Open WebUI and others read it).",
    )
    tool_calls: list[dict[str, Any]] | None = Field(default=None, exclude_if=lambda calls: calls is None)
    function_call: dict[str, str] | None = Field(
        default=None,
        exclude_if=lambda call: call is None,
        description="The call, for a request that offered legacy `functions` (one call, no tool_calls).",
    )


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage | None
    # Extensions for jobs retrieved by id or run in the background (OpenAI's background mode).
    status: JobStatus = JobStatus.COMPLETED
    error: ErrorInfo | None = None

    @model_serializer(mode="wrap")
    def _without_null_usage(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        if body.get("usage") is None:  # a queued or running job's: the spec has no null for it
            body.pop("usage", None)
        return body


class ChatCompletionDeleted(BaseModel):
    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    id: str
    deleted: Literal[True] = True
