"""Every client mistake gets its OpenAI-format error and status, and nothing reaches the queue."""

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, assert_schema, chat


@pytest.fixture
def nothing_enqueued(scripted: Gateway) -> Iterator[None]:
    redis = scripted.redis()
    before = set(redis.scan_iter("arq:job:*"))
    yield
    assert set(redis.scan_iter("arq:job:*")) == before
    assert redis.zcard("gateway:queue") == 0
    redis.close()


def post(gateway: Gateway, content: bytes | None = None, **kwargs: Any) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(
        f"{gateway.url}/v1/chat/completions", content=content, headers=headers, timeout=30, **kwargs
    )


def assert_error(
    response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert_schema(body, "ErrorResponse")
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    assert response.headers["x-request-id"]


@pytest.mark.usefixtures("nothing_enqueued")
class TestRejectedBeforeTheQueue:
    def test_malformed_json(self, scripted: Gateway) -> None:
        assert_error(
            post(scripted, b'{"model": "claude-sonnet-4-5", "messages": ['), 400, code="invalid_json"
        )

    def test_body_not_an_object(self, scripted: Gateway) -> None:
        for body in (b"[1, 2]", b"", b"null"):  # none at all: was "Missing required parameter: 'None'"
            response = post(scripted, body)
            assert_error(response, 400, code="invalid_json")
            assert response.json()["error"]["message"] == "The request body must be a JSON object."
        headers = {"content-type": "application/json"}
        for path in ("/v1/responses", "/v1/messages"):
            response = httpx.post(f"{scripted.url}{path}", content=b"", headers=headers, timeout=30)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["message"] == "The request body must be a JSON object."
        # An object sent as a form (curl -d) is left unparsed: the message says why (a probe's
        # was told its object was none).
        form = {"content-type": "application/x-www-form-urlencoded"}
        for path in ("/v1/chat/completions", "/v1/messages"):
            response = httpx.post(f"{scripted.url}{path}", content=b"{}", headers=form, timeout=30)
            assert response.status_code == 400, response.text
            assert "Content-Type: application/json" in response.json()["error"]["message"]

    def test_missing_messages(self, scripted: Gateway) -> None:
        response = post(scripted, json={"model": "claude-sonnet-4-5"})
        assert_error(response, 400, param="messages")
        assert "Missing required parameter" in response.json()["error"]["message"]

    def test_wrong_types(self, scripted: Gateway) -> None:
        assert_error(post(scripted, json=chat("hi", stream="yes please")), 400, param="stream")
        assert_error(post(scripted, json=chat("hi", temperature=7)), 400, param="temperature")
        bad_role = {"model": "claude-sonnet-4-5", "messages": [{"role": "wizard", "content": "x"}]}
        assert_error(post(scripted, json=bad_role), 400, param="messages[0].role")

    def test_empty_message_list(self, scripted: Gateway) -> None:
        assert_error(
            post(scripted, json={"model": "claude-sonnet-4-5", "messages": []}), 400, param="messages"
        )

    def test_last_message_must_be_from_the_user(self, scripted: Gateway) -> None:
        body = {"model": "claude-sonnet-4-5", "messages": [{"role": "assistant", "content": "hi"}]}
        assert_error(post(scripted, json=body), 400, code="invalid_messages")

    def test_unknown_model(self, scripted: Gateway) -> None:
        assert_error(post(scripted, json={**chat("hi"), "model": "gpt-9"}), 404, code="model_not_found")

    def test_parameter_that_would_change_the_meaning(self, scripted: Gateway) -> None:
        assert_error(post(scripted, json=chat("hi", logprobs=True)), 400, param="logprobs")
        assert_error(post(scripted, json=chat("hi", stop=["a", "b", "c", "d", "e"])), 400, param="stop")
        assert_error(post(scripted, json=chat("hi", stop=[""])), 400, param="stop")

    def test_values_openai_bounds_are_checked_even_where_unused(self, scripted: Gateway) -> None:
        """Found by an outside probe: these were taken with 200 on chat (Responses refused them)."""
        assert_error(post(scripted, json=chat("hi", metadata={"a": 1})), 400, param="metadata.a")
        many = {f"k{i}": "v" for i in range(17)}
        assert_error(post(scripted, json=chat("hi", metadata=many)), 400, param="metadata")
        assert_error(post(scripted, json=chat("hi", metadata={"k": "v" * 513})), 400, param="metadata.k")
        assert_error(post(scripted, json=chat("hi", service_tier="bogus")), 400, param="service_tier")
        assert_error(post(scripted, json=chat("hi", verbosity="bogus")), 400, param="verbosity")
        fine = chat("hi", metadata={"k": "v"}, service_tier="auto", verbosity="low")
        assert post(scripted, json=fine).status_code == 200

    def test_body_over_the_limit(self, scripted: Gateway) -> None:
        big = chat("x" * 70_000)
        assert_error(post(scripted, json=big), 413, code="request_too_large")

    def test_chunked_body_over_the_limit(self, scripted: Gateway) -> None:
        def chunks() -> Iterator[bytes]:
            yield b'{"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"y" * 1024
            yield b'"}]}'

        assert_error(post(scripted, chunks()), 413, code="request_too_large")

    def test_unknown_route_and_method(self, scripted: Gateway) -> None:
        assert_error(httpx.post(f"{scripted.url}/v1/nothing-here", json={}), 404)
        assert_error(httpx.get(f"{scripted.url}/v1/chat/completions"), 405)


def test_digits_that_are_not_ascii_are_a_400_not_a_500(scripted: Gateway) -> None:
    """`"²".isdigit()` is true and `int("²")` fails (b"\\xb2" is "²" in latin-1, as headers are
    read): every integer header is read as ASCII digits."""
    url = f"{scripted.url}/v1/chat/completions"
    turns = httpx.post(url, json=chat("hi"), headers={"x-claude-max-turns": b"\xb2"}, timeout=30)
    assert_error(turns, 400, param="x-claude-max-turns")
    created = post(scripted, json=chat("hi", background=True))
    job = f"{scripted.url}/v1/chat/completions/{created.json()['id']}?stream=true"
    assert_error(httpx.get(job, headers={"last-event-id": b"\xb2"}, timeout=30), 400, param="Last-Event-ID")
    response = httpx.post(f"{scripted.url}/v1/responses", json={"model": "claude-sonnet-4-5", "input": "hi"})
    stream = f"{scripted.url}/v1/responses/{response.json()['id']}?stream=true"
    assert_error(
        httpx.get(stream, headers={"last-event-id": b"\xb2"}, timeout=30), 400, param="Last-Event-ID"
    )


@pytest.mark.usefixtures("nothing_enqueued")
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_number_json_does_not_have_is_invalid_json_on_every_api(scripted: Gateway, constant: str) -> None:
    """Python's `json` reads `NaN` and `Infinity`; JSON has no such numbers (nor has OpenAI's API)."""
    message = f"The request body is not valid JSON: {constant} is not a JSON number."
    body = (
        b'{"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}'
    )
    response = post(scripted, body % constant.encode())
    assert_error(response, 400, code="invalid_json")
    assert response.json()["error"]["message"] == message
    tool = b'{"type": "function", "function": {"name": "f", "parameters": {"maximum": %s}}}'
    body = b'{"model": "claude-sonnet-4-5", "input": "hi", "tools": [%s]}' % (tool % constant.encode())
    headers = {"content-type": "application/json"}
    responses = httpx.post(f"{scripted.url}/v1/responses", content=body, headers=headers, timeout=30)
    assert_error(responses, 400, code="invalid_json")
    body = b'{"model": "claude-sonnet-4-5", "max_tokens": 10, "temperature": %s, "messages": []}'
    messages = httpx.post(
        f"{scripted.url}/v1/messages", content=body % constant.encode(), headers=headers, timeout=30
    )
    assert messages.status_code == 400, messages.text
    assert messages.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    }


