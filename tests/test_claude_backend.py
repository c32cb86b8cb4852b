"""The `claude` backend end to end: API → worker → real claude-agent-sdk and its bundled CLI →
the fake Anthropic API on loopback, asserting on what the upstream received and the client saw."""

import asyncio
import itertools
import json
import logging
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from claude_agent_sdk import AssistantMessage, ToolUseBlock

from shared.jobs import CompletionJob, Done, FinishReason, FunctionTool, Turn
from shared.keys import events_key
from tests.conftest import Gateway, assert_schema, chat, claude_env, sse_data
from tests.fake_anthropic import FakeAnthropic, Reply, system_text, user_text
from tests.test_durable_jobs import job_id_of, retrieve, start_background, wait_for, worker_running
from worker import caller_functions
from worker.backends import stored_chars
from worker.backends.claude import _relay, _usage

pytestmark = pytest.mark.claude

# claude-sonnet-4-5 list prices (USD per token) that the CLI applies to the usage it was given.
_INPUT_PRICE, _OUTPUT_PRICE = 3e-6, 15e-6


@pytest.fixture
def client(claude: Gateway) -> openai.OpenAI:
    # "Within seconds, not minutes": the client gives up after 60 s.
    return openai.OpenAI(base_url=f"{claude.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_streamed_reply_arrives_as_it_is_generated(client: openai.OpenAI, upstream: FakeAnthropic) -> None:
    tokens = ["The", " quick", " brown", " fox", " jumps", "."]
    upstream.default = Reply(tokens=tokens, delay_s=0.05)
    stream = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "tell me"}], stream=True
    )
    arrivals: list[tuple[float, str]] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    # Tokens that reach the worker while its previous write is in flight share the next chunk (a
    # loaded machine does that), so a chunk holds whole tokens, in order, and nothing else.
    boundaries = set(itertools.accumulate(len(token) for token in tokens))
    assert "".join(text for _, text in arrivals) == "".join(tokens)
    assert set(itertools.accumulate(len(text) for _, text in arrivals)) <= boundaries
    # Paced 50 ms apart upstream, they were relayed as they came, not in one batch at the end.
    assert arrivals[-1][0] - arrivals[0][0] > 0.1
    assert user_text(upstream.requests[-1]) == "tell me"


def test_a_system_prompt_no_command_line_carries_reaches_the_model(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    """Found by an outside probe: a system message over 128 KiB, or one holding a NUL, went on
    the CLI's command line, which Linux refused: the CLI never started, and the caller got a
    503 backend_unavailable (Messages: an overloaded_error its SDK retries)."""
    upstream.default = Reply(tokens=["read"])
    long = "All of this is context. " * 6000  # 144 KB
    for system in (long, "before\0after", "é" * 70_000):
        body = {
            "model": "claude-sonnet-4-5",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        }
        response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert system in system_text(upstream.requests[-1])
    messages = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "system": long,
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = httpx.post(f"{claude.url}/v1/messages", json=messages, timeout=60)
    assert response.status_code == 200, response.text
    assert long in system_text(upstream.requests[-1])


def test_system_prompt_usage_and_cost(claude: Gateway, upstream: FakeAnthropic) -> None:
    upstream.default = Reply(tokens=["Ahoy", "!"], input_tokens=1200, output_tokens=34)
    body = {
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "Answer like a pirate."},
            {"role": "developer", "content": "Keep it short."},
            {"role": "user", "content": "hello"},
        ],
    }
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert_schema(completion, "CreateChatCompletionResponse")
    assert completion["choices"][0]["message"]["content"] == "Ahoy!"
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["model"] == "claude-sonnet-4-5"
    usage = completion["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (1200, 34)
    assert usage["cost_usd"] == pytest.approx(1200 * _INPUT_PRICE + 34 * _OUTPUT_PRICE)
    sent = upstream.requests[-1]
    assert "Answer like a pirate." in system_text(sent)
    assert "Keep it short." in system_text(sent)
    assert sent["model"] == "claude-sonnet-4-5"


def test_streamed_usage_chunk(claude: Gateway, upstream: FakeAnthropic) -> None:
    upstream.default = Reply(tokens=["a", "b"], input_tokens=10, output_tokens=2)
    body = chat("x", stream=True, stream_options={"include_usage": True})
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
    data = sse_data(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["usage"]["prompt_tokens"] == 10
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_max_tokens_reaches_upstream_and_ends_with_length(
    client: openai.OpenAI, upstream: FakeAnthropic
) -> None:
    upstream.default = Reply(tokens=["cut", " off"], stop_reason="max_tokens")
    completion = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "long story"}], max_tokens=64
    )
    assert completion.choices[0].finish_reason == "length"
    assert upstream.requests[-1]["max_tokens"] == 64


