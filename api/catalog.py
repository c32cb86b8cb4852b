"""The models this gateway serves: the configured ids (`MODELS`), their aliases (`MODEL_ALIASES`),
a dated snapshot id of either (`claude-sonnet-4-5-20250929` for `claude-sonnet-4-5`), and, with
`MODEL_PASS_THROUGH`, any other id handed to Claude Code as sent. An id of a family the gateway
does not serve is never mapped to another model: it is 404 unless configured."""

import re
from typing import Literal

from pydantic import BaseModel

from api.errors import OpenAIError
from shared.settings import Settings

OWNER = "anthropic"
_SNAPSHOT = re.compile(r"(?P<family>.+)-(?P<date>20\d{6})")
"""Anthropic's snapshot ids: a family id and the snapshot's date (YYYYMMDD)."""


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def resolve_model(model: str, settings: Settings) -> str:
    """The full model id to run for the id a caller sent; 404 `model_not_found` if it is not served."""
    if (served := _served(model, settings)) is not None:
        return served
    if settings.model_pass_through:
        return model
    raise _not_found(model)


def _served(model: str, settings: Settings) -> str | None:
    """The configured model an id names: itself, an alias, or a dated snapshot of either."""
    snapshot = _SNAPSHOT.fullmatch(model)
    for name in [model, snapshot["family"]] if snapshot else [model]:
        if name in settings.models:
            return name
        if name in settings.model_aliases:
            return settings.model_aliases[name]
    return None


def _not_found(model: str) -> OpenAIError:
    message = f"The model '{model}' does not exist or you do not have access to it."
    return OpenAIError.not_found(message, param="model", code="model_not_found")


def served_model(model: str, settings: Settings) -> Model:
    """One model of `served_models`, or a dated id of one; 404 `model_not_found` for any other id,
    pass-through or not (the gateway cannot know which ids the model API accepts)."""
    if _served(model, settings) is None:
        raise _not_found(model)
    return Model(id=model, created=settings.models_created, owned_by=OWNER)


def served_models(settings: Settings) -> list[Model]:
    """The configured models, then each alias (an id a caller may send as well)."""
    ids = [*settings.models, *settings.model_aliases]
    return [Model(id=model, created=settings.models_created, owned_by=OWNER) for model in ids]
