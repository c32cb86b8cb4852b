"""Request parameters on the real SDK and CLI path: stop sequences, sampling parameters."""

import json
import time

import httpx
import pytest

from tests.conftest import Gateway, chat, sse_data
from tests.fake_anthropic import FakeAnthropic, Reply

pytestmark = pytest.mark.claude

# The stop sequence arrives split across deltas; after it, a long slow tail the CLI must not finish.
_TOKENS = ["Roses", " are", " red", "\n\n", "Vio", "lets", " are", " bl", "ue", *[" la"] * 300]


def test_a_stop_sequence_ends_the_reply_and_stops_the_cli(claude: Gateway, upstream: FakeAnthropic) -> None:
    upstream.default = Reply(tokens=_TOKENS, delay_s=0.1, input_tokens=321)
    began = time.monotonic()
    body = chat("a poem", stop=["s are bl", "never"], stream=True, stream_options={"include_usage": True})
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
    # 300 tail tokens 0.1 s apart: finishing the upstream reply would take 30 s.
    assert time.monotonic() - began < 20
    assert response.status_code == 200
    chunks = [json.loads(data) for data in sse_data(response)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Roses are red\n\nViolet"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] == 321
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_stop_not_hit_leaves_the_reply_whole(claude: Gateway, upstream: FakeAnthropic) -> None:
    upstream.default = Reply(tokens=["The", " end", "."], stop_reason="end_turn")
    body = chat("x", stop="END")
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
    assert response.json()["choices"][0]["message"]["content"] == "The end."
    assert response.json()["choices"][0]["finish_reason"] == "stop"


def test_temperature_and_top_p_are_accepted(claude: Gateway, upstream: FakeAnthropic) -> None:
    body = chat("x", temperature=0.2, top_p=0.9)
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    # Claude Code sets its own sampling: the upstream request carries neither.
    assert "temperature" not in upstream.requests[-1]
    assert "top_p" not in upstream.requests[-1]
