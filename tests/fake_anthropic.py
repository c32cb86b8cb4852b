"""A fake Anthropic Messages API on 127.0.0.1 for driving the real Claude Code CLI in tests.

It records every request body it receives and answers from a script of `Reply`s (the default
reply when the script is empty), streaming SSE exactly as the real API does.
"""

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Reply:
    tokens: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " fake", " upstream."])
    delay_s: float = 0.0
    input_tokens: int = 42
    output_tokens: int = 7
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    stop_reason: str = "end_turn"
    status: int = 200
    error_type: str = "api_error"
    tool_use: tuple[str, dict[str, Any]] | None = None
    """(tool name, input): reply with a single tool call instead of text."""
    preamble: list[str] = field(default_factory=list)
    """Text deltas before the tool call, in its message (the model saying what it will do)."""
    cut_after: int | None = None
    """Drop the connection after this many tokens, as a failing upstream would."""
    thinking: list[str] = field(default_factory=list)
    """Thinking deltas streamed in a thinking block before the text or the tool call."""
    echo: bool = False
    """Reply with the conversation's text as received (Claude Code's reminders left out)."""


def _refused(body: dict[str, Any]) -> str | None:
    """What the real API refuses of a request the CLI may build (its messages, as it words them)."""
    thinking = body.get("thinking") or {}
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens", 0)
        if budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if body.get("max_tokens", 0) <= budget:
            return "`max_tokens` must be greater than `thinking.budget_tokens`."
    messages = body.get("messages") or []
    for index, message in enumerate(messages):
        content = message.get("content")
        final_assistant = index == len(messages) - 1 and message.get("role") == "assistant"
        if isinstance(content, str) and not content.strip() and not final_assistant:
            return (
                f"messages.{index}: all messages must have non-empty content except for the optional "
                "final assistant message"
            )
        blocks = content if isinstance(content, list) else []
        if any(block.get("type") == "text" and not block.get("text", "").strip() for block in blocks):
            return "messages: text content blocks must contain non-whitespace text"
    return None


class _Cut(Exception):
    """Raised inside a streamed reply: the server aborts the connection mid-body."""


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _stream(reply: Reply, model: str) -> AsyncIterator[bytes]:
    message = {
        "id": f"msg_{time.monotonic_ns()}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": reply.input_tokens,
            "cache_creation_input_tokens": reply.cache_write_tokens,
            "cache_read_input_tokens": reply.cache_read_tokens,
            "output_tokens": 1,
        },
    }
    yield _sse("message_start", {"type": "message_start", "message": message})
    index = 0
    if reply.thinking:
        async for chunk in _thinking(reply.thinking):
            yield chunk
        index = 1
    if reply.tool_use is not None:
        if reply.preamble:
            yield _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            for token in reply.preamble:
                delta = {"type": "text_delta", "text": token}
                yield _sse(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                )
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        async for chunk in _tool_use(*reply.tool_use, index=index):
            yield chunk
        return
    block = {"type": "text", "text": ""}
    yield _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
    for sent, token in enumerate(reply.tokens):
        if reply.cut_after is not None and sent == reply.cut_after:
            await asyncio.sleep(reply.delay_s)  # what was sent has that long to be read before the reset
            raise _Cut
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        delta = {"type": "text_delta", "text": token}
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


async def _thinking(deltas: list[str]) -> AsyncIterator[bytes]:
    block = {"type": "thinking", "thinking": "", "signature": ""}
    yield _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
    for text in deltas:
        delta = {"type": "thinking_delta", "thinking": text}
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
    signature = {"type": "signature_delta", "signature": "c2lnbmF0dXJl"}
    yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": signature})
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})


async def _tool_use(name: str, tool_input: dict[str, Any], *, index: int = 0) -> AsyncIterator[bytes]:
    block = {"type": "tool_use", "id": f"toolu_{time.monotonic_ns()}", "name": name, "input": {}}
    yield _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
    delta = {"type": "input_json_delta", "partial_json": json.dumps(tool_input)}
    yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


