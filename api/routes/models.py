"""`GET /v1/models`: the Claude models this gateway serves, and their aliases."""

from fastapi import APIRouter

from api.catalog import served_models
from api.deps import GatewayDep
from api.protocol import ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(gateway: GatewayDep) -> ModelList:
    return ModelList(data=served_models(gateway.settings))
