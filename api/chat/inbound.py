"""Chat completion requests → the core request (`api/core/request.py`)."""

from api.chat.protocol import ChatCompletionRequest
from api.core.request import CompletionRequest
from api.core.structured import ResponseFormat
from api.errors import OpenAIError


def core_request(body: ChatCompletionRequest) -> CompletionRequest:
    """The request as the core runs it; 400 on a parameter the gateway cannot honour."""
    if (unsupported := body.unsupported_parameter()) is not None:
        raise OpenAIError.unsupported(unsupported)
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
