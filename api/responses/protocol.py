"""The OpenAI Responses wire format, as far as the gateway speaks it (shapes from the official spec).

A request's input items become the core's chat-shaped messages (`to_chat_messages`), so a response
runs through the same validation, policy and queue as a chat completion. Parameters that would change the
meaning of a request but that the gateway cannot honour are rejected, never silently dropped.

Agents such as Codex CLI send more than function tools: functions grouped in a `namespace` (the
model sees each as `<namespace>__<name>`; its calls go back with `namespace` and `name` apart),
and a hosted web search, which is left out (Claude Code's own WebSearch and WebFetch are there when
the operator's tool policy allows them). Reasoning items they send back are the agent's activity
the gateway itself returned, and are left out of the conversation.
"""

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from api.core.conversation import ChatMessage, ContentPart, ImagePart, TextPart
from api.core.functions import check_function
from api.core.request import AgentControls, ReasoningEffort, SessionId
from api.core.wire import STRICT, Metadata, NullIsFalse, NullIsTrue, ServiceTier
from api.errors import OpenAIError

RESPONSE_ID_PREFIX = "resp_"
MESSAGE_ID_PREFIX = "msg_"
REASONING_ID_PREFIX = "rs_"


class _Reasoning(BaseModel):
    """`reasoning`: its effort becomes the agent's (`reasoning_effort`), checked here so that a wrong
    one is named as the caller wrote it (an outside probe was told of `agent.reasoning_effort`)."""

    model_config = STRICT
    effort: ReasoningEffort | None = None


class CreateResponseRequest(AgentControls):
    model: str
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=16)  # the spec's minimum, as OpenAI refuses less
    stream: NullIsFalse = False
    background: NullIsFalse = False
    store: NullIsTrue = True
    previous_response_id: str | None = None
    metadata: Metadata | None = None
    service_tier: ServiceTier | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    reasoning: _Reasoning | None = None
    max_tool_calls: int | None = Field(default=None, ge=0)
    session_id: SessionId = None

    def unsupported_parameter(self) -> str | None:
        """The first parameter whose meaning the gateway cannot honour, if any."""
        checks = {
            "tools": not all(_servable(tool) for tool in self.tools or []),
            "tool_choice": not (
                self.tool_choice in (None, "none", "auto", "required")
                or (
                    isinstance(self.tool_choice, dict)
                    and self.tool_choice.get("type") in ("function", "allowed_tools")
                )
            ),
            "conversation": self.conversation is not None,
            "prompt": self.prompt is not None,
            # A bound on tool calls, which Claude Code's loop has no way to keep (a probe's was dropped).
            "max_tool_calls": self.max_tool_calls is not None,
            "top_logprobs": bool(self.top_logprobs),
            # Encrypted reasoning is asked for by stateless agents: the reasoning items carry none.
            "include": any(extra != "reasoning.encrypted_content" for extra in self.include or []),
        }
        return next((name for name, unsupported in checks.items() if unsupported), None)


_HOSTED_WEB_SEARCH = re.compile(r"web_search(_preview)?(_[0-9_]+)?")
_NAMESPACE_SEPARATOR = "__"


def _servable(tool: dict[str, Any]) -> bool:
    kind = str(tool.get("type"))
    if kind == "namespace":
        members = tool.get("tools")
        return isinstance(members, list) and all(isinstance(m, dict) and _servable(m) for m in members)
    return kind == "function" or _HOSTED_WEB_SEARCH.fullmatch(kind) is not None


