"""Scopes in the KV tiers, on a real redis-server: each tier removes a whole scope and only it;
blocks sealed with a scope's data key do not open once the key is destroyed; a destroyed scope
gets no new key and no new blocks (in-flight requests of a purged scope cannot write back)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from kvstore.codec import decode_block, encode_block
from kvstore.keys import BlockKey, ScopeId, scope_id
from kvstore.manager import TierManager
from kvstore.sealing import ScopedSealer
from kvstore.tier import BlockAddress, TierEventKind
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_keyring import RedisKeyring
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.shared_memory import SharedMemoryTier
from zumik_serve.store.local_redis import LocalRedis

pytestmark = pytest.mark.redis

A, B = scope_id("salt-a"), scope_id("salt-b")


def _address(index: int, scope: ScopeId) -> BlockAddress:
    return BlockAddress("c" * 64, BlockKey(f"{index:032x}"), scope)


def _value(address: BlockAddress) -> bytes:
    return encode_block({"layer.0": np.full((4, 8), 7, dtype=np.uint8)}, address)


@pytest.fixture
def redis_client(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()
    server.stop()


def test_scope_ids_are_stable_distinct_and_hide_the_salt() -> None:
    assert scope_id("salt-a") == A and A != B and "salt" not in A and len(A) == 16
    assert scope_id(None) == scope_id("") == "shared"


def test_every_tier_removes_exactly_one_scope(tmp_path: Path, redis_client: redis.Redis) -> None:
    tiers = [
        SharedMemoryTier(tmp_path / "shm", capacity_bytes=1 << 20),
        RedisTier(redis_client),
        DiskTier(tmp_path / "disk"),
    ]
    for tier in tiers:
        for index in range(3):
            assert tier.store(_address(index, A), b"a")
            assert tier.store(_address(index, B), b"b")
        assert tier.remove_scope(A) == 3
        assert tier.contains([_address(i, A) for i in range(3)]) == [False] * 3
        assert tier.contains([_address(i, B) for i in range(3)]) == [True] * 3
        assert tier.remove_scope(A) == 0


def test_every_tier_removes_several_scopes_at_once_and_redis_in_one_walk_past_a_few(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    """A purge sweeps every salt epoch the tenant has had: its scopes are removed together, and
    past a few, the Redis keyspace is walked once for all of them (one SCAN a scope made each
    purge cost more than the last). Another scope's blocks, counts and incoming values stay."""
    scopes = [scope_id(f"salt-epoch-{epoch}") for epoch in range(12)]
    tiers = [
        SharedMemoryTier(tmp_path / "shm", capacity_bytes=1 << 20),
        RedisTier(redis_client),
        DiskTier(tmp_path / "disk"),
    ]
    for tier in tiers:
        for scope in (*scopes, B):
            for index in range(2):
                assert tier.store(_address(index, scope), b"v")
        assert tier.remove_scopes(scopes[:1]) == 2
        assert tier.remove_scopes(scopes) == 2 * (len(scopes) - 1)
        assert not any(tier.contains([_address(i, scope) for scope in scopes for i in range(2)]))
        assert tier.contains([_address(i, B) for i in range(2)]) == [True, True]
        assert tier.remove_scopes([]) == 0
    redis_client.set(f"kv:incoming:{scopes[0]}:0", b"not a block")  # a token where a scope would be

    def scans(scopes: list[ScopeId]) -> int:
        before = int(redis_client.info("commandstats")["cmdstat_scan"]["calls"])
        RedisTier(redis_client).remove_scopes(scopes)
        return int(redis_client.info("commandstats")["cmdstat_scan"]["calls"]) - before

    # A SCAN walks the whole keyspace: one walk for all the scopes, whatever their number (the
    # server filters for a lone scope): 12 cost one scope's.
    assert scans(scopes) == scans(scopes[:2]) == scans(scopes[:1])
    assert redis_client.exists(f"kv:incoming:{scopes[0]}:0")
    assert [key for key in redis_client.scan_iter(match="kv:*") if scopes[3].encode() in key] == []
    assert int(redis_client.get(f"kv:used:{B}") or 0) > 0  # the other scope is still counted


