"""Log lines: the ids of the work in hand, and nothing else's."""

import asyncio
import logging

import httpx
import pytest

from shared import logs
from shared.settings import Settings
from worker.backends import claude  # noqa: F401  (installs its filter on the SDK's logger)


async def test_a_detached_task_logs_no_ids_not_even_those_bound_later() -> None:
    """The warm pool's refills are ordered by a job: their lines (the SDK's reader of a client, long
    after) named that job, and whatever it bound later, as the context's ids are shared in place."""
    logs.bind_new(request_id="req_a", job_id="job_a")
    seen: list[dict[str, str | None]] = []
    go_on = asyncio.Event()

    async def pool_work() -> None:
        await go_on.wait()
        record = logging.LogRecord("gateway.worker.warm", logging.INFO, __file__, 1, "refilled", None, None)
        logs.ContextFilter().filter(record)
        seen.append({"request_id": record.request_id, "job_id": record.job_id})  # type: ignore[attr-defined]

    task = logs.detached(pool_work())
    logs.bind(job_id="job_b")  # the job goes on binding after it ordered the refill
    go_on.set()
    await task
    assert seen == [{"request_id": None, "job_id": None}]


def test_the_sdks_error_for_a_cli_the_worker_killed_is_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    sdk = logging.getLogger("claude_agent_sdk._internal.query")
    with caplog.at_level(logging.INFO):
        sdk.error("Fatal error in message reader: Command failed with exit code -9 (exit code: -9)")
        sdk.error("Fatal error in message reader: Command failed with exit code 1 (exit code: 1)")
    assert [record.getMessage().endswith("(exit code: 1)") for record in caplog.records] == [True]


def test_a_request_url_with_a_password_is_not_logged(capsys: pytest.CaptureFixture[str]) -> None:
    """Found by an outside probe: httpx logged each of the credential proxy's requests upstream at
    INFO, with the password of an ANTHROPIC_BASE_URL like `http://user:password@proxy`."""
    loggers = [logging.getLogger(name) for name in ("", "arq", "httpx")]
    before = [(logger.level, logger.handlers[:]) for logger in loggers]
    try:
        logs.configure_logging(Settings(log_level="info"))
        transport = httpx.MockTransport(lambda request: httpx.Response(200))
        with httpx.Client(transport=transport) as client:
            assert client.get("http://proxyuser:SECRETMARK@127.0.0.1:9/v1/messages").status_code == 200
        logging.getLogger("gateway.test").info("a line of the gateway's own")
        written = capsys.readouterr().err
    finally:
        for logger, (level, handlers) in zip(loggers, before, strict=True):
            logger.setLevel(level)
            logger.handlers[:] = handlers
    assert "a line of the gateway's own" in written
    assert "SECRETMARK" not in written
