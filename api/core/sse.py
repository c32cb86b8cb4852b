"""The HTTP response a stream is sent in, and ending every open one when the server shuts down.

Starlette's `StreamingResponse` (which ends the body when its client leaves) rather than
sse-starlette's `EventSourceResponse`: that one runs four tasks per response (the stream, a ping
loop, a shutdown watcher, a disconnect listener) and a cancel scope per send, about three times
the CPU of this one. Keep-alive pings come from the relay instead (`KEEP_ALIVE_S`
in api/core/relay.py), and the shutdown from `OpenStreams`.
"""

import asyncio
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # no proxy buffers a stream


class OpenStreams:
    """The streams an API process is sending. A shutdown ends them at once, without their closing
    (a client resumes them by id, on another process), instead of holding it for the drain."""

    def __init__(self) -> None:
        self.ending = False
        self._open: set[anyio.CancelScope] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextmanager
    def open(self) -> Iterator[None]:
        """Sends one stream; what the body does when the server ends it is cut short here."""
        self._loop = self._loop or asyncio.get_running_loop()
        with anyio.CancelScope() as scope:
            if self.ending:
                scope.cancel()
            self._open.add(scope)
            try:
                yield
            finally:
                self._open.discard(scope)

    def end(self) -> None:
        """Ends every open stream, and any that opens from now; callable from a signal handler."""
        self.ending = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        for scope in self._open:
            scope.cancel()


class EventStreamResponse(StreamingResponse):
    """Server-sent events: the body's messages as they come, ended early by a shutdown."""

    def __init__(self, body: AsyncGenerator[bytes, None], streams: OpenStreams) -> None:
        super().__init__(body, media_type="text/event-stream", headers=_HEADERS)
        self._body = body
        self._streams = streams

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            with self._streams.open():
                async for chunk in self._body:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await self._body.aclose()  # its cleanup now, also when the end came in a `send`
        await send({"type": "http.response.body", "body": b"", "more_body": False})
