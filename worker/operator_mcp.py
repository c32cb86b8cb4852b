"""The operator's MCP servers a job was given (`AgentRequest.mcp_servers`), as the CLI takes them.

The job carries only their names; their commands, environment and headers come from this
worker's own settings (`MCP_SERVERS`), so no secret of theirs travels through Redis. The worker
re-checks the names against its own policy: a server it does not offer fails the job.
"""

from typing import cast

from claude_agent_sdk.types import McpServerConfig

from shared.jobs import CompletionJob, FailureCode
from shared.mcp import tool_prefix
from shared.settings import Settings
from worker.backends import BackendError


def servers(job: CompletionJob, settings: Settings) -> dict[str, McpServerConfig]:
    offered = settings.mcp_servers
    for name in job.agent.mcp_servers:
        if name not in offered or tool_prefix(name) in settings.claude_disallowed_tools:
            raise BackendError(
                FailureCode.BACKEND_UNAVAILABLE, f"The MCP server '{name}' is not offered by this worker."
            )
    return {name: cast(McpServerConfig, offered[name].cli_config()) for name in job.agent.mcp_servers}
