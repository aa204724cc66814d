"""The gateway's Redis client against a Redis that stops answering (``CLIENT PAUSE``).

Invariants held here:
- a command, a script or a pipeline of the gateway's client ends within ``COMMAND_TIMEOUT_S``
  with ``redis.exceptions.TimeoutError``, which ``guard`` turns into ``StoreUnavailableError``;
- the connection a timed-out command was cut off on is never read again: once Redis answers,
  the next command on the same pool reads its own reply, not the late one;
- a /v1 request while Redis hangs is a 503 with ``Retry-After``, within the bound;
- the client's connections carry no socket timeout (on Python 3.11 that made redis-py run
  every send under ``asyncio.wait_for``, a task per command).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.support.inprocess import make_gateway
from zumik_serve.errors import StoreUnavailableError
from zumik_serve.store import client as store_client
from zumik_serve.store.client import gateway_client, guard
from zumik_serve.store.local_redis import LocalRedis

pytestmark = pytest.mark.redis

BOUND_S = 0.3  # the bound these tests run under
PAUSE_MS = 2000


@pytest.fixture
def short_bound(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(store_client, "COMMAND_TIMEOUT_S", BOUND_S)
    return BOUND_S


@contextlib.asynccontextmanager
async def redis_paused(server: LocalRedis) -> AsyncIterator[None]:
    """Redis answers no client for ``PAUSE_MS`` (``CLIENT UNPAUSE`` would wait too); the block
    runs in that time, and the pause is over once it ends. Commands sent meanwhile are run, and
    answered, after the pause."""
    admin = redis.Redis.from_url(server.admin_url)
    try:
        admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        ends = time.monotonic() + PAUSE_MS / 1000
        yield
        assert time.monotonic() < ends, "the block ran past the pause"
        await asyncio.sleep(ends - time.monotonic() + 0.05)
    finally:
        admin.close()


async def test_a_hung_command_fails_within_the_bound_and_its_connection_is_not_read_again(
    module_redis: LocalRedis, short_bound: float
) -> None:
    client = gateway_client(module_redis.url)
    try:
        await client.set("zumik:test:first", "one")
        await client.set("zumik:test:second", "two")
        async with redis_paused(module_redis):
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError) as caught:
                await guard(client.get("zumik:test:first"))
            waited_s = time.monotonic() - started
        assert isinstance(caught.value.__cause__, RedisTimeoutError)
        assert waited_s >= short_bound
        # Redis now sends the late reply ("one") to the connection the GET was cut off on.
        assert await client.get("zumik:test:second") == b"two"
        assert await client.get("zumik:test:first") == b"one"
    finally:
        await client.aclose()


async def test_a_hung_pipeline_or_script_fails_within_the_bound_and_the_pool_recovers(
    module_redis: LocalRedis, short_bound: float
) -> None:
    client = gateway_client(module_redis.url)
    echo = client.register_script("return ARGV[1]")
    try:
        await client.set("zumik:test:third", "three")
        assert await echo(args=["warm"]) == b"warm"
        async with redis_paused(module_redis):
            async with client.pipeline(transaction=True) as pipe:
                pipe.get("zumik:test:third")
                pipe.incr("zumik:test:count")
                with pytest.raises(RedisTimeoutError):
                    await pipe.execute()
            with pytest.raises(RedisTimeoutError):
                await echo(args=["late"])
        async with client.pipeline(transaction=False) as pipe:
            pipe.get("zumik:test:third")
            pipe.get("zumik:test:missing")
            assert await pipe.execute() == [b"three", None]
        assert await echo(args=["after"]) == b"after"
    finally:
        await client.aclose()


async def test_a_request_while_redis_hangs_is_a_503_with_retry_after(
    module_redis: LocalRedis, tiny_model_dir: Path, short_bound: float
) -> None:
    gateway = make_gateway(module_redis.url, tiny_model_dir)
    body = {"model": "zumik-tiny", "prompt": "Hello there", "max_tokens": 1}
    async with gateway.client() as http:
        assert (await http.post("/v1/completions", json=body)).status_code == 200  # key cached
        async with redis_paused(module_redis):
            response = await http.post("/v1/completions", json=body)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "1"
        assert (await http.post("/v1/completions", json=body)).status_code == 200


def test_the_gateway_client_sets_no_socket_timeout(module_redis: LocalRedis) -> None:
    client = gateway_client(module_redis.url)
    pool: aioredis.BlockingConnectionPool = client.connection_pool  # type: ignore[assignment]
    assert pool.connection_kwargs.get("socket_timeout") is None
    assert pool.connection_kwargs["socket_connect_timeout"] == 5.0
