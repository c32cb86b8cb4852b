"""The models this gateway serves: the configured ids (`MODELS`), their aliases (`MODEL_ALIASES`),
and, with `MODEL_PASS_THROUGH`, any other id handed to Claude Code as sent."""

from typing import Literal

from pydantic import BaseModel

from api.errors import OpenAIError
from shared.settings import Settings

OWNER = "anthropic"


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
    if model in settings.models:
        return model
    if model in settings.model_aliases:
        return settings.model_aliases[model]
    if settings.model_pass_through:
        return model
    raise _not_found(model)


def _not_found(model: str) -> OpenAIError:
    message = f"The model '{model}' does not exist or you do not have access to it."
    return OpenAIError.not_found(message, param="model", code="model_not_found")


def served_model(model: str, settings: Settings) -> Model:
    """One model of `served_models`; 404 `model_not_found` for any other id, pass-through or not
    (the gateway cannot know which ids the model API accepts)."""
    for served in served_models(settings):
        if served.id == model:
            return served
    raise _not_found(model)


def served_models(settings: Settings) -> list[Model]:
    """The configured models, then each alias (an id a caller may send as well)."""
    ids = [*settings.models, *settings.model_aliases]
    return [Model(id=model, created=settings.models_created, owned_by=OWNER) for model in ids]
