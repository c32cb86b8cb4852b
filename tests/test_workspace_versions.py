"""Workspace versions on a real filesystem and the local store: what a save stores, what a restore
writes, and that neither follows a symbolic link out of the workspace."""

import io
import multiprocessing
import os
import random
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from api.routes.session_files import _tar_gz
from shared import workspaces
from shared.keys import WORKSPACES_INDEX, session_key
from shared.workspace_store import LocalStore
from shared.workspaces import Manifest, VersionWriter, WorkspaceRef, WorkspaceTooLarge
from tests.test_workspace_changes import a_random_change, on_disk
from worker.session_files import Held, restore, scan
from worker.workspace import removed

REF = WorkspaceRef("0" * 32, "s-1", "12345678-1234-1234-1234-123456789abc")
LIMITS = (10_000_000, 1_000)


async def save(store: LocalStore, work: Path, held: Held) -> Held:
    writer = VersionWriter(held.manifest)
    seen = scan(work, held, writer, *LIMITS)
    manifest = writer.manifest()
    await writer.write(store, REF, manifest)
    return Held(manifest, *seen)


async def restored(store: LocalStore, into: Path, version: str | None) -> Held:
    into.mkdir()
    target = await workspaces.load_manifest(store, REF, version)
    return restore(into, Held(Manifest()), target, await workspaces.read_files(store, REF, target.files))


async def test_a_save_stores_only_changed_files_and_a_restore_gives_them_back(tmp_path: Path) -> None:
    store, work = LocalStore(tmp_path / "store"), tmp_path / "work"
    (work / "src").mkdir(parents=True)
    for i in range(100):
        (work / "src" / f"f{i}.txt").write_text(f"file {i}\n" * 10)
    (work / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (work / "run.sh").chmod(0o755)
    first = await save(store, work, Held(Manifest()))
    (work / "src" / "f7.txt").write_text("changed\n")
    second = await save(store, work, first)
    assert second.manifest.version != first.manifest.version
    assert second.manifest.packs[second.manifest.version or ""] == len(b"changed\n")  # one file uploaded
    assert second.manifest.files["src/f8.txt"] == first.manifest.files["src/f8.txt"]
    again = VersionWriter(second.manifest)
    scan(work, second, again, *LIMITS)
    assert not again.changed()  # nothing to save: the turn keeps the version it had

    elsewhere = await restored(store, tmp_path / "elsewhere", second.manifest.version)
    assert (tmp_path / "elsewhere" / "src" / "f7.txt").read_text() == "changed\n"
    assert (tmp_path / "elsewhere" / "src" / "f8.txt").read_text() == "file 8\n" * 10
    assert (tmp_path / "elsewhere" / "run.sh").stat().st_mode & 0o100
    assert elsewhere.manifest == second.manifest


async def test_two_versions_from_one_parent_never_mix(tmp_path: Path) -> None:
    store, work = LocalStore(tmp_path / "store"), tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("base")
    base = await save(store, work, Held(Manifest()))
    (work / "a.txt").write_text("one")
    one = await save(store, work, base)
    (work / "a.txt").write_text("two")
    two = await save(store, work, base)  # a retried turn saving from the same parent
    assert one.manifest.version != two.manifest.version
    await restored(store, tmp_path / "r1", one.manifest.version)
    await restored(store, tmp_path / "r2", two.manifest.version)
    assert (tmp_path / "r1" / "a.txt").read_text() == "one"
    assert (tmp_path / "r2" / "a.txt").read_text() == "two"


async def test_a_save_follows_no_link_and_keeps_only_links_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the agent's")
    store, work = LocalStore(tmp_path / "store"), tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "in.txt").write_text("inside")
    (work / "out-dir").symlink_to(outside)
    (work / "out-file").symlink_to(outside / "secret.txt")
    (work / "up").symlink_to("../outside")
    (work / "ok").symlink_to("sub/in.txt")
    (work / "sub" / "back").symlink_to("../sub/in.txt")
    # Found by an outside probe: judged by its text, `sub/../here/..` stays inside; followed, it leaves.
    (work / "here").symlink_to(".")
    (work / "sub" / "escape").symlink_to("../here/..")
    (work / "loop").symlink_to("loop")  # the kernel follows it nowhere: neither is it kept
    # Found by an outside probe: `A` was kept, judged through more links than the kernel follows
    # (it gave up and took it for inside), though through the kept links alone it leaves: the
    # version saved could never be loaded, and no later turn could restore the session.
    (work / "k").symlink_to(".")
    for i in range(1, 38):
        (work / f"c{i}").symlink_to(f"c{i + 1}")
    (work / "c38").symlink_to("k/..")
    (work / "b").symlink_to("c1")
    (work / "A").symlink_to("k/b/../..")
    held = await save(store, work, Held(Manifest()))
    assert sorted(held.manifest.files) == ["sub/in.txt"]
    kept = {"ok": "sub/in.txt", "sub/back": "../sub/in.txt", "here": ".", "k": "."}
    assert held.manifest.links == kept
    await restored(store, tmp_path / "copy", held.manifest.version)
    assert (tmp_path / "copy" / "ok").readlink() == Path("sub/in.txt")
    assert (tmp_path / "copy" / "ok").read_text() == "inside"


