"""RedisTier: blocks shared by every node of a region, ``kv:{compat digest}:{scope}:{key}`` → value.

An unreachable Redis is a miss plus a failure event (the engine recomputes), never an error.

Each scope's bytes are counted, in the same script that stores or removes a block (a store
first SETs the value under an incoming key, in the same round trip, and the script renames it
onto the block once counted: a batch of blocks is one round trip, ``store_many``):

    kv:used:{scope}     bytes of the scope's blocks held now (every compat key)
    kv:sizes:{scope}    hash  block key → its value's size
    kv:expiry:{scope}   zset  block key → when its TTL ends (a store first forgets the blocks
                        whose TTL ended, so the count follows Redis' own expiry)
    kv:limit:{scope}    the tenant's own limit ("unlimited" or bytes), published by the gateway
                        (``zumik_serve/qos/store.py``) when the tenant has an override
    kv:incoming:{token}:{n}  a value on its way to its block (renamed or deleted by the
                        script; one whose writer was cut off expires in ``INCOMING_TTL_S``)

With a limit (the scope's own, else ``scope_max_bytes``: the profile's ``quota.kv_bytes``), a
block that would take its scope past it is not stored: ``store`` answers False, like a full
tier, and the engine recomputes that block when it needs it again. These keys end with the
scope, so the scope pattern of ``remove_scope`` (``kv:*:{scope}:*``) does not count them as
blocks; it removes them with the blocks. ``remove_scopes`` sweeps many scopes (every salt
epoch a tenant has had) in one ``SCAN`` of ``kv:*``.

The KV Redis is its own server, bounded by ``maxmemory`` with ``volatile-lru`` (the embedded one:
``store/local_redis.py``; tenant state stays in a ``noeviction`` server and is never evicted
by KV): every block carries a TTL, so any block can be evicted, and the counts above carry
none, so they never are. The server may then evict blocks the counts still hold: each store
forgets those among 4 counted blocks picked at random, and a store that would pass the limit
first forgets them among 256, then decides.
Limits live in the state Redis (the gateway publishes them there); with ``limits`` set, the
tier reads ``kv:limit:{scope}`` from it (cached ``LIMIT_CACHE_TTL_S``) and hands it to the
script. The scheduler's lookup of a prompt's blocks is one round trip that looks past the first
block only when it is held (``contains_if_first``). Loads of a run of blocks are one ``MGET``:
one round trip. A restore's ``MGET`` (``load_views``) reads its reply off the connection into
one buffer the tier reuses (``MgetReader``): redis-py would make a fresh object of every value,
and on this 2-core machine that allocation (fresh pages for every 128 KiB value) took more than
half of a restore's time.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence

import redis
from redis.exceptions import NoPermissionError, NoScriptError, RedisError, ResponseError

from kvstore.keys import ScopeId
from kvstore.tier import BlockAddress, Tier, TierEvent, TierEventKind, TierUsage
from kvstore.tiers.resp import MgetReader, send_commands

__all__ = ["MgetReader", "RedisTier", "scope_accounting_keys", "scope_limit_key"]

LIMIT_CACHE_TTL_S = 1.0
INCOMING_TTL_S = 300  # an incoming value no script took (its writer was cut off) goes by then

# KEYS, 6 a block: the block, its incoming key (where its value was just SET), then its scope's
# used, sizes, expiry, limit. ARGV: TTL in s ("" none), then 2 a block: its value's size, the
# default limit ("" none). Returns, a block, 1 when stored (the incoming key renamed onto the
# block's), 0 when the scope's limit refused it or its incoming value is gone (evicted): then
# only the incoming key changed (deleted). The values never pass through Lua: a 128 KiB
# argument cost the server about 0.2-0.4 ms in Lua, against 3 us for a SET.
STORE_COUNTED = """
local ttl = ARGV[1]
local now = tonumber(redis.call('TIME')[1])
-- Blocks the server evicted (maxmemory) are still counted: each store forgets those among a
-- few counted blocks (so the counts stay near what is held), a store over the limit among many.
local function forget_evicted(used_key, sizes, expiry, count)
  local sample = redis.call('HRANDFIELD', sizes, count, 'WITHVALUES')
  for index = 1, #sample, 2 do
    if redis.call('EXISTS', sample[index]) == 0 then
      redis.call('DECRBY', used_key, sample[index + 1])
      redis.call('HDEL', sizes, sample[index])
      redis.call('ZREM', expiry, sample[index])
    end
  end
