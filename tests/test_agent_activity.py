"""The agent's work in every stream, on the real SDK and CLI: the fake upstream thinks, then runs
two tools (one fails), then answers; its thinking and both tool steps reach the official `openai`
and `anthropic` clients in order, through each format, and a resumed stream replays them exactly."""

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import Gateway, chat, claude_env, sse_data
from tests.fake_anthropic import FakeAnthropic, Reply

pytestmark = pytest.mark.claude

MODEL = "claude-sonnet-4-5"
ACTIVITY = "Let me look.\n▸ Bash: echo hi\n✓ Bash\n\n▸ Read: /no/such/file.txt\n✗ Read failed\n"


@pytest.fixture(scope="module")
def agent(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    gateway: Gateway = start_gateway(workers=1, **claude_env(fake_anthropic, CLAUDE_TOOLS='["Bash", "Read"]'))
    return gateway


def _work() -> list[Reply]:
    """The upstream thinks, runs Bash, runs Read on a missing file, then answers."""
    return [
        Reply(thinking=["Let me ", "look."], tool_use=("Bash", {"command": "echo hi", "description": "x"})),
        Reply(tool_use=("Read", {"file_path": "/no/such/file.txt"})),
        Reply(tokens=["Done", "."]),
    ]


@pytest.fixture
def working(upstream: FakeAnthropic) -> FakeAnthropic:
    upstream.script.extend(_work())
    return upstream


def test_chat_streams_reasoning_content_and_keeps_it_out_of_content(
    agent: Gateway, working: FakeAnthropic
) -> None:
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0, timeout=90)
    reasoning, content = [], []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "work"}], stream=True
    ):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            content.append(delta.content or "")
    assert "".join(reasoning) == ACTIVITY
    assert "".join(content) == "Done."
    assert len(working.requests) == 3
    metrics = httpx.get(f"{agent.url}/metrics", timeout=10).text
    counted = {
        line.split("kind=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("gateway_agent_activity_events_total{")
    }
    assert counted["tool_step"] >= 4  # two tools, each started and ended
    assert counted["reasoning"] >= 1


def test_chat_reply_carries_reasoning_content_unless_turned_off(
    agent: Gateway, working: FakeAnthropic
) -> None:
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0, timeout=90)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "work"}])
    message = reply.choices[0].message
    assert (message.content, (message.model_extra or {}).get("reasoning_content")) == ("Done.", ACTIVITY)
    working.script.extend([Reply(thinking=["hmm"], tool_use=("Bash", {"command": "true"})), Reply()])
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "work"}], extra_body={"include_reasoning": False}
    )
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


def test_a_structured_stream_carries_the_reasoning_its_retrieval_shows(
    agent: Gateway, working: FakeAnthropic
) -> None:
    """Found by an outside probe: a stream with `response_format` sent the checked reply alone,
    while the same completion retrieved had its reasoning_content."""
    working.script[-1] = Reply(tokens=['{"done": ', "true}"])
    response_format = {"type": "json_object"}
    body = chat("work", stream=True, response_format=response_format)
    streamed = httpx.post(f"{agent.url}/v1/chat/completions", json=body, timeout=90)
    chunks = [json.loads(data) for data in sse_data(streamed) if data != "[DONE]"]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert "".join(delta.get("reasoning_content") or "" for delta in deltas) == ACTIVITY
    assert "".join(delta.get("content") or "" for delta in deltas) == '{"done": true}'
    retrieved = httpx.get(f"{agent.url}/v1/chat/completions/{chunks[0]['id']}", timeout=30).json()
    assert retrieved["choices"][0]["message"]["reasoning_content"] == ACTIVITY


def test_responses_stream_a_reasoning_item_before_the_message(agent: Gateway, working: FakeAnthropic) -> None:
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0, timeout=90)
    events = list(client.responses.create(model=MODEL, input="work", stream=True))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
    ]
    summary = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert summary == ACTIVITY
    assert kinds.index("response.reasoning_summary_text.done") < kinds.index("response.content_part.added")
    final = events[-1].response
    assert final.status == "completed"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == ACTIVITY
    assert final.output_text == "Done."
    assert client.responses.retrieve(final.id).output[0].summary[0].text == ACTIVITY


def test_a_responses_reply_has_the_output_its_retrieval_has(agent: Gateway, working: FakeAnthropic) -> None:
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0, timeout=90)
    created = client.responses.create(model=MODEL, input="work")
    assert [item.type for item in created.output] == ["reasoning", "message"]
    assert created.output == client.responses.retrieve(created.id).output


def test_messages_stream_thinking_blocks(agent: Gateway, working: FakeAnthropic) -> None:
    client = anthropic.Anthropic(base_url=agent.url, api_key="unused", max_retries=0, timeout=90)
    # Not asked for, there are none, as from the real API (found by an outside probe: a client's
    # `content[0].text` failed on the thinking block).
    plain = client.messages.create(
        model=MODEL, max_tokens=1000, messages=[{"role": "user", "content": "work"}]
    )
    assert [block.type for block in plain.content] == ["text"]
    working.script.extend(_work())
    with client.messages.stream(
        model=MODEL,
        max_tokens=1000,
        thinking={"type": "adaptive"},
        messages=[{"role": "user", "content": "work"}],
    ) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == ACTIVITY
    assert message.content[1].text == "Done."
    assert kinds.count("content_block_start") == 2
    # The next turn sends the reply back as it came, thinking block and all (Anthropic's own
    # clients' pattern); the agent's steps are not part of the conversation the model gets.
    working.script.append(Reply(tokens=["Welcome."]))
    again = client.messages.create(
        model=MODEL,
        max_tokens=1000,
        messages=[
            {"role": "user", "content": "work"},
            {"role": "assistant", "content": [block.model_dump() for block in message.content]},
            {"role": "user", "content": "thanks"},
        ],
    )
    assert again.content[-1].text == "Welcome."  # type: ignore[union-attr]
    assert "Done." in str(working.requests[-1]["messages"])
    assert "Let me look." not in str(working.requests[-1]["messages"])


def _sse(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(id, data) of each event, in order."""
    events, current = [], None
    for line in response.iter_lines():
        if line.startswith("id: "):
            current = line[4:]
        elif line.startswith("data: "):
            events.append((current, line[6:]))
            current = None
    return events


@pytest.mark.parametrize("front_end", ["chat", "responses"])
def test_a_resumed_stream_replays_the_activity_exactly(
    agent: Gateway, working: FakeAnthropic, front_end: str
) -> None:
    if front_end == "chat":
        queued = httpx.post(
            f"{agent.url}/v1/chat/completions", json=chat("work", background=True), timeout=30
        )
        url = f"{agent.url}/v1/chat/completions/{queued.json()['id']}"
    else:
        body = {"model": MODEL, "input": "work", "background": True}
        queued = httpx.post(f"{agent.url}/v1/responses", json=body, timeout=30)
        url = f"{agent.url}/v1/responses/{queued.json()['id']}"
    with httpx.stream("GET", url, params={"stream": "true"}, timeout=90) as response:
        whole = _sse(response)
    streamed = "".join(data for _, data in whole)
    assert "Bash: echo hi" in streamed
    assert "Read failed" in streamed
    ids = [event_id for event_id, _ in whole if event_id is not None]
    for after in ids[1:-1]:
        with httpx.stream(
            "GET", url, params={"stream": "true"}, headers={"Last-Event-ID": after}, timeout=30
        ) as again:
            resumed = _sse(again)
        tail = whole[[event_id for event_id, _ in whole].index(after) + 1 :]
        assert resumed == tail, after
