"""The FastAPI application: middleware, error handlers, routes, and the Redis pool's lifetime."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.deps import Gateway
from api.middleware import BodyLimit, RequestId
from api.routes import chat, health, models, sessions
from shared import queue
from shared.settings import Settings

log = logging.getLogger("gateway.api")


def create_app(settings: Settings, redis_url: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = await queue.connect(redis_url, settings.queue_name)
        app.state.gateway = Gateway(settings=settings, redis=redis)
        log.info("API ready")
        try:
            yield
        finally:
            await redis.aclose()

    app = FastAPI(title="Claude Code Gateway", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestId)  # outermost: even a refused body gets its request id
    for module in (chat, models, sessions, health):
        app.include_router(module.router)
    return app
