"""The Anthropic Messages wire format (`POST /v1/messages`), as far as the gateway speaks it.

A request becomes the core request (`core_request`), so it runs through the same validation,
policy and queue as a chat completion. Parameters the gateway cannot honour are rejected.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api.core.conversation import ChatMessage, ContentPart, ImagePart, TextPart
from api.core.functions import inert
from api.core.request import AgentControls, CompletionRequest, ReasoningEffort, SessionId
from api.core.wire import STRICT
from api.errors import OpenAIError
from shared.jobs import Done, FinishReason, ToolCall, Usage

MESSAGE_ID_PREFIX = "msg_"
_OWN_THINKING = ("thinking", "redacted_thinking")
"""Blocks of an assistant turn that a client sends back as the gateway gave them (`ThinkingBlock`,
as Anthropic's clients do): the agent's steps, dropped from the conversation as chat's
`reasoning_content` is."""
_TOOL_CHOICES = ("auto", "any", "tool", "none")


class _Block(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None
    source: dict[str, Any] | str | None = None  # a `search_result`'s is a string (its URL or name)
    # tool_use (assistant) and tool_result (user) blocks of a function-calling turn
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    tool_name: str | None = None  # a tool_reference (in a tool_result): a tool search's find


class AnthropicMessage(BaseModel):
    model_config = STRICT
    role: Literal["user", "assistant", "system"]
    """`system` in the conversation (Claude Code's mid-conversation instructions, refused before:
    an outside probe): it joins the system prompt, as chat's system messages do."""
    content: str | list[_Block]


class _OutputConfig(BaseModel):
    """`output_config`: `effort` is the agent's (`reasoning_effort`); `format` (structured outputs)
    is refused. Claude Code sends `effort` to newer models; it was dropped (an outside probe)."""

    model_config = STRICT
    effort: ReasoningEffort | None = None
    format: dict[str, Any] | None = None


class CreateMessageRequest(AgentControls):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[_Block] | None = None
    stream: bool = False
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None
    output_config: _OutputConfig | None = None
    container: str | dict[str, Any] | None = None
    session_id: SessionId = None

    def unsupported_parameter(self) -> str | None:
        checks = {
            # Structured outputs and code execution's container: each was dropped, and a caller
            # asking for JSON got free text with a 200 (an outside probe).
            "output_format": self.output_format is not None,
            "output_config.format": self.output_config is not None and self.output_config.format is not None,
            "container": self.container is not None,
            "tools": any(tool.get("type", "custom") != "custom" for tool in self.tools or []),
            "tool_choice": (self.tool_choice or {}).get("type", "auto")
            not in ("auto", "any", "tool", "none"),
            "thinking": (self.thinking or {}).get("type", "enabled")
            not in ("enabled", "disabled", "adaptive"),
        }
        return next((name for name, unsupported in checks.items() if unsupported), None)


def _part(block: _Block, param: str) -> ContentPart:
    if block.type == "tool_reference":
        # Claude Code's tool search answers with the tools it found, for the model API to load.
        # The model here has every function offered already: the find is said in words (it was
        # refused, and Claude Code gave up its tool search for the session: an outside probe).
        if not block.tool_name:
            raise OpenAIError.invalid(f"{param}.tool_name: Field required", param=f"{param}.tool_name")
        return TextPart(type="text", text=f"Tool found: {block.tool_name[:128]}")
    if block.type == "text":
        if block.text is None:  # a kind it takes, without what it holds (a probe was told "not supported")
            raise OpenAIError.invalid(f"{param}.text: Field required", param=f"{param}.text")
        return TextPart(type="text", text=block.text)
    source = block.source if isinstance(block.source, dict) else {}
    if block.type == "image" and source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        return ImagePart(type="image_url", image_url={"url": url})
    if block.type == "image" and source.get("type") == "url":
        return ImagePart(type="image_url", image_url={"url": source.get("url")})
    if block.type == "image":  # a kind it takes, from a source it cannot (said "not supported": a probe)
        raise OpenAIError.invalid(
            "An image's source must be {'type': 'base64', 'media_type', 'data'} or {'type': 'url', 'url'}.",
            param=f"{param}.source",
        )
    raise OpenAIError.invalid(
        f"Content blocks of type '{block.type[:40]}' are not supported by this gateway.",
        param=param,
        code="unsupported_content",
    )


def _call(block: _Block) -> dict[str, Any]:
    arguments = json.dumps(block.input or {})
    return {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}


def _block(raw: dict[str, Any], param: str) -> _Block:
    """A content block inside a tool_result, as sent (a list of JSON objects)."""
    try:
        return _Block.model_validate(raw)
    except ValueError:
        kind = raw.get("type")
        if not isinstance(kind, str):
            raise OpenAIError.invalid("A content block needs a 'type'.", param=param) from None
        raise OpenAIError.invalid(
            f"Content blocks of type '{kind[:40]}' are not supported by this gateway.",
            param=param,
            code="unsupported_content",
        ) from None


def _result(block: _Block, param: str) -> ChatMessage:
    """A tool_result block as a chat tool message, its content parts kept (the core decides which
    a result may hold)."""
    if not isinstance(block.content, list):
        parts: list[ContentPart] = [TextPart(type="text", text=block.content or "")]
    else:
        parts = [
            _part(_block(raw, f"{param}.content[{i}]"), f"{param}.content[{i}]")
            for i, raw in enumerate(block.content)
        ]
    if block.is_error:  # as Claude Code words a tool's failure to the model
        text = "\n".join(part.text for part in parts if isinstance(part, TextPart))
        others = [part for part in parts if not isinstance(part, TextPart)]
        # Its text cannot end the wrapper: a failed tool's output read as a success (an outside probe).
        wrapped = f"<tool_use_error>{inert(text, 'tool_use_error')}</tool_use_error>"
        parts = [TextPart(type="text", text=wrapped), *others]
    return ChatMessage(role="tool", tool_call_id=block.tool_use_id, content=parts)


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Anthropic tools (`input_schema`) as chat function tools (`parameters`)."""
    if not tools:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": tool.get("name"),
                "description": tool.get("description", ""),
                "parameters": tool.get("input_schema"),
            },
        }
        for tool in tools
    ]


def _chat_tool_choice(choice: dict[str, Any] | None) -> str | dict[str, Any] | None:
    kind = (choice or {}).get("type")
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": (choice or {}).get("name")}}
    return kind


def _check(body: CreateMessageRequest) -> None:
    """What Anthropic's API refuses although each field has its type (400 naming the field)."""
    for i, tool in enumerate(body.tools or []):
        for field, kind, wanted in (("name", str, "a string"), ("input_schema", dict, "an object")):
            if field not in tool:
                raise OpenAIError.invalid(f"tools.{i}.{field}: Field required", param=f"tools[{i}].{field}")
            if not isinstance(tool[field], kind):
                raise OpenAIError.invalid(f"tools.{i}.{field}: must be {wanted}", param=f"tools[{i}].{field}")
    if body.thinking is not None and body.thinking.get("type", "enabled") == "enabled":
        budget = body.thinking.get("budget_tokens")
        if type(budget) is not int or budget < 1024:
            required = "thinking.budget_tokens: an integer of at least 1024 is required"
            raise OpenAIError.invalid(required, param="thinking.budget_tokens")
        if budget >= body.max_tokens:
            raise OpenAIError.invalid(
                "max_tokens must be greater than thinking.budget_tokens", param="max_tokens"
            )
    called: set[str | None] = set()  # the tool_use ids of the message before
    last = len(body.messages) - 1
    for index, message in enumerate(body.messages):
        blocks = [] if isinstance(message.content, str) else message.content
        # Whitespace is no content to Anthropic's API either (Claude Code put placeholders in its
        # place: "(no content)", an outside probe).
        empty = (isinstance(message.content, str) and not message.content.strip()) or not message.content
        empty = empty or any(block.type == "text" and not (block.text or "").strip() for block in blocks)
        if empty and not (message.role == "assistant" and index == last):
            raise OpenAIError.invalid(
                f"messages.{index}: all messages must have non-empty content except for the optional "
                "final assistant message",
                param=f"messages[{index}].content",
            )
        if message.role == "system":  # instructions between turns: the calls' pairing goes on past them
            if any(block.type != "text" for block in blocks):
                raise OpenAIError.invalid(
                    f"messages.{index}: a system message holds text only", param=f"messages[{index}].content"
                )
            continue
        if orphans := [
            b.tool_use_id for b in blocks if b.type == "tool_result" and b.tool_use_id not in called
        ]:
            raise OpenAIError.invalid(
                f"messages.{index}: tool_result for '{str(orphans[0])[:64]}' answers no tool_use block "
                "of the previous message",
                param=f"messages[{index}].content",
            )
        called = {block.id for block in blocks if block.type == "tool_use"}


def core_request(body: CreateMessageRequest) -> CompletionRequest:
    """The request as the core runs it; 400 on what the gateway cannot run."""
    if (unsupported := body.unsupported_parameter()) is not None:
        raise OpenAIError.unsupported(unsupported)
    _check(body)
    messages: list[ChatMessage] = []
    if isinstance(body.system, str):
        messages.append(ChatMessage(role="system", content=body.system))
    elif body.system:
        system = [_part(block, f"system[{i}]") for i, block in enumerate(body.system)]
        messages.append(ChatMessage(role="system", content=system))
    for index, message in enumerate(body.messages):
        if isinstance(message.content, str):
            messages.append(ChatMessage(role=message.role, content=message.content))
            continue
        skipped = ("tool_use", "tool_result", *(_OWN_THINKING if message.role == "assistant" else ()))
        blocks = [(i, b) for i, b in enumerate(message.content) if b.type not in skipped]
        content = [_part(b, f"messages[{index}].content[{i}]") for i, b in blocks]
        calls = [_call(b) for b in message.content if b.type == "tool_use"]
        messages += [
            _result(b, f"messages[{index}].content[{i}]")
            for i, b in enumerate(message.content)
            if b.type == "tool_result"
        ]
        if content or calls or len(blocks) == len(message.content):  # not only tool results
            messages.append(ChatMessage(role=message.role, content=content, tool_calls=calls or None))
    return CompletionRequest.translated(
        model=body.model,
        messages=messages,
        tools=_chat_tools(body.tools),
        tool_choice=_chat_tool_choice(body.tool_choice),
        parallel_tool_calls=not (body.tool_choice or {}).get("disable_parallel_tool_use", False),
        max_tokens=body.max_tokens,
        stop=body.stop_sequences or [],
        stream=body.stream,
        session_id=body.session_id,
        agent=_agent(body),
    )


def _agent(body: CreateMessageRequest) -> dict[str, Any]:
    """The agent controls, with `thinking` as the thinking budget: `enabled` with its
    `budget_tokens`, `disabled` none, `adaptive` Claude Code's default. The agent's thinking and
    tool steps are `thinking` blocks only when `thinking` asks for them (`enabled`, `adaptive`),
    as the real API shows thinking: a client written for it reads `content[0].text` (found by an
    outside probe: it failed on a thinking block, and LangChain's content became a list)."""
    agent = body.agent_controls().model_dump()
    thinking = body.thinking or {}
    if agent["max_thinking_tokens"] is None and thinking.get("type") in ("enabled", "disabled"):
        agent["max_thinking_tokens"] = thinking.get("budget_tokens") if thinking["type"] == "enabled" else 0
    if agent["include_reasoning"] is None:
        agent["include_reasoning"] = thinking.get("type") in ("enabled", "adaptive")
    if agent["reasoning_effort"] is None and body.output_config is not None:
        agent["reasoning_effort"] = body.output_config.effort
    return agent


# --- Responses ------------------------------------------------------------------------------

_STOP_REASONS = {
    FinishReason.STOP: "end_turn",
    FinishReason.LENGTH: "max_tokens",
    FinishReason.TOOL_CALLS: "tool_use",
    FinishReason.CONTENT_FILTER: "refusal",
}


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlock(BaseModel):
    """The agent's thinking and tool steps; unsigned (the gateway cannot sign them). Sent back in
    an assistant turn, it is dropped (`_OWN_THINKING`)."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingBlock | TextBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None = None
    usage: MessageUsage


def usage_body(usage: Usage) -> MessageUsage:
    """Our usage counts the prompt cache's reads and writes in the prompt, as OpenAI does;
    Anthropic's input tokens are those neither read from it nor written to it."""
    return MessageUsage(
        input_tokens=usage.prompt_tokens - usage.cached_prompt_tokens - usage.cache_write_tokens,
        output_tokens=usage.completion_tokens,
        cache_creation_input_tokens=usage.cache_write_tokens,
        cache_read_input_tokens=usage.cached_prompt_tokens,
    )


def stop_reason(done: Done) -> str:
    if done.stop_sequence is not None:
        return "stop_sequence"
    return "model_context_window_exceeded" if done.context_window_full else _STOP_REASONS[done.finish_reason]


def tool_use_blocks(calls: list[ToolCall]) -> list[ToolUseBlock]:
    return [ToolUseBlock(id=call.id, name=call.name, input=json.loads(call.arguments)) for call in calls]
