"""Who is calling and whether they may: client address, API key, rate limits and job slots.

`Access` is pure ASGI middleware in front of every route but `GET /health`. It resolves the client
address (believing `X-Forwarded-For` only from `TRUSTED_PROXIES`), authenticates the key, sets
`state.key_id` (read by `Caller.of`) and counts the request against the caller's rate limit in
Redis, before the body is read. Authenticated callers are limited per key, anonymous ones (no keys
configured) and failed authentications per client address.

Redis unreachable: the request is refused with 503 (fail closed), since a managed key cannot be
checked against revocation and a request would go unmetered. Completions need Redis anyway.
"""

import ipaddress
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import ANONYMOUS, Gateway
from api.errors import NO_RETRY, OpenAIError, storage_full
from api.metrics import count_rate_limit_rejection
from shared import apikeys, quotas, tool_config
from shared.jobstore import JobSlot, NoJobSlot
from shared.keys import TOOL_CONFIG_GLOBAL
from shared.queue import cannot_persist
from shared.settings import Settings

log = logging.getLogger("gateway.api")

# Probes that cannot send a key, the static landing page, the dashboard's page (it asks `/status`
# with a key) and the API's reference (a browser following the landing page's link sends no key;
# it describes the routes, as the repository does): none shows data.
OPEN_PATHS = frozenset(
    {"/", "/health", "/ready", "/dashboard", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)
_OPERATOR_VIEWS = frozenset({"/metrics", "/status"})
"""What a configured key reaches while Redis is unreachable (found by an outside probe: a scrape
failed through the outage it should show)."""
# The requests that start a model job; resuming, polling or cancelling one is a general request.
_JOB_CREATING = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/messages"})
_JOB_LEASE_GRACE_S = 60.0
STORED_GLOBAL_TOOLS = "stored_global_tools"
"""The request state's `tool_config.StoredGlobal`, when the access check read it for the route."""
_ACCESS_UNAVAILABLE = OpenAIError(
    503,
    "The gateway cannot check access right now; retry shortly.",
    type="server_error",
    code="access_control_unavailable",
    headers={"retry-after": "2"},
)


# Until an operator creates a key (or opens the gateway): retrying only repeats it (an outside
# probe saw the SDKs retry it, each try counted against the address's failed authentications).
KEY_STORE_GONE = OpenAIError(
    503,
    "The gateway's key store is empty: its operator must create a key (claude-gateway keys create) "
    "or open the gateway again (claude-gateway keys open, then restart it).",
    type="server_error",
    code="access_control_unavailable",
    headers=NO_RETRY,
)
_FOREIGN_HOST = OpenAIError(
    403,
    "This gateway serves without keys on loopback only: address it as localhost or 127.0.0.1.",
    type="invalid_request_error",
    code="host_not_allowed",
)


class KeyStoreGone(Exception):
    """A gateway protected only by managed keys finds none in Redis."""


_SDK_LONGEST_WAIT_MS = 60_000
"""The longest `retry-after` the OpenAI and Anthropic SDKs wait for: past it they retry on their own
short backoff, twice, then raise."""


class RateLimited(OpenAIError):
    """429 with the headers OpenAI clients honour (`retry-after-ms` first, then `retry-after`); a
    wait longer than they honour (a key's stored bytes expire in up to an hour) also says not to
    retry, as their retries would come within seconds and be refused again."""

    def __init__(self, message: str, *, code: str, retry_after_ms: int, headers: Mapping[str, str]) -> None:
        super().__init__(429, message, type="requests", code=code)
        self.headers = {
            **headers,
            **(NO_RETRY if retry_after_ms > _SDK_LONGEST_WAIT_MS else {}),
            "retry-after": str(max(1, math.ceil(retry_after_ms / 1000))),
            "retry-after-ms": str(retry_after_ms),
        }


def endpoint_class(method: str, path: str) -> str:
    if method == "POST" and path in _JOB_CREATING:
        return "chat"
    if path.startswith("/v1/sessions"):
        return "session"
    return "general"


def _duration(ms: int) -> str:
    return f"{ms}ms" if ms < 1000 else f"{math.ceil(ms / 1000)}s"


def rate_headers(decision: quotas.RateDecision) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(decision.limit),
        "x-ratelimit-remaining-requests": str(decision.remaining),
        "x-ratelimit-reset-requests": _duration(decision.reset_ms),
    }


