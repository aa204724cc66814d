"""The KV tiers are bounded, batched and behind the engine step (issue 15, items 2 and 3).

Invariants held here, on real redis-servers and real files:
- the KV Redis evicts least recently used blocks under its maxmemory while the state Redis
  (noeviction) keeps every key, the scopes' data keys included, and the tier reports the
  server's bound and evictions;
- a scope's byte count forgets blocks the server evicted, so a tenant is not refused for
  blocks it no longer has;
- the disk tier stays within its byte budget, least recently used first;
- the host tier's budget is the node's: two processes storing at once stay within it together;
- a restore reads each tier once per run of blocks (one MGET for Redis), never per block;
- stores queue behind the step: a tier that blocks does not block ``submit``, a full queue
  drops (and counts) the batch, and ``close`` counts what it could not write.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from kvstore.codec import encode_block
from kvstore.keys import BlockKey, ScopeId
from kvstore.manager import KvPlan, TierManager
from kvstore.sealing import ScopedSealer
from kvstore.tier import BlockAddress, Tier, TierEvent, TierEventKind
from kvstore.tiers.build import build_manager
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_keyring import RedisKeyring, keyring_key
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.shared_memory import SharedMemoryTier
from kvstore.write_behind import StoreBatch, WriteBehind
from tests.support.kv_redis import kv_client, state_and_kv

COMPAT = "c" * 64
SCOPE = ScopeId("0123456789abcdef")
BLOCK_BYTES = 64 << 10


def _address(index: int, scope: ScopeId = SCOPE) -> BlockAddress:
    return BlockAddress(COMPAT, BlockKey(f"{index:032x}"), scope)


def _block(index: int, size: int = BLOCK_BYTES) -> bytes:
    return np.random.default_rng(index).integers(0, 255, size=size, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A state Redis (AOF, noeviction) and a KV Redis (maxmemory 8 MiB, volatile-lru, no AOF),
    with the same users, as ``zumik serve`` starts them."""
    with state_and_kv(tmp_path_factory, kv_maxmemory_bytes=8 << 20) as servers:
        yield servers


@pytest.mark.redis
def test_kv_redis_is_a_bounded_lru_cache_and_the_state_redis_is_not(servers: Any) -> None:
    state, kv = servers
    state_admin, kv_admin = redis.Redis.from_url(state.admin_url), redis.Redis.from_url(kv.admin_url)
    assert kv_admin.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
    assert kv_admin.config_get("appendonly") == {"appendonly": "no"}
    assert kv_admin.config_get("maxmemory") == {"maxmemory": str(8 << 20)}
    assert state_admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert state_admin.config_get("appendonly") == {"appendonly": "yes"}
    # The engines' user may read the KV server's INFO (the tier's occupancy), not the state's.
    kv_client(kv).info("memory")
    with pytest.raises(redis.exceptions.NoPermissionError):
        kv_client(state).info("memory")


@pytest.mark.redis
def test_kv_blocks_are_evicted_under_maxmemory_while_state_and_data_keys_survive(servers: Any) -> None:
    state, kv = servers
    kv_admin = redis.Redis.from_url(kv.admin_url)
    kv_admin.flushall()
    state_client = redis.Redis.from_url(state.url)
    state_client.set("zumik:tenant:probe", "tenant state")
    keyring = RedisKeyring(kv_client(state), cache_ttl_s=0.0)
    tier = RedisTier(kv_client(kv), limits=kv_client(state))
    manager = TierManager([tier], sealer=ScopedSealer(keyring), keyring=keyring)
    assert tier.usage() is not None  # the baseline of the server's eviction count

    addresses = [_address(i) for i in range(320)]  # 20 MiB of blocks into 8 MiB
    for index, address in enumerate(addresses):
        manager.store(address, _block(index))
    usage = tier.usage()

    held = tier.contains(addresses)
    assert 0 < sum(held) < len(addresses) and held[-1]  # blocks were evicted; the last write held
    assert int(kv_admin.info("stats")["evicted_keys"]) > 0
    # Redis's LRU clock ticks once a second: which blocks of one second go is its sampling's
    # choice; what never goes is a key without a TTL (the scope's byte counts).
    assert kv_admin.exists("kv:used:" + SCOPE, "kv:sizes:" + SCOPE) == 2
    assert usage is not None and usage.capacity_bytes == 8 << 20 and (usage.evictions or 0) > 0
    assert usage.used_bytes <= (8 << 20) + 2 * BLOCK_BYTES  # Redis evicts before each write
    evictions = [e for e in manager.take_events() if e.kind is TierEventKind.EVICTION]
    assert evictions and evictions[0].tier is Tier.REDIS
    assert sum(e.num_blocks for e in evictions) == usage.evictions
    # Tenant state and the scope's data key live in the state Redis, never evicted by KV.
    assert state_client.get("zumik:tenant:probe") == b"tenant state"
    assert state_client.get(keyring_key(SCOPE)) is not None and kv_admin.get(keyring_key(SCOPE)) is None
    # What is still held opens with the key from the state Redis.
    kept = [index for index, found in enumerate(held) if found][-5:]
    restored = manager.load_prefix([addresses[index] for index in kept])
    assert list(restored.values) == [_block(index) for index in kept]


