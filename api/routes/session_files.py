"""`/v1/sessions/{id}/files`: a session's workspace files in and out, in the shape of OpenAI's
container files API (upload, list, retrieve, `/content`, delete), plus the whole workspace as one
`tar.gz` (`/v1/sessions/{id}/archive`).

Scoped to the caller's key like every session route: another key's session does not exist
(404). Reads see the session's current version; an upload or a delete makes a new version,
taking the session like a request does (409 `session_busy` while a turn runs). An upload to a
session that does not exist yet creates it, empty, so files can be given before the first turn.
"""

import asyncio
import logging
import posixpath
import tarfile
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from api.access import stored_ledger
from api.core.sessions import invalid_session_id, session_not_found
from api.deps import CallerDep, GatewayDep
from api.errors import NO_RETRY, ErrorResponse, OpenAIError
from shared import sessions, workspaces
from shared.jobs import FailureCode
from shared.keys import is_session_id
from shared.settings import Settings
from shared.workspace_store import MissingObject, ObjectStore, open_store, store_name
from shared.workspaces import FileEntry, Manifest, VersionWriter, WorkspaceRef

log = logging.getLogger("gateway.api")
router = APIRouter()
_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413)
}
_UPLOAD_HOLD_S = 60.0
"""How long an upload may hold its session (bounds a lost API process)."""


class SessionFile(BaseModel):
    id: str
    object: Literal["container.file"] = "container.file"
    container_id: str
    created_at: int
    bytes: int
    path: str
    source: str


class SessionFileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionFile]
    first_id: str | None
    last_id: str | None
    has_more: bool


class SessionFileDeleted(BaseModel):
    id: str
    object: Literal["container.file.deleted"] = "container.file.deleted"
    deleted: bool = True


async def _store(request: Request, gateway: GatewayDep) -> AsyncIterator[ObjectStore]:
    """The workspace store; a route that cannot reach it answers 503."""
    store: ObjectStore | None = getattr(request.app.state, "workspace_store", None)
    if store is None:
        store = request.app.state.workspace_store = open_store(gateway.settings)
    try:
        yield store
    except OSError as exc:
        log.warning("workspace store unavailable: %s", type(exc).__name__)
        raise OpenAIError(
            503,
            "The session's files are unavailable right now; retry shortly.",
            type="server_error",
            code="workspace_store_unavailable",
        ) from None


StoreDep = Annotated[ObjectStore, Depends(_store)]


def _file_not_found(file_id: str) -> OpenAIError:
    return OpenAIError.not_found(f"No file '{file_id}' found.", param="file_id", code="file_not_found")


def _file(session_id: str, path: str, entry: FileEntry) -> SessionFile:
    return SessionFile(
        id=workspaces.file_id(path),
        container_id=session_id,
        created_at=entry.created_at,
        bytes=entry.bytes,
        path=path,
        source=entry.source,
    )


async def _current(
    gateway: GatewayDep, caller: CallerDep, store: ObjectStore, session_id: str
) -> tuple[WorkspaceRef, Manifest]:
    """The caller's session's workspace as it stands now (404 if the caller has no such session)."""
    if not is_session_id(session_id):
        raise invalid_session_id()
    owner = sessions.owner_of(caller.key_id)
    found = await sessions.get(gateway.redis, owner, session_id, gateway.settings.session_ttl_s)
    if found is None:
        raise session_not_found(session_id)
    session = found[0]
    ref = WorkspaceRef(owner, session_id, session.transcript_id)
    try:
        return ref, await workspaces.load_manifest(store, ref, session.workspace)
    except MissingObject:
        now = await sessions.get(gateway.redis, owner, session_id, gateway.settings.session_ttl_s)
        if now is not None and now[0].workspace != session.workspace:  # collected after a newer one
            raise _changed() from None
        raise _not_in_store(gateway.settings) from None


async def _manifest(
    settings: Settings, store: ObjectStore, ref: WorkspaceRef, version: str | None
) -> Manifest:
    """The version the session holds while this request holds the session: no newer one can
    replace it meanwhile, so one missing is not in this store."""
    try:
        return await workspaces.load_manifest(store, ref, version)
    except MissingObject:
        raise _not_in_store(settings) from None


