"""`n > 1`: n jobs fanned out to the worker pool in parallel and merged into n choices, with the
official `openai` client; bodies and chunks validated against the official schema."""

import concurrent.futures
import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, assert_schema, chat
from tests.test_durable_jobs import script, wait_for


@pytest.fixture
def client(scripted: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_n_choices_merged_into_one_completion(scripted: Gateway) -> None:
    response = httpx.post(
        f"{scripted.url}/v1/chat/completions", json=chat(script(text="a b c"), n=3), timeout=30
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert_schema(body, "CreateChatCompletionResponse")
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert all(choice["message"]["content"] == "a b c" for choice in body["choices"])
    assert all(choice["finish_reason"] == "stop" for choice in body["choices"])
    assert body["usage"]["completion_tokens"] == 9  # 3 tokens per choice


def test_choices_run_in_parallel(scripted: Gateway, client: openai.OpenAI) -> None:
    """While the request waits, both of its jobs hold a worker's lease at the same time."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.chat.completions.create,
            model="claude-sonnet-4-5",
            messages=[{"role": "user", "content": script(text="x", wait_ms=2000)}],
            n=2,
        )
        running = wait_for(lambda: scripted.redis().zcard("gateway:running") >= 2, 10, "both jobs run")
        completion = pending.result(timeout=30)
    assert running
    assert [choice.message.content for choice in completion.choices] == ["x", "x"]


def test_a_request_with_choices_is_retrieved_with_every_choice(
    scripted: Gateway, client: openai.OpenAI
) -> None:
    """Found by an outside probe: retrieving an `n > 1` completion by its id answered 200 with its
    first choice only."""
    redis = scripted.redis()

    def jobs() -> set[bytes]:
        return {key for key in redis.scan_iter("gateway:job:*") if key.count(b":") == 2}

    before = jobs()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.chat.completions.create,
            model="claude-sonnet-4-5",
            messages=[{"role": "user", "content": script(text="a b", wait_ms=1500)}],
            n=2,
        )
        key = wait_for(lambda: next(iter(jobs() - before), None), 10, "queued")
        running = f"chatcmpl-{key.decode().split(':')[2]}"
        # While it runs (here any one of its choices' ids): its status, no choices yet.
        during = httpx.get(f"{scripted.url}/v1/chat/completions/{running}", timeout=30).json()
        created = pending.result(timeout=30)
    assert during["status"] in ("queued", "in_progress")
    assert during["choices"] == []
    retrieved = httpx.get(f"{scripted.url}/v1/chat/completions/{created.id}", timeout=30).json()
    assert retrieved["status"] == "completed"
    assert [choice["index"] for choice in retrieved["choices"]] == [0, 1]
    assert [choice["message"]["content"] for choice in retrieved["choices"]] == ["a b", "a b"]
    assert retrieved["usage"]["completion_tokens"] == created.usage.completion_tokens == 4
    redis.close()


def test_streamed_choices_carry_their_indexes(scripted: Gateway, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": script(text="one two three", delay_ms=5)}],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "one two three", 1: "one two three"}
    assert finishes == {0: "stop", 1: "stop"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    raw = {**chat(script(text="a b"), n=2, stream=True)}
    with httpx.stream("POST", f"{scripted.url}/v1/chat/completions", json=raw, timeout=30) as response:
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    for chunk_data in data[:-1]:
        assert_schema(json.loads(chunk_data), "CreateChatCompletionStreamResponse")


def test_a_failing_choice_fails_the_request(scripted: Gateway) -> None:
    failing = chat(script(text="a b", fail_after=0), n=2)
    response = httpx.post(f"{scripted.url}/v1/chat/completions", json=failing, timeout=30)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


@pytest.mark.parametrize(
    "extra",
    [{"n": 9}, {"n": 2, "background": True}, {"n": 2, "session_id": "s1"}],
)
def test_what_n_cannot_do(scripted: Gateway, extra: dict[str, Any]) -> None:
    response = httpx.post(f"{scripted.url}/v1/chat/completions", json=chat("hi", **extra), timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"
