"""Warm CLI processes: Claude Code started and connected ahead of the jobs that will use them.

Starting the CLI costs ~300-400 ms of CPU, most of a short job's time to first token. Each worker
keeps connected clients, each in its own prepared workspace with its own proxy token. A client
that ran a job goes back to the pool only for later jobs of the same API key and profile, and
only if that job ran no tool at all (`reusable`): its conversation is then rewound to empty, and
the job can have left nothing else behind (no file, no process, no transcript on disk: warm
clients run with `--no-session-persistence`). Any other job's client is discarded with its
workspace. While several keys send jobs, some places in the pool stay for fresh clients
(`WarmPool.fresh_reserve`). docs/security.md, "Agent isolation", says what this keeps apart.

The pool is sized by demand (`WarmPool.target`): empty until the worker's first job; while jobs
come, one client per job slot (`CLAUDE_WARM_CLIENTS` caps it), as many as fit in
`CLAUDE_WARM_MEMORY_MIB`; after `CLAUDE_WARM_IDLE_S` without a job, `CLAUDE_WARM_IDLE_CLIENTS`.
Refills start one client at a time, at `REFILL_NICENESS`: CLIs starting together each cost more
CPU, and a refill must not take the CPU of a job that is streaming.

A CLI's options are fixed when it starts, so a warm client is made for a *profile*: the model,
system prompt, agent options and token limit of a job. The pool learns profiles from traffic:
refills are made for the latest eligible job (a single new user turn, no session), so repeated
requests of one kind start warm after the first. A job orders its replacement once it has its
first token (or has ended): a CLI starting beside the job's own would take the CPU the job needs
until then (measured: it doubles a warm job's time to first token on 2 cores); a job on a warm
client orders one only if its client does not come back (`give_back`). Jobs with earlier
turns or a session resume a transcript, which is chosen at start-up, so they always start cold.
When the pool is full, a new profile takes the place of the oldest client of another one.

A connected CLI still does ~100 ms of once-per-process work (all CPU, inside the CLI) on its
first turns, so a warm client has had them already: `warm_up` runs turns that the worker's
credential proxy answers itself (free, never sent upstream), and takes each back out of the
conversation, so the job's request is the one a fresh CLI would send.
"""

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claude_agent_sdk import ClaudeSDKClient, ResultMessage

from shared.jobs import CompletionJob
from shared.logs import detached
from worker.history import merged

log = logging.getLogger("gateway.worker.warm")


PAUSE_AFTER_S = 10.0
"""A ready client unused this long is stopped until a job takes it (see `WarmClient.park`)."""
REFILL_NICENESS = 10
"""A client is started and warmed up at this niceness, below the jobs' CLIs; its job runs at 0."""


def renice(pids: list[int], niceness: int) -> None:
    """Every thread of `pids` to `niceness` (Linux keeps it per thread; new threads inherit it).
    Lowering it needs privilege (root): without, a warm client's job keeps the refill's niceness."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)


def resident_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@dataclass
class WarmClient:
    client: ClaudeSDKClient
    workspace: ExitStack
    """Removes the client's workspace (and kills what it left running) when closed."""
    release: Callable[[], None] = lambda: None
    """Revokes the client's proxy token."""
    profile: str = ""
    owner: str | None = None
    """The API key (`CompletionJob.owner`) whose job it ran: it serves no other key's from then on."""
    jobs: int = 0
    spent_usd: float = 0.0
    """The CLI's running total cost (`ResultMessage.total_cost_usd`) after its last job: what the
    CLI reports at the end of the next one counts that job's cost on top of it."""
    pids: list[int] = field(default_factory=list)
    """The client's processes, started at `REFILL_NICENESS`."""
    _pause: asyncio.TimerHandle | None = None
    _paused: bool = False

    def park(self) -> None:
        """Ready: stopped (SIGSTOP) if it waits longer than `PAUSE_AFTER_S`. An idle CLI spends
        ~6 ms of CPU a second on its timers; a stopped one none, but answers later: stopped after
        3 s, one stream with 1.5 s gaps over 2 workers (each client used every ~3.2 s) took 85-89
        ms to its first token at the median, never stopped 67 ms (bench/claude_load.py)."""
        self._pause = asyncio.get_running_loop().call_later(PAUSE_AFTER_S, self._signal, signal.SIGSTOP)

    def resume(self) -> None:
        """Taken by a job: running again, at the jobs' priority."""
        if self._pause is not None:
            self._pause.cancel()
        if self._paused:
            self._signal(signal.SIGCONT)
        renice(self.pids, 0)

    def _signal(self, signum: signal.Signals) -> None:
        self._paused = signum == signal.SIGSTOP
        for pid in self.pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)

    async def discard(self) -> None:
        """Kills the CLI with its workspace first: a warm client keeps no transcript, so the CLI's
        own graceful shutdown (~30 ms of CPU) would be spent for nothing."""
        if self._pause is not None:
            self._pause.cancel()
        try:
            self.workspace.close()
            with contextlib.suppress(Exception):
                await self.client.disconnect()
        finally:
            self.release()


