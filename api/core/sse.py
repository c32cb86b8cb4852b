"""The HTTP response a stream is sent in, and ending every open one when the server shuts down.

Starlette's `StreamingResponse` (which ends the body when its client leaves) rather than
sse-starlette's `EventSourceResponse`: that one runs four tasks per response (the stream, a ping
loop, a shutdown watcher, a disconnect listener) and a cancel scope per send, about three times
the CPU of this one. Keep-alive pings come from the relay instead (`KEEP_ALIVE_S`
in api/core/relay.py), and the shutdown from `OpenStreams`.

Not Starlette's `__call__` either: under uvicorn (ASGI 2.3) it runs the body beside a disconnect
listener in an anyio task group, whose cancel scopes took ~7% of the API's CPU at 50 concurrent
streams. Here the body runs in the request's own task, and a plain task waiting for the disconnect
cancels it (`cut`), as the shutdown does.
"""

import asyncio
from collections.abc import AsyncGenerator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # no proxy buffers a stream
_END = {"type": "http.response.body", "body": b"", "more_body": False}


class FinalChunk(bytes):
    """The body's last message: it goes out with the end of the response, in one socket write."""


class OpenStreams:
    """The streams an API process is sending, and the requests waiting for their jobs before
    any header. A shutdown ends the streams at once, with an in-stream error that says to resume
    them by id (on another process), instead of holding it for the drain. The waits get the drain,
    as their jobs may end in it, and are cut just before it ends (`waiting`): uvicorn would then
    cancel them into a plain-text 500, whose retry by the SDKs runs the agent again."""

    def __init__(self) -> None:
        self.ending = False
        self._open: set[EventStreamResponse] = set()
        self._waits: set[asyncio.Task[object]] = set()
        self._cut_waits: set[asyncio.Task[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Future[None] | None = None

    @property
    def ended(self) -> "asyncio.Future[None]":
        """Done once a shutdown has ended the open streams: a stream still waiting for its first
        events opens then, and is ended at once as they are (it had held the shutdown for
        STREAM_COMMIT_AFTER_S: an outside probe). One for every stream: waited on, never a task."""
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
        return self._ended

    def add(self, stream: "EventStreamResponse") -> None:
        self._loop = self._loop or asyncio.get_running_loop()
        self._open.add(stream)
        if self.ending:
            stream.cut()

    def discard(self, stream: "EventStreamResponse") -> None:
        self._open.discard(stream)

    def end(self, drain_s: float) -> None:
        """Ends every open stream, and any that opens from now, and the waits a second before
        `drain_s` has passed; callable from a signal handler."""
        self.ending = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_all, max(0.0, drain_s - 1))

    def _cut_all(self, waits_after_s: float) -> None:
        if not self.ended.done():
            self.ended.set_result(None)
        for stream in list(self._open):
            stream.cut()
        assert self._loop is not None
        self._loop.call_later(waits_after_s, self._cut_all_waits)

    def _cut_all_waits(self) -> None:
        self._cut_waits |= self._waits
        for task in self._waits:
            task.cancel()

    def waiting(self, cut: Callable[[], Exception]) -> "Waiting":
        """Around a request's wait for its job: cut at the drain's end, it raises `cut()`."""
        return Waiting(self, cut)

    def _begin_wait(self, task: "asyncio.Task[object]") -> None:
        self._loop = self._loop or asyncio.get_running_loop()
        self._waits.add(task)

    def _end_wait(self, task: "asyncio.Task[object]", cancelled: bool) -> bool:
        """Whether the wait ended as the shutdown cut it (and only the shutdown)."""
        self._waits.discard(task)
        if task not in self._cut_waits:
            return False
        self._cut_waits.discard(task)
        return cancelled and not task.uncancel()


class Waiting:
    """`OpenStreams.waiting`: a class, not a generator, as every streamed request's first wait
    takes one."""

    def __init__(self, streams: OpenStreams, cut: Callable[[], Exception]) -> None:
        self._streams = streams
        self._cut = cut
        task = asyncio.current_task()
        assert task is not None
        self._task = task

    def __enter__(self) -> None:
        self._streams._begin_wait(self._task)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: object) -> None:
        if self._streams._end_wait(self._task, kind is asyncio.CancelledError):
            raise self._cut() from None


class EventStreamResponse(StreamingResponse):
    """Server-sent events: the body's messages as they come, ended early by a shutdown (with
    `farewell()`, the in-stream error that tells its client so) or by the client leaving. The
    body's last message may be a `FinalChunk`."""

    def __init__(
        self, body: AsyncGenerator[bytes, None], streams: OpenStreams, farewell: Callable[[], bytes]
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=_HEADERS)
        self._body = body
        self._streams = streams
        self._farewell = farewell
        self._task: asyncio.Task[object] | None = None  # set while the body may be cut
        self._cut = False

    def cut(self) -> None:
        """Stops the body where it waits (from another task or a callback; once): its client left,
        or the server is ending."""
        if self._task is not None and not self._cut:
            self._cut = True
            self._task.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        listener = asyncio.create_task(self._until_disconnect(receive))
        started = False
        try:
            self._task = task
            self._streams.add(self)
            await send(self._start())
            started = True
            await self._send_body(send)
        except asyncio.CancelledError:
            # Cut while it waited (the only place this task waits while `_task` is set), or cancelled
            # from elsewhere too: then it goes on up.
            if not self._cut or task.uncancel():
                raise
            if not started:
                await send(self._start())
            if self._streams.ending:  # else its client left: nobody reads it
                await send({"type": "http.response.body", "body": self._farewell(), "more_body": True})
            await send(_END)
        finally:
            self._task = None
            self._streams.discard(self)
            listener.cancel()

    def _start(self) -> Message:
        return {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}

    async def _send_body(self, send: Send) -> None:
        try:
            async for chunk in self._body:
                if isinstance(chunk, FinalChunk):
                    self._task = None  # sent whole from here: a late cut must not land outside
                    await send({"type": "http.response.body", "body": bytes(chunk), "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await self._body.aclose()  # its cleanup now, also when the end came in a `send`
        await send(_END)

    async def _until_disconnect(self, receive: Receive) -> None:
        await until_disconnect(receive)
        self.cut()


async def until_disconnect(receive: Receive) -> None:
    """Returns when the client of a request whose body was read disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass
