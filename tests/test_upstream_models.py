"""`MODELS_FROM_UPSTREAM`: a worker with an API key fetches the model API's own list (every page,
cached in Redis), and the API lists and serves those models beside the configured ones."""

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, assert_schema, chat, claude_env
from tests.fake_anthropic import FakeAnthropic

pytestmark = pytest.mark.claude

UPSTREAM_IDS = ["claude-opus-4-7", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-haiku-9"]


@pytest.fixture(scope="module")
def listing(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Iterator[Gateway]:
    fake_anthropic.models = list(UPSTREAM_IDS)
    fake_anthropic.models_keys.clear()
    gateway: Gateway = start_gateway(workers=1, **claude_env(fake_anthropic, MODELS_FROM_UPSTREAM="true"))
    yield gateway
    fake_anthropic.models = []


def _ids(gateway: Gateway) -> list[str]:
    listed = httpx.get(f"{gateway.url}/v1/models", timeout=10).json()
    assert_schema(listed, "ListModelsResponse")
    return [model["id"] for model in listed["data"]]


def test_the_upstreams_models_are_listed_cached_and_served(listing: Gateway, upstream: FakeAnthropic) -> None:
    deadline = time.monotonic() + 20
    while "claude-opus-4-7" not in _ids(listing):
        assert time.monotonic() < deadline, "the upstream's models were never listed"
        time.sleep(0.2)
    ids = _ids(listing)
    # The configured models and aliases first, then the upstream's that are not listed yet.
    assert ids == [
        "claude-sonnet-4-5",
        "claude-opus-4-1",
        "claude-haiku-4-5",
        "sonnet",
        "opus",
        "haiku",
        "claude-opus-4-7",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-9",
    ]
    # Two pages, fetched once with the worker's own key, then served from the cache.
    assert upstream.models_keys == ["test-key-not-real"] * 2
    model = httpx.get(f"{listing.url}/v1/models", timeout=10).json()["data"][6]
    assert model["created"] == 1759104000  # 2025-09-29T00:00:00Z
    response = httpx.post(
        f"{listing.url}/v1/chat/completions", json=chat("hi", model="claude-opus-4-7"), timeout=90
    )
    assert response.status_code == 200, response.text
    assert upstream.requests[-1]["model"] == "claude-opus-4-7"
    unlisted = httpx.post(
        f"{listing.url}/v1/chat/completions", json=chat("hi", model="claude-opus-9"), timeout=10
    )
    assert unlisted.status_code == 404
