"""How the workers reach the model (backend auth): which method, and whether it is usable.

Detection follows the original wrapper: `CLAUDE_AUTH_METHOD` if set; else
`CLAUDE_CODE_USE_BEDROCK` → Bedrock; else `CLAUDE_CODE_USE_VERTEX` → Vertex; else
`ANTHROPIC_API_KEY` → the Anthropic API; else the CLI's own login.

`check` is local and quick (settings present, files readable, login not expired) and never
touches the network, so workers run it on every heartbeat and before every job. A report names
settings, environment variables and file paths, never a secret's value.
"""

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from shared.settings import Settings

AuthMethod = Literal["anthropic", "bedrock", "vertex", "claude_cli"]

_MIN_API_KEY_CHARS = 10  # the original wrapper's sanity check
_AWS_FILES = {"aws_shared_credentials_file": "~/.aws/credentials", "aws_config_file": "~/.aws/config"}
_GCLOUD_ADC = "~/.config/gcloud/application_default_credentials.json"
# What the CLI reads itself when it talks to the provider: these settings reach its environment
# under their upper-case names (Bedrock and Vertex only; the other methods go through the proxy).
_PROVIDER_SETTINGS: dict[AuthMethod, tuple[str, ...]] = {
    "bedrock": (
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_profile",
        "aws_bearer_token_bedrock",
        "aws_web_identity_token_file",
        "aws_role_arn",
        "aws_container_credentials_relative_uri",
        "aws_container_credentials_full_uri",
        "anthropic_bedrock_base_url",
    ),
    "vertex": ("anthropic_vertex_project_id", "cloud_ml_region", "anthropic_vertex_base_url"),
}


class BackendAuth(BaseModel):
    """One process's view of its backend auth; safe to publish (no secret values)."""

    method: AuthMethod
    valid: bool
    errors: list[str] = Field(description="Why the method is not usable; empty when valid.")
    warnings: list[str] = Field(default=[], description="Usable, but something could not be checked.")
    config: dict[str, str | bool | None] = Field(description="Non-secret facts: region, project, source.")
    environment_variables: list[str] = Field(description="Names of the variables the CLI is given for it.")


def detect_method(settings: Settings) -> AuthMethod:
    if settings.claude_auth_method is not None:
        return settings.claude_auth_method
    if settings.claude_code_use_bedrock:
        return "bedrock"
    if settings.claude_code_use_vertex:
        return "vertex"
    if _secret(settings.anthropic_api_key):
        return "anthropic"
    return "claude_cli"


def check(settings: Settings, now: float | None = None) -> BackendAuth:
    method = detect_method(settings)
    if method == "anthropic":
        return _check_anthropic(settings)
    if method == "bedrock":
        return _check_bedrock(settings)
    if method == "vertex":
        return _check_vertex(settings)
    return _check_login(settings, time.time() if now is None else now)


def provider_environment(settings: Settings, method: AuthMethod) -> dict[str, str]:
    """What the CLI needs to talk to Bedrock or Vertex itself, secrets included (empty for the
    methods that go through the worker's proxy). The job's HOME is its own, so files the SDKs
    would look for in the worker user's home are named explicitly."""
    if method not in _PROVIDER_SETTINGS:
        return {}
    env: dict[str, str] = {}
    for name in _PROVIDER_SETTINGS[method]:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value:
            env[name.upper()] = str(value)
    if method == "bedrock":
        env["CLAUDE_CODE_USE_BEDROCK"] = "1"
        if region := _aws_region(settings):
            env["AWS_REGION"] = region  # the CLI reads AWS_REGION only, never ~/.aws/config
        env.update({name.upper(): str(path) for name, path in _aws_files(settings).items()})
        if settings.claude_code_skip_bedrock_auth:
            env["CLAUDE_CODE_SKIP_BEDROCK_AUTH"] = "1"
    else:
        env["CLAUDE_CODE_USE_VERTEX"] = "1"
        if (credentials := _google_credentials(settings)) is not None:
            env["GOOGLE_APPLICATION_CREDENTIALS"] = str(credentials)
        if settings.claude_code_skip_vertex_auth:
            env["CLAUDE_CODE_SKIP_VERTEX_AUTH"] = "1"
    return env


