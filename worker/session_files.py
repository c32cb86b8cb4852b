"""A worker's copies of session workspaces: restored before a turn, saved after it.

A session's turn runs in the session's own directory on this worker. If the worker does not hold
the session's current version (another worker ran the last turn, files were uploaded, or an
earlier turn here failed), the turn first makes the directory equal to that version: only the
files that differ are written (all of them into an empty directory). After a completed turn the
directory is saved as the next version, uploading only the files whose size, times or inode
changed since this worker last wrote or read them (`shared/workspaces.py` holds the format).

Nothing here follows a symbolic link: directories are opened one level at a time with
`O_NOFOLLOW`, links are saved as links (only those that stay inside the workspace) and restored
as links. The directories are kept between turns (up to `WORKSPACE_CACHE_SESSIONS`, least recently
used first out), so a session's next turn that lands here, which affinity makes the common case
(`shared/jobstore.py`), restores nothing.
"""

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import workspaces
from shared.jobs import CompletionJob, FailureCode
from shared.keys import session_key
from shared.settings import Settings
from shared.workspace_store import MissingObject, ObjectStore, open_store
from shared.workspaces import (
    FileEntry,
    InvalidPath,
    Manifest,
    VersionWriter,
    WorkspaceRef,
    check_limits,
    checked_path,
)
from worker.backends import BackendError

log = logging.getLogger("gateway.worker.files")

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW

Stamp = tuple[int, int, int, int]
"""What tells a file changed without reading it: size, mtime and ctime (ns), inode."""


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass
class Held:
    """A directory this worker holds, known to be exactly `manifest` (files as stamped)."""

    manifest: Manifest
    stamps: dict[str, Stamp] = field(default_factory=dict)


class _Tree:
    """Directory fds under a root, opened one name at a time without following links."""

    def __init__(self, root: Path) -> None:
        self.fds = {"": os.open(root, _DIR)}

    def dir(self, rel: str, create: bool = False) -> int:
        if (fd := self.fds.get(rel)) is not None:
            return fd
        parent, _, name = rel.rpartition("/")
        parent_fd = self.dir(parent, create)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent_fd)
        fd = self.fds[rel] = os.open(name, _DIR, dir_fd=parent_fd)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@contextlib.contextmanager
def _tree(root: Path) -> Iterator[_Tree]:
    tree = _Tree(root)
    try:
        yield tree
    finally:
        tree.close()


