"""What `claude-gateway up` does to the processes it starts, and to itself.

- Children die with their parent: each asks the kernel for SIGTERM when the process that started
  it ends (`PR_SET_PDEATHSIG`), so a killed or crashed `up` leaves no Redis, API or worker behind
  (a worker then drains as on any SIGTERM, bounded by `DRAIN_TIMEOUT_S`).
- Each process holds only the credentials it needs: the API no model credentials, the workers no
  client keys (`held_by`, also for a process started on its own), and `up` itself none in its
  environment once the children's are set aside; like
  the workers, `up` and the API are non-dumpable, so a tool running as the same user can read
  neither their `/proc/<pid>/environ` nor their memory.
"""

import ctypes
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping

from shared.settings import Settings

_PR_SET_PDEATHSIG = 1

# Model credentials: only the workers (their credential proxy) use them.
_MODEL_CREDENTIALS = re.compile(r"ANTHROPIC_.*|CLAUDE_CODE_OAUTH_TOKEN|AWS_.*|GOOGLE_.*|CLOUD_ML_.*")
# Client keys: only the API checks them.
_CLIENT_KEYS = frozenset({"API_KEY", "API_KEYS"})
# Anything else that looks like a secret, and the private Redis URL (it holds the password).
_SECRET_LOOKING = re.compile(r".*(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL).*|REDIS_URL", re.IGNORECASE)


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child gets SIGTERM when this process ends."""
    parent = os.getpid()

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def api_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not _MODEL_CREDENTIALS.fullmatch(k)}


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in _CLIENT_KEYS}


def held_by(role: str, settings: Settings) -> Settings:
    """The settings `role` keeps, as `up` gives its children theirs: the API no model credentials
    (nor the settings that come with them), a worker no client keys, however the process's
    environment was given (a compose file's one `.env` gives each process every secret)."""
    if role == "api":
        dropped = [name for name in Settings.model_fields if _MODEL_CREDENTIALS.fullmatch(name.upper())]
    elif role == "worker":
        dropped = [name for name in Settings.model_fields if name.upper() in _CLIENT_KEYS]
    else:
        return settings
    return settings.model_copy(update={name: Settings.model_fields[name].default for name in dropped})


def drop_credentials() -> None:
    """Removes every credential from this process's environment (its settings are already read)."""
    for name in list(os.environ):
        if _SECRET_LOOKING.fullmatch(name) or _MODEL_CREDENTIALS.fullmatch(name) or name in _CLIENT_KEYS:
            del os.environ[name]