@dataclass(frozen=True)
class Login:
    """The CLI's stored login (`.credentials.json`): only what the gateway uses of it."""

    access_token: str
    expires_at: float | None
    """Unix seconds."""
    subscription: str | None


class LoginError(Exception):
    """The stored login is missing or unusable; the message names the file, never its content."""


def login_file(settings: Settings) -> Path:
    return (settings.claude_config_dir or Path("~/.claude")).expanduser() / ".credentials.json"


def read_login(path: Path) -> Login:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoginError(f"no login at {path}") from None
    except OSError as exc:
        raise LoginError(f"the login at {path} is not readable ({type(exc).__name__})") from None
    except ValueError:
        raise LoginError(f"the login at {path} is not valid JSON") from None
    oauth = stored.get("claudeAiOauth") if isinstance(stored, dict) else None
    token = oauth.get("accessToken") if isinstance(oauth, dict) else None
    if not isinstance(oauth, dict) or not isinstance(token, str) or not token:
        raise LoginError(f"the login at {path} holds no claudeAiOauth.accessToken")
    expires_ms = oauth.get("expiresAt")
    subscription = oauth.get("subscriptionType")
    return Login(
        access_token=token,
        expires_at=expires_ms / 1000 if isinstance(expires_ms, int | float) else None,
        subscription=subscription if isinstance(subscription, str) else None,
    )


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


def _report(
    method: AuthMethod,
    errors: list[str],
    config: dict[str, str | bool | None],
    variables: list[str],
    warnings: list[str] | None = None,
) -> BackendAuth:
    return BackendAuth(
        method=method,
        valid=not errors,
        errors=errors,
        warnings=warnings or [],
        config=config,
        environment_variables=sorted(variables),
    )


def _check_anthropic(settings: Settings) -> BackendAuth:
    key = _secret(settings.anthropic_api_key)
    errors = []
    if not key:
        errors.append("ANTHROPIC_API_KEY is not set")
    elif len(key) < _MIN_API_KEY_CHARS:
        errors.append("ANTHROPIC_API_KEY appears to be invalid (too short)")
    config: dict[str, str | bool | None] = {
        "api_key_present": bool(key),
        "credential": "a per-job token, exchanged for the key by the worker's proxy",
    }
    return _report("anthropic", errors, config, ["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"])


def _aws_region(settings: Settings) -> str | None:
    return settings.aws_region or settings.aws_default_region


def _aws_files(settings: Settings) -> dict[str, Path]:
    """The AWS shared files to name for the CLI: configured ones, else the worker user's."""
    files = {}
    for name, default in _AWS_FILES.items():
        configured: Path | None = getattr(settings, name)
        path = (configured or Path(default)).expanduser()
        if configured is not None or path.is_file():
            files[name] = path
    return files


def _bedrock_credentials(settings: Settings, errors: list[str]) -> str | None:
    """Which credentials the CLI will use, recording what is wrong with them."""
    has_id = bool(_secret(settings.aws_access_key_id))
    has_secret = bool(_secret(settings.aws_secret_access_key))
    if has_id != has_secret:
        pair = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        present, missing = pair if has_id else reversed(pair)
        errors.append(f"{present} is set without {missing}")
    if has_id and has_secret:
        return "access keys"
    if _secret(settings.aws_bearer_token_bedrock):
        return "Bedrock API key (AWS_BEARER_TOKEN_BEDROCK)"
    if settings.aws_profile:
        files = _aws_files(settings)
        if not any(_readable(path) for path in files.values()):
            errors.append("AWS_PROFILE is set but no AWS credentials or config file is readable")
        return f"profile {settings.aws_profile}"
    if settings.aws_web_identity_token_file is not None:
        if not settings.aws_role_arn:
            errors.append("AWS_WEB_IDENTITY_TOKEN_FILE is set without AWS_ROLE_ARN")
        if not _readable(token_file := settings.aws_web_identity_token_file):
            errors.append(f"AWS_WEB_IDENTITY_TOKEN_FILE ({token_file}) is not readable")
        return "web identity"
    if settings.aws_container_credentials_relative_uri or settings.aws_container_credentials_full_uri:
        return "container credentials"
    return None


