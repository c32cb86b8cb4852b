"""Operations on real processes: queue depth and age in /metrics and `status`, worker heartbeats,
/ready, and structured logs. The busy worker is the scripted backend with a slow script and
`JOBS_PER_WORKER=1`, so later jobs wait in the real arq queue. The busy job runs until the test
cancels it: a test that waits on a job of fixed length races the machine's load."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Gateway, chat, claude_env
from tests.fake_anthropic import FakeAnthropic

HEARTBEAT = {"HEARTBEAT_INTERVAL_S": "0.5"}  # TTL 1.5 s: a dead worker goes within seconds
BUSY_TOKENS_PER_S = 20


def script(**spec: Any) -> str:
    return "script:" + json.dumps(spec)


def scrape(gateway: Gateway) -> dict[str, float]:
    """`/metrics` as `{"name{label=value,...}": value}`."""
    response = httpx.get(f"{gateway.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_for(condition: Callable[[], bool], within_s: float, what: str) -> float:
    """Polls until `condition()` holds; returns how long it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within_s, f"{what} did not happen within {within_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def status_json(gateway: Gateway) -> dict[str, Any]:
    env = {**os.environ, "REDIS_URL": gateway.redis_url, "LOG_LEVEL": "warning"}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "status", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    snapshot: dict[str, Any] = json.loads(done.stdout)
    return snapshot


class Requests:
    """Completion requests sent from threads, so the test can watch the queue meanwhile."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.responses: dict[int, httpx.Response] = {}
        self.threads: list[threading.Thread] = []

    def send(self, content: str) -> None:
        def run(index: int) -> None:
            url = f"{self.gateway.url}/v1/chat/completions"
            self.responses[index] = httpx.post(url, json=chat(content), timeout=60)

        thread = threading.Thread(target=run, args=(len(self.threads),), daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> list[httpx.Response]:
        """The responses, in the order the requests were sent."""
        for thread in self.threads:
            thread.join(timeout=60)
        return [self.responses[index] for index in range(len(self.threads))]


def busy_job() -> str:
    """A job that streams for far longer than any test waits on it (see `cancel_running_job`)."""
    return script(text="w", tokens=600 * BUSY_TOKENS_PER_S, delay_ms=1000 / BUSY_TOKENS_PER_S)


def running_job(gateway: Gateway) -> str:
    """The id of the one job the gateway's workers run, from `/status`."""
    snapshot = httpx.get(f"{gateway.url}/status", timeout=10).json()
    [job_id] = [job for worker in snapshot["workers"] for job in worker["jobs"]]
    return str(job_id)


