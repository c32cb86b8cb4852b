"""The Responses API end to end: the official `openai` client and raw HTTP against the API, real
Redis and real worker processes on the scripted backend; every body and stream event is validated
against the official schemas (tests/schemas/openai_responses.json)."""

import functools
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import Gateway
from tests.test_durable_jobs import FAST_LEASES, script, wait_for, worker_running

_SCHEMAS = json.loads((Path(__file__).parent / "schemas" / "openai_responses.json").read_text())
MODEL = "claude-sonnet-4-5"
DEFAULT_TEXT = "Hello from the scripted backend."
ECHO = script(text="", echo=True)


# Each stream event's own schema, by its `type` (precise errors, where the union has only "no match").
_EVENT_SCHEMAS = {
    _SCHEMAS["$defs"][name]["properties"]["type"]["enum"][0]: name
    for ref in _SCHEMAS["$defs"]["ResponseStreamEvent"]["anyOf"]
    if "properties" in _SCHEMAS["$defs"][name := ref["$ref"].rsplit("/", 1)[1]]
}


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**_SCHEMAS, "$ref": f"#/$defs/{name}"})


def assert_response_schema(instance: Any, name: str) -> None:
    """Validates a body or stream event against the official OpenAI schema `name`."""
    _validator(name).validate(instance)


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(event, id, data) of each SSE event of a stream, as they arrive."""
    kind = event_id = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("id: "):
            event_id = line[len("id: ") :]
        elif line.startswith("data: "):
            yield kind, event_id, json.loads(line[len("data: ") :])
            kind = event_id = ""


def checked_stream(response: httpx.Response) -> list[dict[str, Any]]:
    """The stream's events, each validated, its SSE name and id agreeing with its body."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for kind, event_id, data in sse_events(response):
        assert_response_schema(data, _EVENT_SCHEMAS[data["type"]])  # a member of ResponseStreamEvent
        assert data["type"] == kind
        assert event_id == str(data["sequence_number"])
        events.append(data)
    return events


def stream_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


@pytest.fixture
def client(scripted: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=0, timeout=30)


def create(gateway: Gateway, **body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/responses", json={"model": MODEL, **body}, timeout=30)


def test_non_streaming_response_matches_the_official_schema(scripted: Gateway) -> None:
    sent = int(time.time())
    response = create(scripted, input="hi there", instructions="be brief", metadata={"k": "v"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert sent <= body["completed_at"] <= time.time()
    assert_response_schema(body, "Response")
    assert body["id"].startswith("resp_")
    assert (body["object"], body["status"], body["model"]) == ("response", "completed", MODEL)
    assert (body["instructions"], body["metadata"], body["background"]) == ("be brief", {"k": "v"}, False)
    [item] = body["output"]
    assert (item["type"], item["role"], item["status"]) == ("message", "assistant", "completed")
    assert item["content"][0]["text"] == DEFAULT_TEXT
    assert body["usage"]["input_tokens"] == 2
    assert body["usage"]["output_tokens"] == 5
    assert body["usage"]["total_tokens"] == 7


def test_sdk_create_with_input_items(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "ignored by echo"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "reply"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ECHO}]},
        ],
    )
    assert response.status == "completed"
    assert response.output_text == "user: first\nassistant: reply"
    assert response.usage is not None
    assert response.usage.output_tokens == 4
    assert response.reasoning is None
    # The effort the agent ran with is echoed, as sent either way (an outside probe's SDK showed none).
    for sent in ({"reasoning": {"effort": "low"}}, {"extra_body": {"reasoning_effort": "low"}}):
        reasoned = client.responses.create(model=MODEL, input="hi", **sent)  # type: ignore[call-overload]
        assert reasoned.reasoning is not None
        assert reasoned.reasoning.effort == "low"
        assert client.responses.retrieve(reasoned.id).reasoning == reasoned.reasoning


