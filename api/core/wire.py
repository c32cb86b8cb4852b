"""What every front end's requests share: which bodies are JSON, how strictly a value's JSON type is
taken."""

import email.message
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BeforeValidator, ConfigDict, Field


def is_json_type(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this Content-Type (its first, decoded as Latin-1) as JSON,
    judged as it judges it (the email parser): any other reading let a request skip the checks
    before parsing while FastAPI parsed it anyway (outside probes: a second header,
    `application/json\xa0`; 500s, and 10 MB of `[]` holding 1.7 GB)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


STRICT = ConfigDict(strict=True, extra="ignore")
"""Every request model's: a value of the wrong JSON type is refused, as OpenAI's API does
(`"stream": "yes"` and `"n": true` were taken as true and 1), and fields a newer client sends
are ignored."""


def _null_is(default: bool) -> Callable[[object], object]:
    return lambda value: default if value is None else value


NullIsFalse = Annotated[bool, BeforeValidator(_null_is(False))]
"""A boolean the spec lets be null, which means its default: false."""
NullIsTrue = Annotated[bool, BeforeValidator(_null_is(True))]
"""A boolean the spec lets be null, which means its default: true."""


# OpenAI's bounds on metadata: 16 pairs, keys of 64 characters, values of 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]
"""OpenAI's processing tiers: one is checked, and has no effect here (one fleet, one tier)."""