class ClientAddresses:
    """The client's address: the peer, or the nearest untrusted hop a trusted proxy reported."""

    def __init__(self, trusted: list[str]) -> None:
        self._trusted = [ipaddress.ip_network(entry, strict=False) for entry in trusted]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def resolve(self, scope: Scope) -> str:
        client = scope.get("client")
        address: str = client[0] if client else "unknown"
        if not self._trusted or not self._is_trusted(address):
            return address
        forwarded = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for").decode("latin-1")
        # Right to left: each trusted proxy appended the address it saw; the first hop not ours is
        # the client. Anything further left was written by the client and proves nothing.
        for hop in reversed([part.strip() for part in forwarded.split(",") if part.strip()]):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return address
            if not self._is_trusted(hop):
                return hop
            address = hop
        return address


class AmbiguousKey(Exception):
    """The request presents two different API keys."""


_AMBIGUOUS_KEY = OpenAIError(
    401,
    "The request presents more than one API key: send one, as 'Authorization: Bearer <key>' or "
    "'x-api-key: <key>'.",
    type="invalid_request_error",
    code="invalid_api_key",
)


_HTTP_SPACE = " \t"
_HTTP_SPACES = re.compile("[ \t]+")


def _presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The API key the request presents, if any. Two different ones are refused (`AmbiguousKey`),
    not one of them taken: a proxy in front that reads the other would disagree about who calls
    (an outside probe's job ran as the first of two `Authorization` lines)."""
    presented: set[str] = set()
    for name, value in headers:
        if name == b"authorization":
            # Any of HTTP's whitespace after the scheme (a tab let a second key past a probe), and
            # only HTTP's: `str.split` also takes NBSP and NEL, which a proxy in front would not.
            parts = _HTTP_SPACES.split(value.decode("latin-1").strip(_HTTP_SPACE), maxsplit=1)
            if len(parts) == 2 and parts[0].lower() == "bearer":
                presented.add(parts[1])
        elif name == b"x-api-key" and (key := value.decode("latin-1").strip(_HTTP_SPACE)):
            presented.add(key)
    if len(presented) > 1:
        raise AmbiguousKey
    return next(iter(presented), None)


class Access:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.keys = apikeys.ConfiguredKeys(settings.client_api_keys())
        # Open (anonymous) only while no key exists nor existed: decided by the first request, and
        # protected for good as soon as one does (configured, or managed in Redis).
        self._protected = bool(self.keys)
        # An open gateway on loopback answers only requests addressed to loopback (DNS rebinding).
        self._loopback_only = apikeys.is_loopback(settings.host)
        self.addresses = ClientAddresses(settings.trusted_proxies)
        self.limits = {
            "chat": settings.rate_limit_chat_per_minute,
            "session": settings.rate_limit_session_per_minute,
            "general": settings.rate_limit_per_minute,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        address = state["client_address"] = self.addresses.resolve(scope)
        gateway: Gateway = scope["app"].state.gateway
        try:
            refusal, headers = await self._check(gateway.redis, scope, state, address)
        except OutOfMemoryError:
            log.error("Redis refuses writes (maxmemory): rate limits cannot count requests")
            refusal, headers = storage_full(), {}
        except RedisError as exc:
            if cannot_persist(exc):  # it answers, but refuses writes: said so, not "unreachable"
                log.error("Redis refuses writes (it cannot save to its disk): rate limits cannot count")
                refusal, headers = storage_full(), {}
            else:
                log.warning("Redis unreachable during access checks: %s", type(exc).__name__)
                refusal, headers = _ACCESS_UNAVAILABLE, {}
            if scope["path"] in _OPERATOR_VIEWS and (key_id := self._configured(scope)) is not None:
                # Checked without Redis, uncounted: a scrape shows the outage instead of failing.
                state["key_id"], state["operator"] = key_id, True
                refusal = None
        except AmbiguousKey:
            refusal, headers = _AMBIGUOUS_KEY, {}
        except KeyStoreGone:
            log.error("no managed API key exists any more: refusing every request until one is created")
            refusal, headers = KEY_STORE_GONE, {}
        if refusal is not None:
            await refusal.response(scope)(scope, receive, send)
            return
        if not headers:
            await self.app(scope, receive, send)
            return
        raw = [(name.encode(), value.encode()) for name, value in headers.items()]

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *raw]
            await send(message)

        await self.app(scope, receive, send_with_limits)

    async def _check(
        self, redis: Redis, scope: Scope, state: dict[str, Any], address: str
    ) -> tuple[OpenAIError | None, dict[str, str]]:
        presented = _presented_key(scope["headers"])
        hashed = None if presented is None else apikeys.digest(presented)
        configured = None if hashed is None else self.keys.match(hashed)
        category = endpoint_class(scope["method"], scope["path"])
        if self.settings.rate_limit_enabled:
            admitted = await self._admit(redis, scope, state, address, configured, hashed, category)
            if admitted is not None:
                return admitted
        # What the decision needs from Redis, in one round trip: the address's failed
        # authentications and, unless the key is a configured one, the managed keys and whether
        # one ever existed (and what the route reads next).
        reads = _reads(category)
        async with redis.pipeline(transaction=False) as pipe:
            if self.settings.rate_limit_enabled:
                quotas.peek(pipe, self._auth_bucket(address))
            for key in reads:
                pipe.get(key)
            if configured is None:
                if hashed is not None:
                    pipe.hget(apikeys.MANAGED_KEYS, hashed)
                pipe.exists(apikeys.MANAGED_KEYS)
                pipe.exists(apikeys.PROTECTED)
            replies = await pipe.execute() if len(pipe) else []
        if self.settings.rate_limit_enabled:
            # Before the key is looked at: a throttled address gets nowhere, not even with a right guess.
            throttled = quotas.RateDecision.of(replies.pop(0))
            if not throttled.allowed:
                return _too_many_failures(throttled), {}
        _keep_reads(state, [replies.pop(0) for _ in reads])
        if configured is not None:
            identity: tuple[str, bool] | None = configured, True
        else:
            marked = bool(replies.pop())
            any_managed = bool(replies.pop())
            managed = None if hashed is None else apikeys.managed_key(replies.pop())
            identity = self._authenticate(hashed, managed, any_managed, protected=any_managed or marked)
        if identity is None:
            return await self._unauthenticated(redis, address, missing=presented is None), {}
        key_id, state["operator"] = identity
        if key_id == ANONYMOUS and self._loopback_only and not _addressed_to_loopback(scope["headers"]):
            return _FOREIGN_HOST, {}
        state["key_id"] = key_id
        if not self.settings.rate_limit_enabled:
            return None, {}
        decision = await quotas.hit(redis, self._rate_bucket(key_id, address, category))
        return _limited(decision, category)

    async def _admit(
        self,
        redis: Redis,
        scope: Scope,
        state: dict[str, Any],
        address: str,
        configured: str | None,
        hashed: str | None,
        category: str,
    ) -> tuple[OpenAIError | None, dict[str, str]] | None:
        """The whole check in one round trip: for a configured key, anyone on an open gateway while
        no managed key exists, or a managed key. None: check the long way (the key is not one, or
        no key was sent to a protected gateway)."""
        if configured is not None:
            key_id, caller = configured, quotas.KNOWN
        elif not self._protected and (not self._loopback_only or _addressed_to_loopback(scope["headers"])):
            key_id, caller = ANONYMOUS, quotas.OPEN
        elif hashed is not None:
            key_id, caller = "", hashed  # the managed key's id, read in Redis, completes its bucket
        else:
            return None
        bucket = self._rate_bucket(key_id, address, category)
        auth = self._auth_bucket(address)
        reads = _reads(category)
        managed_keys = (apikeys.MANAGED_KEYS, apikeys.PROTECTED)
        admission = await quotas.admit(redis, auth, bucket, managed_keys, caller=caller, reads=reads)
        if admission is None:
            if caller == quotas.OPEN:  # a managed key exists or existed: protected from now on
                self._now_protected(True)
            return None
        if admission.throttled:
            return _too_many_failures(admission.decision), {}
        managed = apikeys.managed_key(admission.record)
        state["key_id"], state["operator"] = (managed.id, managed.operator) if managed else (key_id, True)
        _keep_reads(state, admission.values)
        return _limited(admission.decision, category)

    def _configured(self, scope: Scope) -> str | None:
        """The id of the configured key the request presents, if it does (no Redis needed)."""
        presented = _presented_key(scope["headers"])
        return None if presented is None else self.keys.match(apikeys.digest(presented))

    def _rate_bucket(self, key_id: str, address: str, category: str) -> dict[str, int]:
        subject = f"addr:{address}" if key_id == ANONYMOUS else key_id
        return {quotas.rate_key(subject, category): self.limits[category]}

    def _authenticate(
        self, hashed: str | None, managed: apikeys.ManagedKey | None, any_managed: bool, *, protected: bool
    ) -> tuple[str, bool] | None:
        """A key that is not a configured one: (the caller's key id, whether it is an operator's),
        `ANONYMOUS` (an operator) when the gateway is open, or None (refuse). `managed`: the
        managed key with the presented key's digest, if any; `protected`: a managed key exists or
        existed (`apikeys.PROTECTED`)."""
        now_protected = self._now_protected(protected)
        if hashed is None:
            return None if now_protected else (ANONYMOUS, True)
        if managed is not None:
            return managed.id, managed.operator
        if not any_managed and now_protected and not self.keys:
            # Only managed keys protect this gateway and they are gone (revoked, flushed, evicted,
            # lost): refuse everyone rather than fall open.
            raise KeyStoreGone
        # An open gateway ignores whatever key was sent (OpenAI clients always send one).
        return None if now_protected else (ANONYMOUS, True)

    def _now_protected(self, protected: bool) -> bool:
        """Whether the gateway needs a key from now on: once it does, this process always will,
        so losing the managed keys (and their mark, with Redis's data) never opens it."""
        self._protected = self._protected or protected
        return self._protected

    def _auth_bucket(self, address: str) -> dict[str, int]:
        return {quotas.rate_key(f"addr:{address}", "auth"): self.settings.rate_limit_auth_per_minute}

    async def _unauthenticated(self, redis: Redis, address: str, *, missing: bool) -> OpenAIError:
        if self.settings.rate_limit_enabled:
            decision = await quotas.hit(redis, self._auth_bucket(address))
            if not decision.allowed:
                return _too_many_failures(decision)
        message = (
            "Missing API key: send it as 'Authorization: Bearer <key>' (OpenAI clients) or "
            "'x-api-key: <key>' (Anthropic clients)."
            if missing
            else "Incorrect API key provided."
        )
        return OpenAIError(401, message, type="invalid_request_error", code="invalid_api_key")


def _reads(category: str) -> tuple[str, ...]:
    """What a request of `category` reads from Redis next, fetched with its access check: a job
    takes the global tool defaults (`submit`)."""
    return (TOOL_CONFIG_GLOBAL,) if category == "chat" else ()


def _keep_reads(state: dict[str, Any], values: list[bytes | None]) -> None:
    """Keeps what `_reads` fetched for the route."""
    if values:
        state[STORED_GLOBAL_TOOLS] = tool_config.StoredGlobal(values[0])


def _limited(decision: quotas.RateDecision, category: str) -> tuple[OpenAIError | None, dict[str, str]]:
    """A counted request: through with its rate-limit headers, or refused over its limit."""
    headers = rate_headers(decision)
    if decision.allowed:
        return None, headers
    count_rate_limit_rejection(category)
    refusal = RateLimited(
        f"Rate limit reached: {decision.limit} {category} requests per minute; "
        f"retry in {decision.retry_after_s} s.",
        code="rate_limit_exceeded",
        retry_after_ms=decision.reset_ms,
        headers=headers,
    )
    return refusal, {}


def _too_many_failures(decision: quotas.RateDecision) -> RateLimited:
    count_rate_limit_rejection("failed_authentications")
    return RateLimited(
        "Too many failed authentications from this address; retry later.",
        code="rate_limit_exceeded",
        retry_after_ms=decision.reset_ms,
        headers=rate_headers(decision),
    )


def _addressed_to_loopback(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request's one Host names this machine's loopback, with a port or not (an
    outside probe's `[::1].evil`, `LOCALHOST` and two Host headers had been misread)."""
    hosts = [value.decode("latin-1").lower() for name, value in headers if name == b"host"]
    if len(hosts) != 1 or (host := _HOST.fullmatch(hosts[0])) is None:
        return False
    return apikeys.is_loopback(host["address"] or host["name"])


_HOST = re.compile(r"(?:\[(?P<address>[0-9a-f:.]+)\]|(?P<name>[^\[\]:]+))(?::[0-9]*)?")


def holder(request: Request) -> str:
    """Whose limits a request's jobs count against: its key's, or its address's without one."""
    key_id = getattr(request.state, "key_id", ANONYMOUS)
    return f"addr:{request.state.client_address}" if key_id == ANONYMOUS else str(key_id)


def job_slot(gateway: Gateway, request: Request) -> JobSlot | None:
    """One of the caller's `MAX_CONCURRENT_JOBS_PER_KEY` slots, for the job about to be queued
    (the create script takes it: `JobStore.create`); None when jobs are not capped.

    The slot outlives the request: the step that ends the job frees it, however it ends.
    """
    settings = gateway.settings
    if settings.max_concurrent_jobs_per_key == 0:
        return None
    # Covers the longest wait in the queue; once a worker runs the job it renews the slot.
    queued_s = max(settings.queue_timeout_s, settings.background_queue_timeout_s)
    lease_s = queued_s + settings.job_timeout_s + _JOB_LEASE_GRACE_S
    cap = settings.max_concurrent_jobs_per_key
    return JobSlot(holder=holder(request), cap=cap, lease_ms=int(lease_s * 1000))


def stored_limit(gateway: Gateway, request: Request) -> quotas.StoredLimit | None:
    """The ledger of what the caller's ended jobs keep in Redis, and its `MAX_STORED_BYTES_PER_KEY`;
    None when unlimited. Without it one key filled Redis for everyone (an outside probe: 25
    Responses requests of 4 MB each, kept for an hour, in 10 s)."""
    limit = gateway.settings.max_stored_bytes_per_key
    return quotas.StoredLimit(quotas.stored_key(holder(request)), limit) if limit else None


def stored_ledger(gateway: Gateway, request: Request) -> str | None:
    """The ledger the caller's sessions count in (`stored_limit`'s), if any."""
    stored = stored_limit(gateway, request)
    return None if stored is None else stored.ledger


def key_revoked() -> OpenAIError:
    """The request's key was revoked after its access check, before its job was queued."""
    return OpenAIError(401, "This API key was revoked.", type="invalid_request_error", code="invalid_api_key")


def storage_limited(refused: quotas.StorageLimit) -> OpenAIError:
    count_rate_limit_rejection("stored_bytes")
    megabytes = refused.limit / 1024 / 1024
    if refused.retry_after_ms is None:
        return OpenAIError(
            413,
            f"The request, with the conversation it continues, is over the {megabytes:g} MiB a key "
            "may keep stored in the gateway.",
            type="invalid_request_error",
            code="request_too_large",
        )
    return RateLimited(
        f"This key keeps {megabytes:g} MiB in the gateway (stored responses, finished jobs' output, "
        "sessions), its limit, until they expire: delete what it no longer needs or retry later.",
        code="storage_limit_exceeded",
        retry_after_ms=refused.retry_after_ms,
        headers={},
    )


def no_job_slot(refused: NoJobSlot) -> RateLimited:
    count_rate_limit_rejection("concurrent_jobs")
    return RateLimited(
        f"Too many running jobs: at most {refused.cap} at a time per key; retry when one has finished.",
        code="concurrency_limit_exceeded",
        retry_after_ms=2000,
        headers={},
    )
