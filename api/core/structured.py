"""Structured output: `response_format` `json_object` and `json_schema`, enforced on the reply.

Claude Code has no constrained decoding, so the format is asked for in the system prompt and
checked on the finished reply: it must parse as JSON (a surrounding Markdown code fence is
removed) and, for `json_schema`, validate against the schema, or the request fails with 502
`invalid_structured_output`; a client never receives a reply that breaks its format. Checking
needs the whole reply, so a streamed structured reply arrives as one delta at the end.

A caller's schema must not make that check costly (a 1 KB chain of `anyOf` and `$ref` used to take
time and memory doubling per level; a backtracking `pattern` likewise), so it is bounded before a
job is queued: its size, its depth, and its size with every `$ref` written out (a recursive schema
has no such size and is refused); its patterns run on a linear-time regex engine (`jsonschema-rs`
with Rust's `regex`: no lookaround, no backreferences); and the check runs off the event loop.
"""

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import jsonschema_rs

from api.errors import NO_RETRY, OpenAIError
from shared.jobs import CompletionJob, FinishReason

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_FENCE = re.compile(r"\A\s*```[a-zA-Z]*\s*\n(.*)\n\s*```\s*\Z", re.DOTALL)
_PARAM = "response_format"
MAX_SCHEMA_CHARS = 65_536  # as JSON
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays
MAX_SCHEMA_NODES = 10_000  # objects and arrays once every `$ref` is replaced by what it names