def _not_in_store(settings: Settings) -> OpenAIError:
    """The session's version is in another store than this process's: a process configured with
    its own (an outside probe's clients were told to retry a 409 for good)."""
    log.error(
        "a session's files are not in this API process's workspace store (%s): every API and "
        "worker process must use the same WORKSPACE_STORE (docs/sessions.md)",
        store_name(settings),
    )
    return OpenAIError(
        503,
        "The session's files are not in the gateway's workspace store; its operator must give every "
        "process the same store.",
        type="server_error",
        code=FailureCode.WORKSPACE_UNAVAILABLE.value,
        headers=NO_RETRY,
    )


def _changed() -> OpenAIError:
    return OpenAIError(
        409,
        "The session's files changed while they were read; retry.",
        type="invalid_request_error",
        code="workspace_changed",
    )


def _find(manifest: Manifest, file_id: str) -> tuple[str, FileEntry]:
    for path, entry in manifest.files.items():
        if workspaces.file_id(path) == file_id:
            return path, entry
    raise _file_not_found(file_id)


@router.get("/v1/sessions/{session_id}/files", response_model=SessionFileList, responses=_ERRORS)
async def list_files(
    session_id: str,
    gateway: GatewayDep,
    caller: CallerDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> SessionFileList:
    _, manifest = await _current(gateway, caller, store, session_id)
    files = sorted(
        (_file(session_id, path, entry) for path, entry in manifest.files.items()),
        key=lambda file: (file.created_at, file.path),
        reverse=order == "desc",
    )
    if after is not None:
        ids = [file.id for file in files]
        files = files[ids.index(after) + 1 :] if after in ids else []
    page = files[:limit]
    return SessionFileList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(files) > limit,
    )


@router.get("/v1/sessions/{session_id}/files/{file_id}", response_model=SessionFile, responses=_ERRORS)
async def get_file(
    session_id: str, file_id: str, gateway: GatewayDep, caller: CallerDep, store: StoreDep
) -> SessionFile:
    _, manifest = await _current(gateway, caller, store, session_id)
    return _file(session_id, *_find(manifest, file_id))


def _binary(media_type: str) -> dict[int | str, dict[str, object]]:
    content = {media_type: {"schema": {"type": "string", "format": "binary"}}}
    return {200: {"content": content, "description": "The bytes"}, **_ERRORS}


@router.get(
    "/v1/sessions/{session_id}/files/{file_id}/content",
    response_class=Response,
    responses=_binary("application/octet-stream"),
)
async def get_file_content(
    session_id: str, file_id: str, gateway: GatewayDep, caller: CallerDep, store: StoreDep
) -> Response:
    ref, manifest = await _current(gateway, caller, store, session_id)
    path, entry = _find(manifest, file_id)
    body = await _started(part async for _, _, part in workspaces.stream_files(store, ref, {path: entry}))
    name = quote(posixpath.basename(path))
    headers = {
        "content-disposition": f"attachment; filename*=UTF-8''{name}",
        "content-length": str(entry.bytes),
    }
    return StreamingResponse(body, media_type="application/octet-stream", headers=headers)


@router.get(
    "/v1/sessions/{session_id}/archive",
    response_class=StreamingResponse,
    responses=_binary("application/gzip"),
)
async def get_archive(session_id: str, gateway: GatewayDep, caller: CallerDep, store: StoreDep) -> Response:
    """The whole workspace as a `tar.gz`: its files (with their executable bit) and its links."""
    ref, manifest = await _current(gateway, caller, store, session_id)
    body = await _started(_tar_gz(workspaces.stream_files(store, ref, manifest.files), manifest))
    headers = {"content-disposition": f"attachment; filename*=UTF-8''{quote(session_id)}.tar.gz"}
    return StreamingResponse(body, media_type="application/gzip", headers=headers)