def _functions(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The function tools, a namespace's under their qualified names; hosted tools left out.
    Each is checked here, where the error can name the caller's own field."""
    functions: list[dict[str, Any]] = []
    for index, tool in enumerate(tools or []):
        if tool.get("type") == "namespace":
            members = tool.get("tools") or []
            prefix = f"{tool.get('name')}{_NAMESPACE_SEPARATOR}"
            for number, member in enumerate(members):
                check_function(member, f"tools[{index}].tools[{number}]")
            functions += [{**member, "name": f"{prefix}{member.get('name')}"} for member in members]
        elif tool.get("type") == "function":
            check_function(tool, f"tools[{index}]")
            functions.append(tool)
    return functions


def split_name(name: str, tools: list[dict[str, Any]]) -> tuple[str | None, str]:
    """A called function's (namespace, name) as the request's tools define it."""
    for tool in tools:
        namespace = tool.get("name")
        if tool.get("type") == "namespace" and name.startswith(f"{namespace}{_NAMESPACE_SEPARATOR}"):
            return str(namespace), name.removeprefix(f"{namespace}{_NAMESPACE_SEPARATOR}")
    return None, name


class _InputPart(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None
    image_url: str | None = None
    refusal: str | None = None


class _InputMessage(BaseModel):
    model_config = STRICT
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[_InputPart]


def _part(part: _InputPart, param: str, role: str = "user") -> ContentPart:
    """One content part of a message of `role` (a function's output is the user's)."""
    if part.type in ("input_text", "output_text") and part.text is not None:
        return TextPart(type="text", text=part.text)
    if part.type == "refusal" and part.refusal is not None:  # an earlier reply's, sent back: what it said
        if role != "assistant":
            raise OpenAIError.invalid("A refusal part belongs in an assistant message.", param=param)
        return TextPart(type="text", text=part.refusal)
    if part.type == "input_image" and part.image_url is not None:
        return ImagePart(type="image_url", image_url={"url": part.image_url})
    raise OpenAIError.invalid(
        f"Content of type '{part.type[:40]}' is not supported by this gateway.",
        param=param,
        code="unsupported_content",
    )


def _function_item(raw: dict[str, Any], param: str) -> ChatMessage:
    """A function call of an earlier turn, or its result, as the chat message that carries it."""
    call_id = raw.get("call_id")
    if not isinstance(call_id, str):
        raise OpenAIError.invalid("A function call item needs its 'call_id'.", param=f"{param}.call_id")
    if raw["type"] == "function_call_output":
        return ChatMessage(role="tool", tool_call_id=call_id, content=_output(raw.get("output"), param))
    name = str(raw.get("name"))
    if namespace := raw.get("namespace"):
        name = f"{namespace}{_NAMESPACE_SEPARATOR}{name}"
    function = {"name": name, "arguments": str(raw.get("arguments") or "{}")}
    return ChatMessage(
        role="assistant", tool_calls=[{"id": call_id, "type": "function", "function": function}]
    )


def _output(output: Any, param: str) -> str | list[ContentPart]:
    """A function's output: a string, or its content parts (the core decides which a result may hold)."""
    if isinstance(output, str):
        return output
    if not isinstance(output, list):  # as OpenAI refuses it: taken as empty, an image in it was lost
        raise OpenAIError.invalid(
            "A function's output is a string or a list of content parts.", param=f"{param}.output"
        )
    try:
        parts = [_InputPart.model_validate(part) for part in output]
    except ValueError:
        raise OpenAIError.invalid(
            "A function's output parts need a 'type'.", param=f"{param}.output"
        ) from None
    return [_part(part, f"{param}.output[{i}]") for i, part in enumerate(parts)]


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The request's function tools (flat, or in namespaces) as chat tools."""
    keys = ("name", "description", "parameters")
    functions = _functions(tools)
    return [{"type": "function", "function": {k: f[k] for k in keys if k in f}} for f in functions] or None


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Responses' choice in chat's shape: a function is `{"type": "function", "name"}` here, and
    `allowed_tools` has its `mode` and `tools` at the top."""
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {"mode": choice.get("mode"), "tools": choice.get("tools")}
        if isinstance(allowed["tools"], list):
            allowed["tools"] = [chat_tool_choice(tool) for tool in allowed["tools"]]
        return {"type": "allowed_tools", "allowed_tools": allowed}
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def to_chat_messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """The request's input as chat messages; 400 on an item the gateway cannot run."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    messages: list[ChatMessage] = []
    for index, raw in enumerate(items):
        param = f"input[{index}]"
        if raw.get("type") in ("function_call", "function_call_output"):
            messages.append(_function_item(raw, param))
            continue
        if raw.get("type") == "reasoning":
            continue
        if raw.get("type", "message") != "message":
            raise OpenAIError.invalid(
                f"Input items of type '{str(raw.get('type'))[:40]}' are not supported by this gateway.",
                param=param,
                code="unsupported_input_item",
            )
        try:
            item = _InputMessage.model_validate(raw)
        except ValueError:
            raise OpenAIError.invalid(
                "An input message needs a role (user, assistant, system or developer) and content.",
                param=param,
            ) from None
        content: str | list[ContentPart] = (
            item.content
            if isinstance(item.content, str)
            else [_part(part, f"{param}.content[{i}]", item.role) for i, part in enumerate(item.content)]
        )
        messages.append(ChatMessage(role=item.role, content=content))
    return messages


# --- Responses ------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class SummaryText(BaseModel):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningItem(BaseModel):
    """The agent's thinking and tool steps (a line each), as a reasoning item's summary."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[SummaryText]
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class FunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    namespace: str | None = None
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"

    @model_serializer(mode="wrap")
    def _without_empty_namespace(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        if body.get("namespace") is None:  # the spec has no null for it
            body.pop("namespace", None)
        return body


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int
    cost_usd: float | None = Field(default=None, description="Extension: the backend's reported cost.")


class ResponseError(BaseModel):
    code: Literal["server_error", "rate_limit_exceeded"]
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


ResponseStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    background: bool
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[ReasoningItem | OutputMessage | FunctionCall] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None
    temperature: float | None
    top_p: float | None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["auto", "disabled"] = "disabled"
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: ResponseUsage | None = None

    def wire(self) -> dict[str, Any]:
        """The JSON body: `usage` is absent until there is one (the spec has no null for it)."""
        return self.model_dump(exclude={"usage"} if self.usage is None else None)


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True
