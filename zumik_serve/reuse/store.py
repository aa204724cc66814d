"""Reuse in Redis: the opportunity index and the reuse ledger, scoped by tenant.

    zumik:seen:{scope}:{compat16}   sorted set of prefix block keys seen in one isolation scope
                                    (score: last seen, unix seconds); entries older than the TTL
                                    and beyond ``max_entries`` (oldest first) are dropped, so its
                                    memory is bounded; shared by every gateway replica
    z:{tenant}:reuse:{minute}       hash: "<profile>|<snapshot>|<route>|<figure>" → count, for
                                    figures opportunity:estimated, captured:<level>, prompt,
                                    requests (kept 8 days)

Looking a prompt up and recording it is one round trip (``SEEN``): the walk counts the leading
keys already present, stops at the first gap (a later block is only reusable after every block
before it), then records every key.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis.asyncio as aioredis

LEDGER_TTL_S = 8 * 24 * 3600
BUCKET_S = 60
SEEN_TTL_S = 3600
SEEN_MAX_ENTRIES = 200_000

# KEYS: index. ARGV: now, ttl, max entries, key... Returns the leading keys already present.
SEEN = """
local now, ttl, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local matched, walking = 0, true
for i = 4, #ARGV do
  if walking and redis.call('ZSCORE', KEYS[1], ARGV[i]) then matched = matched + 1 else walking = false end
end
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
local size = redis.call('ZCARD', KEYS[1])
if size > cap then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, size - cap - 1) end
redis.call('EXPIRE', KEYS[1], ttl)
return matched
"""


def seen_key(scope: str, compat_digest: str) -> str:
    return f"zumik:seen:{scope}:{compat_digest[:16]}"


class RedisReuseStore:
    def __init__(
        self, client: aioredis.Redis, *, seen_ttl_s: int = SEEN_TTL_S, max_entries: int = SEEN_MAX_ENTRIES
    ):
        self._redis = client
        self._ttl_s = seen_ttl_s
        self._max_entries = max_entries

    async def seen_prefix_blocks(self, scope: str, compat_digest: str, keys: Sequence[str]) -> int:
        """How many leading ``keys`` this scope has seen before; records them all as seen now."""
        if not keys:
            return 0
        now = int(time.time())
        args: list[str | int] = [now, self._ttl_s, self._max_entries, *keys]
        return int(await self._redis.eval(SEEN, 1, seen_key(scope, compat_digest), *args))

    async def record(
        self, tenant: str, group: str, counts: dict[str, int], *, now_s: int | None = None
    ) -> None:
        bucket = (int(time.time()) if now_s is None else now_s) // BUCKET_S
        key = f"z:{{{tenant}}}:reuse:{bucket}"
        async with self._redis.pipeline(transaction=True) as pipe:
            for figure, value in counts.items():
                pipe.hincrby(key, f"{group}|{figure}", value)
            pipe.expire(key, LEDGER_TTL_S)
            await pipe.execute()

    async def window(self, tenant: str, window_s: int, *, now_s: int | None = None) -> dict[str, int]:
        """Every ledger field summed over the last ``window_s`` seconds (whole minutes)."""
        totals: dict[str, int] = {}
        for _, fields in await self.buckets(tenant, window_s, now_s=now_s):
            for name, value in fields.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    async def buckets(
        self, tenant: str, window_s: int, *, now_s: int | None = None
    ) -> list[tuple[int, dict[str, int]]]:
        """The ledger minute by minute over the last ``window_s`` seconds: (start, fields)."""
        newest = (int(time.time()) if now_s is None else now_s) // BUCKET_S
        oldest = newest - max(1, -(-window_s // BUCKET_S)) + 1
        async with self._redis.pipeline(transaction=False) as pipe:
            for bucket in range(oldest, newest + 1):
                pipe.hgetall(f"z:{{{tenant}}}:reuse:{bucket}")
            replies = await pipe.execute()
        result = []
        for bucket, fields in zip(range(oldest, newest + 1), replies, strict=True):
            decoded = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in fields.items()}
            result.append((bucket * BUCKET_S, decoded))
        return result

    async def forget_scopes(self, scopes: Sequence[str]) -> int:
        """Remove the opportunity index of purged scopes."""
        removed = 0
        for scope in scopes:
            async for key in self._redis.scan_iter(match=f"zumik:seen:{scope}:*", count=1000):
                removed += int(await self._redis.unlink(key))
        return removed
