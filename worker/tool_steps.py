"""The agent's own tool runs as job events: a `ToolStep` when Claude Code starts a tool (its name
and main argument) and one when its result comes back (and whether it failed).

Calls to the caller's functions are not steps: they end the turn (`worker/caller_functions.py`).
"""

from typing import Any

from claude_agent_sdk import AssistantMessage, ToolResultBlock, ToolUseBlock, UserMessage

from shared.jobs import ToolStep
from worker import caller_functions

# The argument that says what a step does, by how Claude Code's tools name it.
_MAIN_ARGUMENTS = ("command", "file_path", "path", "pattern", "url", "query", "prompt", "description")
_MAX_ARGUMENT = 200


def main_argument(tool_input: dict[str, Any]) -> str:
    """The command, file, pattern… a tool was called with, on one line and cut short."""
    value = next((tool_input[key] for key in _MAIN_ARGUMENTS if isinstance(tool_input.get(key), str)), None)
    if value is None:
        value = next((v for v in tool_input.values() if isinstance(v, str)), "")
    text = " ".join(value.split())
    return text if len(text) <= _MAX_ARGUMENT else text[: _MAX_ARGUMENT - 1] + "…"


class ToolSteps:
    """Follows one run's tool calls and results (the SDK's assistant and user messages)."""

    def __init__(self) -> None:
        self._running: dict[str, str] = {}  # tool use id → tool name

    def started(self, message: AssistantMessage) -> list[ToolStep]:
        steps = []
        for block in message.content:
            if not isinstance(block, ToolUseBlock) or block.id in self._running:
                continue
            if block.name.startswith(f"mcp__{caller_functions.SERVER}__"):
                continue
            self._running[block.id] = block.name
            steps.append(ToolStep(id=block.id, name=block.name, argument=main_argument(block.input)))
        return steps

    def ended(self, message: UserMessage) -> list[ToolStep]:
        if isinstance(message.content, str):
            return []
        steps = []
        for block in message.content:
            if isinstance(block, ToolResultBlock) and (name := self._running.pop(block.tool_use_id, None)):
                steps.append(
                    ToolStep(id=block.tool_use_id, name=name, ended=True, failed=bool(block.is_error))
                )
        return steps
