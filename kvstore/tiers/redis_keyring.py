"""RedisKeyring: the data key of each isolation scope, kept in Redis (the ``Keyring`` protocol).

    kvkey:{scope}   32 random bytes (the scope's AES-GCM data key), or DESTROYED once purged

A destroyed key is a tombstone, not a missing key: nothing may create a new key for a purged
scope (an in-flight request of the old scope would otherwise seal fresh blocks readable again).
Engine processes cache keys for ``cache_ttl_s``; a purge waits that long after destroying a key
before it counts the scope as closed. Destroying the key in Redis is a real erase only once the
AOF is rewritten without it (the purge does that and says so in its receipt).
"""

from __future__ import annotations

import secrets
import time

import redis
from redis.exceptions import RedisError

from kvstore.keys import ScopeId

DESTROYED = b"destroyed"
TOMBSTONE_TTL_S = 90 * 24 * 3600
KEY_CACHE_TTL_S = 1.0


def keyring_key(scope: str) -> str:
    return f"kvkey:{scope}"


class RedisKeyring:
    def __init__(self, client: redis.Redis, *, cache_ttl_s: float = KEY_CACHE_TTL_S) -> None:
        self._redis = client
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[bytes | None, float]] = {}

    def data_key(self, scope: ScopeId, *, create: bool) -> bytes | None:
        value = self._lookup(scope, create=create)
        return None if value is None or value == DESTROYED else value

    def is_destroyed(self, scope: ScopeId) -> bool:
        return self._lookup(scope, create=False) == DESTROYED

    def destroy(self, scope: ScopeId) -> None:
        """Replace the scope's key by a tombstone (raises when Redis cannot be reached)."""
        self._redis.set(keyring_key(scope), DESTROYED, ex=TOMBSTONE_TTL_S)
        self._cache.pop(scope, None)

    def _lookup(self, scope: ScopeId, *, create: bool) -> bytes | None:
        now = time.monotonic()
        cached = self._cache.get(scope)
        if cached is not None and cached[1] > now and (cached[0] is not None or not create):
            return cached[0]
        try:
            if create:
                self._redis.set(keyring_key(scope), secrets.token_bytes(32), nx=True)
            raw = self._redis.get(keyring_key(scope))
        except RedisError:
            return None
        value = raw if isinstance(raw, bytes) else None
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[scope] = (value, now + self._cache_ttl_s)
        return value
