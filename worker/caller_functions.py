"""The caller's functions (`CompletionJob.functions`) as tools of an in-process MCP server.

Claude Code sees each function as the tool `mcp__caller__<name>`, beside its own tools. When the
model calls one, the worker ends the turn on that assistant message, before the CLI runs the tool:
the call goes back to the caller (`finish_reason: tool_calls`), who runs it and sends the result
in its next request. The CLI does get to run the call as the turn ends: its handler does not
answer, so the CLI waits there until the run is closed (an answer, even an error, let it go on to
another model request and tools of its own, unseen and unbilled, before the close landed).
"""

import asyncio
import hashlib
import json
from typing import Any

from claude_agent_sdk import AssistantMessage, SdkMcpTool, ToolUseBlock, create_sdk_mcp_server
from claude_agent_sdk.types import McpServerConfig

from shared.jobs import CompletionJob, ToolCall

SERVER = "caller"
_PREFIX = f"mcp__{SERVER}__"
_ROOM = 64 - len(_PREFIX) - 1
"""What the model API's 64 characters of a tool's name leave a function's (less one, kept spare)."""


def offered_names(job: CompletionJob) -> dict[str, str]:
    """The name Claude Code offers each of the job's functions by (after its prefix) → the
    function's own: its own, or, for one longer than fits, its start and a hash of the whole (and
    of a count, should that be another function's name: a re-check probe's call went to the wrong
    function). Claude Code as a client sends its MCP tools (`mcp__<server>__<tool>`) as functions,
    and these often pass 50 characters (an outside probe: every request of its session was a 400)."""
    offered = {f.name: f.name for f in job.functions if len(f.name) <= _ROOM}
    for function in job.functions:
        salt = 0
        while len(function.name) > _ROOM:
            digest = hashlib.sha256(f"{function.name}\n{salt}".encode()).hexdigest()[:8]
            if (short := f"{function.name[: _ROOM - 9]}_{digest}") not in offered:
                offered[short] = function.name
                break
            salt += 1
    return offered


_UNANSWERED_S = 60.0
"""How long the CLI waits for an answer: the worker closes the run within milliseconds of a call
it ends the turn on. A call it does not see end a turn (a sub-agent's, where an operator allows
them) gets the answer then, rather than stall the job."""


async def _returned_to_caller(arguments: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(_UNANSWERED_S)  # cancelled when the run is closed
    return {"content": [{"type": "text", "text": "This function is run by the caller."}], "is_error": True}


def servers(job: CompletionJob) -> dict[str, McpServerConfig]:
    """The MCP server offering the job's functions (none without functions)."""
    return {SERVER: create_sdk_mcp_server(SERVER, tools=tools(job))} if job.functions else {}


def tools(job: CompletionJob) -> list[SdkMcpTool[Any]]:
    """One tool per function; a shortened one's description names the function, as the request's
    own words do (a `tool_choice`, earlier calls)."""
    functions = {f.name: f for f in job.functions}
    tools = []
    for offered, name in offered_names(job).items():
        about = functions[name].description
        if offered != name:
            about = f"The function {name}. {about}".rstrip()
        tools.append(
            SdkMcpTool(offered, about, _input_schema(functions[name].parameters), _returned_to_caller)
        )
    return tools


def _input_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """The function's parameters with the `type` and `properties` the SDK needs to take them as a
    JSON Schema: without them it reads the dict as parameter names mapped to Python types (an
    outside probe saw `{"type": "object"}` offered as a required string parameter named `type`)."""
    return {**parameters, "type": "object", "properties": parameters.get("properties", {})}


def tool_names(job: CompletionJob) -> list[str]:
    """The functions' tool names, to pre-approve (the CLI never asks anyone)."""
    return [_PREFIX + offered for offered in offered_names(job)]


def calls_in(message: AssistantMessage, job: CompletionJob) -> list[ToolCall]:
    """The calls to the caller's functions in an assistant message: only to functions the job
    offers (what the CLI reports is within its tools' reach: an outside probe forged calls to
    functions no request declared)."""
    offered = {_PREFIX + short: name for short, name in offered_names(job).items()}
    return [
        ToolCall(id=block.id, name=offered[block.name], arguments=json.dumps(block.input))
        for block in message.content
        if isinstance(block, ToolUseBlock) and block.name in offered
    ]
