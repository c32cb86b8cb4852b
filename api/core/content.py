"""OpenAI message content → the text and images of a `Turn`.

Images come as `image_url` parts: a base64 `data:` URL becomes an inline image; a remote URL is
refused unless it starts with one of the operator's `IMAGE_URL_ALLOWLIST` prefixes, and then it
is passed on for the model API to fetch. The gateway itself never fetches a caller's URL.
"""

import base64
import binascii
import re

from api.core.conversation import ChatMessage, ImagePart, TextPart
from api.errors import OpenAIError
from shared.jobs import ImageSource

_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)


def message_content(message: ChatMessage, index: int, allowlist: list[str]) -> tuple[str, list[ImageSource]]:
    """The message's text (its text parts joined by newlines) and its images, in order."""
    if message.content is None:
        return "", []
    if isinstance(message.content, str):
        return message.content, []
    texts: list[str] = []
    images: list[ImageSource] = []
    for number, part in enumerate(message.content):
        param = f"messages[{index}].content[{number}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif message.role != "user":
            raise OpenAIError.invalid(
                f"Images are only accepted in user messages, not in '{message.role}' messages.",
                param=param,
                code="unsupported_content",
            )
        else:
            images.append(_image(part, param, allowlist))
    return "\n".join(texts), images


def _image(part: ImagePart, param: str, allowlist: list[str]) -> ImageSource:
    url = part.image_url.get("url")
    if not isinstance(url, str) or not url:
        raise OpenAIError.invalid("An image_url part needs a 'url'.", param=f"{param}.image_url.url")
    if url.startswith("data:"):
        return _inline(url, f"{param}.image_url.url")
    if url.startswith("https://") and any(url.startswith(prefix) for prefix in allowlist):
        return ImageSource(type="url", url=url)
    raise OpenAIError.invalid(
        "Remote image URLs are not accepted by this gateway; send the image inline as a base64 "
        "data URL (data:image/png;base64,...).",
        param=f"{param}.image_url.url",
        code="image_url_not_allowed",
    )


def _inline(url: str, param: str) -> ImageSource:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise OpenAIError.invalid(
            "An image data URL must be data:<media type>;base64,<data>.", param=param, code="invalid_image"
        )
    media_type, data = match["type"].lower(), match["data"]
    if media_type not in _MEDIA_TYPES:
        raise OpenAIError.invalid(
            f"Image type '{media_type}' is not supported; use one of {', '.join(_MEDIA_TYPES)}.",
            param=param,
            code="invalid_image",
        )
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        raise OpenAIError.invalid(
            "The image data is not valid base64.", param=param, code="invalid_image"
        ) from None
    return ImageSource(type="base64", media_type=media_type, data=data)
