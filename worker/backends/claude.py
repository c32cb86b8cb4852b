"""The real backend: one Claude Code CLI run per job through `claude-agent-sdk`.

Deltas are the upstream's own token deltas (`include_partial_messages=True`), thinking deltas
become `Reasoning` and the agent's tool runs `ToolStep`s (`worker/tool_steps.py`); usage, cost and the
stop reason come from the SDK's `ResultMessage`; failures from its error result or exceptions.
"""

import asyncio
import contextlib
import logging
import os
import pwd
import re
import signal
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, aclosing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    CLINotFoundError,
    ResultMessage,
    SystemMessage,
    UserMessage,
    query,
)
from claude_agent_sdk.types import SessionStore, StreamEvent, SystemPromptFile, SystemPromptPreset
from redis.asyncio import Redis

from shared import agent_policy, backend_auth, sessions
from shared.jobs import (
    CompletionJob,
    Delta,
    Done,
    FailureCode,
    FinishReason,
    Reasoning,
    Retraction,
    ToolCall,
    ToolStep,
    Turn,
    Usage,
)
from shared.settings import Settings
from worker import caller_functions, operator_mcp, upstream_models
from worker.backends import (
    MESSAGE_BREAK,
    PROGRESS,
    BackendError,
    BackendEvent,
    TurnWrites,
    UsageReport,
    call_chars,
    output_room,
)
from worker.credential_proxy import (
    Credential,
    CredentialProxy,
    api_key_header,
    bearer_header,
    server_tools_of,
)
from worker.egress import EgressProxy
from worker.history import HistoryStore, content_blocks, merged
from worker.login import login_token
from worker.sandbox import MODEL_SOCKET, Sandbox, remove_runtime_dir, runtime_dir
from worker.session_store import JobTranscript, RedisSessionStore, TranscriptTooLarge
from worker.skills import install_skills, installed_skills
from worker.tool_steps import ToolSteps
from worker.warm import (
    REFILL_NICENESS,
    WarmClient,
    WarmPool,
    renice,
    resident_mib,
    reusable,
    streamed_message,
    warm_up,
)
from worker.workspace import (
    MARKER,
    Workspace,
    children_for,
    job_workspace,
    kill_processes_of,
    remove_abandoned,
    session_view,
)

log = logging.getLogger("gateway.worker.claude")


class _OwnKills(logging.Filter):
    """The SDK logs an ERROR ("Fatal error in message reader: ... exit code -9") whenever a CLI it
    reads is killed; the worker kills them itself (a cancel, a turn ended on the caller's call, a
    warm client discarded) and says what a failure meant. Those lines are debug ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "exit code -9" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("claude_agent_sdk._internal.query").addFilter(_OwnKills())


class _Quoted(logging.Filter):
    """The SDK's warnings quote what the CLI wrote (a mirrored transcript's path), which a job's
    tools can forge: each line is cut and escaped as the CLI's stderr is (`StderrLog`; a re-check
    probe logged 50 MB and forged log lines through one turn's frames)."""

    WIDTH = 300

    def filter(self, record: logging.LogRecord) -> bool:
        said = record.getMessage()
        record.msg, record.args = said[: self.WIDTH].encode("unicode_escape").decode("ascii"), None
        return True


logging.getLogger("claude_agent_sdk._internal.transcript_mirror_batcher").addFilter(_Quoted())

_ANTHROPIC_API = "https://api.anthropic.com"

_CONTEXT_WINDOW_FULL = "model_context_window_exceeded"
_ENDING_STOPS = {
    "max_tokens": FinishReason.LENGTH,
    _CONTEXT_WINDOW_FULL: FinishReason.LENGTH,  # the answer filled the context: truncated
    "refusal": FinishReason.CONTENT_FILTER,
}
"""Upstream stops the CLI goes on from (it asks the model to continue, or asks again, resending
the whole context each time): the run ends at them instead (`_ends_the_run`)."""
_FINISH_REASONS = {"end_turn": FinishReason.STOP, "stop_sequence": FinishReason.STOP, **_ENDING_STOPS}


_OUT_OF_TURNS = "error_max_turns"
_MIN_THINKING_BUDGET = 1024  # tokens, the Messages API's smallest
_CLI_ERROR_PREFIX = re.compile(r"^API Error: \d+\s*")
_MAX_REASON = 1000
_ARGUMENT_BYTES = 64 * 1024
"""A system prompt up to this size goes on the CLI's command line, a longer one in a file: half
of what Linux takes in one argument (128 KiB)."""


