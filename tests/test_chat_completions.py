"""Chat completions end to end: official `openai` clients and raw HTTP against the API, real
Redis and two real worker processes on the scripted backend."""

import json
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.conftest import Gateway, assert_schema, chat, sse_data

MODEL = "claude-sonnet-4-5"


def script(**spec: Any) -> str:
    return "script:" + json.dumps(spec)


@pytest.fixture
def client(scripted: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def async_client(scripted: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_non_streaming_completion_matches_the_official_schema(scripted: Gateway) -> None:
    response = httpx.post(f"{scripted.url}/v1/chat/completions", json=chat("hi there"), timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert_schema(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion"
    assert body["model"] == "claude-sonnet-4-5"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello from the scripted backend.",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 2
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == 7
    assert response.headers["x-request-id"].startswith("req_")


def test_sync_client(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": script(text="a b c")},
        ],
    )
    assert completion.choices[0].message.content == "a b c"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


async def test_async_streaming_client_with_usage(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": script(text="one two three four", delay_ms=5)}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_wire_format(scripted: Gateway) -> None:
    body = chat(
        script(text="alpha beta gamma", delay_ms=2), stream=True, stream_options={"include_usage": True}
    )
    response = httpx.post(
        f"{scripted.url}/v1/chat/completions", json=body, headers={"x-request-id": "trace-42"}, timeout=30
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"] == "trace-42"
    data = sse_data(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_stream_without_usage_option_has_no_usage_chunk(scripted: Gateway) -> None:
    response = httpx.post(f"{scripted.url}/v1/chat/completions", json=chat("x", stream=True), timeout=30)
    chunks = [json.loads(d) for d in sse_data(response)[:-1]]
    assert all(chunk["choices"] for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)


def test_long_stream_loses_and_repeats_nothing(client: openai.OpenAI) -> None:
    words = [f"w{i} " for i in range(5000)]
    stream = client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": script(text="".join(words))}],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "".join(words)


def test_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": script(text="a b c d e f")}],
        max_completion_tokens=2,
    )
    assert completion.choices[0].message.content == "a b "
    assert completion.choices[0].finish_reason == "length"


def test_failure_before_output_is_an_http_error(client: openai.OpenAI, scripted: Gateway) -> None:
    prompt = script(text="x", fail_after=0, fail_code="upstream_authentication_error")
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": prompt}]
        )
    assert raised.value.status_code == 502
    assert raised.value.code == "upstream_authentication_error"
    # The same failure on a stream gets the same status, not a 200 carrying the error.
    response = httpx.post(f"{scripted.url}/v1/chat/completions", json=chat(prompt, stream=True), timeout=30)
    assert response.status_code == 502
    assert_schema(response.json(), "ErrorResponse")


def test_the_sdk_does_not_run_again_a_job_a_retry_would_only_repeat(scripted: Gateway) -> None:
    """The SDKs retry 409 and 5xx by default; a whole agent run that the model API refused, or that
    hit its time limit, would only be run again (one call made three runs). An overloaded model API
    too (found by an outside probe: one call, nine upstream requests): Claude Code retried it."""
    retrying = openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=2, timeout=30)
    store = scripted.redis()
    for code, retried in (("upstream_error", False), ("timeout", False), ("upstream_rate_limited", False)):
        before = _job_records(store)
        prompt = script(text="x", fail_after=0, fail_code=code)
        with pytest.raises(openai.APIStatusError) as raised:
            retrying.chat.completions.create(
                model="claude-sonnet-4-5", messages=[{"role": "user", "content": prompt}]
            )
        assert raised.value.code == code
        assert (raised.value.response.headers.get("x-should-retry") != "false") is retried
        jobs = _job_records(store) - before
        assert jobs > 1 if retried else jobs == 1, (code, jobs)


def _job_records(redis: "redis.Redis[bytes]") -> int:
    return sum(key.count(b":") == 2 for key in redis.scan_iter("gateway:job:*", count=1000))


def test_failure_after_output_ends_the_stream_with_an_error_event(
    client: openai.OpenAI, scripted: Gateway
) -> None:
    prompt = script(text="a b c d", delay_ms=5, fail_after=2)
    response = httpx.post(f"{scripted.url}/v1/chat/completions", json=chat(prompt, stream=True), timeout=30)
    assert response.status_code == 200
    data = sse_data(response)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])
    assert_schema(error, "ErrorResponse")
    assert error["error"]["code"] == "upstream_error"
    stream = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": prompt}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_models_and_health(client: openai.OpenAI, scripted: Gateway) -> None:
    listing = httpx.get(f"{scripted.url}/v1/models").json()
    assert_schema(listing, "ListModelsResponse")
    assert "claude-sonnet-4-5" in [m.id for m in client.models.list()]
    health = httpx.get(f"{scripted.url}/health")
    assert health.json() == {"status": "ok"}
    assert "x-request-id" in health.headers


def test_retrieve_a_model_and_the_version(client: openai.OpenAI, scripted: Gateway) -> None:
    model = httpx.get(f"{scripted.url}/v1/models/claude-sonnet-4-5").json()
    assert_schema(model, "Model")
    assert (model["id"], model["owned_by"]) == ("claude-sonnet-4-5", "anthropic")
    assert client.models.retrieve("sonnet").id == "sonnet"  # an alias is a model id callers may send
    assert client.models.retrieve("claude-haiku-4-5-20251001").id == "claude-haiku-4-5-20251001"
    for unserved in ("gpt-4o", "claude-3-5-haiku-20241022"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(unserved)
        assert missing.value.code == "model_not_found"
    version = httpx.get(f"{scripted.url}/version").json()
    assert version == {"version": "0.1.0", "service": "claude-code-gateway", "api_version": "v1"}


def test_an_assistants_refusal_sent_back_is_what_it_said(client: openai.OpenAI, scripted: Gateway) -> None:
    """Found by an outside probe: an OpenAI transcript sent back, with a `refusal` part or an
    assistant message of a `refusal` and no content, was a 400 or reached the model as nothing."""
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "one"},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "A1"}, {"type": "refusal", "refusal": "R1"}],
            },
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": None, "refusal": "R2"},  # type: ignore[misc,list-item]
            {"role": "user", "content": script(text="", echo=True)},
        ],
    )
    assert reply.choices[0].message.content == "user: one\nassistant: A1\nR1\nuser: two\nassistant: R2"
    misplaced = {"role": "user", "content": [{"type": "refusal", "refusal": "R"}]}
    response = httpx.post(
        f"{scripted.url}/v1/chat/completions", json={"model": MODEL, "messages": [misplaced]}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert "refusal" in response.json()["error"]["message"]
    for role in ("user", "system", "developer"):  # as on chat (found by a second probe)
        misplaced_item = {"type": "message", "role": role, "content": [{"type": "refusal", "refusal": "R"}]}
        refused = httpx.post(
            f"{scripted.url}/v1/responses", json={"model": MODEL, "input": [misplaced_item]}, timeout=30
        )
        assert refused.status_code == 400, (role, refused.text)
        assert "refusal" in refused.json()["error"]["message"]
    earlier = {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "R3"}]}
    answered = httpx.post(
        f"{scripted.url}/v1/responses",
        json={"model": MODEL, "input": [earlier, {"role": "user", "content": script(text="", echo=True)}]},
        timeout=30,
    )
    assert answered.status_code == 200, answered.text
    assert answered.json()["output"][0]["content"][0]["text"] == "assistant: R3"
