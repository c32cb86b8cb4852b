"""Logging for both processes: one line per event, text or JSON (`LOG_FORMAT=json`), and the
request id and job id of the work in hand on every line logged while doing it.

The ids live in a context variable: the API binds the request id per request (and the job id once
the job exists), a worker binds both per job. asyncio copies context into the tasks a request or
job spawns, so lines logged there carry the ids too. Log lines never carry prompt or completion
text, nor credentials; arq's own INFO lines would (they repeat each job's arguments), so arq is
held to warnings.
"""

import asyncio
import contextvars
import json
import logging
import sys
from collections.abc import Coroutine
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar

from shared.settings import Settings

_context: ContextVar[dict[str, str] | None] = ContextVar("gateway_log_context", default=None)
_FIELDS = ("request_id", "job_id")
_T = TypeVar("_T")


def bind_new(**ids: str) -> None:
    """Starts a fresh context for one request or one job."""
    _context.set(dict(ids))


def bind(**ids: str) -> None:
    """Adds ids to the current context in place, so whoever bound it (a request's outer layer)
    sees them too."""
    current = _context.get()
    if current is None:
        _context.set(dict(ids))
    else:
        current.update(ids)


def detached(work: Coroutine[Any, Any, _T]) -> "asyncio.Task[_T]":
    """A task for the process's own work, started while a request or job is in hand: its lines
    carry no ids (the context's ids are shared in place, so they would name whatever that
    request or job binds later)."""
    context = contextvars.copy_context()
    context.run(_context.set, None)
    return asyncio.get_running_loop().create_task(work, context=context)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context.get() or {}
        for name in _FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, ids.get(name))
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            if (value := getattr(record, name, None)) is not None:
                line[name] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(f"{name}={value}" for name in _FIELDS if (value := getattr(record, name, None)))
        return f"{text} [{ids}]" if ids else text


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # arq logs each job's arguments at INFO, and ours carry the prompt; httpx each request's URL,
    # with its user and password if the operator's ANTHROPIC_BASE_URL has them (an outside probe):
    # keep only their warnings.
    for name in ("arq", "httpx"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # uvicorn's loggers have handlers of their own; route them through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
