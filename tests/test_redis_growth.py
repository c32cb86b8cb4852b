"""What a job leaves in Redis, and what the gateway answers when Redis is full: an ended job keeps
no payload, a `store: false` response no copy of its input, inline images count against a limit,
and a Redis at its `maxmemory` (a real server, `noeviction`) gets a clear 503 with nothing
half-written."""

import base64
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cli.embedded_redis import EmbeddedRedis
from shared.keys import SWEPT, WORKER_LOAD
from tests.conftest import Gateway, chat
from tests.test_access import bearer, keys_cli, new_key
from tests.test_bad_input import assert_error

IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(3000)).decode()


def job_id(completion_id: str) -> str:
    return completion_id.removeprefix("chatcmpl-").removeprefix("resp_")


def test_an_ended_job_keeps_no_payload(scripted: Gateway) -> None:
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": IMAGE}}]
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": content}]}
    done = httpx.post(f"{scripted.url}/v1/chat/completions", json=body, timeout=30)
    assert done.status_code == 200, done.text
    record = scripted.redis().hgetall(f"gateway:job:{job_id(done.json()['id'])}")
    assert record[b"ended"] == b"completed"
    assert b"payload" not in record
    assert IMAGE.encode() not in b"".join(record.values())


def test_a_response_not_stored_keeps_no_copy_of_its_input_and_cannot_be_continued(scripted: Gateway) -> None:
    url = f"{scripted.url}/v1/responses"
    text = "remember this long input " * 100
    created = httpx.post(url, json={"model": "claude-sonnet-4-5", "input": text, "store": False}, timeout=30)
    assert created.status_code == 200, created.text
    stored = scripted.redis().get(f"gateway:response:{job_id(created.json()['id'])}")
    assert stored is not None
    assert text not in stored.decode()
    follow_up = {"model": "claude-sonnet-4-5", "input": "and?", "previous_response_id": created.json()["id"]}
    assert_error(httpx.post(url, json=follow_up, timeout=30), 400, param="previous_response_id")
    kept = httpx.post(url, json={"model": "claude-sonnet-4-5", "input": text}, timeout=30)
    assert text in scripted.redis().get(f"gateway:response:{job_id(kept.json()['id'])}").decode()


def test_inline_images_count_against_a_limit(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted", MAX_IMAGE_BYTES="5000")
    two = [{"type": "image_url", "image_url": {"url": IMAGE}}] * 2
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": two}]}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30)
    assert_error(response, 400, code="images_too_large")
    source = {"type": "base64", "media_type": "image/png", "data": IMAGE.partition(",")[2]}
    blocks = [{"type": "image", "source": source}] * 2
    messages = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": blocks}],
    }
    refused = httpx.post(f"{gateway.url}/v1/messages", json=messages, timeout=30)
    assert refused.status_code == 400, refused.text
    assert "images are too large" in refused.text


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path, persistent=False)
    server.start()
    yield server
    server.stop()


def _fill(client: "redis.Redis[bytes]") -> None:
    """Redis at its `maxmemory` with `noeviction`: every write that needs memory is refused."""
    client.config_set("maxmemory-policy", "noeviction")
    for i in range(64):
        client.set(f"filler:{i}", b"x" * 65536)
    client.config_set("maxmemory", str(client.info("memory")["used_memory"] - (1 << 20)))


def _written_by_requests(client: "redis.Redis[bytes]") -> list[bytes]:
    """The gateway's keys but the workers' own bookkeeping, which goes on while Redis is full
    (their sweeps, and the end of a job that ran: `allow-oom` scripts)."""
    bookkeeping = {SWEPT.encode(), WORKER_LOAD.encode()}
    return sorted(key for key in client.scan_iter("gateway:*") if key not in bookkeeping)


