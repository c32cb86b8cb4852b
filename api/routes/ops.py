"""Operations endpoints: readiness, Prometheus metrics, the status snapshot and the dashboard.

`/ready` is for load balancers, which often cannot send a key: it is open and says only ready or
not. `/metrics` (service-wide totals, cost included) and `/status` (every worker, host, job id and
recent failure) show every caller's activity, so they need an operator key (`OperatorDep`).
The dashboard page itself holds no data, so it needs no key: it asks `/status` with the key it is given.
"""

import asyncio
from importlib import resources

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from api import metrics
from api.access import KEY_STORE_GONE
from api.deps import GatewayDep, OperatorDep
from api.errors import OpenAIError, storage_full
from shared import apikeys
from shared.heartbeats import Heartbeat, alive_workers
from shared.queue import cannot_persist
from shared.status import Snapshot, take_snapshot

router = APIRouter()

_READY_TIMEOUT_S = 2.0
_DASHBOARD = resources.files("api").joinpath("dashboard.html").read_text(encoding="utf-8")


@router.api_route(
    "/ready",
    methods=["GET", "HEAD"],
    responses={
        503: {
            "description": "Redis unreachable or full, every key revoked, or no live worker that can run jobs"
        }
    },
)
async def ready(gateway: GatewayDep) -> dict[str, str]:
    """Ready when Redis answers and takes writes, a key can be accepted (not every managed key
    revoked), and at least one worker with a fresh heartbeat can run jobs (its backend auth usable,
    its sandbox built or turned off): a balancer routes no traffic into certain 503s. Why not is
    for operators (`claude-gateway status`): this route is open."""
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            workers, memory, (any_managed, protected), _ = await asyncio.gather(
                alive_workers(gateway.redis),
                gateway.redis.info("memory"),
                apikeys.protection(gateway.redis),
                gateway.redis.ping(),  # refused by a Redis that cannot save (MISCONF), as writes are
            )
    except (RedisError, OSError, TimeoutError) as exc:
        if cannot_persist(exc):  # it answered "ready" while refusing every write (a re-check probe)
            raise storage_full() from None
        raise OpenAIError(
            503, "The gateway cannot reach its queue.", type="server_error", code="queue_unavailable"
        ) from None
    if memory.get("maxmemory_policy") == "noeviction" and 0 < memory["maxmemory"] <= memory["used_memory"]:
        raise storage_full()  # every new job would be refused
    if protected and not any_managed and not gateway.settings.client_api_keys():
        raise KEY_STORE_GONE  # every key revoked: every request is refused
    if not workers:
        raise OpenAIError(503, "No worker is running.", type="server_error", code="no_live_worker")
    if not any(_runs_jobs(worker) for worker in workers):
        message = "No running worker can run jobs (see claude-gateway status)."
        raise OpenAIError(503, message, type="server_error", code="no_usable_worker")
    return {"status": "ready"}


def _runs_jobs(worker: Heartbeat) -> bool:
    """Whether the worker takes jobs (not draining): the scripted backend needs no model credential."""
    auth_usable = worker.backend == "scripted" or worker.auth is None or worker.auth.valid
    sandbox_usable = worker.sandbox is None or worker.sandbox.ready or worker.sandbox.mode == "off"
    return auth_usable and sandbox_usable and not worker.draining


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(gateway: GatewayDep, operator: OperatorDep) -> Response:
    try:
        snapshot = await take_snapshot(gateway.redis, gateway.settings.queue_name, failures=0)
    except RedisError:  # this process's counters, and that Redis is out of reach
        snapshot = None
    return Response(metrics.render(snapshot), media_type=CONTENT_TYPE_LATEST)


@router.get("/status")
async def status(gateway: GatewayDep, operator: OperatorDep) -> Snapshot:
    return await take_snapshot(gateway.redis, gateway.settings.queue_name)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_DASHBOARD)