def test_sdk_streaming_events_in_order(client: openai.OpenAI) -> None:
    with client.responses.create(
        model=MODEL, input=script(text="one two three", delay_ms=30), stream=True
    ) as stream:
        events = list(stream)
    types = [event.type for event in events]
    # Token by token, unless the worker merged two tokens that came during one slow Redis write.
    deltas = types.count("response.output_text.delta")
    assert deltas >= 2
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.completed_at is not None
    assert all(event.response.completed_at is None for event in events[:-1] if hasattr(event, "response"))
    assert done.response.output_text == "one two three"
    assert done.response.usage is not None
    assert done.response.usage.output_tokens == 3
    assert len({event.response.id for event in events if hasattr(event, "response")}) == 1


def test_raw_stream_events_validate(scripted: Gateway) -> None:
    body = {"model": MODEL, "input": script(text="a b", delay_ms=5), "stream": True}
    with httpx.stream("POST", f"{scripted.url}/v1/responses", json=body, timeout=30) as response:
        events = checked_stream(response)
    assert stream_text(events) == "a b"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "a b"


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input=script(text="one"), instructions="not carried")
    second = client.responses.create(model=MODEL, input=script(text="two"), previous_response_id=first.id)
    third = client.responses.create(model=MODEL, input=ECHO, previous_response_id=second.id)
    assert third.previous_response_id == second.id
    assert third.instructions is None
    assert third.output_text == "\n".join(
        [
            f"user: {script(text='one')}",
            "assistant: one",
            f"user: {script(text='two')}",
            "assistant: two",
        ]
    )
    # Branching from the first response leaves the second out.
    branch = client.responses.create(model=MODEL, input=ECHO, previous_response_id=first.id)
    assert branch.output_text == f"user: {script(text='one')}\nassistant: one"


def test_previous_response_must_exist_and_be_completed(scripted: Gateway) -> None:
    unknown = create(scripted, input="x", previous_response_id="resp_" + "0" * 32)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "previous_response_id"
    running = create(scripted, input=script(text="slow", wait_ms=5000), background=True).json()
    busy = create(scripted, input="x", previous_response_id=running["id"])
    assert busy.status_code == 400
    assert busy.json()["error"]["code"] == "previous_response_not_completed"
    httpx.post(f"{scripted.url}/v1/responses/{running['id']}/cancel", timeout=30)
    # In a session too (found by an outside probe: a failed turn of the session was continued).
    session = {"session_id": "continued-after-a-failure"}
    assert create(scripted, input="one", **session).status_code == 200
    failed = create(scripted, input=script(text="x", fail_after=0), background=True, **session).json()
    url = f"{scripted.url}/v1/responses/{failed['id']}"
    wait_for(lambda: httpx.get(url, timeout=30).json()["status"] == "failed", 20, "the turn fails")
    after = create(scripted, input="three", previous_response_id=failed["id"], **session)
    assert after.status_code == 400, after.text
    assert after.json()["error"]["code"] == "previous_response_not_completed"


def test_background_retrieve_and_resume_by_starting_after(client: openai.OpenAI, scripted: Gateway) -> None:
    queued = client.responses.create(
        model=MODEL, input=script(text="w1 w2 w3 w4", delay_ms=20), background=True
    )
    assert queued.status == "queued"
    assert queued.background is True
    done = wait_for(
        lambda: (r := client.responses.retrieve(queued.id)).status == "completed" and r, 20, "completion"
    )
    assert done.output_text == "w1 w2 w3 w4"
    assert done.completed_at is not None
    assert done.created_at <= done.completed_at <= time.time()
    assert_response_schema(
        httpx.get(f"{scripted.url}/v1/responses/{queued.id}", timeout=30).json(), "Response"
    )
    url = f"{scripted.url}/v1/responses/{queued.id}"
    with httpx.stream("GET", url, params={"stream": "true"}, timeout=30) as response:
        everything = checked_stream(response)
    assert stream_text(everything) == "w1 w2 w3 w4"
    # Created queued, as the POST answered; then in progress.
    assert [event["response"]["status"] for event in everything[:2]] == ["queued", "in_progress"]
    numbers = [event["sequence_number"] for event in everything]
    assert numbers == list(range(len(everything)))
    for after in (0, 3, 5, numbers[-3], numbers[-1]):
        with httpx.stream(
            "GET", url, params={"stream": "true", "starting_after": after}, timeout=30
        ) as response:
            rest = checked_stream(response)
        assert rest == everything[after + 1 :]
    # The SDK's own resume call.
    resumed = list(client.responses.retrieve(queued.id, stream=True, starting_after=numbers[-2]))
    assert [event.type for event in resumed] == ["response.completed"]
    assert resumed[0].response.completed_at == done.completed_at  # when it completed, not when it was read


