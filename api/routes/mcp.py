"""`/v1/mcp`: the MCP servers the operator offers to jobs (`MCP_SERVERS`).

Servers are configured by the operator only and started per job by Claude Code, inside the job's
sandbox; nothing is registered, connected or disconnected over HTTP (the original wrapper's
`POST /v1/mcp/servers`, `/v1/mcp/connect` and `/v1/mcp/disconnect` have no counterpart, see
docs/openai-compatibility.md). Commands, URLs, environment and headers are never shown: they
may hold the operator's secrets.
"""

from collections import Counter
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import GatewayDep
from api.tool_choice import permitted_servers
from shared.mcp import tool_prefix

router = APIRouter()


class McpServerInfo(BaseModel):
    name: str
    type: Literal["stdio", "http", "sse"]
    description: str
    tools: str = Field(description="The name its tools have in `allowed_tools` and rules: mcp__<name>.")
    default: bool = Field(description="Whether a job has it when the request chooses no servers.")
    enabled: bool = Field(description="Whether requests may choose it (the operator may deny a server).")


class McpServerList(BaseModel):
    object: Literal["list"] = "list"
    servers: list[McpServerInfo]
    total: int


class McpStats(BaseModel):
    object: Literal["mcp.stats"] = "mcp.stats"
    registered_servers: int
    enabled_servers: int
    default_servers: int
    servers_by_type: dict[str, int]


def _servers(gateway: GatewayDep) -> list[McpServerInfo]:
    settings = gateway.settings
    enabled = permitted_servers(settings)
    return [
        McpServerInfo(
            name=name,
            type=server.type,
            description=server.description,
            tools=tool_prefix(name),
            default=server.default and name in enabled,
            enabled=name in enabled,
        )
        for name, server in settings.mcp_servers.items()
    ]


@router.get("/v1/mcp/servers", response_model=McpServerList)
async def list_servers(gateway: GatewayDep) -> McpServerList:
    servers = _servers(gateway)
    return McpServerList(servers=servers, total=len(servers))


@router.get("/v1/mcp/stats", response_model=McpStats)
async def mcp_stats(gateway: GatewayDep) -> McpStats:
    servers = _servers(gateway)
    return McpStats(
        registered_servers=len(servers),
        enabled_servers=sum(server.enabled for server in servers),
        default_servers=sum(server.default for server in servers),
        servers_by_type=dict(Counter(server.type for server in servers)),
    )
