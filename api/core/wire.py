"""What every front end's request models share: how strictly a value's JSON type is taken."""

from collections.abc import Callable
from typing import Annotated

from pydantic import BeforeValidator, ConfigDict

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