def scan(work: Path, held: Held, writer: VersionWriter, max_bytes: int, max_files: int) -> dict[str, Stamp]:
    """Fills `writer` with the directory's files and links; returns the files' stamps.

    Reads only files whose stamp changed. Stops with `WorkspaceTooLarge` as soon as a limit is
    passed. Names that are not valid paths (not UTF-8, control characters) are left out, and so
    are empty directories, fifos, sockets and devices.
    """
    stamps: dict[str, Stamp] = {}
    count = total = 0
    now = int(time.time())

    def visit(fd: int, prefix: str) -> None:
        nonlocal count, total
        with os.scandir(fd) as entries:
            for entry in entries:
                path = prefix + entry.name
                if path not in held.stamps:  # a file or folder new since the last save: check it
                    try:
                        checked_path(path)
                    except InvalidPath:
                        continue
                if entry.is_dir(follow_symlinks=False):
                    sub = os.open(entry.name, _DIR, dir_fd=fd)
                    try:
                        visit(sub, path + "/")
                    finally:
                        os.close(sub)
                elif entry.is_symlink():
                    target = os.readlink(entry.name, dir_fd=fd)
                    if workspaces.link_inside(path, target):
                        writer.links[path] = target
                        count += 1
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    count, total = count + 1, total + st.st_size
                    check_limits(count, total, max_bytes, max_files)
                    stamp = stamps[path] = _stamp(st)
                    executable = bool(st.st_mode & stat.S_IXUSR)
                    known = held.manifest.files.get(path)
                    if (
                        known is not None
                        and held.stamps.get(path) == stamp
                        and known.executable == executable
                    ):
                        writer.keep(path, known)
                        continue
                    with os.fdopen(os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as file:
                        data = file.read(max_bytes + 1)
                    writer.add(path, data, source="assistant", executable=executable, now=now)

    with _tree(work) as tree:
        visit(tree.fds[""], "")
    return stamps


def restore(work: Path, held: Held, target: Manifest, contents: dict[str, bytes]) -> Held:
    """Makes `work`, which holds `held`, hold `target`; `contents` has every file that differs."""
    stale = [path for path, entry in held.manifest.files.items() if _differs(entry, target.files.get(path))]
    stale += [path for path, link in held.manifest.links.items() if target.links.get(path) != link]
    stamps = {path: stamp for path, stamp in held.stamps.items() if path in target.files}
    with _tree(work) as tree:
        for path in stale:
            parent, _, name = path.rpartition("/")
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(name, dir_fd=tree.dir(parent))
            stamps.pop(path, None)
        _remove_empty_dirs(tree, stale)
        for path, data in contents.items():
            parent, _, name = path.rpartition("/")
            executable = target.files[path].executable
            fd = os.open(
                name, _NEW_FILE, 0o755 if executable else 0o644, dir_fd=tree.dir(parent, create=True)
            )
            try:
                view, written = memoryview(data), 0
                while written < len(data):
                    written += os.write(fd, view[written:])
                if executable:  # past the umask, as the agent had it
                    os.fchmod(fd, 0o755)
                stamps[path] = _stamp(os.fstat(fd))
            finally:
                os.close(fd)
        for path, link in target.links.items():
            if held.manifest.links.get(path) != link:
                parent, _, name = path.rpartition("/")
                os.symlink(link, name, dir_fd=tree.dir(parent, create=True))
    return Held(target, stamps)


def _differs(held: FileEntry, target: FileEntry | None) -> bool:
    return target is None or (held.sha256, held.executable) != (target.sha256, target.executable)


def _remove_empty_dirs(tree: _Tree, removed: list[str]) -> None:
    parents = {path.rpartition("/")[0] for path in removed}
    for parent in sorted(parents, key=len, reverse=True):
        while parent:
            above, _, name = parent.rpartition("/")
            try:
                os.rmdir(name, dir_fd=tree.dir(above))
            except OSError:
                break
            if (fd := tree.fds.pop(parent, None)) is not None:
                os.close(fd)
            parent = above


class SessionFiles:
    """The session directories of one worker, and their store."""

    def __init__(
        self, settings: Settings, redis: Redis, worker_id: str, store: ObjectStore | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.worker_id = worker_id
        self.store = store if store is not None else open_store(settings)
        self.root = settings.workspace_root.resolve() / "sessions" / worker_id
        self._held: OrderedDict[str, Held] = OrderedDict()
        self.background: set[asyncio.Task[None]] = set()
        self.enabled = settings.claude_cwd is None  # one shared directory for all jobs: nothing to keep

    def _directory(self, ref: WorkspaceRef) -> Path:
        return self.root / ref.member.replace("/", ".")

    @asynccontextmanager
    async def turn(self, job: CompletionJob) -> AsyncIterator["SessionTurn | None"]:
        """The session's directory holding its current version for the job's run, or None for a
        job without a session. Unless the turn is saved, the directory is not trusted again."""
        if job.session is None or not self.enabled:
            yield None
            return
        session = job.session
        ref = WorkspaceRef(session.owner, session.id, session.transcript_id)
        key = ref.member
        held = self._held.pop(key, None)  # in use: not held until saved
        work = self._directory(ref)
        try:
            held = await self._checkout(ref, work, held, session.workspace)
        except (OSError, MissingObject, ValueError) as exc:  # ValueError: a malformed manifest
            log.warning("could not restore workspace %s: %s", key, type(exc).__name__)
            await asyncio.to_thread(shutil.rmtree, work, True)
            raise BackendError(
                FailureCode.BACKEND_UNAVAILABLE, "The session's files could not be restored; retry later."
            ) from exc
        turn = SessionTurn(self, ref, work, held)
        try:
            yield turn
        finally:
            if turn.saved is not None:
                self._held[key] = turn.saved
                await self._evict()
            else:  # what the turn left is not the session's: the next turn here restores
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, work, True))

    async def _checkout(self, ref: WorkspaceRef, work: Path, held: Held | None, version: str | None) -> Held:
        if held is not None and held.manifest.version == version:
            return held
        if held is None:  # unknown contents: start from an empty directory
            await asyncio.to_thread(_emptied, work)
            held = Held(Manifest())
        target = await workspaces.load_manifest(self.store, ref, version)
        needed = {path: entry for path, entry in target.files.items() if _differs_held(held, path, entry)}
        contents = await workspaces.read_files(self.store, ref, needed)
        return await asyncio.to_thread(restore, work, held, target, contents)

    async def _evict(self) -> None:
        while len(self._held) > self.settings.workspace_cache_sessions:
            key, _ = self._held.popitem(last=False)
            await asyncio.to_thread(shutil.rmtree, self._directory(WorkspaceRef.of_member(key)), True)

    async def maintain(self) -> None:
        """Deletes expired sessions' workspaces from the store and from this worker, now and then."""
        interval = min(60.0, max(1.0, self.settings.session_ttl_s / 4))
        while True:
            try:
                await workspaces.sweep(self.store, self.redis, self.settings.session_ttl_s)
                await self._forget_ended()
            except Exception:  # a store or Redis outage: the next round tries again
                log.exception("workspace sweep failed; retrying")
            await asyncio.sleep(interval)

    async def _forget_ended(self) -> None:
        for key in list(self._held):
            ref = WorkspaceRef.of_member(key)
            transcript = await self.redis.hget(session_key(ref.owner, ref.session), "transcript")  # type: ignore[misc]
            if transcript is None or transcript.decode() != ref.incarnation:
                self._held.pop(key, None)
                await asyncio.to_thread(shutil.rmtree, self._directory(ref), True)

    async def close(self) -> None:
        """This worker's copies are only a cache: gone with the process."""
        self._held.clear()
        await asyncio.to_thread(shutil.rmtree, self.root, True)