def test_cancel_a_background_response(client: openai.OpenAI, scripted: Gateway) -> None:
    queued = client.responses.create(model=MODEL, input=script(text="never", wait_ms=20_000), background=True)
    cancelled = client.responses.cancel(queued.id)
    assert (cancelled.status, cancelled.completed_at) == ("cancelled", None)
    assert client.responses.retrieve(queued.id).status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # harmless to repeat
    body = httpx.get(f"{scripted.url}/v1/responses/{queued.id}", timeout=30).json()
    assert_response_schema(body, "Response")
    with httpx.stream("GET", f"{scripted.url}/v1/responses/{queued.id}?stream=true", timeout=30) as response:
        events = checked_stream(response)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "cancelled"


def test_max_output_tokens_ends_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input=script(text="a b c d e f"), max_output_tokens=16)
    assert response.status == "completed"
    cut = client.responses.create(model=MODEL, input=script(text="w " * 40), max_output_tokens=16)
    assert (cut.status, cut.completed_at) == ("incomplete", None)  # "only present when completed"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage is not None
    assert cut.usage.output_tokens == 16
    # Under the spec's minimum of 16, a 400, as OpenAI answers (found by an outside probe: accepted).
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=10)
    assert refused.value.param == "max_output_tokens"


def test_a_failed_job_is_an_error_or_a_failed_event(scripted: Gateway) -> None:
    failing = script(text="a b c", fail_after=0, fail_code="upstream_error")
    response = create(scripted, input=failing)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    mid_stream = {"model": MODEL, "input": script(text="a b c", fail_after=2), "stream": True}
    with httpx.stream("POST", f"{scripted.url}/v1/responses", json=mid_stream, timeout=30) as streamed:
        events = checked_stream(streamed)
    assert stream_text(events) == "a b "
    failed = events[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_error"
    assert "upstream_error" in failed["response"]["error"]["message"]
    # What the stream sent stays the response's output (it was dropped: an outside probe), and
    # the item it opened is closed, incomplete, before the end; a retrieval says the same.
    [message] = failed["response"]["output"]
    assert (message["status"], message["content"][0]["text"]) == ("incomplete", "a b ")
    assert [event["type"] for event in events[-4:-1]] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert events[-2]["item"] == message
    retrieved = httpx.get(f"{scripted.url}/v1/responses/{failed['response']['id']}", timeout=30).json()
    assert retrieved["output"] == [message]


def test_a_cancelled_response_keeps_what_it_produced(client: openai.OpenAI) -> None:
    slow = script(text="w " * 400, delay_ms=20)
    running = client.responses.create(model=MODEL, input=slow, background=True)
    deadline = time.monotonic() + 20
    while not client.responses.retrieve(running.id).output_text and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = client.responses.cancel(running.id)
    assert cancelled.status == "cancelled"
    produced = client.responses.retrieve(running.id)
    assert produced.output_text.startswith("w w")
    assert [item.status for item in produced.output] == ["incomplete"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "code_interpreter"}]}, "tools"),
        (
            {"input": "x", "tools": [{"type": "namespace", "name": "n", "tools": [{"type": "custom"}]}]},
            "tools",
        ),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
        # the caller's own fields, not the chat shape they are carried in (found by a probe)
        (
            {"input": "x", "tools": [{"type": "web_search"}, {"type": "function", "name": "x" * 129}]},
            "tools[1].name",
        ),
        (
            {
                "input": "x",
                "tools": [{"type": "namespace", "name": "n", "tools": [{"type": "function", "name": "a b"}]}],
            },
            "tools[0].tools[0].name",
        ),
        (
            {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
            "tools[0].parameters",
        ),
        ({"input": "x", "max_tool_calls": 1}, "max_tool_calls"),  # found dropped by a probe
        ({"input": "x", "max_tool_calls": -1}, "max_tool_calls"),
        ({"input": "x", "reasoning": {"effort": "bogus"}}, "reasoning.effort"),  # not agent.reasoning_effort
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"role": "narrator", "content": "x"}]}, "input[0]"),
        ({"input": "x", "background": True, "store": False}, "store"),
        ({"input": []}, "input"),
        # OpenAI's bounds on metadata (found by an outside probe: 20 pairs were taken)
        ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"input": "x", "metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65 + ".[key]"),
        ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"input": "x", "service_tier": "bogus"}, "service_tier"),
        # the caller's field, not the chat message the core checks (found by a probe)
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "https://x.test/a.png"}],
                    }
                ]
            },
            "input",
        ),
    ],
)
def test_requests_the_gateway_cannot_run_get_clear_errors(
    scripted: Gateway, body: dict[str, Any], param: str
) -> None:
    response = create(scripted, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_ids_are_404(scripted: Gateway) -> None:
    for response_id in ("resp_" + "0" * 32, "resp_nope", "chatcmpl-" + "0" * 32, "x" * 300):
        for method, path in (("GET", ""), ("POST", "/cancel")):
            response = httpx.request(method, f"{scripted.url}/v1/responses/{response_id}{path}", timeout=30)
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "not_found"
    # A chat completion's job is not a response.
    completion = httpx.post(
        f"{scripted.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    ).json()
    job_id = completion["id"].removeprefix("chatcmpl-")
    assert httpx.get(f"{scripted.url}/v1/responses/resp_{job_id}", timeout=30).status_code == 404


def test_responses_are_scoped_to_the_key(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", API_KEYS="first-caller-key,other-caller-key"
    )
    a = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="first-caller-key", max_retries=0, timeout=30)
    b = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="other-caller-key", max_retries=0, timeout=30)
    mine = a.responses.create(model=MODEL, input="hello")
    assert a.responses.retrieve(mine.id).status == "completed"
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.cancel(mine.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.create(model=MODEL, input="x", previous_response_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(mine.id)
    assert a.responses.retrieve(mine.id).status == "completed"


def test_delete_removes_a_response_and_everything_kept_of_it(
    client: openai.OpenAI, scripted: Gateway
) -> None:
    done = client.responses.create(model=MODEL, input="remember this")
    job_id = done.id.removeprefix("resp_")
    redis = scripted.redis()
    kept = [f"gateway:job:{job_id}", f"gateway:job:{job_id}:events", f"gateway:response:{job_id}"]
    assert redis.exists(*kept) == 3
    deleted = httpx.delete(f"{scripted.url}/v1/responses/{done.id}", timeout=30)
    assert deleted.json() == {"id": done.id, "object": "response", "deleted": True}
    assert redis.exists(*kept) == 0
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(done.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="and then?", previous_response_id=done.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(done.id)  # once only
    # One still running is cancelled first, then deleted: nothing of it stays, nothing runs on.
    running = client.responses.create(
        model=MODEL, input=script(text="never", wait_ms=20_000), background=True
    )
    client.responses.delete(running.id)
    job_id = running.id.removeprefix("resp_")
    assert redis.exists(f"gateway:job:{job_id}", f"gateway:response:{job_id}") == 0
    assert redis.zscore("gateway:running", job_id) is None
    redis.close()


def test_a_background_response_survives_a_worker_restart_and_resumes(start_gateway: Any) -> None:
    """Its worker is killed (-9) while the job runs; a new worker retries it, and the client picks
    the stream up where it left off with `starting_after`."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", **FAST_LEASES)
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)
    queued = client.responses.create(
        model=MODEL, input=script(text="survived the restart", wait_ms=1500), background=True
    )
    url = f"{gateway.url}/v1/responses/{queued.id}"
    with httpx.stream("GET", url, params={"stream": "true"}, timeout=30) as response:
        seen = []
        for kind, _, data in sse_events(response):
            seen.append(data["sequence_number"])
            if kind == "response.in_progress":  # items open with the job's first output
                break
    assert seen == [0, 1]
    victim = worker_running(gateway, queued.id.removeprefix("resp_"))
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    successor = gateway.start_worker()
    with httpx.stream("GET", url, params={"stream": "true", "starting_after": 1}, timeout=30) as response:
        rest = checked_stream(response)
    assert rest[0]["sequence_number"] == 2
    assert stream_text(rest) == "survived the restart"
    assert rest[-1]["type"] == "response.completed"
    assert client.responses.retrieve(queued.id).output_text == "survived the restart"
    assert worker_running(gateway, queued.id.removeprefix("resp_")) is successor


PERSON_FORMAT = {
    "type": "json_schema",
    "name": "person",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}


def test_structured_output_with_text_format(scripted: Gateway) -> None:
    good = create(
        scripted,
        input=script(text='```json\n{"name": "Ada", "age": 36}\n```'),
        text={"format": PERSON_FORMAT},
    )
    assert good.status_code == 200, good.text
    body = good.json()
    assert_response_schema(body, "Response")
    assert body["text"]["format"]["name"] == "person"
    assert json.loads(body["output"][0]["content"][0]["text"]) == {"name": "Ada", "age": 36}
    retrieved = httpx.get(f"{scripted.url}/v1/responses/{body['id']}", timeout=30).json()
    assert retrieved["output"] == body["output"]
    bad = create(scripted, input=script(text='{"name": "Ada"}'), text={"format": PERSON_FORMAT})
    assert bad.status_code == 502
    assert bad.json()["error"]["code"] == "invalid_structured_output"
    streamed = {"model": MODEL, "input": script(text='{"a": 1}'), "stream": True}
    streamed["text"] = {"format": {"type": "json_object"}}
    with httpx.stream("POST", f"{scripted.url}/v1/responses", json=streamed, timeout=30) as response:
        events = checked_stream(response)
    assert json.loads(stream_text(events)) == {"a": 1}
    assert events[-1]["type"] == "response.completed"
    invalid = create(scripted, input="x", text={"format": {"type": "json_schema", "schema": {}}})
    assert invalid.status_code == 400
    assert invalid.json()["error"]["param"] == "text.format.name"


def streamed_output(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items a stream closed, in output order."""
    done = [event for event in events if event["type"] == "response.output_item.done"]
    assert [event["output_index"] for event in done] == list(range(len(done)))
    return [event["item"] for event in done]


def test_a_structured_reply_of_calls_streams_the_items_its_response_has(scripted: Gateway) -> None:
    """Found by an outside probe: with `text.format`, the stream opened an empty message at
    output index 0 and the call at 1, while the completed (and stored) response held the call alone."""
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    body = {"model": MODEL, "input": script(text="", calls=[{"name": "f", "arguments": {}}]), "stream": True}
    body |= {"tools": [tool], "text": {"format": {"type": "json_object"}}}
    with httpx.stream("POST", f"{scripted.url}/v1/responses", json=body, timeout=30) as response:
        events = checked_stream(response)
    completed = events[-1]["response"]
    assert [item["type"] for item in completed["output"]] == ["function_call"]
    assert streamed_output(events) == completed["output"]
    retrieved = httpx.get(f"{scripted.url}/v1/responses/{completed['id']}", timeout=30).json()
    assert retrieved["output"] == completed["output"]


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def test_a_response_says_parallel_tool_calls_as_its_request_did(
    client: openai.OpenAI, scripted: Gateway
) -> None:
    """Found by an outside probe: a response said `parallel_tool_calls: true` whatever its request
    sent (the flag was honoured, not echoed)."""
    tools = [WEATHER_TOOL]
    single = client.responses.create(model=MODEL, input="x", tools=tools, parallel_tool_calls=False)  # type: ignore[arg-type]
    assert single.parallel_tool_calls is False
    retrieved = httpx.get(f"{scripted.url}/v1/responses/{single.id}", timeout=30).json()
    assert retrieved["parallel_tool_calls"] is False
    assert client.responses.create(model=MODEL, input="x", tools=tools).parallel_tool_calls is True  # type: ignore[arg-type]


def test_function_tools_and_their_outputs(client: openai.OpenAI, scripted: Gateway) -> None:
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    first = client.responses.create(model=MODEL, input=script(text="", calls=calls), tools=[WEATHER_TOOL])  # type: ignore[list-item]
    assert_response_schema(
        httpx.get(f"{scripted.url}/v1/responses/{first.id}", timeout=30).json(), "Response"
    )
    [call] = first.output  # no empty message before it, as from OpenAI
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    # The client runs it and continues the chain with its output.
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"},
            {"role": "user", "content": ECHO},
        ],
    )
    assert f'<function_call id="{call.call_id}" name="get_weather">' in second.output_text
    assert f'<function_result id="{call.call_id}">18 C</function_result>' in second.output_text
    streamed = {
        "model": MODEL,
        "input": script(text="", calls=calls * 2),
        "tools": [WEATHER_TOOL],
        "stream": True,
    }
    with httpx.stream("POST", f"{scripted.url}/v1/responses", json=streamed, timeout=30) as response:
        events = checked_stream(response)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["output_index"], json.loads(e["arguments"])) for e in done] == [
        (0, {"city": "Paris"}),
        (1, {"city": "Paris"}),
    ]
    assert events[-1]["type"] == "response.completed"