async def _started(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`body` once its first part is read: a version collected meanwhile is a 409, not a cut
    response (a collection later in a long download cuts it)."""
    try:
        first = await anext(body)
    except MissingObject:
        raise _changed() from None
    except StopAsyncIteration:
        first = b""

    async def rest() -> AsyncIterator[bytes]:
        yield first
        async for part in body:
            yield part

    return rest()


async def _tar_gz(
    files: AsyncIterator[tuple[str, FileEntry, bytes]], manifest: Manifest
) -> AsyncIterator[bytes]:
    """A `tar.gz` of the files as they stream in, then the manifest's links and empty folders;
    compressed in a thread (the event loop serves other requests meanwhile) every 256 KiB, so
    many small files cost few thread hand-offs."""
    gzip = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    batch: list[bytes] = []
    batched = 0
    previous: FileEntry | None = None
    current: str | None = None
    async for path, entry, part in files:
        if path != current:  # a file's first part
            if previous is not None:
                batch.append(_padding(previous.bytes))
            batch.append(_header(path, entry))
            previous, current = entry, path
        batch.append(part)
        batched += len(part) + tarfile.BLOCKSIZE
        if batched >= 256 << 10:
            if out := await asyncio.to_thread(gzip.compress, b"".join(batch)):
                yield out
            batch, batched = [], 0
    if previous is not None:
        batch.append(_padding(previous.bytes))
    for path, target in sorted(manifest.links.items()):
        info = tarfile.TarInfo(path)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        batch.append(info.tobuf(tarfile.PAX_FORMAT))
    for path in manifest.folders:
        info = tarfile.TarInfo(path)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        batch.append(info.tobuf(tarfile.PAX_FORMAT))
    batch.append(bytes(2 * tarfile.BLOCKSIZE))  # the end of the archive
    yield await asyncio.to_thread(gzip.compress, b"".join(batch)) + gzip.flush()


def _header(path: str, entry: FileEntry) -> bytes:
    info = tarfile.TarInfo(path)
    info.size, info.mtime, info.mode = entry.bytes, entry.created_at, 0o755 if entry.executable else 0o644
    return info.tobuf(tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


class _NewVersion:
    """Takes the session as a request does, to make a new version of its workspace outside a turn."""

    def __init__(
        self, request: Request, gateway: GatewayDep, caller: CallerDep, store: ObjectStore, session_id: str
    ) -> None:
        if not is_session_id(session_id):
            raise invalid_session_id()
        self.gateway, self.store, self.session_id = gateway, store, session_id
        self.ledger = stored_ledger(gateway, request)  # the session counts in it
        self.owner = sessions.owner_of(caller.key_id)
        self.holder = f"files-{uuid.uuid4().hex}"

    async def __aenter__(self) -> "_NewVersion":
        redis = self.gateway.redis
        if not await sessions.lock(redis, self.owner, self.session_id, self.holder, _UPLOAD_HOLD_S):
            raise OpenAIError(
                409,
                f"Session '{self.session_id}' is busy with a request; retry when it has finished.",
                type="invalid_request_error",
                param="session_id",
                code="session_busy",
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await sessions.release(self.gateway.redis, self.owner, self.session_id, self.holder)

    async def session(self, *, create: bool) -> tuple[WorkspaceRef, Manifest]:
        ttl_s = self.gateway.settings.session_ttl_s
        found = await sessions.get(self.gateway.redis, self.owner, self.session_id, ttl_s)
        if found is None and not create:
            raise session_not_found(self.session_id)
        transcript, version = (found[0].transcript_id, found[0].workspace) if found else (None, None)
        self.transcript_id = transcript or sessions.new_transcript_id()
        ref = WorkspaceRef(self.owner, self.session_id, self.transcript_id)
        return ref, await _manifest(self.gateway.settings, self.store, ref, version)

    async def commit(self, ref: WorkspaceRef, writer: VersionWriter) -> Manifest:
        settings, redis = self.gateway.settings, self.gateway.redis
        manifest = writer.manifest()
        try:
            writer.check_limits(settings.workspace_max_bytes, settings.workspace_max_files)
            share = settings.workspace_max_bytes_per_key
            await sessions.check_key_share(redis, self.owner, self.session_id, manifest, writer.parent, share)
        except workspaces.WorkspaceTooLarge as exc:
            raise OpenAIError(
                413, str(exc), type="invalid_request_error", code="workspace_too_large"
            ) from None
        await workspaces.track(redis, ref, settings.session_ttl_s)
        await writer.write(self.store, ref, manifest)
        assert manifest.version is not None
        try:
            await sessions.set_workspace(
                redis,
                self.owner,
                self.session_id,
                self.holder,
                self.transcript_id,
                manifest,
                settings.session_ttl_s,
                self.ledger,
            )
        except sessions.SessionLost:  # its hold ran out while the store was slow (an outside probe: a 500)
            raise OpenAIError(
                409,
                f"Session '{self.session_id}' changed while the files were stored (the store was slow, "
                "and another request took the session or deleted it); nothing was changed: retry.",
                type="invalid_request_error",
                param="session_id",
                code="session_busy",
            ) from None
        await workspaces.collect_garbage(self.store, ref, manifest)
        return manifest


def _without(manifest: Manifest, path: str) -> VersionWriter:
    """The next version: `manifest` without the file at `path`."""
    writer = VersionWriter(manifest)
    writer.remove(path)
    return writer


def _upload_path(path: str | None, file: UploadFile) -> str:
    # The file name is the path, folders and all: cut to its last name, `src/main.py` and
    # `tests/main.py` both went to `main.py`, the second replacing the first (an outside probe).
    name = path if path is not None else file.filename or ""
    try:
        return workspaces.checked_path(name)
    except workspaces.InvalidPath:
        raise OpenAIError.invalid(
            "A file's path is relative to the workspace: '/'-separated names, none of them empty, "
            "'.' or '..', no control characters, at most 1024 bytes, each name at most 255.",
            param="path",
            code="invalid_path",
        ) from None


def _conflict(manifest: Manifest, path: str) -> str | None:
    """What stands where `path`'s file would go: a file or link in place of one of its folders,
    or a folder in its place (one holding only empty folders too: an outside probe's upload there
    was taken, and every later turn failed to restore the session)."""
    parts = path.split("/")
    for depth in range(1, len(parts)):
        folder = "/".join(parts[:depth])
        if folder in manifest.files or folder in manifest.links:
            return folder
    inside = path + "/"
    if (
        path in manifest.links
        or path in manifest.folders
        or any(other.startswith(inside) for other in (*manifest.files, *manifest.links, *manifest.folders))
    ):
        return path
    return None


@router.post("/v1/sessions/{session_id}/files", response_model=SessionFile, responses=_ERRORS)
async def upload_file(
    session_id: str,
    gateway: GatewayDep,
    caller: CallerDep,
    store: StoreDep,
    request: Request,
    file: Annotated[UploadFile, File()],
    path: Annotated[str | None, Form()] = None,
) -> SessionFile:
    """Puts `file` into the workspace at `path` (an extension; default: the upload's file name),
    replacing a file there."""
    form = await request.form()  # read already, for `file` and `path`
    for field in ("file", "path"):  # else the last would be taken and the others dropped unsaid
        if len(form.getlist(field)) > 1:
            message = f"An upload holds one '{field}': send each file in a request of its own."
            raise OpenAIError.invalid(message, param=field, code="too_many_parts")
    target = _upload_path(path, file)
    data = await file.read()
    async with _NewVersion(request, gateway, caller, store, session_id) as change:
        ref, manifest = await change.session(create=True)
        if (taken := _conflict(manifest, target)) is not None:
            raise OpenAIError.invalid(
                f"'{target}' cannot be written: '{taken}' is in the way.", param="path", code="path_conflict"
            )
        writer = VersionWriter(manifest)
        writer.add(target, data, source="user", executable=False, now=int(time.time()))
        saved = await change.commit(ref, writer)
    return _file(session_id, target, saved.files[target])


@router.delete(
    "/v1/sessions/{session_id}/files/{file_id}", response_model=SessionFileDeleted, responses=_ERRORS
)
async def delete_file(
    session_id: str, file_id: str, request: Request, gateway: GatewayDep, caller: CallerDep, store: StoreDep
) -> SessionFileDeleted:
    async with _NewVersion(request, gateway, caller, store, session_id) as change:
        ref, manifest = await change.session(create=False)
        path, _ = _find(manifest, file_id)
        await change.commit(ref, _without(manifest, path))
    return SessionFileDeleted(id=file_id)