def upstream_failure(status: int | None, said: str | None = None) -> BackendError:
    """Classifies an error result by the upstream's HTTP status. What it `said` is passed on only
    for a request it found invalid (the caller's to act on: a prompt over the model's context)."""
    if status in (400, 413) and said:
        return BackendError(
            FailureCode.UPSTREAM_REFUSED,
            f"The model API refused the request (HTTP {status}): {_reason(said)[:_MAX_REASON]}",
        )
    if status in (401, 403):
        return BackendError(
            FailureCode.UPSTREAM_AUTH,
            f"The model API rejected the gateway's credentials (HTTP {status}); "
            "check the backend configuration.",
        )
    if status in (429, 529):
        return BackendError(
            FailureCode.UPSTREAM_RATE_LIMITED, f"The model API is busy (HTTP {status}); retry later."
        )
    detail = f" (HTTP {status})" if status else ""
    return BackendError(FailureCode.UPSTREAM_ERROR, f"The model API request failed{detail}.")


def prompt_for(turns: list[Turn]) -> str:
    """The last user turn, after earlier turns pasted in as context: only for session turns the
    transcript does not hold (several new messages at once, or turns another backend answered)."""
    *earlier, last = turns
    if not earlier:
        return last.text
    transcript = "\n\n".join(f"<{turn.role}>\n{turn.text}\n</{turn.role}>" for turn in earlier)
    return f"<conversation_so_far>\n{transcript}\n</conversation_so_far>\n\n{last.text}"


def user_content(turn: Turn) -> str | list[dict[str, Any]]:
    """A user turn as the content of the CLI's prompt, on every path (cold or warm client).

    A caller's text is for the model, as on OpenAI's API: Claude Code would run one that starts
    with "/" as its own command ("/model <name>" switched the model past MODELS, "/cost" answered
    nothing), even with `--disable-slash-commands` ("isn't available"). A leading space makes it
    text. A blank one is `history.BLANK`, as the CLI would send an empty one: it answers a
    whitespace-only prompt with nothing, without asking the model."""
    if turn.text.startswith("/"):
        turn = turn.model_copy(update={"text": " " + turn.text})
    return content_blocks(turn)


def user_message(turn: Turn) -> str | AsyncIterator[dict[str, Any]]:
    """A user turn as a cold CLI's prompt: plain text, or a streamed message when it has images."""
    blocks = user_content(turn)  # text alone without images
    return blocks if isinstance(blocks, str) else streamed_message(blocks, str(uuid.uuid4()))


class StderrLog:
    """Logs what one CLI writes to stderr: its first `LINES` lines, each cut to `WIDTH` characters
    with control characters escaped. The job's tools reach the CLI's pipes (they run as its user):
    unbounded, two jobs wrote 319 MB to the worker's log in 25 s, and forged log lines with a
    carriage return (an outside probe)."""

    LINES = 50
    WIDTH = 500

    def __init__(self) -> None:
        self._left = self.LINES

    def __call__(self, line: str) -> None:
        if self._left > 0:
            log.info("Claude Code said: %s", line[: self.WIDTH].encode("unicode_escape").decode("ascii"))
        elif self._left == 0:
            log.info("Claude Code wrote more than %d lines to stderr; the rest is not logged", self.LINES)
        self._left -= 1


