"""Client API keys: from configuration (`API_KEY`, `API_KEYS`) and managed in Redis.

Only SHA-256 digests are kept: configured keys are hashed at start-up, managed keys are stored as
`gateway:apikeys` (a hash of digest → record) and the secret is shown once, at creation. A key is
known by its id (`cfg-…` or `key-…`): not secret, stable, what logs and scoping use.

Configured keys are the operator's own and may see the service-wide views; managed keys are what
an operator hands out, so they may only if created with `--operator`.
"""

import functools
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.keys import PREFIX

MANAGED_KEYS = f"{PREFIX}:apikeys"
PROTECTED = f"{PREFIX}:apikeys:protected"
"""Set with the first managed key and kept when the last is revoked: a gateway that has had a key
stays protected, in API processes started later too (`up` restarting one that died), until an
operator opens it again (`open_again`). A Redis that loses its data loses this with it."""
REVOKED = f"{PREFIX}:apikeys:revoked:"
"""And a key id: set when the key is revoked, for `REVOKED_KEPT_S`, so that the job store queues
no job for it (`JobStore.create`): a request the key authenticated before, whose body came after
the revoke, had run its agent to the end (an outside probe)."""
REVOKED_KEPT_S = 24 * 3600  # far longer than a request may take from its access check to its job
MIN_CONFIGURED_KEY_CHARS = 16  # shorter ones could be guessed, however slowly
_SECRET_PREFIX = "cgw-"  # noqa: S105 (a recognisable prefix, not a secret)


@functools.lru_cache(maxsize=256)  # asked with every request's Host on an open gateway
def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (where an open gateway may serve)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ManagedKey:
    id: str
    name: str
    created: int
    operator: bool = False
    """May see the service-wide views (`/status`, `/metrics`): every worker, job id and failure."""


class ConfiguredKeys:
    """The keys from configuration, as digests compared in constant time."""

    def __init__(self, keys: list[str]) -> None:
        if any(len(key) < MIN_CONFIGURED_KEY_CHARS for key in keys):
            raise ValueError(
                f"every API_KEY and API_KEYS key needs at least {MIN_CONFIGURED_KEY_CHARS} characters"
            )
        self._digests = [digest(key) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, presented_digest: str) -> str | None:
        """The key id of a configured key, or None; every digest is compared, no early exit."""
        found = None
        for known in self._digests:
            if hmac.compare_digest(known, presented_digest):
                found = known
        # 48 bits of a digest of a high-entropy secret: an id, useless for guessing the key.
        return None if found is None else f"cfg-{found[:12]}"


async def create(redis: Redis, name: str, *, operator: bool = False) -> tuple[ManagedKey, str]:
    """A new managed key and its secret (returned once, never stored)."""
    key = ManagedKey(id=f"key-{secrets.token_hex(6)}", name=name, created=int(time.time()), operator=operator)
    secret = _SECRET_PREFIX + secrets.token_urlsafe(32)
    record = json.dumps({"id": key.id, "name": key.name, "created": key.created, "operator": operator})
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(MANAGED_KEYS, digest(secret), record)
        pipe.set(PROTECTED, 1)
        await pipe.execute()
    return key, secret


async def listed(redis: Redis) -> list[ManagedKey]:
    records = await redis.hvals(MANAGED_KEYS)  # type: ignore[misc]
    keys = [ManagedKey(**json.loads(raw)) for raw in records]
    return sorted(keys, key=lambda key: (key.created, key.id))


# KEYS: MANAGED_KEYS, PROTECTED, the key's REVOKED mark. ARGV: the key's digest, REVOKED_KEPT_S.
# Runs while Redis is full (`maxmemory`, noeviction): a leaked key must be revocable then too (an
# outside probe could not), and the marks are a few bytes, set in the same step.
_REVOKE = """#!lua flags=allow-oom
redis.call('set', KEYS[2], 1)
redis.call('set', KEYS[3], 1, 'EX', ARGV[2])
return redis.call('hdel', KEYS[1], ARGV[1])
"""


async def revoke(redis: Redis, key_id: str) -> bool:
    """Deletes the managed key with this id; True if there was one. Takes effect on the next request,
    and on the jobs of requests it let in before (`REVOKED`); the gateway stays protected
    (`PROTECTED`, set here too for keys created before it existed)."""
    for hashed, raw in (await redis.hgetall(MANAGED_KEYS)).items():  # type: ignore[misc]
        if json.loads(raw)["id"] == key_id:
            marks = (MANAGED_KEYS, PROTECTED, REVOKED + key_id)
            deleted = await redis.eval(_REVOKE, 3, *marks, hashed.decode(), str(REVOKED_KEPT_S))  # type: ignore[misc]
            return bool(deleted)
    return False


async def any_managed(redis: Redis) -> bool:
    return bool(await redis.exists(MANAGED_KEYS))


async def protection(redis: Redis) -> tuple[bool, bool]:
    """Whether a managed key exists, and whether the gateway is protected (one exists or did)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.exists(MANAGED_KEYS)
        pipe.exists(PROTECTED)
        keys, marked = await pipe.execute()
    return bool(keys), bool(keys or marked)


# Opens a gateway again only while no managed key exists (else one could be created in between).
_OPEN_AGAIN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""


async def open_again(redis: Redis) -> bool:
    """Lets API processes started from now on serve without a key (where open mode is allowed);
    False, changing nothing, while a managed key exists."""
    return bool(await redis.eval(_OPEN_AGAIN, 2, MANAGED_KEYS, PROTECTED))  # type: ignore[misc]


def managed_key(record: bytes | None) -> ManagedKey | None:
    """The managed key a `MANAGED_KEYS` record holds (`HGET` by the presented key's digest)."""
    return None if record is None else ManagedKey(**json.loads(record))
