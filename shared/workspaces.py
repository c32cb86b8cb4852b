"""Session workspaces as immutable versions in a workspace store, shared by the API and workers.

A version is one manifest (every file's path, size, SHA-256 and where its bytes are) and at most
one pack (the bytes of the files that changed since its parent, concatenated). A save uploads one
pack with only what changed, then the manifest; a restore reads the manifest and the packs it
names. Versions are never modified, and a version id is new each time, so two versions never mix.

A manifest is stored whole (a base), or as the files that differ from an earlier base, so a save
that changed a few files of many writes a few entries, not all of them; a restore reads at most
two manifests. A version is stored whole again once its differences pass a quarter of its files.

Which version is the session's is recorded in Redis with the session (`shared/sessions.py`),
in the same atomic step that commits a turn's transcript: until then a saved version is not the
session's, and a turn that fails or is cancelled leaves both the files and the transcript as
they were. Versions no longer reachable are collected after a later save; a deleted session's
objects are deleted with it, an expired one's by `sweep` (every worker runs it).

Layout: `ws/<owner>/<session id>/<incarnation>/{manifests,packs}/<version>`, where the incarnation
is the session's transcript id (a UUID per session life), so a session re-created under an old
id never sees, and a late sweep never deletes, the files of another life.
"""

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from redis.asyncio import Redis

from shared.keys import WORKSPACES_INDEX, is_session_id, session_key
from shared.workspace_store import MissingObject, ObjectStore

_OWNER = re.compile(r"[0-9a-f]{32}")
_CONTROL = bytes(range(0x20)) + b"\x7f"  # in UTF-8 only themselves: no other character has these bytes
_NOT_NAMES = frozenset({b"", b".", b".."})
"""Names no part of a `/`-separated path may be."""
_INCARNATION = re.compile(r"[0-9a-f-]{36}")
_VERSION = re.compile(r"(\d{10})-[0-9a-f]{12}")
MAX_PATH = 1024
MAX_NAME = 255
"""The longest name of a file or folder that Linux file systems take (`NAME_MAX`), in bytes."""
_RANGES_UP_TO = 8
"""Files read from one pack one range each up to this many, else the whole pack at once."""
_COMPACT_PACKS = 64
"""A save rewrites the whole workspace as one pack when its versions spread over more packs than this,"""
_COMPACT_WASTE = 2.0
"""or when the packs it reads hold more than this many times its live bytes (overwritten files)."""
_DELTA_SHARE = 4
"""A manifest is stored whole once it differs from its base in more than 1/this of its files."""
_MAX_HOPS = 40
"""Links followed in one path's lookup, as Linux allows (`ELOOP` past it)."""

Source = Literal["user", "assistant"]
Contents = bytes | memoryview
"""A file's bytes, or a view of them in a pack read whole."""


class WorkspaceTooLarge(Exception):
    """A version would exceed the workspace limits; nothing is saved."""


def check_key_limit(total: int, elsewhere: int, max_bytes_per_key: int) -> None:
    """A session's workspace of `total` bytes, beside `elsewhere` in its key's other sessions."""
    if total + elsewhere > max_bytes_per_key:
        raise WorkspaceTooLarge(
            f"This key's session workspaces would hold more than {max_bytes_per_key} bytes together "
            f"({elsewhere} in its other sessions); delete files or sessions first. Nothing was saved: "
            "the workspace stays as it was before this request."
        )


def check_limits(count: int, total: int, max_bytes: int, max_files: int) -> None:
    """`count`: files, links and folders (each made by a restore, and watched on a worker)."""
    if count > max_files or total > max_bytes:
        over = f"more than {max_files} files" if count > max_files else f"more than {max_bytes} bytes"
        raise WorkspaceTooLarge(
            f"The session's workspace would hold {over}; its limits are {max_files} files (links "
            f"and folders included) and {max_bytes} bytes. Nothing was saved: the workspace stays as it "
            "was before this request."
        )


class InvalidPath(ValueError):
    pass


def checked_path(path: str) -> str:
    """A workspace-relative path: `/`-separated names, none empty, `.` or `..`, no control
    characters, none longer than a file system takes (`MAX_NAME`: an upload of a longer one was
    taken, and every later turn failed to restore it, found by an outside probe)."""
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (kept by Python as surrogates)
        raise InvalidPath(path) from None
    # Without patterns: searching a long path for empty, `.` and `..` names and for control
    # characters took 6 µs, a manifest of 20,000 such paths a third of a second (an outside probe).
    if len(encoded) > MAX_PATH or len(encoded.translate(None, _CONTROL)) != len(encoded):
        raise InvalidPath(path)
    if any(name in _NOT_NAMES or len(name) > MAX_NAME for name in encoded.split(b"/")):
        raise InvalidPath(path)
    return path


