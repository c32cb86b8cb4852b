"""uvicorn's HTTP protocol with bounds on what one request holds, for every server of the gateway's.

httptools keeps a request's line, headers and trailers whole, however long they get: one
connection sending header lines without end held a gigabyte of an API process (with no key) or
of a worker's credential proxy (from inside a job's sandbox), and trailers after a chunked body
did the same once its answer (a 401) was sent. Past `MAX_HEAD_BYTES` of head or of trailers the
request is answered 431, past `max_message_bytes` in all 413, and its connection is closed; one
that is not HTTP, 400. Each answer is an error in OpenAI's shape, or in Anthropic's to a request
for its Messages API, with a request id as every response has.

A request's head must come whole within `head_timeout_s` of its connection, or of the response
before it on a kept-alive one (408; a connection that sent nothing is closed): idle connections, or ones that
sent a head's first lines, had held every file an API process could open, and it answered no one
(an outside probe, with no key).

A response's client that stops reading is dropped too (`send_timeout_s`): the transport keeps what
the socket does not take, however long, and a client of the gateway's that resumed a large finished
job and read nothing held ~10 MB of an API process per connection, for good.
"""

import asyncio
import contextlib
import fcntl
import json
import logging
import socket
import struct
import sys
import termios
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
"""A request's line and headers, and its trailers: far over what a client of the gateway sends
(nginx's default allows 32 KiB)."""
_LINGER_S = 1.0
MIN_SENT_BYTES = 32 * 1024
"""What a client whose response waits must read of it every `send_timeout_s` to keep its connection."""

log = logging.getLogger("gateway.http")


_ANTHROPIC_PATH = b"/v1/messages"


@dataclass(frozen=True)
class _Refusal:
    status: str
    code: str  # OpenAI's; Anthropic's type is `invalid_request_error` but for 413's own
    message: str

    def answer(self, path: bytes) -> bytes:
        """The whole HTTP response, closing the connection."""
        request_id = f"req_{uuid.uuid4().hex}".encode()
        headers = b"x-request-id: %s\r\n" % request_id
        if path == _ANTHROPIC_PATH or path.startswith(_ANTHROPIC_PATH + b"/"):
            kind = self.code if self.code == "request_too_large" else "invalid_request_error"
            error: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": self.message}}
            headers += b"request-id: %s\r\n" % request_id  # where Anthropic's clients read it
        else:
            info = {
                "message": self.message,
                "type": "invalid_request_error",
                "param": None,
                "code": self.code,
            }
            error = {"error": info}
        body = json.dumps(error).encode()
        head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s"
        return head % (self.status.encode(), len(body), headers) + b"connection: close\r\n\r\n" + body


_HEAD_TOO_LARGE = _Refusal(
    "431 Request Header Fields Too Large",
    "request_header_fields_too_large",
    f"The request's line and headers, or its trailers, are over {MAX_HEAD_BYTES} bytes.",
)
_TOO_LARGE = _Refusal("413 Content Too Large", "request_too_large", "The request is over its size limit.")
_NOT_HTTP = _Refusal("400 Bad Request", "invalid_http", "The request is not valid HTTP/1.1.")
_HEAD_TIMEOUT = _Refusal("408 Request Timeout", "request_timeout", "The request's head did not come in time.")