def test_a_full_context_window_ends_the_run_truncated(
    client: openai.OpenAI, claude: Gateway, upstream: FakeAnthropic
) -> None:
    """Found by an outside probe: the CLI asked the model to go on three times, resending the whole
    context each time, and the job failed with 502; the answer so far is what the caller gets. A
    Messages client is told the stop as Anthropic says it (a re-check probe saw `max_tokens`)."""
    upstream.default = Reply(tokens=["filled", " up"], stop_reason="model_context_window_exceeded")
    prompt = "a story to fill the window"
    completion = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": prompt}]
    )
    assert (completion.choices[0].finish_reason, completion.choices[0].message.content) == (
        "length",
        "filled up",
    )
    asked = [body for body in upstream.requests if prompt in json.dumps(body["messages"])]
    assert len(asked) == 1  # not asked to go on
    anthropic_client = anthropic.Anthropic(base_url=claude.url, api_key="unused", max_retries=0, timeout=60)
    asked_for = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": prompt}],
    }
    message = anthropic_client.messages.create(**asked_for)  # type: ignore[call-overload]
    assert message.stop_reason == "model_context_window_exceeded"
    with anthropic_client.messages.stream(**asked_for) as stream:  # type: ignore[arg-type]
        assert stream.get_final_message().stop_reason == "model_context_window_exceeded"


def _ended_at_a_refusal(path: str, body: dict[str, Any]) -> bool:
    if path == "/v1/responses":
        return bool(body["incomplete_details"] == {"reason": "content_filter"})
    if path == "/v1/messages":
        return bool(body["stop_reason"] == "refusal")
    return bool(body["choices"][0]["finish_reason"] == "content_filter")


