"""`/v1/sessions`: the caller's sessions, listed, read, deleted and counted.

Every route is scoped to the caller's API key: another key's session is answered exactly like a
session that does not exist (404), so ids cannot be probed across keys. Answers also carry the
original wrapper's field names (`session_id`, `last_accessed`, `sessions`, `total`,
`session_stats`, a delete `message`), so scripts written for it keep working; its times were ISO
strings, these are Unix seconds (docs/openai-compatibility.md).
"""

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.access import stored_ledger
from api.core.sessions import invalid_session_id, session_not_found
from api.deps import CallerDep, GatewayDep
from api.errors import OpenAIError, error_responses
from api.routes.session_files import StoreDep
from shared import sessions, workspaces
from shared.keys import is_session_id
from shared.workspaces import WorkspaceRef

router = APIRouter()
_ERRORS = error_responses(400, 404, 409)


class SessionMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str


class SessionObject(BaseModel):
    id: str
    object: Literal["session"] = "session"
    created_at: int
    last_used_at: int
    expires_at: int
    message_count: int
    messages: list[SessionMessage] | None = None
    session_id: str = Field(description="The original wrapper's name for `id`.")
    last_accessed: int = Field(description="The original wrapper's name for `last_used_at`.")


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionObject]
    sessions: list[SessionObject] = Field(description="The original wrapper's name for `data`.")
    total: int


class OriginalSessionStats(BaseModel):
    active_sessions: int
    total_messages: int


class SessionStats(BaseModel):
    object: Literal["session.stats"] = "session.stats"
    active_sessions: int
    total_messages: int
    ttl_seconds: int
    session_stats: OriginalSessionStats = Field(description="The original wrapper's shape of the counts.")
    default_ttl_hours: float


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True
    message: str


def _object(session: sessions.Session) -> SessionObject:
    return SessionObject(
        id=session.id,
        created_at=session.created_ms // 1000,
        last_used_at=session.last_used_ms // 1000,
        expires_at=session.expires_ms // 1000,
        message_count=session.turns,
        session_id=session.id,
        last_accessed=session.last_used_ms // 1000,
    )


def _checked(session_id: str) -> str:
    if not is_session_id(session_id):
        raise invalid_session_id()
    return session_id


@router.get("/v1/sessions", response_model=SessionList)
async def list_sessions(gateway: GatewayDep, caller: CallerDep) -> SessionList:
    owner = sessions.owner_of(caller.key_id)
    found = await sessions.list_sessions(gateway.redis, owner, gateway.settings.session_ttl_s)
    listed = [_object(session) for session in found]
    return SessionList(data=listed, sessions=listed, total=len(listed))


@router.get("/v1/sessions/stats", response_model=SessionStats)
async def session_stats(gateway: GatewayDep, caller: CallerDep) -> SessionStats:
    owner = sessions.owner_of(caller.key_id)
    found = await sessions.list_sessions(gateway.redis, owner, gateway.settings.session_ttl_s)
    counts = OriginalSessionStats(
        active_sessions=len(found), total_messages=sum(session.turns for session in found)
    )
    ttl_s = gateway.settings.session_ttl_s
    return SessionStats(
        **counts.model_dump(), ttl_seconds=ttl_s, session_stats=counts, default_ttl_hours=ttl_s / 3600
    )


@router.get("/v1/sessions/{session_id}", response_model=SessionObject, responses=_ERRORS)
async def get_session(session_id: str, gateway: GatewayDep, caller: CallerDep) -> SessionObject:
    owner = sessions.owner_of(caller.key_id)
    found = await sessions.get(gateway.redis, owner, _checked(session_id), gateway.settings.session_ttl_s)
    if found is None:
        raise session_not_found(session_id)
    session, history = found
    body = _object(session)
    body.messages = [SessionMessage(role=turn.role, content=turn.text) for turn in history]
    return body


@router.delete("/v1/sessions/{session_id}", response_model=SessionDeleted, responses=_ERRORS)
async def delete_session(
    session_id: str, request: Request, gateway: GatewayDep, caller: CallerDep, store: StoreDep
) -> SessionDeleted:
    owner = sessions.owner_of(caller.key_id)
    found = await sessions.get(gateway.redis, owner, _checked(session_id), gateway.settings.session_ttl_s)
    # Busy first: a session whose first turn runs is not there yet, and would be once it ends (an
    # outside probe was told 404, then found it).
    if await sessions.is_busy(gateway.redis, owner, session_id):
        raise OpenAIError(
            409,
            f"Session '{session_id}' is busy with a request; delete it when that has finished.",
            type="invalid_request_error",
            param="session_id",
            code="session_busy",
        )
    if found is None:
        raise session_not_found(session_id)
    await sessions.delete(gateway.redis, owner, found[0], stored_ledger(gateway, request))
    await workspaces.delete_workspace(
        store, gateway.redis, WorkspaceRef(owner, session_id, found[0].transcript_id)
    )
    return SessionDeleted(id=session_id, message=f"Session {session_id} deleted successfully")
