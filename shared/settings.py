"""The gateway's configuration: the only place the environment is read.

Both processes build one `Settings()` at start-up and pass it down; nothing else calls
`os.environ`. Field names map to upper-case environment variables (`REDIS_URL`, `PORT`, ...).
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- Redis: queue, event streams, wake-ups ---------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis to share between processes; unset, `claude-gateway up` starts a private one.",
    )
    queue_name: str = "gateway:queue"
    state_dir: Path = Path(".state")

    # --- API ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    max_request_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    queue_timeout_s: float = Field(
        default=60.0, gt=0, description="A job not started by then fails with 503."
    )
    stream_commit_after_s: float = Field(
        default=10.0, gt=0, description="How long a stream's headers wait for the job's first event."
    )
    log_level: str = "info"

    # --- Worker ---------------------------------------------------------------------------
    workers: int = Field(default=2, ge=1, description="Worker processes started by `claude-gateway up`.")
    jobs_per_worker: int = Field(default=4, ge=1)
    backend: Literal["claude", "scripted"] = "claude"
    job_timeout_s: float = Field(default=600.0, gt=0)
    drain_timeout_s: int = Field(
        default=50,
        ge=0,
        description="On SIGTERM, how long running jobs may finish before they are cancelled.",
    )
    event_ttl_s: int = Field(default=3600, ge=1, description="How long a job's events stay readable.")
    poll_fallback_s: float = Field(
        default=0.5, gt=0, description="Queue poll interval when a wake-up notification is missed."
    )

    # --- Models ---------------------------------------------------------------------------
    models: list[str] = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"]
    models_created: int = Field(default=1759276800, description="`created` reported for every model.")

    # --- The Claude backend (passed to the CLI, never logged) -----------------------------
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    claude_max_retries: int = Field(default=2, ge=0, description="Bounded so a bad key surfaces in seconds.")
    workspace_root: Path = Path(".state/workspaces")
    claude_cli_path: Path | None = None

    # --- The scripted backend (tests and benchmarks) --------------------------------------
    scripted_text: str = "Hello from the scripted backend."
    scripted_delay_ms: float = Field(default=0.0, ge=0)

    # --- Sessions (`session_id`: conversations kept in Redis) ------------------------------
    session_ttl_s: int = Field(
        default=3600, ge=1, description="A session idle this long is removed (sliding, per request)."
    )