class BoundedHead(HttpToolsProtocol):
    """Counts what a request's head and trailers hold, and all it sends."""

    max_message_bytes: ClassVar[int] = 64 * 1024 * 1024
    """A whole request (head, body, trailers): a server's own body limit, and its head's twice."""
    head_timeout_s: ClassVar[float] = 20.0
    """How long a request's head may take (nginx's `client_header_timeout` is 60 s): clients send
    it at once."""
    send_timeout_s: ClassVar[float] = 30.0
    """How long a response may wait on its client (the transport's buffer over its high-water mark)
    with less than `MIN_SENT_BYTES` of it read meanwhile, before the connection is aborted (a close
    would still wait for the buffer to be read)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = 0
        """Of the head being read; None once it is whole (a body follows, or trailers)."""
        self._parsed_bytes = 0
        """Of the head's line and headers, as parsed."""
        self._trailer_bytes = 0
        self._message_bytes = 0
        self._began = False  # a request began in the chunk being parsed: its bytes before are another's
        self._refused = False
        self._stalled: asyncio.TimerHandle | None = None  # the check while writing is paused
        self._head_due: asyncio.TimerHandle | None = None  # the head's deadline, while it is awaited
        self._reading_head = False  # a request's first bytes came, its head is not whole yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what a refused client still sends, unread
        self._began = False
        super().data_received(data)
        if self._refused or self._began or self.transport.is_closing():
            return
        self._message_bytes += len(data)
        if self._head_bytes is not None:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(_HEAD_TOO_LARGE)
                return
        if self._message_bytes > self.max_message_bytes:
            self._refuse(_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._trailer_bytes, self._message_bytes, self._began = 0, 0, 0, True
        self._parsed_bytes, self._reading_head = 0, True
        # One that begins while the response before it runs gets its time once that one ends
        # (`on_response_complete`): timed from here, its 408 had cut that response (a re-check probe).

    # A head that comes whole in one read is parsed before `data_received` counts it: its line
    # and headers are counted as they are parsed too (an outside probe's 100 KB header passed).
    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        if self._parsed_bytes > MAX_HEAD_BYTES:  # refused: its path's start still tells its API's shape
            self.url += url[: len(_ANTHROPIC_PATH) + 1]
        if self._admits(self._parsed_bytes):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_bytes is None:  # a trailer, after a chunked body: counted, never a header
            # uvicorn adds trailers to the request's headers, which the access check had read as
            # the client's address (X-Forwarded-For), its key or its Host (an outside probe).
            self._trailer_bytes += len(name) + len(value)
            self._admits(self._trailer_bytes)
            return
        # With its ": " and line end: 50,000 empty headers counted as none (the re-check probe).
        self._parsed_bytes += len(name) + len(value) + 4
        if self._admits(self._parsed_bytes):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_came()
        self._reading_head = False
        if self._refused:  # refused in the same read: nothing of the request runs
            return
        self._head_bytes = None
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.transport is self.transport:  # the request's new cycle
            self.cycle.transport = _HeadWithBody(self.transport, self.loop)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    # Paused and resumed by the transport only when its buffer crosses its marks: nothing is spent
    # per write.
    def pause_writing(self) -> None:
        super().pause_writing()
        self._check_sent_after(self._unsent())

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unwatch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch()
        self._head_came()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a request whose head came already: it runs now
        super().on_response_complete()
        # The next head's time runs from here: uvicorn's keep-alive timer stops at any byte, and
        # empty lines (which begin no request) had kept a connection open for good (a re-check probe).
        # Not for a pipelined request's: its stream was cut at 20 s (an outside probe).
        if self._head_due is None and not pipelined and not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        self._head_due = self.loop.call_later(self.head_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_due = None
        if self._reading_head:
            self._refuse(_HEAD_TIMEOUT)
        else:  # nothing to answer
            self.transport.close()

    def _head_came(self) -> None:
        if self._head_due is not None:
            self._head_due.cancel()
            self._head_due = None

    def _check_sent_after(self, unsent: int) -> None:
        self._stalled = self.loop.call_later(self.send_timeout_s, self._check_sent, unsent)

    def _check_sent(self, unsent_then: int) -> None:
        unsent = self._unsent()
        if unsent_then - unsent >= MIN_SENT_BYTES:
            self._check_sent_after(unsent)
            return
        self._stalled = None
        log.info("dropped a client that read under %d bytes in %g s", MIN_SENT_BYTES, self.send_timeout_s)
        connection = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):  # reset, not closed: the socket's buffer is freed too
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _unsent(self) -> int:
        """What the client has yet to receive: the transport's buffer, and what the socket's holds
        (Linux; the transport takes from its buffer only when the socket's has room for a lot)."""
        unsent = self.transport.get_write_buffer_size()
        with contextlib.suppress(OSError, AttributeError):
            queued = fcntl.ioctl(self.transport.get_extra_info("socket").fileno(), termios.TIOCOUTQ, bytes(4))
            unsent += int.from_bytes(queued, sys.byteorder)
        return unsent

    def _unwatch(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def send_400_response(self, msg: str) -> None:
        """What httptools cannot parse (a control character in a header, two Content-Lengths)
        is answered in OpenAI's shape too: uvicorn's own answer is plain text."""
        self._refuse(_NOT_HTTP)

    def _admits(self, head_bytes: int) -> bool:
        """Whether the request, with `head_bytes` of head (or trailers) so far, is still taken."""
        if not self._refused and head_bytes > MAX_HEAD_BYTES:
            self._refuse(_HEAD_TOO_LARGE)
        return not self._refused

    def _refuse(self, refusal: _Refusal) -> None:
        self._refused = True
        if self.cycle is not None:  # a request being served: the app's own answer is not sent now
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        url: bytes = getattr(self, "url", b"")  # none before a request begins
        self.transport.write(refusal.answer(url.partition(b"?")[0]))
        # Closed a moment later: closed with its input unread, the connection would be reset and
        # the client could lose the answer.
        self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


class _HeadWithBody:
    """A response's transport whose first write (the status line and headers) waits for the next,
    within the same turn of the loop, so that both go out in one socket write: one system call
    and one segment fewer per response (the first event of a stream follows its headers at once)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self._flush)
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None and not self._transport.is_closing():
            self._transport.write(self._held)
        self._held = None

    def close(self) -> None:
        """After the held head, if nothing followed it: a HEAD request's answer closing its
        connection (HTTP/1.0, `Connection: close`) had been dropped unsent (an outside probe)."""
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