def file_id(path: str) -> str:
    """A file's id in the files API: stable for its path within the session."""
    return "cfile_" + hashlib.sha256(path.encode()).hexdigest()[:32]


class FileEntry(NamedTuple):
    pack: str
    offset: int
    bytes: int
    sha256: str
    created_at: int
    source: Source
    executable: bool


@dataclass(frozen=True)
class WorkspaceRef:
    """One life of one session's workspace in the store."""

    owner: str
    session: str
    incarnation: str

    def __post_init__(self) -> None:
        if not (
            _OWNER.fullmatch(self.owner)
            and is_session_id(self.session)
            and _INCARNATION.fullmatch(self.incarnation)
        ):
            raise ValueError("malformed workspace reference")

    @property
    def prefix(self) -> str:
        return f"ws/{self.owner}/{self.session}/{self.incarnation}/"

    @property
    def member(self) -> str:
        return f"{self.owner}/{self.session}/{self.incarnation}"

    @classmethod
    def of_member(cls, member: str) -> "WorkspaceRef":
        owner, session, incarnation = member.split("/")
        return cls(owner, session, incarnation)

    def manifest_key(self, version: str) -> str:
        return f"{self.prefix}manifests/{_checked_version(version)}"

    def pack_key(self, version: str) -> str:
        return f"{self.prefix}packs/{_checked_version(version)}"


def _sequence(version: str) -> int:
    match = _VERSION.fullmatch(version)
    if match is None:
        raise ValueError("malformed workspace version")
    return int(match.group(1))


def _checked_version(version: str) -> str:
    _sequence(version)
    return version


def _folders_of(path: str) -> Iterator[str]:
    """The folders a path is in, innermost first."""
    while "/" in path:
        path = path.rpartition("/")[0]
        yield path


def link_inside(path: str, links: Mapping[str, str]) -> bool:
    """Whether the link at `path`, one of the workspace's `links` (path -> target), stays inside
    the workspace when followed as the kernel follows it: through the other links on its way too
    (with `l -> .`, a target `l/..` leaves it, though its text alone says it stays)."""
    resolved = path.split("/")[:-1]  # the folders it is in: none is a link (a scan follows none)
    todo: list[str] = []  # the names still to walk, the next one last
    target: str | None = links[path]
    for _ in range(_MAX_HOPS):
        if target is None:
            return True
        if target.startswith("/") or "\0" in target:
            return False
        todo += reversed(target.split("/"))
        target = None
        while todo and target is None:
            part = todo.pop()
            if part == "..":
                if not resolved:
                    return False
                resolved.pop()
            elif part not in ("", "."):
                resolved.append(part)
                if (target := links.get("/".join(resolved))) is not None:
                    resolved.pop()  # a link on the way: its target is walked from its folder
    # More links on the way than the kernel follows (a loop): it follows none of them, and neither
    # is it kept. Kept, a link judged through it could be judged otherwise once the save dropped
    # it, and a version saved so could never be loaded again (an outside probe). So a link whose
    # way leads through one that is dropped is dropped too: every kept link's way is kept.
    return False


