"""A batch of blocks is stored with each tier written once (issue 15: the store path's CPU).

Invariants held here, on real redis-servers (the KV user's ACL) and real files:
- a batch is one Redis round trip (one script, one SET per value), and counts a scope's bytes
  and applies its limit exactly as the same stores one after another would: a block over the
  limit in the middle of a batch is refused (never readable), the blocks around it are stored;
- a refused or stored block leaves no incoming value behind; a block keeps the tier's TTL (or
  none when the tier has none); a server that lost its scripts (restarted) still stores;
- a block is sealed once for every persistent tier: Redis and disk hold the same bytes, and
  each opens them on its own;
- nothing of a purged scope is written, even in the middle of a batch of other scopes;
- the write-behind thread hands a batch to the tiers at once; a block it cannot encode is lost
  alone (counted);
- an unsealed block file is flushed to its disk before its rename; a sealed one (its tag
  catches a torn file) and the host tier's (RAM) are not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from kvstore.codec import decode_block, encode_block
from kvstore.keys import BlockKey, ScopeId
from kvstore.manager import TierManager
from kvstore.sealing import ScopedSealer
from kvstore.tier import BlockAddress, Tier, TierEventKind
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_keyring import RedisKeyring
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.shared_memory import SharedMemoryTier
from kvstore.write_behind import StoreBatch, WriteBehind
from tests.support.kv_redis import kv_client, state_and_kv
from zumik_serve.store.local_redis import LocalRedis

COMPAT = "c" * 64
A = ScopeId("aaaaaaaaaaaaaaaa")
B = ScopeId("bbbbbbbbbbbbbbbb")


def _address(index: int, scope: ScopeId = A) -> BlockAddress:
    return BlockAddress(COMPAT, BlockKey(f"{index:032x}"), scope)


def _value(address: BlockAddress, size: int = 4096) -> bytes:
    tensors = {"kv": np.frombuffer(np.random.default_rng(int(address.key, 16)).bytes(size), np.uint8)}
    return encode_block(tensors, address)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRedis, LocalRedis]]:
    """A state Redis (data keys) and a KV Redis (blocks), with the users ``zumik serve`` makes."""
    with state_and_kv(tmp_path_factory, kv_maxmemory_bytes=64 << 20) as servers:
        yield servers


def _admin(server: LocalRedis) -> redis.Redis:
    admin = redis.Redis.from_url(server.admin_url)
    admin.flushall()
    admin.config_resetstat()
    return admin


def _calls(admin: redis.Redis) -> dict[str, int]:
    return {
        name.removeprefix("cmdstat_"): stats["calls"] for name, stats in admin.info("commandstats").items()
    }


@pytest.mark.redis
def test_a_batch_is_one_round_trip_counted_as_stores_one_after_another(servers: Any) -> None:
    _, kv = servers
    admin = _admin(kv)
    sizes = [1000, 3000, 2000, 1500]
    limit = 1000 + 3000 + 1500 + 100  # the third block would pass it; the fourth fits again
    tier = RedisTier(kv_client(kv), scope_max_bytes=limit)
    blocks = [(_address(index), bytes([index]) * size) for index, size in enumerate(sizes)]
    assert tier.store_many([(_address(0, B), b"b")]) == [True]  # the script is loaded once, here
    admin.config_resetstat()

    assert tier.store_many(blocks) == [True, True, False, True]
    calls = _calls(admin)
    assert calls["evalsha"] == 1 and calls["set"] == 4  # one script for the batch, its values SET
    assert tier.scope_bytes(A) == 1000 + 3000 + 1500
    assert tier.contains([address for address, _ in blocks]) == [True, True, False, True]
    assert tier.load_many([address for address, _ in blocks]) == [
        blocks[0][1],
        blocks[1][1],
        None,
        blocks[3][1],
    ]
    assert admin.keys("kv:incoming:*") == []  # taken or deleted, none left behind

    # The same blocks again: each replaces itself (counted once), the refused one still is.
    assert tier.store_many(blocks) == [True, True, False, True]
    assert tier.scope_bytes(A) == 1000 + 3000 + 1500
    # One store after another (``store``) gives the same answers and the same count.
    admin.flushall()
    assert [tier.store(address, value) for address, value in blocks] == [True, True, False, True]
    assert tier.scope_bytes(A) == 1000 + 3000 + 1500


@pytest.mark.redis
def test_a_batch_counts_each_scope_against_its_own_limit(servers: Any) -> None:
    state, kv = servers
    _admin(kv)
    redis.Redis.from_url(state.admin_url).set(f"kv:limit:{B}", "2500")  # B's own limit
    tier = RedisTier(kv_client(kv), scope_max_bytes=None, limits=kv_client(state))
    blocks = [(_address(index, scope), b"x" * 1000) for index in range(3) for scope in (A, B)]

    assert tier.store_many(blocks) == [True, True, True, True, True, False]
    assert (tier.scope_bytes(A), tier.scope_bytes(B)) == (3000, 2000)


@pytest.mark.redis
def test_stored_blocks_keep_the_tiers_ttl_or_none(servers: Any) -> None:
    _, kv = servers
    admin = _admin(kv)
    expiring, lasting = RedisTier(kv_client(kv), ttl_s=600), RedisTier(kv_client(kv), ttl_s=None)
    assert expiring.store_many([(_address(0), b"a")]) == [True]
    assert lasting.store_many([(_address(1), b"b")]) == [True]
    assert 590 <= admin.ttl(RedisTier.redis_key(_address(0))) <= 600
    assert admin.ttl(RedisTier.redis_key(_address(1))) == -1  # no TTL, as the tier asked
    assert admin.zscore(f"kv:expiry:{A}", RedisTier.redis_key(_address(0))) is not None


@pytest.mark.redis
def test_a_server_that_lost_its_scripts_still_stores(servers: Any) -> None:
    _, kv = servers
    admin = _admin(kv)
    tier = RedisTier(kv_client(kv))
    assert tier.store_many([(_address(0), b"a")]) == [True]
    admin.script_flush()  # as after a restart
    assert tier.store_many([(_address(1), b"b"), (_address(2), b"c")]) == [True, True]
    assert tier.load_many([_address(1), _address(2)]) == [b"b", b"c"]
    assert tier.scope_bytes(A) == 3 and admin.keys("kv:incoming:*") == []


@pytest.mark.redis
def test_a_sealed_batch_is_sealed_once_and_opens_from_either_tier(servers: Any, tmp_path: Path) -> None:
    state, kv = servers
    _admin(kv)
    keyring = RedisKeyring(kv_client(state), cache_ttl_s=0)
    remote, disk = RedisTier(kv_client(kv)), DiskTier(tmp_path / "disk")
    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    manager = TierManager([host, remote, disk], sealer=ScopedSealer(keyring), keyring=keyring)
    addresses = [_address(index) for index in range(3)]
    values = [_value(address) for address in addresses]

    manager.store_many(addresses, values)
    at_rest = remote.load_many(addresses)
    assert at_rest == disk.load_many(addresses)  # the same nonce and ciphertext: sealed once
    assert all(value is not None and b"zumik-kv-block" not in value for value in at_rest)
    assert host.load_many(addresses) == values  # the host tier holds plain blocks
    stores = {(e.tier, e.num_blocks) for e in manager.take_events() if e.kind is TierEventKind.STORE}
    assert stores == {(Tier.HOST, 3), (Tier.REDIS, 3), (Tier.DISK, 3)}  # one event a tier a batch
    for only in (remote, disk):
        restored = TierManager([only], sealer=ScopedSealer(keyring), keyring=keyring).load_prefix(addresses)
        assert list(restored.values) == values and set(restored.sources) == {only.tier}
        assert all(
            decode_block(value, address) is not None for value, address in zip(values, addresses, strict=True)
        )


@pytest.mark.redis
def test_nothing_of_a_purged_scope_is_written_in_the_middle_of_a_batch(servers: Any, tmp_path: Path) -> None:
    state, kv = servers
    _admin(kv)
    keyring = RedisKeyring(kv_client(state), cache_ttl_s=0)
    tiers = [
        SharedMemoryTier(tmp_path / "shm", 1 << 24),
        RedisTier(kv_client(kv)),
        DiskTier(tmp_path / "disk"),
    ]
    manager = TierManager(tiers, sealer=ScopedSealer(keyring), keyring=keyring)
    keyring.data_key(B, create=True)
    keyring.destroy(B)  # B was purged while its requests were in flight
    addresses = [_address(0, A), _address(0, B), _address(1, A), _address(1, B), _address(2, A)]

    manager.store_many(addresses, [_value(address) for address in addresses])
    for tier in tiers:
        assert tier.contains(addresses) == [True, False, True, False, True], tier.tier
    assert not (tmp_path / "disk" / COMPAT / B).exists() and not (tmp_path / "shm" / COMPAT / B).exists()


def test_only_unsealed_blocks_on_disk_are_flushed_before_their_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(fd), fsync(fd))[1])
    blocks = [(_address(index), _value(_address(index))) for index in range(2)]
    disk, host = DiskTier(tmp_path / "disk", 1 << 24), SharedMemoryTier(tmp_path / "shm", 1 << 24)

    assert disk.store_many(blocks) == [True, True] and len(flushed) == 2
    assert disk.store_many(blocks, sealed=True) == [True, True] and len(flushed) == 2
    assert host.store_many(blocks) == [True, True] and len(flushed) == 2
    assert disk.load_many([address for address, _ in blocks]) == [value for _, value in blocks]
    leftovers = [path.name for path in (tmp_path / "disk").rglob(".*") if path.name != ".budget"]
    assert leftovers == []  # every temporary file was renamed into place


def test_a_batch_recreates_a_folder_a_purge_removed(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk")
    assert disk.store_many([(_address(0), b"a")]) == [True]
    assert disk.remove_scope(A) == 1
    assert disk.store_many([(_address(0), b"a"), (_address(1), b"b")]) == [True, True]
    assert disk.load_many([_address(0), _address(1)]) == [b"a", b"b"]


@pytest.mark.redis
def test_the_writer_hands_each_batch_to_the_tiers_at_once(servers: Any, tmp_path: Path) -> None:
    """One Redis round trip for a batch through the write-behind thread; a block whose value
    cannot be made is lost alone (counted), the rest of its batch is stored."""
    _, kv = servers
    admin = _admin(kv)
    remote = RedisTier(kv_client(kv))
    assert remote.store_many([(_address(0, B), b"b")]) == [True]  # the script is loaded once, here
    manager = TierManager([SharedMemoryTier(tmp_path / "shm", 1 << 24), remote])
    writer = WriteBehind(manager, max_pending_bytes=1 << 20, usage_every_s=None)
    addresses = tuple(_address(index) for index in range(4))

    def value(index: int) -> bytes:
        if index == 2:
            raise ValueError("a block that cannot be encoded")
        return _value(addresses[index])

    admin.config_resetstat()
    assert writer.submit(StoreBatch(addresses, 4 * 4096, value))
    assert writer.flush(timeout_s=60)
    writer.close()
    assert _calls(admin)["evalsha"] == 1
    assert remote.contains(list(addresses)) == [True, True, False, True]
    events = manager.take_events()
    failures = [(e.tier, e.num_blocks) for e in events if e.kind is TierEventKind.FAILURE]
    assert failures == [(Tier.ENGINE, 1)]