def cancel_running_job(gateway: Gateway, job_id: str) -> None:
    """Ends the busy job, which frees its worker's slot for the jobs queued behind it."""
    response = httpx.post(f"{gateway.url}/v1/chat/completions/chatcmpl-{job_id}/cancel", timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"


def assert_cancelled(response: httpx.Response) -> None:
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "cancelled"


@pytest.fixture(scope="module")
def single_slot(start_gateway: Any) -> Gateway:
    """One worker that runs one job at a time."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", JOBS_PER_WORKER="1", **HEARTBEAT)
    wait_for(lambda: scrape(gateway)["gateway_workers_alive"] == 1, 20, "the worker's first heartbeat")
    return gateway


def test_metrics_and_status_report_depth_and_age_of_jobs_queued_behind_a_busy_worker(
    single_slot: Gateway,
) -> None:
    requests = Requests(single_slot)
    requests.send(busy_job())
    wait_for(lambda: scrape(single_slot)["gateway_jobs_running"] == 1, 20, "the busy job starting")

    first_queued = time.time()
    for n in range(3):
        requests.send(script(text=f"queued {n}"))
    wait_for(lambda: scrape(single_slot)["gateway_queue_depth"] == 3, 10, "three jobs queued")
    time.sleep(1.0)

    samples = scrape(single_slot)
    age_bound = time.time() - first_queued + 0.2
    assert samples["gateway_queue_depth"] == 3
    assert 1.0 <= samples["gateway_queue_oldest_age_seconds"] <= age_bound
    assert samples["gateway_jobs_running"] == 1
    assert samples["gateway_workers_alive"] == 1
    assert samples["gateway_worker_slots"] == 1

    snapshot = status_json(single_slot)
    assert snapshot["queue"]["depth"] == 3
    assert 1.0 <= snapshot["queue"]["oldest_age_s"] <= time.time() - first_queued + 0.2
    assert snapshot["jobs_running"] == 1
    [worker] = snapshot["workers"]
    assert worker["slots"] == 1
    assert len(worker["jobs"]) == 1
    assert worker["pid"] == single_slot.workers[0].pid

    busy_ran_s = time.time() - first_queued
    cancel_running_job(single_slot, worker["jobs"][0])
    busy, *queued = requests.join()
    assert_cancelled(busy)  # status named the job the worker was running: cancelling it ended that one
    assert [r.status_code for r in queued] == [200] * 3
    assert [r.json()["choices"][0]["message"]["content"] for r in queued] == [f"queued {n}" for n in range(3)]

    after = scrape(single_slot)
    assert after["gateway_queue_depth"] == 0
    assert after["gateway_queue_oldest_age_seconds"] == 0
    assert after["gateway_jobs_total{outcome=completed}"] >= 3
    assert after["gateway_jobs_total{outcome=cancelled}"] >= 1
    # The three queued jobs waited at least the second the test slept while they were queued.
    assert after["gateway_queue_wait_seconds_sum"] >= 3.0
    assert after["gateway_queue_wait_seconds_count"] >= 4
    assert after["gateway_job_duration_seconds_sum"] >= busy_ran_s
    queued_tokens = sum(r.json()["usage"]["completion_tokens"] for r in queued)
    assert queued_tokens >= 3
    assert after["gateway_tokens_total{kind=completion}"] >= queued_tokens


def test_failures_are_counted_by_code_and_listed_as_recent(single_slot: Gateway) -> None:
    before = scrape(single_slot)
    failing = script(text="x y", fail_after=1, fail_code="upstream_rate_limited")
    response = httpx.post(f"{single_slot.url}/v1/chat/completions", json=chat(failing), timeout=30)
    assert response.status_code == 503
    after = scrape(single_slot)
    key = "gateway_jobs_total{outcome=upstream_rate_limited}"
    assert after[key] == before.get(key, 0) + 1
    api_key = "gateway_api_errors_total{code=upstream_rate_limited,status=503}"
    assert after[api_key] == before.get(api_key, 0) + 1
    latest = status_json(single_slot)["recent_failures"][0]
    assert latest["code"] == "upstream_rate_limited"
    assert latest["request_id"] == response.headers["x-request-id"]


def test_status_prints_a_table_and_watch_refreshes(single_slot: Gateway) -> None:
    env = {**os.environ, "REDIS_URL": single_slot.redis_url, "LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "cli.main", "status"]
    text = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30).stdout
    assert "0 waiting" in text
    assert f" {single_slot.workers[0].pid} " in text
    [row] = [line for line in text.splitlines() if f" {single_slot.workers[0].pid} " in line]
    assert " scripted " in row  # its backend, which reaches no model: no auth to check
    assert "UNUSABLE" not in text
    watch = subprocess.Popen(
        [*command, "--watch", "0.2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    time.sleep(2.0)
    watch.send_signal(signal.SIGINT)
    out, _ = watch.communicate(timeout=10)
    assert watch.returncode == 0
    assert out.count("waiting, oldest") >= 2


@pytest.fixture
def bare(start_gateway: Any) -> Iterator[Gateway]:
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted", **HEARTBEAT)
    yield gateway
    gateway.stop()


def test_ready_needs_a_live_worker_and_a_killed_worker_drops_out_within_the_heartbeat_window(
    bare: Gateway,
) -> None:
    response = httpx.get(f"{bare.url}/ready", timeout=5)
    assert response.status_code == 503
    assert response.json() == {
        "error": {
            "message": "No worker is running.",
            "type": "server_error",
            "param": None,
            "code": "no_live_worker",
        }
    }

    worker = bare.start_worker()
    wait_for(lambda: httpx.get(f"{bare.url}/ready", timeout=5).status_code == 200, 20, "/ready recovering")
    assert httpx.get(f"{bare.url}/ready", timeout=5).json() == {"status": "ready"}
    probed = httpx.head(f"{bare.url}/ready", timeout=5)  # as some load balancers probe
    assert (probed.status_code, probed.content) == (200, b"")
    assert scrape(bare)["gateway_workers_alive"] == 1

    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    # TTL is 3 intervals = 1.5 s; allow generously for a loaded machine.
    wait_for(lambda: scrape(bare)["gateway_workers_alive"] == 0, 10, "the killed worker dropping out")
    assert httpx.get(f"{bare.url}/ready", timeout=5).status_code == 503
    assert httpx.head(f"{bare.url}/ready", timeout=5).status_code == 503
    assert status_json(bare)["workers"] == []

    # A worker stopped cleanly (SIGTERM) leaves at once instead of waiting for its TTL.
    second = bare.start_worker()
    wait_for(lambda: scrape(bare)["gateway_workers_alive"] == 1, 20, "the second worker's heartbeat")
    second.send_signal(signal.SIGTERM)
    second.wait(timeout=20)
    assert scrape(bare)["gateway_workers_alive"] == 0


def test_a_draining_worker_counts_only_the_jobs_it_finishes(start_gateway: Any) -> None:
    """Found by an outside probe: through a drain (SIGTERM), `/ready` said ready, and status and
    `/metrics` counted the workers' free slots, while they took no job: a balancer sent requests
    that waited out their queue timeout."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", JOBS_PER_WORKER="3", **HEARTBEAT)
    wait_for(lambda: scrape(gateway)["gateway_worker_slots"] == 3, 20, "the worker's first heartbeat")
    slow = chat(script(text="x ", tokens=60, delay_ms=50))  # 3 s
    running = threading.Thread(
        target=lambda: httpx.post(f"{gateway.url}/v1/chat/completions", json=slow, timeout=60)
    )
    running.start()
    wait_for(lambda: scrape(gateway)["gateway_jobs_running"] == 1, 20, "the job starting")
    [worker] = gateway.workers
    worker.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 503, 10, "/ready refusing")
    assert httpx.get(f"{gateway.url}/ready", timeout=5).json()["error"]["code"] == "no_usable_worker"
    assert scrape(gateway)["gateway_worker_slots"] == 1  # the job it finishes, no free one
    [shown] = status_json(gateway)["workers"]
    assert shown["draining"] is True
    assert shown["workspace_store"].endswith("workspace-store on " + socket.gethostname() + " (the default)")
    load = gateway.redis().hgetall("gateway:workers:load")
    assert load[f"{shown['id']}:slots".encode()] == b"0"  # placement offers it nothing
    running.join(timeout=60)
    worker.wait(timeout=30)