@pytest.mark.usefixtures("nothing_enqueued")
def test_half_a_surrogate_pair_is_invalid_json_on_every_api(scripted: Gateway) -> None:
    """`\\ud800` alone is no character: Python's `json` reads it, UTF-8 cannot encode it, and the
    job's record could not be written (it was a 500, and the connection dropped)."""
    headers = {"content-type": "application/json"}
    messages = b'"messages": [{"role": "user", "content": "%s"}]'
    bodies = {
        "/v1/chat/completions": b'{"model": "claude-sonnet-4-5", %s}' % messages,
        "/v1/responses": b'{"model": "claude-sonnet-4-5", "input": "%s"}',
        "/v1/messages": b'{"model": "claude-sonnet-4-5", "max_tokens": 10, %s}' % messages,
    }
    with httpx.Client(base_url=scripted.url, headers=headers, timeout=30) as client:
        for path, body in bodies.items():
            for text in (rb"\ud800", rb"x\udfff", rb"\ude00\ud83d"):  # alone, or a pair in the wrong order
                response = client.post(path, content=body % text)
                assert response.status_code == 400, response.text
                error = response.json()["error"]
                assert error["type"] == "invalid_request_error"
                assert "surrogate" in error["message"]
                if path != "/v1/messages":
                    assert error["code"] == "invalid_json"
            # JSON text is UTF-8: in UTF-16 or UTF-32 the escape had passed the check (a 500).
            for encoding in ("utf-16", "utf-16-le", "utf-32"):
                response = client.post(path, content=(body % rb"\ud800").decode().encode(encoding))
                assert response.status_code == 400, (encoding, response.text)
                assert "not UTF-8" in response.json()["error"]["message"]
            # Nor as UTF-8's own bytes for a surrogate, which Python's `json` reads (a re-check probe).
            response = client.post(path, content=body % b"hi \xed\xa0\x80")
            assert response.status_code == 400, response.text
            assert "not UTF-8" in response.json()["error"]["message"]
            # Nor behind a second Content-Type, which had skipped the checks (an outside probe's 500).
            twice = [("content-type", "application/json"), ("content-type", "text/plain")]
            spaced = [(b"content-type", b"application/json\xa0")]  # JSON to FastAPI's parser too
            for sent in (twice, spaced):
                response = client.post(path, content=body % rb"\ud800", headers=sent)
                assert response.status_code == 400, response.text
                assert "surrogate" in response.json()["error"]["message"]
        # A well-formed pair is one character (😀), and the connection is still good.
        paired = bodies["/v1/chat/completions"] % rb"\ud83d\ude00"
        assert client.post("/v1/chat/completions", content=paired).status_code == 200
    assert_error(
        post(scripted, b'{"model": "claude-sonnet-4-5", "\\udc00": 1, "messages": []}'),
        400,
        code="invalid_json",
    )


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


