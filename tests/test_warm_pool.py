"""The warm pool's sizing (worker/warm.py), with a stand-in for starting a CLI: how many clients it
keeps, that it starts them one at a time, and that it shrinks when idle. What a warm client sends
upstream is tested on the real CLI in tests/test_claude_warm.py."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import ExitStack
from typing import Any, cast

import pytest
from claude_agent_sdk import ClaudeSDKClient, ResultMessage

from shared.jobs import CompletionJob, Turn
from worker.warm import REUSES, WarmClient, WarmPool, _rewound_turn, reusable


class _FakeControl:
    def __init__(self) -> None:
        self.rewound: list[str] = []

    async def _send_control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        self.rewound.append(request["target_message_uuid"])
        return {"rewound": True}


class _FakeCLI:
    def __init__(self) -> None:
        self._query = _FakeControl()

    async def disconnect(self) -> None:
        pass


class _Spawner:
    def __init__(self) -> None:
        self.running = 0
        self.most_at_once = 0
        self.started = 0
        self.discarded = 0

    async def __call__(self, job: CompletionJob) -> WarmClient:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        self.started += 1
        stack = ExitStack()
        stack.callback(self._discarded)
        return WarmClient(cast(ClaudeSDKClient, _FakeCLI()), stack)

    def _discarded(self) -> None:
        self.discarded += 1


def job(model: str = "claude-sonnet-4-5", owner: str | None = "key-a") -> CompletionJob:
    return CompletionJob(request_id="r", model=model, turns=[Turn(role="user", text="hi")], owner=owner)


async def settled(pool: WarmPool) -> None:
    for _ in range(200):
        await asyncio.sleep(0.01)
        if pool.ready == len(pool._slots) and (pool._filling is None or pool._filling.done()):
            return


def test_no_client_before_the_first_job_then_one_per_slot_started_one_at_a_time() -> None:
    async def scenario() -> None:
        spawn = _Spawner()
        pool = WarmPool(4, spawn)
        await asyncio.sleep(0.05)
        assert spawn.started == 0
        assert await pool.take(job()) is None  # the first job starts cold
        pool.order(job())
        await settled(pool)
        assert (pool.ready, spawn.most_at_once) == (4, 1)
        taken = [await pool.take(job()) for _ in range(4)]
        assert all(client is not None for client in taken)
        await pool.close()

    asyncio.run(scenario())


def test_the_memory_budget_caps_the_pool() -> None:
    async def scenario() -> None:
        pool = WarmPool(4, _Spawner(), memory_mib=500, client_mib=200)
        pool.order(job())
        await settled(pool)
        assert pool.ready == 2
        await pool.close()

    asyncio.run(scenario())


def test_an_idle_pool_shrinks_to_its_idle_size_and_grows_back_with_jobs() -> None:
    async def scenario() -> None:
        spawn = _Spawner()
        pool = WarmPool(3, spawn, idle_s=0.3, idle_clients=1)
        pool.order(job())
        await settled(pool)
        assert pool.ready == 3
        await asyncio.sleep(0.5)
        await settled(pool)
        assert (pool.ready, spawn.discarded) == (1, 2)
        assert await pool.take(job()) is not None
        pool.order(job())
        await settled(pool)
        assert pool.ready == 3
        await pool.close()

    asyncio.run(scenario())


def test_a_new_kind_of_job_takes_the_place_of_another_kinds_client() -> None:
    async def scenario() -> None:
        spawn = _Spawner()
        pool = WarmPool(2, spawn)
        pool.order(job("claude-sonnet-4-5"))
        await settled(pool)
        pool.order(job("claude-opus-4-1"))
        await settled(pool)
        kinds: list[Any] = [slot.profile for slot in pool._slots]
        assert len(kinds) == 2
        assert any("opus" in kind for kind in kinds)
        assert await pool.take(job("claude-opus-4-1")) is not None
        await pool.close()

    asyncio.run(scenario())


def test_a_client_given_back_is_rewound_and_serves_only_its_keys_jobs() -> None:
    async def scenario() -> None:
        spawn = _Spawner()
        pool = WarmPool(1, spawn)
        pool.order(job())
        await settled(pool)
        warm = await pool.take(job(owner="key-a"))
        assert warm is not None
        assert pool.give_back(warm, job(owner="key-a"), "turn-1")
        await settled(pool)
        assert cast(Any, warm.client)._query.rewound == ["turn-1"]
        assert await pool.take(job(owner="key-b")) is None  # another key's job starts cold
        pool.order(job(owner="key-b"))  # full, and nothing for key b: a fresh client replaces it
        await settled(pool)
        assert spawn.discarded == 1
        fresh = await pool.take(job(owner="key-b"))
        assert fresh is not None
        assert fresh is not warm
        await pool.close()

    asyncio.run(scenario())


def test_a_client_is_not_given_back_to_a_full_pool_or_after_its_last_job() -> None:
    async def scenario() -> None:
        pool = WarmPool(1, _Spawner())
        pool.order(job())
        await settled(pool)
        warm = await pool.take(job())
        assert warm is not None
        pool.order(job())  # its replacement fills the pool
        await settled(pool)
        assert not pool.give_back(warm, job(), "turn")
        await warm.discard()
        again = await pool.take(job())
        assert again is not None
        again.jobs = REUSES
        assert not pool.give_back(again, job(), "turn")
        await pool.close()

    asyncio.run(scenario())


def test_with_several_keys_some_places_stay_for_fresh_clients() -> None:
    async def scenario() -> None:
        pool = WarmPool(2, _Spawner())
        pool.order(job(owner="key-a"))
        await settled(pool)
        first = await pool.take(job(owner="key-a"))
        second = await pool.take(job(owner="key-b"))  # two keys seen: one place stays fresh
        assert first is not None
        assert second is not None
        assert pool.fresh_reserve() == 1
        assert pool.give_back(first, job(owner="key-a"), "turn")
        assert not pool.give_back(second, job(owner="key-b"), "turn")  # the fresh one's place
        await second.discard()
        await pool.close()

    asyncio.run(scenario())


def test_a_client_can_go_back_only_after_a_keys_job() -> None:
    assert reusable(job(owner="key-a"))
    assert not reusable(job(owner=None))  # no key to keep it for


class _RefusedCLI(_FakeCLI):
    """A CLI whose warm-up turn the model API refused: the CLI reports it as a `success` result
    with `is_error` and the reason in its text."""

    async def query(self, prompt: Any) -> None:
        pass

    async def receive_response(self) -> AsyncIterator[ResultMessage]:
        yield ResultMessage(
            subtype="success",
            duration_ms=1,
            duration_api_ms=1,
            is_error=True,
            num_turns=1,
            session_id="s",
            result="API Error: Connection error.",
        )


async def test_a_refused_warm_up_says_why() -> None:
    """Found by an outside probe: the log said "the warm-up turn failed: success", with a traceback."""
    with pytest.raises(RuntimeError, match=r"the warm-up turn failed: API Error: Connection error\.$"):
        await _rewound_turn(cast(ClaudeSDKClient, _RefusedCLI()))
