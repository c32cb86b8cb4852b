"""The auto-pipelined client: a turn's commands share one round trip and keep their own replies."""

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared.autopipeline import AutoPipelined


async def connections_received(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_connections_received"])


async def test_a_turns_commands_share_one_connection_and_keep_their_replies(redis: Redis) -> None:
    fresh = Redis(connection_pool=type(redis.connection_pool)(**redis.connection_pool.connection_kwargs))
    client = AutoPipelined(fresh)
    try:
        before = await connections_received(redis)
        await asyncio.gather(*(client.set(f"k{i}", i) for i in range(50)))
        values = await asyncio.gather(*(client.get(f"k{i}") for i in range(50)))
        assert values == [str(i).encode() for i in range(50)]
        assert await connections_received(redis) - before == 1  # a plain client opens ~50
    finally:
        await fresh.aclose()


async def test_an_error_is_its_own_commands_only(redis: Redis) -> None:
    client = AutoPipelined(redis)
    await redis.set("text", "x")
    counted, failed, listed = await asyncio.gather(
        client.incr("count"), client.incr("text"), client.lrange("nothing", 0, -1), return_exceptions=True
    )
    assert counted == 1
    assert listed == []
    assert isinstance(failed, ResponseError)


async def test_a_flushed_script_is_loaded_again(redis: Redis) -> None:
    client = AutoPipelined(redis)
    script = client.register_script("return redis.call('incrby', KEYS[1], ARGV[1])")
    assert await script(keys=["n"], args=[2]) == 2
    await redis.script_flush()
    assert await asyncio.gather(script(keys=["n"], args=[3]), script(keys=["m"], args=[1])) == [5, 1]


async def test_a_shared_pipeline_keeps_its_order_and_error_semantics(redis: Redis) -> None:
    client = AutoPipelined(redis)
    async with client.pipeline(transaction=False) as pipe:
        pipe.rpush("list", "a").rpush("list", "b").lrange("list", 0, -1)
        assert await pipe.execute() == [1, 2, [b"a", b"b"]]
    await redis.set("text", "x")
    async with client.pipeline(transaction=False) as pipe:
        pipe.incr("text").get("text")
        with pytest.raises(ResponseError):
            await pipe.execute()
    async with client.pipeline(transaction=False) as pipe:
        pipe.incr("text").get("text")
        failed, value = await pipe.execute(raise_on_error=False)
        assert isinstance(failed, ResponseError)
        assert value == b"x"


async def test_a_transaction_keeps_its_own_connection(redis: Redis) -> None:
    client = AutoPipelined(redis)
    async with client.pipeline(transaction=True) as tr:
        tr.incr("t").incr("t")
        assert await tr.execute() == [1, 2]


async def test_a_lost_connection_fails_every_command_of_the_batch() -> None:
    client = AutoPipelined(Redis(port=1, socket_connect_timeout=0.5))  # nothing listens on port 1
    replies = await asyncio.gather(client.get("a"), client.get("b"), return_exceptions=True)
    assert all(isinstance(reply, RedisConnectionError) for reply in replies)


async def test_a_cancelled_caller_leaves_the_others_their_replies(redis: Redis) -> None:
    client = AutoPipelined(redis)
    await redis.set("v", "1")
    gone = asyncio.ensure_future(client.get("v"))
    kept = asyncio.ensure_future(client.get("v"))
    await asyncio.sleep(0)  # both are in the batch
    gone.cancel()
    assert await kept == b"1"
    with pytest.raises(asyncio.CancelledError):
        await gone
