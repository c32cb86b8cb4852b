"""Property-based requests generated from the gateway's own OpenAPI document (schemathesis):
no input, valid or not, gets a 5xx or a response that contradicts the document.

schemathesis's pytest loader does not run under pytest 9, so each operation's strategy is driven
by hypothesis directly; the checks are schemathesis's own (`call_and_validate`).
"""

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.conftest import Gateway

KEY = "fuzz-key-for-the-tests"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def fuzzed(start_gateway: Any) -> Gateway:
    gateway: Gateway = start_gateway(workers=2, BACKEND="scripted", API_KEY=KEY, MAX_REQUEST_BYTES="65536")
    return gateway


def test_no_server_error_and_no_schema_violation(fuzzed: Gateway) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/v1/chat/completions", "/v1/models", "/health"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            # Schema-valid is not always acceptable: a request the gateway refuses on purpose (n > 1,
            # an unknown model, a malformed session id) gets a documented 4xx, never a 5xx.
            case.call_and_validate(
                base_url=fuzzed.url, headers=AUTH, timeout=30, excluded_checks=[positive_data_acceptance]
            )

        call()
