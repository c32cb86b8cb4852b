"""Structured output (`response_format` `json_object` / `json_schema`) with the official `openai`
client: a reply that keeps the format arrives as clean JSON, one that breaks it fails clearly."""

import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import Gateway, assert_schema, chat
from tests.fake_anthropic import FakeAnthropic, Reply, system_text
from tests.test_durable_jobs import script, sse_events

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def schema_format(schema: dict[str, Any] = PERSON) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture
def client(scripted: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=0, timeout=30)


def post(gateway: Gateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30)


def test_sdk_parse_with_a_pydantic_schema(client: openai.OpenAI) -> None:
    reply = '```json\n{"name": "Ada", "age": 36}\n```'  # the fence is removed
    completion = client.chat.completions.parse(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": script(text=reply)}],
        response_format=Person,
    )
    assert completion.choices[0].message.parsed == Person(name="Ada", age=36)
    assert json.loads(completion.choices[0].message.content or "") == {"name": "Ada", "age": 36}


def test_json_object(scripted: Gateway) -> None:
    ok = post(scripted, chat(script(text='{"a": [1, 2]}'), response_format={"type": "json_object"}))
    assert ok.status_code == 200, ok.text
    assert_schema(ok.json(), "CreateChatCompletionResponse")
    assert json.loads(ok.json()["choices"][0]["message"]["content"]) == {"a": [1, 2]}
    for reply in ("Sure! here it is", "[1, 2]"):
        bad = post(scripted, chat(script(text=reply), response_format={"type": "json_object"}))
        assert bad.status_code == 502
        assert bad.json()["error"]["code"] == "invalid_structured_output"
        assert bad.headers["x-should-retry"] == "false"  # the SDKs would run the agent twice more


def test_a_reply_that_breaks_the_schema_fails(scripted: Gateway) -> None:
    reply = script(text='{"name": "Ada", "age": "old"}')
    response = post(scripted, chat(reply, response_format=schema_format()))
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "invalid_structured_output"
    assert "age" in error["message"]


def test_streamed_structured_reply_is_checked_then_sent_whole(scripted: Gateway) -> None:
    good = chat(script(text='{"name": "Ada", "age": 36}'), response_format=schema_format(), stream=True)
    with httpx.stream("POST", f"{scripted.url}/v1/chat/completions", json=good, timeout=30) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert json.loads(text) == {"name": "Ada", "age": 36}
    bad = chat(script(text="not json"), response_format=schema_format(), stream=True)
    assert post(scripted, bad).status_code == 502