class ClaudeBackend:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self._settings = settings
        if settings.claude_job_user is not None:
            pwd.getpwnam(settings.claude_job_user)  # fails at start-up, not on the first job
            if os.geteuid() != 0:
                raise RuntimeError("CLAUDE_JOB_USER needs a worker running as root to switch users")
        self._auth_method = backend_auth.detect_method(settings)
        if not (auth := backend_auth.check(settings)).valid:
            log.error("backend auth (%s) is not usable: %s", auth.method, "; ".join(auth.errors))
        for warning in auth.warnings:
            log.warning("backend auth (%s): %s", auth.method, warning)
        if abandoned := remove_abandoned(settings.workspace_root):
            log.info("removed %d workspaces of workers that died on this machine", abandoned)
        self._runtime_dir = runtime_dir()
        # The SDK's copies of resumed transcripts (`claude-resume-*`, a caller's conversation) go
        # in this worker's own folder, which the next worker removes if this one is killed: in
        # the temp dir, a killed worker's stayed for good (an outside probe). One only this user
        # may enter, unless jobs run as another: a job of a root worker is the host's root, and
        # had left a setuid-root shell there, in its config directory, for any local user to run
        # (the runtime folder is 0711 for the sockets; an outside probe).
        resumed = self._runtime_dir / "resumed"
        resumed.mkdir(mode=0o711 if settings.claude_job_user is not None else 0o700)
        tempfile.tempdir = str(resumed)
        self._proxy: CredentialProxy | None = None
        credential = self._proxied_credential()
        if credential is not None:
            upstream = settings.anthropic_base_url or _ANTHROPIC_API
            self._proxy = CredentialProxy(upstream, credential, settings.image_url_allowlist)
            self._proxy.start(self._runtime_dir / "model.sock")
        egress = None
        if settings.sandbox == "on" and settings.sandbox_allowed_hosts:
            egress = EgressProxy(settings.sandbox_allowed_hosts)
            egress.start()
        self._sandbox = Sandbox(settings, self._runtime_dir, self._proxy, egress)
        self.sandbox = self._sandbox.report
        self._provider_env = backend_auth.provider_environment(settings, self._auth_method)
        self._redis = redis
        self._store = RedisSessionStore(redis, settings.session_ttl_s)
        self._cold: dict[str, Workspace] = {}  # the running cold jobs' workspaces, for `stop`
        warm_limit = (
            settings.jobs_per_worker if settings.claude_warm_clients is None else settings.claude_warm_clients
        )
        self._warm = (
            WarmPool(
                warm_limit,
                self._spawn_warm,
                memory_mib=settings.claude_warm_memory_mib,
                idle_s=settings.claude_warm_idle_s,
                idle_clients=settings.claude_warm_idle_clients,
            )
            if warm_limit
            else None
        )
        job_user = settings.claude_job_user
        self._runs_as_root = (pwd.getpwnam(job_user).pw_uid if job_user else os.geteuid()) == 0
        self._models: asyncio.Task[None] | None = None
        key = settings.anthropic_api_key
        if settings.models_from_upstream and self._auth_method == "anthropic" and key is not None:
            base_url = settings.anthropic_base_url or _ANTHROPIC_API
            refresh = upstream_models.keep_fresh(settings, redis, base_url, key.get_secret_value())
            self._models = asyncio.get_running_loop().create_task(refresh)

    def _proxied_credential(self) -> Credential | None:
        """The credential the proxy injects: an API key, or the CLI's own login (Bedrock and Vertex
        are signed by the CLI itself, see `backend_auth.provider_environment`)."""
        if self._auth_method == "anthropic" and (key := self._settings.anthropic_api_key) is not None:
            return api_key_header(key.get_secret_value())
        if self._auth_method == "claude_cli":
            return bearer_header(login_token(self._settings))
        return None

    def _refuse(self, job: CompletionJob) -> None:
        """A job fails at once, with the reason, when the worker's credentials cannot work, it
        cannot build the job's sandbox, or the job's agent settings exceed this worker's policy
        (the API checked them, but the job passed through Redis since)."""
        auth = backend_auth.check(self._settings)
        if not auth.valid:
            raise BackendError(
                FailureCode.BACKEND_UNAVAILABLE,
                f"The worker cannot reach the model: its backend auth ({auth.method}) is not usable: "
                + "; ".join(auth.errors),
            )
        if self.sandbox.mode == "on" and not self.sandbox.ready:
            raise BackendError(
                FailureCode.BACKEND_UNAVAILABLE,
                f"The worker cannot run jobs in a sandbox: {self.sandbox.reason}.",
            )
        if (violation := agent_policy.violation(job.agent, self._settings)) is not None:
            log.warning("job %s refused: its agent settings exceed the policy (%s)", job.id, violation)
            raise BackendError(
                FailureCode.BACKEND_UNAVAILABLE,
                f"The worker refuses the job: {violation} on this worker (CLAUDE_* tool policy).",
            )

    @contextmanager
    def _workspace(self, name: str, work: Path | None = None) -> Iterator[tuple[Workspace, Path | None]]:
        """A workspace for one CLI (in the session's directory `work`, if given), and the CLI to
        start: a launcher into the workspace's sandbox (or, with `SANDBOX=off`, the CLI itself,
        through a launcher that becomes `CLAUDE_JOB_USER` if set)."""
        settings = self._settings
        with job_workspace(settings.workspace_root, name, settings.claude_job_user, work) as workspace:
            if not self._sandbox.ready and settings.claude_job_user is None:
                yield workspace, settings.claude_cli_path
                return
            with self._sandbox.launcher(workspace, self._cwd(workspace)) as launcher:
                yield workspace, launcher

    def _cwd(self, workspace: Workspace) -> Path:
        """The CLI's working directory, as it sees it: a sandboxed session's is the same on every
        worker (`session_view`)."""
        if self._settings.claude_cwd is not None:
            return self._settings.claude_cwd
        if workspace.work is not None and self._sandbox.ready:
            return session_view(self._settings.workspace_root)
        return workspace.cwd

    def _options(
        self, job: CompletionJob, workspace: Workspace, token: str | None, cli: Path | None
    ) -> ClaudeAgentOptions:
        """The CLI's whole environment is this `env` (the worker forgot its own, see `environment`)."""
        settings = self._settings
        env = {
            MARKER: str(workspace.root),
            "HOME": str(workspace.home),
            "CLAUDE_CONFIG_DIR": str(workspace.config),
            "CLAUDE_CODE_TMPDIR": str(workspace.tmp),
            "TMPDIR": str(workspace.tmp),
            "XDG_RUNTIME_DIR": str(workspace.tmp),
            "CLAUDE_CODE_MAX_RETRIES": str(settings.claude_max_retries),
            "CLAUDE_CODE_DISABLE_LEGACY_MODEL_REMAP": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1",
            # Auto-memory would tell the model to keep notes in the workspace, which is removed
            # when the job ends; off, the prompt is ~10 KB smaller and the CLI does less at start.
            "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
        }
        if self._proxy is not None and token is not None and self._proxy.socket is not None:
            # The real credential stays in this process: the CLI talks to the proxy with a job
            # token, in plain HTTP over its socket (bound into the sandbox at MODEL_SOCKET).
            env["ANTHROPIC_UNIX_SOCKET"] = str(MODEL_SOCKET if self._sandbox.ready else self._proxy.socket)
            env["ANTHROPIC_BASE_URL"] = "http://localhost"
            login = self._auth_method == "claude_cli"
            env["CLAUDE_CODE_OAUTH_TOKEN" if login else "ANTHROPIC_API_KEY"] = token
        if self._sandbox.ready:
            env.update(self._sandbox.environment())
        env.update(self._provider_env)  # Bedrock, Vertex: the CLI signs for itself
        if job.max_tokens is not None:
            env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(job.max_tokens)
        agent = job.agent
        if agent.permission_mode == "bypassPermissions" and self._runs_as_root:
            env["IS_SANDBOX"] = "1"  # else the CLI refuses bypass mode as root
        skills = self._skills(job, workspace)
        # The job's tools (API-side policy: CLAUDE_TOOLS), pre-approved; none: plain Q&A.
        tools = [*agent.tools, "Skill"] if skills else list(agent.tools)
        if not tools and self._auth_method != "claude_cli":
            # Plain Q&A runs Claude Code's minimal mode: no 28 KB coding-agent prompt about tools the
            # job does not have, no hooks, plugins or CLAUDE.md discovery (~8% less CPU per job).
            # Not on the CLI's own login: minimal mode reads only an API key.
            env["CLAUDE_CODE_SIMPLE"] = "1"
        system_prompt, system_prompt_file = self._system_prompt(job, workspace)
        return ClaudeAgentOptions(
            model=job.backend_model or job.model,
            system_prompt=system_prompt,
            extra_args=system_prompt_file,
            include_partial_messages=True,
            tools=tools,
            allowed_tools=[*tools, *caller_functions.tool_names(job), *agent.mcp_tools],
            mcp_servers={**caller_functions.servers(job), **operator_mcp.servers(job, settings)},
            disallowed_tools=list(agent.disallowed_tools),
            permission_mode=agent.permission_mode,
            max_turns=agent.max_turns,
            max_thinking_tokens=_thinking_budget(
                agent.max_thinking_tokens, job.max_tokens, settings.claude_max_thinking_tokens
            ),
            effort=agent.effort,
            skills=skills or None,
            # Nothing from the workspace (its .claude/settings.json could install hooks); with
            # skills, the user source: the job's own fresh config directory, where they were copied.
            setting_sources=["user"] if skills else [],
            # Not `user=`: the launcher becomes the job's user (`Sandbox.launcher`).
            cwd=self._cwd(workspace),
            env=env,
            cli_path=cli,
            # What the CLI says when it fails ("exited unexpectedly" said nothing of why: an
            # outside probe); it writes nothing there on a run that goes well.
            stderr=StderrLog(),
        )

    def _skills(self, job: CompletionJob, workspace: Workspace) -> list[str]:
        """The operator's skills, copied into the job's config directory, unless the job has none."""
        skills_dir = self._settings.claude_skills_dir
        if skills_dir is None or not job.agent.skills or "Skill" in job.agent.disallowed_tools:
            return []
        names = installed_skills(skills_dir)
        install_skills(skills_dir, names, workspace)
        return names

    def _system_prompt(
        self, job: CompletionJob, workspace: Workspace
    ) -> tuple[str | SystemPromptPreset | SystemPromptFile, dict[str, str | None]]:
        """The CLI's system prompt option, and the flags that pass it as a file instead.

        One that no command line can carry goes in a file of the job's: Linux refuses an argument
        over 128 KiB (`MAX_ARG_STRLEN`) or holding a NUL, and the CLI did not start (a 503 for a
        long system message, an outside probe)."""
        system: SystemPromptPreset = {"type": "preset", "preset": "claude_code"}
        text = job.system_prompt
        if not text:
            return system, {}
        replace = self._settings.claude_system_prompt_mode == "replace"
        if len(text.encode()) > _ARGUMENT_BYTES or "\0" in text:
            path = workspace.config / "system-prompt.md"
            path.write_text(text)
            path.chmod(0o644)  # the job's user reads it (`CLAUDE_JOB_USER`): the folder is theirs
            if replace:
                return {"type": "file", "path": str(path)}, {}
            return system, {"append-system-prompt-file": str(path)}
        if replace:
            return text, {}
        system["append"] = text
        return system, {}

    async def stream(
        self, job: CompletionJob, work: Path | None = None, deferred: TurnWrites | None = None
    ) -> AsyncGenerator[BackendEvent, None]:
        self._refuse(job)
        warm = await self._warm.take(job) if self._warm is not None and work is None else None
        run = self._run_warm(job, warm) if warm is not None else self._run_cold(job, work, deferred)
        ordered = warm is not None  # a warm run orders a replacement itself, if its client is lost
        try:
            async with aclosing(run):
                async for event in run:
                    yield event
                    if not ordered and isinstance(event, Delta):
                        ordered = True
                        self._order_warm(job)
        finally:
            if not ordered:
                self._order_warm(job)

    def _order_warm(self, job: CompletionJob) -> None:
        """A warm client for the next job like this one, started once this one no longer waits
        for its first token (see `worker/warm.py`)."""
        if self._warm is not None:
            self._warm.order(job)

    async def _run_warm(self, job: CompletionJob, warm: WarmClient) -> AsyncGenerator[BackendEvent, None]:
        """The job on a warm client, which goes back to the pool if the job ran no tool and ended
        on its result (`worker/warm.py`); else it is discarded, and a replacement ordered."""
        # Its turns are one once merged (`warm.profile`): several user messages in a row are one
        # prompt (only the last was sent, and the others silently lost: an outside probe).
        turn, (prompt,) = str(uuid.uuid4()), merged(job.turns)
        clean = reusable(job)  # so far: no tool ran
        kept = False  # and the turn ended on its result: the client may go back
        try:
            await warm.client.query(streamed_message(user_content(prompt), turn))
            # Stopped at the caller's call, the CLI is killed where it is: the SDK's disconnect
            # cancels the call's pending answer, and the CLI went on from there.
            async for event in _relay(
                job,
                warm.client.receive_response(),
                None,
                warm.discard,
                output_room(self._settings, job),
            ):
                if isinstance(event, ToolStep) and clean:
                    clean = False
                    self._order_warm(job)
                elif isinstance(event, Done):
                    # Any other end came before the CLI's result (a limit, a refusal, a call):
                    # the CLI is still at work.
                    kept = clean and event.finish_reason is FinishReason.STOP
                    event = self._own_cost(event, warm)
                yield event
        finally:
            if not (kept and self._warm is not None and self._warm.give_back(warm, job, turn)):
                await warm.discard()
                self._order_warm(job)

    @staticmethod
    def _own_cost(done: Done, warm: WarmClient) -> Done:
        """The job's cost: the CLI reports its running total, earlier jobs on the client included."""
        total = done.usage.cost_usd
        if total is None:
            return done
        # Rounded off the float subtraction's noise (0.000462 - 0.000231 = 0.00023100000000000003):
        # the smallest price, a token at $0.1 a million, is 1e-7 dollars.
        cost, warm.spent_usd = max(0.0, round(total - warm.spent_usd, 12)), total
        return done.model_copy(update={"usage": done.usage.model_copy(update={"cost_usd": cost})})

    async def _run_cold(
        self, job: CompletionJob, work: Path | None, deferred: TurnWrites | None
    ) -> AsyncGenerator[BackendEvent, None]:
        with self._workspace(job.id, work) as (workspace, cli), self._stoppable(job.id, workspace):
            token = self._proxy.issue(server_tools_of(job.agent.tools)) if self._proxy is not None else None
            options = self._options(job, workspace, token, cli)
            options, prompt, transcript = await self._continue_session(job, options)
            messages = query(prompt=prompt, options=options)
            try:
                async for event in _relay(
                    job,
                    messages,
                    transcript,
                    lambda: _close(messages),
                    output_room(self._settings, job),
                ):
                    if isinstance(event, Done) and transcript is not None and deferred is not None:
                        deferred.append(transcript.write)  # sealed or dropped: written as the turn commits
                    yield event
            finally:
                if transcript is None:  # nothing to flush: the CLI's shutdown (~30 ms of CPU) is waste
                    for pid in children_for(workspace):
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                await _close(messages)
                if token is not None and self._proxy is not None:
                    self._proxy.revoke(token)

    @contextmanager
    def _stoppable(self, job_id: str, workspace: Workspace) -> Iterator[None]:
        self._cold[job_id] = workspace
        try:
            yield
        finally:
            del self._cold[job_id]

    def stop(self, job_id: str) -> None:
        """Kills a cold job's CLI before its task is cancelled: the cancellation reaches the SDK's
        generator first, whose cleanup waits up to 5 s for a CLI still streaming to exit by
        itself (a warm job's client is killed before it is closed: `WarmClient.discard`)."""
        if (workspace := self._cold.get(job_id)) is not None:
            kill_processes_of(workspace)

    async def _spawn_warm(self, job: CompletionJob) -> WarmClient:
        """A connected client for jobs like `job`, in a workspace of its own (see `worker/warm.py`)."""
        stack = ExitStack()
        name = f"warm-{uuid.uuid4().hex}"
        workspace, cli = stack.enter_context(self._workspace(name))
        proxy = self._proxy
        token = proxy.issue(server_tools_of(job.agent.tools), warming=True) if proxy is not None else None
        options = self._options(job, workspace, token, cli)
        # Its transcript would be left for the next job of the key (`give_back`); nothing resumes it.
        options.extra_args["no-session-persistence"] = None
        warm = WarmClient(ClaudeSDKClient(options), stack)
        if proxy is not None and token is not None:
            warm.release = lambda: proxy.revoke(token)
        try:
            connecting = asyncio.ensure_future(warm.client.connect())
            try:
                warm.pids = await _started(workspace, connecting)
                renice(warm.pids, REFILL_NICENESS)  # below the jobs' CLIs, whose CPU it would take
            finally:
                await connecting
            if proxy is not None and token is not None:
                # Only behind the proxy: it answers the warm-up turn, which must not reach the model API.
                await warm_up(warm.client)
                proxy.admit(token)
        except BaseException:
            await warm.discard()
            raise
        # All of them now: at first only the sandbox's launcher ran, not yet the CLI inside it.
        warm.pids = children_for(workspace)
        if self._warm is not None and warm.pids:
            self._warm.client_mib = resident_mib(warm.pids)
        return warm

    async def close(self) -> None:
        if self._models is not None:
            self._models.cancel()
        if self._warm is not None:
            await self._warm.close()
        remove_runtime_dir(self._runtime_dir)

    async def _continue_session(
        self, job: CompletionJob, options: ClaudeAgentOptions
    ) -> tuple[ClaudeAgentOptions, str | AsyncIterator[dict[str, Any]], JobTranscript | None]:
        """Options, prompt and transcript for the run: earlier turns come from a transcript.

        A stateless request's earlier turns are given as a one-off transcript (`worker/history.py`);
        a session resumes its own stored Claude Code transcript.

        The SDK materializes the stored transcript for `resume` before the CLI starts, so the
        model sees the earlier turns as real turns and only the new ones are sent as the prompt.
        A session without a stored transcript (its first turn, or turns answered by another
        backend) starts one under its own id, with the session's history as context.
        """
        if job.session is None:
            *earlier, last = merged(job.turns)
            if not earlier:
                return options, user_message(last), None
            history = HistoryStore.of(str(options.cwd), job.backend_model or job.model, earlier)
            store = cast(SessionStore, history)
            return replace(options, session_store=store, resume=history.session_id), user_message(last), None
        transcript_id = job.session.transcript_id
        max_chars = self._settings.turn_transcript_max_chars
        transcript = JobTranscript(
            self._store, project=job.session.owner, session_id=transcript_id, max_chars=max_chars
        )
        store = cast(SessionStore, transcript)  # duck-typed: the optional methods it lacks stay unused
        if await transcript.exists():
            resumed = replace(options, session_store=store, resume=transcript_id)
            return resumed, _prompt(job.turns), transcript
        started = replace(options, session_store=store, session_id=transcript_id)
        return started, _prompt([*await sessions.history(self._redis, job.session), *job.turns]), transcript


