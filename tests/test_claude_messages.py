"""Messages through the real SDK and CLI: system prompts, history as real turns, images, models.
Every assertion is on what the fake Anthropic upstream received (or that it received nothing)."""

import base64
import struct
import zlib
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, chat, claude_env
from tests.fake_anthropic import FakeAnthropic, system_text

pytestmark = pytest.mark.claude


def _png() -> str:
    """A valid 1x1 PNG, base64 (the CLI decodes images and replaces ones it cannot read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    image = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + image).decode()


PNG = _png()


@pytest.fixture(scope="module")
def configured(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    """A Claude gateway whose operator replaced the system prompt and allowed one image host."""
    gateway: Gateway = start_gateway(
        workers=1,
        **claude_env(
            fake_anthropic,
            CLAUDE_SYSTEM_PROMPT_MODE="replace",
            IMAGE_URL_ALLOWLIST='["https://images.example.com/"]',
            MODEL_PASS_THROUGH="true",
        ),
    )
    return gateway


def post(gateway: Gateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)


def texts(content: str | list[dict[str, Any]]) -> list[str]:
    """The text blocks of a message, without the CLI's injected `<system-reminder>`s."""
    if isinstance(content, str):
        return [content]
    return [
        b["text"] for b in content if b["type"] == "text" and not b["text"].startswith("<system-reminder>")
    ]


def test_history_reaches_the_model_as_alternating_turns(claude: Gateway, upstream: FakeAnthropic) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
        {"role": "assistant", "content": "6."},
        {"role": "user", "content": "And 4+4?"},
    ]
    response = post(claude, {"model": "claude-sonnet-4-5", "messages": messages})
    assert response.status_code == 200, response.text
    sent = upstream.requests[-1]
    turns = [(m["role"], texts(m["content"])) for m in sent["messages"] if m["role"] != "system"]
    assert turns == [
        ("user", ["What is 2+2?"]),
        ("assistant", ["4."]),
        ("user", ["And 3+3?"]),
        ("assistant", ["6."]),
        ("user", ["And 4+4?"]),
    ]
    assert "Be terse." in system_text(sent)
    assert "What is 2+2?" not in system_text(sent)


def test_consecutive_messages_of_one_role_become_one_turn(claude: Gateway, upstream: FakeAnthropic) -> None:
    messages = [
        {"role": "user", "content": "First."},
        {"role": "user", "content": "Second."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Third."},
        {"role": "user", "content": "Fourth?"},
    ]
    assert post(claude, {"model": "claude-sonnet-4-5", "messages": messages}).status_code == 200
    sent = upstream.requests[-1]["messages"]
    turns = [(m["role"], "".join(texts(m["content"]))) for m in sent if m["role"] != "system"]
    assert turns == [("user", "First.\n\nSecond."), ("assistant", "Noted."), ("user", "Third.\n\nFourth?")]


def test_system_prompt_is_appended_to_claude_codes(claude: Gateway, upstream: FakeAnthropic) -> None:
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "developer", "content": "Speak French."}]}
    body["messages"].append({"role": "user", "content": "hi"})
    assert post(claude, body).status_code == 200
    system = system_text(upstream.requests[-1])
    assert "Speak French." in system
    assert "Claude Code" in system  # Claude Code's own prompt is still there, before the caller's
    assert system.index("Claude Code") < system.index("Speak French.")


def test_system_prompt_replaces_claude_codes_when_configured(
    configured: Gateway, upstream: FakeAnthropic
) -> None:
    # The second one no command line carries: it goes to the CLI in a file.
    for prompt in ("You are a parrot.", "You are a parrot. " * 8000):
        body = {"model": "claude-sonnet-4-5", "messages": [{"role": "system", "content": prompt}]}
        body["messages"].append({"role": "user", "content": "hi"})
        assert post(configured, body).status_code == 200
        system = system_text(upstream.requests[-1])
        assert prompt in system
        assert "Claude Code" not in system


