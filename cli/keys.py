"""`claude-gateway keys create|list|revoke|open`, and the start-up check that the API is protected.

A started API with no key anywhere (neither `API_KEY`/`API_KEYS` nor a managed key in Redis, nor
one there before: `apikeys.PROTECTED`) serves every caller anonymously. That is allowed on a
loopback address; on any other address it needs `ALLOW_UNAUTHENTICATED=true`. Started from a
terminal, `up` and `api` first offer to generate a key; without a terminal they never wait for an
answer. Once a managed key has existed, only `keys open` makes the gateway open again.
"""

import argparse
import asyncio
import logging
import sys
from datetime import UTC, datetime

from redis.exceptions import RedisError

from cli import add_commands
from cli.reach import cli_redis, redis_problem
from shared import apikeys
from shared.jobs import Failed, FailureCode
from shared.jobstore import JobStore
from shared.settings import Settings

log = logging.getLogger("gateway.cli")
_REVOKED = Failed(code=FailureCode.CANCELLED, message="The API key that started this job was revoked.")


async def _protection(redis_url: str) -> tuple[bool, bool]:
    async with cli_redis(redis_url) as redis:
        return await apikeys.protection(redis)


async def _generate(redis_url: str) -> tuple[apikeys.ManagedKey, str]:
    async with cli_redis(redis_url) as redis:
        # Whoever starts the gateway on its terminal runs it: the key also reads /status and
        # /dashboard (an outside probe found the dashboard refusing the only key there was).
        return await apikeys.create(redis, "generated at start-up", operator=True)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def configured_keys(settings: Settings) -> apikeys.ConfiguredKeys:
    """`API_KEY` and `API_KEYS`; exits if one is too short."""
    try:
        return apikeys.ConfiguredKeys(settings.client_api_keys())
    except ValueError as exc:
        sys.exit(f"claude-gateway: {exc}")


def ensure_protected(settings: Settings, redis_url: str) -> None:
    """Offers a key on a terminal; exits if a non-loopback API would be open without the opt-out,
    or if a configured key is too short."""
    if configured_keys(settings):
        return
    any_managed, protected = asyncio.run(_protection(redis_url))
    if any_managed:
        return
    if protected:
        log.warning(
            "every managed API key was revoked: every request is refused until one is created "
            "(`claude-gateway keys create`), or the gateway is opened again (`claude-gateway keys open`)"
        )
        return
    if _interactive():
        try:
            answer = input("No API key is configured. Generate one to protect the gateway? [Y/n] ")
        except EOFError:  # the terminal's input ended: no answer
            answer = "n"
        except KeyboardInterrupt:
            sys.exit(130)
        if answer.strip().lower() in ("", "y", "yes"):
            key, secret = asyncio.run(_generate(redis_url))
            # Printed to the terminal once, never logged; revoke with `claude-gateway keys revoke`.
            print(
                f"\nOperator API key {key.id} (shown once, keep it safe; it also reads /status and "
                f"/dashboard; give others keys of their own: claude-gateway keys create):\n\n    {secret}\n",
                flush=True,
            )
            return
    if not apikeys.is_loopback(settings.host) and not settings.allow_unauthenticated:
        sys.exit(
            f"claude-gateway: refusing to serve HOST={settings.host} without an API key. Set API_KEY or "
            "API_KEYS, create one with `claude-gateway keys create` (up's private Redis: while up runs "
            "on a loopback HOST, or let up generate one on a terminal), or set ALLOW_UNAUTHENTICATED=true."
        )
    log.warning("no API key configured: every caller is served anonymously")


async def _run(args: argparse.Namespace, redis_url: str, settings: Settings) -> int:
    async with cli_redis(redis_url) as redis:
        if args.action == "create":
            key, secret = await apikeys.create(redis, args.name, operator=args.operator)
            print(f"{key.id}\t{secret}")
            print("The secret is shown once; only its hash is stored.", file=sys.stderr)
        elif args.action == "open":
            if not await apikeys.open_again(redis):
                print("managed keys exist: revoke them first (`claude-gateway keys list`)", file=sys.stderr)
                return 1
            print(
                "API processes started from now on serve without a key (on a loopback HOST, or with "
                "ALLOW_UNAUTHENTICATED=true); restart the running ones.",
                file=sys.stderr,
            )
        elif args.action == "list":
            for key in await apikeys.listed(redis):
                created = datetime.fromtimestamp(key.created, UTC).isoformat(timespec="seconds")
                role = "operator" if key.operator else "caller"
                print(f"{key.id}\t{created}\t{role}\t{key.name}")
        elif not await apikeys.revoke(redis, args.key_id):
            print(f"no managed key with id {args.key_id}", file=sys.stderr)
            return 1
        else:
            # Its jobs stop too: they run on the operator's model API credential.
            store = JobStore(redis, queue_name=settings.queue_name, ttl_s=settings.event_ttl_s)
            stopped = await store.stop_owned(args.key_id, _REVOKED)
            print(f"revoked {args.key_id}; cancelled its {stopped} unfinished job(s)", file=sys.stderr)
    return 0


def add_parser(roles: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    add_commands(roles, {"keys": "manage client API keys stored (as hashes) in REDIS_URL"})
    actions = roles.choices["keys"].add_subparsers(dest="action", required=True)
    add_commands(
        actions,
        {
            "create": "create a key and print its id and secret (once)",
            "list": "list managed keys: id, creation time, role (operator or caller), name",
            "revoke": "revoke a key by id; refused from its next request on",
            "open": "with no managed key left, let API processes started from now on serve without a key",
        },
    )
    create = actions.choices["create"]
    create.add_argument("--name", default="", help="a label to recognise the key by")
    create.add_argument(
        "--operator", action="store_true", help="may see /status and /metrics (every caller's jobs)"
    )
    actions.choices["revoke"].add_argument("key_id")


def run_keys(redis_url: str, args: argparse.Namespace, settings: Settings) -> None:
    try:
        sys.exit(asyncio.run(_run(args, redis_url, settings)))
    except (OSError, RedisError, ValueError) as exc:  # unreachable, refused, or no Redis URL
        sys.exit(redis_problem("keys", exc))
