"""Structured output: `response_format` `json_object` and `json_schema`, enforced on the reply.

Claude Code has no constrained decoding, so the format is asked for in the system prompt and
checked on the finished reply: it must parse as JSON (a surrounding Markdown code fence is
removed) and, for `json_schema`, validate against the schema, or the request fails with 502
`invalid_structured_output`; a client never receives a reply that breaks its format. Checking
needs the whole reply, so a streamed structured reply arrives as one delta at the end.
"""

import json
import re
from typing import Any

import jsonschema

from api.errors import OpenAIError
from shared.jobs import CompletionJob, FinishReason

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_FENCE = re.compile(r"\A\s*```[a-zA-Z]*\s*\n(.*)\n\s*```\s*\Z", re.DOTALL)
_PARAM = "response_format"


class ResponseFormat:
    """A requested JSON format: any JSON object, or one valid against `schema`."""

    def __init__(self, schema: dict[str, Any] | None, param: str = _PARAM) -> None:
        self.schema = schema
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
        if any(not ref.startswith("#") for ref in _refs(schema)):
            raise OpenAIError.invalid(
                "The schema may only refer to its own parts ($ref starting with '#').",
                param=f"{_PARAM}.json_schema.schema",
            )
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise OpenAIError.invalid(
                f"The schema is not a valid JSON Schema: {exc.message[:200]}",
                param=f"{_PARAM}.json_schema.schema",
            ) from None
        return cls(schema)

    @classmethod
    def from_text_format(cls, value: dict[str, Any] | None) -> "ResponseFormat | None":
        """The Responses API's `text.format` (the `json_schema` fields flat), as `from_request` reads it."""
        if value is not None and value.get("type") == "json_schema":
            spec = {key: value[key] for key in ("name", "schema", "strict") if key in value}
            value = {"type": "json_schema", "json_schema": spec}
        try:
            parsed = cls.from_request(value)
            return None if parsed is None else cls(parsed.schema, "text.format")
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
        """`check` for a finished reply: one cut off by the token limit is never complete JSON."""
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
        if self.schema is None:
            if not isinstance(value, dict):
                raise _violation("The model's reply is JSON but not a JSON object.")
        else:
            error = jsonschema.exceptions.best_match(
                jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(value)
            )
            if error is not None:
                where = "/".join(str(part) for part in error.absolute_path) or "(root)"
                raise _violation(
                    f"The model's reply does not match the schema at {where}: {error.message[:200]}"
                )
        return reply.strip()


def _refs(node: Any) -> list[str]:
    """Every `$ref` in the schema (a remote one is never fetched: the request is refused)."""
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _violation(message: str) -> OpenAIError:
    return OpenAIError(502, message, type="server_error", code="invalid_structured_output")
