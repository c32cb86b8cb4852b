"""`/v1/tools`: the tools a caller's jobs may use, and their stored defaults (`/v1/tools/config`).

The operator's policy (`CLAUDE_TOOLS`, `CLAUDE_DISALLOWED_TOOLS`) is the ceiling; a configuration
only chooses within it (`api/core/policy.py`). A session's configuration belongs to the session's
key: for any other key the session does not exist (404). The global configuration applies to every
caller, so only operator keys may read or change it.
"""

from collections import Counter
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.access import storage_limited, stored_limit
from api.core.request import ToolNames
from api.core.sessions import invalid_session_id, session_not_found
from api.deps import Caller, CallerDep, Gateway, GatewayDep, operator_only
from api.errors import ErrorResponse
from api.tool_choice import check_permitted, effective, permitted_servers
from shared import sessions, tool_config
from shared.keys import is_session_id
from shared.mcp import tool_prefix
from shared.quotas import StorageLimit
from shared.settings import Settings
from shared.tool_config import ToolConfig

router = APIRouter()
_ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorResponse} for code in (400, 403, 404)}

# What Claude Code's own tools do, for callers choosing among them.
_BUILT_IN: dict[str, tuple[str, str]] = {
    "Read": ("file", "Reads a file of the job's workspace."),
    "Write": ("file", "Creates or overwrites a file."),
    "Edit": ("file", "Replaces text in a file."),
    "MultiEdit": ("file", "Makes several replacements in one file."),
    "NotebookEdit": ("file", "Edits a cell of a Jupyter notebook."),
    "Glob": ("file", "Finds files by name pattern."),
    "Grep": ("file", "Searches file contents with regular expressions."),
    "LS": ("file", "Lists a directory."),
    "Bash": ("shell", "Runs a shell command in the job's workspace."),
    "BashOutput": ("shell", "Reads the output of a background shell command."),
    "KillShell": ("shell", "Stops a background shell command."),
    "WebFetch": ("web", "Fetches a URL and reads its content."),
    "WebSearch": ("web", "Searches the web."),
    "TodoWrite": ("agent", "Keeps the agent's task list."),
    "Task": ("agent", "Hands a sub-task to a sub-agent."),
    "Skill": ("agent", "Uses one of the operator's skills."),
}


class ToolInfo(BaseModel):
    name: str
    description: str
    category: str
    default: bool = Field(description="Whether a job has it when the request names no tools.")


class ToolList(BaseModel):
    object: Literal["list"] = "list"
    tools: list[ToolInfo]
    total: int


class ToolConfigRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str | None = None
    allowed_tools: ToolNames | None = None
    disallowed_tools: ToolNames | None = None


class ToolConfigObject(BaseModel):
    object: Literal["tool_config"] = "tool_config"
    session_id: str | None
    allowed_tools: list[str] | None
    disallowed_tools: list[str] | None
    effective_tools: list[str] = Field(description="The tools a job has when the request names none.")
    created_at: int | None
    updated_at: int | None


class ToolStats(BaseModel):
    object: Literal["tool.stats"] = "tool.stats"
    total_tools: int = Field(description="Tools the operator's policy permits.")
    default_tools: int
    global_allowed: int
    global_disallowed: int
    session_configs: int = Field(description="The caller's sessions that have a tool configuration.")
    tool_categories: dict[str, int]


def _configs(*found: ToolConfig | None) -> list[ToolConfig]:
    return [config for config in found if config is not None]


def _category(name: str) -> str:
    return _BUILT_IN.get(name, ("other", ""))[0]


@router.get("/v1/tools", response_model=ToolList)
async def list_tools(gateway: GatewayDep) -> ToolList:
    settings = gateway.settings
    defaults = effective(settings, _configs(await tool_config.global_config(gateway.redis)))
    tools = [
        ToolInfo(
            name=name,
            description=_BUILT_IN.get(name, ("", ""))[1],
            category=_category(name),
            default=name in defaults,
        )
        for name in settings.claude_tools
    ]
    tools += [
        ToolInfo(
            name=tool_prefix(name),
            description=settings.mcp_servers[name].description or f"The tools of the MCP server '{name}'.",
            category="mcp",
            default=tool_prefix(name) in defaults,
        )
        for name in permitted_servers(settings)
    ]
    return ToolList(tools=tools, total=len(tools))