async def _started(workspace: Workspace, connecting: "asyncio.Future[None]") -> list[int]:
    """The processes of a CLI being started in `workspace`, as soon as it has been spawned."""
    for _ in range(200):
        if pids := children_for(workspace):
            return pids
        if connecting.done():
            break
        await asyncio.sleep(0.005)
    return []


async def _relay(
    job: CompletionJob,
    messages: AsyncIterator[Any],
    transcript: JobTranscript | None,
    stop: Callable[[], Awaitable[None]],
    room: int,
) -> AsyncIterator[BackendEvent]:
    """One run's SDK messages → `job`'s events; `stop` ends the run early (at the caller's token limit,
    or when the model calls the caller's functions: the caller runs them, not the CLI). Calls past
    `room` characters (the job's output bound) end it at once: the bound then fails the job."""
    started: dict[str, Any] = {}  # usage from the current upstream message's start
    latest: dict[str, Any] = {}  # and as its last delta left it
    earlier: dict[str, Any] = {}  # the run's upstream messages before it, summed
    message_ended = False  # the current upstream message has its stop reason
    calls: list[ToolCall] = []  # calls to the caller's functions in the current turn
    calls_chars = 0  # what they would add to the output: counted as they come (a job's tool can
    # forge the CLI's messages, and an outside probe had a worker hold 632 MB of calls)
    sent = thought = ""  # the current upstream message's text and thinking, as relayed
    resent = rethought = ""  # after a cut: what of the next message the caller may already have
    resuming = False  # the model was asked to go on from a cut, not to start over
    parted = False  # an earlier message's text ended: the next text starts a paragraph
    steps = ToolSteps()  # the agent's own tool runs
    try:
        async for message in messages:
            if isinstance(message, StreamEvent):
                event = message.event
                if event.get("type") == "content_block_delta":
                    delta = event.get("delta", {})
                    if delta.get("type") == "text_delta" and delta.get("text"):
                        if resuming and not _repeats(delta["text"], resent):
                            resent = ""  # it went on from the cut: nothing of it is repeated
                        resuming = False
                        withdrawn, text, resent = _unsent(delta["text"], resent)
                        sent += delta["text"]
                        if withdrawn:
                            yield Retraction(chars=withdrawn)
                        if text:
                            # The model's messages around its tool runs, apart (they ran together:
                            # "I'll check the files.The directory is fine.", an outside probe).
                            if parted:
                                yield MESSAGE_BREAK
                            yield Delta(text=text)
                            parted = False
                    elif delta.get("type") == "thinking_delta" and delta.get("thinking"):
                        # Thinking is never taken back: a retry's other thoughts simply follow.
                        _, thinking, rethought = _unsent(delta["thinking"], rethought)
                        thought += delta["thinking"]
                        if thinking:
                            yield Reasoning(text=thinking)
                    else:
                        yield PROGRESS  # a tool call or thinking being written
                elif event.get("type") == "message_start":
                    earlier = _summed(earlier, latest)
                    started = event.get("message", {}).get("usage", {})
                    parted = parted or (message_ended and bool(sent))  # not after a cut
                    latest, message_ended, sent, thought = started, False, "", ""
                    yield UsageReport(_usage(started))
                elif (ending := _ends_the_run(event)) is not None:
                    # The CLI would ask the model to continue past the caller's limit, or ask
                    # again after a refusal (the refused text and the new answer joined, found
                    # by an outside probe); OpenAI's and Anthropic's semantics end here, with
                    # the text sent so far. No ResultMessage follows, so no cost.
                    usage = _usage(_summed(earlier, {**started, **event["usage"]}))
                    if transcript is not None:  # closing the run flushes its transcript
                        await stop()
                        await transcript.drop()
                    yield _ended_at(ending, usage)
                    return
                elif event.get("type") == "message_delta":
                    latest, message_ended = {**started, **event.get("usage", {})}, True
                elif event.get("type") == "message_stop" and not message_ended:
                    # The upstream cut the message (the CLI closes it without a stop reason). The
                    # CLI then asks again (`api_retry`: the new message starts over), or, once a
                    # whole block had arrived, asks the model to go on from the cut; a model may
                    # start over then too. Either way, what the caller has must not come twice.
                    resent, rethought, resuming = sent, thought, True
            elif isinstance(message, AssistantMessage):
                found = caller_functions.calls_in(message, job)
                calls += found
                calls_chars += sum(map(call_chars, found))
                for step in steps.started(message):
                    yield step
                yield PROGRESS
            elif isinstance(message, UserMessage):
                for step in steps.ended(message):
                    yield step
                yield PROGRESS
            elif isinstance(message, SystemMessage) and message.subtype == "api_retry":
                resuming = False  # asked again: the new message starts from its beginning
                yield PROGRESS
            elif isinstance(message, ResultMessage):
                if message.is_error and message.subtype != _OUT_OF_TURNS:
                    raise upstream_failure(message.api_error_status, message.result)
                if transcript is not None:  # the SDK flushed the turn's transcript already
                    try:
                        transcript.seal()
                    except TranscriptTooLarge as exc:
                        raise BackendError(FailureCode.OUTPUT_TOO_LARGE, str(exc)) from None
                yield _done(message)
                return
            else:
                yield PROGRESS
            if calls and (message_ended or calls_chars > room):
                # The turn ends on the calls: the caller runs its functions, not the CLI.
                await stop()
                usage = _usage(_summed(earlier, latest))
                yield Done(finish_reason=FinishReason.TOOL_CALLS, usage=usage, tool_calls=calls)
                return
    except CLINotFoundError as exc:
        raise BackendError(FailureCode.BACKEND_UNAVAILABLE, "Claude Code is not installed.") from exc
    except ClaudeSDKError as exc:
        log.warning("Claude Code run failed: %s", type(exc).__name__)
        raise BackendError(FailureCode.BACKEND_UNAVAILABLE, "Claude Code exited unexpectedly.") from exc
    raise BackendError(FailureCode.BACKEND_UNAVAILABLE, "Claude Code ended without a result.")