async def test_a_restore_never_writes_through_a_link(tmp_path: Path) -> None:
    store, work = LocalStore(tmp_path / "store"), tmp_path / "work"
    (work / "a").mkdir(parents=True)
    (work / "a" / "x.txt").write_text("payload")
    held = await save(store, work, Held(Manifest()))
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "a").symlink_to(outside)  # something swapped a folder for a link
    manifest = await workspaces.load_manifest(store, REF, held.manifest.version)
    with pytest.raises(OSError, match=r"Not a directory|Too many levels of symbolic links"):
        restore(target, Held(Manifest()), manifest, await workspaces.read_files(store, REF, manifest.files))
    assert list(outside.iterdir()) == []


def test_a_scan_stops_at_the_limits(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for i in range(5):
        (work / f"f{i}").write_bytes(bytes(100))
    with pytest.raises(WorkspaceTooLarge, match="more than 3 files"):
        scan(work, Held(Manifest()), VersionWriter(Manifest()), 10_000, 3)
    with pytest.raises(WorkspaceTooLarge, match="more than 250 bytes"):
        scan(work, Held(Manifest()), VersionWriter(Manifest()), 250, 100)


def test_folders_count_against_the_file_limit(tmp_path: Path) -> None:
    # Found by outside probes: 200,000 empty folders were saved, a 42 MB manifest, against no limit,
    # and their watches took all the host's; chains of folders would have cost as much unlisted.
    work = tmp_path / "work"
    for i in range(3):
        (work / f"d{i}" / "empty").mkdir(parents=True)
    writer = VersionWriter(Manifest())
    scan(work, Held(Manifest()), writer, 10_000, 6)
    assert writer.folders == {"d0/empty", "d1/empty", "d2/empty"}  # the others are implied
    writer.check_limits(10_000, 6)
    (work / "d3").mkdir()
    with pytest.raises(WorkspaceTooLarge, match="more than 6 files"):
        scan(work, Held(Manifest()), VersionWriter(Manifest()), 10_000, 6)
    writer.folders.add("d3")  # as a save of what changed finds it
    with pytest.raises(WorkspaceTooLarge, match="more than 6 files"):
        writer.check_limits(10_000, 6)


@pytest.mark.parametrize(
    "path", ["", "/abs", "a/../b", "a//b", "./a", "a/", "x\x00y", "tab\there", "é" * 600]
)
def test_invalid_paths_are_refused(path: str) -> None:
    with pytest.raises(workspaces.InvalidPath):
        workspaces.checked_path(path)


async def test_garbage_collection_keeps_the_parent_and_what_the_current_version_reads(tmp_path: Path) -> None:
    store, work = LocalStore(tmp_path / "store"), tmp_path / "work"
    work.mkdir()
    (work / "kept.txt").write_text("written once")
    held = await save(store, work, Held(Manifest()))
    first_pack = held.manifest.version
    versions = []
    for i in range(4):
        (work / "changing.txt").write_text(f"v{i}")
        held = await save(store, work, held)
        versions.append(held.manifest.version)
    await workspaces.collect_garbage(store, REF, held.manifest)
    keys = await store.keys(REF.prefix)
    manifests = sorted(key.rsplit("/", 1)[1] for key in keys if "/manifests/" in key)
    packs = sorted(key.rsplit("/", 1)[1] for key in keys if "/packs/" in key)
    assert manifests == versions[-2:]
    assert packs == sorted([first_pack, *versions[-2:]])  # kept.txt is still read from the first pack


async def test_an_unreachable_s3_store_is_unavailable_not_missing() -> None:
    from cli.embedded_redis import free_port
    from shared.settings import Settings
    from shared.workspace_store import StoreUnavailable, open_store

    settings = Settings(
        workspace_store="s3://bucket/prefix", workspace_s3_endpoint=f"http://127.0.0.1:{free_port()}"
    )
    store = open_store(settings)
    with pytest.raises(StoreUnavailable):
        await store.get("ws/anything")
    with pytest.raises(StoreUnavailable):
        await store.put("ws/anything", b"x")


async def test_a_save_of_few_changes_stores_only_them_against_a_whole_manifest(tmp_path: Path) -> None:
    store, work = LocalStore(tmp_path / "store"), tmp_path / "work"
    work.mkdir()
    for i in range(40):
        (work / f"f{i}.txt").write_text(f"file {i}")
    whole = await save(store, work, Held(Manifest()))
    held, versions = whole, []
    for i in range(3):
        (work / "f0.txt").write_text(f"v{i}")
        held = await save(store, work, held)
        versions.append(held.manifest.version)
        assert (held.manifest.base, set(held.manifest.delta)) == (whole.manifest.version, {"f0.txt"})
    stored = await store.get(REF.manifest_key(held.manifest.version or ""))
    assert len(stored) * 10 < len(await store.get(REF.manifest_key(whole.manifest.version or "")))
    assert await workspaces.load_manifest(store, REF, held.manifest.version) == held.manifest

    await workspaces.collect_garbage(store, REF, held.manifest)
    manifests = sorted(key.rsplit("/", 1)[1] for key in await store.keys(REF.prefix) if "/manifests/" in key)
    assert manifests == [whole.manifest.version, *versions[-2:]]
    again = await restored(store, tmp_path / "elsewhere", held.manifest.version)
    assert again.manifest == held.manifest
    assert (tmp_path / "elsewhere" / "f0.txt").read_text() == "v2"
    assert (tmp_path / "elsewhere" / "f39.txt").read_text() == "file 39"

    for i in range(11):  # past a quarter of the files: stored whole again
        (work / f"f{i}.txt").write_text("rewritten")
    assert (await save(store, work, held)).manifest.base is None


class RecordingStore(LocalStore):
    """The local store, noting the length of every read."""

    reads: list[int]

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        self.reads.append(length)
        return await super().get_range(key, start, length)


async def test_files_stream_in_bounded_pieces_and_archive_byte_exact(tmp_path: Path) -> None:
    store, work = RecordingStore(tmp_path / "store"), tmp_path / "work"
    (work / "d").mkdir(parents=True)
    sizes = {"empty": 0, "d/small": 30, "d/exact": 100, "big": 250, "tail": 7}
    for path, size in sizes.items():
        (work / path).write_bytes(os.urandom(size))
    held = await save(store, work, Held(Manifest()))
    (work / "d" / "small").write_bytes(b"second pack")  # the files now lie in two packs
    (work / "run").write_bytes(b"#!/bin/sh\n")
    (work / "run").chmod(0o755)
    (work / "link").symlink_to("d/exact")
    (work / "hollow").mkdir()
    held = await save(store, work, held)
    store.reads = []
    pieces = workspaces.stream_files(store, REF, held.manifest.files, piece=100)
    archive = b"".join([part async for part in _tar_gz(pieces, held.manifest)])
    assert store.reads
    assert max(store.reads) <= 100
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == sorted([*sizes, "run", "link", "hollow"])
        assert tar.getmember("hollow").isdir()
        for path in [*sizes, "run"]:
            member = tar.extractfile(path)
            assert member is not None
            assert member.read() == (work / path).read_bytes(), path
        assert tar.getmember("run").mode == 0o755
        assert tar.getmember("link").linkname == "d/exact"


NOBODY = 65534


def _unreadable_workspace_as_nobody(base: str) -> tuple[list[str], list[str], bool]:
    """In a process that is not root (root reads anything): a workspace with a folder and a file
    made unreadable, saved, then removed; what the save found, and whether anything was left."""
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    work = Path(base) / "work"
    (work / "locked" / "inner").mkdir(parents=True)
    (work / "locked" / "inner" / "a.txt").write_text("in a locked folder")
    (work / "unlisted").mkdir()
    (work / "unlisted" / "b.txt").write_text("in a folder that can be listed, not entered")
    (work / "secret.txt").write_text("a locked file")
    (work / "secret.txt").chmod(0)
    (work / "unlisted").chmod(0o600)
    (work / "locked").chmod(0)
    writer = VersionWriter(Manifest())
    scan(work, Held(Manifest()), writer, *LIMITS)
    found = [path for path, entry in sorted(writer.files.items()) if entry.bytes]
    (work / "locked").chmod(0)  # as a turn that is not saved may leave it
    removed(work)
    return found, sorted(writer.folders), work.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another user")
def test_what_the_agent_made_unreadable_is_saved_and_removed_all_the_same() -> None:
    base = tempfile.mkdtemp()
    try:
        os.chown(base, NOBODY, NOBODY)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            found, folders, left = pool.apply(_unreadable_workspace_as_nobody, (base,))
    finally:
        shutil.rmtree(base)
    assert found == ["locked/inner/a.txt", "secret.txt", "unlisted/b.txt"]
    assert folders == []
    assert not left


@pytest.mark.parametrize("seed", range(3))
async def test_random_versions_restore_exactly_over_the_one_before(tmp_path: Path, seed: int) -> None:
    rng, store = random.Random(seed), LocalStore(tmp_path / "store")
    work, copy = tmp_path / "work", tmp_path / "copy"
    work.mkdir()
    copy.mkdir()
    held = restored_here = Held(Manifest())
    for turn in range(25):
        for _ in range(rng.randint(1, 12)):
            a_random_change(work, rng)
        held = await save(store, work, held)
        target = await workspaces.load_manifest(store, REF, held.manifest.version)
        had = restored_here.manifest.files
        needed = {
            path: entry
            for path, entry in target.files.items()
            if (
                path not in had
                or (had[path].sha256, had[path].executable) != (entry.sha256, entry.executable)
            )
        }
        contents = await workspaces.read_files(store, REF, needed)
        restored_here = restore(copy, restored_here, target, contents)
        assert on_disk(copy) == on_disk(work), f"turn {turn}"


def test_a_stored_version_restores_only_its_links_that_lead_inside() -> None:
    """A version saved under earlier rules (a loop kept), or written by anything but a save: its
    links that do not lead inside are left out, and the version still loads."""
    body = {
        "version": "0000000001-000000000000",
        "files": {},
        "links": {"ok": "a/b", "loop": "loop", "out": "../x", "via": "out/y", "abs": "/etc"},
        "packs": {},
        "folders": [],
    }
    assert Manifest.decode(body).links == {"ok": "a/b"}


async def test_a_version_read_again_is_not_parsed_again(tmp_path: Path) -> None:
    """Found by an outside probe: each files-API request parsed the session's whole manifest (0.4 s
    for 20,000 long paths, on the API's loop); a version never changes, so it is read once."""
    store, work = LocalStore(tmp_path / "store"), tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("a")
    first = await save(store, work, Held(Manifest()))
    (work / "b.txt").write_text("b")
    second = await save(store, work, first)  # stored against the first, a whole one
    reads: list[str] = []
    get = store.get

    async def counted(key: str) -> bytes:
        reads.append(key)
        return await get(key)

    store.get = counted  # type: ignore[method-assign]
    version = second.manifest.version
    loaded = [await workspaces.load_manifest(store, REF, version) for _ in range(3)]
    assert loaded[0].files.keys() == {"a.txt", "b.txt"}
    assert all(manifest is loaded[0] for manifest in loaded)
    assert len(reads) <= 2  # once each at most (its base may have been read when it was saved)


async def test_live_sessions_due_in_the_sweep_hold_up_no_expired_one(tmp_path: Path, redis: Redis) -> None:
    """Found by an outside probe: a session kept past its last use plus the TTL (a turn had held
    it) was put back in the sweep's index in the past; the 32 first came first again each round,
    and an expired session's files behind them stayed in the store."""
    store = LocalStore(tmp_path / "store")
    now_ms = int(time.time() * 1000)
    live = [WorkspaceRef("0" * 32, f"live-{i}", REF.incarnation) for i in range(40)]
    for i, ref in enumerate(live):
        record = session_key(ref.owner, ref.session)
        await redis.hset(record, mapping={"transcript": ref.incarnation, "last_used": now_ms - 3_600_000})  # type: ignore[misc]
        await redis.expire(record, 600 if i % 2 else 7200)  # a running turn keeps some longer
        await redis.zadd(WORKSPACES_INDEX, {ref.member: now_ms - 100_000 + i})
    expired = WorkspaceRef("0" * 32, "expired", REF.incarnation)
    await store.put(expired.prefix + "manifests/1", b"{}")
    await redis.zadd(WORKSPACES_INDEX, {expired.member: now_ms - 1_000})  # due after all of them
    deleted = await workspaces.sweep(store, redis, ttl_s=600) + await workspaces.sweep(
        store, redis, ttl_s=600
    )
    assert deleted == [expired]
    assert await store.keys(expired.prefix) == []
    for ref in live:  # looked at again when each would expire (its record's TTL), within the TTL
        score = await redis.zscore(WORKSPACES_INDEX, ref.member)
        assert score is not None
        assert now_ms + 590_000 < score < now_ms + 620_000