@pytest.mark.redis
def test_a_scope_count_forgets_evicted_blocks_before_refusing(servers: Any) -> None:
    """12.5 MiB of blocks into an 8 MiB server under a 9 MiB limit: counting every block ever
    stored would refuse the scope from the 145th block on, although the server evicted most of
    them. The count never falls below what the server holds."""
    state, kv = servers
    kv_admin = redis.Redis.from_url(kv.admin_url)
    kv_admin.flushall()
    limit = 9 << 20
    tier = RedisTier(kv_client(kv), scope_max_bytes=limit)
    stored = [tier.store(_address(index), _block(index)) for index in range(200)]
    assert all(stored) and int(kv_admin.info("stats")["evicted_keys"]) > 0
    held = sum(BLOCK_BYTES for found in tier.contains([_address(i) for i in range(200)]) if found)
    assert held <= tier.scope_bytes(SCOPE) <= limit


@pytest.mark.redis
def test_a_tenant_limit_in_the_state_redis_applies_to_the_kv_redis(servers: Any) -> None:
    state, kv = servers
    redis.Redis.from_url(kv.admin_url).flushall()
    scope = ScopeId("fedcba9876543210")
    redis.Redis.from_url(state.url).set(f"kv:limit:{scope}", str(2 * BLOCK_BYTES + 100))
    tier = RedisTier(kv_client(kv), scope_max_bytes=None, limits=kv_client(state))
    assert [tier.store(_address(i, scope), _block(i)) for i in range(3)] == [True, True, False]


@pytest.mark.redis
def test_a_restore_reads_each_run_with_one_redis_command(servers: Any, tmp_path: Path) -> None:
    state, kv = servers
    kv_admin = redis.Redis.from_url(kv.admin_url)
    kv_admin.flushall()
    config = {
        "compat_digest": COMPAT, "redis_url": kv.kv_access.url, "keyring_redis_url": state.kv_access.url,
        "redis_password_file": str(kv.kv_access.password_file), "seal": True,
        "host_capacity_bytes": 1 << 20, "shm_root": str(tmp_path / "shm"),
    }  # fmt: skip
    manager = build_manager(config)
    addresses = [_address(i) for i in range(24)]
    for index, address in enumerate(addresses):
        manager.store(address, _block(index, 4096))
    host = next(t for t in manager.tiers if t.tier is Tier.HOST)
    host.remove(addresses)  # only Redis holds them now
    kv_admin.config_resetstat()

    restored = manager.load_prefix(addresses)
    assert restored.num_blocks == 24 and set(restored.sources) == {Tier.REDIS}
    calls = {name: stats["calls"] for name, stats in kv_admin.info("commandstats").items()}
    assert calls.pop("cmdstat_mget") == 1  # 24 blocks, one round trip
    assert not {"cmdstat_get", "cmdstat_exists"} & set(calls)

    kv_admin.config_resetstat()  # the planned walk too: one MGET per run of one tier
    assert len(manager.load(KvPlan(tuple(addresses), (Tier.REDIS,) * 24))) == 24
    calls = {name: stats["calls"] for name, stats in kv_admin.info("commandstats").items()}
    assert calls.get("cmdstat_mget") == 1 and "cmdstat_get" not in calls


