"""RedisTier: blocks shared by every node of a region, ``kv:{compat digest}:{scope}:{key}`` → value.

An unreachable Redis is a miss plus a failure event (the engine recomputes), never an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from redis.exceptions import RedisError

from kvstore.keys import ScopeId
from kvstore.tier import BlockAddress, Tier, TierEvent, TierEventKind


class RedisTier:
    tier = Tier.REDIS

    def __init__(self, client: redis.Redis, *, ttl_s: int | None = 7 * 24 * 3600) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._events: list[TierEvent] = []

    @staticmethod
    def redis_key(address: BlockAddress) -> str:
        return f"kv:{address.compat_digest}:{address.scope}:{address.key}"

    def contains(self, addresses: Sequence[BlockAddress]) -> list[bool]:
        if not addresses:
            return []
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for address in addresses:
                    pipe.exists(self.redis_key(address))
                return [bool(found) for found in pipe.execute()]
        except RedisError as exc:
            self._failure(len(addresses), exc)
            return [False] * len(addresses)

    def load(self, address: BlockAddress) -> bytes | None:
        try:
            value = self._redis.get(self.redis_key(address))
        except RedisError as exc:
            self._failure(1, exc)
            return None
        return value if isinstance(value, bytes) else None

    def store(self, address: BlockAddress, value: bytes) -> bool:
        try:
            self._redis.set(self.redis_key(address), value, ex=self._ttl_s)
        except RedisError as exc:
            self._failure(1, exc)
            return False
        return True

    def remove(self, addresses: Sequence[BlockAddress]) -> int:
        if not addresses:
            return 0
        try:
            return int(self._redis.delete(*(self.redis_key(address) for address in addresses)))
        except RedisError as exc:
            self._failure(len(addresses), exc)
            return 0

    def remove_scope(self, scope: ScopeId) -> int:
        removed = 0
        batch: list[bytes] = []
        for key in self._redis.scan_iter(match=f"kv:*:{scope}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += int(self._redis.unlink(*batch))
                batch = []
        if batch:
            removed += int(self._redis.unlink(*batch))
        return removed

    def take_events(self) -> list[TierEvent]:
        events, self._events = self._events, []
        return events

    def _failure(self, num_blocks: int, exc: Exception) -> None:
        self._events.append(TierEvent(TierEventKind.FAILURE, self.tier, num_blocks, 0, type(exc).__name__))
