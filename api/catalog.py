"""The models this gateway serves: the configured ids (`MODELS`), their aliases (`MODEL_ALIASES`),
and, with `MODEL_PASS_THROUGH`, any other id handed to Claude Code as sent."""

from api.errors import OpenAIError
from api.protocol import Model
from shared.settings import Settings

OWNER = "anthropic"


def resolve_model(model: str, settings: Settings) -> str:
    """The full model id to run for the id a caller sent; 404 `model_not_found` if it is not served."""
    if model in settings.models:
        return model
    if model in settings.model_aliases:
        return settings.model_aliases[model]
    if settings.model_pass_through:
        return model
    raise OpenAIError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def served_models(settings: Settings) -> list[Model]:
    """The configured models, then each alias (an id a caller may send as well)."""
    ids = [*settings.models, *settings.model_aliases]
    return [Model(id=model, created=settings.models_created, owned_by=OWNER) for model in ids]
