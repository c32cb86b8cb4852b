"""Backend auth detection and checks (shared/backend_auth.py), on settings read from a controlled
environment: the original wrapper's order, explicit overrides, and invalid configurations."""

import json
import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.redaction import Redactor, secret_name
from shared import backend_auth
from shared.backend_auth import BackendAuth
from shared.settings import Settings
from worker.login import StoredLogin, login_token

SECRET = "sk-ant-api03-secret-value-0123456789"
AWS_SECRET = "aws-secret-access-key-value-0123456789"
LOGIN_TOKEN = "sk-ant-oat01-stored-login-token"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No auth setting of this machine leaks in; HOME is empty (no ~/.aws, no gcloud, no login)."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "ANTHROPIC_", "CLAUDE_", "CLOUD_ML_", "GOOGLE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no .env file


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def published(report: BackendAuth) -> str:
    return report.model_dump_json()


def test_detection_follows_the_original_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_auth.detect_method(settings(monkeypatch)) == "claude_cli"
    assert backend_auth.detect_method(settings(monkeypatch, ANTHROPIC_API_KEY=SECRET)) == "anthropic"
    assert backend_auth.detect_method(settings(monkeypatch, CLAUDE_CODE_USE_VERTEX="1")) == "vertex"
    assert backend_auth.detect_method(settings(monkeypatch, CLAUDE_CODE_USE_BEDROCK="1")) == "bedrock"
    # Bedrock before Vertex before the key; "0" is off, as in the CLI.
    monkeypatch.setenv("CLAUDE_CODE_USE_BEDROCK", "0")
    assert backend_auth.detect_method(Settings()) == "vertex"


@pytest.mark.parametrize(
    ("value", "method"),
    [("cli", "claude_cli"), ("CLI", "claude_cli"), ("claude_cli", "claude_cli"), ("api_key", "anthropic"),
     ("anthropic", "anthropic"), ("Bedrock", "bedrock"), ("vertex", "vertex")],
)  # fmt: skip
def test_an_explicit_method_overrides_detection(
    monkeypatch: pytest.MonkeyPatch, value: str, method: str
) -> None:
    chosen = settings(
        monkeypatch, CLAUDE_AUTH_METHOD=value, ANTHROPIC_API_KEY=SECRET, CLAUDE_CODE_USE_BEDROCK="1"
    )
    assert backend_auth.detect_method(chosen) == method


def test_an_unknown_method_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="unknown method 'gcp': use cli, api_key, bedrock or vertex"):
        settings(monkeypatch, CLAUDE_AUTH_METHOD="gcp")


def test_claude_code_max_retries_is_read_too(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(monkeypatch, CLAUDE_CODE_MAX_RETRIES="0").claude_max_retries == 0
    assert settings(monkeypatch, CLAUDE_MAX_RETRIES="1").claude_max_retries == 1


def test_an_api_key_is_checked_and_never_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    report = backend_auth.check(settings(monkeypatch, ANTHROPIC_API_KEY=SECRET))
    assert (report.method, report.valid, report.errors) == ("anthropic", True, [])
    assert report.config["api_key_present"] is True
    assert SECRET not in published(report)
    short = backend_auth.check(settings(monkeypatch, ANTHROPIC_API_KEY="sk-short"))
    assert short.errors == ["ANTHROPIC_API_KEY appears to be invalid (too short)"]
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    missing = backend_auth.check(settings(monkeypatch, CLAUDE_AUTH_METHOD="api_key"))
    assert (missing.valid, missing.errors) == (False, ["ANTHROPIC_API_KEY is not set"])
    assert backend_auth.provider_environment(Settings(), "anthropic") == {}  # the proxy holds the key


def test_bedrock_needs_a_region_and_whole_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    bad_settings = settings(monkeypatch, CLAUDE_CODE_USE_BEDROCK="1", AWS_ACCESS_KEY_ID="AKIAEXAMPLE")
    bad = backend_auth.check(bad_settings)
    assert not bad.valid
    assert bad.errors == [
        "AWS_REGION or AWS_DEFAULT_REGION is not set",
        "AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY",
    ]
    good_settings = settings(monkeypatch, AWS_SECRET_ACCESS_KEY=AWS_SECRET, AWS_DEFAULT_REGION="eu-west-1")
    good = backend_auth.check(good_settings)
    assert (good.valid, good.errors, good.warnings) == (True, [], [])
    assert good.config["aws_region"] == "eu-west-1"
    assert good.config["credentials"] == "access keys"
    assert good.environment_variables == [
        "AWS_ACCESS_KEY_ID", "AWS_REGION", "AWS_SECRET_ACCESS_KEY", "CLAUDE_CODE_USE_BEDROCK"
    ]  # fmt: skip
    assert AWS_SECRET not in published(good)
    # The CLI signs for itself: it gets the values, and the region under the one name it reads.
    env = backend_auth.provider_environment(good_settings, "bedrock")
    assert env == {
        "CLAUDE_CODE_USE_BEDROCK": "1",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    }


def test_bedrock_without_credentials_warns_and_a_profile_needs_its_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    chain = backend_auth.check(settings(monkeypatch, CLAUDE_AUTH_METHOD="bedrock", AWS_REGION="us-east-1"))
    assert chain.valid
    assert chain.warnings
    assert "instance's role" in chain.warnings[0]
    profile = backend_auth.check(settings(monkeypatch, AWS_PROFILE="work"))
    assert profile.errors == ["AWS_PROFILE is set but no AWS credentials or config file is readable"]
    # The worker user's ~/.aws files are named for the CLI, whose HOME is the job's own.
    aws = tmp_path / "home" / ".aws"
    aws.mkdir(parents=True)
    (aws / "credentials").write_text("[work]\n")
    with_files = Settings()
    assert backend_auth.check(with_files).valid
    env = backend_auth.provider_environment(with_files, "bedrock")
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(aws / "credentials")
    assert env["AWS_PROFILE"] == "work"
    assert "AWS_CONFIG_FILE" not in env


def test_vertex_needs_project_region_and_a_readable_credentials_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = backend_auth.check(
        settings(
            monkeypatch, CLAUDE_CODE_USE_VERTEX="1", GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "no.json")
        )
    )
    assert missing.errors == [
        "ANTHROPIC_VERTEX_PROJECT_ID is not set",
        "CLOUD_ML_REGION is not set",
        f"GOOGLE_APPLICATION_CREDENTIALS ({tmp_path / 'no.json'}) is not readable",
    ]
    (tmp_path / "no.json").write_text("{}")
    good_settings = settings(monkeypatch, ANTHROPIC_VERTEX_PROJECT_ID="proj", CLOUD_ML_REGION="us-east5")
    good = backend_auth.check(good_settings)
    assert (good.valid, good.config["project_id"], good.config["region"]) == (True, "proj", "us-east5")
    assert backend_auth.provider_environment(good_settings, "vertex") == {
        "CLAUDE_CODE_USE_VERTEX": "1",
        "ANTHROPIC_VERTEX_PROJECT_ID": "proj",
        "CLOUD_ML_REGION": "us-east5",
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "no.json"),
    }


