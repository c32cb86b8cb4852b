"""Session workspaces through the API, on the scripted backend (which writes and reads files in a
session's directory as the agent would), against the local store and a real S3 server: files
that persist across turns, the files API, limits, key scoping, and nothing left after a session.

The same with the real SDK and CLI, moving between worker processes: tests/test_claude_workspaces.py.
"""

import asyncio
import io
import json
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from shared.settings import Settings
from shared.workspace_store import open_store
from tests.conftest import Gateway, chat, workspace_store_env

_SCHEMAS = json.loads((Path(__file__).parent / "schemas" / "openai_container_files.json").read_text())
KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"


def assert_file_schema(instance: Any, name: str) -> None:
    jsonschema.validate(instance, {**_SCHEMAS, "$ref": f"#/$defs/{name}"})


def stored_keys(gateway: Gateway) -> list[str]:
    """Every object in the gateway's workspace store."""
    settings = Settings(**{name.lower(): value for name, value in gateway.env.items() if "WORKSPACE" in name})
    return asyncio.run(open_store(settings).keys("ws/"))


@pytest.fixture(scope="module", params=["local", "s3"])
def files_gateway(request: pytest.FixtureRequest, start_gateway: Any, tmp_path_factory: Any) -> Gateway:
    s3 = request.getfixturevalue("s3_server") if request.param == "s3" else None
    store = workspace_store_env(request.param, s3, tmp_path_factory.mktemp("store"))
    gateway: Gateway = start_gateway(
        workers=2,
        BACKEND="scripted",
        API_KEYS=f"{KEY_A},{KEY_B}",
        WORKSPACE_MAX_BYTES="200000",
        WORKSPACE_MAX_FILES="20",
        **store,
    )
    return gateway


def turn(gateway: Gateway, session: str, script: dict[str, Any], key: str = KEY_A) -> httpx.Response:
    body = chat("script:" + json.dumps({"text": "ok", **script}), session_id=session)
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=_auth(key), timeout=30)


