"""The model API's own list of models (`MODELS_FROM_UPSTREAM`), shared through Redis.

Workers that reach the Anthropic API with a key fetch it (`worker/upstream_models.py`) and keep
it here for `UPSTREAM_MODELS_TTL_S`; the API lists those models beside the configured ones and
serves them. The API never holds the key itself.
"""

from pydantic import BaseModel, TypeAdapter
from redis.asyncio import Redis

from shared.keys import UPSTREAM_MODELS


class UpstreamModel(BaseModel):
    id: str
    created: int
    """Unix seconds (the model API's `created_at`)."""


_LIST = TypeAdapter(list[UpstreamModel])


async def publish(redis: Redis, models: list[UpstreamModel], ttl_s: int) -> None:
    await redis.set(UPSTREAM_MODELS, _LIST.dump_json(models), ex=ttl_s)


async def read(redis: Redis) -> list[UpstreamModel]:
    """The list as a worker last fetched it; empty if none did within the TTL."""
    raw = await redis.get(UPSTREAM_MODELS)
    return [] if raw is None else _LIST.validate_json(raw)
