"""What changed in the session directories a worker holds since each was last saved or restored.

A save then looks at those paths only, instead of every file of the workspace (a stat of each
of 10,000 files costs more than the whole save is allowed). One inotify instance per worker
watches every folder of the workspaces it holds. The kernel queues an event in the system call
that makes the change, so once a turn's processes have stopped, reading the queue gives all of
the turn's changes. Whatever inotify may not report makes that workspace's next save scan every
file, as without it: a lost event (the queue overflowed), a folder that could not be watched (the
watch limit), the workspace's own folder moved or removed. Writes through a shared memory
mapping raise no event of their own, but the file's closing does (at the latest when its process
ends). A file with several hard links is looked at on every save, since a write through one name
reports only that name.

`inotify_simple` (a ctypes wrapper of the three system calls, no dependencies) reads the events:
the asyncio and thread-based watchers (watchfiles, watchdog) deliver them later, from a thread
of their own, and so cannot say that every change so far has been seen.
"""

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from inotify_simple import INotify, flags

_HOST_SHARE = 16
"""A worker watches at most this fraction of the host's inotify watches (`watch_budget`)."""

_MASK = (
    flags.MODIFY
    | flags.CLOSE_WRITE  # also after writes through a shared mapping, which raise no MODIFY
    | flags.ATTRIB
    | flags.CREATE
    | flags.DELETE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.EXCL_UNLINK
)


@dataclass
class Changes:
    """A workspace's changes, as names: they say where to look, the filesystem says what is there."""

    paths: set[str] = field(default_factory=set)
    """Files, links or folders created, written, removed or moved, or whose mode or times changed."""
    folders: set[str] = field(default_factory=set)
    """Folders created or moved in: everything under them is new."""
    gone: set[str] = field(default_factory=set)
    """Folders removed or moved out: nothing under them stays unless it is found again."""
    complete: bool = True
    """False: an event may be missing, so only a scan of every file is sure."""


def watch_budget() -> int:
    """The watches a worker may hold: 1/16 of what the host allows its user, which every process
    of that user shares (a session of 200,000 folders had taken them all, the host's too)."""
    try:
        return int(Path("/proc/sys/fs/inotify/max_user_watches").read_text()) // _HOST_SHARE
    except (OSError, ValueError):
        return 8192 // _HOST_SHARE  # the kernel's historical default


class ChangeTracker:
    """One inotify instance for every session directory of a worker (keyed by session)."""

    def __init__(self, max_watches: int) -> None:
        """`max_watches`: past it, a folder is not watched (its workspace is scanned whole)."""
        self.max_watches = max_watches
        self._inotify = INotify()
        self._lock = threading.Lock()  # saves of several sessions read the one queue from threads
        self._watches: dict[int, tuple[str, str]] = {}
        """Watch descriptor -> (session key, folder relative to the session directory)."""
        self._changes: dict[str, Changes] = {}

    def start(self, key: str) -> None:
        """From now on the session's changes are tracked (with `watch` for each of its folders)."""
        with self._lock:
            self._read()
            self._changes[key] = Changes()

    def watch(self, key: str, folder: str, fd: int) -> None:
        """Watches the folder open at `fd` (opened without following links) as `folder`."""
        with self._lock:
            wd = None
            if len(self._watches) < self.max_watches:
                with contextlib.suppress(OSError):  # over the host's limit
                    wd = self._inotify.add_watch(f"/proc/self/fd/{fd}", _MASK)
            if wd is None:  # this workspace is scanned whole
                if (changes := self._changes.get(key)) is not None:
                    changes.complete = False
                return
            self._watches[wd] = (key, folder)

    def settle(self, key: str) -> None:
        """Drops the session's changes so far (the restore's own writes), not what they lack."""
        self.take(key)

    def take(self, key: str) -> Changes | None:
        """The session's changes since `start` or the last `take` (None: not tracked)."""
        with self._lock:
            self._read()
            changes = self._changes.get(key)
            if changes is not None:
                self._changes[key] = Changes(complete=changes.complete)
            return changes

    def forget(self, key: str) -> None:
        """Stops watching the session's folders (before they are removed: no event for each file)."""
        with self._lock:
            self._changes.pop(key, None)
            for wd in [wd for wd, (owner, _) in self._watches.items() if owner == key]:
                del self._watches[wd]
                try:
                    self._inotify.rm_watch(wd)
                except OSError:  # the folder is gone already
                    continue

    def close(self) -> None:
        self._inotify.close()

    def _read(self) -> None:
        while events := self._inotify.read(timeout=0):
            for event in events:
                if event.mask & flags.Q_OVERFLOW:
                    for tracked in self._changes.values():
                        tracked.complete = False
                    continue
                if event.mask & flags.IGNORED:  # the watch ended: its folder was removed
                    self._watches.pop(event.wd, None)
                    continue
                if (watched := self._watches.get(event.wd)) is None:
                    continue
                key, folder = watched
                if (changes := self._changes.get(key)) is None:
                    continue
                if event.mask & (flags.DELETE_SELF | flags.MOVE_SELF):
                    if not folder:  # the session directory itself
                        changes.complete = False
                    continue  # a folder inside: its parent's watch reports it
                path = f"{folder}/{event.name}" if folder else event.name
                if event.mask & flags.ISDIR and event.mask & (flags.CREATE | flags.MOVED_TO):
                    changes.folders.add(path)
                elif event.mask & flags.ISDIR and event.mask & (flags.DELETE | flags.MOVED_FROM):
                    changes.gone.add(path)
                else:
                    changes.paths.add(path)