class FakeAnthropic:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        """The body of each Messages API request, in order."""
        self.received: list[str] = []
        """`METHOD /path` of every request received, whatever its route."""
        self.credentials: list[str] = []
        """The `x-api-key` (or bearer token) of each request, in order."""
        self.paths: list[str] = []
        """The path of each Messages API request, in order."""
        self.betas: list[str] = []
        """The `anthropic-beta` header of each request, in order."""
        self.models: list[str] = []
        """What `GET /v1/models` lists, two to a page (so clients must follow `after_id`)."""
        self.models_keys: list[str] = []
        """The `x-api-key` of each `GET /v1/models` request, in order."""
        self.script: deque[Reply] = deque()
        self.by_prompt: dict[str, deque[Reply]] = {}
        """Replies for each conversation whose first message contains the key, so concurrent
        jobs each follow their own script; `script` (then `default`) answers the others."""
        self.default = Reply()
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _messages(self, request: Request) -> Response:
        self.received.append(f"{request.method} {request.url.path}")
        body = await request.json()
        self.requests.append(body)
        self.paths.append(request.url.path)
        self.betas.append(request.headers.get("anthropic-beta", ""))
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.credentials.append(request.headers.get("x-api-key") or bearer)
        if (refused := _refused(body)) is not None:
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": refused}}
            return JSONResponse(error, status_code=400)
        reply = self._reply_for(body)
        if reply.echo:
            reply = replace(reply, tokens=[conversation_text(body)])
        if reply.status != 200:
            error = {"type": "error", "error": {"type": reply.error_type, "message": "fake upstream error"}}
            return JSONResponse(error, status_code=reply.status)
        # Vertex names the model in the path (`.../models/<model>:streamRawPredict`), not the body.
        model = body.get("model") or request.path_params.get("model", "").partition(":")[0]
        return StreamingResponse(_stream(reply, model), media_type="text/event-stream")

    def _reply_for(self, body: dict[str, Any]) -> Reply:
        first = json.dumps(body.get("messages", [])[:1])
        for key, replies in self.by_prompt.items():
            if key in first and replies:
                return replies.popleft()
        return self.script.popleft() if self.script else self.default

    async def _list_models(self, request: Request) -> Response:
        self.received.append(f"{request.method} {request.url.path}")
        self.models_keys.append(request.headers.get("x-api-key", ""))
        after = request.query_params.get("after_id")
        start = self.models.index(after) + 1 if after in self.models else 0
        page = self.models[start : start + 2]
        data = [
            {"type": "model", "id": model, "display_name": model, "created_at": "2025-09-29T00:00:00Z"}
            for model in page
        ]
        more = start + 2 < len(self.models)
        last = page[-1] if page else None
        body = {"data": data, "has_more": more, "first_id": page[0] if page else None, "last_id": last}
        return JSONResponse(body)

    async def _other(self, request: Request) -> Response:
        self.received.append(f"{request.method} {request.url.path}")
        return JSONResponse({"type": "error", "error": {"type": "not_found_error", "message": "no"}}, 404)

    def start(self) -> None:
        app = Starlette(
            routes=[
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/models", self._list_models, methods=["GET"]),
                # Vertex AI's streamRawPredict speaks the Messages API's SSE.
                Route(
                    "/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}",
                    self._messages,
                    methods=["POST"],
                ),
                Route("/{path:path}", self._other, methods=["GET", "POST", "HEAD"]),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)


def user_text(body: dict[str, Any]) -> str:
    """The caller's prompt: the last text block of the last user message (after system reminders)."""
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return [block["text"] for block in content if block.get("type") == "text"][-1]


def conversation_text(body: dict[str, Any]) -> str:
    """Every text of the request's messages, in order, one per line, without the CLI's reminders."""
    texts: list[str] = []
    for message in body["messages"]:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        texts += [
            b["text"] for b in blocks if b.get("type") == "text" and not b["text"].startswith("<system")
        ]
    return "\n".join(texts)


def tool_results(body: dict[str, Any]) -> list[str]:
    """The text of every `tool_result` block the CLI sent back in this request."""
    results: list[str] = []
    for message in body["messages"]:
        content = message["content"] if isinstance(message["content"], list) else []
        for block in content:
            if block.get("type") == "tool_result":
                inner = block.get("content")
                if isinstance(inner, list):
                    inner = "".join(part.get("text", "") for part in inner)
                results.append(str(inner))
    return results


def system_text(body: dict[str, Any]) -> str:
    system = body.get("system", [])
    if isinstance(system, str):
        return system
    return "\n".join(block.get("text", "") for block in system)
