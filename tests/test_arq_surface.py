"""The part of arq the gateway relies on beyond its public API, pinned: this fails if an arq
release changes it (arq is in maintenance mode; pyproject.toml pins the version tested).

The worker overrides methods of arq's `Worker` (`_poll_iteration`, `start_jobs`, `close`), calls one
(`_poll_iteration` through `super()`) and keeps arq's bookkeeping attributes up to date; the job
store writes arq's keys and queue entries from Lua and removes them when an attempt ends, as
arq's `finish_job` would (shared/jobstore.py).
"""

import inspect
import json
from importlib.metadata import version

import pytest
from arq import constants
from arq.jobs import serialize_job
from arq.worker import Worker

from shared import jobstore
from shared.queue import RUN_COMPLETION, serialize
from worker.main import GatewayWorker

TESTED = "0.28.0"


def test_arq_is_the_version_tested() -> None:
    assert version("arq") == TESTED


@pytest.mark.parametrize(
    ("method", "signature"),
    [
        ("_poll_iteration", "(self) -> None"),
        ("start_jobs", "(self, job_ids: list[bytes]) -> None"),
    ],
)
def test_the_methods_the_worker_overrides_or_calls_keep_their_signatures(method: str, signature: str) -> None:
    assert str(inspect.signature(getattr(Worker, method))) == signature


def test_arq_still_drives_the_overridden_methods_as_the_worker_expects() -> None:
    # The poll loop calls `_poll_iteration`, which hands due ids to `start_jobs` and reads each
    # finished task's result; a signal handler stops via `on_stop`.
    assert "await self._poll_iteration()" in inspect.getsource(Worker.main)
    poll = inspect.getsource(Worker._poll_iteration)
    assert "await self.start_jobs(job_ids)" in poll
    assert "t.result()" in poll
    assert "self.on_stop and self.on_stop(sig)" in inspect.getsource(Worker.handle_sig)
    # The drain's handler, which the worker extends (its heartbeat says it drains), stops picking jobs.
    assert "self.allow_pick_jobs = False" in inspect.getsource(Worker.handle_sig_wait_for_completion)
    # Only these overrides: nothing else of arq's worker is replaced.
    overridden = {
        name for name, value in vars(GatewayWorker).items() if callable(value) and name in vars(Worker)
    }
    assert overridden == {
        "__init__",
        "main",
        "_poll_iteration",
        "start_jobs",
        "handle_sig_wait_for_completion",
        "close",
    }
    # `close` is arq's, its health-check key's removal allowed to fail: arq's does these steps.
    steps = [
        "self.handle_sig(signal.SIGUSR1)",
        "await asyncio.gather(*self.tasks.values())",
        "await self.pool.delete(self.health_check_key)",
        "await self.on_shutdown(self.ctx)",
        "await self.pool.close(close_connection_pool=True)",
        "self._pool = None",
    ]
    close = inspect.getsource(Worker.close)
    assert [close.index(step) for step in steps] == sorted(close.index(step) for step in steps)


def test_the_worker_attributes_the_gateway_keeps_up_to_date_exist() -> None:
    init = inspect.getsource(Worker.__init__)
    for attribute in ("sem", "job_counter", "tasks", "job_tasks", "allow_pick_jobs", "in_progress_timeout_s"):
        assert f"self.{attribute}" in init, attribute
    release = inspect.getsource(Worker._release_sem_dec_counter_on_complete)
    assert "self.job_counter = self.job_counter - 1" in release
    assert "self.sem.release()" in release


def test_arqs_key_layout_is_what_the_job_store_writes() -> None:
    assert constants.job_key_prefix == "arq:job:"
    assert constants.in_progress_key_prefix == "arq:in-progress:"
    assert constants.retry_key_prefix == "arq:retry:"
    assert constants.abort_jobs_ss == "arq:abort"
    assert constants.expires_extra_ms == 86_400_000


def test_the_queue_entry_the_recovery_script_writes_is_arqs_own() -> None:
    """`_RECOVER` builds the next attempt's arq entry by hand, as `serialize_job` would."""
    entry = serialize_job(RUN_COMPLETION, ("0" * 32, 2), {}, None, 1700000000000, serializer=serialize)
    by_hand = '{"t":null,"f":"' + RUN_COMPLETION + '","a":["' + "0" * 32 + '",' + "2" + '],"k":{},"et":'
    assert entry == (by_hand + "1700000000000}").encode()
    assert json.loads(entry) == {
        "t": None,
        "f": RUN_COMPLETION,
        "a": ["0" * 32, 2],
        "k": {},
        "et": 1700000000000,
    }
    assert '\'{"t":null,"f":"\' .. RUN_COMPLETION' in jobstore._RECOVER
