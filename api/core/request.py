"""The one internal request every front end translates its wire format into.

A front end parses its own body, refuses what its format cannot mean here, and builds a
`CompletionRequest`; from then on one path (`api/core/submit.py`) validates it, applies the
operator's policy and limits, and queues its jobs. The agent controls are part of every front
end's body (`AgentControls` is a base of each wire model), so they hold on every endpoint.
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from api.core.conversation import ChatMessage
from api.core.structured import ResponseFormat
from api.core.wire import STRICT
from api.errors import OpenAIError

ToolName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
TOOL_NAMES_BYTES = 20 * 1024


def _fits(names: list[str]) -> list[str]:
    if len(",".join(names).encode()) > TOOL_NAMES_BYTES:
        raise ValueError(f"the names come to over {TOOL_NAMES_BYTES} bytes")
    return names


ToolNames = Annotated[list[ToolName], Field(max_length=100), AfterValidator(_fits)]
"""Tool names or rules a caller gives (a request, `/v1/tools/config`): they go on Claude Code's
command line, which takes no NUL and at most 128 KiB in one argument, where the request's, the
stored defaults' and the operator's are one (outside probes: a 140,000-character name, 30,000
names, or two lists of 100 names in four-byte characters failed the CLI's start)."""


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class AgentControls(BaseModel):
    """What a request asks the agent may do: extensions of the original wrapper, in every front
    end's body (the `X-Claude-*` headers set the same when a field is absent). Checked against the
    operator's tool policy (`api/core/policy.py`)."""

    model_config = STRICT

    enable_tools: bool | None = None
    allowed_tools: ToolNames | None = None
    disallowed_tools: ToolNames | None = None
    max_turns: int | None = Field(default=None, ge=1)
    permission_mode: str | None = None
    mcp_servers: list[Annotated[str, StringConstraints(max_length=64)]] | None = Field(
        default=None, max_length=100, description="Extension: the operator's MCP servers the job has."
    )
    reasoning_effort: ReasoningEffort | None = None
    """Chat's own field (also set from Responses' `reasoning.effort`): Claude Code's effort;
    `none`/`minimal` also turn thinking off."""
    max_thinking_tokens: int | None = Field(default=None, ge=0)
    """The thinking budget (Messages' `thinking`, or `X-Claude-Max-Thinking-Tokens`); 0: none."""
    include_reasoning: bool | None = Field(
        default=None, description="Extension: false leaves out the agent's thinking and tool steps."
    )

    def agent_controls(self) -> "AgentControls":
        # A front end's body is an `AgentControls`, validated already: its fields are copied as they are.
        return AgentControls.model_construct(**{name: getattr(self, name) for name in _AGENT_FIELDS})


_AGENT_FIELDS = tuple(AgentControls.model_fields)

SessionId = Annotated[
    str | None, Field(description="Extension: continue this session (or the `X-Session-Id` header).")
]
"""Every front end's `session_id` (`api/core/sessions.py`)."""


class CompletionRequest(BaseModel):
    """A request as the core runs it: a chat-shaped conversation, the caller's functions in chat's
    form, and what the gateway adds (background, sessions, the agent's controls)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    background: bool = False
    session_id: str | None = None
    agent: AgentControls = Field(default_factory=AgentControls)

    @classmethod
    def translated(cls, **fields: Any) -> "CompletionRequest":
        """A request translated from a wire format; 400 if the translation is not a valid one."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join(str(part) for part in error["loc"]) or None
            raise OpenAIError.invalid(f"Invalid request: {param}: {error['msg']}.", param=param) from None
