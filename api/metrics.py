"""Prometheus metrics: `/metrics` renders the shared picture from Redis plus this process's own
counters.

Two kinds of series, told apart in their help text:
- **service-wide** (`gateway_queue_*`, `gateway_workers_alive`, `gateway_jobs_*`, tokens, cost, the
  time histograms): computed from Redis at scrape time (shared/status.py), so every API replica
  reports the same values. Scrape any one replica (or the load balancer), or aggregate with `max`.
- **per-process** (`gateway_api_errors_total`, `gateway_rate_limit_rejections_total`,
  `gateway_agent_activity_events_total`): counted in
  this API process. Scrape every replica and aggregate with `sum`. The API processes of one
  `claude-gateway up` share a port, so a scrape reaches any one of them: there they count in files
  of one folder (`PROMETHEUS_MULTIPROC_DIR`, prometheus_client's multiprocess mode) and each
  reports the sum of all of them, restarted ones included, so the totals only grow.

Nothing here runs per token.
"""

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from shared.status import Snapshot

_PROCESS = CollectorRegistry()
_API_ERRORS = Counter(
    "gateway_api_errors",
    "Error responses this API process returned, by HTTP status and error code (per-process; sum).",
    ["status", "code"],
    registry=_PROCESS,
)
_RATE_LIMITED = Counter(
    "gateway_rate_limit_rejections",
    "Requests this API process refused for a rate limit, by limit (per-process; sum).",
    ["limit"],
    registry=_PROCESS,
)
_ACTIVITY = Counter(
    "gateway_agent_activity_events",
    "The agent's thinking deltas and tool steps this API process relayed to callers, by kind "
    "(reasoning, tool_step); a resumed stream counts again (per-process; sum).",
    ["kind"],
    registry=_PROCESS,
)

_HISTOGRAM_HELP = {
    "queue_wait_seconds": "Time from enqueue until a worker started the job (service-wide).",
    "time_to_first_token_seconds": "Time from enqueue until the backend's first output (service-wide).",
    "job_duration_seconds": "Time a worker spent on a job, until its terminal event (service-wide).",
}


def count_error(status: int, code: str) -> None:
    """Called for every OpenAI-format error response (api/errors.py)."""
    _API_ERRORS.labels(status=str(status), code=code).inc()


def count_activity(kind: str) -> None:
    """Called for each thinking delta or tool step relayed to a caller (`api/core/run.py`)."""
    _ACTIVITY.labels(kind=kind).inc()


def count_rate_limit_rejection(limit: str) -> None:
    """Called once per request refused for a limit (`api/access.py`): a rate category's name,
    "failed_authentications", "concurrent_jobs" or "stored_bytes" (a small, fixed set)."""
    _RATE_LIMITED.labels(limit=limit).inc()


def _service_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    queue = snapshot.queue
    yield GaugeMetricFamily("gateway_queue_depth", "Jobs waiting for a worker (service-wide).", queue.depth)
    yield GaugeMetricFamily(
        "gateway_queue_oldest_age_seconds",
        "Age of the oldest waiting job; 0 when none waits (service-wide).",
        queue.oldest_age_s or 0.0,
    )
    yield GaugeMetricFamily(
        "gateway_jobs_running", "Jobs the live workers are running (service-wide).", snapshot.jobs_running
    )
    yield GaugeMetricFamily(
        "gateway_workers_alive", "Workers with a fresh heartbeat (service-wide).", len(snapshot.workers)
    )
    yield GaugeMetricFamily(
        "gateway_worker_slots", "Jobs the live workers can run at once (service-wide).", snapshot.slots
    )
    stats = snapshot.stats
    jobs = CounterMetricFamily(
        "gateway_jobs",
        "Finished jobs by outcome: completed, or the failure code (service-wide).",
        labels=["outcome"],
    )
    for outcome, count in sorted(stats.jobs.items()):
        jobs.add_metric([outcome], count)
    yield jobs
    exits = CounterMetricFamily(
        "gateway_worker_exits",
        "Worker processes that stopped, by reason (shared/worker_exits.py) (service-wide).",
        labels=["reason"],
    )
    for reason, count in sorted(stats.worker_exits.items()):
        exits.add_metric([reason], count)
    yield exits
    tokens = CounterMetricFamily("gateway_tokens", "Tokens used by jobs (service-wide).", labels=["kind"])
    tokens.add_metric(["prompt"], stats.prompt_tokens)
    tokens.add_metric(["completion"], stats.completion_tokens)
    yield tokens
    yield CounterMetricFamily("gateway_cost_usd", "Cost Claude Code reported (service-wide).", stats.cost_usd)
    for name, histogram in stats.histograms.items():
        buckets = [(le if isinstance(le, str) else repr(le), count) for le, count in histogram.buckets]
        yield HistogramMetricFamily(f"gateway_{name}", _HISTOGRAM_HELP[name], buckets, histogram.sum)


class _Scrape:
    def __init__(self, snapshot: Snapshot | None) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        up = self._snapshot is not None
        yield GaugeMetricFamily("gateway_redis_up", "1 if this API process reached Redis for the scrape.", up)
        if self._snapshot is not None:  # else the service-wide figures are out of reach
            yield from _service_metrics(self._snapshot)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # up's processes: all of them
            yield from multiprocess.MultiProcessCollector(None).collect()  # type: ignore[no-untyped-call]
        else:
            yield from _PROCESS.collect()


def render(snapshot: Snapshot | None) -> bytes:
    """The scrape; `snapshot` None: Redis is out of reach (this process's own counters only)."""
    return generate_latest(_Scrape(snapshot))
