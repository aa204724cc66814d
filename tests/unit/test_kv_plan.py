"""The scheduler's walk (``TierManager.plan``) on real tiers: host (shared memory), a real
redis-server, disk. It runs on every new request in vLLM's scheduler, so what it asks is counted.

Invariants held here:
- a prompt whose first block no tier holds costs one lookup per tier, of that block alone: the
  server looks up no later block (its command counts), and no file tier checks one;
- a prefix spread across tiers is still found whole, each block from the nearest tier holding
  it, and a gap in Redis that the disk fills does not end it;
- a prefix the host tier holds costs no Redis command; one only Redis holds, one round trip;
- file tiers are never asked about a block past the end of the prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvstore.keys import chain_block_keys, seed_from_digest
from kvstore.manager import TierManager
from kvstore.tier import BlockAddress, Tier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.shared_memory import SharedMemoryTier
from zumik_serve.store.local_redis import LocalRedis

pytestmark = pytest.mark.redis

DIGEST = "d" * 64
VALUE = b"block-bytes"


class _CountedHost(SharedMemoryTier):
    """The real host tier, counting the blocks the walk checks."""

    checked: list[BlockAddress]

    def holds(self, address: BlockAddress) -> bool:
        self.checked.append(address)
        return super().holds(address)


class _CountedDisk(DiskTier):
    """The real disk tier, counting the blocks the walk checks."""

    checked: list[BlockAddress]

    def holds(self, address: BlockAddress) -> bool:
        self.checked.append(address)
        return super().holds(address)


class _Tiers:
    def __init__(self, root: Path, server: LocalRedis) -> None:
        access = server.kv_access  # the engines' own Redis user, as in production
        assert access.password_file is not None
        tier_client = redis.Redis.from_url(access.url, password=access.password_file.read_text())
        self.admin = redis.Redis.from_url(server.admin_url)
        self.host = _CountedHost(root / "shm", 1 << 24)
        self.redis = RedisTier(tier_client)
        self.disk = _CountedDisk(root / "disk", 1 << 24)
        self.host.checked, self.disk.checked = [], []
        self.manager = TierManager([self.disk, self.redis, self.host])

    def redis_calls(self) -> dict[str, int]:
        """Calls of each command the server ran so far (those a script ran included)."""
        stats = self.admin.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}


@pytest.fixture
def tiers(tmp_path: Path, module_redis: LocalRedis) -> Iterator[_Tiers]:
    made = _Tiers(tmp_path, module_redis)
    made.admin.flushall()
    made.manager.plan(_addresses("warm-up"))  # a process's first walk connects and loads the script
    made.host.checked.clear()
    made.disk.checked.clear()
    yield made
    made.admin.close()


def _addresses(prompt: str, count: int = 8) -> list[BlockAddress]:
    keys = chain_block_keys(list(range(32 * count)), 32, seed_from_digest(DIGEST, prompt))
    return [BlockAddress(DIGEST, key) for key in keys]


def _new_calls(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: calls - before.get(name, 0) for name, calls in after.items() if calls > before.get(name, 0)}


def test_plan_without_the_first_block_looks_up_that_block_alone(tiers: _Tiers) -> None:
    addresses = _addresses("miss")
    for address in addresses[1:]:  # every tier holds every block but the first
        tiers.host.store(address, VALUE)
        tiers.redis.store(address, VALUE)
        tiers.disk.store(address, VALUE)
    before = tiers.redis_calls()
    plan = tiers.manager.plan(addresses)
    calls = _new_calls(before, tiers.redis_calls())
    assert plan.num_blocks == 0
    assert calls.pop("exists") == 1  # the first block's, and no other
    assert calls.pop("evalsha") == 1  # one round trip (and the count's own INFO)
    assert set(calls) <= {"info"}
    assert tiers.host.checked == [addresses[0]] and tiers.disk.checked == [addresses[0]]


def test_plan_finds_a_prefix_spread_across_tiers_whole(tiers: _Tiers) -> None:
    addresses = _addresses("spread")
    layout = {0: "host", 1: "redis", 2: "disk", 3: "host", 4: "redis", 5: "disk", 6: "redis", 7: "host"}
    for index, where in layout.items():
        getattr(tiers, where).store(addresses[index], VALUE)
    tiers.disk.store(addresses[1], VALUE)  # farther copies never replace a nearer source
    tiers.redis.store(addresses[3], VALUE)
    plan = tiers.manager.plan(addresses)
    by_name = {"host": Tier.HOST, "redis": Tier.REDIS, "disk": Tier.DISK}
    assert plan.sources == tuple(by_name[layout[index]] for index in range(8))
    assert plan.addresses == tuple(addresses)


def test_plan_past_a_redis_gap_the_disk_fills_asks_redis_again(tiers: _Tiers) -> None:
    addresses = _addresses("gap")
    tiers.disk.store(addresses[0], VALUE)
    for address in addresses[1:5]:
        tiers.redis.store(address, VALUE)
    tiers.disk.store(addresses[6], VALUE)  # past the gap at 5: never checked
    before = tiers.redis_calls()
    plan = tiers.manager.plan(addresses)
    calls = _new_calls(before, tiers.redis_calls())
    assert plan.sources == (Tier.DISK, *[Tier.REDIS] * 4)
    assert calls["exists"] == 1 + 7  # the first block alone, then every block from the second on
    assert tiers.disk.checked == [addresses[0], addresses[5]]  # nothing past the prefix's end


def test_plan_of_a_prefix_the_host_holds_sends_redis_nothing(tiers: _Tiers) -> None:
    addresses = _addresses("host")
    for address in addresses:
        tiers.host.store(address, VALUE)
        tiers.redis.store(address, VALUE)
    before = tiers.redis_calls()
    plan = tiers.manager.plan(addresses)
    assert plan.sources == (Tier.HOST,) * 8
    assert set(_new_calls(before, tiers.redis_calls())) <= {"info"}
    assert tiers.disk.checked == []


def test_plan_of_a_prefix_only_redis_holds_is_one_round_trip(tiers: _Tiers) -> None:
    addresses = _addresses("redis")
    for address in addresses[:6]:
        tiers.redis.store(address, VALUE)
    before = tiers.redis_calls()
    plan = tiers.manager.plan(addresses)
    calls = _new_calls(before, tiers.redis_calls())
    assert plan.sources == (Tier.REDIS,) * 6
    assert calls.get("evalsha") == 1 and calls["exists"] == 8  # one script, every block in it
    assert tiers.disk.checked == [addresses[6]]  # the block that ends the prefix
