"""Credentials out of anything the gateway echoes (`POST /v1/debug/request`).

Three nets, since one would miss: values under secret-looking names (headers, query parameters,
JSON fields: `authorization`, `x-api-key`, `cookie`, `*_token`, `*_secret`, ...), values that look
like credentials wherever they are (`Bearer ...`, `sk-...`, AWS key ids, JWTs), and the exact
secrets this process knows (the caller's key, the configured client keys, a model API key).
"""

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"

_SECRET_NAME = re.compile(
    r"(^|[_\-.])(key|token|secret|password|passwd|authorization|auth|cookie|credentials?|signature)"
    r"($|[_\-.])",
    re.IGNORECASE,
)
_SECRET_VALUES = [
    re.compile(r"\b(Bearer|Basic|Token)\s+[^\s,\"']+", re.IGNORECASE),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),  # Anthropic and OpenAI keys
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"),  # Google API keys
    re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]+"),  # JWTs
]
# "name": "value" pairs in JSON text, for a body that is echoed as sent.
_JSON_PAIR = re.compile(r'("([^"\\]|\\.)*"\s*:\s*)"(([^"\\]|\\.)*)"')


def secret_name(name: str) -> bool:
    return _SECRET_NAME.search(name) is not None


class Redactor:
    def __init__(self, known: Iterable[str]) -> None:
        # Longest first, so a secret containing another is replaced whole.
        self._known = sorted({secret for secret in known if len(secret) >= 4}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._known:
            value = value.replace(secret, REDACTED)
        for pattern in _SECRET_VALUES:
            value = pattern.sub(REDACTED, value)
        return value

    def json_text(self, raw: str) -> str:
        """JSON as sent (even malformed): values of secret-looking fields, then every string."""

        def pair(match: re.Match[str]) -> str:
            return (
                f'{match.group(1)}"{REDACTED}"'
                if secret_name(match.group(1).strip(' \t\r\n:"'))
                else match.group(0)
            )

        return self.text(_JSON_PAIR.sub(pair, raw))

    def value(self, value: Any) -> Any:
        """A parsed JSON value, every secret-looking field and string redacted."""
        if isinstance(value, dict):
            return {k: REDACTED if secret_name(str(k)) else self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, str):
            return self.text(value)
        return value
