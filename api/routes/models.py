"""`GET /v1/models` and `GET /v1/models/{model}`: the Claude models this gateway serves, and
their aliases, in OpenAI's shape, or in Anthropic's to a client that sends `anthropic-version` (its
SDK always does; `after_id`, `before_id` and `limit` page through the list as its API does);
`GET /version`: the gateway's own version, as the original wrapper answered it."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from api.catalog import (
    UPSTREAM,
    AnthropicModel,
    AnthropicModelList,
    Model,
    ModelList,
    served_model,
    served_models,
)
from api.deps import GatewayDep
from api.errors import ErrorResponse, OpenAIError, error_responses

router = APIRouter()
AnthropicVersion = Annotated[str | None, Header()]


@router.get("/v1/models", response_model=ModelList | AnthropicModelList, responses=error_responses(400))
async def list_models(
    gateway: GatewayDep,
    anthropic_version: AnthropicVersion = None,
    after_id: str | None = None,
    before_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> ModelList | AnthropicModelList:
    if gateway.settings.models_from_upstream:
        await UPSTREAM.refresh(gateway.redis)
    models = served_models(gateway.settings)
    if anthropic_version is None:
        return ModelList(data=models)
    return _page([AnthropicModel.of(model) for model in models], after_id, before_id, limit)


@router.get(
    "/v1/models/{model}", response_model=Model | AnthropicModel, responses={404: {"model": ErrorResponse}}
)
async def retrieve_model(
    model: str, gateway: GatewayDep, anthropic_version: AnthropicVersion = None
) -> Model | AnthropicModel:
    served = served_model(model, gateway.settings)
    return served if anthropic_version is None else AnthropicModel.of(served)


@router.get("/version")
async def version(request: Request) -> dict[str, str]:
    return {"version": request.app.version, "service": "claude-code-gateway", "api_version": "v1"}


def _page(
    models: list[AnthropicModel], after_id: str | None, before_id: str | None, limit: int
) -> AnthropicModelList:
    """The `limit` models after `after_id`, or before `before_id`, or the first ones."""
    ids = [model.id for model in models]
    for param, cursor in (("after_id", after_id), ("before_id", before_id)):
        if cursor is not None and cursor not in ids:
            raise OpenAIError.invalid(f"{param} '{cursor[:100]}' is not a model of this list.", param=param)
    if after_id is not None and before_id is not None:
        raise OpenAIError.invalid("Give after_id or before_id, not both.", param="before_id")
    if before_id is not None:
        end = ids.index(before_id)
        start = max(0, end - limit)
        has_more = start > 0
    else:
        start = ids.index(after_id) + 1 if after_id is not None else 0
        end = start + limit
        has_more = end < len(models)
    page = models[start:end]
    return AnthropicModelList(
        data=page,
        has_more=has_more,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
