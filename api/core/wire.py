"""What every front end's request models share: how strictly a value's JSON type is taken."""

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BeforeValidator, ConfigDict, Field

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
