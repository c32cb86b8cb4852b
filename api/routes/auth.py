"""`GET /v1/auth/status`: how the gateway reaches the model, and whether that can work.

The workers hold the model credentials (in a deployment over several machines the API may hold
none), so the answer comes from the live workers' heartbeats, where each publishes its own check
(method, validity, variable names; never a value). The API adds what it would detect itself, and
says so when no worker is alive. The shape extends the original wrapper's (`claude_code_auth`,
`server_info`), so its clients keep working. Reading heartbeats happens here only, never on the
path of a completion. Which workers run where (ids, hosts) and how they are configured (file
paths, profiles, projects, variable names, the problems found) are for operator keys only, as on
`/status`: other callers get the method, whether it works, and the number of live workers. It also
says whether the workers run every job in a sandbox (`worker/sandbox.py`), and to operators why not.
"""

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.deps import CallerDep, GatewayDep
from shared import apikeys, backend_auth
from shared.backend_auth import BackendAuth
from shared.heartbeats import SandboxReport, alive_workers

router = APIRouter()


class AuthState(BaseModel):
    method: str
    valid: bool
    errors: list[str]
    warnings: list[str]
    config: dict[str, str | bool | None]


class ClaudeCodeAuth(BaseModel):
    method: str = Field(description="anthropic, bedrock, vertex or claude_cli; `mixed` when workers differ.")
    status: AuthState
    environment_variables: list[str] = Field(description="Names of the variables the CLI is given.")


class WorkerAuth(BaseModel):
    id: str
    host: str
    backend: str | None
    auth: BackendAuth | None = Field(description="None from a worker that predates auth reports.")
    sandbox: SandboxReport | None = Field(description="Its job sandbox; None: it runs no agent.")


class SandboxStatus(BaseModel):
    mode: Literal["on", "off", "mixed", "none"] = Field(
        description="`SANDBOX` of the live workers that run agents; none: no such worker is alive."
    )
    ready: bool = Field(description="Every such worker runs its jobs in a sandbox.")
    problems: list[str] = Field(description="Why a worker runs no sandbox (SANDBOX=off, or the reason).")


class ServerInfo(BaseModel):
    api_key_required: bool
    api_key_source: Literal["environment", "managed", "none"]
    version: str


class AuthStatus(BaseModel):
    claude_code_auth: ClaudeCodeAuth = Field(
        description="The live workers' auth taken together (valid only if every one is usable); "
        "with no worker alive, the API's own detection."
    )
    source: Literal["workers", "api"]
    message: str | None
    workers_alive: int
    workers: list[WorkerAuth]
    api_detection: ClaudeCodeAuth = Field(description="What this API process detects from its own settings.")
    sandbox: SandboxStatus = Field(description="Whether the live workers run each job in a sandbox.")
    server_info: ServerInfo


def _as_reported(auth: BackendAuth) -> ClaudeCodeAuth:
    state = AuthState(
        method=auth.method, valid=auth.valid, errors=auth.errors, warnings=auth.warnings, config=auth.config
    )
    return ClaudeCodeAuth(method=auth.method, status=state, environment_variables=auth.environment_variables)


def _combined(reports: list[tuple[str, BackendAuth]], *, by_worker: bool) -> ClaudeCodeAuth:
    """One view of several workers: their method if they agree, and every problem, named by
    worker if `by_worker`."""
    methods = {auth.method for _, auth in reports}
    if len(reports) == 1 or len({auth.model_dump_json() for _, auth in reports}) == 1:
        return _as_reported(reports[0][1])
    method = methods.pop() if len(methods) == 1 else "mixed"
    if by_worker:
        errors = [f"{worker}: {error}" for worker, auth in reports for error in auth.errors]
    else:
        errors = sorted({error for _, auth in reports for error in auth.errors})
    warnings = sorted({warning for _, auth in reports for warning in auth.warnings})
    variables = sorted({name for _, auth in reports for name in auth.environment_variables})
    config = reports[0][1].config if method != "mixed" else {}
    state = AuthState(
        method=method, valid=all(a.valid for _, a in reports), errors=errors, warnings=warnings, config=config
    )
    return ClaudeCodeAuth(method=method, status=state, environment_variables=variables)


def _sandbox(reports: list[tuple[str, SandboxReport]], *, operator: bool) -> SandboxStatus:
    """Whether every worker runs jobs in a sandbox; why not, by worker, for operators only."""
    modes = {report.mode for _, report in reports}
    mode = "none" if not modes else modes.pop() if len(modes) == 1 else "mixed"
    problems = [f"{worker}: {report.reason}" for worker, report in reports if not report.ready]
    return SandboxStatus(
        mode=mode, ready=bool(reports) and not problems, problems=problems if operator else []
    )


def _summary(auth: ClaudeCodeAuth) -> ClaudeCodeAuth:
    """The method and whether it works, without the configuration details."""
    state = AuthState(method=auth.method, valid=auth.status.valid, errors=[], warnings=[], config={})
    return ClaudeCodeAuth(method=auth.method, status=state, environment_variables=[])


@router.get("/v1/auth/status")
async def auth_status(gateway: GatewayDep, caller: CallerDep, request: Request) -> AuthStatus:
    settings = gateway.settings
    workers = await alive_workers(gateway.redis)
    reports = [(w.id, w.auth) for w in workers if w.auth is not None]
    own = _as_reported(backend_auth.check(settings))
    if reports:
        combined, source, message = _combined(reports, by_worker=caller.operator), "workers", None
    else:
        combined, source = own, "api"
        message = (
            "No worker is alive: this is what the API process detects from its own settings; "
            "the workers hold the credentials that count."
            if not workers
            else "No live worker reports its auth (they predate it): this is the API's own detection."
        )
    if not caller.operator:
        combined, own = _summary(combined), _summary(own)
    configured = bool(settings.client_api_keys())
    managed = not configured and await apikeys.any_managed(gateway.redis)
    return AuthStatus(
        claude_code_auth=combined,
        source=source,
        message=message,
        workers_alive=len(workers),
        workers=[
            WorkerAuth(id=w.id, host=w.host, backend=w.backend, auth=w.auth, sandbox=w.sandbox)
            for w in workers
            if caller.operator
        ],
        api_detection=own,
        sandbox=_sandbox([(w.id, w.sandbox) for w in workers if w.sandbox], operator=caller.operator),
        server_info=ServerInfo(
            api_key_required=configured or managed,
            api_key_source="environment" if configured else "managed" if managed else "none",
            version=request.app.version,
        ),
    )
