"""What routes receive from the app: its settings, its Redis connection pool, and who is calling."""

from dataclasses import dataclass
from typing import Annotated

from arq.connections import ArqRedis
from fastapi import Depends, Request

from shared.jobstore import JobStore
from shared.settings import Settings

ANONYMOUS = "anonymous"
"""The caller's key id when the gateway has no API keys configured."""


@dataclass(frozen=True)
class Gateway:
    settings: Settings
    redis: ArqRedis
    store: JobStore


@dataclass(frozen=True)
class Caller:
    """Who is calling: the id of the API key that authenticated the request.

    Everything a caller names (sessions, jobs) is scoped to `key_id`, so one key never sees
    another's. Authentication sets `request.state.key_id`; without keys every caller is anonymous.
    """

    key_id: str


# Both are `async def` so FastAPI calls them on the loop instead of in its thread pool.
async def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _caller(request: Request) -> Caller:
    return Caller(key_id=getattr(request.state, "key_id", ANONYMOUS))


GatewayDep = Annotated[Gateway, Depends(_gateway)]
CallerDep = Annotated[Caller, Depends(_caller)]
