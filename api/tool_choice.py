"""Which tools and MCP servers a job has: the operator's policy, stored defaults, the request.

The policy is the ceiling: `CLAUDE_TOOLS` (Claude Code's own tools callers may have) and
`MCP_SERVERS` (the operator's MCP servers), less what `CLAUDE_DISALLOWED_TOOLS` names exactly
(`mcp__<server>` denies a whole server). A job has what its request names (`allowed_tools`, where
`mcp__<server>` or `mcp__<server>__<tool>` names a server's tools, and `mcp_servers`), else the
latest stored choice (`/v1/tools/config`: the session's, else the global one), else every
permitted tool and every permitted server marked `default`. Naming anything beyond the ceiling is
a 400; a stored choice the operator has since narrowed just loses what is no longer permitted.
Everything denied (the operator's, the stored configurations', the request's) goes to the CLI,
which enforces it even in bypass mode.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from api.errors import OpenAIError
from shared.mcp import server_of, tool_prefix
from shared.settings import Settings
from shared.tool_config import ToolConfig


@dataclass(frozen=True)
class ToolChoice:
    tools: list[str]
    """Claude Code's own tools."""
    mcp_servers: list[str]
    mcp_tools: list[str]
    """What of those servers is pre-approved: named tools, or `mcp__<server>` for all of one."""

    def names(self) -> list[str]:
        return [*self.tools, *self.mcp_tools]


def permitted_servers(settings: Settings) -> list[str]:
    return [
        name for name in settings.mcp_servers if tool_prefix(name) not in settings.claude_disallowed_tools
    ]


def _permitted(tool: str, settings: Settings) -> bool:
    server = server_of(tool)
    return tool in settings.claude_tools if server is None else server in permitted_servers(settings)


def check_permitted(tools: Sequence[str], settings: Settings, param: str) -> None:
    """400 `tool_not_permitted` for the first tool the operator's policy does not grant."""
    if refused := [tool for tool in tools if not _permitted(tool, settings)]:
        granted = [*settings.claude_tools, *map(tool_prefix, permitted_servers(settings))]
        raise OpenAIError.invalid(
            f"Tool '{refused[0]}' is not permitted on this gateway"
            + (f" (permitted: {', '.join(granted)})." if granted else " (no tools are)."),
            param=param,
            code="tool_not_permitted",
        )


def check_servers(servers: Sequence[str], settings: Settings) -> None:
    """400 `mcp_server_not_permitted` for the first server the operator does not offer."""
    permitted = permitted_servers(settings)
    if refused := [server for server in servers if server not in permitted]:
        raise OpenAIError.invalid(
            f"MCP server '{refused[0]}' is not offered on this gateway"
            + (f" (offered: {', '.join(permitted)})." if permitted else " (none is)."),
            param="mcp_servers",
            code="mcp_server_not_permitted",
        )


def choose(
    settings: Settings,
    configs: Sequence[ToolConfig],
    asked: Sequence[str] | None = None,
    servers: Sequence[str] | None = None,
) -> ToolChoice:
    """A job's tools: `asked` (already checked) else the latest stored choice else the defaults;
    `servers` (already checked), when given, are the job's MCP servers whatever the tools say."""
    chosen = list(asked) if asked is not None else None
    for config in reversed(configs):
        if chosen is None and config.allowed_tools is not None:
            chosen = [tool for tool in config.allowed_tools if _permitted(tool, settings)]
    if chosen is None:
        defaults = [name for name in permitted_servers(settings) if settings.mcp_servers[name].default]
        tools, named = list(settings.claude_tools), defaults
    else:
        tools, named = [t for t in chosen if server_of(t) is None], _unique(map(server_of, chosen))
    offered = _unique(servers if servers is not None else named)
    mcp_tools = [tool for server in offered for tool in _server_tools(server, chosen or [])]
    return ToolChoice(tools=_unique(tools), mcp_servers=offered, mcp_tools=mcp_tools)


def _server_tools(server: str, chosen: Sequence[str]) -> list[str]:
    return [tool for tool in chosen if server_of(tool) == server] or [tool_prefix(server)]


def _unique(names: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(name for name in names if name is not None))


def denied_tools(
    settings: Settings, configs: Sequence[ToolConfig], requested: Sequence[str] = ()
) -> list[str]:
    """Everything denied to a job: the operator's, each configuration's, the request's."""
    stored = [tool for config in configs for tool in config.disallowed_tools or []]
    return _unique([*settings.claude_disallowed_tools, *stored, *requested])


def effective(settings: Settings, configs: Sequence[ToolConfig]) -> list[str]:
    """What a job that names nothing has, less what is denied by name."""
    denied = set(denied_tools(settings, configs))
    return [tool for tool in choose(settings, configs).names() if tool not in denied]
