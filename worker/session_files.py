"""A worker's copies of session workspaces: restored before a turn, saved after it.

A session's turn runs in the session's own directory on this worker. If the worker does not hold
the session's current version (another worker ran the last turn, files were uploaded, or an
earlier turn here failed), the turn first makes the directory equal to that version: only the
files that differ are written (all of them into an empty directory). After a completed turn the
directory is saved as the next version, uploading only the files whose size, times or inode
changed since this worker last wrote or read them (`shared/workspaces.py` holds the format). The
save looks only at the names inotify reported changed (`worker/workspace_changes.py`), or at
every file where inotify may have missed one.

Nothing here follows a symbolic link: directories are opened one level at a time with
`O_NOFOLLOW`, links are saved as links (only those that stay inside the workspace) and restored
as links. The directories are kept between turns (up to `WORKSPACE_CACHE_SESSIONS`, least recently
used first out), so a session's next turn that lands here, which affinity makes the common case
(`shared/jobstore.py`), restores nothing.
"""

import asyncio
import contextlib
import errno
import functools
import logging
import os
import stat
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import sessions, workspaces
from shared.jobs import CompletionJob, FailureCode
from shared.keys import session_key
from shared.settings import Settings
from shared.workspace_store import MissingObject, ObjectStore, open_store
from shared.workspaces import (
    Contents,
    FileEntry,
    InvalidPath,
    Manifest,
    VersionWriter,
    WorkspaceRef,
    check_limits,
    checked_path,
)
from worker.backends import BackendError
from worker.workspace import mark_owned, remove_abandoned, removed, unmark

if TYPE_CHECKING:
    from worker.workspace_changes import Changes, ChangeTracker

log = logging.getLogger("gateway.worker.files")

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# O_NONBLOCK: an open never waits (on a named pipe the agent left, it would wait for a reader
# forever); it changes nothing for a regular file.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
_READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK

Stamp = tuple[int, int, int, int]
"""What tells a file changed without reading it: size, mtime and ctime (ns), inode."""


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass
class Held:
    """A directory this worker holds, known to be exactly `manifest` (files as stamped)."""

    manifest: Manifest
    stamps: dict[str, Stamp] = field(default_factory=dict)
    linked: set[str] = field(default_factory=set)
    """Files with more than one hard link: a write through another name changes them unreported."""


Seen = tuple[dict[str, Stamp], set[str]]
"""The stamps of a directory's files, and which of them have several hard links."""

Watch = Callable[[str, int], None]
"""Watches a folder (its path, an fd of it) for changes until the next save."""


