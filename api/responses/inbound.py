"""Responses API requests → the core request, and the request's side kept with the response."""

from typing import Any

from api.core.conversation import ChatMessage
from api.core.request import CompletionRequest
from api.core.structured import ResponseFormat
from api.errors import OpenAIError
from api.responses.protocol import CreateResponseRequest, chat_tool_choice, chat_tools, to_chat_messages
from api.responses.response import StoredResponse
from shared.settings import Settings


def check_supported(body: CreateResponseRequest) -> None:
    """400 on what the gateway cannot honour, before anything is read or queued."""
    if (unsupported := body.unsupported_parameter()) is not None:
        raise OpenAIError.unsupported(unsupported)
    if body.background and not body.store:
        raise OpenAIError.invalid("A background response must be stored (store: true).", param="store")


def core_request(body: CreateResponseRequest, earlier: list[ChatMessage]) -> CompletionRequest:
    """The request as the core runs it: `earlier` is the conversation it continues, if any."""
    system = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    return CompletionRequest.translated(
        model=body.model,
        messages=[*system, *earlier, *to_chat_messages(body.input)],
        max_tokens=body.max_output_tokens,
        tools=chat_tools(body.tools),
        tool_choice=chat_tool_choice(body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=ResponseFormat.from_text_format((body.text or {}).get("format")),
        stream=body.stream,
        background=body.background,
        session_id=body.session_id,
        agent=_agent(body),
    )


def stored_request(
    body: CreateResponseRequest, request: CompletionRequest, settings: Settings, session_id: str | None
) -> StoredResponse:
    """What the response keeps of its request (retrieval, continuation)."""
    conversation = request.messages[1:] if body.instructions else request.messages
    return StoredResponse(
        background=body.background,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        previous_response_id=body.previous_response_id,
        metadata=body.metadata or {},
        temperature=body.temperature,
        top_p=body.top_p,
        # Not kept unless it may be continued: the messages (images included) are the bulk of it.
        conversation=conversation if body.store else [],
        store=body.store,
        text_format=(body.text or {}).get("format") if request.response_format is not None else None,
        # A function's fields the Response names even when unsent; other tools as they came.
        tools=[
            {"strict": True, "parameters": None, **tool} if tool.get("type") == "function" else tool
            for tool in body.tools or []
        ],
        tool_choice=body.tool_choice or "auto",
        parallel_tool_calls=body.parallel_tool_calls is not False,
        reasoning=settings.stream_reasoning and body.include_reasoning is not False,
        effort=request.agent.reasoning_effort,
        session_id=session_id,
    )


def _agent(body: CreateResponseRequest) -> dict[str, Any]:
    """The agent controls, with `reasoning.effort` as the core's `reasoning_effort`."""
    agent = body.agent_controls().model_dump()
    if body.reasoning is not None and body.reasoning.effort is not None and agent["reasoning_effort"] is None:
        agent["reasoning_effort"] = body.reasoning.effort
    return agent
