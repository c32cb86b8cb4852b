"""Core requests → `CompletionJob`s: what the worker needs, validated, nothing more."""

from api.catalog import resolve_model
from api.core.content import message_content
from api.core.request import CompletionRequest
from api.errors import OpenAIError
from shared.agent import AgentRequest
from shared.jobs import CompletionJob, Turn
from shared.settings import Settings


def build_job(
    request: CompletionRequest, request_id: str, settings: Settings, agent: AgentRequest
) -> CompletionJob:
    """The request's job; `request` has had its function-calling parts taken out (`function_calling`)."""
    backend_model = resolve_model(request.model, settings)
    for param in ("tool_choice", "function_call"):
        if getattr(request, param) not in (None, "none", "auto"):  # a choice among no functions
            raise OpenAIError.invalid(
                f"{param} asks for a function call, but no functions are offered.", param=param
            )
    system: list[str] = []
    turns: list[Turn] = []
    for index, message in enumerate(request.messages):
        text, images = message_content(message, index, settings.image_url_allowlist)
        if message.role in ("system", "developer"):
            system.append(text)
        elif message.role in ("user", "assistant"):
            turns.append(Turn(role=message.role, text=text, images=images))
        else:
            raise OpenAIError.invalid(
                f"Messages with role '{message.role}' are not supported by this gateway yet.",
                param=f"messages[{index}].role",
                code="unsupported_message_role",
            )
    if not turns or turns[-1].role != "user":
        raise OpenAIError.invalid(
            "The last non-system message must be from the user.", param="messages", code="invalid_messages"
        )
    return CompletionJob(
        request_id=request_id,
        model=request.model,
        backend_model=None if backend_model == request.model else backend_model,
        system_prompt="\n\n".join(system) or None,
        turns=turns,
        max_tokens=request.max_tokens,
        stop=request.stop,
        agent=agent,
    )