def _unsent(text: str, resent: str) -> tuple[int, str, str]:
    """For a delta of a retried message: how many characters of what the caller has to withdraw,
    the text it does not have yet, and what is left of `resent` after it. A retry that repeats the
    cut message is only continued; one that says something else withdraws the rest of the cut
    text (from where the two part) and goes on from there."""
    if not resent:
        return 0, text, ""
    if resent.startswith(text):
        return 0, "", resent[len(text) :]
    if text.startswith(resent):
        return 0, text[len(resent) :], ""
    common = next((i for i, (a, b) in enumerate(zip(text, resent, strict=False)) if a != b), len(text))
    log.warning("a retried upstream message differs from the one that was cut")
    return len(resent) - common, text[common:], ""


def _repeats(text: str, cut: str) -> bool:
    """Whether a message's first text after a cut starts the cut text over (else it goes on)."""
    return cut.startswith(text) or text.startswith(cut)


def _prompt(turns: list[Turn]) -> str | AsyncIterator[dict[str, Any]]:
    """Several turns new to a session's transcript travel as context in the prompt (text only)."""
    return user_message(turns[0]) if len(turns) == 1 else prompt_for(turns)


async def _close(messages: AsyncIterator[Any]) -> None:
    if isinstance(messages, AsyncGenerator):  # stops the CLI at once on early exit
        await messages.aclose()


