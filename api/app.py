"""The FastAPI application: middleware, error handlers, routes, and the Redis pool's lifetime."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI

from api import errors
from api.access import Access
from api.catalog import UPSTREAM
from api.chat import retrieval as chat_retrieval
from api.chat import router as chat
from api.deps import Gateway
from api.messages import router as messages
from api.middleware import BodyLimit, Cors, RequestId, ResponseLimit
from api.responses import router as responses
from api.routes import (
    auth,
    compatibility,
    debug,
    health,
    home,
    mcp,
    models,
    ops,
    session_files,
    sessions,
    tools,
)
from shared import queue
from shared.autopipeline import AutoPipelined
from shared.events import EventReader
from shared.heap import tune_garbage_collector
from shared.jobstore import JobStore
from shared.settings import Settings

log = logging.getLogger("gateway.api")


def create_app(settings: Settings, redis_url: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connection = await queue.connect(
            redis_url, settings.queue_name, reply_timeout_s=settings.redis_reply_timeout_s
        )
        redis = AutoPipelined(connection)
        affinity_s = settings.workspace_affinity_s
        store = JobStore(
            redis,
            queue_name=settings.queue_name,
            ttl_s=settings.event_ttl_s,
            affinity_s=affinity_s,
            session_ttl_s=settings.session_ttl_s,
            push_lease_s=settings.lease_s,
            failures_kept=settings.recent_failures_kept,
        )
        reader = EventReader(redis)
        app.state.gateway = Gateway(settings=settings, redis=redis, store=store, reader=reader)
        follow = asyncio.create_task(UPSTREAM.follow(redis)) if settings.models_from_upstream else None
        tune_garbage_collector()
        log.info("API ready")
        try:
            yield
        finally:
            if follow is not None:
                follow.cancel()
            await reader.aclose()
            await connection.aclose()

    app = FastAPI(
        title="Claude Code Gateway",
        version=version("claude-gateway"),
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry: the gateway installs no OpenTelemetry SDK (its metrics are
        # `/metrics`): off, it spares every request a check for configured providers.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # A path with a trailing slash is not found, as OpenAI answers it: Starlette's redirect
        # named http:// behind a TLS proxy and counted the request twice (an outside probe).
        redirect_slashes=False,
    )
    errors.install(app)
    app.add_middleware(ResponseLimit, settings=settings)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(Access, settings=settings)  # before the body is read
    if settings.cors_origins:
        app.add_middleware(Cors, settings=settings)
    app.add_middleware(RequestId)  # outermost: even a refused body gets its request id
    routers = (
        chat,
        chat_retrieval,
        responses,
        messages,
        sessions,
        models,
        compatibility,
        tools,
        mcp,
        auth,
        health,
        ops,
        home,
        session_files,
    )
    for module in routers:
        app.include_router(module.router)
    if settings.debug_endpoints:  # off: the route does not exist (404 like any unknown URL)
        app.include_router(debug.router)
    return app