async def _session_config(gateway: Gateway, caller: Caller, session_id: str) -> ToolConfig | None:
    """The caller's session's configuration (None: it has none); 404 if the caller has no such session."""
    if not is_session_id(session_id):
        raise invalid_session_id()
    owner = sessions.owner_of(caller.key_id)
    exists, config = await tool_config.session_config(gateway.redis, owner, session_id)
    if not exists:
        raise session_not_found(session_id)
    return config


def _object(
    settings: Settings, session_id: str | None, own: ToolConfig | None, applied: list[ToolConfig]
) -> ToolConfigObject:
    return ToolConfigObject(
        session_id=session_id,
        allowed_tools=own.allowed_tools if own else None,
        disallowed_tools=own.disallowed_tools if own else None,
        effective_tools=effective(settings, applied),
        created_at=own.created_at if own else None,
        updated_at=own.updated_at if own else None,
    )


@router.get("/v1/tools/config", response_model=ToolConfigObject, responses=_ERRORS)
async def get_tool_config(
    gateway: GatewayDep, caller: CallerDep, session_id: Annotated[str | None, Query(max_length=128)] = None
) -> ToolConfigObject:
    """The global configuration (operator keys), or one of the caller's sessions'."""
    if session_id is None:
        operator_only(caller, "The global tool configuration applies to every caller")
        shared = await tool_config.global_config(gateway.redis)
        return _object(gateway.settings, None, shared, _configs(shared))
    own = await _session_config(gateway, caller, session_id)
    shared = await tool_config.global_config(gateway.redis)
    return _object(gateway.settings, session_id, own, _configs(shared, own))


@router.post("/v1/tools/config", response_model=ToolConfigObject, responses=_ERRORS)
async def set_tool_config(
    body: ToolConfigRequest, gateway: GatewayDep, caller: CallerDep, request: Request
) -> ToolConfigObject:
    """Replaces the fields given (null clears one) of the global configuration (operator keys)
    or of one of the caller's sessions'; tools beyond the operator's policy are a 400."""
    settings, redis = gateway.settings, gateway.redis
    if body.allowed_tools is not None:
        check_permitted(body.allowed_tools, settings, "allowed_tools")
    changes = {name: getattr(body, name) for name in body.model_fields_set - {"session_id"}}
    if body.session_id is None:
        operator_only(caller, "The global tool configuration applies to every caller")
        config = tool_config.updated(await tool_config.global_config(redis), changes)
        await tool_config.set_global_config(redis, config)
        return _object(settings, None, config, [config])
    config = tool_config.updated(await _session_config(gateway, caller, body.session_id), changes)
    owner = sessions.owner_of(caller.key_id)
    try:
        stored = await tool_config.set_session_config(
            redis, owner, body.session_id, config, stored_limit(gateway, request)
        )
    except StorageLimit as refused:
        raise storage_limited(refused) from None
    if not stored:
        raise session_not_found(body.session_id)  # deleted meanwhile
    return _object(
        settings, body.session_id, config, _configs(await tool_config.global_config(redis), config)
    )


@router.get("/v1/tools/stats", response_model=ToolStats)
async def tool_stats(gateway: GatewayDep, caller: CallerDep) -> ToolStats:
    settings = gateway.settings
    found = await tool_config.global_config(gateway.redis)
    owner = sessions.owner_of(caller.key_id)
    listed = await sessions.list_sessions(gateway.redis, owner, settings.session_ttl_s)
    return ToolStats(
        total_tools=len(settings.claude_tools),
        default_tools=len(effective(settings, _configs(found))),
        global_allowed=len(found.allowed_tools or []) if found else 0,
        global_disallowed=len(found.disallowed_tools or []) if found else 0,
        session_configs=sum(session.has_tool_config for session in listed),
        tool_categories=dict(Counter(map(_category, settings.claude_tools))),
    )
