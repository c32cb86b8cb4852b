"""OpenAI chat requests → `CompletionJob`s: what the worker needs, validated, nothing more."""

from api.errors import OpenAIError
from api.protocol import ChatCompletionRequest, ChatMessage, TextPart
from shared.jobs import CompletionJob, Turn
from shared.settings import Settings


def _text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts: list[str] = []
    for part in message.content:
        if not isinstance(part, TextPart):
            raise OpenAIError.invalid(
                "Image content is not supported by this gateway yet.",
                param=f"messages[{index}].content",
                code="unsupported_content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def build_job(request: ChatCompletionRequest, request_id: str, settings: Settings) -> CompletionJob:
    if request.model not in settings.models:
        raise OpenAIError(
            404,
            f"The model '{request.model}' does not exist or you do not have access to it.",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    if (unsupported := request.unsupported_parameter()) is not None:
        raise OpenAIError.invalid(
            f"The parameter '{unsupported}' is not supported by this gateway.",
            param=unsupported,
            code="unsupported_parameter",
        )
    system: list[str] = []
    turns: list[Turn] = []
    for index, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            system.append(_text(message, index))
        elif message.role in ("user", "assistant"):
            turns.append(Turn(role=message.role, text=_text(message, index)))
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
        system_prompt="\n\n".join(system) or None,
        turns=turns,
        max_tokens=request.token_limit,
    )