def test_vertex_finds_the_worker_users_gcloud_login_else_warns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = {"CLAUDE_AUTH_METHOD": "vertex", "ANTHROPIC_VERTEX_PROJECT_ID": "p", "CLOUD_ML_REGION": "r"}
    chain = backend_auth.check(settings(monkeypatch, **base))
    assert chain.valid
    assert "metadata server" in chain.warnings[0]
    adc = tmp_path / "home" / ".config" / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text("{}")
    found = Settings()
    assert backend_auth.check(found).warnings == []
    assert backend_auth.provider_environment(found, "vertex")["GOOGLE_APPLICATION_CREDENTIALS"] == str(adc)
    skipped = settings(monkeypatch, CLAUDE_CODE_SKIP_VERTEX_AUTH="1")
    assert backend_auth.provider_environment(skipped, "vertex")["CLAUDE_CODE_SKIP_VERTEX_AUTH"] == "1"


def write_login(config_dir: Path, *, expires_in_s: float, token: str = LOGIN_TOKEN) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    login = {
        "claudeAiOauth": {
            "accessToken": token,
            "refreshToken": "sk-ant-ort01-refresh-token",
            "expiresAt": int((time.time() + expires_in_s) * 1000),
            "subscriptionType": "max",
        }
    }
    path = config_dir / ".credentials.json"
    path.write_text(json.dumps(login))
    return path


def test_the_cli_login_must_exist_and_be_current(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    absent = backend_auth.check(settings(monkeypatch))
    assert (absent.method, absent.valid) == ("claude_cli", False)
    login = tmp_path / "home" / ".claude" / ".credentials.json"
    assert absent.errors == [
        f"not logged in: no login at {login}; set ANTHROPIC_API_KEY, or CLAUDE_CODE_OAUTH_TOKEN "
        "(claude setup-token), or log in as the worker's user (claude)"
    ]
    write_login(tmp_path / "config", expires_in_s=3600)
    current = backend_auth.check(settings(monkeypatch, CLAUDE_CONFIG_DIR=str(tmp_path / "config")))
    assert (current.valid, current.config["subscription_type"]) == (True, "max")
    assert LOGIN_TOKEN not in published(current)
    assert "refresh" not in published(current)
    write_login(tmp_path / "config", expires_in_s=-60)
    expired = backend_auth.check(Settings())
    assert not expired.valid
    assert "expired at" in expired.errors[0]
    (tmp_path / "config" / ".credentials.json").write_text("{not json")
    assert "is not valid JSON" in backend_auth.check(Settings()).errors[0]
    token = backend_auth.check(settings(monkeypatch, CLAUDE_CODE_OAUTH_TOKEN="sk-ant-oat01-setup-token"))
    assert (token.valid, token.config) == (True, {"source": "CLAUDE_CODE_OAUTH_TOKEN"})
    assert login_token(Settings())() == "sk-ant-oat01-setup-token"


def test_a_renewed_login_is_picked_up_from_the_next_request(tmp_path: Path) -> None:
    path = write_login(tmp_path, expires_in_s=60, token="sk-ant-oat01-first")
    stored = StoredLogin(path)
    assert stored.token() == "sk-ant-oat01-first"
    os.utime(path, (1, 1))  # a different mtime even on a coarse clock
    write_login(tmp_path, expires_in_s=3600, token="sk-ant-oat01-renewed")
    assert stored.token() == "sk-ant-oat01-renewed"
    path.unlink()
    with pytest.raises(backend_auth.LoginError, match="no login at"):
        stored.token()


def test_secret_looking_names_and_values_are_redacted() -> None:
    secret = ["authorization", "x-api-key", "Cookie", "access_token", "client_secret"]
    assert all(secret_name(name) for name in secret)
    assert not any(secret_name(n) for n in ["max_tokens", "model", "content-type", "session_id", "monkey"])
    redactor = Redactor(["gateway-key-123"])
    text = "Bearer abc.def sk-ant-api03-xyzxyzxyz AKIAABCDEFGHIJKLMNOP gateway-key-123 hello"
    assert redactor.text(text) == "[redacted] [redacted] [redacted] [redacted] hello"
    assert redactor.json_text('{"api_key": "plain", "max_tokens": 5, "n": "x"}') == (
        '{"api_key": "[redacted]", "max_tokens": 5, "n": "x"}'
    )