class ResponseFormat:
    """A requested JSON format: any JSON object, or one valid against `schema`."""

    def __init__(
        self,
        schema: dict[str, Any] | None,
        validator: jsonschema_rs.Validator | None = None,
        *,
        param: str = _PARAM,
    ) -> None:
        self.schema = schema
        self._validator = validator
        self.param = param
        """The request parameter that asked for it (errors name it)."""

    @classmethod
    def from_request(cls, value: dict[str, Any] | None) -> "ResponseFormat | None":
        """The request's format (None for plain text); 400 on one the gateway cannot check."""
        kind = None if value is None else value.get("type")
        if kind in (None, "text"):
            return None
        assert value is not None
        if kind == "json_object":
            return cls(None)
        if kind != "json_schema":
            raise OpenAIError.invalid(
                "response_format.type must be 'text', 'json_object' or 'json_schema'.", param=f"{_PARAM}.type"
            )
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not _NAME.fullmatch(str(spec.get("name", ""))):
            raise OpenAIError.invalid(
                "response_format.json_schema needs a 'name' of 1 to 64 letters, digits, '_' or '-'.",
                param=f"{_PARAM}.json_schema.name",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise OpenAIError.invalid(
                "The schema must be a JSON object.", param=f"{_PARAM}.json_schema.schema"
            )
        try:
            _check_bounds(schema)
            validator = jsonschema_rs.validator_for(schema, pattern_options=jsonschema_rs.RegexOptions())
        except _Unbounded as exc:
            raise OpenAIError.invalid(str(exc), param=f"{_PARAM}.json_schema.schema") from None
        except jsonschema_rs.ValidationError as exc:
            raise OpenAIError.invalid(
                f"The schema is not a valid JSON Schema: {exc.message[:200]}",
                param=f"{_PARAM}.json_schema.schema",
            ) from None
        return cls(schema, validator)

    @classmethod
    def from_text_format(cls, value: dict[str, Any] | None) -> "ResponseFormat | None":
        """The Responses API's `text.format` (the `json_schema` fields flat), as `from_request` reads it."""
        if value is not None and value.get("type") == "json_schema":
            spec = {key: value[key] for key in ("name", "schema", "strict") if key in value}
            value = {"type": "json_schema", "json_schema": spec}
        try:
            parsed = cls.from_request(value)
            if parsed is not None:
                parsed.param = "text.format"
            return parsed
        except OpenAIError as exc:
            param = (exc.info.param or _PARAM).replace(f"{_PARAM}.json_schema", _PARAM)
            exc.info.param = param.replace(_PARAM, "text.format")
            exc.info.message = exc.info.message.replace(f"{_PARAM}.json_schema", _PARAM).replace(
                _PARAM, "text.format"
            )
            raise

    def instruct(self, job: CompletionJob) -> CompletionJob:
        """The job with the format asked for in its system prompt."""
        if self.schema is None:
            rule = "Reply with a single JSON object and nothing else: no prose, no Markdown."
        else:
            rule = (
                "Reply with a single JSON value that validates against this JSON Schema, and nothing "
                f"else: no prose, no Markdown.\n<json_schema>\n{json.dumps(self.schema)}\n</json_schema>"
            )
        system = f"{job.system_prompt}\n\n{rule}" if job.system_prompt else rule
        return job.model_copy(update={"system_prompt": system})

    def check_finished(self, reply: str, finish_reason: str) -> str:
        """`check` for a finished reply: one cut off by the token limit is never complete JSON, and
        one that ends on function calls, or at a refusal (`content_filter`, which the SDKs raise
        as such), is not the answer the format is for (it is not checked)."""
        if finish_reason in (FinishReason.TOOL_CALLS.value, FinishReason.CONTENT_FILTER.value):
            return reply
        if finish_reason == FinishReason.LENGTH.value:
            raise _violation("The reply was cut off by the token limit before its JSON was complete.")
        return self.check(reply)

    def check(self, reply: str) -> str:
        """The reply as clean JSON text; 502 when it breaks the format."""
        if match := _FENCE.match(reply):
            reply = match.group(1)
        try:
            value = json.loads(reply)
        except ValueError:
            raise _violation("The model's reply is not valid JSON.") from None
        if self._validator is None:
            if not isinstance(value, dict):
                raise _violation("The model's reply is JSON but not a JSON object.")
        else:
            try:
                self._validator.validate(value)  # stops at the first error (`iter_errors` finds them all)
            except jsonschema_rs.ValidationError as error:
                where = "/".join(str(part) for part in error.instance_path) or "(root)"
                raise _violation(
                    f"The model's reply does not match the schema at {where}: {error.message[:200]}"
                ) from None
        return reply.strip()

    async def check_finished_off_loop(self, reply: str, finish_reason: str) -> str:
        """`check_finished` in a thread, so a large reply never stalls the other streams."""
        return await asyncio.to_thread(self.check_finished, reply, finish_reason)


class _Unbounded(Exception):
    """A schema whose check could cost too much."""


def _check_bounds(schema: dict[str, Any]) -> None:
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise _Unbounded(f"The schema is too large: at most {MAX_SCHEMA_CHARS} characters of JSON.")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise _Unbounded(f"The schema is nested too deeply: at most {MAX_SCHEMA_DEPTH} levels.")
    _ExpandedSize(schema).of(schema)


def _depth(node: Any) -> int:
    if not isinstance(node, dict | list):
        return 0
    return 1 + max(map(_depth, _children(node)), default=0)


class _ExpandedSize:
    """The schema's objects and arrays counted as if every `$ref` were replaced by its target,
    in one pass (each target is counted once and remembered); a cycle means a recursive schema."""

    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._sizes: dict[int, int] = {}
        self._open: set[int] = set()

    def of(self, node: Any) -> int:
        if not isinstance(node, dict | list):
            return 0
        if id(node) in self._sizes:
            return self._sizes[id(node)]
        if id(node) in self._open:
            raise _Unbounded(
                "The schema refers to itself ($ref in a cycle): recursive schemas are not supported."
            )
        self._open.add(id(node))
        size = 1
        for child in _children(node):
            size += self.of(child)
        if isinstance(node, dict):
            for keyword in ("$dynamicRef", "$recursiveRef"):
                if keyword in node:
                    raise _Unbounded(f"The schema may not use {keyword}.")
            if isinstance(ref := node.get("$ref"), str):
                size += self.of(self._target(ref))
        self._open.discard(id(node))
        if size > MAX_SCHEMA_NODES:
            raise _Unbounded(
                f"The schema is too large once its $refs are expanded: at most {MAX_SCHEMA_NODES} "
                "objects and arrays."
            )
        self._sizes[id(node)] = size
        return size

    def _target(self, ref: str) -> Any:
        """What a `$ref` names: only the schema's own parts, by JSON pointer (never fetched)."""
        if ref != "#" and not ref.startswith("#/"):
            raise _Unbounded("The schema may only refer to its own parts ($ref '#' or '#/...').")
        node: Any = self._root
        for token in ref[2:].split("/") if ref != "#" else ():
            token = unquote(token).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isascii() and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise _Unbounded(f"The schema's $ref {ref[:100]!r} names nothing in it.")
        return node


def _children(node: dict[str, Any] | list[Any]) -> Iterator[Any]:
    return iter(node.values() if isinstance(node, dict) else node)


def _violation(message: str) -> OpenAIError:
    return OpenAIError(502, message, type="server_error", code="invalid_structured_output", headers=NO_RETRY)