@dataclass
class Manifest:
    """One version's files (path -> entry), symbolic links (path -> target inside the workspace)
    and empty folders."""

    version: str | None = None
    """None: the empty workspace every session starts with."""
    files: dict[str, FileEntry] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    packs: dict[str, int] = field(default_factory=dict)
    """Sizes of the packs the files are in."""
    base: str | None = None
    """The version whose whole manifest this one is stored against (None: stored whole)."""
    delta: dict[str, FileEntry | None] = field(default_factory=dict)
    """With a base: how `files` differ from the base's (None: a file it does not have)."""
    bases: list[str] = field(default_factory=list)
    """The whole manifests this version and its parent are stored against: kept while it is."""
    folders: list[str] = field(default_factory=list)
    """Folders with nothing in them (those with something are implied by its paths)."""
    _total: int | None = field(default=None, repr=False, compare=False)
    """The files' bytes, once counted (by the writer that built it, or when first asked)."""

    @property
    def total_bytes(self) -> int:
        if self._total is None:
            self._total = sum(entry.bytes for entry in self.files.values())
        return self._total

    def encode(self) -> bytes:
        body = {
            "version": self.version,
            "base": self.base,
            "bases": self.bases,
            "files": self.files if self.base is None else self.delta,
            "links": self.links,
            "folders": self.folders,
            "packs": self.packs,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: dict[str, Any], base: "Manifest | None" = None) -> "Manifest":
        """A stored manifest (parsed JSON), checked as if a caller had written it: every path, link
        and pack. `base`: the whole manifest it is stored against, if any."""
        if (body.get("base") is None) != (base is None) or (base is not None and base.base is not None):
            raise ValueError("malformed workspace manifest")
        stored = {
            checked_path(path): None if entry is None else FileEntry(*entry)
            for path, entry in body["files"].items()
        }
        files = dict(base.files) if base is not None else {}
        for path, change in stored.items():
            if change is None:
                files.pop(path, None)
            else:
                files[path] = change
        stored_links = {checked_path(path): target for path, target in body["links"].items()}
        # Only links that lead inside are restored: one kept by an earlier version's rules (a
        # loop) is left out here, as a save leaves it out now, rather than the version refused.
        links = {path: target for path, target in stored_links.items() if link_inside(path, stored_links)}
        packs = {_checked_version(pack): int(size) for pack, size in body["packs"].items()}
        if not all(entry.pack in packs for entry in files.values()):
            raise ValueError("malformed workspace manifest")
        bases = [_checked_version(version) for version in body.get("bases", [])]
        folders = [checked_path(folder) for folder in body.get("folders", [])]
        if base is None:
            return cls(body["version"], files, links, packs, bases=bases, folders=folders)
        return cls(body["version"], files, links, packs, base.version, stored, bases, folders)

    def next_version(self) -> str:
        sequence = 0 if self.version is None else _sequence(self.version) + 1
        return f"{sequence:010d}-{uuid.uuid4().hex[:12]}"

    def needs_compaction(self) -> bool:
        stored = sum(self.packs.values())
        return len(self.packs) > _COMPACT_PACKS or stored > _COMPACT_WASTE * self.total_bytes + (4 << 20)


class VersionWriter:
    """Builds the next version of a manifest: it starts as the parent; changed files go into its
    one new pack."""

    def __init__(self, parent: Manifest, *, compact: bool = False) -> None:
        """`compact`: it starts empty, and every file goes into the new pack, so it reads no older one."""
        self.parent = parent
        self.version = parent.next_version()
        self.files: dict[str, FileEntry] = {} if compact else dict(parent.files)
        self.links: dict[str, str] = {} if compact else dict(parent.links)
        self.folders: set[str] = set() if compact else set(parent.folders)
        self.touched: set[str] = set()
        """Files whose entry differs from the parent's."""
        self.total = 0 if compact else parent.total_bytes
        """The bytes of `files`."""
        self._pack: list[bytes] = []
        self._size = 0
        self._compact = compact
        self._by_sha: dict[str, FileEntry] | None = {} if compact else None
        """Stored files by their SHA-256, built when a file is first added (most saves add few)."""

    def _place(self, path: str, entry: FileEntry) -> None:
        old = self.files.get(path)
        self.total += entry.bytes - (old.bytes if old is not None else 0)
        self.files[path] = entry

    def keep(self, path: str) -> None:
        """The parent's file at `path`, unchanged."""
        self._place(path, self.parent.files[path])
        self.touched.discard(path)

    def remove(self, path: str) -> None:
        if (old := self.files.pop(path, None)) is not None:
            self.total -= old.bytes
            self.touched.add(path)
        self.links.pop(path, None)

    def add(self, path: str, data: bytes, *, source: Source, executable: bool, now: int) -> None:
        sha = hashlib.sha256(data).hexdigest()
        self.links.pop(path, None)
        self.folders.difference_update(_folders_of(path))  # no longer empty
        known = self.parent.files.get(path)
        created = known.created_at if known is not None else now
        if known is not None and known.sha256 == sha:
            source = known.source
        if not self._compact and known is not None and (known.sha256, known.executable) == (sha, executable):
            if self.files.get(path) != known:
                self._place(path, known)
                self.touched.discard(path)
            return
        self.touched.add(path)
        if self._by_sha is None:
            self._by_sha = {entry.sha256: entry for entry in self.parent.files.values()}
        if (same := self._by_sha.get(sha)) is not None:  # a copy or a move: the bytes are stored
            self._place(path, FileEntry(same.pack, same.offset, len(data), sha, created, source, executable))
            return
        entry = FileEntry(self.version, self._size, len(data), sha, created, source, executable)
        self._pack.append(data)
        self._size += len(data)
        self._place(path, entry)
        self._by_sha[sha] = entry

    def manifest(self) -> Manifest:
        packs = {entry.pack for entry in self.files.values()}
        sizes = {**self.parent.packs, self.version: self._size}
        # Each link was judged by its own text when found; now through all the others.
        links = {path: target for path, target in self.links.items() if link_inside(path, self.links)}
        manifest = Manifest(self.version, self.files, links, {pack: sizes[pack] for pack in packs})
        manifest.folders, manifest._total = sorted(self.folders), self.total
        parent = self.parent
        base = parent.version if parent.base is None else parent.base
        if not self._compact and base is not None:
            delta = dict(parent.delta)
            delta.update((path, self.files.get(path)) for path in self.touched)
            if len(delta) * _DELTA_SHARE <= len(self.files):
                manifest.base, manifest.delta = base, delta
        kept = {manifest.base, parent.base if parent.base is not None else parent.version}
        manifest.bases = sorted(version for version in kept if version is not None)
        return manifest

    def changed(self) -> bool:
        return (
            bool(self.touched) or self.links != self.parent.links or self.folders != set(self.parent.folders)
        )

    @property
    def new_bytes(self) -> int:
        """The bytes of the files it stores anew."""
        return self._size

    def check_limits(self, max_bytes: int, max_files: int) -> None:
        folders = set(self.folders)  # the empty ones, and those the paths are in
        for path in (*self.files, *self.links, *self.folders):
            for folder in _folders_of(path):
                if folder in folders:
                    break  # and the ones it is in
                folders.add(folder)
        check_limits(len(self.files) + len(self.links) + len(folders), self.total, max_bytes, max_files)

    async def write(self, store: ObjectStore, ref: WorkspaceRef, manifest: Manifest) -> None:
        """Uploads the pack, then `manifest` (this writer's): a manifest never names bytes that are
        not stored."""
        if self._pack:
            await store.put(ref.pack_key(self.version), b"".join(self._pack))
        await store.put(ref.manifest_key(self.version), manifest.encode())


