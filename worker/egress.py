"""A sandbox's only way out besides the model API: a CONNECT proxy to the operator's allow-list.

With `SANDBOX_ALLOWED_HOSTS` set, the worker serves HTTP CONNECT on a Unix socket of each job
sandbox's own, bound in (a `door`, as the credential proxy's: a job that holds every tunnel it
can holds none of another job's). A sandbox has no network but its own loopback, so inside it a small relay
(`RELAY`, run by the system's python3) listens on 127.0.0.1:`RELAY_PORT` and hands each
connection to that socket; `HTTPS_PROXY` points the job's tools there. A CONNECT to a listed
host (and port, 443 unless given) is tunnelled; anything else gets 403, and plain-HTTP proxy
requests too: only tunnels leave. Empty by default: no egress at all.

It runs in its own thread and event loop, like the credential proxy.
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("gateway.worker.egress")

RELAY_PORT = 3128
RELAY = """\
import socket, sys, threading
def pipe(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
server = socket.create_server(("127.0.0.1", int(sys.argv[2])))
while True:
    client, _ = server.accept()
    upstream = socket.socket(socket.AF_UNIX)
    try:
        upstream.connect(sys.argv[1])
    except OSError:
        client.close()
        continue
    for ends in ((client, upstream), (upstream, client)):
        threading.Thread(target=pipe, args=ends, daemon=True).start()
"""
"""The relay inside a sandbox: 127.0.0.1:<argv[2]> → the Unix socket <argv[1]>."""

_HEAD_LIMIT = 8192
_TIMEOUT_S = 10
DOOR_CONNECTIONS = 64
"""Tunnels held at once through one sandbox's socket: a tool's parallel downloads, not the
worker's descriptors."""


def _destination(target: str) -> tuple[str, int] | None:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]").lower(), int(port)


class EgressProxy:
    def __init__(self, allowed_hosts: list[str]) -> None:
        self._allowed = {self._entry(host) for host in allowed_hosts}
        self._loop = asyncio.new_event_loop()

    @staticmethod
    def _entry(host: str) -> tuple[str, int]:
        name, _, port = host.strip().lower().partition(":")
        return name, int(port) if port else 443

    def allows(self, host: str, port: int) -> bool:
        """A listed host, or a subdomain of a listed `*.domain`, on its port."""
        if (host, port) in self._allowed:
            return True
        return any(
            name.startswith("*.") and host.endswith(name[1:]) and port == allowed_port
            for name, allowed_port in self._allowed
        )

    def start(self) -> None:
        """Runs the proxy's event loop, in a thread of its own; `door` opens its sockets."""
        threading.Thread(target=self._loop.run_forever, name="egress-proxy", daemon=True).start()

    @contextmanager
    def door(self, path: Path) -> Iterator[Path]:
        """Serves on the Unix socket `path` while in use, with at most `DOOR_CONNECTIONS` tunnels
        at once through it."""
        held = 0

        async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal held
            if held >= DOOR_CONNECTIONS:
                writer.close()
                return
            held += 1
            try:
                await self._tunnel(reader, writer)
            finally:
                held -= 1

        listening = asyncio.start_unix_server(tunnel, path=str(path), limit=_HEAD_LIMIT)
        listener = asyncio.run_coroutine_threadsafe(listening, self._loop).result(timeout=10)
        try:
            path.chmod(0o666)  # the job user's sandbox connects
            yield path
        finally:
            self._loop.call_soon_threadsafe(listener.close)
            path.unlink(missing_ok=True)

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
                destination = _destination(target) if method == "CONNECT" else None
                if destination is None or not self.allows(*destination):
                    log.info("egress refused: %s %s", method[:16], target[:200])
                    writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                    return
                upstream_reader, upstream_writer = await asyncio.open_connection(*destination)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            finally:
                upstream_writer.close()
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            with contextlib.suppress(OSError):
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
        finally:
            with contextlib.suppress(OSError):
                writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    with contextlib.suppress(OSError):
        sink.write_eof()
