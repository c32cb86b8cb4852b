"""Limits on what one request may ask of a worker, beyond the body size (`BodyLimit`).

Two stages: `bounded_json` runs on the raw body before any route or model sees it, so an
oversized list, a deeply nested value, a number JSON does not have (`NaN`) or a string no UTF-8
can carry (a lone surrogate escape) is refused for the price of one `json.loads` (a 3 MiB body
of empty messages used to cost ~160 MiB and a second of event loop in validation before
`MAX_MESSAGES` applied); `check_prompt_limits` runs on the request as the chat core reads it.
"""

import json
import re

from api.core.conversation import ImagePart, TextPart
from api.core.request import CompletionRequest
from api.errors import OpenAIError
from shared.settings import Settings

MAX_JSON_DEPTH = 64
"""Nesting of a request body's objects and arrays (function parameters included): pydantic
cannot serialise ~255 levels, and nothing the APIs take needs more than a few dozen."""
MAX_JSON_BRACKETS = 500_000
"""`[` and `{` in a request body, counted before it is parsed (those in its strings too, so far
over what a request holds): found by an outside probe, 3.5 million empty arrays in 10 MiB cost
an API process 310 MB and 2.6 s of its event loop to parse."""
_LISTS_OF_MESSAGES = ("messages", "input")  # chat and Messages; Responses' input items
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""`\\uD800` to `\\uDFFF`: half of a UTF-16 pair, which JSON text may escape but only as a pair."""


def too_many_messages(settings: Settings, param: str = "messages") -> OpenAIError:
    return OpenAIError.invalid(
        f"Too many messages: at most {settings.max_messages} per request.",
        param=param,
        code="too_many_messages",
    )


class _NotJsonNumber(Exception):
    """`NaN`, `Infinity` or `-Infinity`: Python's `json` reads them, JSON has no such numbers."""


def _refuse_constant(name: str) -> object:
    raise _NotJsonNumber(name)


def _utf8_text(body: bytes) -> str | None:
    """The body's text, None unless it is UTF-8 (RFC 8259's JSON text): Python's `json` reads
    UTF-16 and UTF-32 too, and UTF-8 with encoded surrogates, past the checks below: a lone
    surrogate so sent was a 500 (an outside probe, and a re-check probe). Decoded once, as `json`
    would have decoded the bytes itself."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return None
    try:
        return body.decode("utf-8-sig")  # strict; a leading BOM dropped, as `json` drops it
    except UnicodeDecodeError:
        return None


def bounded_json(body: bytes, settings: Settings) -> OpenAIError | None:
    """Why a JSON request body is refused before it is validated, or None (malformed JSON is
    left to the route, which says where)."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_BRACKETS:
        message = (
            f"The request body has more than {MAX_JSON_BRACKETS} '[' and '{{' (JSON arrays and objects, "
            "or those characters in its text): send less in one request."
        )
        return OpenAIError.invalid(message, code="too_many_json_values")
    if (text := _utf8_text(body)) is None:
        return OpenAIError.invalid(
            "The request body is not valid JSON: it is not UTF-8.", code="invalid_json"
        )
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        return _too_deep()
    except _NotJsonNumber as constant:
        # Else a NaN would reach the models, and a bounded field would call it out of range.
        message = f"The request body is not valid JSON: {constant} is not a JSON number."
        return OpenAIError.invalid(message, code="invalid_json")
    except ValueError:
        return None
    if _SURROGATE_ESCAPE.search(body) and _lone_surrogate(value):
        # Python's `json` reads one into a string that UTF-8 cannot encode: every later step
        # (the job's record, the CLI's input) would fail on it.
        message = (
            "The request body is not valid JSON text: it escapes half of a UTF-16 surrogate pair "
            "(\\uD800-\\uDFFF) without the other half."
        )
        return OpenAIError.invalid(message, code="invalid_json")
    if isinstance(value, dict):
        for param in _LISTS_OF_MESSAGES:
            if isinstance(value.get(param), list) and len(value[param]) > settings.max_messages:
                return too_many_messages(settings, param)
    level: list[object] = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return None
    return _too_deep()


def _lone_surrogate(value: object) -> bool:
    """Whether a key or string in `value` holds a surrogate that is not part of a pair (`json`
    joins a well-formed pair into one character)."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _too_deep() -> OpenAIError:
    return OpenAIError.invalid(
        f"The request body is nested too deeply: at most {MAX_JSON_DEPTH} levels of objects and arrays.",
        code="too_deeply_nested",
    )


def check_prompt_limits(request: CompletionRequest, settings: Settings) -> None:
    """400 when the request has more than `MAX_MESSAGES` messages, `MAX_IMAGE_BYTES` of inline
    images or `MAX_PROMPT_CHARS` of text: messages, the calls in them and the caller's functions,
    all of which the model is sent."""
    messages = request.messages
    if len(messages) > settings.max_messages:
        raise too_many_messages(settings)
    total = images = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text) for part in message.content if isinstance(part, TextPart))
            images += sum(
                len(str(part.image_url.get("url", "")))
                for part in message.content
                if isinstance(part, ImagePart)
            )
        calls = [*(message.tool_calls or []), *([message.function_call] if message.function_call else [])]
        total += sum(len(json.dumps(call, ensure_ascii=False)) for call in calls)
        total += len(message.tool_call_id or "") + len(message.name or "")  # both go into the prompt
    functions = [*(request.tools or []), *(request.functions or [])]
    total += sum(len(json.dumps(function, ensure_ascii=False)) for function in functions)
    if images > settings.max_image_bytes:
        raise OpenAIError.invalid(
            f"The images are too large: at most {settings.max_image_bytes} bytes of inline image data.",
            param="messages",
            code="images_too_large",
        )
    if total > settings.max_prompt_chars:
        raise OpenAIError.invalid(
            f"The prompt is too long: at most {settings.max_prompt_chars} characters of message text "
            "(with tool calls and functions).",
            param="messages",
            code="prompt_too_large",
        )
