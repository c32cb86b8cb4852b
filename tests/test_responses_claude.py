"""The Responses API on the real path: API → worker → real claude-agent-sdk and its bundled CLI →
the fake Anthropic API on loopback, driven by the official `openai` client."""

import json

import httpx
import openai
import pytest

from tests.conftest import Gateway
from tests.fake_anthropic import FakeAnthropic, Reply, system_text, tool_results, user_text
from tests.test_responses import MODEL, WEATHER_TOOL, checked_stream, stream_text, streamed_output

pytestmark = pytest.mark.claude


@pytest.fixture
def client(claude: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{claude.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_streamed_response_with_instructions_and_usage(claude: Gateway, upstream: FakeAnthropic) -> None:
    upstream.default = Reply(tokens=["Ahoy", ",", " matey"], input_tokens=120, output_tokens=3)
    body = {"model": MODEL, "instructions": "Answer like a pirate.", "input": "hello", "stream": True}
    with httpx.stream("POST", f"{claude.url}/v1/responses", json=body, timeout=60) as response:
        events = checked_stream(response)
    assert stream_text(events) == "Ahoy, matey"
    final = events[-1]
    assert final["type"] == "response.completed"
    assert final["response"]["output"][0]["content"][0]["text"] == "Ahoy, matey"
    usage = final["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (120, 3)
    sent = upstream.requests[-1]
    assert "Answer like a pirate." in system_text(sent)
    assert user_text(sent) == "hello"


def test_previous_response_id_reaches_the_model(client: openai.OpenAI, upstream: FakeAnthropic) -> None:
    upstream.default = Reply(tokens=["The", " answer", " is", " 42."])
    first = client.responses.create(model=MODEL, input="What is the answer?")
    assert first.output_text == "The answer is 42."
    upstream.default = Reply(tokens=["Yes."])
    second = client.responses.create(model=MODEL, input="Are you sure?", previous_response_id=first.id)
    assert second.output_text == "Yes."
    assert second.previous_response_id == first.id
    # The earlier turns reached the model with the new one.
    sent = str(upstream.requests[-1]["messages"])
    assert "What is the answer?" in sent
    assert "The answer is 42." in sent
    assert "Are you sure?" in sent


def test_function_tool_call_and_output(client: openai.OpenAI, upstream: FakeAnthropic) -> None:
    upstream.default = Reply(tool_use=("mcp__caller__get_weather", {"city": "Oslo"}))
    first = client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER_TOOL])  # type: ignore[list-item]
    [call] = first.output  # no empty message before it, as from OpenAI
    assert call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert not any(tool_results(r) for r in upstream.requests)
    upstream.default = Reply(tokens=["Cold."])
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "-5 C"}],
    )
    assert second.output_text == "Cold."
    assert "-5 C" in str(upstream.requests[-1]["messages"])


def test_a_response_failing_after_the_agents_work_keeps_just_that_work(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    # Found by an outside probe: its output had an empty message item after the reasoning, which
    # its stream never sent, and the reasoning item said completed.
    upstream.script.append(Reply(tool_use=("Bash", {"command": "echo working", "description": "work"})))
    upstream.default = Reply(status=500)  # every request after the tool's
    body = {"model": MODEL, "input": "do some work", "stream": True}
    with httpx.stream("POST", f"{claude.url}/v1/responses", json=body, timeout=60) as response:
        events = checked_stream(response)
    failed = events[-1]
    assert failed["type"] == "response.failed"
    [reasoning] = failed["response"]["output"]
    assert (reasoning["type"], reasoning["status"]) == ("reasoning", "incomplete")
    assert "echo working" in reasoning["summary"][0]["text"]
    assert events[-2] == {**events[-2], "type": "response.output_item.done", "item": reasoning}
    retrieved = httpx.get(f"{claude.url}/v1/responses/{failed['response']['id']}", timeout=30).json()
    assert retrieved["output"] == [reasoning]


def test_a_structured_reply_after_the_agents_work_streams_the_items_its_response_has(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    """Found by an outside probe: with `text.format`, the stream sent the reasoning item and the
    message as `msg_<id>_1`; the completed and retrieved response held one `msg_<id>` alone."""
    upstream.default = Reply(thinking=["think"], tokens=['{"a":', " 1}"])
    body = {
        "model": MODEL,
        "input": "json please",
        "stream": True,
        "text": {"format": {"type": "json_object"}},
    }
    with httpx.stream("POST", f"{claude.url}/v1/responses", json=body, timeout=60) as response:
        events = checked_stream(response)
    completed = events[-1]["response"]
    assert [item["type"] for item in completed["output"]] == ["reasoning", "message"]
    assert json.loads(completed["output"][1]["content"][0]["text"]) == {"a": 1}
    assert streamed_output(events) == completed["output"]
    retrieved = httpx.get(f"{claude.url}/v1/responses/{completed['id']}", timeout=30).json()
    assert retrieved["output"] == completed["output"]
