"""Attaching a request to its session: which session, its history, and the session's lock.

The rule for history (docs/sessions.md): the session holds every earlier turn. A request whose
messages begin with that whole history (a client that resends everything) has the repeated prefix
dropped; otherwise all its messages are new turns that follow the history. A request that repeats
the session's first turn but then departs from the stored history is refused (400): appending it
would duplicate the conversation, and rewriting history is not what a session does.
"""

import contextlib
from collections.abc import Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import OpenAIError
from shared import sessions
from shared.jobs import CompletionJob, SessionRef, Turn
from shared.keys import is_session_id
from shared.settings import Settings

SESSION_HEADER = "x-session-id"
# A lost lock holder (a killed worker) blocks its session at most this much beyond the job's limits.
_LOCK_GRACE_S = 60.0


def requested_session_id(named: str | None, headers: Mapping[str, str]) -> str | None:
    """The session the request names in its body (`named`) or `X-Session-Id` header, validated."""
    header = headers.get(SESSION_HEADER)
    if named is not None and header is not None and header != named:
        raise OpenAIError.invalid(
            "The session_id field and the X-Session-Id header name different sessions.",
            param="session_id",
            code="invalid_session_id",
        )
    session_id = named if named is not None else header
    if session_id is not None and not is_session_id(session_id):
        raise invalid_session_id()
    return session_id


def invalid_session_id() -> OpenAIError:
    return OpenAIError.invalid(
        "A session id is 1-128 characters: letters, digits, '.', '_' or '-', starting with a "
        "letter or digit.",
        param="session_id",
        code="invalid_session_id",
    )


def session_not_found(session_id: str) -> OpenAIError:
    """404 for a session that does not exist or is another key's (never which)."""
    return OpenAIError.not_found(
        f"No session '{session_id}' found.", param="session_id", code="session_not_found"
    )


def new_turns(history_len: int, head: list[Turn], turns: list[Turn]) -> list[Turn]:
    """The request's turns that are new to a session of `history_len` turns (see the module doc).

    `head` is the session's first `min(history_len, len(turns))` turns: all the rule compares.
    """
    if not history_len:
        return turns
    if len(turns) > history_len and turns[:history_len] == head:
        return turns[history_len:]
    if len(turns) > 1 and turns[0] == head[0]:
        raise OpenAIError.invalid(
            "The messages repeat this session's history but differ from it; send only the new "
            "messages, or the history exactly as the session holds it, or start a new session.",
            param="messages",
            code="session_history_mismatch",
        )
    return turns


async def attach(
    redis: Redis,
    settings: Settings,
    key_id: str,
    session_id: str,
    job: CompletionJob,
    ledger: str | None,
    *,
    background: bool,
) -> CompletionJob:
    """Takes the session for `job` and returns the job with the turns new to the session, whose
    count in its key's `ledger` lives as long as the session now does.

    Held as long as the job may wait and run, each of its attempts (a worker lost, it is queued and
    run again): a background turn's lock, held for a plain one's queue timeout, ran out while it
    waited, and a turn's third attempt outlived it (outside probes: a second turn was let in, and
    the first one's reply thrown away). The job's end frees it sooner. Raises 409 if another
    request is using the session. On any error the lock is released.
    """
    owner = sessions.owner_of(key_id)
    hold_s = settings.job_lifetime(background=background) + _LOCK_GRACE_S
    if not await sessions.lock(redis, owner, session_id, job.id, hold_s):
        raise OpenAIError(
            409,
            f"Session '{session_id}' is busy with another request; retry when it has finished.",
            type="invalid_request_error",
            param="session_id",
            code="session_busy",
        )
    clock = ""  # the session's, once it is found to exist: a refusal restarts it
    try:
        session, history_len, head = await sessions.open_for_job(
            redis,
            owner,
            session_id,
            settings.session_ttl_s,
            head=len(job.turns),
            turn_s=hold_s,
            ledger=ledger,
        )
        if session is not None:
            ttl_s = settings.session_ttl_s
            clock = sessions.clock(owner, session_id, session.transcript_id, ttl_s, ledger)
        turns = new_turns(history_len, head, job.turns)
        if not turns or turns[-1].role != "user":
            raise OpenAIError.invalid(
                "The request adds no new user message to the session.",
                param="messages",
                code="invalid_messages",
            )
        ref = SessionRef(
            owner=owner,
            id=session_id,
            history_len=history_len,
            transcript_id=session.transcript_id if session else sessions.new_transcript_id(),
            workspace=session.workspace if session else None,
            holder=session.holder if session else None,
        )
        return job.model_copy(update={"turns": turns, "session": ref})
    except BaseException:
        await sessions.release(redis, owner, session_id, job.id, clock)
        raise


async def abandon(redis: Redis, job: CompletionJob, ttl_s: int, ledger: str | None) -> None:
    """Releases the session of a job that will never run (not enqueued), restarting its clock."""
    if (ref := job.session) is not None:
        clock = sessions.clock(ref.owner, ref.id, ref.transcript_id, ttl_s, ledger)
        with contextlib.suppress(RedisError):
            await sessions.release(redis, ref.owner, ref.id, job.id, clock)
