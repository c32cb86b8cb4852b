"""A sandbox's only way out besides the model API: a CONNECT proxy to the operator's allow-list.

With `SANDBOX_ALLOWED_HOSTS` set, the worker serves HTTP CONNECT on a Unix socket that every job
sandbox has bound in. A sandbox has no network but its own loopback, so inside it a small relay
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


def _destination(target: str) -> tuple[str, int] | None:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]").lower(), int(port)


class EgressProxy:
    def __init__(self, allowed_hosts: list[str]) -> None:
        self._allowed = {self._entry(host) for host in allowed_hosts}

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

    def start(self, socket: Path) -> None:
        ready = threading.Event()

        def serve() -> None:
            async def main() -> None:
                server = await asyncio.start_unix_server(self._tunnel, path=str(socket), limit=_HEAD_LIMIT)
                ready.set()
                await server.serve_forever()

            asyncio.run(main())

        threading.Thread(target=serve, name="egress-proxy", daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the egress proxy did not start")
        socket.chmod(0o666)  # the job user's sandbox connects

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