def _open(name: str | Path, flags: int, dir_fd: int | None = None) -> int:
    """`os.open`, but a file or folder the agent made unreadable (`chmod 000`), as the owner of
    everything in the workspace may, is made readable (folders: writable) to its owner first: a
    version keeps no other bit of a mode than a file's executable bit anyway."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            mode = os.fstat(handle).st_mode
            needed = stat.S_IRWXU if stat.S_ISDIR(mode) else stat.S_IRUSR
            os.chmod(f"/proc/self/fd/{handle}", stat.S_IMODE(mode) | needed)  # the very file opened
        finally:
            os.close(handle)
        fd = os.open(name, flags, dir_fd=dir_fd)
    if flags & os.O_DIRECTORY and (mode := os.fstat(fd).st_mode) & stat.S_IRWXU != stat.S_IRWXU:
        os.fchmod(fd, stat.S_IMODE(mode) | stat.S_IRWXU)  # its names could be listed, not opened
    return fd


class _Tree:
    """Directory fds under a root, opened one name at a time without following links. Only the
    most recently used `_OPEN_FOLDERS` stay open (a session may hold 20,000 folders, and a worker
    was refused its 1,025th open file: an outside probe's session of 1,200 folders could not be
    saved nor restored): an fd `dir` returns is good until its next call."""

    def __init__(self, root: Path, opened: Watch | None = None) -> None:
        self.root = _open(root, _DIR)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._opened = opened  # told of each folder as it is opened
        if opened is not None:
            opened("", self.root)

    def dir(self, rel: str, create: bool = False) -> int:
        if not rel:
            return self.root
        if (fd := self._fds.get(rel)) is not None:
            self._fds.move_to_end(rel)
            return fd
        parent, _, name = rel.rpartition("/")
        parent_fd = self.dir(parent, create)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent_fd)
        fd = self._fds[rel] = _open(name, _DIR, parent_fd)
        if self._opened is not None:
            self._opened(rel, fd)
        if len(self._fds) > _OPEN_FOLDERS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def forget(self, rel: str) -> None:
        """`rel` is gone."""
        if (fd := self._fds.pop(rel, None)) is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in (self.root, *self._fds.values()):
            os.close(fd)


_OPEN_FOLDERS = 256


@contextlib.contextmanager
def _tree(root: Path, opened: Watch | None = None) -> Iterator[_Tree]:
    tree = _Tree(root, opened)
    try:
        yield tree
    finally:
        tree.close()


def _remove_unsaved(fd: int, name: str, work: Path) -> None:
    """Removes what the save leaves out (`name` in the folder open at `fd`, in `work`), and all it
    holds: it would stay in the worker's copy of the workspace for the session's next turns there,
    outside the limits (an outside probe kept 151 MiB past the 100 MiB, in each of up to 64
    sessions per worker), and in no other copy. A folder is moved out of the workspace first, by
    descriptors (no link on the way is followed), then removed where no name is the agent's, at
    any depth and with folders the agent made read-only (`removed`). Raises `OSError` if it stays
    (the save fails)."""
    try:
        if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=fd)
            return
        os.close(_open(name, _DIR, fd))  # writable to its owner: a folder's move rewrites its `..`
    except FileNotFoundError:
        return
    apart = work.with_name(f"{work.name}.unsaved-{uuid.uuid4().hex[:8]}")
    parent = os.open(work.parent, _DIR)
    try:
        os.rename(name, apart.name, src_dir_fd=fd, dst_dir_fd=parent)
    finally:
        os.close(parent)
    removed(apart)
    if os.path.lexists(apart):
        raise OSError(errno.ENOTEMPTY, "what the save leaves out could not be removed")


def _valid(path: str) -> bool:
    """Whether a name found in the directory is kept (`checked_path`)."""
    try:
        checked_path(path)
    except InvalidPath:
        return False
    return True


class _Scan:
    """Brings a `VersionWriter` (started as the held version) up to what is in the directory.

    Reads only files whose stamp changed. Stops with `WorkspaceTooLarge` once a limit is passed.
    Names that are not valid paths (not UTF-8, control characters) are left out, and so are fifos,
    sockets and devices; a folder that holds none of the rest is kept as an empty folder. What is
    left out is removed (`_remove_unsaved`).
    """

    def __init__(
        self, work: Path, held: Held, writer: VersionWriter, max_bytes: int, max_files: int, *, whole: bool
    ) -> None:
        """`whole`: every file will be looked at (else only those changed)."""
        self.work, self.held, self.writer = work, held, writer
        self.max_bytes, self.max_files = max_bytes, max_files
        self.stamps = {} if whole else dict(held.stamps)
        self.linked = set() if whole else set(held.linked)
        self.relinked: set[int] = set()
        """Inodes of files found with several hard links that had one at the last save."""
        self.now = int(time.time())

    def folder(self, fd: int, prefix: str, watch: Watch | None) -> tuple[int, int]:
        """Everything under the folder open at `fd` (`prefix`: its path and a `/`, or "");
        returns how many files, links and folders it holds, and their bytes."""
        if watch is not None:
            watch(prefix.rstrip("/"), fd)
        count = total = kept = 0
        with os.scandir(fd) as entries:
            for entry in entries:
                path = prefix + entry.name
                if path not in self.held.stamps and not _valid(path):  # new since the last save
                    _remove_unsaved(fd, entry.name, self.work)
                    continue
                if entry.is_dir(follow_symlinks=False):
                    sub = _open(entry.name, _DIR, fd)
                    try:
                        more, size = self.folder(sub, path + "/", watch)
                    finally:
                        os.close(sub)
                    more += 1  # the folder itself: each one a watch here, and made by every restore
                elif entry.is_symlink():
                    more, size = self.link(fd, entry.name, path), 0
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    more, size = 1, st.st_size
                    check_limits(1, st.st_size, self.max_bytes, self.max_files)
                    self.file(fd, entry.name, path, st)
                else:
                    _remove_unsaved(fd, entry.name, self.work)
                    continue
                count, total = count + more, total + size
                kept += 1 if entry.is_dir(follow_symlinks=False) else more  # a folder in it is kept
                check_limits(count, total, self.max_bytes, self.max_files)
        if prefix and not kept:
            self.writer.folders.add(prefix[:-1])
        return count, total

    def link(self, fd: int, name: str, path: str) -> int:
        target = os.readlink(name, dir_fd=fd)
        self.forget(path)
        if not workspaces.link_inside(path, {path: target}):
            return 0
        self.writer.links[path] = target
        return 1

    def file(self, fd: int, name: str, path: str, st: os.stat_result) -> None:
        stamp = self.stamps[path] = _stamp(st)
        if st.st_nlink > 1:
            if path not in self.held.linked:
                self.relinked.add(st.st_ino)
            self.linked.add(path)
        else:
            self.linked.discard(path)
        executable = bool(st.st_mode & stat.S_IXUSR)
        known = self.held.manifest.files.get(path)
        if known is not None and self.held.stamps.get(path) == stamp and known.executable == executable:
            self.writer.keep(path)
            return
        with os.fdopen(_open(name, _READ_FILE, fd), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):  # replaced since it was listed
                self.forget(path)
                return
            # As much as the stat said (a read of the limit's size allocates it whole, each time),
            # then the rest if it grew since, up to just past the limit.
            data = file.read(min(st.st_size, self.max_bytes) + 1)
            if len(data) > st.st_size:
                data += file.read(self.max_bytes + 1 - len(data))
        check_limits(1, len(data), self.max_bytes, self.max_files)
        self.writer.add(path, data, source="assistant", executable=executable, now=self.now)
        check_limits(1, self.writer.new_bytes, self.max_bytes, self.max_files)

    def forget(self, path: str) -> None:
        self.writer.remove(path)
        self.stamps.pop(path, None)
        self.linked.discard(path)

    def forget_under(self, folders: Iterable[str]) -> None:
        """Forgets the folders and everything in them."""
        folders = set(folders)
        prefixes = tuple(folder + "/" for folder in folders)
        if prefixes:
            for path in [*filter(lambda p: p.startswith(prefixes), (*self.writer.files, *self.writer.links))]:
                self.forget(path)
            self.writer.folders = {
                folder
                for folder in self.writer.folders
                if folder not in folders and not folder.startswith(prefixes)
            }

    def empty(self, tree: _Tree, folder: str) -> None:
        """Notes whether `folder` is now an empty folder, from what is in it."""
        self.writer.folders.discard(folder)
        try:
            fd = tree.dir(folder)
        except OSError:  # gone, or a link
            return
        with os.scandir(fd) as entries:
            for entry in entries:
                path = f"{folder}/{entry.name}"
                if not _valid(path):
                    continue
                if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
                    return
                if entry.is_symlink() and workspaces.link_inside(
                    path, {path: os.readlink(entry.name, dir_fd=fd)}
                ):
                    return
        self.writer.folders.add(folder)

    def result(self) -> Seen:
        return self.stamps, self.linked


def scan(
    work: Path, held: Held, writer: VersionWriter, max_bytes: int, max_files: int, watch: Watch | None = None
) -> Seen:
    """Fills `writer` with every file and link in the directory; `watch`es every folder."""
    walk = _Scan(work, held, writer, max_bytes, max_files, whole=True)
    writer.links.clear()
    writer.folders.clear()
    with _tree(work) as tree:
        walk.folder(tree.root, "", watch)
    for path in [path for path in writer.files if path not in walk.stamps]:
        writer.remove(path)
    return walk.result()


def update(
    work: Path,
    held: Held,
    changes: "Changes",
    writer: VersionWriter,
    max_bytes: int,
    max_files: int,
    watch: Watch,
) -> Seen:
    """Brings `writer` up to the directory where `changes` say it may differ from `held`."""
    walk = _Scan(work, held, writer, max_bytes, max_files, whole=False)
    new = sorted(filter(_valid, changes.folders))
    walk.forget_under((*changes.gone, *new))
    inside_new = tuple(f"{folder}/" for folder in new)
    looked: set[str] = set()
    visited: set[str] = set()
    with _tree(work) as tree:

        def left_out(path: str) -> None:
            """Removes the outermost folder or file on `path` whose path is not valid."""
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):
                if not _valid(outer := "/".join(parts[:depth])):
                    parent, _, name = outer.rpartition("/")
                    try:
                        fd = tree.dir(parent)
                    except OSError:  # gone since, or a link now: nothing of the workspace's there
                        return
                    _remove_unsaved(fd, name, work)
                    return

        def look(path: str) -> None:
            nonlocal inside_new
            if path in looked or path.startswith(inside_new):
                return  # looked at already, or found again with its folder
            looked.add(path)
            if not _valid(path):
                left_out(path)
                return
            parent, _, name = path.rpartition("/")
            try:
                fd = tree.dir(parent)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                walk.forget(path)
                return
            except OSError as exc:
                if exc.errno != errno.ELOOP:  # a folder on the way is now a link: not followed
                    raise
                walk.forget(path)
                return
            if stat.S_ISREG(st.st_mode):
                walk.file(fd, name, path, st)
            elif stat.S_ISLNK(st.st_mode):
                walk.link(fd, name, path)
            elif stat.S_ISDIR(st.st_mode):  # its mode or times changed, or it replaced a file
                walk.forget(path)
                walk.forget_under([path])
                new.append(path)
                inside_new += (f"{path}/",)
            else:
                walk.forget(path)
                _remove_unsaved(fd, name, work)

        def find_new_folders() -> None:
            for folder in new:
                if folder in visited or folder.startswith(inside_new):
                    continue  # found already, or with the folder above it
                visited.add(folder)
                try:
                    fd = tree.dir(folder)
                except OSError:  # gone since, or a link: not followed
                    continue
                walk.folder(fd, folder + "/", watch)

        for folder in changes.folders:
            if not _valid(folder):
                left_out(folder)
        for path in sorted(changes.paths | held.linked):
            look(path)
        find_new_folders()
        if walk.relinked:  # a file gained a hard link: a write through one name reports only that one
            for path in [path for path, was in walk.stamps.items() if was[3] in walk.relinked]:
                look(path)
            find_new_folders()
        for folder in {path.rpartition("/")[0] for path in (*looked, *changes.gone, *new)} - {""}:
            walk.empty(tree, folder)  # something came or went in it
    writer.check_limits(max_bytes, max_files)
    return walk.result()


def restore(
    work: Path, held: Held, target: Manifest, contents: dict[str, Contents], watch: Watch | None = None
) -> Held:
    """Makes `work`, which holds `held`, hold `target`; `contents` has every file that differs.
    `watch`es the folders it made (those it did not were watched before)."""
    stale = [path for path, entry in held.manifest.files.items() if _differs(entry, target.files.get(path))]
    stale += [path for path, link in held.manifest.links.items() if target.links.get(path) != link]
    stamps = {path: stamp for path, stamp in held.stamps.items() if path in target.files}
    with _tree(work, watch) as tree:
        for path in stale:
            parent, _, name = path.rpartition("/")
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(name, dir_fd=tree.dir(parent))
            stamps.pop(path, None)
        gone_folders = [f"{folder}/" for folder in held.manifest.folders if folder not in target.folders]
        _remove_empty_dirs(tree, stale + gone_folders)  # (a folder's own path ends in "/")
        for path, data in contents.items():
            parent, _, name = path.rpartition("/")
            executable = target.files[path].executable
            fd = _new_file(name, 0o755 if executable else 0o644, tree.dir(parent, create=True))
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
        for folder in target.folders:
            tree.dir(folder, create=True)
    return Held(target, stamps, held.linked.intersection(stamps).difference(contents))


def _new_file(name: str, mode: int, dir_fd: int) -> int:
    """`name` in `dir_fd`, opened to be written afresh as a regular file: whatever else the agent
    left there that the save did not keep (a named pipe, a socket) is removed first."""
    try:
        fd = os.open(name, _NEW_FILE, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # a pipe without a reader, or a socket
            raise
    else:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)  # a pipe someone reads
    os.unlink(name, dir_fd=dir_fd)
    return os.open(name, _NEW_FILE | os.O_EXCL, mode, dir_fd=dir_fd)


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
            tree.forget(parent)
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
        self.changes: ChangeTracker | None = None
        if self.enabled:
            # The copies of workers that died on this machine (killed, they could not remove them):
            # their sessions may have been deleted since, and nothing else would remove them.
            if abandoned := remove_abandoned(self.root.parent):
                log.info("removed the session copies of %d workers that died on this machine", abandoned)
            # The job's user (`CLAUDE_JOB_USER`) must pass through to its session's folder (made its
            # own, 0700, by `job_workspace`), though not list the others; else none but this user.
            self.root.mkdir(parents=True, exist_ok=True)
            self.root.chmod(0o711 if settings.claude_job_user is not None else 0o700)
            mark_owned(self.root)
            try:
                from worker import workspace_changes  # inotify: Linux's

                self.changes = workspace_changes.ChangeTracker(workspace_changes.watch_budget())
            except (ImportError, OSError) as exc:  # no inotify (or no instance left): every save scans
                log.warning("workspace changes are not tracked: %s", exc)

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
            # Within the job's time limit, as its run is: a restore that hangs ends the job.
            async with asyncio.timeout(self.settings.job_timeout_s):
                try:
                    held = await self._checkout(ref, work, held, session.workspace)
                except OSError:
                    if held is None:
                        raise
                    # Something the last save left out is in the way (a link where an upload put
                    # a file): the version is restored afresh.
                    held = await self._checkout(ref, work, None, session.workspace)
        # ValueError: a malformed manifest; TimeoutError: see above
        except MissingObject as exc:
            # No moment's trouble, which a retry would outlast: the session deleted meanwhile, or
            # a store the other processes do not share (an outside probe's compose stack).
            log.error("workspace %s is not in this worker's store (WORKSPACE_STORE): %s", key, exc)
            await self._drop(key)
            message = (
                "The session's files are not in this worker's workspace store: the session was "
                "deleted, or the gateway's processes do not share one store (WORKSPACE_STORE)."
            )
            raise BackendError(FailureCode.WORKSPACE_UNAVAILABLE, message) from exc
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("could not restore workspace %s: %s", key, type(exc).__name__)
            await self._drop(key)
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
                await asyncio.shield(self._drop(key))

    async def _checkout(self, ref: WorkspaceRef, work: Path, held: Held | None, version: str | None) -> Held:
        if held is not None and held.manifest.version == version:
            return held
        key = ref.member
        if held is None:  # unknown contents: start from an empty directory
            await self._drop(key)
            await asyncio.to_thread(work.mkdir, parents=True, mode=0o700)
            held = Held(Manifest())
            if self.changes is not None:
                self.changes.start(key)
        target = await workspaces.load_manifest(self.store, ref, version)
        needed = {path: entry for path, entry in target.files.items() if _differs_held(held, path, entry)}
        contents = await workspaces.read_files(self.store, ref, needed)
        held = await asyncio.to_thread(restore, work, held, target, contents, self.watch(key))
        if self.changes is not None:
            self.changes.settle(key)  # the restore's own writes
        return held

    def watch(self, key: str) -> Watch | None:
        return None if self.changes is None else functools.partial(self.changes.watch, key)

    async def _drop(self, key: str) -> None:
        """Removes a session's directory from this worker (no longer watched first)."""
        if self.changes is not None:
            self.changes.forget(key)
        await asyncio.to_thread(removed, self._directory(WorkspaceRef.of_member(key)))

    async def _evict(self) -> None:
        while len(self._held) > self.settings.workspace_cache_sessions:
            key, _ = self._held.popitem(last=False)
            await self._drop(key)

    async def maintain(self) -> None:
        """Deletes expired sessions' workspaces from the store and from this worker, now and then."""
        interval = min(60.0, max(1.0, self.settings.session_ttl_s / 4))
        while True:
            try:
                await workspaces.sweep(self.store, self.redis, self.settings.session_ttl_s)
                await self._forget_ended()
            except (
                RedisError,
                OSError,
            ) as exc:  # an outage of Redis or the store: the next round tries again
                log.warning("workspace sweep failed (%s); retrying", type(exc).__name__)
            except Exception:
                log.exception("workspace sweep failed; retrying")
            await asyncio.sleep(interval)

    async def _forget_ended(self) -> None:
        for key in list(self._held):
            ref = WorkspaceRef.of_member(key)
            transcript = await self.redis.hget(session_key(ref.owner, ref.session), "transcript")  # type: ignore[misc]
            if transcript is None or transcript.decode() != ref.incarnation:
                self._held.pop(key, None)
                await self._drop(key)

    async def close(self) -> None:
        """This worker's copies are only a cache: gone with the process."""
        self._held.clear()
        if self.changes is not None:
            self.changes.close()
        await asyncio.to_thread(removed, self.root)
        await asyncio.to_thread(unmark, self.root)


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

    async def save(self) -> Manifest | None:
        """Saves the directory as the next version; returns it, or None if nothing changed.

        The version is not the session's until the turn commits (`sessions.commit`). Raises
        `BackendError` over the workspace limits (nothing is saved) or when the store fails.
        """
        files, held = self._files, self._held
        limits = (files.settings.workspace_max_bytes, files.settings.workspace_max_files)
        writer = VersionWriter(held.manifest)
        try:
            seen = await asyncio.to_thread(self._look, writer, *limits)
            if not writer.changed():
                self.saved = Held(held.manifest, *seen)
                return None
            manifest = writer.manifest()
            if manifest.needs_compaction():  # rare: rewrite it all as one pack
                writer = VersionWriter(held.manifest, compact=True)
                seen = await asyncio.to_thread(scan, self.work, Held(Manifest()), writer, *limits)
                manifest = writer.manifest()
            share = files.settings.workspace_max_bytes_per_key
            await sessions.check_key_share(
                files.redis, self.ref.owner, self.ref.session, manifest, held.manifest, share
            )
            await workspaces.track(files.redis, self.ref, files.settings.session_ttl_s)
            await writer.write(files.store, self.ref, manifest)
        except workspaces.WorkspaceTooLarge as exc:
            raise BackendError(FailureCode.WORKSPACE_TOO_LARGE, str(exc)) from exc
        except (OSError, RedisError) as exc:
            log.warning("could not save workspace %s: %s", self.ref.member, type(exc).__name__)
            raise BackendError(
                FailureCode.BACKEND_UNAVAILABLE, "The session's files could not be saved; retry later."
            ) from exc
        self.saved = Held(manifest, *seen)
        return manifest

    def _look(self, writer: VersionWriter, max_bytes: int, max_files: int) -> Seen:
        """Fills `writer` from the directory: where inotify saw changes, else from every file."""
        tracker, key = self._files.changes, self.ref.member
        changes = tracker.take(key) if tracker is not None else None
        watch = self._files.watch(key)
        if changes is None or not changes.complete or watch is None:
            if tracker is not None:
                tracker.start(key)  # the scan watches every folder anew
            return scan(self.work, self._held, writer, max_bytes, max_files, watch)
        return update(self.work, self._held, changes, writer, max_bytes, max_files, watch)

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
