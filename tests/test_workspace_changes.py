"""A save that looks only where inotify saw changes finds the same workspace as reading every file.

Each step changes a real directory as an agent would; after it, the version built from the
tracked changes is compared with the directory itself, read independently of the worker's code.
"""

import errno
import functools
import hashlib
import mmap
import os
import random
import resource
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.workspaces import Contents, Manifest, VersionWriter
from worker.session_files import Held, restore, scan, update
from worker.workspace import removed
from worker.workspace_changes import ChangeTracker, watch_budget

LIMITS = (10_000_000, 1_000)
KEY = "session"
View = tuple[dict[str, tuple[str, bool]], dict[str, str], set[str]]


def _loops(link: Path) -> bool:
    """Whether the kernel gives up following `link` (a loop): such a link is not kept."""
    try:
        link.stat()
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def on_disk(work: Path) -> View:
    """Every file (SHA-256, executable), link inside and folder holding neither (nor a folder)
    under `work`, links not followed."""
    files, links, empty = {}, {}, set()
    for folder, dirs, names in os.walk(work):
        dirs[:] = [name for name in dirs if name.isprintable()]  # not kept: control characters
        kept = [name for name in dirs if not (Path(folder) / name).is_symlink()]
        for name in [name for name in names + dirs if name.isprintable() and name not in kept]:
            path = Path(folder) / name
            rel = path.relative_to(work).as_posix()
            if path.is_symlink():
                target = os.readlink(path)
                inside = os.path.normpath(f"{rel}/../{target}")
                if not target.startswith("/") and not inside.startswith("..") and not _loops(path):
                    links[rel] = target
                    kept.append(name)
            else:
                files[rel] = (
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                    bool(path.stat().st_mode & 0o100),
                )
                kept.append(name)
        if not kept and Path(folder) != work:
            empty.add(Path(folder).relative_to(work).as_posix())
    return files, links, empty


def view(writer: VersionWriter) -> View:
    files = {path: (e.sha256, e.executable) for path, e in writer.files.items()}
    return files, dict(writer.links), set(writer.folders)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def appended(path: Path, text: str) -> None:
    with path.open("a") as file:
        file.write(text)


def mapped_write(path: Path) -> None:
    """Changes the file through a shared memory mapping only (no write call: no MODIFY event)."""
    with path.open("r+b") as file, mmap.mmap(file.fileno(), 0) as memory:
        memory[:4] = b"MMAP"