def reply(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def files_url(gateway: Gateway, session: str, rest: str = "") -> str:
    return f"{gateway.url}/v1/sessions/{session}/files{rest}"


def listed(gateway: Gateway, session: str, key: str = KEY_A) -> dict[str, Any]:
    response = httpx.get(files_url(gateway, session), headers=_auth(key), timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_files_written_in_a_turn_are_there_in_the_next_and_download_byte_exact(
    files_gateway: Gateway,
) -> None:
    text = "line one\nünïcode ✓\n"
    assert reply(turn(files_gateway, "keep-1", {"write": {"notes.txt": text, "src/app.py": "x = 1\n"}}))
    for _ in range(3):  # either worker may take the next turns
        assert reply(turn(files_gateway, "keep-1", {"read": "notes.txt"})) == text
    body = listed(files_gateway, "keep-1")
    assert_file_schema(body, "ContainerFileListResource")
    by_path = {item["path"]: item for item in body["data"]}
    assert sorted(by_path) == ["notes.txt", "src/app.py"]
    notes = by_path["notes.txt"]
    assert (notes["bytes"], notes["source"]) == (len(text.encode()), "assistant")
    assert notes["container_id"] == "keep-1"
    one = httpx.get(files_url(files_gateway, "keep-1", f"/{notes['id']}"), headers=_auth(KEY_A), timeout=10)
    assert one.json() == notes
    content = httpx.get(files_url(files_gateway, "keep-1", f"/{notes['id']}/content"), headers=_auth(KEY_A))
    assert content.status_code == 200
    assert content.content == text.encode()
    assert content.headers["content-length"] == str(len(text.encode()))
    archive = httpx.get(f"{files_gateway.url}/v1/sessions/keep-1/archive", headers=_auth(KEY_A), timeout=10)
    assert archive.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["notes.txt", "src/app.py"]
        extracted = tar.extractfile("notes.txt")
        assert extracted is not None
        assert extracted.read() == text.encode()


def test_an_uploaded_file_is_read_by_the_next_turn_and_can_be_deleted(files_gateway: Gateway) -> None:
    data = b"uploaded \x00\xff bytes"
    upload = httpx.post(
        files_url(files_gateway, "upload-1"),
        files={"file": ("input.bin", data)},
        data={"path": "in/input.bin"},
        headers=_auth(KEY_A),
        timeout=10,
    )
    assert upload.status_code == 200, upload.text
    created = upload.json()
    assert_file_schema(created, "ContainerFileResource")
    assert (created["path"], created["bytes"], created["source"]) == ("in/input.bin", len(data), "user")
    # The upload created the session (no turns yet); its first turn finds the file.
    session = httpx.get(f"{files_gateway.url}/v1/sessions/upload-1", headers=_auth(KEY_A)).json()
    assert session["message_count"] == 0
    assert reply(turn(files_gateway, "upload-1", {"write": {"copy.txt": "made"}})) == "ok"
    paths = {item["path"] for item in listed(files_gateway, "upload-1")["data"]}
    assert paths == {"in/input.bin", "copy.txt"}
    deleted = httpx.delete(files_url(files_gateway, "upload-1", f"/{created['id']}"), headers=_auth(KEY_A))
    assert deleted.json() == {"id": created["id"], "object": "container.file.deleted", "deleted": True}
    assert reply(turn(files_gateway, "upload-1", {"read": "in/input.bin"})) == "(no such file)"
    assert reply(turn(files_gateway, "upload-1", {"read": "copy.txt"})) == "made"


# A name longer than a file system takes (found by an outside probe: taken, then no turn could
# restore the session).
@pytest.mark.parametrize(
    "path", ["../escape.txt", "a//b", "x\n", "/", "a/./b", "/abs", "keep.txt/", "L" * 256]
)
def test_upload_paths_are_validated(files_gateway: Gateway, path: str) -> None:
    response = httpx.post(
        files_url(files_gateway, "paths-1"),
        files={"file": ("f", b"x")},
        data={"path": path},
        headers=_auth(KEY_A),
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_path"


def test_an_uploads_file_name_is_its_path_folders_and_all(files_gateway: Gateway) -> None:
    """Found by an outside probe: the file name was cut to its last name, so `src/main.py` and
    `tests/main.py` both went to `main.py`, the second replacing the first."""
    for name in ("src/main.py", "tests/main.py"):
        upload = httpx.post(
            files_url(files_gateway, "names-1"), files={"file": (name, name.encode())}, headers=_auth(KEY_A)
        )
        assert (upload.status_code, upload.json()["path"]) == (200, name), upload.text
    assert sorted(item["path"] for item in listed(files_gateway, "names-1")["data"]) == [
        "src/main.py",
        "tests/main.py",
    ]
    outside = httpx.post(
        files_url(files_gateway, "names-1"), files={"file": ("../up.txt", b"x")}, headers=_auth(KEY_A)
    )
    assert (outside.status_code, outside.json()["error"]["code"]) == (400, "invalid_path")


def test_an_upload_of_several_files_or_paths_is_refused(files_gateway: Gateway) -> None:
    """Found by an outside probe: three `file` parts answered 200 and only the last was kept."""
    several = [
        ({"files": [("file", ("a", b"a")), ("file", ("b", b"b"))]}, "file"),
        ({"files": {"file": ("a", b"a")}, "data": {"path": ["x.txt", "y.txt"]}}, "path"),
    ]
    for parts, param in several:
        response = httpx.post(files_url(files_gateway, "parts-1"), headers=_auth(KEY_A), **parts)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    assert httpx.get(files_url(files_gateway, "parts-1"), headers=_auth(KEY_A)).status_code == 404


def test_a_file_cannot_replace_a_folder_or_go_under_a_file(files_gateway: Gateway) -> None:
    """Found by an outside probe: a folder holding only empty folders (or, as here, a pipe, which
    is not kept) was replaced by an uploaded file, and no later turn could restore the session."""
    assert reply(turn(files_gateway, "conflict-1", {"write": {"full/f.txt": "x"}, "fifo": ["e1/e2/pipe"]}))
    for path in ("full", "e1", "e1/e2", "full/f.txt/under"):
        upload = httpx.post(
            files_url(files_gateway, "conflict-1"),
            files={"file": ("f", b"x")},
            data={"path": path},
            headers=_auth(KEY_A),
        )
        assert upload.status_code == 400, (path, upload.text)
        assert upload.json()["error"]["code"] == "path_conflict", path
    assert reply(turn(files_gateway, "conflict-1", {"read": "full/f.txt"})) == "x"


def test_what_the_save_leaves_out_is_removed_from_the_workers_copy(files_gateway: Gateway) -> None:
    """Found by an outside probe: a file whose name is no valid path (not UTF-8, a control
    character) was left out of the save but stayed in the worker's copy of the workspace, outside
    the limits: 151 MiB past the 100 MiB, in each of up to 64 sessions per worker."""
    unsaved = {"big\u0001.bin": 300_000, "dir\u0001/big.bin": 300_000, "ok/sub\u0001/f": 10}
    for step in range(2):  # the first save scans the whole workspace, the next only what changed
        session = f"unsaved-{step}"
        if step:
            assert reply(turn(files_gateway, session, {"write": {"first.txt": "1"}}))
        script = {"fill": unsaved, "fifo": ["pipe", "ok/pipe"], "write": {"kept.txt": "k"}}
        assert reply(turn(files_gateway, session, script))
        expected = ["kept.txt", "first.txt"][: step + 1]
        assert sorted(file["path"] for file in listed(files_gateway, session)["data"]) == sorted(expected)
        for name in unsaved:
            assert reply(turn(files_gateway, session, {"read": name})) == "(no such file)", (step, name)
        copies = list(Path(files_gateway.env["WORKSPACE_ROOT"]).glob(f"sessions/*/*.{session}.*"))
        assert copies  # where the session's turns ran
        left = [
            path.name for copy in copies for path in copy.rglob("*") if not path.is_file() | path.is_dir()
        ]
        assert not left, (step, left)  # the fifos


def test_a_save_over_the_limit_is_refused_and_the_last_good_version_stays(files_gateway: Gateway) -> None:
    assert reply(turn(files_gateway, "limit-1", {"write": {"good.txt": "good"}}))
    too_big = turn(files_gateway, "limit-1", {"write": {"good.txt": "changed"}, "fill": {"big.bin": 300_000}})
    assert too_big.status_code == 413, too_big.text
    error = too_big.json()["error"]
    assert error["code"] == "workspace_too_large"
    assert "200000 bytes" in error["message"]
    too_many = turn(files_gateway, "limit-1", {"write": {f"f{i}.txt": "x" for i in range(25)}})
    assert too_many.status_code == 413
    assert "20 files" in too_many.json()["error"]["message"]
    # Neither the files nor the conversation advanced.
    assert reply(turn(files_gateway, "limit-1", {"read": "good.txt"})) == "good"
    assert [item["path"] for item in listed(files_gateway, "limit-1")["data"]] == ["good.txt"]
    session = httpx.get(f"{files_gateway.url}/v1/sessions/limit-1", headers=_auth(KEY_A)).json()
    assert session["message_count"] == 4  # two completed turns
    upload = httpx.post(
        files_url(files_gateway, "limit-1"), files={"file": ("big.bin", bytes(300_000))}, headers=_auth(KEY_A)
    )
    assert upload.status_code == 413
    assert upload.json()["error"]["code"] == "workspace_too_large"


def test_a_keys_sessions_hold_at_most_their_share_of_the_store_together(start_gateway: Any) -> None:
    """Found by an outside probe: uploads make sessions without a model call, each up to
    WORKSPACE_MAX_BYTES, with no bound on how many: one key filled the store's disk, which
    `up`'s Redis shares, at 1.2 GB a minute."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", API_KEYS=f"{KEY_A},{KEY_B}", WORKSPACE_MAX_BYTES_PER_KEY="1000"
    )

    def upload(session: str, size: int, key: str = KEY_A) -> httpx.Response:
        files = {"file": ("f.bin", bytes(size))}
        return httpx.post(files_url(gateway, session), files=files, headers=_auth(key), timeout=10)

    assert upload("quota-1", 600).status_code == 200
    refused = upload("quota-2", 600)
    assert refused.status_code == 413, refused.text
    assert refused.json()["error"]["code"] == "workspace_too_large"
    assert "600 in its other sessions" in refused.json()["error"]["message"]
    assert upload("quota-1", 900).status_code == 200  # the same session's file replaced: 900 in all
    assert upload("quota-2", 600, key=KEY_B).status_code == 200  # another key's share
    too_big = turn(gateway, "quota-3", {"fill": {"big.bin": 200}})  # an agent's turn, on a worker
    assert too_big.status_code == 413, too_big.text
    assert too_big.json()["error"]["code"] == "workspace_too_large"
    assert reply(turn(gateway, "quota-3", {"write": {"small.txt": "x" * 50}}))
    assert httpx.delete(f"{gateway.url}/v1/sessions/quota-1", headers=_auth(KEY_A)).status_code == 200
    assert upload("quota-2", 600).status_code == 200  # room again


def _uploads_read_back(gateway: Gateway, session: str, paths: tuple[str, ...]) -> None:
    """Uploads a file to each path over what the agent left there; the next turns read them."""
    for path in paths:
        upload = httpx.post(
            files_url(gateway, session),
            files={"file": ("f", f"uploaded {path}".encode())},
            data={"path": path},
            headers=_auth(KEY_A),
        )
        assert upload.status_code == 200, upload.text
    for path in paths:
        assert reply(turn(gateway, session, {"read": path})) == f"uploaded {path}"


def test_an_upload_where_the_agent_left_a_link_the_save_dropped_reaches_the_next_turn(
    files_gateway: Gateway,
) -> None:
    # Found by an outside probe: the worker's copy still had the links (to outside the workspace)
    # that the save had left out, the update could not put the uploaded files there: 503.
    assert reply(turn(files_gateway, "over-link-1", {"link": {"t": "/etc/hostname", "dd": "/tmp"}}))
    _uploads_read_back(files_gateway, "over-link-1", ("t", "dd/f.txt"))


def test_an_upload_where_the_agent_left_a_named_pipe_reaches_the_next_turn(files_gateway: Gateway) -> None:
    """Found by an outside probe: the worker opened the pipe to write the uploaded file and waited
    for a reader forever, holding a job slot and a thread; a few such turns took the worker."""
    assert reply(turn(files_gateway, "over-fifo-1", {"fifo": ["data.txt", "d/pipe"]}))
    _uploads_read_back(files_gateway, "over-fifo-1", ("data.txt", "d/pipe"))


def test_a_failed_turn_leaves_the_files_as_they_were(files_gateway: Gateway) -> None:
    assert reply(turn(files_gateway, "fail-1", {"write": {"state.txt": "v1"}}))
    failed = turn(files_gateway, "fail-1", {"write": {"state.txt": "v2", "new.txt": "n"}, "fail_after": 0})
    assert failed.status_code == 502
    assert reply(turn(files_gateway, "fail-1", {"read": "state.txt"})) == "v1"
    assert reply(turn(files_gateway, "fail-1", {"read": "new.txt"})) == "(no such file)"


def test_another_key_gets_404_on_every_file_route(files_gateway: Gateway) -> None:
    assert reply(turn(files_gateway, "mine-1", {"write": {"secret.txt": "for key a"}}))
    file_id = listed(files_gateway, "mine-1")["data"][0]["id"]
    other = _auth(KEY_B)
    base = f"{files_gateway.url}/v1/sessions/mine-1"
    for method, url in [
        ("GET", f"{base}/files"),
        ("GET", f"{base}/files/{file_id}"),
        ("GET", f"{base}/files/{file_id}/content"),
        ("GET", f"{base}/archive"),
        ("DELETE", f"{base}/files/{file_id}"),
    ]:
        response = httpx.request(method, url, headers=other, timeout=10)
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["error"]["code"] == "session_not_found"
    # An upload under the same id makes key b a session of its own; key a's is untouched.
    upload = httpx.post(f"{base}/files", files={"file": ("secret.txt", b"key b")}, headers=other)
    assert upload.status_code == 200
    assert reply(turn(files_gateway, "mine-1", {"read": "secret.txt"})) == "for key a"
    assert reply(turn(files_gateway, "mine-1", {"read": "secret.txt"}, key=KEY_B)) == "key b"
    for key, content in [(KEY_A, b"for key a"), (KEY_B, b"key b")]:  # and so does its files API
        assert [item["path"] for item in listed(files_gateway, "mine-1", key)["data"]] == ["secret.txt"]
        download = httpx.get(f"{base}/files/{file_id}/content", headers=_auth(key), timeout=10)
        assert download.content == content


def test_a_deleted_session_leaves_nothing_in_the_store(files_gateway: Gateway) -> None:
    assert reply(turn(files_gateway, "gone-1", {"write": {"a.txt": "a", "b/c.txt": "c"}}))
    assert reply(turn(files_gateway, "gone-1", {"write": {"a.txt": "changed"}}))
    assert any("/gone-1/" in key for key in stored_keys(files_gateway))
    deleted = httpx.delete(f"{files_gateway.url}/v1/sessions/gone-1", headers=_auth(KEY_A))
    assert deleted.status_code == 200
    assert not [key for key in stored_keys(files_gateway) if "/gone-1/" in key]
    assert httpx.get(files_url(files_gateway, "gone-1"), headers=_auth(KEY_A)).status_code == 404


def test_an_expired_session_leaves_nothing_in_the_store(start_gateway: Any, tmp_path: Path) -> None:
    store = workspace_store_env("local", None, tmp_path)
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", SESSION_TTL_S="2", **store)
    body = chat("script:" + json.dumps({"text": "ok", "write": {"a.txt": "a"}}), session_id="short-1")
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
    assert stored_keys(gateway)
    deadline = time.monotonic() + 30  # expires after 2 s; the workers sweep every second or so
    while stored_keys(gateway) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stored_keys(gateway) == []
    assert not any((tmp_path / "store").rglob("*"))  # not even its folders


def test_a_sessions_turns_stay_on_the_worker_that_holds_its_files(files_gateway: Gateway) -> None:
    workers = set()
    for number in range(6):
        response = turn(files_gateway, "stay-1", {"write": {f"t{number}.txt": "x"}})
        job_id = response.json()["id"].removeprefix("chatcmpl-")
        workers.add(files_gateway.redis().hget(f"gateway:job:{job_id}", "worker"))
    assert len(workers) == 1, workers


def test_a_killed_workers_copies_of_sessions_are_removed_by_the_next_worker(
    start_gateway: Any, tmp_path: Path
) -> None:
    # A worker keeps copies of the sessions it ran; killed, it cannot remove them, and a session
    # deleted since must not stay on disk (found by an outside probe: they stayed for good).
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", **workspace_store_env("local", None, tmp_path)
    )
    body = chat(
        "script:" + json.dumps({"text": "ok", "write": {"private.txt": "a caller's data"}}), session_id="k-1"
    )
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
    sessions = gateway.logs / "workspaces" / "sessions"
    [copy] = sessions.glob("*/*/private.txt")
    killed = gateway.workers[0]
    killed.kill()
    killed.wait(timeout=10)
    assert httpx.delete(f"{gateway.url}/v1/sessions/k-1", timeout=10).status_code == 200
    assert copy.exists()  # no live worker held it: nothing removed it
    gateway.start_worker()
    deadline = time.monotonic() + 30
    while copy.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not copy.exists()
    # What is left is the new worker's own copies, and its mark beside them.
    [root, mark] = sorted(path.name for path in sessions.iterdir())
    assert mark == f"{root}.worker"


def test_a_store_that_stops_answering_fails_requests_and_turns_within_its_bounds(
    files_gateway: Gateway, request: pytest.FixtureRequest
) -> None:
    """Found by an outside probe: with the S3 server frozen (it takes connections, answers nothing),
    each files request and session turn waited 181 s (obstore's default retries) before its 503,
    the turn holding its worker slot and session. Now each fails within about 45 s, well inside
    the client's wait here, and all is well once the store answers again."""
    if not files_gateway.env["WORKSPACE_STORE"].startswith("s3://"):
        pytest.skip("a local store does not freeze")
    weed = request.getfixturevalue("s3_server").process
    upload = {"files": {"file": ("a.txt", b"a")}, "headers": _auth(KEY_A), "timeout": 100}
    assert httpx.post(files_url(files_gateway, "frozen-1"), **upload).status_code == 200
    weed.send_signal(signal.SIGSTOP)
    try:
        frozen = httpx.post(files_url(files_gateway, "frozen-1"), **upload)
        assert frozen.status_code == 503, frozen.text
        assert frozen.json()["error"]["code"] == "workspace_store_unavailable"
        body = chat("script:" + json.dumps({"text": "ok", "write": {"b.txt": "b"}}), session_id="frozen-1")
        turn = httpx.post(
            f"{files_gateway.url}/v1/chat/completions", json=body, headers=_auth(KEY_A), timeout=100
        )
        assert turn.status_code == 503, turn.text
    finally:
        weed.send_signal(signal.SIGCONT)
    assert httpx.post(files_url(files_gateway, "frozen-1"), **upload).status_code == 200
    url = f"{files_gateway.url}/v1/chat/completions"
    assert reply(httpx.post(url, json=body, headers=_auth(KEY_A), timeout=100)) == "ok"


def test_files_missing_from_the_store_are_the_stores_fault_not_a_change(
    start_gateway: Any, tmp_path: Path
) -> None:
    """Found by an outside probe: a worker given a store of its own saved a session's files there,
    and every read through the API answered 409 "changed while they were read; retry", for good."""
    store = workspace_store_env("local", None, tmp_path)
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", **store)
    uploaded = httpx.post(files_url(gateway, "elsewhere-1"), files={"file": ("a.txt", b"a")}, timeout=10)
    assert uploaded.status_code == 200, uploaded.text
    for saved in (tmp_path / "store").rglob("*"):  # as seen from a process with another store
        if saved.is_file():
            saved.unlink()
    response = httpx.get(files_url(gateway, "elsewhere-1"), timeout=10)
    # A turn's worker meets it too (a re-check probe: a 503 backend_unavailable, retried).
    turn = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat("hi", session_id="elsewhere-1"), timeout=30
    )
    for refused in (response, turn):
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "workspace_unavailable"
        assert refused.headers["x-should-retry"] == "false"