def test_a_full_redis_gets_a_clear_503_and_nothing_half_written(
    start_gateway: Any, small_redis: EmbeddedRedis
) -> None:
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", redis_url=small_redis.url)
    client = gateway.redis()
    assert (
        httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("warm up"), timeout=30).status_code == 200
    )
    _fill(client)
    before = _written_by_requests(client)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", chat("hi")),
        ("/v1/chat/completions", chat("hi", stream=True)),
        ("/v1/chat/completions", chat("hi", background=True)),
        ("/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi"}),
        (
            "/v1/messages",
            {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
        ),
    ]
    for path, body in requests:
        response = httpx.post(f"{gateway.url}{path}", json=body, timeout=30)
        assert response.status_code == 503, (path, response.text)
        assert "storage is full" in response.text
        assert "Traceback" not in response.text
    assert _written_by_requests(client) == before
    assert client.zcard("gateway:queue") == 0
    # Room again: the gateway serves again, nothing to repair.
    client.config_set("maxmemory", "0")
    deadline = time.monotonic() + 10
    while (
        done := httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("again"), timeout=30)
    ).status_code != 200:
        assert time.monotonic() < deadline, done.text
        time.sleep(0.2)
    assert json.loads(done.text)["choices"][0]["message"]["content"]


def test_with_rate_limits_a_full_redis_is_a_clear_503_too(
    start_gateway: Any, small_redis: EmbeddedRedis
) -> None:
    gateway: Gateway = start_gateway(
        workers=0, BACKEND="scripted", redis_url=small_redis.url, RATE_LIMIT_ENABLED="true"
    )
    _fill(gateway.redis())
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=30)
    assert_error(response, 503, code="storage_full")


def test_a_key_is_revoked_while_redis_is_full(start_gateway: Any, small_redis: EmbeddedRedis) -> None:
    """Found by an outside probe: `keys revoke` was refused by a full Redis (the key deleted in one
    transaction with a write that needs memory), so a leaked key, maybe the one filling it, stayed
    valid. `keys create` is refused, in one sentence."""
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted", redis_url=small_redis.url)
    key_id, secret = new_key(gateway)
    _, kept = new_key(gateway, "kept")
    _fill(gateway.redis())
    models = f"{gateway.url}/v1/models"
    assert httpx.get(models, headers=bearer(secret), timeout=10).status_code == 200
    revoked = keys_cli(gateway, "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.get(models, headers=bearer(secret), timeout=10).status_code == 401
    assert httpx.get(models, headers=bearer(kept), timeout=10).status_code == 200
    refused = keys_cli(gateway, "create", "--name", "more")
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "full" in refused.stderr
    assert "HSET" not in refused.stderr  # no command of the gateway's internals


def test_a_redis_that_cannot_save_gets_503s_not_a_dead_port(start_gateway: Any, tmp_path: Path) -> None:
    """Found by an outside probe: a Redis that cannot save to its full disk refuses writes (MISCONF),
    which the API answered with 500s and tracebacks in its log, and `keys create` with the command
    it sent, the new key's digest in it."""
    small_redis = EmbeddedRedis(tmp_path / "data", persistent=False)
    small_redis.start()
    client = redis.Redis.from_url(small_redis.url)
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted", redis_url=small_redis.url)
    shutil.rmtree(tmp_path / "data")  # its next save finds no folder
    client.config_set("save", "3600 1")
    try:
        client.bgsave()
        deadline = time.monotonic() + 10
        while client.info("persistence")["rdb_last_bgsave_status"] != "err" and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(redis.ResponseError, match="MISCONF"):
            client.set("probe", 1)
        assert httpx.get(f"{gateway.url}/v1/models", timeout=10).status_code == 200  # no write needed
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=30)
        assert_error(refused, 503, code="storage_full")
        # Not ready either (a re-check probe's /ready said "ready" while every write was refused).
        assert_error(httpx.get(f"{gateway.url}/ready", timeout=10), 503, code="storage_full")
        assert "Traceback" not in (gateway.logs / "api-0.log").read_text()
        said = keys_cli(gateway, "create", "--name", "more")
        assert said.returncode == 1
        assert said.stderr.strip().count("\n") == 0, said.stderr
        assert "cannot save to its disk" in said.stderr
        assert "HSET" not in said.stderr
    finally:
        client.config_set("save", "")
        client.close()
        small_redis.stop()