def test_what_a_stateless_coding_agent_sends_is_accepted(client: openai.OpenAI, scripted: Gateway) -> None:
    """Codex CLI's request shape: functions in a `namespace`, a hosted web search, `store: false`,
    `include`, `reasoning.summary`, `prompt_cache_key`, `client_metadata`; and, on its next turn,
    the whole transcript back with reasoning items and the namespaced call."""
    group = {"type": "namespace", "name": "crm", "description": "The CRM.", "tools": [WEATHER_TOOL]}
    agent = {
        "model": MODEL,
        "tools": [group, {"type": "web_search", "external_web_access": False}],
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"summary": "auto"},
        "prompt_cache_key": "thread-1",
        "client_metadata": {"x-codex-window-id": "w1"},
        "stream": True,
    }
    calls = [{"name": "crm__get_weather", "arguments": {"city": "Paris"}}]
    body = {**agent, "input": [{"role": "user", "content": script(text="", calls=calls)}]}
    with httpx.stream("POST", f"{scripted.url}/v1/responses", json=body, timeout=30) as response:
        events = checked_stream(response)
    assert events[-1]["type"] == "response.completed"
    # Echoed as sent: a function's fields only on functions (an outside probe's web search had them).
    echoed = events[-1]["response"]["tools"]
    assert echoed[1] == {"type": "web_search", "external_web_access": False}
    assert "strict" not in echoed[0]
    [call] = [item for item in events[-1]["response"]["output"] if item["type"] == "function_call"]
    assert (call["namespace"], call["name"]) == ("crm", "get_weather")
    transcript = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        call,
        {
            "type": "function_call_output",
            "call_id": call["call_id"],
            "output": [{"type": "input_text", "text": "18 C"}],
        },
        {"role": "user", "content": ECHO},
    ]
    with httpx.stream(
        "POST", f"{scripted.url}/v1/responses", json={**agent, "input": transcript}, timeout=30
    ) as response:
        events = checked_stream(response)
    text = events[-1]["response"]["output"][-1]["content"][0]["text"]
    assert f'<function_call id="{call["call_id"]}" name="crm__get_weather">' in text
    assert f'<function_result id="{call["call_id"]}">18 C</function_result>' in text
