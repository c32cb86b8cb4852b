"""The worker's egress proxy on its own: each sandbox's socket holds its own tunnels."""

import socket
from pathlib import Path

from tests.conftest import begun_requests, closed_by_peer
from worker.egress import DOOR_CONNECTIONS, EgressProxy


def _refused(path: Path) -> bytes:
    """What the proxy answers a CONNECT to a host not on its list."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(10)
        connection.connect(str(path))
        connection.sendall(b"CONNECT not-listed.example:443 HTTP/1.1\r\n\r\n")
        return connection.recv(64)


def test_a_door_full_of_begun_tunnels_holds_up_no_other_door(tmp_path: Path) -> None:
    """A sandbox whose every connection began a CONNECT it never finishes leaves another
    sandbox's socket serving; connections over its limit are closed at once."""
    proxy = EgressProxy(["listed.example"])
    proxy.start()  # a daemon thread: ends with the run
    with proxy.door(tmp_path / "a.sock") as held_door, proxy.door(tmp_path / "b.sock") as other_door:
        held = begun_requests(held_door, DOOR_CONNECTIONS + 5, b"CONNECT listed.example:443 HTTP/1.1\r\n")
        try:
            assert all(closed_by_peer(connection) for connection in held[-5:])
            assert _refused(other_door).startswith(b"HTTP/1.1 403")
        finally:
            for connection in held:
                connection.close()
    assert not (tmp_path / "a.sock").exists()
