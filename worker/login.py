"""The CLI's own login as the worker's proxy uses it: the token is never copied into a job.

The login (`claude setup-token`'s `CLAUDE_CODE_OAUTH_TOKEN`, or the `.credentials.json` that
`claude` keeps for the worker's user) stays in the worker; each job's CLI gets a per-job token as
its `CLAUDE_CODE_OAUTH_TOKEN` and the proxy sends the real one. The stored login is re-read when
its file changes, so a login renewed on the host (by running `claude`) is used from the next
request on. The worker never renews it itself: that would rotate the refresh token under the
user's own sessions.
"""

from collections.abc import Callable
from pathlib import Path

from shared.backend_auth import login_file, read_login
from shared.settings import Settings


class StoredLogin:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    def token(self) -> str:
        """Raises `LoginError` when the file is gone or unusable."""
        try:
            stat = self._path.stat()
        except OSError:
            return read_login(self._path).access_token  # raises with the reason
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            self._token, self._seen = read_login(self._path).access_token, seen
        return self._token


def login_token(settings: Settings) -> Callable[[], str]:
    secret = settings.claude_code_oauth_token
    if secret is not None and (token := secret.get_secret_value()):
        return lambda: token
    return StoredLogin(login_file(settings)).token