REUSES = 50
"""Jobs one client runs at most: a CLI's resident set grows with its turns (measured on a bare
client: 207 MiB fresh, 254 MiB after 50 turns, ~295 MiB from 200 on)."""


def reusable(job: CompletionJob) -> bool:
    """Whether a client that ran `job` without any tool call may run a later job of its key (a
    prompt never runs as a Claude Code command, which could change the client: `user_message`)."""
    return job.owner is not None


def streamed_message(content: str | list[dict[str, Any]], turn: str) -> AsyncIterator[dict[str, Any]]:
    """A user message as the CLI's streamed input, with its id (`turn`): `rewind` cuts the
    conversation back to before it."""

    async def message() -> AsyncIterator[dict[str, Any]]:
        body = {"role": "user", "content": content}
        yield {"type": "user", "message": body, "parent_tool_use_id": None, "session_id": "", "uuid": turn}

    return message()


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
    await client.query(streamed_message(WARM_UP_PROMPT, turn))
    async for message in client.receive_response():
        if isinstance(message, ResultMessage) and message.is_error:
            # `subtype` says "success" for a turn the model API refused; the result says why.
            raise RuntimeError(f"the warm-up turn failed: {(message.result or message.subtype)[:200]}")
    await rewind(client, turn)


async def rewind(client: ClaudeSDKClient, turn: str) -> None:
    """Cuts the conversation back to before the user message `turn`; raises if the CLI does not."""
    # The CLI's `rewind_conversation` control request cuts the conversation back to before the
    # given user message; the SDK (0.2.189) has no public method for it, only its control channel.
    control = client._query
    if control is None:
        raise RuntimeError("the client is not connected")
    answer = await control._send_control_request(
        {"subtype": "rewind_conversation", "target_message_uuid": turn}
    )
    if answer.get("rewound") is not True:
        raise RuntimeError(f"the CLI did not rewind a turn: {answer}")


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
    """Connecting, rewinding or ready: a job that takes a client not ready yet waits for it (sooner
    than a cold start, which would begin from nothing)."""
    owner: str | None = None
    """The API key of the job the client ran; None: a fresh client, for any key."""

    def serves(self, profile: str, owner: str | None) -> bool:
        return self.profile == profile and self.owner in (None, owner)


CLIENT_MIB_ESTIMATE = 210.0
"""A warm client's resident memory until one has been measured on this worker."""


