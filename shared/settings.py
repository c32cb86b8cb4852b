"""The gateway's configuration: the only place the environment is read.

Both processes build one `Settings()` at start-up and pass it down; nothing else calls
`os.environ`. Field names map to upper-case environment variables (`REDIS_URL`, `PORT`, ...).
"""

import ipaddress
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from shared.agent import Effort, PermissionMode
from shared.mcp import NAME_PATTERN, RESERVED, McpServer

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
_LONGEST_S = 10 * 365 * 24 * 3600  # any duration setting (`..._S`)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,
        allow_inf_nan=False,  # `inf` passed as a duration, then overflowed at runtime (an outside probe)
    )

    # --- Redis: queue, event streams, wake-ups ---------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis to share between processes; unset, `claude-gateway up` starts a private one.",
    )
    queue_name: str = "gateway:queue"
    state_dir: Path = Path(".state")
    redis_maxmemory: str = Field(
        default="1gb",
        pattern=r"^(?i:\d+(b|k|kb|m|mb|g|gb)?)$",  # as Redis reads it
        description="The memory limit of the private Redis `up` starts (and of docker-compose.yml's); "
        "full, it refuses writes (503 storage_full). 0: none.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        """Said at start: another scheme failed every process as if Redis were down, for good."""
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("use redis://host:port/db, rediss:// (TLS) or unix:///path")
        # The CLI took `/x` for database 0, the API and workers failed on it (an outside probe).
        db = urlsplit(value).path.strip("/") if value is not None and not value.startswith("unix://") else ""
        if db and not db.isdigit():  # not echoed: a password with a '/' in it would be
            raise ValueError("the database (the URL's path) must be a number")
        return value

    # --- API ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_request_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    send_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A client whose response waits in the API (the socket's buffers full) and that "
        "reads under 32 KiB of it in this long is disconnected.",
    )
    queue_timeout_s: float = Field(
        default=60.0, gt=0, description="A job not started by then fails with 503."
    )
    background_queue_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="A background job (nobody waits to withdraw it) not started by then fails with "
        "queue_timeout; workers withdraw it.",
    )
    api_processes: int = Field(
        default=2,
        ge=1,
        le=64,  # one machine's: a typo of a large number had `up` start processes until stopped
        description="API processes `claude-gateway up` runs on its port (one event loop is one core).",
    )
    api_shared_port: bool = Field(
        default=False,
        description="Bind the API's port with SO_REUSEPORT, so that several API processes on this "
        "machine share it; `up` sets it for its own when API_PROCESSES > 1.",
    )
    stream_commit_after_s: float = Field(
        default=10.0, gt=0, description="How long a stream's headers wait for the job's first event."
    )
    stream_reasoning: bool = Field(
        default=True,
        description="Show the agent's thinking and tool steps in replies (a request may turn it off).",
    )
    log_level: Annotated[LogLevel, BeforeValidator(lambda name: str(name).lower())] = "info"

    # --- Worker ---------------------------------------------------------------------------
    # Bounded as one machine's (an outside probe's WORKERS=100000 started workers until stopped).
    workers: int = Field(
        default=2, ge=1, le=64, description="Worker processes started by `claude-gateway up`."
    )
    jobs_per_worker: int = Field(default=4, ge=1, le=256)
    backend: Literal["claude", "scripted"] = "claude"
    job_timeout_s: float = Field(default=600.0, gt=0)
    job_max_output_chars: int = Field(
        default=8_000_000,
        ge=1,
        description="Most characters of output (text, thinking, tool steps, function calls) one request "
        "writes (its n choices share it).",
    )
    turn_transcript_max_chars: int = Field(
        default=32_000_000,
        ge=1,
        description="Most characters (as JSON) one session turn may add to its Claude Code transcript.",
    )
    drain_timeout_s: int = Field(
        default=50,
        ge=0,
        description="On SIGTERM, how long running jobs may finish before they are cancelled.",
    )
    event_ttl_s: int = Field(
        default=3600, ge=60, description="How long a job's record and events stay readable after it ends."
    )
    poll_fallback_s: float = Field(
        default=0.5, gt=0, description="Queue poll interval when a wake-up notification is missed."
    )

    # --- Durable jobs: leases, retries, limits, cancellation -------------------------------
    stall_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="A job that produces nothing (no token, no tool activity) this long fails.",
    )
    lease_s: float = Field(
        default=10.0, gt=0, description="A job whose worker has not renewed its lease this long is recovered."
    )
    lease_renew_s: float = Field(default=2.0, gt=0, description="How often workers renew leases and sweep.")
    max_attempts: int = Field(
        default=3, ge=1, description="Attempts at a job whose workers were lost before it produced output."
    )
    redis_outage_grace_s: float = Field(
        default=30.0, ge=0, description="How long a worker or a stream waits out a Redis outage."
    )
    redis_reply_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How long the API waits for a reply from Redis: a frozen or stalled Redis gets "
        "requests a 503, not a hang.",
    )
    cancel_on_disconnect: bool = Field(
        default=False,
        description="Cancel a job when its client disconnects, streamed or not (off: a stream's job "
        "runs on, resumable by id; a plain request's only with an Idempotency-Key or a session).",
    )

    # --- Models ---------------------------------------------------------------------------
    models: list[Annotated[str, Field(pattern=r"^\S+$")]] = Field(
        default=["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"],
        min_length=1,  # none, or a blank one: every request a 404 while the service looks ready
    )
    models_created: int = Field(default=1759276800, description="`created` reported for every model.")
    models_from_upstream: bool = Field(
        default=False,
        description="Also list and serve the Anthropic API's own models (fetched by workers that "
        "have ANTHROPIC_API_KEY).",
    )
    upstream_models_ttl_s: int = Field(
        default=3600, ge=60, description="How long a fetched upstream model list is kept (refreshed at half)."
    )

    # --- The Claude backend (passed to the CLI, never logged) -----------------------------
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    claude_max_retries: int = Field(
        default=2,
        ge=0,
        validation_alias=AliasChoices("claude_max_retries", "claude_code_max_retries"),
        description="Upstream retries per request (also read as CLAUDE_CODE_MAX_RETRIES), bounded so a "
        "bad key surfaces in seconds.",
    )
    workspace_root: Path = Field(
        default=Path(".state/workspaces"), description="Unset: `STATE_DIR/workspaces`."
    )
    claude_cli_path: Path | None = None

    # --- How the workers reach the model: backend auth (docs/claude-backend.md) -----------
    # Detection as in the original wrapper: CLAUDE_AUTH_METHOD, else CLAUDE_CODE_USE_BEDROCK,
    # CLAUDE_CODE_USE_VERTEX, ANTHROPIC_API_KEY, else the CLI's own login (shared/backend_auth.py).
    claude_auth_method: Literal["anthropic", "bedrock", "vertex", "claude_cli"] | None = Field(
        default=None,
        description="Explicit choice: cli (claude_cli), api_key (anthropic), bedrock or vertex; "
        "unset: detected.",
    )
    claude_code_use_bedrock: bool = False
    claude_code_use_vertex: bool = False
    # Amazon Bedrock: the CLI signs its own requests, so these reach the CLI's environment.
    aws_region: str | None = None
    aws_default_region: str | None = None
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    aws_profile: str | None = None
    aws_shared_credentials_file: Path | None = None
    aws_config_file: Path | None = None
    aws_bearer_token_bedrock: SecretStr | None = None
    aws_web_identity_token_file: Path | None = None
    aws_role_arn: str | None = None
    aws_container_credentials_relative_uri: str | None = None
    aws_container_credentials_full_uri: str | None = None
    anthropic_bedrock_base_url: str | None = None
    claude_code_skip_bedrock_auth: bool = False
    # Google Vertex AI: likewise.
    anthropic_vertex_project_id: str | None = None
    cloud_ml_region: str | None = None
    google_application_credentials: Path | None = None
    anthropic_vertex_base_url: str | None = None
    claude_code_skip_vertex_auth: bool = False
    # The CLI's own login (`claude setup-token`, or the login `claude` stored for the worker's user).
    claude_code_oauth_token: SecretStr | None = None
    claude_config_dir: Path | None = Field(
        default=None,
        description="The worker user's Claude Code config directory, where its login is stored; "
        "unset: ~/.claude.",
    )
    debug_endpoints: bool = Field(
        default=False, description="Serve POST /v1/debug/request (redacted echo of a request)."
    )

    @field_validator("claude_auth_method", mode="before")
    @classmethod
    def _auth_method_aliases(cls, value: object) -> object:
        """The original wrapper's names for the methods, case-insensitive."""
        if not isinstance(value, str):
            return value
        aliases = {"cli": "claude_cli", "api_key": "anthropic"}
        name = value.strip().lower()
        name = aliases.get(name, name)
        if name not in {"anthropic", "bedrock", "vertex", "claude_cli"}:
            raise ValueError(f"unknown method {value!r}: use cli, api_key, bedrock or vertex")
        return name

    # --- The scripted backend (tests and benchmarks) --------------------------------------
    scripted_text: str = "Hello from the scripted backend."
    scripted_delay_ms: float = Field(default=0.0, ge=0)

    # --- Operations: heartbeats, status, logs ---------------------------------------------
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="How often each worker refreshes its heartbeat in Redis."
    )
    heartbeat_ttl_factor: float = Field(
        default=3.0,
        ge=1.5,
        description="A heartbeat expires after this many intervals: a worker silent that long is not alive.",
    )
    log_format: Literal["text", "json"] = "text"
    recent_failures_kept: int = Field(default=100, ge=1, description="Failed jobs `status` can show.")

    def queue_timeout(self, *, background: bool) -> float:
        """How long a job may wait for a worker: a background one longer, as no request waits."""
        return self.background_queue_timeout_s if background else self.queue_timeout_s

    def job_lifetime(self, *, background: bool) -> float:
        """The longest a job may last: each of its attempts (a worker lost, it is queued and run
        again) waiting for a worker and running."""
        return self.max_attempts * (self.queue_timeout(background=background) + self.job_timeout_s)

    @property
    def heartbeat_ttl_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_ttl_factor

    # --- Access control, quotas, request hygiene, agent isolation (docs/security.md) ------
    api_key: SecretStr | None = Field(default=None, description="One client API key; never logged.")
    api_keys: SecretStr | None = Field(default=None, description="More client API keys, comma-separated.")
    allow_unauthenticated: bool = Field(
        default=False, description="Explicit opt-out: serve a non-loopback HOST with no API key."
    )
    rate_limit_enabled: bool = True
    rate_limit_per_minute: int = Field(default=120, ge=1, description="Per key and per address.")
    rate_limit_chat_per_minute: int = Field(default=60, ge=1)
    rate_limit_session_per_minute: int = Field(default=120, ge=1)
    rate_limit_auth_per_minute: int = Field(
        default=30, ge=1, description="Failed authentications per client address."
    )
    max_concurrent_jobs_per_key: int = Field(default=8, ge=0, description="0: no cap.")
    max_stored_bytes_per_key: int = Field(
        default=128 * 1024 * 1024,
        ge=0,
        description="What a key keeps in Redis beyond its running jobs (stored Responses requests, "
        "answered jobs' events, sessions' histories and transcripts) until it expires; at it, new "
        "jobs get 429 storage_limit_exceeded. 0: no limit.",
    )
    max_messages: int = Field(default=1000, ge=1)
    max_prompt_chars: int = Field(default=1_000_000, ge=1, description="All message text of one request.")
    max_image_bytes: int = Field(
        default=8 * 1024 * 1024, ge=0, description="Inline (base64) image data of one request, as sent."
    )
    cors_origins: list[str] = Field(default=[], description="Browser origins allowed; empty: CORS off.")
    trusted_proxies: list[str] = Field(
        default=[], description="Addresses or CIDRs whose X-Forwarded-For is believed."
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        """Each an address or a CIDR: one that is not failed every request, `/health` too."""
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
        return value

    claude_tools: list[str] = Field(
        # The original wrapper's default set: Claude Code with its tools is the product. Callers need
        # a key (or loopback), and each job's tools run in its own workspace (docs/security.md).
        default=["Read", "Glob", "Grep", "Bash", "Write", "Edit"],
        description="Tools callers' jobs may use, pre-approved; [] for plain question and answer.",
    )
    claude_job_user: str | None = Field(
        default=None, description="Run each CLI as this user (the worker must be root to switch)."
    )
    # Every job's CLI in a bubblewrap sandbox of its own (worker/sandbox.py, docs/security.md).
    sandbox: Literal["on", "off"] = Field(
        default="on",
        description="on: every job runs in a sandbox, and a worker that cannot build one refuses "
        "jobs (503); off: no sandbox (explicit operator choice).",
    )
    sandbox_memory_mb: int = Field(
        default=4096, ge=0, description="Address space of each process in a job's sandbox (MiB); 0: no limit."
    )
    sandbox_processes: int = Field(
        default=512, ge=0, description="Processes and threads in a job's sandbox; 0: no limit."
    )
    sandbox_shm_mb: int = Field(
        default=64,
        ge=1,
        description="Size of a job's /dev/shm (MiB), the one memory-backed place it can write; its "
        "root and /dev are read-only.",
    )
    sandbox_cpu_s: int = Field(
        default=900, ge=0, description="CPU seconds of each process in a job's sandbox; 0: no limit."
    )
    sandbox_read_only_paths: list[Path] = Field(
        default=[],
        description="Host paths every job's sandbox sees read-only besides /usr and the CLI, e.g. the "
        "program and interpreter of a stdio MCP server (MCP_SERVERS).",
    )
    sandbox_allowed_hosts: list[str] = Field(
        default=[],
        description="Hosts a sandboxed job may reach over HTTPS through the worker's CONNECT proxy "
        '("host", "host:port" or "*.domain"; port 443 unless given); empty: no egress.',
    )

    def client_api_keys(self) -> list[str]:
        """The configured client keys (`API_KEY` and `API_KEYS`), secrets in memory only."""
        keys = [self.api_key.get_secret_value()] if self.api_key else []
        if self.api_keys:
            keys += self.api_keys.get_secret_value().split(",")
        return [key.strip() for key in keys if key.strip()]

    # --- Sessions (`session_id`: conversations kept in Redis) ------------------------------
    session_ttl_s: int = Field(
        default=3600, ge=1, description="A session idle this long is removed (sliding, per request)."
    )

    # --- Session workspaces (docs/sessions.md): kept between turns in a workspace store ---
    workspace_store: str | None = Field(
        default=None,
        description="file:///path or s3://bucket/prefix; unset: a directory in STATE_DIR.",
    )
    workspace_s3_endpoint: str | None = Field(
        default=None, description="An S3-compatible server's URL; unset: AWS S3."
    )
    workspace_s3_region: str = "us-east-1"
    workspace_s3_access_key_id: SecretStr | None = None
    workspace_s3_secret_access_key: SecretStr | None = None
    workspace_max_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1, description="Most bytes of files one session workspace holds."
    )
    workspace_max_files: int = Field(default=20_000, ge=1, description="Most files one workspace holds.")
    workspace_max_bytes_per_key: int = Field(
        default=1024 * 1024 * 1024,
        ge=1,
        description="Most bytes of files the workspaces of one key's live sessions hold together.",
    )
    workspace_affinity_s: float = Field(
        default=0.25,
        ge=0,
        description="How long a session's turn waits for the worker holding its workspace before "
        "any worker takes it.",
    )
    workspace_cache_sessions: int = Field(
        default=64, ge=0, description="Session workspaces a worker keeps on disk between turns."
    )

    @field_validator("workspace_store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        # A bucket is needed: `s3://` alone passed, and every upload was a 503 to retry (a probe).
        if value is not None and not re.fullmatch(r"file:///.*|s3://[^/]+(/.*)?", value):
            raise ValueError("use file:///path or s3://bucket/prefix")
        return value

    # --- Claude Code behind the API: models, content, tool policy, skills (docs/claude-backend.md)
    model_aliases: dict[str, str] = Field(
        default={"sonnet": "claude-sonnet-4-5", "opus": "claude-opus-4-1", "haiku": "claude-haiku-4-5"},
        description="Short ids callers may send, each mapped to a full model id.",
    )
    model_pass_through: bool = Field(
        default=False, description="Run any model id as sent instead of answering 404 model_not_found."
    )
    image_url_allowlist: list[str] = Field(
        default=[],
        description="https:// URL prefixes (end each with '/') of images the model API may fetch; "
        "empty: inline base64 images only.",
    )

    @field_validator("image_url_allowlist")
    @classmethod
    def _image_prefixes(cls, prefixes: list[str]) -> list[str]:
        # A prefix must fix the host: without its '/', https://images.example.com also let through
        # https://images.example.com.evil.net/ (a probe: the agent's way out through the proxy).
        for prefix in prefixes:
            if not re.fullmatch(r"https://[^/@?#\s]+/\S*", prefix) or not prefix.endswith("/"):
                raise ValueError(f"{prefix!r}: an https:// URL prefix with its host, ending with '/'")
        return prefixes

    claude_system_prompt_mode: Literal["append", "replace"] = Field(
        default="append", description="Callers' system messages follow Claude Code's prompt, or replace it."
    )
    claude_permission_modes: list[PermissionMode] = Field(
        default=["default", "dontAsk", "acceptEdits", "plan"],
        min_length=1,
        description="Permission modes a request may choose; the first is used when it chooses none.",
    )
    claude_max_effort: Effort = Field(
        default="high", description="The highest reasoning effort a request may ask for (reasoning_effort)."
    )
    claude_max_thinking_tokens: int = Field(
        default=32000,
        ge=0,
        description="The largest thinking budget a request may ask for (Messages' thinking).",
    )
    claude_max_turns: int | None = Field(
        default=None, ge=1, description="Cap on agent turns per job, and the default; unset: no cap."
    )
    claude_disallowed_tools: list[str] = Field(
        default=[], description='Tools or rules denied to every job (e.g. ["Bash(curl:*)"]).'
    )
    claude_skills_dir: Path | None = Field(
        default=Path("~/.claude/skills"),
        description="Skills every job can use (copied into its workspace); a missing directory: none.",
    )
    claude_cwd: Path | None = Field(
        default=None,
        description="Run every job in this existing directory (shared by all jobs) instead of its own "
        "workspace directory; each job still has its own home, config and temp directories.",
    )
    claude_warm_clients: int | None = Field(
        default=None,
        ge=0,
        description="Most connected Claude Code processes each worker keeps ready; unset: one per job "
        "slot (JOBS_PER_WORKER); 0: off.",
    )
    claude_warm_memory_mib: int = Field(
        default=1024,
        ge=0,
        description="Resident memory the ready clients of one worker may hold (~200 MiB each).",
    )
    claude_warm_idle_s: float = Field(
        default=60.0,
        gt=0,
        description="After this long without a job, a worker keeps only CLAUDE_WARM_IDLE_CLIENTS.",
    )
    claude_warm_idle_clients: int = Field(
        default=1, ge=0, description="Ready clients kept while a worker is idle."
    )

    mcp_servers: dict[Annotated[str, StringConstraints(pattern=NAME_PATTERN)], McpServer] = Field(
        default={},
        description='MCP servers offered to jobs (JSON): name -> {"command", "args", "env"} (stdio, run '
        'inside the job\'s sandbox) or {"type": "http"|"sse", "url", "headers"}; "default": false '
        "offers one only to requests that choose it (docs/claude-backend.md).",
    )

    @model_validator(mode="after")
    def _workspaces_with_the_state(self) -> "Settings":
        # With the rest of what this machine keeps: two gateways with their own STATE_DIR in one
        # folder shared `.state/workspaces`, and a starting worker removes what it finds there.
        if "workspace_root" not in self.model_fields_set:
            self.workspace_root = self.state_dir / "workspaces"
        return self

    @model_validator(mode="after")
    def _durations_that_fit(self) -> "Settings":
        # Durations become Redis expiries and deadlines in ms: EVENT_TTL_S=1e16 passed, then failed
        # every request with a 500 (an outside probe).
        for name, value in self:
            if name.endswith("_s") and isinstance(value, int | float) and value > _LONGEST_S:
                raise ValueError(f"{name.upper()} ({value:g} s) is over ten years")
        return self

    @model_validator(mode="after")
    def _leases_renewed_in_time(self) -> "Settings":
        # A sweep that finds none in half a lease takes it for a Redis outage (`recover_expired`).
        if self.lease_renew_s >= self.lease_s / 2:
            raise ValueError(
                f"LEASE_RENEW_S ({self.lease_renew_s:g}) must be under half of LEASE_S ({self.lease_s:g}): "
                "workers renew leases and sweep that often"
            )
        return self

    @field_validator("mcp_servers")
    @classmethod
    def _no_reserved_server(cls, value: dict[str, McpServer]) -> dict[str, McpServer]:
        if reserved := RESERVED & set(value):
            raise ValueError(f"the MCP server name {sorted(reserved)[0]!r} is the gateway's own")
        if doubled := [name for name in value if "__" in name]:  # `__` separates server and tool
            raise ValueError(f"the MCP server name {doubled[0]!r} has '__'")
        return value

    # --- More OpenAI (`n > 1`: several choices from parallel jobs) -------------------------
    max_choices: int = Field(
        default=8, ge=1, description="Most `n` a chat request may ask for (each choice is one job)."
    )


def configured() -> Settings:
    """The settings from the environment (and `.env`); an invalid one exits the process with one
    line naming it, never a traceback, and never its value (it may be a secret)."""
    try:
        return Settings()
    except ValidationError as exc:
        sys.exit(f"invalid configuration: {'; '.join(map(_problem, exc.errors()))}")
    except SettingsError as exc:  # a list or mapping setting that is not JSON
        sys.exit(f"invalid configuration: {_not_json(exc)}")


def _problem(error: ErrorDetails) -> str:
    """One invalid setting, as `NAME: what is wrong` (a rule over several: what is wrong)."""
    message = error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(map(str, error['loc'])).upper()}: {message}" if error["loc"] else message


def _not_json(exc: SettingsError) -> str:
    """pydantic-settings' 'error parsing value for field "models" from source ...' as the variable
    and what it takes."""
    found = re.search(r'field "(\w+)"', str(exc))
    if found is None or found.group(1) not in Settings.model_fields:
        return str(exc)
    name = found.group(1)
    kind = "list" if typing.get_origin(Settings.model_fields[name].annotation) is list else "mapping"
    example = '["a", "b"]' if kind == "list" else '{"a": "b"}'
    return f"{name.upper()}: must be a JSON {kind}, such as {example}"
