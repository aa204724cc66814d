"""The embedded redis-server: AOF with fsync on every write; a tenant survives kill -9 and reads
back with every option it was created with."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from zumik_serve.store.local_redis import LocalRedis
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import Tenant, hash_api_key

pytestmark = pytest.mark.redis


def test_aof_is_on_with_fsync_always(tmp_path: Path) -> None:
    server = LocalRedis(data_dir=tmp_path).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    finally:
        server.stop()


def test_tenant_survives_kill_9_and_restart(tmp_path: Path) -> None:
    server = LocalRedis(data_dir=tmp_path).start()
    port = server.port

    async def create() -> tuple[str, str]:
        client = aioredis.from_url(server.url)
        tenant, key = await RedisTenantStore(client).create_tenant("durable")
        await client.aclose()
        return tenant.id, key

    tenant_id, key = asyncio.run(create())
    server.kill()
    restarted = LocalRedis(data_dir=tmp_path, port=port).start()
    try:

        async def lookup() -> str | None:
            client = aioredis.from_url(restarted.url)
            tenant = await RedisTenantStore(client).tenant_for_key_hash(hash_api_key(key))
            await client.aclose()
            return tenant.id if tenant else None

        assert asyncio.run(lookup()) == tenant_id
    finally:
        restarted.stop()
    assert restarted.pid is None


def test_tenant_options_round_trip_through_the_store(tmp_path: Path) -> None:
    server = LocalRedis(data_dir=tmp_path).start()

    async def round_trip() -> list[Tenant | None]:
        client = aioredis.from_url(server.url)
        store = RedisTenantStore(client)
        limited, limited_key = await store.create_tenant(
            "limited", qos_classes=frozenset({"batch", "standard"}), reuse_accounting=False
        )
        plain, plain_key = await store.create_tenant("plain")
        found = [await store.tenant_for_key_hash(hash_api_key(key)) for key in (limited_key, plain_key)]
        await client.aclose()
        assert found == [limited, plain]
        return found

    try:
        limited, plain = asyncio.run(round_trip())
    finally:
        server.stop()
    assert limited is not None and limited.qos_classes == frozenset({"batch", "standard"})
    assert limited.reuse_accounting is False
    assert plain is not None and plain.qos_classes is None and plain.reuse_accounting is True


async def test_the_first_read_after_a_redis_restart_is_served(tmp_path: Path) -> None:
    """Every pooled connection is stale after a restart: once Redis answers again, the gateway's
    client serves the next read (and write) instead of failing it with a 503, and a call while
    Redis is down still fails at once."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from zumik_serve.store.client import gateway_client

    server = LocalRedis(data_dir=tmp_path / "redis").start()
    client = gateway_client(server.url)
    try:
        await asyncio.gather(*(client.set(f"key-{i}", f"value-{i}") for i in range(8)))  # 8 pooled
        server.kill()
        with pytest.raises(RedisConnectionError):
            await client.get("key-0")
        server.start()
        assert await asyncio.gather(*(client.get(f"key-{i}") for i in range(8))) == [
            f"value-{i}".encode() for i in range(8)
        ]
        assert await client.incr("counter") == 1  # a write is served too, and runs once
    finally:
        await client.aclose()
        server.stop()
