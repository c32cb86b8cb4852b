"""Property-based requests generated from the gateway's own OpenAPI document (schemathesis):
no input, valid or not, gets a 5xx or a response that contradicts the document.

schemathesis's pytest loader does not run under pytest 9, so each operation's strategy is driven
by hypothesis directly; the checks are schemathesis's own (`call_and_validate`). The headers the
gateway reads but the document does not declare (`X-Claude-*`, `X-Session-Id`, ...) are fuzzed
too, with any latin-1 text and values chosen to break integer parsing. At least `CASES` requests
in all.
"""

import math
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from tests.conftest import Gateway

KEY = "fuzz-key-for-the-tests"
AUTH = {"authorization": f"Bearer {KEY}"}
CASES = 2000
READ_HEADERS = [
    "x-claude-max-turns",
    "x-claude-max-thinking-tokens",
    "x-claude-permission-mode",
    "x-claude-allowed-tools",
    "x-claude-disallowed-tools",
    "x-session-id",
    "last-event-id",
    "idempotency-key",
    "x-request-id",
    "content-type",
]
# Text a header can carry (latin-1 without control or space characters, which HTTP clients refuse
# at the start of a value), and values made to break parsing.
_HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_categories=("Cc", "Zs")), max_size=40
)
_ODD_VALUES = st.sampled_from(["²", "¹²", "-1", "0", "1e3", "7 ", "99999999999999999999", "", "null", "[]"])
HEADERS = st.dictionaries(st.sampled_from(READ_HEADERS), st.one_of(_ODD_VALUES, _HEADER_TEXT), max_size=4)


@pytest.fixture(scope="module")
def fuzzed(start_gateway: Any) -> Gateway:
    gateway: Gateway = start_gateway(workers=2, BACKEND="scripted", API_KEY=KEY, MAX_REQUEST_BYTES="65536")
    return gateway


def test_no_server_error_and_no_schema_violation(fuzzed: Gateway) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/v1/chat/completions", "/v1/models", "/health"}
    per_operation = math.ceil(CASES / len(operations))
    calls = 0
    for operation in operations:

        @given(case=operation.as_strategy(), headers=HEADERS)
        @settings(
            max_examples=per_operation, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def call(case: Any, headers: dict[str, str]) -> None:
            nonlocal calls
            calls += 1
            case.headers = {**(case.headers or {}), **headers}
            # Schema-valid is not always acceptable: a request the gateway refuses on purpose (n > 1,
            # an unknown model, a malformed session id) gets a documented 4xx, never a 5xx.
            case.call_and_validate(
                base_url=fuzzed.url, headers=AUTH, timeout=30, excluded_checks=[positive_data_acceptance]
            )

        call()
    assert calls >= CASES