@pytest.mark.usefixtures("nothing_enqueued")
def test_deep_nesting_is_a_400_before_anything_is_built(scripted: Gateway) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(300)}}
    assert_error(post(scripted, json=chat("hi", tools=[tool])), 400, code="too_deeply_nested")
    assert_error(post(scripted, b"[" * 30_000 + b"]" * 30_000), 400, code="too_deeply_nested")
    responses = httpx.post(
        f"{scripted.url}/v1/responses",
        json={
            "model": "claude-sonnet-4-5",
            "input": "hi",
            "tools": [{"type": "function", "name": "f", "parameters": nested(300)}],
        },
        timeout=30,
    )
    assert_error(responses, 400, code="too_deeply_nested")
    shallow = {"type": "function", "function": {"name": "f", "parameters": nested(25)}}
    # 25 levels pass this check (and fail later, for the model this test names on purpose).
    assert_error(post(scripted, json=chat("hi", tools=[shallow], model="no-such-model")), 404)


@pytest.mark.usefixtures("nothing_enqueued")
def test_a_bad_content_part_is_named_as_the_client_wrote_it(scripted: Gateway) -> None:
    """Not by pydantic's names of a union's members (it was `messages[0].content.str`, "Input
    should be a valid string", for a content part that lacked its text)."""
    parts = {
        "messages[0].content[0].text": [{"type": "text"}],
        "messages[0].content[0].image_url": [{"type": "image_url", "image_url": "https://x/a.png"}],
        "messages[0].content[0]": [{"type": "video"}],
    }
    for param, content in parts.items():
        body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": content}]}
        response = post(scripted, json=body)
        assert_error(response, 400, param=param)
        assert "valid string" not in response.json()["error"]["message"]
    refused = httpx.post(f"{scripted.url}/v1/responses", json={"model": "claude-sonnet-4-5", "input": 5})
    assert_error(refused, 400, param="input")


@pytest.mark.usefixtures("nothing_enqueued")
def test_a_value_of_the_wrong_json_type_is_refused_on_every_api(scripted: Gateway) -> None:
    """As OpenAI's API refuses it: "stream": "yes" streamed, "n": true or "2" made choices."""
    model = "claude-sonnet-4-5"
    wrong = {
        "/v1/chat/completions": [
            ({"stream": "yes"}, "stream"),
            ({"stream": 1}, "stream"),
            ({"n": True}, "n"),
            ({"n": "2"}, "n"),
            ({"max_tokens": "3"}, "max_tokens"),
            ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
            ({"stream_options": {"include_usage": "true"}, "stream": True}, "stream_options.include_usage"),
            ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, None),
        ],
        "/v1/responses": [({"store": "yes"}, "store"), ({"max_output_tokens": "10"}, "max_output_tokens")],
        "/v1/messages": [({"max_tokens": "5"}, None), ({"stream": "true", "max_tokens": 5}, None)],
    }
    with httpx.Client(base_url=scripted.url, timeout=30) as client:
        for path, cases in wrong.items():
            base = {"model": model, "input": "hi"} if "responses" in path else base_chat(model)
            for fields, param in cases:
                response = client.post(path, json={**base, **fields})
                assert response.status_code == 400, (path, fields, response.text)
                if param is not None:
                    assert response.json()["error"]["param"] == param
        # null where the spec allows it means the default; an integer is a number.
        for fields in ({"stream": None}, {"temperature": 1}):
            assert client.post("/v1/chat/completions", json={**base_chat(model), **fields}).status_code == 200
        nulls = {"model": model, "input": "hi", "stream": None, "store": None, "background": None}
        assert client.post("/v1/responses", json=nulls).json()["status"] == "completed"


def base_chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.usefixtures("nothing_enqueued")
def test_what_openai_refuses_though_each_field_is_valid_is_a_400(scripted: Gateway) -> None:
    """Each was accepted and run: usage options without a stream, a tool result answering no
    call, a user message with no content, a seed past 64 bits."""
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": hi, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [*hi, {"role": "tool", "content": "18 C"}]}, "messages[1].tool_call_id"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": hi, "seed": 2**70}, "seed"),
    ]
    for fields, param in cases:
        assert_error(post(scripted, json={"model": "claude-sonnet-4-5", **fields}), 400, param=param)
    answered = post(scripted, json={"model": "claude-sonnet-4-5", "messages": hi, "seed": 2**62})
    assert answered.status_code == 200
