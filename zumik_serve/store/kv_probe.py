"""KvProbe: which of a prompt's blocks the Redis KV tier holds, as seen from a gateway.

It computes the same block keys the engines' connector uses (compat digest, the tenant's cache
salt, the block size) and asks Redis, one pipelined round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvstore.keys import chain_block_keys, scope_id, seed_from_digest
from kvstore.tier import BlockAddress
from kvstore.tiers.redis_tier import RedisTier


class KvProbe:
    def __init__(self, client: aioredis.Redis, *, compat_digest: str, block_size: int) -> None:
        self._redis = client
        self.compat_digest = compat_digest
        self.block_size = block_size

    def addresses(
        self, token_ids: Sequence[int], cache_salt: str, *, shard: str | None = None
    ) -> list[BlockAddress]:
        """The blocks' addresses under ``shard``: the digest an engine's rank 0 files blocks
        under (``kvstore.layout.shard_digest``: it names the engine's KV layout, which only the
        engine knows), as the connector reports it in ``zumik_kv``; the compat digest if None."""
        keys = chain_block_keys(token_ids, self.block_size, seed_from_digest(self.compat_digest, cache_salt))
        scope = scope_id(cache_salt)
        return [BlockAddress(shard or self.compat_digest, key, scope) for key in keys]

    async def count_in_redis(self, addresses: Sequence[BlockAddress]) -> int | None:
        """How many of ``addresses`` the Redis tier holds; None when Redis cannot answer."""
        if not addresses:
            return 0
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for address in addresses:
                    pipe.exists(RedisTier.redis_key(address))
                return sum(int(found) for found in await pipe.execute())
        except RedisError:
            return None
