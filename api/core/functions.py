"""Function calling on chat completions: the caller's functions go to the job, calls come back.

`tools` of type `function` (and the legacy `functions`) become the job's `functions`, which the
backend offers the model alongside the agent's own tools; a call to one ends the turn with
`finish_reason: tool_calls`. The caller's next request carries the calls (an assistant message's
`tool_calls`) and their results (`role: tool` messages); these become turns of the conversation,
written as `<function_call>` / `<function_result>` text, so any backend can continue it.
`tool_choice` `required` or a named function is asked for in the system prompt (Claude Code
cannot force a tool choice); `none` offers no function.
"""

import html
import re
from typing import Any

from api.core.conversation import ChatMessage, TextPart
from api.core.request import CompletionRequest
from api.errors import OpenAIError
from shared.jobs import CompletionJob, FunctionTool

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")  # as Claude Code takes them (a backend shortens what it must)
MAX_FUNCTIONS = 128
"""OpenAI's limit. Their names go on Claude Code's command line: 3,000 of them were over what
Linux takes in one argument, and the CLI did not start (an outside probe)."""


class FunctionCalling:
    """The request's functions and how it asked for them to be used."""

    def __init__(self, functions: list[FunctionTool], rule: str | None) -> None:
        self.functions = functions
        self.rule = rule

    def instruct(self, job: CompletionJob) -> CompletionJob:
        system = job.system_prompt
        if self.rule is not None:
            system = f"{system}\n\n{self.rule}" if system else self.rule
        return job.model_copy(update={"functions": self.functions, "system_prompt": system})


def check_function(spec: Any, param: str) -> None:
    """A function (at `param`) a backend can offer, or 400: its `name`, and `parameters` as an
    object's schema, each property's a schema (one that was not dropped every function of the
    request, unsaid: an outside probe)."""
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not _NAME.fullmatch(spec["name"])
    ):
        raise OpenAIError.invalid(
            "A function needs a 'name' of 1 to 128 letters, digits, '_' or '-'.", param=f"{param}.name"
        )
    parameters = spec.get("parameters") or {}
    properties = parameters.get("properties", {}) if isinstance(parameters, dict) else None
    if (
        not isinstance(parameters, dict)
        or parameters.get("type", "object") != "object"
        or not isinstance(properties, dict)
        or not all(isinstance(schema, dict | bool) for schema in properties.values())
    ):
        raise OpenAIError.invalid(
            "A function's parameters must be a JSON Schema of type 'object', each property's a schema.",
            param=f"{param}.parameters",
        )


def _function(spec: Any, param: str) -> FunctionTool:
    check_function(spec, param)
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    return FunctionTool(
        name=spec["name"], description=str(spec.get("description") or ""), parameters=parameters
    )


def _text(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content or [] if isinstance(part, TextPart))


def _result_text(message: ChatMessage, index: int) -> str:
    """A function's result, which can hold only text here: a result is written into the
    conversation as text (`<function_result>`), and an image in it would be lost."""
    for number, part in enumerate(message.content if isinstance(message.content, list) else []):
        if not isinstance(part, TextPart):
            raise OpenAIError.invalid(
                "A function's result can hold only text on this gateway.",
                param=f"messages[{index}].content[{number}]",
                code="unsupported_content",
            )
    return _text(message)


def inert(text: str, *also: str) -> str:
    """`text` inside a call or a result, unable to end it or begin another (nor open or close the
    tags `also` names): a result often holds a third party's text (a page, a file), and one holding
    `</function_result>` had ended its result and gone on as the user's own words and an earlier
    call (an outside probe)."""
    tags = "|".join(("function_call", "function_result", *also))
    return re.sub(rf"<(?=/?(?:{tags}))", "&lt;", text, flags=re.IGNORECASE)


def _attribute(value: object) -> str:
    return html.escape(str(value), quote=True)


def _as_turn(message: ChatMessage, index: int) -> ChatMessage:
    """A message about function calls as a plain user or assistant message."""
    if message.role == "assistant" and (message.tool_calls or message.function_call):
        calls = message.tool_calls or [{"id": "call_legacy", "function": message.function_call}]
        written = [
            f'<function_call id="{_attribute(call.get("id"))}" '
            f'name="{_attribute((call.get("function") or {}).get("name"))}">'
            f"{inert(str((call.get('function') or {}).get('arguments')))}</function_call>"
            for call in calls
        ]
        return ChatMessage(role="assistant", content="\n".join(filter(None, [_text(message), *written])))
    if message.role in ("tool", "function"):
        about = (
            f'id="{_attribute(message.tool_call_id)}"'
            if message.role == "tool"
            else f'name="{_attribute(message.name)}"'
        )
        result = inert(_result_text(message, index))
        return ChatMessage(role="user", content=f"<function_result {about}>{result}</function_result>")
    return message