@dataclass
class WarmPool:
    """Ready clients sized by demand: none before the first job; while jobs come, one per job slot
    (`limit`) within `memory_mib`; after `idle_s` without a job, `idle_clients`. Refills run one
    at a time (the CLI's start is ~0.3 s of CPU, and starting several at once costs each more)."""

    limit: int
    spawn: Callable[[CompletionJob], Awaitable[WarmClient]]
    memory_mib: int = 1024
    idle_s: float = 60.0
    idle_clients: int = 1
    client_mib: float = CLIENT_MIB_ESTIMATE
    """The resident memory of the last client made ready (`spawn` measures it) or given back."""
    _slots: list[_Slot] = field(default_factory=list)
    _template: CompletionJob | None = None
    """The latest job warm clients can run: refills are made for its profile."""
    _last_job_at: float = 0.0
    _filling: "asyncio.Task[None] | None" = None
    _trim: asyncio.TimerHandle | None = None
    _discarding: set["asyncio.Task[None]"] = field(default_factory=set)
    _closed: bool = False
    _keys: dict[str, float] = field(default_factory=dict)
    """When each API key last sent this worker a job, for `idle_s` (`fresh_reserve`)."""

    def target(self) -> int:
        """How many clients the pool keeps now."""
        idle = time.monotonic() - self._last_job_at >= self.idle_s
        wanted = min(self.idle_clients, self.limit) if idle else self.limit
        return max(0, min(wanted, int(self.memory_mib // max(self.client_mib, 1.0))))

    def fresh_reserve(self) -> int:
        """How many of the pool's places stay for fresh clients, which serve any key: one fewer
        than the keys whose jobs came within `idle_s` before the latest. One key keeps every
        client it gives back; with as many keys as places, no client is kept for a key, so a new
        key's job never finds the pool full of other keys' clients (and starts cold) where a
        fresh one would have been ready."""
        return min(self.target(), max(0, len(self._keys) - 1))

    @property
    def ready(self) -> int:
        return sum(1 for slot in self._slots if slot.client.done())

    async def take(self, job: CompletionJob) -> WarmClient | None:
        """A client for the job's profile, if one is ready or connecting. None: the job starts
        cold. Either way, `order` its replacement once the job has its first token."""
        self._last_job_at = now = time.monotonic()
        self._keys = {key: seen for key, seen in self._keys.items() if seen >= now - self.idle_s}
        if job.owner is not None:
            self._keys[job.owner] = now
        wanted = profile(job)
        if wanted is None or self._closed:
            return None
        mine = [slot for slot in self._slots if slot.serves(wanted, job.owner)]
        # The key's own clients first (fresh ones stay for other keys), the newest ready first: the
        # likeliest not to be stopped yet (`WarmClient.park`).
        mine.sort(key=lambda slot: (slot.client.done(), slot.owner is not None))
        found = mine[-1] if mine else None
        if found is None:
            return None
        self._slots.remove(found)
        try:
            warm = await found.client
        except Exception as exc:  # one line: a job's agent can make these fail again and again
            log.warning("could not start a warm Claude Code client (%s: %s)", type(exc).__name__, exc)
            return None
        warm.resume()
        warm.jobs += 1
        return warm

    def order(self, job: CompletionJob) -> None:
        """Refills the pool with clients for jobs like `job`, if warm clients can run such jobs."""
        wanted = profile(job)
        if wanted is None or self._closed:
            return
        self._template = job
        self._last_job_at = time.monotonic()
        if (
            self._slots
            and len(self._slots) >= self.target()
            and not any(s.serves(wanted, job.owner) for s in self._slots)
        ):
            self._discard(self._slots.pop(0))  # a new kind of job takes the oldest client's place
        if self._filling is None or self._filling.done():
            self._filling = detached(self._fill())
        if self._trim is not None:
            self._trim.cancel()
        self._trim = asyncio.get_running_loop().call_later(self.idle_s + 0.1, self._shrink)

    def give_back(self, warm: WarmClient, job: CompletionJob, turn: str) -> bool:
        """Takes back the client of `job` (which ran no tool), for later jobs of its key, with its
        conversation rewound to before `turn`. False: the pool is full or closed, its places for
        kept clients are taken (`fresh_reserve`), or the client has run `REUSES` jobs; the caller
        discards it."""
        if warm.pids:  # it grew with its turns: the memory budget counts it as it is now
            self.client_mib = resident_mib(warm.pids)
        kept = sum(1 for slot in self._slots if slot.owner is not None)
        if (
            self._closed
            or warm.jobs >= REUSES
            or len(self._slots) >= self.target()
            or kept >= self.target() - self.fresh_reserve()
        ):
            return False
        warm.owner = job.owner
        self._last_job_at = time.monotonic()

        async def rewound() -> WarmClient:
            try:
                await rewind(warm.client, turn)
            except BaseException:
                await warm.discard()
                raise
            warm.park()
            return warm

        self._slots.append(_Slot(warm.profile, detached(rewound()), job.owner))
        return True

    async def _fill(self) -> None:
        while not self._closed and self._template is not None and len(self._slots) < self.target():
            job = self._template
            slot = _Slot(str(profile(job)), detached(self._start(job)))
            self._slots.append(slot)
            await asyncio.wait([slot.client])
            if slot.client.cancelled() or slot.client.exception() is not None:
                return  # `take` logs it; the next job's order tries again
            if slot not in self._slots:
                return  # a job took it while it was connecting: it orders a replacement if needed

    def _shrink(self) -> None:
        """Idle: discards the clients over the target, other profiles and the oldest first."""
        if self._closed:
            return
        if (wait := self._last_job_at + self.idle_s - time.monotonic()) > 0:  # a job came since
            self._trim = asyncio.get_running_loop().call_later(wait + 0.1, self._shrink)
            return
        excess = len(self._slots) - self.target()
        if excess <= 0:
            return
        latest = str(profile(self._template)) if self._template is not None else ""
        ranked = sorted(self._slots, key=lambda slot: slot.profile == latest)
        for slot in ranked[:excess]:
            self._slots.remove(slot)
            self._discard(slot)

    async def _start(self, job: CompletionJob) -> WarmClient:
        warm = await self.spawn(job)
        warm.profile = str(profile(job))
        warm.park()
        return warm

    def _discard(self, slot: _Slot) -> None:
        async def discard() -> None:
            slot.client.cancel()
            with contextlib.suppress(BaseException):
                await (await slot.client).discard()

        task = detached(discard())
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def close(self) -> None:
        self._closed = True
        if self._trim is not None:
            self._trim.cancel()
        slots, self._slots = self._slots, []
        for slot in slots:
            self._discard(slot)
        await asyncio.gather(*self._discarding, return_exceptions=True)