def test_destroyed_scope_key_makes_sealed_blocks_unreadable(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    keyring = RedisKeyring(redis_client, cache_ttl_s=0)
    disk = DiskTier(tmp_path / "disk")
    manager = TierManager([disk], sealer=ScopedSealer(keyring), keyring=keyring)
    a0, b0 = _address(0, A), _address(0, B)
    manager.store(a0, _value(a0))
    manager.store(b0, _value(b0))
    sealed = disk.load(a0)
    assert sealed is not None and b"zumik-kv-block" not in sealed  # ciphertext at rest
    (restored,) = manager.load(manager.plan([a0]))
    assert decode_block(restored, a0) is not None

    keyring.destroy(A)
    assert manager.load(manager.plan([a0])) == []  # the ciphertext is still there: it cannot open
    assert any(event.kind is TierEventKind.FAILURE for event in manager.take_events())
    (other,) = manager.load(manager.plan([b0]))  # the other scope is untouched
    assert decode_block(other, b0) is not None

    # No new key, no new block, under the destroyed scope (in-flight requests of a purged scope).
    a1 = _address(1, A)
    manager.store(a1, _value(a1))
    assert disk.contains([a1]) == [False]
    assert keyring.data_key(A, create=True) is None and keyring.is_destroyed(A)


def test_sealing_binds_the_scope(tmp_path: Path, redis_client: redis.Redis) -> None:
    keyring = RedisKeyring(redis_client, cache_ttl_s=0)
    sealer = ScopedSealer(keyring)
    a0 = _address(0, A)
    sealed = sealer.seal(b"value", a0)
    assert sealed is not None and sealer.open(sealed, a0) == b"value"
    assert sealer.open(sealed, _address(0, B)) is None  # copied into another scope: does not open


class _MemoryKeyring:
    """Data keys in a dict: ``destroy`` purges a scope's key."""

    def __init__(self) -> None:
        self.keys: dict[ScopeId, bytes] = {}

    def data_key(self, scope: ScopeId, *, create: bool) -> bytes | None:
        if scope not in self.keys and create:
            self.keys[scope] = bytes(range(32))[::-1] if scope.endswith("b") else bytes(range(32))
        return self.keys.get(scope)

    def is_destroyed(self, scope: ScopeId) -> bool:
        return scope not in self.keys

    def destroy(self, scope: ScopeId) -> None:
        del self.keys[scope]


def test_a_sealer_drops_a_destroyed_scopes_key_at_its_next_use_and_idle_ones_after_a_while() -> None:
    """An engine process opens blocks of many scopes: the sealer keeps each scope's cipher (and
    so its key) only while the key exists and is used; it held every key it ever saw, a purged
    scope's included, until a thousand had piled up."""
    now = [1000.0]
    keyring = _MemoryKeyring()
    sealer = ScopedSealer(keyring, clock=lambda: now[0])
    mine, theirs = ScopeId("scope-a"), ScopeId("scope-b")
    addresses = {scope: BlockAddress("d" * 64, BlockKey("k" * 32), scope) for scope in (mine, theirs)}
    sealed = {
        scope: sealer.seal(b"block of " + scope.encode(), address) for scope, address in addresses.items()
    }
    assert sealer.scopes_held == 2
    keyring.destroy(mine)  # a purge
    assert sealer.open(sealed[mine] or b"", addresses[mine]) is None and sealer.scopes_held == 1
    assert sealer.open(sealed[theirs] or b"", addresses[theirs]) == b"block of scope-b"
    now[0] += 61.0  # scope-b unused past IDLE_S: the next use of any scope sweeps it out
    assert sealer.open(sealed[mine] or b"", addresses[mine]) is None and sealer.scopes_held == 0
    assert sealer.open(sealed[theirs] or b"", addresses[theirs]) == b"block of scope-b"  # made again