def _check_answered(messages: list[ChatMessage]) -> None:
    """Each function call has its result, after it, and each result answers a call (400 otherwise,
    as OpenAI's and Anthropic's APIs answer): a result alone would reach the model as an answer to
    nothing, and a call without one as a question the caller never answered."""
    waiting: list[str] = []  # the ids of calls not answered yet
    answered: set[str] = set()
    for message in messages:
        if message.role == "tool":
            call_id = str(message.tool_call_id)
            if call_id in answered:  # said to answer no call, it misled an outside probe
                raise OpenAIError.invalid(
                    f"The function call '{call_id[:64]}' has more than one result: send one per call.",
                    code="duplicate_tool_result",
                )
            if call_id not in waiting:
                raise OpenAIError.invalid(
                    f"The tool result for '{call_id[:64]}' answers no function call made before it.",
                    code="orphan_tool_result",
                )
            waiting.remove(call_id)
            answered.add(call_id)
        calls = [str(call.get("id")) for call in message.tool_calls or []]
        if shared := next(
            (call for i, call in enumerate(calls) if call in waiting or call in calls[:i]), None
        ):
            raise OpenAIError.invalid(  # its results would answer either (a re-check probe)
                f"Two function calls have the id '{shared[:64]}': each call needs its own.",
                code="duplicate_tool_call_id",
            )
        waiting += calls
        answered.difference_update(calls)  # a later call may take an id again (clients number them)
    if waiting:
        raise OpenAIError.invalid(
            f"The function call '{waiting[0][:64]}' has no result: send one for each call "
            "(a 'tool' message, a 'function_call_output' item or a 'tool_result' block).",
            code="missing_tool_result",
        )


_REQUIRED = "You must answer by calling one or more of the functions offered to you."


def _chosen(
    choice: str | dict[str, Any] | None, functions: list[FunctionTool], param: str
) -> tuple[list[FunctionTool], str | None]:
    """The functions the model may call under `choice`, and the rule it is given to choose:
    `none`, `auto`, `required`, one function by name (chat's `{"type": "function", "function":
    {"name"}}`, Responses' and the legacy `{"name"}`), or chat's `allowed_tools` (a subset, `auto`
    or `required`)."""
    if choice is None or choice == "auto":
        return functions, None
    if choice == "none":
        return [], None
    if choice == "required":
        return functions, _REQUIRED
    if not isinstance(choice, dict) or choice.get("type", "function") not in ("function", "allowed_tools"):
        raise OpenAIError.unsupported(param)
    if choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        mode, tools = allowed.get("mode"), allowed.get("tools")
        if mode not in ("auto", "required") or not isinstance(tools, list) or not tools:
            raise OpenAIError.invalid(
                f"{param}.allowed_tools takes a mode ('auto' or 'required') and a list of tools.", param=param
            )
        names = {_chosen_name(tool, param) for tool in tools}
        kept = [f for f in functions if f.name in names]
        if len(kept) != len(names):
            raise OpenAIError.invalid(f"{param}.allowed_tools names a function not offered.", param=param)
        return kept, _REQUIRED if mode == "required" else None
    name = _chosen_name(choice, param)
    kept = [f for f in functions if f.name == name]
    if not kept:
        raise OpenAIError.invalid(f"{param} names no offered function: {name[:64]}", param=param)
    return kept, f"You must answer by calling the function {name}."


def _chosen_name(choice: Any, param: str) -> str:
    """The function a choice names: `{"function": {"name"}}` or `{"name"}`."""
    named = choice.get("function") if isinstance(choice, dict) and "function" in choice else choice
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str) or not name:
        raise OpenAIError.invalid(f"{param} names a function without its name.", param=param)
    return name


def function_calling(body: CompletionRequest) -> tuple[CompletionRequest, FunctionCalling | None]:
    """The request without its function-calling parts (for `build_job`), and those parts."""
    uses_functions = any(m.role in ("tool", "function") or m.tool_calls for m in body.messages)
    if not (body.tools or body.functions or uses_functions):
        return body, None
    _check_answered(body.messages)
    functions: list[FunctionTool] = []
    for index, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            raise OpenAIError.invalid(
                "Only tools of type 'function' are supported.",
                param=f"tools[{index}].type",
                code="unsupported_tool",
            )
        functions.append(_function(tool.get("function"), f"tools[{index}].function"))
    functions += [_function(spec, f"functions[{i}]") for i, spec in enumerate(body.functions or [])]
    if len(functions) > MAX_FUNCTIONS:
        param = "tools" if body.tools else "functions"
        raise OpenAIError.invalid(f"At most {MAX_FUNCTIONS} functions can be offered.", param=param)
    param, choice = (
        ("tool_choice", body.tool_choice)
        if body.tool_choice is not None
        else ("function_call", body.function_call)
    )
    functions, rule = _chosen(choice, functions, param)
    if body.parallel_tool_calls is False and functions:
        single = "Call at most one function in your reply."
        rule = f"{rule} {single}" if rule else single
    plain = body.model_copy(
        update={
            "tools": None,
            "tool_choice": None,
            "functions": None,
            "function_call": None,
            "messages": [_as_turn(message, index) for index, message in enumerate(body.messages)],
        }
    )
    return plain, FunctionCalling(functions, rule)