def test_logs_are_json_with_request_and_job_ids_in_both_processes_and_no_prompt(start_gateway: Any) -> None:
    secret = f"sk-ant-canary-{uuid.uuid4().hex}"
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", LOG_FORMAT="json", LOG_LEVEL="info", ANTHROPIC_API_KEY=secret
    )
    prompt = f"prompt-canary-{uuid.uuid4().hex}"
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(prompt), timeout=30)
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    job_id = response.json()["id"].removeprefix("chatcmpl-")

    def lines(role: str) -> list[dict[str, Any]]:
        [path] = gateway.logs.glob(f"{role}-*.log")
        return [json.loads(line) for line in path.read_text().splitlines()]  # every line is JSON

    wait_for(lambda: any(line.get("job_id") == job_id for line in lines("worker")), 10, "the worker's log")
    # The API logs the request's line once the response has ended, maybe after the client read it.
    wait_for(
        lambda: len([line for line in lines("api") if line.get("request_id") == request_id]) >= 2,
        10,
        "the API's queued and request lines",
    )
    for role in ("api", "worker"):
        mine = [line for line in lines(role) if line.get("request_id") == request_id]
        assert mine, f"no {role} line carries the request id"
        assert all(line["job_id"] == job_id for line in mine), mine
        text = "\n".join(json.dumps(line) for line in lines(role))
        assert prompt not in text
        assert secret not in text


@pytest.mark.claude
def test_ready_needs_a_worker_that_can_run_jobs(start_gateway: Any, fake_anthropic: FakeAnthropic) -> None:
    """A worker whose backend auth is unusable refuses every job (503): a balancer probing /ready
    was told ready and sent the traffic there."""
    gateway: Gateway = start_gateway(workers=1, **claude_env(fake_anthropic, ANTHROPIC_API_KEY="sk-short"))
    wait_for(lambda: status_json(gateway)["workers"], 30, "the worker's heartbeat")
    response = httpx.get(f"{gateway.url}/ready", timeout=5)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_usable_worker"
    refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=30)
    assert refused.status_code == 503