def test_disk_tier_stays_within_its_budget_least_recently_used_first(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "kv", capacity_bytes=3 * 4096 + 100)
    addresses = [_address(i) for i in range(5)]
    for index in range(3):
        assert disk.store(addresses[index], _block(index, 4096))
    assert disk.load(addresses[0]) == _block(0, 4096)  # block 1 is now the least recently used
    assert disk.store(addresses[3], _block(3, 4096))
    assert disk.contains(addresses[:4]) == [True, False, True, True]
    assert disk.store(addresses[4], _block(4, 4096))
    assert disk.contains(addresses) == [True, False, False, True, True]
    files = list((tmp_path / "kv").rglob("*.kv"))
    assert disk.used_bytes == sum(path.stat().st_size for path in files) <= 3 * 4096 + 100
    events = disk.take_events()
    assert [(e.kind, e.num_blocks) for e in events] == [(TierEventKind.EVICTION, 1)] * 2
    usage = disk.usage()
    assert usage is not None and usage.capacity_bytes == 3 * 4096 + 100
    assert not disk.store(_address(9), _block(9, 4 * 4096))  # larger than the whole budget
    disk.remove_scope(SCOPE)
    assert disk.used_bytes == 0  # a purge gives the bytes back


def _store_many(root: str, capacity: int, first: int, count: int, barrier: Any) -> None:
    tier = SharedMemoryTier(Path(root), capacity)  # each process's own view, made before any store
    barrier.wait()
    for index in range(first, first + count):
        tier.store(_address(index), _block(index, 4096))


def test_host_budget_is_per_node_across_processes(tmp_path: Path) -> None:
    """Two engine processes storing at once stay within one budget together; with a budget per
    process they would hold twice as much."""
    capacity = 10 * 4096 + 500
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_store_many, args=(str(tmp_path), capacity, first, 16, barrier))
        for first in (0, 100)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    files = list(tmp_path.rglob("*.kv"))
    held = sum(path.stat().st_size for path in files)
    assert held <= capacity and len(files) == 10
    assert SharedMemoryTier(tmp_path, capacity).used_bytes == held  # the node's ledger is exact