def test_a_base64_image_becomes_an_image_block(claude: Gateway, upstream: FakeAnthropic) -> None:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    earlier = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}],
        },
        {"role": "assistant", "content": "A cat."},
    ]
    response = post(
        claude, {"model": "claude-sonnet-4-5", "messages": [*earlier, {"role": "user", "content": content}]}
    )
    assert response.status_code == 200, response.text
    sent = upstream.requests[-1]["messages"]
    images = [
        (index, block["source"])
        for index, message in enumerate(sent)
        for block in message["content"]
        if isinstance(message["content"], list) and block["type"] == "image"
    ]
    assert images == [
        (0, {"type": "base64", "media_type": "image/png", "data": PNG}),
        (len(sent) - 1, {"type": "base64", "media_type": "image/png", "data": PNG}),
    ]
    assert "What is in this picture?\n" in texts(sent[-1]["content"])  # the CLI ends it with a newline


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://images.example.com/cat.png", "image_url_not_allowed"),
        ("http://127.0.0.1:1/cat.png", "image_url_not_allowed"),
        ("data:image/png;base64,@@@", "invalid_image"),
        ("data:application/pdf;base64,AAAA", "invalid_image"),
    ],
)
def test_remote_and_malformed_images_are_refused(
    claude: Gateway, upstream: FakeAnthropic, url: str, code: str
) -> None:
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]
    response = post(
        claude, {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["param"] == "messages[0].content[1].image_url.url"
    assert upstream.requests == []


def test_an_allow_listed_image_url_is_left_to_the_model_api(
    configured: Gateway, upstream: FakeAnthropic
) -> None:
    url = "https://images.example.com/cat.png"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "look"}]
    response = post(
        configured, {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code == 200, response.text
    last = upstream.requests[-1]["messages"][-1]["content"]
    assert {"type": "url", "url": url} in [block.get("source") for block in last]
    # Another host stays refused.
    content[0] = {"type": "image_url", "image_url": {"url": "https://images.example.com.evil.test/x.png"}}
    refused = post(
        configured, {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": content}]}
    )
    assert refused.status_code == 400


def test_models_aliases_and_the_echoed_id(claude: Gateway, upstream: FakeAnthropic) -> None:
    listed = httpx.get(f"{claude.url}/v1/models", timeout=10).json()["data"]
    ids = [model["id"] for model in listed]
    assert {"claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5", "sonnet", "opus", "haiku"} <= set(ids)
    assert all(model["owned_by"] == "anthropic" and model["created"] > 0 for model in listed)
    response = post(claude, chat("hi") | {"model": "sonnet"})
    assert response.status_code == 200
    assert response.json()["model"] == "sonnet"  # what the caller sent
    assert upstream.requests[-1]["model"] == "claude-sonnet-4-5"  # what ran
    # A dated snapshot id of a served model runs that model; one of an unserved family is never
    # mapped onto another model.
    dated = post(claude, chat("hi") | {"model": "claude-sonnet-4-5-20250929"})
    assert dated.status_code == 200, dated.text
    assert dated.json()["model"] == "claude-sonnet-4-5-20250929"
    assert upstream.requests[-1]["model"] == "claude-sonnet-4-5"
    for model in ("gpt-4o", "claude-3-5-sonnet-20241022", "claude-sonnet-4-5-2025"):
        unknown = post(claude, chat("hi") | {"model": model})
        assert unknown.status_code == 404, model
        assert unknown.json()["error"]["code"] == "model_not_found"


def test_pass_through_runs_an_unlisted_model_as_sent(configured: Gateway, upstream: FakeAnthropic) -> None:
    response = post(configured, chat("hi") | {"model": "claude-opus-4-5-20991231"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "claude-opus-4-5-20991231"
    assert upstream.requests[-1]["model"] == "claude-opus-4-5-20991231"
    # Found by an outside probe: an id no command line carries failed the CLI's start (a 503).
    for unfit in ("claude-x-" + "a" * 140_000, "claude\u0000x", "claude x"):
        refused = post(configured, chat("hi") | {"model": unfit})
        assert refused.status_code == 404, refused.text[:300]
        assert refused.json()["error"]["code"] == "model_not_found"


def test_an_image_in_a_session_stays_in_its_transcript(claude: Gateway, upstream: FakeAnthropic) -> None:
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    first = {"role": "user", "content": [image, {"type": "text", "text": "Remember this picture."}]}
    body = {"model": "claude-sonnet-4-5", "messages": [first], "session_id": "pictures"}
    assert post(claude, body).status_code == 200
    body["messages"] = [{"role": "user", "content": "What was in it?"}]
    assert post(claude, body).status_code == 200, "second turn"
    sent = upstream.requests[-1]["messages"]
    first_blocks = sent[0]["content"]
    assert {"type": "base64", "media_type": "image/png", "data": PNG} in [
        b.get("source") for b in first_blocks
    ]
    assert [m["role"] for m in sent if m["role"] != "system"] == ["user", "assistant", "user"]
    assert "What was in it?" in "".join(texts(sent[-1]["content"]))