def _emptied(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, mode=0o700)


def _differs_held(held: Held, path: str, entry: FileEntry) -> bool:
    known = held.manifest.files.get(path)
    return known is None or _differs(known, entry)


class SessionTurn:
    """One turn's use of a session directory: `work` to run in, `save()` after a completed run."""

    def __init__(self, files: SessionFiles, ref: WorkspaceRef, work: Path, held: Held) -> None:
        self._files = files
        self.holder = files.worker_id
        self.ref = ref
        self.work = work
        self._held = held
        self.saved: Held | None = None

    async def save(self) -> str | None:
        """Saves the directory as the next version; returns it, or None if nothing changed.

        The version is not the session's until the turn commits (`sessions.commit`). Raises
        `BackendError` over the workspace limits (nothing is saved) or when the store fails.
        """
        files, held = self._files, self._held
        limits = (files.settings.workspace_max_bytes, files.settings.workspace_max_files)
        writer = VersionWriter(held.manifest)
        try:
            stamps = await asyncio.to_thread(scan, self.work, held, writer, *limits)
            if not writer.changed():
                self.saved = Held(held.manifest, stamps)
                return None
            if writer.manifest().needs_compaction():  # rare: rewrite it all as one pack
                writer = VersionWriter(held.manifest, compact=True)
                stamps = await asyncio.to_thread(scan, self.work, Held(Manifest()), writer, *limits)
            await workspaces.track(files.redis, self.ref, files.settings.session_ttl_s)
            manifest = await writer.write(files.store, self.ref)
        except workspaces.WorkspaceTooLarge as exc:
            raise BackendError(FailureCode.WORKSPACE_TOO_LARGE, str(exc)) from exc
        except (OSError, RedisError) as exc:
            log.warning("could not save workspace %s: %s", self.ref.member, type(exc).__name__)
            raise BackendError(
                FailureCode.BACKEND_UNAVAILABLE, "The session's files could not be saved; retry later."
            ) from exc
        self.saved = Held(manifest, stamps)
        return manifest.version

    def collect_garbage(self) -> None:
        """After the commit, in the background: older versions of the session go (best effort)."""
        if self.saved is None:
            return

        async def collect(manifest: Manifest) -> None:
            with contextlib.suppress(OSError):
                await workspaces.collect_garbage(self._files.store, self.ref, manifest)

        task = asyncio.create_task(collect(self.saved.manifest))
        self._files.background.add(task)
        task.add_done_callback(self._files.background.discard)
