"""The HTTP protocol every gateway server speaks (`shared/http_head.py`), on a transport that
records its writes: a response's head goes out with its first body, or alone once the app waits."""

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from shared.http_head import BoundedHead


class RecordedTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/later":
        await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b"first", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def writes_of(path: str) -> list[bytes]:
    config = uvicorn.Config(app, http=BoundedHead, lifespan="off", log_level="warning")
    config.load()
    transport = RecordedTransport()
    protocol = BoundedHead(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(transport)
    protocol.data_received(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
    for _ in range(100):
        if transport.writes and transport.writes[-1].endswith(b"0\r\n\r\n"):
            break
        await asyncio.sleep(0.01)
    protocol.connection_lost(None)
    return transport.writes


async def test_a_responses_head_goes_out_with_its_first_body_in_one_write() -> None:
    head, end = await writes_of("/")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n5\r\nfirst\r\n")
    assert end == b"0\r\n\r\n"


async def test_a_head_whose_body_waits_goes_out_alone_at_once() -> None:
    head, first, end = await writes_of("/later")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    assert first == b"5\r\nfirst\r\n"
    assert end == b"0\r\n\r\n"
