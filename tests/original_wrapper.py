"""Runs the original wrapper's live-server tests against this gateway (docs/openai-compatibility.md).

    .venv/bin/python -m tests.original_wrapper /path/to/claude-code-openai-wrapper [pytest args]

The path is a checkout of the original wrapper (github.com/RichardAtCT/claude-code-openai-wrapper,
commit f6994d0). Its `tests/` folder is copied to a temporary folder outside this project, with
only the server address changed; the gateway runs on the real SDK and CLI against the suite's fake
upstream, which answers with the conversation it received (so "what's my name?" finds the name
in the earlier turns). The served model list adds the older ids those tests name.

Those tests often report a failure by printing a cross or returning False instead of failing an
assertion; a plugin counts both as failures, so the count is strict. Their five unit tests of the
original's own classes (`TestAnthropicMessagesModels`) need its code and are left out: 32 remain.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cli.embedded_redis import EmbeddedRedis
from tests.conftest import Gateway, claude_env
from tests.fake_anthropic import FakeAnthropic, Reply

ORIGINAL_ADDRESS = "http://localhost:8000"
LIVE_TESTS = [
    "test_anthropic_messages.py",
    "test_basic.py",
    "test_endpoints.py",
    "test_non_streaming.py",
    "test_parameter_mapping.py",
    "test_session_complete.py",
    "test_session_continuity.py",
    "test_session_simple.py",
    "test_textblock_fix.py",
]
MODELS = (
    '["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5", "claude-3-5-sonnet-20241022", '
    '"claude-3-5-haiku-20241022", "claude-3-7-sonnet-20250219"]'
)
STRICT = """
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    if pyfuncitem.obj(**args) is False:
        pytest.fail("the test returned False")
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call" and report.passed and any(m in report.capstdout for m in ("\\u274c", "\\u2717")):
        report.outcome = "failed"
        report.longrepr = "the test printed a failure mark:\\n" + report.capstdout
"""


def main(original: Path, pytest_args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="original-wrapper-") as folder:
        root = Path(folder)
        redis = EmbeddedRedis(root / "redis", persistent=False)
        redis.start()
        fake = FakeAnthropic()
        fake.default = Reply(echo=True)
        fake.start()
        gateway = Gateway(
            redis_url=f"redis://127.0.0.1:{redis.port}/0",
            env={
                **claude_env(fake, MODELS=MODELS),
                "LOG_LEVEL": "warning",
                "WORKSPACE_ROOT": str(root / "workspaces"),
                "CLAUDE_SKILLS_DIR": str(root / "skills"),
            },
            logs=root,
        )
        try:
            gateway.start_worker()
            gateway.start_api()
            shutil.copytree(original / "tests", root / "tests")
            for test in (root / "tests").glob("*.py"):
                test.write_text(test.read_text().replace(ORIGINAL_ADDRESS, gateway.url))
            (root / "conftest.py").write_text(STRICT)
            # A regular package: else `tests.conftest` would be this project's (installed) tests.
            (root / "tests" / "__init__.py").touch()
            command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
            command += ["-k", "not TestAnthropicMessagesModels", *[f"tests/{t}" for t in LIVE_TESTS]]
            return subprocess.run([*command, *pytest_args], cwd=root, check=False).returncode
        finally:
            gateway.stop()
            fake.stop()
            redis.stop()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve(), sys.argv[2:]))