def emptied(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


STEPS: list[tuple[str, Callable[[Path], object]]] = [  # each returns what it did, unused
    ("a file written", lambda w: write(w / "src" / "f1.txt", "changed")),
    ("files in new nested folders", lambda w: [write(w / "x" / "y" / f"n{i}", str(i)) for i in range(3)]),
    ("a file removed", lambda w: (w / "src" / "f2.txt").unlink()),
    ("a folder removed", lambda w: emptied(w / "docs")),
    ("a folder moved", lambda w: (w / "src").rename(w / "lib")),
    ("a file in the moved folder written", lambda w: write(w / "lib" / "f3.txt", "after the move")),
    ("a file moved across folders", lambda w: (w / "lib" / "f4.txt").rename(w / "x" / "f4.txt")),
    ("a file made executable", lambda w: (w / "lib" / "f5.txt").chmod(0o755)),
    ("links inside and out", lambda w: ((w / "in").symlink_to("lib/f5.txt"), (w / "out").symlink_to("/etc"))),
    ("a second hard link", lambda w: os.link(w / "lib" / "f6.txt", w / "hard.txt")),
    ("a write through the other name", lambda w: appended(w / "hard.txt", " and more")),
    (
        "a file replaced by a folder",
        lambda w: ((w / "top.txt").unlink(), write(w / "top.txt" / "inner", "i")),
    ),
    ("a folder replaced by a file", lambda w: (emptied(w / "x" / "y"), write(w / "x" / "y", "file"))),
    ("names that are not kept", lambda w: (write(w / "bad\x01" / "x", "x"), write(w / "tab\there", "t"))),
    ("a write through a memory mapping", lambda w: mapped_write(w / "lib" / "f7.txt")),
    ("times changed, not bytes", lambda w: os.utime(w / "lib" / "f7.txt", (1, 1))),
    ("nothing", lambda w: None),
    (
        "a folder moved away and back",
        lambda w: ((w / "lib").rename(w / "tmp"), (w / "tmp").rename(w / "lib")),
    ),
    (
        "a file moved into a new folder",
        lambda w: ((w / "new").mkdir(), (w / "lib" / "f8.txt").rename(w / "new" / "f8")),
    ),
    ("a folder replaced by a link", lambda w: (emptied(w / "new"), (w / "new").symlink_to("lib"))),
    (
        "a file replaced by a link to it",
        lambda w: ((w / "hard.txt").unlink(), (w / "hard.txt").symlink_to("h")),
    ),
    ("a link replaced by a file", lambda w: ((w / "in").unlink(), write(w / "in", "now a file"))),
    ("an empty folder made", lambda w: (w / "e" / "f").mkdir(parents=True)),
    ("a file put in it", lambda w: write(w / "e" / "f" / "g", "g")),
    ("its file removed", lambda w: (w / "e" / "f" / "g").unlink()),
    ("the empty folder removed", lambda w: (w / "e" / "f").rmdir()),
    (
        "one turn: link, then write through it",
        lambda w: (os.link(w / "lib" / "f9.txt", w / "h2"), appended(w / "h2", "+")),
    ),
]


@pytest.fixture
def tracker() -> Iterator[ChangeTracker]:
    tracker = ChangeTracker(watch_budget())
    yield tracker
    tracker.close()


def test_every_kind_of_change_is_found_from_the_tracked_names_alone(
    tmp_path: Path, tracker: ChangeTracker
) -> None:
    work = tmp_path / "work"
    for i in range(10):
        write(work / "src" / f"f{i}.txt", f"file {i}")
    write(work / "docs" / "a.md", "a")
    write(work / "docs" / "b.md", "b")
    write(work / "top.txt", "top")
    watch = functools.partial(tracker.watch, KEY)
    tracker.start(KEY)
    writer = VersionWriter(Manifest())
    seen = scan(work, Held(Manifest()), writer, *LIMITS, watch)
    held = Held(writer.manifest(), *seen)
    for name, step in STEPS:
        before = on_disk(work)
        step(work)
        changes = tracker.take(KEY)
        assert changes is not None
        assert changes.complete, name
        writer = VersionWriter(held.manifest)
        seen = update(work, held, changes, writer, *LIMITS, watch)
        assert view(writer) == on_disk(work), name
        assert writer.changed() == (on_disk(work) != before), name
        held = Held(writer.manifest(), *seen)


def test_lost_events_make_the_next_save_scan_everything(tmp_path: Path, tracker: ChangeTracker) -> None:
    work = tmp_path / "work"
    write(work / "a", "a")
    write(work / "b", "b")
    tracker.start(KEY)
    scan(work, Held(Manifest()), VersionWriter(Manifest()), *LIMITS, functools.partial(tracker.watch, KEY))
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    for i in range(limit // 2 + 1):  # alternating names: the kernel merges no two events
        os.utime(work / "a", (i, i))
        os.utime(work / "b", (i, i))
    changes = tracker.take(KEY)
    assert changes is not None
    assert not changes.complete
    tracker.start(KEY)
    assert tracker.take(KEY) == type(changes)()  # tracked again, from a scan of everything


def test_a_worker_over_its_watch_budget_scans_the_rest_whole(tmp_path: Path) -> None:
    # Found by an outside probe: one session's 200,000 folders took every watch of the host's
    # user, other gateways' workers' too; a worker now keeps to its share of them.
    assert watch_budget() == int(Path("/proc/sys/fs/inotify/max_user_watches").read_text()) // 16
    tracker = ChangeTracker(max_watches=3)
    try:
        for key, folders in (("small", ["a"]), ("large", ["b", "c", "d"])):
            work = tmp_path / key
            for folder in folders:
                (work / folder).mkdir(parents=True)
            tracker.start(key)
            scan(
                work,
                Held(Manifest()),
                VersionWriter(Manifest()),
                *LIMITS,
                functools.partial(tracker.watch, key),
            )
        small, large = tracker.take("small"), tracker.take("large")
        assert small is not None
        assert small.complete  # its session folder and `a`
        assert large is not None
        assert not large.complete  # one of its four folders was watched
    finally:
        tracker.close()


def test_a_forgotten_session_is_no_longer_tracked(tmp_path: Path, tracker: ChangeTracker) -> None:
    work = tmp_path / "work"
    write(work / "a", "a")
    tracker.start(KEY)
    scan(work, Held(Manifest()), VersionWriter(Manifest()), *LIMITS, functools.partial(tracker.watch, KEY))
    write(work / "a", "changed")
    changes = tracker.take(KEY)
    assert changes is not None
    assert changes.paths == {"a"}
    tracker.forget(KEY)
    write(work / "a", "again")
    assert tracker.take(KEY) is None


def a_random_change(work: Path, rng: random.Random) -> None:
    """One change an agent might make, at random places among a few names (so they collide)."""

    def somewhere() -> Path:
        return work.joinpath(*rng.choices(["a", "b", "c"], k=rng.randint(1, 3)))

    path, other = somewhere(), somewhere()
    action = rng.choice(
        ["write", "write", "append", "remove", "mkdir", "rmtree", "move", "link", "hard", "mode"]
    )
    try:
        if action == "write":
            write(path, rng.choice(["x", "y", "z" * 100]))
        elif action == "append" and path.is_file() and not path.is_symlink():
            appended(path, "+")
        elif action == "remove" and (path.is_file() or path.is_symlink()):
            path.unlink()
        elif action == "mkdir":
            path.mkdir(parents=True, exist_ok=True)
        elif action == "rmtree" and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif action == "move" and path.exists() and not other.is_relative_to(path):
            other.parent.mkdir(parents=True, exist_ok=True)
            path.rename(other)
        elif action == "link":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(rng.choice(["a", "../b", "/etc", "c/a"]))
        elif action == "hard" and path.is_file() and not path.is_symlink():
            other.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, other)
        elif action == "mode" and path.is_file() and not path.is_symlink():
            path.chmod(rng.choice([0o644, 0o755]))
    except OSError:  # in the way of something else: the agent's command failed
        pass


@pytest.mark.parametrize("seed", range(4))
def test_random_turns_of_many_changes_are_found_from_the_names_alone(
    tmp_path: Path, tracker: ChangeTracker, seed: int
) -> None:
    rng, work = random.Random(seed), tmp_path / "work"
    work.mkdir()
    watch = functools.partial(tracker.watch, KEY)
    tracker.start(KEY)
    writer = VersionWriter(Manifest())
    seen = scan(work, Held(Manifest()), writer, *LIMITS, watch)
    held = Held(writer.manifest(), *seen)
    for turn in range(40):
        for _ in range(rng.randint(1, 12)):
            a_random_change(work, rng)
        changes = tracker.take(KEY)
        assert changes is not None
        assert changes.complete
        writer = VersionWriter(held.manifest)
        seen = update(work, held, changes, writer, *LIMITS, watch)
        assert view(writer) == on_disk(work), f"turn {turn}"
        held = Held(writer.manifest(), *seen)
        assert held.manifest.total_bytes == sum(entry.bytes for entry in writer.files.values())  # kept


def _deep(work: Path, top: str, depth: int) -> None:
    """`top` in `work`, with a file `depth` folders below it (made by descriptors: no path is
    that long)."""
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    for name in [top, *["a"] * depth]:
        os.mkdir(name, dir_fd=fd)
        below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    with os.fdopen(os.open("bottom", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "w") as file:
        file.write("deep")
    os.close(fd)


def test_what_a_save_leaves_out_is_removed_at_any_depth(tmp_path: Path, tracker: ChangeTracker) -> None:
    """Found by a re-check probe: a folder the save leaves out (its name holds a newline) with
    3,000 folders in it made the removal recurse past Python's stack: a traceback, and the job
    ended worker_lost. Removed on the first save (whole) and on a later one (its changes)."""
    work = tmp_path / "work"
    work.mkdir()
    try:
        _deep(work, "bad\nfirst", 3000)
        watch = functools.partial(tracker.watch, KEY)
        tracker.start(KEY)
        writer = VersionWriter(Manifest())
        held = Held(writer.manifest(), *scan(work, Held(Manifest()), writer, *LIMITS, watch))
        assert os.listdir(work) == []
        _deep(work, "bad\nsecond", 3000)
        changes = tracker.take(KEY)
        assert changes is not None
        update(work, held, changes, VersionWriter(held.manifest), *LIMITS, watch)
        assert os.listdir(work) == []
        assert os.listdir(tmp_path) == ["work"]  # nothing left beside it either
    finally:
        removed(tmp_path)  # pytest's own removal of old temporary folders recurses


@pytest.fixture
def few_open_files() -> Iterator[int]:
    """This process may open 400 files at once (a container's usual soft limit is 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (400, hard))
    yield 400
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_session_of_more_folders_than_open_files_is_saved_and_restored(
    tmp_path: Path, tracker: ChangeTracker, few_open_files: int
) -> None:
    """Found by an outside probe: a save and a restore held every folder they touched open, and a
    session of 1,200 folders could be neither saved nor restored on a worker of 1,024 files."""
    work = tmp_path / "work"
    folders = 3 * few_open_files
    for i in range(folders):
        write(work / "pkg" / f"p{i}" / "lib" / "index.js", f"v1 {i}")
    watch = functools.partial(tracker.watch, KEY)
    tracker.start(KEY)
    writer = VersionWriter(Manifest())
    held = Held(writer.manifest(), *scan(work, Held(Manifest()), writer, 10**9, 10 * folders, watch))
    for i in range(folders):  # a turn that changes a file in every folder
        write(work / "pkg" / f"p{i}" / "lib" / "index.js", f"v2 {i}")
    changes = tracker.take(KEY)
    assert changes is not None
    assert changes.complete
    writer = VersionWriter(held.manifest)
    update(work, held, changes, writer, 10**9, 10 * folders, watch)
    assert view(writer) == on_disk(work)
    target = writer.manifest()
    contents: dict[str, Contents] = {path: (work / path).read_bytes() for path in target.files}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    restore(elsewhere, Held(Manifest()), target, contents)
    assert on_disk(elsewhere) == on_disk(work)