@pytest.fixture(scope="module")
def committing(start_gateway: Any) -> Gateway:
    """Streams open after half a second without an event."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", STREAM_COMMIT_AFTER_S="0.5")
    return gateway


def test_a_slow_structured_stream_opens_before_its_job_ends(committing: Gateway) -> None:
    """Found by an outside probe: a structured stream sent nothing, headers included, until its
    job ended; an SDK's timeout and retries ran the agent three times for one call."""
    client = committing.redis()

    def running() -> list[bytes]:
        records = [key for key in client.scan_iter("gateway:job:*") if b":" not in key[12:]]
        return [key for key in records if not client.hexists(key, "ended")]

    slow = '{"name": "Ada", "age": 36}'
    bodies = {
        "/v1/chat/completions": chat(
            script(text=slow, wait_ms=3000), response_format=schema_format(), stream=True
        ),
        "/v1/responses": {
            "model": "claude-sonnet-4-5",
            "input": script(text=slow, wait_ms=3000),
            "stream": True,
            "text": {"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
        },
    }
    for path, body in bodies.items():
        with httpx.stream("POST", f"{committing.url}{path}", json=body, timeout=30) as response:
            assert response.status_code == 200
            assert running(), path  # headers before the job's end
            data = [item for _, item in sse_events(response.iter_lines())]
        assert not running()
        if path == "/v1/responses":
            first, last = json.loads(data[0]), json.loads(data[-1])
            assert first["type"] == "response.created"  # its id, at once
            assert json.loads(last["response"]["output"][0]["content"][0]["text"]) == json.loads(slow)
        else:
            chunks = [json.loads(item) for item in data[:-1]]
            text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
            assert json.loads(text) == json.loads(slow)
    # A reply that breaks the format, past the headers: an error in the stream.
    broken = chat(script(text="not json", wait_ms=1500), response_format=schema_format(), stream=True)
    with httpx.stream("POST", f"{committing.url}/v1/chat/completions", json=broken, timeout=30) as response:
        assert response.status_code == 200
        data = [item for _, item in sse_events(response.iter_lines())]
    errors = [json.loads(item)["error"] for item in data if item != "[DONE]" and "error" in json.loads(item)]
    assert [error["code"] for error in errors] == ["invalid_structured_output"], data


def test_a_structured_reply_resumed_or_retrieved_is_the_one_checked(scripted: Gateway) -> None:
    # Found by an outside probe: a resume replayed the raw events under ids the live stream never
    # sent (JSON cut and repeated), and a retrieval showed the unchecked text.
    raw = '```json\n{"name": "Ada", "age": 36}\n```'
    body = chat(script(text=raw), response_format=schema_format(), stream=True)
    with httpx.stream("POST", f"{scripted.url}/v1/chat/completions", json=body, timeout=30) as response:
        live = list(sse_events(response.iter_lines()))
    url = f"{scripted.url}/v1/chat/completions/{json.loads(live[0][1])['id']}"
    for resumed_at, (event_id, _) in enumerate(live[:-1]):
        assert event_id is not None
        resumed = httpx.get(url, params={"stream": "true"}, headers={"Last-Event-ID": event_id}, timeout=30)
        assert list(sse_events(resumed.iter_lines())) == live[resumed_at + 1 :]
    retrieved = httpx.get(url, timeout=30).json()
    assert retrieved["choices"][0]["message"]["content"] == '{"name": "Ada", "age": 36}'
    responses = f"{scripted.url}/v1/responses"
    text_format = {"format": {"type": "json_schema", "name": "person", "schema": PERSON}}
    body = {"model": "claude-sonnet-4-5", "input": script(text=raw), "text": text_format, "stream": True}
    with httpx.stream("POST", responses, json=body, timeout=30) as response:
        live = list(sse_events(response.iter_lines()))
    url = f"{responses}/{json.loads(live[0][1])['response']['id']}"
    for resumed_at, (event_id, _) in enumerate(live):
        assert event_id is not None
        resumed = httpx.get(url, params={"stream": "true", "starting_after": event_id}, timeout=30)
        assert list(sse_events(resumed.iter_lines())) == live[resumed_at + 1 :]


def test_a_turn_of_function_calls_is_not_checked_against_the_format(scripted: Gateway) -> None:
    # Found by an outside probe: a structured request whose model called a function failed 502 (its
    # calls are not the answer the format is for), after the whole agent run.
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    for stream in (False, True):
        body = chat(
            script(text="", calls=calls), response_format=schema_format(), tools=[tool], stream=stream
        )
        response = post(scripted, body)
        assert response.status_code == 200, response.text
        assert "get_weather" in response.text
    responses = f"{scripted.url}/v1/responses"
    text_format = {"format": {"type": "json_schema", "name": "person", "schema": PERSON}}
    flat_tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    body = {"model": "claude-sonnet-4-5", "input": script(text="", calls=calls), "text": text_format}
    response = httpx.post(responses, json={**body, "tools": [flat_tool]}, timeout=30)
    assert response.status_code == 200, response.text
    assert [item["type"] for item in response.json()["output"]] == ["function_call"]
    retrieved = httpx.get(f"{responses}/{response.json()['id']}", timeout=30).json()
    assert retrieved["status"] == "completed"
    assert retrieved["output"] == response.json()["output"]


def test_not_in_a_session(scripted: Gateway) -> None:
    # Found by an outside probe: the turn was the session's (its files too) before its reply was
    # checked here, so a reply that broke the format got a 502 and stayed in the session.
    body = chat(script(text="{}"), response_format=schema_format(), session_id="structured-1")
    response = post(scripted, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema.name"),
        (schema_format({"type": "objekt"}), "response_format.json_schema.schema"),
        (schema_format({"$ref": "https://example.com/s.json"}), "response_format.json_schema.schema"),
    ],
)
def test_formats_the_gateway_cannot_check(scripted: Gateway, response_format: Any, param: str) -> None:
    response = post(scripted, chat("hi", response_format=response_format))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_not_with_background_or_n(scripted: Gateway) -> None:
    background = post(scripted, chat("hi", response_format={"type": "json_object"}, background=True))
    assert background.status_code == 400
    several = post(scripted, chat("hi", response_format={"type": "json_object"}, n=2))
    assert several.status_code == 400


