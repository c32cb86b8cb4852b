"""What a request may let the agent do, checked against the operator's tool policy.

The request asks through body extension fields (`enable_tools`, `allowed_tools`,
`disallowed_tools`, `max_turns`, `permission_mode`) or, when a field is absent, the original
wrapper's `X-Claude-*` headers. The policy: `CLAUDE_TOOLS` are the tools callers may have (a job
has all of them unless it narrows them), `CLAUDE_DISALLOWED_TOOLS` are denied to every job,
`CLAUDE_MAX_TURNS` caps turns, `CLAUDE_PERMISSION_MODES` lists the modes a caller may choose.
Asking for more than the policy grants is a 400, never a silent downgrade. Stored tool
configurations (`/v1/tools/config`: the operator's global one, a caller's per session) are
defaults between the policy and the request.
"""

import re
from collections.abc import Mapping, Sequence
from typing import get_args

from api.chat.protocol import ChatCompletionRequest
from api.errors import OpenAIError
from shared.agent import AgentRequest, PermissionMode
from shared.settings import Settings
from shared.tool_config import ToolConfig

_INTEGER = re.compile(r"[0-9]{1,9}")  # ASCII digits only: `str.isdigit` takes "²", which `int` refuses
_MODES: tuple[str, ...] = get_args(PermissionMode)


def agent_request(
    body: ChatCompletionRequest,
    headers: Mapping[str, str],
    settings: Settings,
    configs: Sequence[ToolConfig] = (),
) -> AgentRequest:
    """The agent of one job. `configs` are the stored tool defaults that apply (the global one,
    then the session's): the request's own choice wins over them, as a session's over the global."""
    allowed = (
        body.allowed_tools if body.allowed_tools is not None else _names(headers, "x-claude-allowed-tools")
    )
    if allowed is None:
        allowed = default_tools(settings, configs)
    elif body.enable_tools is not False:
        check_permitted(allowed, settings, "allowed_tools")
    disallowed = body.disallowed_tools
    if disallowed is None:
        disallowed = _names(headers, "x-claude-disallowed-tools") or []
    return AgentRequest(
        tools=list(dict.fromkeys(allowed)) if body.enable_tools is not False else [],
        disallowed_tools=denied_tools(settings, configs, disallowed),
        max_turns=_max_turns(body, headers, settings),
        permission_mode=_permission_mode(body, headers, settings),
        max_thinking_tokens=_max_thinking_tokens(headers),
        skills=body.enable_tools is not False,
    )


def check_permitted(tools: Sequence[str], settings: Settings, param: str) -> None:
    """400 `tool_not_permitted` for the first tool the operator's policy does not grant."""
    permitted = settings.claude_tools
    if refused := [tool for tool in tools if tool not in permitted]:
        raise OpenAIError.invalid(
            f"Tool '{refused[0]}' is not permitted on this gateway"
            + (f" (permitted: {', '.join(permitted)})." if permitted else " (no tools are)."),
            param=param,
            code="tool_not_permitted",
        )


def default_tools(settings: Settings, configs: Sequence[ToolConfig]) -> list[str]:
    """The tools of a job that names none: the latest configured choice, within the policy (a stored
    choice the operator has since narrowed loses what is no longer permitted), else all permitted."""
    for config in reversed(configs):
        if config.allowed_tools is not None:
            return [tool for tool in config.allowed_tools if tool in settings.claude_tools]
    return list(settings.claude_tools)


def denied_tools(
    settings: Settings, configs: Sequence[ToolConfig], requested: Sequence[str] = ()
) -> list[str]:
    """Everything denied to a job: the operator's, each configuration's, the request's."""
    stored = [tool for config in configs for tool in config.disallowed_tools or []]
    return list(dict.fromkeys([*settings.claude_disallowed_tools, *stored, *requested]))


def _names(headers: Mapping[str, str], header: str) -> list[str] | None:
    value = headers.get(header)
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def _int_header(headers: Mapping[str, str], header: str, low: int) -> int | None:
    value = headers.get(header)
    if value is None:
        return None
    if not _INTEGER.fullmatch(value.strip()) or int(value) < low:
        raise OpenAIError.invalid(f"{header} must be an integer of at least {low}.", param=header)
    return int(value)


def _max_turns(body: ChatCompletionRequest, headers: Mapping[str, str], settings: Settings) -> int | None:
    asked = body.max_turns if body.max_turns is not None else _int_header(headers, "x-claude-max-turns", 1)
    cap = settings.claude_max_turns
    if asked is None:
        return cap
    if cap is not None and asked > cap:
        raise OpenAIError.invalid(
            f"max_turns may be at most {cap} on this gateway.", param="max_turns", code="max_turns_too_high"
        )
    return asked


def _permission_mode(
    body: ChatCompletionRequest, headers: Mapping[str, str], settings: Settings
) -> PermissionMode:
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


def _max_thinking_tokens(headers: Mapping[str, str]) -> int | None:
    return _int_header(headers, "x-claude-max-thinking-tokens", 0)
