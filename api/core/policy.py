"""What a request may let the agent do, checked against the operator's tool policy.

Every front end's request asks through body extension fields (`enable_tools`, `allowed_tools`,
`disallowed_tools`, `max_turns`, `permission_mode`) or, when a field is absent, the original
wrapper's `X-Claude-*` headers. The policy: `CLAUDE_TOOLS` are the tools callers may have (a job
has all of them unless it narrows them), `CLAUDE_DISALLOWED_TOOLS` are denied to every job,
`CLAUDE_MAX_TURNS` caps turns, `CLAUDE_PERMISSION_MODES` lists the modes a caller may choose.
Asking for more than the policy grants is a 400, never a silent downgrade. Which tools and MCP
servers a job has is `api/tool_choice.py`. The worker checks every job against its own policy
again (`shared/agent_policy.py`).
"""

import re
from collections.abc import Mapping, Sequence
from typing import get_args

from pydantic import TypeAdapter, ValidationError

from api.core.request import TOOL_NAMES_BYTES, AgentControls, ToolNames
from api.errors import OpenAIError
from api.tool_choice import ToolChoice, check_permitted, check_servers, choose, denied_tools
from shared.agent import EFFORTS, AgentRequest, Effort, PermissionMode
from shared.settings import Settings
from shared.tool_config import ToolConfig

_INTEGER = re.compile(r"[0-9]{1,9}")  # ASCII digits only: `str.isdigit` takes "²", which `int` refuses
_MODES: tuple[str, ...] = get_args(PermissionMode)
# OpenAI's effort names → Claude Code's (`none` and `minimal` also turn thinking off).
_EFFORTS: dict[str, Effort] = {"none": "low", "minimal": "low", "xhigh": "max", **{e: e for e in EFFORTS}}


_TOOL_NAMES: TypeAdapter[list[str]] = TypeAdapter(ToolNames)


def agent_request(
    body: AgentControls,
    headers: Mapping[str, str],
    settings: Settings,
    configs: Sequence[ToolConfig] = (),
) -> AgentRequest:
    """The agent of one job. `configs` are the stored tool defaults that apply (the global one,
    then the session's): the request's own choice wins over them, as a session's over the global
    (`api/tool_choice.py`)."""
    enabled = body.enable_tools is not False
    asked = (
        body.allowed_tools if body.allowed_tools is not None else _names(headers, "x-claude-allowed-tools")
    )
    if enabled and asked is not None:
        check_permitted(asked, settings, "allowed_tools")
    if enabled and body.mcp_servers is not None:
        check_servers(body.mcp_servers, settings)
    choice = choose(settings, configs, asked, body.mcp_servers) if enabled else ToolChoice([], [], [])
    disallowed = body.disallowed_tools
    if disallowed is None:
        disallowed = _names(headers, "x-claude-disallowed-tools") or []
    return AgentRequest(
        tools=choice.tools,
        disallowed_tools=denied_tools(settings, configs, disallowed),
        max_turns=_max_turns(body, headers, settings),
        permission_mode=_permission_mode(body, headers, settings),
        max_thinking_tokens=_max_thinking_tokens(body, headers, settings),
        effort=_effort(body, settings),
        skills=enabled,
        mcp_servers=choice.mcp_servers,
        mcp_tools=choice.mcp_tools,
    )


def _names(headers: Mapping[str, str], header: str) -> list[str] | None:
    value = headers.get(header)
    if value is None:
        return None
    try:  # held to the fields' bounds
        return _TOOL_NAMES.validate_python([name.strip() for name in value.split(",") if name.strip()])
    except ValidationError:
        message = (
            f"{header} names at most 100 tools of at most 200 characters, {TOOL_NAMES_BYTES} bytes in all."
        )
        raise OpenAIError.invalid(message, param=header) from None


def _int_header(headers: Mapping[str, str], header: str, low: int) -> int | None:
    value = headers.get(header)
    if value is None:
        return None
    if not _INTEGER.fullmatch(value.strip()) or int(value) < low:
        raise OpenAIError.invalid(f"{header} must be an integer of at least {low}.", param=header)
    return int(value)


def _max_turns(body: AgentControls, headers: Mapping[str, str], settings: Settings) -> int | None:
    asked = body.max_turns if body.max_turns is not None else _int_header(headers, "x-claude-max-turns", 1)
    cap = settings.claude_max_turns
    if asked is None:
        return cap
    if cap is not None and asked > cap:
        raise OpenAIError.invalid(
            f"max_turns may be at most {cap} on this gateway.", param="max_turns", code="max_turns_too_high"
        )
    return asked


def _permission_mode(body: AgentControls, headers: Mapping[str, str], settings: Settings) -> PermissionMode:
    allowed = settings.claude_permission_modes
    asked = body.permission_mode or headers.get("x-claude-permission-mode")
    if asked is None:
        return allowed[0] if allowed else "default"
    if asked not in _MODES:
        raise OpenAIError.invalid(
            f"Unknown permission mode '{asked}' (one of {', '.join(_MODES)}).", param="permission_mode"
        )
    if asked not in allowed:
        raise OpenAIError.invalid(
            f"Permission mode '{asked}' is not permitted on this gateway (permitted: {', '.join(allowed)}).",
            param="permission_mode",
            code="permission_mode_not_permitted",
        )
    return asked


def _max_thinking_tokens(body: AgentControls, headers: Mapping[str, str], settings: Settings) -> int | None:
    asked = body.max_thinking_tokens
    if asked is None:
        asked = _int_header(headers, "x-claude-max-thinking-tokens", 0)
    if asked is None and body.reasoning_effort in ("none", "minimal"):
        asked = 0
    cap = settings.claude_max_thinking_tokens
    if asked is not None and asked > cap:
        raise OpenAIError.invalid(
            f"The thinking budget may be at most {cap} tokens on this gateway.",
            param="max_thinking_tokens",
            code="thinking_budget_too_high",
        )
    return asked


def _effort(body: AgentControls, settings: Settings) -> Effort | None:
    """The request's reasoning effort as Claude Code's (`xhigh` is its `max`), within the cap."""
    asked = body.reasoning_effort
    if asked is None:
        return None
    effort: Effort = _EFFORTS.get(asked, "low")
    cap = settings.claude_max_effort
    if EFFORTS.index(effort) > EFFORTS.index(cap):
        raise OpenAIError.invalid(
            f"Reasoning effort (reasoning_effort, Responses' reasoning.effort, Messages' "
            f"output_config.effort) may be at most '{cap}' on this gateway.",
            param="reasoning_effort",
            code="reasoning_effort_too_high",
        )
    return effort
