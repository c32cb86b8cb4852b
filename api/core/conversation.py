"""The conversation every front end translates its messages into: chat-shaped messages, whose
content is text or text and image parts, and whose function-calling turns are written as in chat."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api.core.wire import STRICT


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = STRICT
    type: Literal["image_url"]
    image_url: dict[str, Any]


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
