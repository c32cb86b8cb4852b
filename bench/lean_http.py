"""A minimal HTTP/1.1 client for the benchmarks: POST a JSON body, read the SSE `data:` lines.

The benchmarks measure what the *gateway* adds to a stream, so the client should add as little
as it can. httpx's async client costs about 0.8 ms per request on the 2-core benchmark machine
(`GET /health`: 1.06 ms through `httpx.AsyncClient`, 0.26 ms over a bare socket), which would be
counted as gateway time. This client keeps idle keep-alive connections and decodes only what the
gateway sends (chunked transfer encoding, or a Content-Length body for errors).
"""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]

# Idle connections are reused only this long: under uvicorn's keep-alive timeout (5 s), after
# which the server closes them and a request written to one reads nothing back.
IDLE_REUSE_S = 4.0


class HTTPStatusError(RuntimeError):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")


class LeanClient:
    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._idle: list[tuple[float, Connection]] = []  # (idle since, connection)

    async def close(self) -> None:
        for _, (_, writer) in self._idle:
            writer.close()
        self._idle.clear()

    def local_ports(self) -> set[int]:
        """The client-side ports of its idle connections."""
        return {writer.get_extra_info("sockname")[1] for _, (_, writer) in self._idle}

    async def _take(self) -> Connection:
        while self._idle:
            since, (reader, writer) = self._idle.pop()
            if time.monotonic() - since < IDLE_REUSE_S and not reader.at_eof():
                return reader, writer
            writer.close()  # the server has closed it, or may be closing it now
        return await asyncio.open_connection(self._host, self._port)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        conn = await self._take()
        reusable = False
        try:
            yield conn
            reusable = True
        finally:
            if reusable:
                self._idle.append((time.monotonic(), conn))
            else:  # left mid-response: the connection is in an unknown state
                conn[1].close()

    async def sse(self, path: str, body: bytes) -> AsyncIterator[str]:
        """POSTs `body` and yields each `data:` payload of the event stream as it arrives."""
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        async with self._connection() as (reader, writer):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
            }
            if b"chunked" not in headers.get(b"transfer-encoding", b""):
                content = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                raise HTTPStatusError(status, content)
            if status != 200:
                raise HTTPStatusError(status, b"".join([chunk async for chunk in _chunks(reader)]))
            pending = b""
            async for chunk in _chunks(reader):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.startswith(b"data:"):
                        yield line[5:].strip().decode()


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The body of a chunked response, chunk by chunk, up to and including its end."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent: the final CRLF
            return
        yield (await reader.readexactly(size + 2))[:-2]