@pytest.mark.parametrize(
    ("path", "stream"),
    [
        ("/v1/chat/completions", True),
        ("/v1/chat/completions", False),
        ("/v1/responses", False),
        ("/v1/messages", False),
    ],
)
def test_a_refusal_ends_the_answer_as_a_content_filter(
    claude: Gateway, upstream: FakeAnthropic, path: str, stream: bool
) -> None:
    """Found by an outside probe: Claude Code asks the model again after a refusal, and the refused
    text and the new answer came joined, ended as `stop`. The answer ends at the refusal."""
    prompt = f"refused on {path}, stream {stream}"
    upstream.by_prompt[prompt] = deque([Reply(tokens=["I cannot"], stop_reason="refusal")])
    asked: dict[str, Any] = (
        {"input": prompt} if path == "/v1/responses" else {"messages": [{"role": "user", "content": prompt}]}
    )
    asked |= {"model": "claude-sonnet-4-5", "stream": stream} | (
        {"max_tokens": 2000} if path == "/v1/messages" else {}
    )
    response = httpx.post(f"{claude.url}{path}", json=asked, timeout=60)
    assert response.status_code == 200, response.text
    if stream:
        data = sse_data(response)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(chunk) for chunk in data[:-1]]
        assert _ended_at_a_refusal(path, chunks[-1])
        assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == "I cannot"
    else:
        assert _ended_at_a_refusal(path, response.json()), response.text
        assert "I cannot" in response.text
        assert "Hello" not in response.text  # nothing of a second answer
    assert sum(prompt in user_text(request) for request in upstream.requests) == 1  # not asked again


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("/v1/chat/completions", {"max_completion_tokens": 256}),
        ("/v1/responses", {"max_output_tokens": 1024}),
        ("/v1/messages", {"max_tokens": 50}),
    ],
)
def test_a_small_token_limit_turns_thinking_off(
    claude: Gateway, upstream: FakeAnthropic, path: str, limit: dict[str, int]
) -> None:
    """Found by an outside probe: under a limit of 1,024 tokens (the API's smallest thinking
    budget) the CLI asked for a 1,024-token budget all the same, which the real API refuses (the
    fake upstream refuses it as the real one does)."""
    conversation = (
        {"input": "hi"} if path == "/v1/responses" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    body = {"model": "claude-sonnet-4-5", **conversation, **limit}
    response = httpx.post(f"{claude.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    [asked] = limit.values()
    assert upstream.requests[-1]["max_tokens"] == asked
    assert upstream.requests[-1].get("thinking", {}).get("type") != "enabled"


# A limit past the model's (which the CLI cuts to it) keeps within CLAUDE_MAX_THINKING_TOKENS
# (32,000): half of 128,000 took 63,999 of the 64,000 the CLI kept (an outside probe).
@pytest.mark.parametrize(("limit", "budget"), [(1500, None), (4000, 2000), (128_000, 32_000)])
def test_a_token_limit_leaves_the_answer_half_of_it(
    claude: Gateway, upstream: FakeAnthropic, limit: int, budget: int | None
) -> None:
    """Found by an outside probe: with a limit and no thinking budget asked, the CLI's default
    budget took all of the limit but one token (1,499 of 1,500), leaving the answer none. Thinking
    now takes half at most, and none when half is under the API's smallest budget."""
    body = chat("hi", max_completion_tokens=limit)
    assert httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    thinking = upstream.requests[-1].get("thinking", {})
    assert thinking.get("budget_tokens") == budget if budget else thinking.get("type") != "enabled"


@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [(401, "authentication_error", "upstream_authentication_error"), (500, "api_error", "upstream_error")],
)
def test_upstream_error_becomes_an_openai_error(
    client: openai.OpenAI, claude: Gateway, upstream: FakeAnthropic, status: int, error_type: str, code: str
) -> None:
    upstream.default = Reply(status=status, error_type=error_type)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.status_code == 502
    assert raised.value.code == code
    assert "test-key-not-real" not in raised.value.response.text
    # Streaming: an error status, never a 200 whose content is the error text.
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=chat("hi", stream=True), timeout=60)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == code


