"""Fetches the Anthropic API's model list for `MODELS_FROM_UPSTREAM` (`shared/upstream_models.py`).

Every worker with an API key refreshes it at half its TTL (a few requests an hour per worker),
straight from the model API with the worker's key; a failure is logged and retried a minute
later, leaving the last list in place until it expires.
"""

import asyncio
import logging
from datetime import datetime

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import upstream_models
from shared.settings import Settings
from shared.upstream_models import UpstreamModel

log = logging.getLogger("gateway.worker.models")

_RETRY_S = 60.0
_PAGES = 20  # at most 20 000 models: a bound, not an expectation
_TIMEOUT = httpx.Timeout(10.0)


async def fetch(base_url: str, api_key: str) -> list[UpstreamModel]:
    """Every page of `GET /v1/models`."""
    headers = {"x-api-key": api_key, "anthropic-version": "2023-06-01"}
    params: dict[str, str | int] = {"limit": 1000}
    models: list[UpstreamModel] = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=_TIMEOUT) as client:
        for _ in range(_PAGES):
            response = await client.get("/v1/models", params=params)
            response.raise_for_status()
            page = response.json()
            for model in page["data"]:
                created = datetime.fromisoformat(model["created_at"].replace("Z", "+00:00"))
                models.append(UpstreamModel(id=model["id"], created=int(created.timestamp())))
            if not page.get("has_more") or not page.get("last_id"):
                break
            params["after_id"] = page["last_id"]
    return models


async def keep_fresh(settings: Settings, redis: Redis, base_url: str, api_key: str) -> None:
    ttl_s = settings.upstream_models_ttl_s
    while True:
        try:
            models = await fetch(base_url, api_key)
            await upstream_models.publish(redis, models, ttl_s)
            log.info("fetched %d models from the model API", len(models))
            await asyncio.sleep(ttl_s / 2)
        except (httpx.HTTPError, KeyError, TypeError, ValueError, RedisError) as exc:
            log.warning("could not fetch the model API's models: %s", type(exc).__name__)
            await asyncio.sleep(_RETRY_S)
