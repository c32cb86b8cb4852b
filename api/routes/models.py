"""`GET /v1/models`: the Claude models this gateway serves."""

from fastapi import APIRouter

from api.deps import GatewayDep
from api.protocol import Model, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(gateway: GatewayDep) -> ModelList:
    settings = gateway.settings
    return ModelList(
        data=[Model(id=m, created=settings.models_created, owned_by="anthropic") for m in settings.models]
    )
