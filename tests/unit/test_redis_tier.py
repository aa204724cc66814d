"""RedisTier on a real redis-server: values round-trip; an unreachable Redis is a miss plus a
failure event, never an exception."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from kvstore.keys import BlockKey
from kvstore.manager import TierManager
from kvstore.tier import BlockAddress, TierEventKind
from kvstore.tiers.redis_tier import RedisTier
from zumik_serve.store.local_redis import LocalRedis

pytestmark = pytest.mark.redis

ADDRESS = BlockAddress("c" * 64, BlockKey("0" * 32))


def test_redis_tier_round_trip_and_outage(tmp_path: Path) -> None:
    server = LocalRedis(data_dir=tmp_path).start()
    tier = RedisTier(redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1))
    try:
        assert tier.store(ADDRESS, b"block-bytes")
        assert tier.contains([ADDRESS]) == [True]
        assert tier.load(ADDRESS) == b"block-bytes"
    finally:
        server.stop()
    manager = TierManager([tier])
    assert manager.plan([ADDRESS]).num_blocks == 0  # Redis is gone: a miss
    assert tier.load(ADDRESS) is None and not tier.store(ADDRESS, b"x")
    assert any(event.kind is TierEventKind.FAILURE for event in manager.take_events())