end
local results = {}
for first = 1, #KEYS, 6 do
  local block, incoming, used_key, sizes, expiry, limit_key = unpack(KEYS, first, first + 5)
  local size = tonumber(ARGV[#results * 2 + 2])
  local limit = redis.call('GET', limit_key) or ARGV[#results * 2 + 3]
  if limit == 'unlimited' then limit = '' end
  local ended = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 1000)
  for _, member in ipairs(ended) do
    local ended_size = redis.call('HGET', sizes, member)
    if ended_size then
      redis.call('DECRBY', used_key, ended_size)
      redis.call('HDEL', sizes, member)
    end
    redis.call('ZREM', expiry, member)
  end
  forget_evicted(used_key, sizes, expiry, 4)
  if redis.call('EXISTS', sizes) == 0 then redis.call('DEL', used_key) end  -- (allkeys-lru) counts lost
  local old = tonumber(redis.call('HGET', sizes, block) or '0')
  local used = tonumber(redis.call('GET', used_key) or '0')
  local stored = 1
  if limit ~= '' and used - old + size > tonumber(limit) then
    forget_evicted(used_key, sizes, expiry, 256)
    old = tonumber(redis.call('HGET', sizes, block) or '0')
    used = tonumber(redis.call('GET', used_key) or '0')
    if used - old + size > tonumber(limit) then stored = 0 end
  end
  if stored == 1 and redis.call('EXISTS', incoming) == 0 then stored = 0 end
  if stored == 0 then
    redis.call('DEL', incoming)
  else
    redis.call('RENAME', incoming, block)
    if ttl ~= '' then
      redis.call('EXPIRE', block, ttl)
      redis.call('ZADD', expiry, now + tonumber(ttl), block)
    else
      redis.call('PERSIST', block)
    end
    redis.call('HSET', sizes, block, size)
    redis.call('INCRBY', used_key, size - old)
  end
  results[#results + 1] = stored
end
return results
"""

# KEYS: a prompt's blocks in order. Returns 0 when the first does not exist, having looked up no
# other (the scheduler's probe: most new prompts' first blocks are held nowhere), else 1 or 0 for
# each block.
CONTAINS_IF_FIRST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local held = {1}
for index = 2, #KEYS do held[index] = redis.call('EXISTS', KEYS[index]) end
return held
"""

# KEYS: used, sizes, expiry, then blocks of that scope. Returns how many blocks existed.
REMOVE_COUNTED = """
local removed = 0
for index = 4, #KEYS do
  local size = redis.call('HGET', KEYS[2], KEYS[index])
  if size then
    redis.call('DECRBY', KEYS[1], size)
    redis.call('HDEL', KEYS[2], KEYS[index])
    redis.call('ZREM', KEYS[3], KEYS[index])
  end
  removed = removed + redis.call('UNLINK', KEYS[index])
end
return removed
"""


def scope_accounting_keys(scope: ScopeId) -> list[str]:
    """used, sizes, expiry of ``scope``."""
    return [f"kv:used:{scope}", f"kv:sizes:{scope}", f"kv:expiry:{scope}"]


def scope_limit_key(scope: ScopeId) -> str:
    return f"kv:limit:{scope}"


class RedisTier:
    tier = Tier.REDIS

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: int | None = 7 * 24 * 3600,
        scope_max_bytes: int | None = None,
        limits: redis.Redis | None = None,
    ) -> None:
        """``limits``: the state Redis, where the gateway publishes ``kv:limit:{scope}``
        (None: the limits are in ``client``'s server, as when state and KV shared one)."""
        self._redis = client
        self._limits = limits
        self._ttl_s = ttl_s
        self.scope_max_bytes = scope_max_bytes
        self._incoming_token = secrets.token_hex(6)  # 12 characters: never a scope (16)
        self._incoming_ids = itertools.count()
        self._store = client.register_script(STORE_COUNTED)
        self._remove = client.register_script(REMOVE_COUNTED)
        self._contains_if_first = client.register_script(CONTAINS_IF_FIRST)
        self._events: deque[TierEvent] = deque()
        self._limit_cache: dict[ScopeId, tuple[str | None, float]] = {}
        self._evicted_keys: int | None = None  # the server's count at the last usage()
        self._usage_refused = False
        self._reader = MgetReader()

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

    def contains_if_first(self, addresses: Sequence[BlockAddress]) -> list[bool] | None:
        """``contains`` in one round trip (``CONTAINS_IF_FIRST``; a plain ``EXISTS`` for one
        address), or None when the first address is not held (or Redis cannot answer): then the
        server looked up no other."""
        if not addresses:
            return []
        try:
            if len(addresses) == 1:
                held = [bool(self._redis.exists(self.redis_key(addresses[0])))]
            else:
                reply = self._contains_if_first(keys=[self.redis_key(address) for address in addresses])
                held = [bool(flag) for flag in reply] if isinstance(reply, list) else [False]
        except RedisError as exc:
            self._failure(len(addresses), exc)
            return None
        return held if held[0] else None

    def load(self, address: BlockAddress) -> bytes | None:
        return self.load_many([address])[0]

    def load_many(self, addresses: Sequence[BlockAddress]) -> list[bytes | None]:
        if not addresses:
            return []
        try:
            values = self._redis.mget([self.redis_key(address) for address in addresses])
        except RedisError as exc:
            self._failure(len(addresses), exc)
            return [None] * len(addresses)
        return [value if isinstance(value, bytes) else None for value in values]

    def load_views(self, addresses: Sequence[BlockAddress]) -> Iterator[memoryview | None]:
        """``load_many`` into the tier's reused reply buffer (``MgetReader``), each value as
        soon as its bytes are in: the engine's restore decrypts and copies one into its cache
        while Redis still sends the next. Views valid until the next call; one caller at a
        time (the engine worker's step). A failure midway is one failure event and None for
        every value not read."""
        keys = [self.redis_key(address) for address in addresses]
        if not keys:
            return iter(())
        if not self._reader.usable(self._redis):  # not a plain redis.Redis: redis-py's own MGET
            return iter([None if value is None else memoryview(value) for value in self.load_many(addresses)])
        return self._views(keys)

    def _views(self, keys: list[str]) -> Generator[memoryview | None, None, None]:
        given = 0
        values = self._reader.each(self._redis, keys)
        try:
            for view in values:
                given += 1
                yield view
        except (RedisError, OSError, ValueError) as exc:
            self._failure(len(keys) - given, exc)
            yield from [None] * (len(keys) - given)
        finally:
            values.close()  # stopped midway: the reader closes the connection, its rest unread

    def prepare_restores(self, max_bytes: int) -> None:
        """Before the first restore (the engine's start): connect, and size the reply buffer
        for restores of up to ``max_bytes`` (``MgetReader.reserve``), so that a fresh engine's
        first restore pays for neither. An unreachable Redis is a failure event, as in a load."""
        try:
            self._redis.ping()
        except RedisError as exc:
            self._failure(0, exc)
        self._reader.reserve(max_bytes)

    def store(self, address: BlockAddress, value: bytes) -> bool:
        """Store the block and count it in its scope; False when Redis cannot be reached or the
        scope's limit would be passed."""
        return self.store_many([(address, value)])[0]

    def store_many(self, blocks: Sequence[tuple[BlockAddress, bytes]], *, sealed: bool = False) -> list[bool]:
        """``store`` for every block in one round trip: each value is SET under an incoming key
        of its own (``kv:incoming:...``, expiring in ``INCOMING_TTL_S``), then ``STORE_COUNTED``
        counts the blocks in order, as one ``store`` after another would, and renames each
        admitted value onto its block with the tier's TTL (a refused one is deleted). A reader
        never sees a refused block. ``sealed`` changes nothing here."""
        if not blocks:
            return []
        ttl = "" if self._ttl_s is None else str(self._ttl_s)
        default_limit = "" if self.scope_max_bytes is None else str(self.scope_max_bytes)
        try:
            scopes = {address.scope for address, _ in blocks}
            limits = {scope: self._scope_limit(scope) or default_limit for scope in scopes}
            keys: list[str] = []
            args: list[str | int] = [ttl]
            commands: list[tuple[str | int | bytes, ...]] = []
            for address, value in blocks:
                incoming = f"kv:incoming:{self._incoming_token}:{next(self._incoming_ids)}"
                commands.append(("SET", incoming, value, "EX", INCOMING_TTL_S))
                scope = address.scope
                keys += [self.redis_key(address), incoming, *scope_accounting_keys(scope)]
                keys.append(scope_limit_key(scope))
                args += [len(value), limits[scope]]
            commands.append(("EVALSHA", self._store.sha, len(keys), *keys, *args))
            replies = send_commands(self._redis, commands)
            if replies is None:  # a client of another kind: its own pipeline
                with self._redis.pipeline(transaction=False) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = pipe.execute(raise_on_error=False)
            counted = replies[-1]
            if isinstance(counted, NoScriptError):  # a restarted server: load it, count again
                counted = self._store(keys=keys, args=args)
            if isinstance(counted, Exception):
                raise counted
        except RedisError as exc:
            self._failure(len(blocks), exc)
            return [False] * len(blocks)
        refused_sets = [reply for reply in replies[:-1] if isinstance(reply, Exception)]
        if refused_sets:  # e.g. out of memory with nothing to evict: those blocks count 0
            self._failure(len(refused_sets), refused_sets[0])
        return [bool(flag) for flag in counted]

    def scope_bytes(self, scope: ScopeId) -> int:
        """The bytes of ``scope``'s blocks as counted (blocks whose TTL ended are forgotten at
        the scope's next store)."""
        return int(self._redis.get(scope_accounting_keys(scope)[0]) or 0)

    def remove(self, addresses: Sequence[BlockAddress]) -> int:
        if not addresses:
            return 0
        by_scope: dict[ScopeId, list[str]] = {}
        for address in addresses:
            by_scope.setdefault(address.scope, []).append(self.redis_key(address))
        removed = 0
        try:
            for scope, keys in by_scope.items():
                removed += int(self._remove(keys=[*scope_accounting_keys(scope), *keys]))
        except RedisError as exc:
            self._failure(len(addresses), exc)
        return removed

    def remove_scope(self, scope: ScopeId) -> int:
        return self.remove_scopes((scope,))

    def remove_scopes(self, scopes: Sequence[ScopeId]) -> int:
        """Every block of ``scopes``, in one ``SCAN`` walk for all of them: a walk covers the
        whole keyspace whatever it matches, and one that sends every block key here cost no more
        than one the server filters (docs/benchmarks.md, a purge's sweep after many salt
        epochs); the server filters for a lone scope. Block keys are ``kv:{compat}:{scope}:{key}``;
        the counts' keys have a part fewer, and values on their way to a block are never taken
        (their writer's script renames or drops them)."""
        wanted = {scope.encode() for scope in scopes}
        if not wanted:
            return 0
        match = f"kv:*:{scopes[0]}:*" if len(wanted) == 1 else "kv:*"
        removed = 0
        batch: list[bytes] = []
        for key in self._redis.scan_iter(match=match, count=1000):
            parts = key.split(b":", 3)
            if len(parts) < 4 or parts[1] == b"incoming" or parts[2] not in wanted:
                continue
            batch.append(key)
            if len(batch) >= 1000:
                removed += int(self._redis.unlink(*batch))
                batch = []
        if batch:
            removed += int(self._redis.unlink(*batch))
        counts = [key for scope in scopes for key in (*scope_accounting_keys(scope), scope_limit_key(scope))]
        for start in range(0, len(counts), 1000):  # nothing left to count
            self._redis.unlink(*counts[start : start + 1000])
        return removed

    def take_events(self) -> list[TierEvent]:
        events: list[TierEvent] = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def usage(self) -> TierUsage | None:
        """The server's ``used_memory`` against its ``maxmemory`` (None: unbounded), and its
        ``evicted_keys``; new evictions since the last call also become an eviction event.
        None when the server cannot answer or does not let this user run INFO."""
        if self._usage_refused:
            return None
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.info("memory")
                pipe.info("stats")
                memory, stats = pipe.execute()
        except (NoPermissionError, ResponseError):
            self._usage_refused = True  # a shared server's ACL: the tier works, unmeasured
            return None
        except RedisError:
            return None
        evicted = int(stats.get("evicted_keys", 0))
        if self._evicted_keys is not None and evicted > self._evicted_keys:
            self._events.append(TierEvent(
                TierEventKind.EVICTION, self.tier, evicted - self._evicted_keys, 0, "maxmemory"
            ))  # fmt: skip
        self._evicted_keys = evicted
        capacity = int(memory.get("maxmemory", 0))
        return TierUsage(self.tier, int(memory.get("used_memory", 0)), capacity or None, evicted)

    def _scope_limit(self, scope: ScopeId) -> str | None:
        """The scope's own limit from the state Redis ("unlimited" or bytes); None: none set, or
        the limits live with the blocks (the script reads them there)."""
        if self._limits is None:
            return None
        now = time.monotonic()
        cached = self._limit_cache.get(scope)
        if cached is not None and cached[1] > now:
            return cached[0]
        raw = self._limits.get(scope_limit_key(scope))
        value = raw.decode() if isinstance(raw, bytes) else None
        if len(self._limit_cache) > 4096:
            self._limit_cache.clear()
        self._limit_cache[scope] = (value, now + LIMIT_CACHE_TTL_S)
        return value

    def _failure(self, num_blocks: int, exc: Exception) -> None:
        self._events.append(TierEvent(TierEventKind.FAILURE, self.tier, num_blocks, 0, type(exc).__name__))
