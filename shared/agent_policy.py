"""The operator's tool policy: what any job's agent may be granted.

`CLAUDE_TOOLS` are the tools a job may have, `CLAUDE_DISALLOWED_TOOLS` are denied to every job,
`CLAUDE_MAX_TURNS` caps turns, `CLAUDE_PERMISSION_MODES` lists the permission modes. The API
turns what a request asks into a job's `AgentRequest` within it (`api/core/policy.py` and
`api/tool_choice.py`, with an error per field); the worker checks every job against its own
policy again before running it (`violation` here; its MCP servers in `worker/operator_mcp.py`), so
a job whose payload was changed in Redis cannot grant more than its operator allows.
"""

from shared.agent import EFFORTS, AgentRequest
from shared.settings import Settings


def violation(agent: AgentRequest, settings: Settings) -> str | None:
    """What in `agent` the policy does not grant, or None."""
    if refused := [tool for tool in agent.tools if tool not in settings.claude_tools]:
        return f"the tool {refused[0]!r} is not permitted"
    if missing := [rule for rule in settings.claude_disallowed_tools if rule not in agent.disallowed_tools]:
        return f"the denied tool {missing[0]!r} is not denied"
    cap = settings.claude_max_turns
    if cap is not None and (agent.max_turns is None or agent.max_turns > cap):
        return f"max_turns may be at most {cap}"
    if agent.permission_mode not in (settings.claude_permission_modes or ["default"]):
        return f"the permission mode {agent.permission_mode!r} is not permitted"
    if agent.effort is not None and EFFORTS.index(agent.effort) > EFFORTS.index(settings.claude_max_effort):
        return f"the effort {agent.effort!r} is above {settings.claude_max_effort!r}"
    if (agent.max_thinking_tokens or 0) > settings.claude_max_thinking_tokens:
        return f"the thinking budget may be at most {settings.claude_max_thinking_tokens}"
    return None
