"""What a request may let the agent do, checked against the operator's tool policy.

The request asks through body extension fields (`enable_tools`, `allowed_tools`,
`disallowed_tools`, `max_turns`, `permission_mode`) or, when a field is absent, the original
wrapper's `X-Claude-*` headers. The policy: `CLAUDE_TOOLS` are the tools callers may have (a job
has all of them unless it narrows them), `CLAUDE_DISALLOWED_TOOLS` are denied to every job,
`CLAUDE_MAX_TURNS` caps turns, `CLAUDE_PERMISSION_MODES` lists the modes a caller may choose.
Asking for more than the policy grants is a 400, never a silent downgrade.
"""

import re
from collections.abc import Mapping
from typing import get_args

from api.chat.protocol import ChatCompletionRequest
from api.errors import OpenAIError
from shared.agent import AgentRequest, PermissionMode
from shared.settings import Settings

_INTEGER = re.compile(r"[0-9]{1,9}")  # ASCII digits only: `str.isdigit` takes "²", which `int` refuses
_MODES: tuple[str, ...] = get_args(PermissionMode)


def agent_request(
    body: ChatCompletionRequest, headers: Mapping[str, str], settings: Settings
) -> AgentRequest:
    permitted = settings.claude_tools
    tools = list(permitted) if body.enable_tools is not False else []
    allowed = (
        body.allowed_tools if body.allowed_tools is not None else _names(headers, "x-claude-allowed-tools")
    )
    if allowed is not None and body.enable_tools is not False:
        if refused := [tool for tool in allowed if tool not in permitted]:
            raise OpenAIError.invalid(
                f"Tool '{refused[0]}' is not permitted on this gateway"
                + (f" (permitted: {', '.join(permitted)})." if permitted else " (no tools are)."),
                param="allowed_tools",
                code="tool_not_permitted",
            )
        tools = list(dict.fromkeys(allowed))
    disallowed = body.disallowed_tools
    if disallowed is None:
        disallowed = _names(headers, "x-claude-disallowed-tools") or []
    return AgentRequest(
        tools=tools,
        disallowed_tools=list(dict.fromkeys([*settings.claude_disallowed_tools, *disallowed])),
        max_turns=_max_turns(body, headers, settings),
        permission_mode=_permission_mode(body, headers, settings),
        max_thinking_tokens=_max_thinking_tokens(headers),
        skills=body.enable_tools is not False,
    )


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
