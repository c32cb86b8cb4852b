"""Limits on what one request may ask of a worker, beyond the body size (`BodyLimit`)."""

from api.core.conversation import ChatMessage, TextPart
from api.errors import OpenAIError
from shared.settings import Settings


def check_prompt_limits(messages: list[ChatMessage], settings: Settings) -> None:
    """400 when the request has more than `MAX_MESSAGES` messages or `MAX_PROMPT_CHARS` of text."""
    if len(messages) > settings.max_messages:
        raise OpenAIError.invalid(
            f"Too many messages: at most {settings.max_messages} per request.",
            param="messages",
            code="too_many_messages",
        )
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text) for part in message.content if isinstance(part, TextPart))
    if total > settings.max_prompt_chars:
        raise OpenAIError.invalid(
            f"The prompt is too long: at most {settings.max_prompt_chars} characters of message text.",
            param="messages",
            code="prompt_too_large",
        )
