"""What the agent may do in one job: the part of the job contract the API decides from the request
and the operator's tool policy (`api/core/policy.py`), and the worker applies to the CLI."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

Effort = Literal["low", "medium", "high", "max"]
EFFORTS: tuple[Effort, ...] = ("low", "medium", "high", "max")
"""In increasing order."""
PermissionMode = Literal["default", "dontAsk", "acceptEdits", "plan", "bypassPermissions"]


class AgentRequest(BaseModel):
    model_config = ConfigDict(frozen=True)
    tools: list[str] = []
    """The Claude Code tools the job has, all pre-approved; empty: plain question and answer."""
    disallowed_tools: list[str] = []
    """Tools (or rules such as `Bash(rm:*)`) removed or denied even under `bypassPermissions`."""
    max_turns: int | None = None
    permission_mode: PermissionMode = "default"
    max_thinking_tokens: int | None = None
    """The thinking budget; 0: no thinking; None: Claude Code's default."""
    effort: Effort | None = None
    """Claude Code's effort setting; None: its default."""
    skills: bool = True
    """Whether the operator's skills (`CLAUDE_SKILLS_DIR`) are offered; off with `enable_tools: false`."""
    mcp_servers: list[str] = []
    """Names of the operator's MCP servers (`MCP_SERVERS`) the job has."""
    mcp_tools: list[str] = []
    """Their tools the job has, pre-approved: `mcp__<server>` (all of one) or `mcp__<server>__<tool>`."""
