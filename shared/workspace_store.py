"""Where session workspaces are kept between turns: a local directory or S3-compatible storage.

The store is a plain object store (put, get, a byte range, list, delete); what the objects mean
(versions, manifests, packs) is `shared/workspaces.py`'s. It is chosen by one setting,
`WORKSPACE_STORE`: unset, a directory under the state directory; `file:///path`, a directory
(which several machines can share through a network filesystem); `s3://bucket/prefix`,
S3-compatible storage (`WORKSPACE_S3_*` for its endpoint and credentials, never the `AWS_*`
variables, which may reach the agent for Bedrock).

S3 goes through `obstore` (Rust's `object_store` behind a small typed async API): one dependency
with no transitive ones, native asyncio, range reads, and a tested S3 client with retries.
"""

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store as S3Client

from shared.settings import Settings

if TYPE_CHECKING:  # TypedDicts of obstore's stubs only
    from obstore.store import ClientConfig, S3Config


class MissingObject(Exception):
    """The key names no object (never written, or deleted since)."""


class StoreUnavailable(OSError):
    """The store could not be reached, or refused the request (an `OSError`, as a local one's are)."""


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes) -> None:
        """Writes the whole object at once: a reader sees the old object or the new, never a part."""

    async def get(self, key: str) -> bytes: ...

    async def get_range(self, key: str, start: int, length: int) -> bytes: ...

    async def keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a `/`-terminated folder)."""

    async def delete(self, keys: list[str]) -> None:
        """Deletes the objects; keys that are already gone are no error."""


class LocalStore:
    """Objects as files under `root`, each written to a temporary name and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        return self.root / key  # keys are built by shared/workspaces.py from validated parts

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        partial.write_bytes(data)
        partial.replace(path)

    def _get(self, key: str, start: int = 0, length: int = -1) -> bytes:
        try:
            with self._path(key).open("rb") as file:
                file.seek(start)
                return file.read(length)
        except FileNotFoundError:
            raise MissingObject(key) from None

    def _keys(self, prefix: str) -> list[str]:
        # os.walk skips a folder deleted while it lists (another process's delete or sweep):
        # rglob raised FileNotFoundError for it (seen once in CI).
        return [
            str((Path(folder) / name).relative_to(self.root))
            for folder, _, names in os.walk(self._path(prefix))
            for name in names
            if not name.endswith(".partial")
        ]

    def _delete(self, keys: list[str]) -> None:
        folders = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        # Nothing of a deleted session stays behind, not even its empty folders.
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and folder.is_relative_to(self.root):
                with contextlib.suppress(OSError):
                    folder.rmdir()
                if folder.exists():
                    break
                folder = folder.parent

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._get, key)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        return await asyncio.to_thread(self._get, key, start, length)

    async def keys(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._keys, prefix)

    async def delete(self, keys: list[str]) -> None:
        await asyncio.to_thread(self._delete, keys)


_CLIENT_TIMEOUTS: "ClientConfig" = {"connect_timeout": "5s", "read_timeout": "15s", "timeout": "120s"}
_RETRY_WITHIN = timedelta(seconds=30)
"""A store that stops answering fails a request within about 45 s (15 s without a byte, retried
for 30 s): with obstore's defaults (10 retries within 3 minutes) a frozen server held each files
request and session turn for 181 s, the turn's worker slot and session with it, and an upload past
its session hold ended in a 500 (an outside probe). A whole request may take 120 s (a large pack)."""


class S3Store:
    """Objects in an S3 bucket (AWS or any S3-compatible server), under an optional prefix."""

    def __init__(self, url: str, settings: Settings) -> None:
        parts = urlsplit(url)
        endpoint = settings.workspace_s3_endpoint
        config: S3Config = {"region": settings.workspace_s3_region, "virtual_hosted_style_request": False}
        if endpoint is not None:
            config["endpoint"] = endpoint
        if (key_id := settings.workspace_s3_access_key_id) is not None:
            config["access_key_id"] = key_id.get_secret_value()
        if (secret := settings.workspace_s3_secret_access_key) is not None:
            config["secret_access_key"] = secret.get_secret_value()
        self._client = S3Client(
            parts.netloc,
            prefix=parts.path.strip("/") or None,
            config=config,
            client_options={
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
                **_CLIENT_TIMEOUTS,
            },
            retry_config={"max_retries": 3, "retry_timeout": _RETRY_WITHIN},
        )

    async def put(self, key: str, data: bytes) -> None:
        with _unavailable():
            await obstore.put_async(self._client, key, data)

    async def get(self, key: str) -> bytes:
        with _unavailable(key):
            result = await obstore.get_async(self._client, key)
            return bytes(await result.bytes_async())

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        if length == 0:
            return b""
        with _unavailable(key):
            return bytes(await obstore.get_range_async(self._client, key, start=start, length=length))

    async def keys(self, prefix: str) -> list[str]:
        keys = []
        with _unavailable():
            async for chunk in obstore.list(self._client, prefix):
                keys += [meta["path"] for meta in chunk]
        return keys

    async def delete(self, keys: list[str]) -> None:
        with _unavailable():
            for start in range(0, len(keys), 1000):  # S3's most keys per DeleteObjects
                await obstore.delete_async(self._client, keys[start : start + 1000])


@contextlib.contextmanager
def _unavailable(key: str | None = None) -> Iterator[None]:
    """obstore's errors as the store's: a missing `key`, or the store unavailable."""
    try:
        yield
    except FileNotFoundError:
        if key is None:
            raise StoreUnavailable("S3: not found") from None
        raise MissingObject(key) from None
    except BaseError as exc:
        raise StoreUnavailable(f"S3: {type(exc).__name__}") from exc


def store_name(settings: Settings) -> str:
    """Which store `open_store` opens, as an operator compares it between processes (the default
    is the machine's own: named with its host)."""
    if settings.workspace_store is not None:
        return settings.workspace_store
    return f"{(settings.state_dir / 'workspace-store').resolve()} on {socket.gethostname()} (the default)"


def file_store_folder(settings: Settings) -> Path | None:
    """The folder a `file://` `WORKSPACE_STORE` names (None for the default store, or S3)."""
    url = settings.workspace_store
    if url is None or urlsplit(url).scheme != "file":
        return None
    return Path(os.path.expanduser(urlsplit(url).path))


def open_store(settings: Settings) -> ObjectStore:
    """The store `WORKSPACE_STORE` names."""
    url = settings.workspace_store
    if url is None:
        root = settings.state_dir / "workspace-store"
        # Every session's files: for this user only (tightened for a folder an earlier version made).
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        root.chmod(0o700)
        return LocalStore(root)
    if (folder := file_store_folder(settings)) is not None:
        return LocalStore(folder)
    if urlsplit(url).scheme == "s3":
        return S3Store(url, settings)
    raise ValueError(f"WORKSPACE_STORE must be file:///path or s3://bucket/prefix, not {url!r}")
