"""A deterministic fake backend for tests and benchmarks.

By default it replies with `Settings.scripted_text`. A last user message of the form
`script:{json}` scripts one reply instead, e.g.
`script:{"text": "a b c", "tokens": 1000, "delay_ms": 1, "fail_after": 5, "fail_code": "upstream_error"}`:
`tokens` repeats the text's words up to that count, `wait_ms` is a silence before the first one
(as a long tool run would be), `stuck_ms` one that ignores cancellation (as a step that swallows
it would: how tests see a worker's stop bounded), `delay_ms` paces them, `calls` ends the turn
on function calls (`[{"name", "arguments"}]`), `fail_after` raises `BackendError(fail_code)`
after that many tokens. `"echo": true` replies with the conversation
before the last message instead, one `role: text` line per turn, a session's history included
(how tests see what history a job continues). In a session's directory, `write` (path -> text)
and `fill` (path -> a size in bytes) write files, `link` makes symbolic links and `fifo` named
pipes before the reply, and `read` replies with a file's text (how tests see a session's
workspace without the CLI).
"""

import asyncio
import json
import os
import re
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis

from shared import sessions
from shared.heartbeats import SandboxReport
from shared.jobs import CompletionJob, Delta, Done, FailureCode, FinishReason, ToolCall, Usage
from shared.settings import Settings
from worker.backends import BackendError, BackendEvent, TurnWrites, UsageReport

_DIRECTIVE = "script:"
_WORDS = re.compile(r"\S+\s*")


class Script(BaseModel):
    text: str
    tokens: int | None = Field(default=None, ge=0)
    wait_ms: float = Field(default=0.0, ge=0)
    stuck_ms: float = Field(default=0.0, ge=0)
    delay_ms: float = Field(default=0.0, ge=0)
    fail_after: int | None = Field(default=None, ge=0)
    fail_code: FailureCode = FailureCode.UPSTREAM_ERROR
    echo: bool = False
    calls: list[dict[str, Any]] = Field(default_factory=list)
    """`{"name", "arguments"}` of function calls to end the turn on, after the text."""
    write: dict[str, str] = Field(default_factory=dict)
    fill: dict[str, int] = Field(default_factory=dict)
    link: dict[str, str] = Field(default_factory=dict)
    """Symbolic links to make (name -> target, which may lead anywhere, as the agent's may)."""
    fifo: list[str] = Field(default_factory=list)
    """Named pipes to make, as the agent's `mkfifo` can."""
    read: str | None = None


class ScriptedBackend:
    sandbox: SandboxReport | None = None  # it runs no agent

    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self._default = Script(text=settings.scripted_text, delay_ms=settings.scripted_delay_ms)
        self._redis = redis  # reads a session's history for `echo`; benchmarks run without one

    def script_for(self, job: CompletionJob) -> Script:
        prompt = job.turns[-1].text
        if not prompt.startswith(_DIRECTIVE):
            return self._default
        try:
            return Script.model_validate_json(prompt.removeprefix(_DIRECTIVE))
        except ValidationError as exc:
            raise BackendError(FailureCode.INTERNAL, f"invalid script: {exc.errors()[0]['msg']}") from exc

    async def stream(
        self, job: CompletionJob, work: Path | None = None, deferred: TurnWrites | None = None
    ) -> AsyncGenerator[BackendEvent, None]:
        script = self.script_for(job)
        if script.write or script.fill or script.link or script.fifo or script.read:
            script = _with_files(script, work)
        if script.echo:
            turns = job.turns
            if job.session is not None and self._redis is not None:
                turns = [*await sessions.history(self._redis, job.session), *turns]
            earlier = "\n".join(f"{turn.role}: {turn.text}" for turn in turns[:-1])
            script = script.model_copy(update={"text": earlier or "(no earlier turns)"})
        # An empty text is no delta at all, as from the real backend (a reply of calls has none).
        words = _WORDS.findall(script.text)
        count = len(words) if script.tokens is None or not words else script.tokens
        finish = FinishReason.STOP
        if job.max_tokens is not None and count > job.max_tokens:
            count, finish = job.max_tokens, FinishReason.LENGTH
        delay = script.delay_ms / 1000
        await asyncio.sleep(script.wait_ms / 1000)
        await _uncancellable_sleep(script.stuck_ms / 1000)
        prompt_tokens = sum(len(_WORDS.findall(turn.text)) for turn in job.turns)
        yield UsageReport(Usage(prompt_tokens=prompt_tokens))  # as the model API's message start
        for i in range(count):
            if script.fail_after is not None and i == script.fail_after:
                raise BackendError(script.fail_code, "scripted failure")
            # Always yield to the loop, as a real backend waiting on its upstream would.
            await asyncio.sleep(delay)
            yield Delta(text=words[i % len(words)])
        if script.fail_after is not None and script.fail_after >= count:
            raise BackendError(script.fail_code, "scripted failure")
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=count, cost_usd=0.0)
        calls = [
            ToolCall(id=f"call_{job.id[:8]}_{i}", name=call["name"], arguments=json.dumps(call["arguments"]))
            for i, call in enumerate(script.calls)
        ]
        yield Done(finish_reason=FinishReason.TOOL_CALLS if calls else finish, usage=usage, tool_calls=calls)

    def stop(self, job_id: str) -> None:
        """Runs nothing outside the worker's loop: cancelling the task stops the job."""

    async def close(self) -> None:
        """Holds nothing between jobs."""


async def _uncancellable_sleep(seconds: float) -> None:
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    until = loop.time() + seconds
    while (left := until - loop.time()) > 0:
        try:
            await asyncio.sleep(left)
        except asyncio.CancelledError:
            task.uncancel()


def _with_files(script: Script, work: Path | None) -> Script:
    """Does the script's file operations in `work` (names relative to it, never outside)."""
    if work is None:
        raise BackendError(FailureCode.INTERNAL, "file operations need a session")
    for name, text in script.write.items():
        path = _inside(work, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name, size in script.fill.items():
        path = _inside(work, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(size))
    for name, target in script.link.items():
        path = _inside(work, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    for name in script.fifo:
        path = _inside(work, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
    if script.read is None:
        return script
    path = _inside(work, script.read)
    return script.model_copy(update={"text": path.read_text() if path.is_file() else "(no such file)"})


def _inside(work: Path, name: str) -> Path:
    path = (work / name).resolve()
    if not path.is_relative_to(work.resolve()):
        raise BackendError(FailureCode.INTERNAL, "a scripted file outside the workspace")
    return path
