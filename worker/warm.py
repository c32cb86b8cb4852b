"""Warm CLI processes: Claude Code started and connected ahead of the jobs that will use them.

Starting the CLI costs ~300-400 ms of CPU, most of a short job's time to first token. A worker
with `CLAUDE_WARM_CLIENTS=N` keeps up to N connected clients, each in its own prepared workspace
with its own proxy token, and gives each to exactly one job, then discards it: per-job isolation
is kept, only the start-up moves ahead of the job.

A CLI's options are fixed when it starts, so a warm client is made for a *profile*: the model,
system prompt, agent options and token limit of a job. The pool learns profiles from traffic:
every eligible job (a single new user turn, no session) orders a client of its profile for the
next such job, so repeated requests of one kind start warm after the first. It orders it once it
has its first token (or has ended): a CLI starting beside the job's own would take the CPU the
job needs until then (measured: it doubles a warm job's time to first token on 2 cores). Jobs
with earlier turns or a session resume a transcript, which is chosen at start-up, so they always
start cold. When the pool is full, a new profile takes the place of the oldest ready client of
another one.

A connected CLI still does ~100 ms of once-per-process work (all CPU, inside the CLI) on its
first turns, so a warm client has had them already: `warm_up` runs turns that the worker's
credential proxy answers itself (free, never sent upstream), and takes each back out of the
conversation, so the job's request is the one a fresh CLI would send.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from claude_agent_sdk import ClaudeSDKClient, ResultMessage

from shared.jobs import CompletionJob
from worker.history import merged

log = logging.getLogger("gateway.worker.warm")


@dataclass
class WarmClient:
    client: ClaudeSDKClient
    workspace: ExitStack
    """Removes the client's workspace (and kills what it left running) when closed."""
    release: Callable[[], None] = lambda: None
    """Revokes the client's proxy token."""
    profile: str = ""

    async def discard(self) -> None:
        """Kills the CLI with its workspace first: a warm client keeps no transcript, so the CLI's
        own graceful shutdown (~30 ms of CPU) would be spent for nothing."""
        try:
            self.workspace.close()
            with contextlib.suppress(Exception):
                await self.client.disconnect()
        finally:
            self.release()


WARM_UP_PROMPT = "Reply with ok."
WARM_UP_TURNS = 2
"""Measured on a bare client: the job's turn takes ~60 ms of the CLI's CPU after one warm-up
turn, ~35-40 ms after two (what later turns of a conversation take), no less after four."""


async def warm_up(client: ClaudeSDKClient) -> None:
    """First turns, run ahead of the job and each rewound, leaving an empty conversation.

    Call it only while the client's proxy token is warming: the turns' model calls must not reach
    the model API. Raises if a turn fails or the CLI does not rewind it (the client must then be
    discarded: its conversation is not empty).
    """
    for _ in range(WARM_UP_TURNS):
        await _rewound_turn(client)


async def _rewound_turn(client: ClaudeSDKClient) -> None:
    turn = str(uuid.uuid4())

    async def prompt() -> AsyncIterator[dict[str, Any]]:
        message = {"role": "user", "content": WARM_UP_PROMPT}
        yield {"type": "user", "message": message, "parent_tool_use_id": None, "uuid": turn}

    await client.query(prompt())
    async for message in client.receive_response():
        if isinstance(message, ResultMessage) and message.is_error:
            raise RuntimeError(f"the warm-up turn failed: {message.subtype}")
    # The CLI's `rewind_conversation` control request cuts the conversation back to before the
    # given user message; the SDK (0.2.189) has no public method for it, only its control channel.
    control = client._query
    if control is None:
        raise RuntimeError("the client is not connected")
    answer = await control._send_control_request(
        {"subtype": "rewind_conversation", "target_message_uuid": turn}
    )
    if answer.get("rewound") is not True:
        raise RuntimeError(f"the CLI did not rewind the warm-up turn: {answer}")


def profile(job: CompletionJob) -> str | None:
    """What a warm client must have been started with to run `job`; None: it must start cold."""
    if job.session is not None or len(merged(job.turns)) != 1:
        return None
    fixed_at_start = {"model", "backend_model", "system_prompt", "agent", "max_tokens", "functions"}
    return job.model_dump_json(include=fixed_at_start)


@dataclass
class _Slot:
    profile: str
    client: "asyncio.Task[WarmClient]"
    """Connecting or connected: a job that takes a connecting client waits for it (sooner than a
    cold start, which would begin from nothing)."""


@dataclass
class WarmPool:
    size: int
    spawn: Callable[[CompletionJob], Awaitable[WarmClient]]
    _slots: list[_Slot] = field(default_factory=list)
    _discarding: set["asyncio.Task[None]"] = field(default_factory=set)
    _closed: bool = False

    async def take(self, job: CompletionJob) -> WarmClient | None:
        """A client for the job's profile, if one is ready or connecting. None: the job starts
        cold. Either way, `order` its replacement once the job has its first token."""
        wanted = profile(job)
        if wanted is None or self._closed:
            return None
        mine = [slot for slot in self._slots if slot.profile == wanted]
        found = next((slot for slot in mine if slot.client.done()), mine[0] if mine else None)
        if found is None:
            return None
        self._slots.remove(found)
        try:
            return await found.client
        except Exception:
            log.warning("could not start a warm Claude Code client", exc_info=True)
            return None

    def order(self, job: CompletionJob) -> None:
        """Starts a client for the next job like `job`, if warm clients can run such jobs."""
        wanted = profile(job)
        if wanted is None or self._closed:
            return
        if len(self._slots) >= self.size:
            other = next((slot for slot in self._slots if slot.profile != wanted), None)
            if other is None:
                return
            self._slots.remove(other)
            self._discard(other)
        self._slots.append(_Slot(wanted, asyncio.ensure_future(self._start(job, wanted))))

    async def _start(self, job: CompletionJob, wanted: str) -> WarmClient:
        warm = await self.spawn(job)
        warm.profile = wanted
        return warm

    def _discard(self, slot: _Slot) -> None:
        async def discard() -> None:
            slot.client.cancel()
            with contextlib.suppress(BaseException):
                await (await slot.client).discard()

        task = asyncio.ensure_future(discard())
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def close(self) -> None:
        self._closed = True
        slots, self._slots = self._slots, []
        for slot in slots:
            self._discard(slot)
        await asyncio.gather(*self._discarding, return_exceptions=True)
