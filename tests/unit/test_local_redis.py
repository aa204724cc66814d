"""The embedded redis-server: AOF with fsync on every write; a tenant survives kill -9 (its
transaction replayed although the default user is off) and reads back with every option it was
created with; everything it writes is owner-only; bound to loopback."""

from __future__ import annotations

import asyncio
import time
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
        await asyncio.gather(*(client.set(f"zumik:key-{i}", f"value-{i}") for i in range(8)))  # 8 pooled
        server.kill()
        with pytest.raises(RedisConnectionError):
            await client.get("zumik:key-0")
        server.start()
        assert await asyncio.gather(*(client.get(f"zumik:key-{i}") for i in range(8))) == [
            f"value-{i}".encode() for i in range(8)
        ]
        assert await client.incr("zumik:counter") == 1  # a write is served too, and runs once
    finally:
        await client.aclose()
        server.stop()


def test_files_it_writes_are_owner_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data folder 0700; the AOF (after a rewrite too), the log, the ACL file, the secrets
    and the run file 0600, whatever the caller's umask."""
    import os
    import stat

    from zumik_serve.home import ZumikHome
    from zumik_serve.store.local_redis import embedded_redis

    monkeypatch.delenv("ZUMIK_SECRETS_DIR", raising=False)
    home = ZumikHome(tmp_path / "home").ensure()
    previous = os.umask(0o022)  # the usual umask: files would be 0644 without Zumik's care
    try:
        server = embedded_redis(home).start()
        try:
            client = redis.Redis.from_url(server.url)
            client.set("zumik:x", b"y")
            client.bgrewriteaof()
            while int(client.info("persistence")["aof_rewrite_in_progress"]):
                time.sleep(0.05)
        finally:
            server.stop()
    finally:
        os.umask(previous)
    written = [*home.redis_dir.rglob("*"), *(home.root / "secrets").iterdir()]
    files = [p for p in written if p.is_file()]
    names = {p.name for p in files}
    assert names >= {"redis.log", "users.acl", "redis-gateway.password", "redis-kv.password"}
    assert any(name.endswith(".aof") for name in names) and any(name.endswith(".rdb") for name in names)

    def modes(paths: list[Path]) -> set[str]:
        return {oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}

    assert modes(files) == {"0o600"}
    assert modes([home.redis_dir, home.root / "secrets", *(p for p in written if p.is_dir())]) == {"0o700"}


def test_the_run_file_is_owner_only_and_the_cli_finds_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    from zumik_serve.home import ZumikHome
    from zumik_serve.store.local_redis import REDIS_URL_ENV, embedded_redis, running_redis_url

    monkeypatch.delenv("ZUMIK_SECRETS_DIR", raising=False)
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    home = ZumikHome(tmp_path / "home").ensure()
    server = embedded_redis(home).start()
    try:
        run_file = home.run_dir / "redis.json"
        assert stat.S_IMODE(run_file.stat().st_mode) == 0o600
        assert (home.root / "secrets" / "redis-gateway.password").read_text() not in run_file.read_text()
        url = running_redis_url(home)
        assert url == server.url and redis.Redis.from_url(url).set("zumik:cli", b"1")
    finally:
        server.stop()
    assert running_redis_url(home) is None