class _Loaded:
    """Manifests read lately, by their keys, up to `BYTES` of them as stored: a version is never
    changed, and a session's files read again and again (the files API) were its whole manifest
    parsed each time (an outside probe: 0.4 s for 20,000 long paths, every other caller waiting)."""

    BYTES = 32 * 1024 * 1024

    def __init__(self) -> None:
        self._manifests: OrderedDict[str, tuple[Manifest, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> Manifest | None:
        if (found := self._manifests.get(key)) is None:
            return None
        self._manifests.move_to_end(key)
        return found[0]

    def put(self, key: str, manifest: Manifest, size: int) -> None:
        if key in self._manifests or size > self.BYTES:
            return
        self._manifests[key] = manifest, size
        self._bytes += size
        while self._bytes > self.BYTES:
            _, (_, evicted) = self._manifests.popitem(last=False)
            self._bytes -= evicted


_loaded = _Loaded()


async def load_manifest(
    store: ObjectStore, ref: WorkspaceRef, version: str | None, *, as_base: bool = False
) -> Manifest:
    """The version's manifest (callers never change it: `VersionWriter` copies what it keeps).
    `as_base`: another's base, which must be stored whole."""
    if version is None:
        return Manifest()
    key = ref.manifest_key(version)
    if (manifest := _loaded.get(key)) is None:
        stored = await store.get(key)
        body = json.loads(stored)
        if (base := body.get("base")) is None:
            manifest = Manifest.decode(body)
        elif as_base:
            raise ValueError("malformed workspace manifest")
        else:
            manifest = Manifest.decode(
                body, await load_manifest(store, ref, _checked_version(base), as_base=True)
            )
        _loaded.put(key, manifest, len(stored))
    return manifest  # as a base, `Manifest.decode` checks it is stored whole


async def read_file(store: ObjectStore, ref: WorkspaceRef, entry: FileEntry) -> bytes:
    return await store.get_range(ref.pack_key(entry.pack), entry.offset, entry.bytes)


async def read_files(
    store: ObjectStore, ref: WorkspaceRef, entries: dict[str, FileEntry]
) -> dict[str, Contents]:
    """The bytes of files (path -> entry): a range per file from packs of few of them, else whole
    packs (the files views into them, not copies), all at once."""
    by_pack: dict[str, list[str]] = {}
    for path, entry in entries.items():
        by_pack.setdefault(entry.pack, []).append(path)

    async def from_pack(pack: str, paths: list[str]) -> dict[str, Contents]:
        if len(paths) <= _RANGES_UP_TO:
            return {path: await read_file(store, ref, entries[path]) for path in paths}
        data = memoryview(await store.get(ref.pack_key(pack)))
        return {path: data[entries[path].offset : _end(entries[path])] for path in paths}

    contents: dict[str, Contents] = {}
    for part in await asyncio.gather(*(from_pack(pack, paths) for pack, paths in by_pack.items())):
        contents.update(part)
    return contents


async def stream_files(
    store: ObjectStore, ref: WorkspaceRef, entries: dict[str, FileEntry], piece: int = 1 << 20
) -> AsyncIterator[tuple[str, FileEntry, bytes]]:
    """The bytes of files (path -> entry) as (path, entry, part of its bytes), each file's parts in
    order and together, in pieces of at most `piece` bytes: files that lie close in a pack come
    in one read, larger ones in several (the memory it takes is a piece, whatever the files)."""
    by_pack: dict[str, list[tuple[str, FileEntry]]] = {}
    for path, entry in entries.items():
        by_pack.setdefault(entry.pack, []).append((path, entry))
    for pack, files in by_pack.items():
        key = ref.pack_key(pack)
        files.sort(key=lambda item: item[1].offset)
        first = 0
        while first < len(files):
            path, entry = files[first]
            if entry.bytes > piece:
                for start in range(0, entry.bytes, piece):
                    length = min(piece, entry.bytes - start)
                    yield path, entry, await store.get_range(key, entry.offset + start, length)
                first += 1
                continue
            last = first
            while last + 1 < len(files) and _end(files[last + 1][1]) - entry.offset <= piece:
                last += 1
            data = await store.get_range(key, entry.offset, _end(files[last][1]) - entry.offset)
            for path, other in files[first : last + 1]:
                yield path, other, data[other.offset - entry.offset : _end(other) - entry.offset]
            first = last + 1


def _end(entry: FileEntry) -> int:
    return entry.offset + entry.bytes


async def collect_garbage(store: ObjectStore, ref: WorkspaceRef, current: Manifest) -> None:
    """Deletes the versions older than `current`'s parent, and packs `current` does not read,
    but for the whole manifests `current` and its parent are stored against.

    Newer objects may be a save in progress (another turn or an upload after this one's commit)
    and the parent may still be read by a download that began before the commit: both stay.
    """
    if current.version is None:
        return
    oldest_kept = _sequence(current.version) - 1
    stale = []
    for key in await store.keys(ref.prefix):
        kind, _, version = key.removeprefix(ref.prefix).partition("/")
        if not _VERSION.fullmatch(version) or _sequence(version) >= oldest_kept:
            continue
        if (kind == "manifests" and version not in current.bases) or (
            kind == "packs" and version not in current.packs
        ):
            stale.append(key)
    if stale:
        await store.delete(stale)


async def delete_workspace(store: ObjectStore, redis: Redis, ref: WorkspaceRef) -> None:
    """Removes every object of one life of a session's workspace."""
    await store.delete(await store.keys(ref.prefix))
    await redis.zrem(WORKSPACES_INDEX, ref.member)


async def track(redis: Redis, ref: WorkspaceRef, ttl_s: int) -> None:
    """Registers a workspace with the sweep before anything of it is stored (so nothing leaks)."""
    await redis.zadd(WORKSPACES_INDEX, {ref.member: _ms() + ttl_s * 1000}, gt=True)


def _ms() -> int:
    return int(time.time() * 1000)


async def sweep(store: ObjectStore, redis: Redis, ttl_s: int, limit: int = 32) -> list[WorkspaceRef]:
    """Deletes the stored workspaces whose session expired or was re-created; returns them.

    A session still alive (same transcript id) is looked at again when its record would expire,
    within the TTL: entries put back in the past came first again each round, 32 of them holding
    up every other session's deletion (an outside probe), and one put back as far as a running
    turn keeps its session outlived the session once the turn's end gave it its TTL again (a
    re-check probe).
    """
    due: list[bytes] = await redis.zrangebyscore(WORKSPACES_INDEX, "-inf", _ms(), start=0, num=limit)
    deleted = []
    for raw in due:
        ref = WorkspaceRef.of_member(raw.decode())
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hget(session_key(ref.owner, ref.session), "transcript")
            pipe.pttl(session_key(ref.owner, ref.session))
            transcript, left_ms = await pipe.execute()
        if transcript is not None and transcript.decode() == ref.incarnation:
            left_ms = min(left_ms, ttl_s * 1000) if left_ms >= 0 else ttl_s * 1000
            await redis.zadd(WORKSPACES_INDEX, {ref.member: _ms() + left_ms + 1000})
            continue
        try:
            await delete_workspace(store, redis, ref)
        except MissingObject:
            continue
        deleted.append(ref)
    return deleted
