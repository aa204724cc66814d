"""The two Redis servers ``zumik serve`` starts, for KV tier tests: a state Redis (AOF,
noeviction; the data keys, the tenants' limits) and a KV Redis (blocks: maxmemory,
volatile-lru, no AOF), with the same least-privilege users."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from zumik_serve.store.local_redis import LocalRedis


@contextmanager
def state_and_kv(
    factory: pytest.TempPathFactory, *, kv_maxmemory_bytes: int
) -> Iterator[tuple[LocalRedis, LocalRedis]]:
    secrets = factory.mktemp("secrets")
    state = LocalRedis(data_dir=factory.mktemp("state"), secrets_dir=secrets).start()
    try:
        kv = LocalRedis(
            data_dir=factory.mktemp("kv"), secrets_dir=secrets, role="kv", maxmemory_bytes=kv_maxmemory_bytes
        ).start()
        try:
            yield state, kv
        finally:
            kv.stop()
    finally:
        state.stop()


def kv_client(server: LocalRedis, **options: Any) -> redis.Redis:
    """A client of ``server`` as the engines' KV user (its password from its file)."""
    access = server.kv_access
    assert access.password_file is not None
    return redis.Redis.from_url(access.url, password=access.password_file.read_text(), **options)
