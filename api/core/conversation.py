"""The conversation every front end translates its messages into: chat-shaped messages, whose
content is text or text and image parts, and whose function-calling turns are written as in chat."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

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
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _refusal_parts_as_text(cls, content: Any, info: ValidationInfo) -> Any:
        """An assistant's `refusal` part (a transcript sent back as OpenAI wrote it) is what it
        said: text. The spec has it in assistant messages only."""
        if not isinstance(content, list):
            return content
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "refusal":
                if info.data.get("role") != "assistant":
                    raise ValueError("a refusal part belongs in an assistant message")
                part = {"type": "text", "text": part.get("refusal")}
            parts.append(part)
        return parts

    @model_validator(mode="after")
    def _refusal_as_content(self) -> "ChatMessage":
        """An assistant message with its `refusal` and no content (OpenAI's reply sent back):
        the refusal is what it said."""
        if self.role == "assistant" and self.refusal and not self.content:
            self.content = self.refusal
        return self
