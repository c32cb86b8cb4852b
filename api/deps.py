"""What routes receive from the app: its settings, its Redis connection pool, and who is calling."""

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from api.core.sse import OpenStreams
from api.errors import OpenAIError
from shared.events import EventReader
from shared.jobstore import JobStore
from shared.settings import Settings

ANONYMOUS = "anonymous"
"""The caller's key id when the gateway has no API keys configured."""


@dataclass(frozen=True)
class Gateway:
    settings: Settings
    redis: Redis
    """Commands issued in the same turn share a round trip (shared/autopipeline.py)."""
    store: JobStore
    reader: EventReader
    """Reads every job stream this process follows (one task, one connection)."""
    streams: OpenStreams = field(default_factory=OpenStreams)
    """The streams this process is sending, ended at once by a shutdown."""

    @staticmethod
    def of(request: Request) -> "Gateway":
        gateway: Gateway = request.app.state.gateway
        return gateway


@dataclass(frozen=True)
class Caller:
    """Who is calling: the id of the API key that authenticated the request.

    Everything a caller names (sessions, jobs) is scoped to `key_id`, so one key never sees
    another's. Authentication sets `request.state.key_id`; without keys every caller is anonymous.
    """

    key_id: str
    operator: bool
    """May see the service-wide views: configured keys, `--operator` managed keys, and everyone
    when no key exists (a loopback-only gateway)."""

    @staticmethod
    def of(request: Request) -> "Caller":
        key_id = getattr(request.state, "key_id", ANONYMOUS)
        return Caller(key_id=key_id, operator=getattr(request.state, "operator", key_id == ANONYMOUS))


# Both are `async def` so FastAPI calls them on the loop instead of in its thread pool. The
# completion routes call `Gateway.of` and `Caller.of` themselves: on the token path, each
# dependency FastAPI resolves costs about 40 µs per request (docs/benchmarks.md, sixth session).
async def _gateway(request: Request) -> Gateway:
    return Gateway.of(request)


async def _caller(request: Request) -> Caller:
    return Caller.of(request)


GatewayDep = Annotated[Gateway, Depends(_gateway)]
CallerDep = Annotated[Caller, Depends(_caller)]


def operator_only(caller: Caller, what: str = "This view shows every caller's jobs") -> None:
    """403 `operator_key_required` unless the caller holds an operator key."""
    if not caller.operator:
        raise OpenAIError(
            403,
            f"{what}: it needs an operator key (a configured API_KEY, "
            "or a managed key created with `claude-gateway keys create --operator`).",
            type="invalid_request_error",
            code="operator_key_required",
        )


async def _operator(caller: CallerDep) -> Caller:
    operator_only(caller)
    return caller


OperatorDep = Annotated[Caller, Depends(_operator)]