def _check_bedrock(settings: Settings) -> BackendAuth:
    errors: list[str] = []
    warnings: list[str] = []
    region = _aws_region(settings)
    if not region:
        errors.append("AWS_REGION or AWS_DEFAULT_REGION is not set")
    credentials = _bedrock_credentials(settings, errors)
    if settings.claude_code_skip_bedrock_auth:
        credentials = "none: CLAUDE_CODE_SKIP_BEDROCK_AUTH (a gateway in front of Bedrock signs)"
    elif credentials is None:
        credentials = "the AWS default chain"
        warnings.append(
            "no AWS credentials are configured: the CLI falls back to the instance's role, "
            "which is not checked here"
        )
    config: dict[str, str | bool | None] = {
        "aws_access_key_present": bool(_secret(settings.aws_access_key_id)),
        "aws_secret_key_present": bool(_secret(settings.aws_secret_access_key)),
        "aws_region": region,
        "aws_profile": settings.aws_profile,
        "credentials": credentials,
    }
    variables = list(provider_environment(settings, "bedrock"))
    return _report("bedrock", errors, config, variables, warnings)


def _google_credentials(settings: Settings) -> Path | None:
    """The credentials file to name for the CLI: configured, else the worker user's gcloud ADC."""
    if settings.google_application_credentials is not None:
        return settings.google_application_credentials.expanduser()
    adc = Path(_GCLOUD_ADC).expanduser()
    return adc if adc.is_file() else None


def _check_vertex(settings: Settings) -> BackendAuth:
    errors: list[str] = []
    warnings: list[str] = []
    if not settings.anthropic_vertex_project_id:
        errors.append("ANTHROPIC_VERTEX_PROJECT_ID is not set")
    if not settings.cloud_ml_region:
        errors.append("CLOUD_ML_REGION is not set")
    credentials_file = _google_credentials(settings)
    if settings.claude_code_skip_vertex_auth:
        credentials = "none: CLAUDE_CODE_SKIP_VERTEX_AUTH (a gateway in front of Vertex signs)"
    elif credentials_file is not None:
        credentials = str(credentials_file)
        if not _readable(credentials_file):
            errors.append(f"GOOGLE_APPLICATION_CREDENTIALS ({credentials_file}) is not readable")
    else:
        credentials = "the Google default chain"
        warnings.append(
            "no Google credentials file is configured: the CLI falls back to the metadata server, "
            "which is not checked here"
        )
    config: dict[str, str | bool | None] = {
        "project_id": settings.anthropic_vertex_project_id,
        "region": settings.cloud_ml_region,
        "credentials": credentials,
    }
    variables = list(provider_environment(settings, "vertex"))
    return _report("vertex", errors, config, variables, warnings)


def _check_login(settings: Settings, now: float) -> BackendAuth:
    # The CLI gets a per-job token as CLAUDE_CODE_OAUTH_TOKEN; the proxy swaps in the real one.
    variables = ["ANTHROPIC_BASE_URL", "CLAUDE_CODE_OAUTH_TOKEN"]
    if _secret(settings.claude_code_oauth_token):
        config: dict[str, str | bool | None] = {"source": "CLAUDE_CODE_OAUTH_TOKEN"}
        return _report("claude_cli", [], config, variables)
    path = login_file(settings)
    config = {"source": "login file", "login_file": str(path)}
    try:
        login = read_login(path)
    except LoginError as exc:
        # With no credential at all this is the method detected: the README's ANTHROPIC_API_KEY
        # is named first (a new user's probe was told only of the CLI's login).
        hint = (
            "set ANTHROPIC_API_KEY, or CLAUDE_CODE_OAUTH_TOKEN (claude setup-token), or log in as the "
            "worker's user (claude)"
        )
        return _report("claude_cli", [f"not logged in: {exc}; {hint}"], config, variables)
    errors = []
    if login.expires_at is not None:
        expires = datetime.fromtimestamp(login.expires_at, UTC).isoformat(timespec="seconds")
        config["expires_at"] = expires
        if login.expires_at <= now:
            errors.append(
                f"the login at {path} expired at {expires}: run claude as the worker's user to renew it, "
                "or set CLAUDE_CODE_OAUTH_TOKEN"
            )
    config["subscription_type"] = login.subscription
    return _report("claude_cli", errors, config, variables)


def _readable(path: Path) -> bool:
    try:
        with path.expanduser().open("rb"):
            return True
    except OSError:
        return False