@pytest.mark.claude
def test_real_path_asks_for_the_schema(claude: Gateway, upstream: FakeAnthropic) -> None:
    upstream.default = Reply(tokens=['{"name": ', '"Ada", ', '"age": 36}'])
    client = openai.OpenAI(base_url=f"{claude.url}/v1", api_key="unused", max_retries=0, timeout=60)
    completion = client.chat.completions.parse(
        model="claude-sonnet-4-5",
        messages=[{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Who?"}],
        response_format=Person,
    )
    assert completion.choices[0].message.parsed == Person(name="Ada", age=36)
    system = system_text(upstream.requests[-1])
    assert "Be exact." in system
    assert '"required": ["name", "age"]' in system


def test_a_refusal_is_a_content_filter_not_a_broken_format(claude: Gateway, upstream: FakeAnthropic) -> None:
    """Found by an outside probe: a refusal under a JSON format was a 502 'not valid JSON', the
    refusal's text lost. It is the answer as a refusal: content_filter, which the SDK raises as such."""
    client = openai.OpenAI(base_url=f"{claude.url}/v1", api_key="unused", max_retries=0, timeout=60)
    upstream.script.append(Reply(tokens=["I cannot", " do that"], stop_reason="refusal"))
    with pytest.raises(openai.ContentFilterFinishReasonError):
        client.chat.completions.parse(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Who?"}], response_format=Person
        )
    upstream.script.append(Reply(tokens=["I cannot", " do that"], stop_reason="refusal"))
    body = {"model": "claude-sonnet-4-5", "input": "Who?", "text": {"format": {"type": "json_object"}}}
    response = httpx.post(f"{claude.url}/v1/responses", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "incomplete"
    assert response.json()["incomplete_details"] == {"reason": "content_filter"}


def chained(levels: int) -> dict[str, Any]:
    """~40 bytes a level: each level is either of two references to the next, so checking a reply
    the naive way doubles in time and memory per level."""
    defs = {
        f"l{i}": {"anyOf": [{"$ref": f"#/$defs/l{i + 1}"}, {"$ref": f"#/$defs/l{i + 1}"}]}
        for i in range(levels)
    }
    defs[f"l{levels}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/l0"}


@pytest.fixture(scope="module")
def checker(start_gateway: Any) -> Gateway:
    """A gateway of its own: before the bounds, these requests froze the API's event loop."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted")
    return gateway


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (chained(30), "once its $refs are expanded"),
        (
            {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"},
            "recursive",
        ),
        ({"type": "array", "items": {"$ref": "#"}}, "recursive"),
        ({"type": "string", "pattern": "^(?=a)a$"}, "not a valid JSON Schema"),
        ({"$ref": "#anchor"}, "own parts"),
        ({"$ref": "#/$defs/missing"}, "names nothing"),
        (
            json.loads("[" * 40 + "{}" + "]" * 40)[0] and {"default": json.loads("[" * 40 + "]" * 40)},
            "too deeply",
        ),
        ({"description": "x" * 70_000}, "too large"),
    ],
)
def test_a_schema_too_costly_to_check_is_refused_before_any_job(
    checker: Gateway, schema: dict[str, Any], says: str
) -> None:
    response = httpx.post(
        f"{checker.url}/v1/chat/completions",
        json=chat("hi", response_format=schema_format(schema)),
        timeout=20,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format.json_schema.schema"
    assert says in response.json()["error"]["message"]
    responses = httpx.post(
        f"{checker.url}/v1/responses",
        json={
            "model": "claude-sonnet-4-5",
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}},
        },
        timeout=20,
    )
    assert responses.status_code == 400, responses.text
    assert responses.json()["error"]["param"] == "text.format.schema"


def test_a_backtracking_pattern_costs_nothing(checker: Gateway) -> None:
    """`^(a+)+$` against 40 a's and a b takes ~2^40 steps on a backtracking engine."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}
    reply = json.dumps({"s": "a" * 40 + "b"})
    response = post(checker, chat(script(text=reply), response_format=schema_format(schema)))
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "invalid_structured_output"
    assert httpx.get(f"{checker.url}/health", timeout=5).status_code == 200
    good = post(checker, chat(script(text=json.dumps({"s": "aaa"})), response_format=schema_format(schema)))
    assert good.status_code == 200, good.text


def test_a_chain_within_the_bounds_still_works(checker: Gateway) -> None:
    response = post(checker, chat(script(text="7"), response_format=schema_format(chained(8))))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "7"
    wrong = post(checker, chat(script(text='"seven"'), response_format=schema_format(chained(8))))
    assert wrong.status_code == 502
