"""Chat completion requests → the core request (`api/core/request.py`)."""

from api.chat.protocol import ChatCompletionRequest
from api.core.request import CompletionRequest
from api.core.structured import ResponseFormat
from api.errors import OpenAIError


def core_request(body: ChatCompletionRequest) -> CompletionRequest:
    """The request as the core runs it; 400 on a parameter the gateway cannot honour, and on what
    OpenAI's API refuses though each field alone is valid."""
    if (unsupported := body.unsupported_parameter()) is not None:
        raise OpenAIError.unsupported(unsupported)
    _check_consistent(body)
    return CompletionRequest(
        model=body.model,
        messages=body.messages,
        max_tokens=body.token_limit,
        stop=body.stop_sequences(),
        tools=body.tools,
        functions=body.functions,
        tool_choice=body.tool_choice,
        function_call=body.function_call,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=ResponseFormat.from_request(body.response_format),
        n=body.n or 1,
        stream=body.stream,
        background=body.background,
        session_id=body.session_id,
        agent=body.agent_controls(),
    )


def _check_consistent(body: ChatCompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise OpenAIError.invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
    for index, turn in enumerate(body.messages):
        if turn.role == "tool" and turn.tool_call_id is None:
            raise OpenAIError.invalid(
                "A message with role 'tool' must name the call it answers (tool_call_id).",
                param=f"messages[{index}].tool_call_id",
            )
        if turn.content is None and turn.role != "assistant":  # only a reply of calls has none
            raise OpenAIError.invalid(
                f"A message with role '{turn.role}' must have content.", param=f"messages[{index}].content"
            )
