"""OpenAI chat requests → `CompletionJob`s: what the worker needs, validated, nothing more."""

from api.catalog import resolve_model
from api.chat.protocol import ChatCompletionRequest
from api.core.content import message_content
from api.errors import OpenAIError
from shared.agent import AgentRequest
from shared.jobs import CompletionJob, Turn
from shared.settings import Settings


def build_job(
    request: ChatCompletionRequest, request_id: str, settings: Settings, agent: AgentRequest | None = None
) -> CompletionJob:
    backend_model = resolve_model(request.model, settings)
    if (unsupported := request.unsupported_parameter()) is not None:
        raise OpenAIError.invalid(
            f"The parameter '{unsupported}' is not supported by this gateway.",
            param=unsupported,
            code="unsupported_parameter",
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
        max_tokens=request.token_limit,
        stop=_stop_sequences(request),
        agent=agent or AgentRequest(),
    )


def _stop_sequences(request: ChatCompletionRequest) -> list[str]:
    stops = request.stop_sequences()
    if len(stops) > 4 or not all(stops):
        raise OpenAIError.invalid("'stop' takes up to 4 non-empty sequences.", param="stop")
    return stops