class _BlockingTier(DiskTier):
    """A disk tier whose stores wait for ``release`` (a slow or hung medium)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.entered = threading.Event()

    def store_many(self, blocks: Sequence[tuple[BlockAddress, bytes]], *, sealed: bool = False) -> list[bool]:
        self.entered.set()
        self.release.wait()
        return super().store_many(blocks, sealed=sealed)


def _batch(first: int, count: int, size: int = 1000) -> StoreBatch:
    addresses = tuple(_address(i) for i in range(first, first + count))
    return StoreBatch(addresses, count * size, lambda index: _block(first + index, size))


def test_stores_queue_behind_a_blocked_tier_and_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    tier = _BlockingTier(tmp_path)
    manager = TierManager([tier])
    writer = WriteBehind(manager, max_pending_bytes=5000, usage_every_s=None)
    assert writer.submit(_batch(0, 2))  # taken; the writer thread now waits inside the tier
    assert tier.entered.wait(timeout=60)
    assert writer.submit(_batch(2, 3))  # returns although the tier is blocked: 5000 bytes queued
    assert not writer.submit(_batch(5, 1))  # no room: dropped at once, not waited for
    assert writer.pending_bytes == 5000
    dropped = [e for e in manager.take_events() if e.kind is TierEventKind.DROPPED]
    assert [(e.tier, e.num_blocks, e.num_bytes) for e in dropped] == [(Tier.ENGINE, 1, 1000)]

    tier.release.set()
    assert writer.flush(timeout_s=60)
    assert tier.contains([_address(i) for i in range(6)]) == [True] * 5 + [False]
    assert writer.pending_bytes == 0
    assert writer.close() == 0


def test_close_counts_what_it_could_not_write(tmp_path: Path) -> None:
    tier = _BlockingTier(tmp_path)
    manager = TierManager([tier])
    writer = WriteBehind(manager, max_pending_bytes=10_000, usage_every_s=None)
    writer.submit(_batch(0, 1))
    assert tier.entered.wait(timeout=60)
    writer.submit(_batch(1, 4))
    assert writer.close(timeout_s=0.0) == 4  # the queued batch; the one in the tier still finishes
    assert not writer.submit(_batch(5, 1))  # closed: nothing more is taken
    tier.release.set()
    dropped = [e for e in manager.take_events() if e.kind is TierEventKind.DROPPED]
    assert sum(e.num_blocks for e in dropped) == 5


def test_promotions_and_new_blocks_go_to_their_policies_tiers(tmp_path: Path) -> None:
    host, disk = SharedMemoryTier(tmp_path / "shm", 1 << 20), DiskTier(tmp_path / "disk")
    manager = TierManager([host, disk])
    value = encode_block({"kv": np.ones((2, 8), dtype=np.uint8)}, _address(0))
    manager.store(_address(0), value, source=Tier.DISK)  # a promotion: nearer tiers only
    assert host.contains([_address(0)]) == [True] and disk.contains([_address(0)]) == [False]
    writer = WriteBehind(manager, max_pending_bytes=1 << 20, usage_every_s=0.0)
    writer.submit(StoreBatch((_address(1),), len(value), lambda _: value))  # a new block: every tier
    assert writer.flush(timeout_s=60)
    assert host.contains([_address(1)]) == [True] and disk.contains([_address(1)]) == [True]
    writer.close()
    assert any(u.tier is Tier.HOST and u.used_bytes == 2 * len(value) for u in writer.usage)


def test_connector_stats_keep_the_latest_occupancy_and_sum_drops() -> None:
    pytest.importorskip("vllm")
    from kvstore.connector import ZumikKVConnectorStats
    from kvstore.tier import TierUsage

    first = ZumikKVConnectorStats(data={}).record([TierEvent(TierEventKind.DROPPED, Tier.ENGINE, 2, 20)])
    first.record_usage([TierUsage(Tier.HOST, 100, 1000)])
    second = ZumikKVConnectorStats(data={}).record([TierEvent(TierEventKind.DROPPED, Tier.ENGINE, 1, 10)])
    second.record_usage([TierUsage(Tier.HOST, 300, 1000), TierUsage(Tier.REDIS, 7, None)])
    assert first.aggregate(second).reduce() == {
        "dropped:engine_blocks": 3, "dropped:engine_bytes": 30,
        "usage:host_used_bytes": 300, "usage:host_capacity_bytes": 1000,
        "usage:redis_used_bytes": 7, "usage:redis_capacity_bytes": 0,
    }  # fmt: skip


@pytest.mark.redis
def test_engines_and_the_purge_sweep_use_the_kv_redis_and_keys_stay_in_the_state_redis(
    servers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvstore.tiers.build import build_tiers
    from profiles import load_builtin
    from zumik_serve.engines.vllm_config import kv_transfer_config
    from zumik_serve.home import ZumikHome

    state, kv = servers
    monkeypatch.setenv("ZUMIK_SECRETS_DIR", str(state.secrets_folder))
    profile = load_builtin("local-cpu")
    config = kv_transfer_config(
        profile, compat_digest=COMPAT, redis_url=state.url, home_root=ZumikHome(tmp_path).root,
        kv_redis_url=kv.url,
    )  # fmt: skip
    assert config is not None
    extra = {**config["kv_connector_extra_config"], "shm_root": str(tmp_path / "shm")}
    assert extra["redis_url"] == kv.kv_access.url and extra["keyring_redis_url"] == state.kv_access.url
    assert extra["disk_capacity_bytes"] == profile.kv_tiers.disk_capacity_bytes
    assert extra["write_behind_max_bytes"] == profile.kv_tiers.write_behind_max_bytes

    kv_admin, state_admin = redis.Redis.from_url(kv.admin_url), redis.Redis.from_url(state.admin_url)
    kv_admin.flushall()
    manager = build_manager(extra)  # what an engine builds
    manager.store(_address(0), _block(0, 4096))
    block_key = RedisTier.redis_key(_address(0))
    assert kv_admin.exists(block_key) == 1 and state_admin.exists(block_key) == 0
    assert state_admin.exists(keyring_key(SCOPE)) == 1 and kv_admin.exists(keyring_key(SCOPE)) == 0

    swept = {tier.tier: tier.remove_scope(SCOPE) for tier in build_tiers(extra)}  # the purge's sweep
    assert swept[Tier.REDIS] == 1 and kv_admin.exists(block_key) == 0


def test_the_local_stack_starts_a_bounded_kv_redis_for_a_profile_with_a_redis_tier(tmp_path: Path) -> None:
    from profiles import load_builtin
    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.home import ZumikHome

    profile = load_builtin("local-cpu")
    stack = LocalStack(StackConfig(profile=profile, home=ZumikHome(tmp_path / "home").ensure()))
    messages: list[str] = []
    stack._ensure_kv_redis(profile, messages.append)
    try:
        assert stack.kv_redis is not None and stack.kv_redis_url == stack.kv_redis.url
        admin = redis.Redis.from_url(stack.kv_redis.admin_url)
        assert admin.config_get("maxmemory") == {"maxmemory": str(profile.kv_tiers.redis_max_memory_bytes)}
        assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
    finally:
        stack.stop()  # never the Ray/Serve of this process (a full run's shared stack): not its own
    assert stack.kv_redis is None


def test_wait_for_save_copies_out_in_the_step_and_never_waits_on_a_tier(tmp_path: Path) -> None:
    """The step's blocks are copied out before ``wait_for_save`` returns (vLLM may overwrite
    them right after), while the tier store happens later on the writer thread (the thread: its
    tier here blocks in this process; ``test_kv_store_process`` stops a store process); a step
    whose blocks find the queue full drops them, counted, and still returns."""
    pytest.importorskip("vllm")
    import torch

    from kvstore.codec import decode_block
    from kvstore.connector import ZumikConnectorMetadata, ZumikKVConnector, _Transfer
    from kvstore.transfer import BlockCopier

    caches = {f"layer{j}": torch.randn(16, 2, 8, 32).to(torch.bfloat16) for j in range(2)}
    original = {name: cache[3:5].clone() for name, cache in caches.items()}
    tier = _BlockingTier(tmp_path)
    manager = TierManager([tier])
    block_bytes = sum(cache[0].numel() * 2 for cache in caches.values())
    worker = ZumikKVConnector.__new__(ZumikKVConnector)
    first = ZumikConnectorMetadata(stores=[_Transfer("r", [3, 4], [_address(0), _address(1)])])
    worker.__dict__.update(
        _kv_caches=caches, _copier=BlockCopier(caches, 16), _manager=manager, _writer=None,
        _extra={"write_behind_max_bytes": 3 * block_bytes, "write_behind_process": False},
        _connector_metadata=first,
    )  # fmt: skip
    worker.wait_for_save()  # returns although the tier will block
    assert tier.entered.wait(timeout=60)
    for cache in caches.values():
        cache[3:5].zero_()  # vLLM reuses the blocks once the step ends
    worker.__dict__["_connector_metadata"] = ZumikConnectorMetadata(
        stores=[_Transfer("r2", [5, 6], [_address(2), _address(3)])]
    )
    worker.wait_for_save()  # 2 more blocks do not fit beside the 2 queued: dropped, not waited for
    dropped = [e for e in manager.take_events() if e.kind is TierEventKind.DROPPED]
    assert [(e.num_blocks, e.num_bytes) for e in dropped] == [(2, 2 * block_bytes)]

    tier.release.set()
    worker.shutdown()  # writes what is queued
    for index in range(2):
        value = tier.load(_address(index))
        assert value is not None
        tensors = decode_block(value, _address(index))
        assert tensors is not None
        for name in caches:
            expected = original[name][index].contiguous().view(torch.uint8).numpy().tobytes()
            assert tensors[name].tobytes() == expected  # the bytes of the step, not the reused block
    assert tier.contains([_address(2), _address(3)]) == [False, False]
