"""MCP servers the operator configures (`MCP_SERVERS`), offered to jobs under the tool policy.

Only names travel with a job (`AgentRequest.mcp_servers`): each worker looks the servers up in its
own settings, so their commands, environment and headers (which may hold secrets) never reach
Redis, a response or a log. The CLI starts a job's stdio servers as its own children (inside the
job's sandbox) and connects to remote ones itself, through whatever egress the sandbox allows.
"""

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
"""A server's tools reach the model as `mcp__<server>__<tool>`, within the model API's 64 characters."""
RESERVED = frozenset({"caller"})
"""Names the gateway uses for its own servers (`worker/caller_functions.py`)."""


def tool_prefix(server: str) -> str:
    """The name the CLI's permission rules use for every tool of a server."""
    return f"mcp__{server}"


def server_of(tool: str) -> str | None:
    """The server an MCP tool name (`mcp__<server>` or `mcp__<server>__<tool>`) belongs to."""
    if not tool.startswith("mcp__"):
        return None
    return tool.removeprefix("mcp__").split("__", 1)[0]


class McpServer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["stdio", "http", "sse"] = "stdio"
    command: str | None = Field(default=None, description="stdio: the program to run.")
    args: list[str] = []
    env: dict[str, SecretStr] = Field(default={}, description="stdio: its environment, besides the CLI's.")
    url: str | None = Field(default=None, description="http, sse: where the server is.")
    headers: dict[str, SecretStr] = {}
    description: str = ""
    default: bool = Field(default=True, description="Offered to jobs whose request chooses no servers.")

    @model_validator(mode="after")
    def _transport(self) -> Self:
        if self.type == "stdio":
            if not self.command or self.url is not None or self.headers:
                raise ValueError("a stdio server has a command (and args, env), no url or headers")
        elif not (self.url or "").startswith(("https://", "http://")) or self.command is not None:
            raise ValueError(f"an {self.type} server has an http(s) url (and headers), no command")
        return self

    def cli_config(self) -> dict[str, Any]:
        """The server as Claude Code's `mcpServers` entry takes it, secrets included."""
        if self.type == "stdio":
            env = {name: value.get_secret_value() for name, value in self.env.items()}
            return {"type": "stdio", "command": self.command, "args": list(self.args), "env": env}
        headers = {name: value.get_secret_value() for name, value in self.headers.items()}
        return {"type": self.type, "url": self.url, "headers": headers}
