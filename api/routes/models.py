"""`GET /v1/models` and `GET /v1/models/{model}`: the Claude models this gateway serves, and
their aliases; `GET /version`: the gateway's own version, as the original wrapper answered it."""

from fastapi import APIRouter, Request

from api.catalog import UPSTREAM, Model, ModelList, served_model, served_models
from api.deps import GatewayDep
from api.errors import ErrorResponse

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(gateway: GatewayDep) -> ModelList:
    if gateway.settings.models_from_upstream:
        await UPSTREAM.refresh(gateway.redis)
    return ModelList(data=served_models(gateway.settings))


@router.get("/v1/models/{model}", response_model=Model, responses={404: {"model": ErrorResponse}})
async def retrieve_model(model: str, gateway: GatewayDep) -> Model:
    return served_model(model, gateway.settings)


@router.get("/version")
async def version(request: Request) -> dict[str, str]:
    return {"version": request.app.version, "service": "claude-code-gateway", "api_version": "v1"}
