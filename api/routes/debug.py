"""`POST /v1/debug/request`: what the gateway received and whether it is a valid chat request.

Off by default (`DEBUG_ENDPOINTS=false`: the route does not exist and answers the usual 404). On,
it sits behind the API key like every /v1 route and answers in the original wrapper's shape
(`debug_info`), except that every credential is redacted: the original echoed the
`Authorization` header back.
"""

import json
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from pydantic import ValidationError

from api.chat.protocol import ChatCompletionRequest
from api.core.limits import bounded_json
from api.deps import CallerDep, GatewayDep
from api.redaction import REDACTED, Redactor, secret_name

router = APIRouter()

_EXAMPLE = {
    "model": "claude-sonnet-4-5",
    "messages": [{"role": "user", "content": "Hello, world!"}],
    "stream": False,
}


def _redactor(gateway: GatewayDep, request: Request) -> Redactor:
    settings = gateway.settings
    known = [*settings.client_api_keys(), *request.headers.getlist("x-api-key")]
    known += [value.partition(" ")[2].strip() for value in request.headers.getlist("authorization")]
    return Redactor(known)  # the model credentials: an API process never holds them (cli/children.py)


def _url(request: Request, redactor: Redactor) -> str:
    query = [
        (k, REDACTED if secret_name(k) else redactor.text(v)) for k, v in request.query_params.multi_items()
    ]
    return redactor.text(str(request.url.replace(query=urlencode(query)) if query else request.url))


def _validation(parsed: Any) -> dict[str, Any]:
    try:
        chat = ChatCompletionRequest.model_validate(parsed)
    except ValidationError as exc:
        errors = [
            {"field": " -> ".join(str(part) for part in e["loc"]), "message": e["msg"], "type": e["type"]}
            for e in exc.errors(include_input=False)
        ]
        return {"valid": False, "errors": errors}
    return {"valid": True, "validated_data": chat.model_dump(exclude_none=True)}


@router.post("/v1/debug/request")
async def debug_request(gateway: GatewayDep, caller: CallerDep, request: Request) -> dict[str, Any]:
    redactor = _redactor(gateway, request)
    body = await request.body()
    # Parsed whatever its type, so checked as every JSON body is (a probe's text/plain ones: 500s).
    if (refusal := bounded_json(body, gateway.settings)) is not None:
        raise refusal
    raw = body.decode("utf-8", errors="replace")
    parsed: Any = None
    parse_error = None
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError as exc:
        parse_error = f"{type(exc).__name__} at character {getattr(exc, 'pos', '?')}"
    validation = _validation(parsed) if parsed else {"valid": False, "errors": []}
    headers = {
        name: REDACTED if secret_name(name) else redactor.text(value)
        for name, value in request.headers.items()
    }
    return {
        "debug_info": {
            "headers": headers,
            "method": request.method,
            "url": _url(request, redactor),
            "raw_body": redactor.json_text(raw),
            "json_parse_error": parse_error,
            "parsed_body": redactor.value(parsed),
            "validation_result": redactor.value(validation),
            "debug_mode_enabled": True,
            "example_valid_request": _EXAMPLE,
        }
    }
