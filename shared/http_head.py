"""uvicorn's HTTP protocol with a bound on a request's head, for every server of the gateway's.

httptools keeps a request's line and headers whole, however long they get: one connection sending
header lines without end held a gigabyte of an API process (with no key) or of a worker's
credential proxy (from inside a job's sandbox). Past `MAX_HEAD_BYTES` the request is answered 431
and its connection closed.
"""

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
"""A request's line and headers: far over what a client of the gateway sends (nginx's default
allows 32 KiB)."""
_LINGER_S = 1.0


class BoundedHead(HttpToolsProtocol):
    """Counts what arrives while a request's head is read; `refusal` is the 431's JSON body."""

    refusal = (
        b'{"error":{"message":"The request\'s line and headers are over %d bytes.",'
        b'"type":"invalid_request_error","param":null,"code":"request_header_fields_too_large"}}'
    ) % MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = 0
        """Of the head being read; None once it is whole (a body follows, or the next request)."""
        self._head_began = False  # in the chunk being parsed: its bytes before it are another's
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what a refused client still sends, unread
        self._head_began = False
        super().data_received(data)
        if self._head_bytes is None or self._head_began or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refused = True
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(self.refusal), self.refusal)
            )
            # Closed a moment later: closed with its input unread, the connection would be reset
            # and the client could lose the answer.
            self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._head_began = 0, True

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()