def _reason(said: str) -> str:
    """The model API's reason, as the CLI's result text gives it (`API Error: 400 <reason>`)."""
    return _CLI_ERROR_PREFIX.sub("", said, count=1).strip()


def _thinking_budget(asked: int | None, max_tokens: int | None, cap: int) -> int | None:
    """The CLI's thinking budget. Under a reply limit of `_MIN_THINKING_BUDGET` or less, none: the
    API takes no smaller budget and none as large as the limit, and the CLI, cutting the budget
    to fit the limit, raises it back to that minimum (every such request would be refused). Under
    a limit and no budget asked, half the limit, within the operator's `cap`: the CLI's default
    takes all of it but one token, and the answer was left none (none at all when half is under
    the minimum; and a limit past the model's, which the CLI cuts to it, made half of it all)."""
    if max_tokens is None:
        return asked
    if max_tokens <= _MIN_THINKING_BUDGET:
        return 0
    if asked is None:
        half = min(max_tokens // 2, cap)
        return half if half >= _MIN_THINKING_BUDGET else 0
    return asked


def _ends_the_run(event: dict[str, Any]) -> str | None:
    """The upstream message's stop, if the run ends at it (one the CLI would go on from)."""
    if event.get("type") != "message_delta":
        return None
    stop = event.get("delta", {}).get("stop_reason")
    return stop if stop in _ENDING_STOPS else None


def _summed(usage: dict[str, Any], more: dict[str, Any]) -> dict[str, int]:
    """Two upstream messages' token counts as one: a run that ends before its result (no total
    from the CLI then) counts every model call it made, not only its last."""
    counts = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    return {count: int(usage.get(count) or 0) + int(more.get(count) or 0) for count in counts}


_MOST_TOKENS = 10**9
_MOST_USD = 10.0**6
"""Far beyond any one job: what the CLI reports is clamped to them (see `_usage`)."""


def _usage(usage: dict[str, Any], cost_usd: float | None = None) -> Usage:
    """Anthropic usage → ours: prompt tokens include the cached ones, as OpenAI counts them. The
    CLI's report is within its job's reach (its tools can write its output), so each count and the
    cost are clamped to what a job can have: an outside probe made a job report -999,999,999
    tokens and -$5,000, which the service-wide counters took, and a count that overflowed them,
    which left every later job uncounted. The cost is rounded off the CLI's float noise
    (0.00045000000000000004)."""

    def count(name: str) -> int:
        return min(max(0, int(usage.get(name) or 0)), _MOST_TOKENS)

    cache_read, cache_write = count("cache_read_input_tokens"), count("cache_creation_input_tokens")
    return Usage(
        prompt_tokens=count("input_tokens") + cache_write + cache_read,
        completion_tokens=count("output_tokens"),
        cached_prompt_tokens=cache_read,
        cache_write_tokens=cache_write,
        cost_usd=None if cost_usd is None else min(max(0.0, round(cost_usd, 12)), _MOST_USD),
    )


def _done(result: ResultMessage) -> Done:
    usage = _usage(result.usage or {}, result.total_cost_usd)
    if result.subtype == _OUT_OF_TURNS:  # the agent's turn budget ran out: cut short, as by a limit
        return Done(finish_reason=FinishReason.LENGTH, usage=usage)
    return _ended_at(result.stop_reason or "", usage)


def _ended_at(stop: str, usage: Usage) -> Done:
    """The end of a reply at the model API's `stop`."""
    finish_reason = _FINISH_REASONS.get(stop, FinishReason.STOP)
    return Done(finish_reason=finish_reason, usage=usage, context_window_full=stop == _CONTEXT_WINDOW_FULL)