def test_a_request_the_model_api_finds_invalid_is_a_400_with_its_reason(
    client: openai.OpenAI, claude: Gateway, upstream: FakeAnthropic
) -> None:
    """Found by an outside probe: a 400 from the model API (a prompt over the model's context,
    say) reached callers as a 502 with no reason, an InternalServerError in the SDKs."""
    upstream.default = Reply(status=400, error_type="invalid_request_error")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.code == "upstream_invalid_request"
    assert raised.value.message.endswith("(HTTP 400): fake upstream error"), raised.value.message
    assert raised.value.response.headers["x-should-retry"] == "false"
    anthropic_client = anthropic.Anthropic(base_url=claude.url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    assert "fake upstream error" in refused.value.message


def test_a_stream_cut_and_retried_upstream_reaches_the_client_once(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    """The fake drops the connection after 4 of 10 tokens; the CLI retries and the new message
    starts over, its thinking first. The client gets every token, and the thinking, exactly once."""
    tokens = [f"t{i} " for i in range(10)]
    thinking = ["Counting ", "to ten."]
    upstream.script.extend(
        [
            Reply(tokens=tokens, cut_after=4, delay_s=0.01, thinking=thinking),
            Reply(tokens=tokens, thinking=thinking),
        ]
    )
    body = chat("count", stream=True)
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    deltas = [
        choice["delta"]
        for data in sse_data(response)
        if data != "[DONE]"
        for choice in json.loads(data)["choices"]
    ]
    assert "".join(delta.get("content") or "" for delta in deltas) == "".join(tokens)
    assert "".join(delta.get("reasoning_content") or "" for delta in deltas) == "".join(thinking)
    assert len(upstream.requests) == 2  # it really was cut and retried
    # The worker's proxy passed the cut on; its log says so in a line, not uvicorn's traceback.
    worker_log = "".join(path.read_text() for path in claude.logs.glob("worker-*.log"))
    assert "gateway.worker.proxy [" in worker_log
    assert "the model API cut an answer mid-stream (RemoteProtocolError)" in worker_log
    assert "Exception in ASGI application" not in worker_log


def test_a_model_that_goes_on_from_a_cut_is_relayed_as_one_answer(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    """Cut after a whole thinking block, the CLI asks the model to go on from where the message
    stopped (no `api_retry`); a model that does so continues the answer the client already has."""
    tokens = [f"t{i} " for i in range(10)]
    upstream.script.extend(
        [
            Reply(tokens=tokens, cut_after=4, delay_s=0.05, thinking=["Counting."]),
            Reply(tokens=tokens[4:], thinking=["Going on."]),
        ]
    )
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=chat("count", stream=True), timeout=60)
    assert response.status_code == 200, response.text
    payloads = [json.loads(data) for data in sse_data(response) if data != "[DONE]"]
    assert not [payload for payload in payloads if "error" in payload]
    text = "".join(c["delta"].get("content") or "" for p in payloads for c in p["choices"])
    assert text == "".join(tokens)
    assert "cut off" in json.dumps(upstream.requests[-1]["messages"])  # the CLI asked it to go on


def test_a_cancel_stops_the_cli_at_once_not_after_its_graceful_exit(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    """The SDK's cleanup waits up to 5 s for a CLI still streaming to exit by itself after its
    input closes; a cancelled job's CLI is killed before that (it took 5.05 s every time)."""
    upstream.by_prompt["cancel me"] = deque([Reply(tokens=[f"w{i} " for i in range(200)], delay_s=0.1)])
    created = httpx.post(
        f"{claude.url}/v1/chat/completions", json=chat("cancel me", background=True), timeout=30
    )
    completion_id = created.json()["id"]
    url = f"{claude.url}/v1/chat/completions/{completion_id}"
    deadline = time.monotonic() + 30
    while not any("cancel me" in json.dumps(body.get("messages", [])[:1]) for body in upstream.requests):
        assert time.monotonic() < deadline, "the CLI never asked the upstream"
        time.sleep(0.1)
    time.sleep(0.5)  # streaming: 20 s of reply to go
    asked = time.monotonic()
    cancelled = httpx.post(f"{url}/cancel", timeout=30)
    assert cancelled.status_code == 200, cancelled.text
    record = claude.redis().hget(f"gateway:job:{completion_id.removeprefix('chatcmpl-')}", "ended")
    assert record == b"cancelled"
    assert time.monotonic() - asked < 4  # 0.03-0.19 s measured; the SDK's grace alone is 5 s


@pytest.mark.parametrize(
    ("stop", "answer"),
    [
        (None, "I'll check the files.\n\nThe directory is fine."),
        # The break is not the model's text: a re-check probe's ["\n"] matched it and dropped the rest.
        (["\n"], "I'll check the files.\n\nThe directory is fine."),
        (["files.\n"], "I'll check the files.\n\nThe directory is fine."),
        ([" is fine"], "I'll check the files.\n\nThe directory"),
        (["files"], "I'll check the "),
        # A stop at once in the message after: no break with nothing after it (a re-check probe).
        (["The dir"], "I'll check the files."),
    ],
)
def test_the_models_messages_around_a_tool_run_are_apart(
    claude: Gateway, upstream: FakeAnthropic, stop: list[str] | None, answer: str
) -> None:
    """Found by an outside probe: the text of the message before a tool run and of the one after it
    ran together ("I'll check the files.The directory is fine.")."""
    for stream in (False, True):
        upstream.script.clear()  # a stop in the first message leaves the second one unasked
        upstream.script.extend(
            [
                Reply(preamble=["I'll check", " the files."], tool_use=("Bash", {"command": "echo hi"})),
                Reply(tokens=["The directory", " is fine."]),
            ]
        )
        body = chat("check the files", stream=stream) | ({"stop": stop} if stop else {})
        response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        if stream:
            chunks = [
                json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
            ]
            text = "".join(
                chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]
            )
        else:
            text = response.json()["choices"][0]["message"]["content"]
        assert text == answer, (stream, text)


def test_a_message_that_looks_like_a_slash_command_is_text_for_the_model(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    """Claude Code ran it as its own command: `/model <name>` sent a request upstream for a
    model not in MODELS, and `/cost` or `/help` answered nothing."""
    for prompt in ("/model claude-opus-4-bypass", "/cost"):
        upstream.by_prompt[prompt] = deque([Reply(tokens=["As text."])])
        response = httpx.post(f"{claude.url}/v1/chat/completions", json=chat(prompt), timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "As text."
    assert {body["model"] for body in upstream.requests} == {"claude-sonnet-4-5"}


@pytest.mark.parametrize("warm_clients", ["0", "1"])
def test_a_job_still_running_when_the_drain_ends_gets_worker_shutdown(
    start_gateway: Any, upstream: FakeAnthropic, warm_clients: str
) -> None:
    # Found by an outside probe: the drain's end cancelled the job's task with its CLI still
    # streaming; the SDK waited for that CLI, the stop overran its bound and the job was lost.
    gateway: Gateway = start_gateway(
        workers=1, DRAIN_TIMEOUT_S="1", **claude_env(upstream, CLAUDE_WARM_CLIENTS=warm_clients)
    )
    upstream.default = Reply(tokens=["word "] * 300, delay_s=0.1)  # 30 s of output
    completion_id = start_background(gateway, "talk for a while")
    worker = worker_running(gateway, job_id_of(completion_id))
    wait_for(lambda: gateway.redis().xlen(events_key(job_id_of(completion_id))) > 3, 30, "output")
    stopped = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0  # not the bound's exit (status 1) of a stop held up
    # Its drain (1 s) and a moment: not the SDK's wait of up to 5 s for a CLI still streaming.
    assert time.monotonic() - stopped < 1 + 3
    failed = retrieve(gateway, completion_id)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "worker_shutdown"  # it had output: not handed back


def test_what_a_failing_cli_says_is_in_the_workers_log(
    start_gateway: Any, upstream: FakeAnthropic, tmp_path: Path
) -> None:
    """Found by an outside probe: a CLI that failed at start was logged as 'Command failed with exit
    code 1 ... Check stderr output for details', and its stderr went nowhere."""
    cli = tmp_path / "claude"
    cli.write_text("#!/bin/sh\necho 'Error: EACCES: permission denied, open /the/reason' >&2\nexit 1\n")
    cli.chmod(0o755)
    env = claude_env(upstream, SANDBOX="off", CLAUDE_CLI_PATH=str(cli), LOG_LEVEL="info")
    gateway: Gateway = start_gateway(workers=1, **env)
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "backend_unavailable"
    logs = "".join(log.read_text() for log in gateway.logs.glob("worker-*.log"))
    assert "Claude Code said: Error: EACCES: permission denied, open /the/reason" in logs


def test_a_cost_of_n_choices_is_none_unless_each_has_one(claude: Gateway, upstream: FakeAnthropic) -> None:
    """Found by an outside probe: with one choice refused (no cost: the run was stopped before its
    result), the other's cost was given as the request's."""
    upstream.script.extend([Reply(tokens=["No."], stop_reason="refusal"), Reply(tokens=["Yes."])])
    body = chat("two answers", n=2)
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    reasons = sorted(choice["finish_reason"] for choice in response.json()["choices"])
    assert reasons == ["content_filter", "stop"]
    assert response.json()["usage"]["cost_usd"] is None
    both = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60).json()
    assert both["usage"]["cost_usd"] == pytest.approx(2 * (42 * _INPUT_PRICE + 7 * _OUTPUT_PRICE))


def test_blank_turns_reach_the_model_as_no_content(claude: Gateway, upstream: FakeAnthropic) -> None:
    """Found by an outside probe: a whitespace-only prompt was answered with nothing (the CLI skips
    it without asking the model), and an earlier empty turn reached the model API as an empty
    message, which it refuses (the fake refuses what the real API does)."""

    def turns(*texts: str) -> list[dict[str, str]]:
        return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts)]

    for messages in (turns("   "), turns("", "a", "q"), turns(" \n", "a", "q"), turns("q", " ", "q")):
        asked = len(upstream.requests)
        body = {"model": "claude-sonnet-4-5", "messages": messages}
        response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, (messages, response.text)
        assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
        assert len(upstream.requests) > asked


def test_usage_the_cli_reports_is_never_below_zero_and_its_cost_is_rounded() -> None:
    """Found by outside probes: a job's tool forged the CLI's result (it reaches the CLI's pipes)
    with -999,999,999 tokens and -$5,000, which the service-wide counters took."""
    reported = {"input_tokens": -999_999_999, "output_tokens": -5, "cache_read_input_tokens": -1}
    forged = _usage(reported, -5000.0)
    assert (forged.prompt_tokens, forged.completion_tokens, forged.cached_prompt_tokens) == (0, 0, 0)
    assert forged.cost_usd == 0.0
    assert _usage({"input_tokens": 3}, 0.00045000000000000004).cost_usd == 0.00045
    # Nor past what a job can have: one that overflowed the service-wide counters left every later
    # job uncounted.
    huge = _usage({"input_tokens": 2**63 - 10, "output_tokens": 2**62}, 1e308)
    assert (huge.prompt_tokens, huge.completion_tokens) == (10**9, 10**9)
    assert huge.cost_usd == 10.0**6


def test_the_sdks_quotes_of_forgeable_output_are_cut_and_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """Found by a re-check probe: the SDK logged each forged transcript frame's path whole (50 MB
    of the worker's log from one turn), with the line breaks and escapes of forged log lines."""
    import worker.backends.claude  # noqa: F401 (installs the filter, as the worker does)

    forged = "/x/" + "L" * 500_000 + "\n2026-12-04 INFO gateway.api POST /v1/admin -> 200\r\x1b[2K"
    sdk = logging.getLogger("claude_agent_sdk._internal.transcript_mirror_batcher")
    with caplog.at_level(logging.WARNING, logger=sdk.name):
        sdk.warning("[SessionStore] dropping mirror frame: filePath %s is not under %s", forged, "/p")
    [said] = [record.getMessage() for record in caplog.records]
    assert len(said) < 1_000
    assert not {"\n", "\r", "\x1b"} & set(said)


async def test_forged_calls_past_the_output_bound_end_the_run_as_they_come() -> None:
    """Found by a re-check probe: a job's tool forged the CLI's messages with calls to the caller's
    function and no message end; the worker held every one (632 MB) until the message ended. Calls
    past the job's output bound end the run at once, and the bound fails the job."""
    job = CompletionJob(
        request_id="r", model="m", turns=[Turn(role="user", text="x")], functions=[FunctionTool(name="f")]
    )
    [tool] = caller_functions.tool_names(job)
    read = 0

    async def forged() -> AsyncIterator[AssistantMessage]:
        nonlocal read
        for index in range(10_000):
            read += 1
            yield AssistantMessage([ToolUseBlock(f"toolu_{index}", tool, {"a": "x" * 1000})], model="m")

    stopped = asyncio.Event()

    async def stop() -> None:
        stopped.set()

    room = 100_000
    events = [event async for event in _relay(job, forged(), None, stop, room)]
    [done] = events[-1:]
    assert isinstance(done, Done)
    assert done.finish_reason is FinishReason.TOOL_CALLS
    assert stopped.is_set()
    assert read <= room // 1000 + 1
    assert stored_chars(done) > room  # what the job's bound then refuses (worker/task.py)
