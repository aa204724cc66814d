"""State objects in Redis: records, content, turns, idempotency, all scoped by tenant.

    zumik:handle-secret                 32 random bytes; HMAC key of content-addressed handles
    z:{tenant}:o:{handle}               JSON record of an object (``revoked_at`` once revoked)
    z:{tenant}:idx:{kind}               sorted set: the live objects of a listed kind (their
                                        handle's prefix: ``INDEXED_KINDS``), scored by the ms they
                                        were stored; written by the scripts that store and revoke
                                        records (``list_page`` also drops a member gone stale)
    z:{tenant}:idx-built                set once the indexes hold the objects stored before them
                                        (at creation for a tenant made since: ``tenancy/store.py``)
    z:{tenant}:blob:{digest}            artifact bytes
    z:{tenant}:gen:{hmac of address}   bumped when a content-addressed artifact is revoked, so
                                        the same content then gets a new handle (named by an
                                        HMAC: no digest of purged content stays behind)
    z:{tenant}:derived:{handle}         set of handles built on this one (bundle → snapshot, ...)
    z:{tenant}:bydigest:{digest}        set of artifact handles holding this content
    z:{tenant}:exposed                  set of handles whose content may have reached an engine
    z:{tenant}:turns:{session}          list of turn JSON; index i holds seq fork_at + i + 1
    z:{tenant}:comp:{snapshot}          hash: compilation key → pinned compilation JSON
    z:{tenant}:idem:{key}               {"hash", "result"} of the first write with that key (24 h)
    z:{tenant}:usage, :charges, :quota  the tenant's quota counts and overrides (``qos/store.py``):
                                        every write script here that adds a record, content or
                                        turns checks and counts them in the same step, and
                                        ``delete_keys`` gives them back

Records, turns and compilations are the JSON of the values of ``state/objects.py``, written
canonically (keys sorted, compact, UTF-8) and read back with their ``TypeAdapter``. A revoked
record starts with ``{"revoked_at":`` (the ``REVOKE`` script prepends it); Python and the Lua
scripts both test that prefix.

The tenant id in every key is the isolation: a handle looked up under another tenant's prefix
does not exist. ``{tenant}`` is a Redis hash tag, so one tenant's keys share a cluster slot and
the Lua scripts below stay atomic. Durability comes from the server (AOF, fsync always): a
reply to any write here means the write is on disk.

Round trips: appending a turn, or a /v1 exchange's turns, is one (``EVALSHA`` of
``APPEND_TURN``, which also checks the session, the idempotency key and numbering, atomically).
The scripts are registered once per store (``register_script``); after a server restart emptied
its script cache, the first call loads the script again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.exceptions import RedisError

from profiles.model import QuotaSpec
from zumik_serve.errors import StoreUnavailableError
from zumik_serve.ids import HandleKind
from zumik_serve.qos.store import DELETE_CHARGED, charges_key, quota_keys, quota_lua, raise_refusal, usage_key
from zumik_serve.state.objects import (
    COMPILATION,
    STATE_OBJECT,
    TURN,
    Artifact,
    Compilation,
    StateObject,
    Turn,
    value_json,
)
from zumik_serve.state.outcomes import (
    AppendOutcome,
    HandlePurged,
    IdempotentEntry,
    ParentNotLive,
    SessionNotLive,
    TurnAppended,
    TurnReplayed,
)

logger = logging.getLogger("ray.serve")

IDEMPOTENCY_TTL_S = 24 * 3600
BACKFILL_BATCH = 100
SCAN_COUNT = 1000
# The kinds listed by GET /v2/{kind}: their records are indexed, by their handle's prefix.
INDEXED_KINDS = (
    HandleKind.ARTIFACT, HandleKind.BUNDLE, HandleKind.SESSION, HandleKind.BRANCH, HandleKind.SNAPSHOT,
)  # fmt: skip
INDEXED_PREFIXES = frozenset(kind.value for kind in INDEXED_KINDS)
REVOKED_PREFIX = '{"revoked_at":'
_REVOKED_MARK = REVOKED_PREFIX.encode()
T = TypeVar("T")
IDEMPOTENT_ENTRY = TypeAdapter(IdempotentEntry)


def _lua(source: str) -> str:
    """A script with the constants it shares with Python filled in."""
    return (
        source.replace("{prefix_len}", str(len(REVOKED_PREFIX)))
        .replace("{prefix}", REVOKED_PREFIX)
        .replace("{ttl}", str(IDEMPOTENCY_TTL_S))
    )


# KEYS: object, turns, idem ("" for none), then ``quota_keys``. ARGV: request hash, then each
# turn's JSON. Returns {"ok", seq of the last turn} | {"missing"} | {"idem", stored JSON} |
# a quota refusal (``qos/store.py``; nothing appended).
APPEND_TURN = _lua("""
if KEYS[3] ~= '' then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {'idem', prev} end
end
local raw = redis.call('GET', KEYS[1])
if not raw or string.sub(raw, 1, {prefix_len}) == '{prefix}' then return {'missing'} end
local obj = cjson.decode(raw)
local adding, bytes = #ARGV - 1, 0
for index = 2, #ARGV do bytes = bytes + #ARGV[index] end
local head = (tonumber(obj['fork_at']) or 0) + redis.call('LLEN', KEYS[2])
local refused = zq_turns_fit(head, adding) or zq_fits(0, bytes)
if refused then return refused end
local n = 0
for index = 2, #ARGV do n = redis.call('RPUSH', KEYS[2], ARGV[index]) end
zq_charge(KEYS[2], 0, bytes)
local seq = (tonumber(obj['fork_at']) or 0) + n
if KEYS[3] ~= '' then
  redis.call('SET', KEYS[3], cjson.encode({hash=ARGV[1], result=seq}), 'EX', {ttl})
end
return {'ok', tostring(seq)}
""")

# KEYS: object, turns, then ``quota_keys``. ARGV: the own turn count expected now, then each
# turn's JSON. Returns {"ok", seq of the last turn} | {"moved"} (another writer appended first)
# | {"missing"} | a quota refusal.
APPEND_TURNS_AT = _lua("""
local raw = redis.call('GET', KEYS[1])
if not raw or string.sub(raw, 1, {prefix_len}) == '{prefix}' then return {'missing'} end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[1]) then return {'moved'} end
local obj = cjson.decode(raw)
local adding, bytes = #ARGV - 1, 0
for index = 2, #ARGV do bytes = bytes + #ARGV[index] end
local head = (tonumber(obj['fork_at']) or 0) + redis.call('LLEN', KEYS[2])
local refused = zq_turns_fit(head, adding) or zq_fits(0, bytes)
if refused then return refused end
local n = 0
for index = 2, #ARGV do n = redis.call('RPUSH', KEYS[2], ARGV[index]) end
zq_charge(KEYS[2], 0, bytes)
return {'ok', tostring((tonumber(obj['fork_at']) or 0) + n)}
""")

# KEYS: object, its kind's index. ARGV: now, handle. Returns 1 if it was live (now revoked), 0
# if missing or revoked; either way it is out of the index. The mark is prepended to the stored
# JSON as its first key (records are never re-encoded in Lua, whose cjson would turn empty arrays
# into objects).
REVOKE = _lua("""
redis.call('ZREM', KEYS[2], ARGV[2])
local raw = redis.call('GET', KEYS[1])
if not raw or string.sub(raw, 1, {prefix_len}) == '{prefix}' then return 0 end
redis.call('SET', KEYS[1], '{prefix}' .. ARGV[1] .. ',' .. string.sub(raw, 2))
return 1
""")

# KEYS: the index of each kind, in ``INDEXED_KINDS``' order, then objects. ARGV: each index's
# handle prefix ("art_"...), in the same order. Adds each live object to its kind's index, scored
# by its ``created_at`` in ms (the scripts that store score in ms): the objects stored before
# the indexes were (``NX``: one a script indexed keeps its score). In one step per batch, so an
# object revoked meanwhile is either skipped or removed again by its revoke.
BACKFILL_INDEX = _lua("""
local kinds = #ARGV
for index = kinds + 1, #KEYS do
  local raw = redis.call('GET', KEYS[index])
  if raw and string.sub(raw, 1, {prefix_len}) ~= '{prefix}' then
    local record = cjson.decode(raw)
    for kind = 1, kinds do
      if string.sub(record['id'], 1, #ARGV[kind]) == ARGV[kind] then
        redis.call('ZADD', KEYS[kind], 'NX', (tonumber(record['created_at']) or 0) * 1000, record['id'])
      end
    end
  end
end
return 0
""")

# KEYS: the tenant's exposed set, then each object. ARGV: each object's handle, in KEYS' order.
# Returns the handle of the first object missing or revoked (then nothing is marked), else "".
MARK_EXPOSED = _lua("""
for index = 2, #KEYS do
  local raw = redis.call('GET', KEYS[index])
  if not raw or string.sub(raw, 1, {prefix_len}) == '{prefix}' then return ARGV[index - 1] end
end
redis.call('SADD', KEYS[1], unpack(ARGV))
return ''
""")

# KEYS: ``quota_keys``, object, its purge mark, its kind's index, the ``derived`` set of each
# parent, then the object of each parent that must be live. ARGV: record JSON, its handle, the
# number of ``derived`` sets, now in ms (the index's score), "1" when its kind is listed
# (``INDEXED_KINDS``; else ""). Returns {"ok"} | {"exists"} (records never change: nothing
# written) | {"purged"} (a purge removed an object of this handle: under an Idempotency-Key a
# create's handle derives from the key, and a retry must not make it again) | {"gone", n} (the
# n-th parent that must be live is missing or revoked: nothing written) | a quota refusal.
PUT_RECORD = _lua("""
local derived = tonumber(ARGV[3])
for index = 7 + derived, #KEYS do
  local raw = redis.call('GET', KEYS[index])
  if not raw or string.sub(raw, 1, {prefix_len}) == '{prefix}' then
    return {'gone', tostring(index - 6 - derived)}
  end
end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'exists'} end
if redis.call('EXISTS', KEYS[5]) == 1 then return {'purged'} end
local refused = zq_fits(1, #ARGV[1])
if refused then return refused end
redis.call('SET', KEYS[4], ARGV[1])
if ARGV[5] == '1' then redis.call('ZADD', KEYS[6], ARGV[4], ARGV[2]) end
for index = 7, 6 + derived do redis.call('SADD', KEYS[index], ARGV[2]) end
zq_charge(KEYS[4], 1, #ARGV[1])
return {'ok'}
""")

# KEYS: ``quota_keys``, blob, object, bydigest, the artifacts' index. ARGV: content, record JSON,
# handle, now in ms (the index's score). The content is stored (and counted) once per digest, the
# record (and indexed) once per handle.
# Returns {"ok"} | a quota refusal.
PUT_ARTIFACT = """
local new_blob = redis.call('EXISTS', KEYS[4]) == 0
local new_record = redis.call('EXISTS', KEYS[5]) == 0
local blob_bytes, record_bytes, objects = 0, 0, 0
if new_blob then blob_bytes = #ARGV[1] end
if new_record then record_bytes, objects = #ARGV[2], 1 end
local refused = zq_fits(objects, blob_bytes + record_bytes)
if refused then return refused end
if new_blob then
  redis.call('SET', KEYS[4], ARGV[1])
  zq_charge(KEYS[4], 0, blob_bytes)
end
if new_record then
  redis.call('SET', KEYS[5], ARGV[2])
  redis.call('ZADD', KEYS[7], ARGV[4], ARGV[3])
  zq_charge(KEYS[5], 1, record_bytes)
end
redis.call('SADD', KEYS[6], ARGV[3])
return {'ok'}
"""


class RedisStateStore:
    def __init__(self, client: aioredis.Redis, quota: QuotaSpec | None = None) -> None:
        """``quota``: the profile's per-tenant defaults (``profiles.model.QuotaSpec``); a
        tenant's overrides are read by the scripts themselves."""
        self._redis = client
        quota = quota or QuotaSpec()
        self._append_turn = client.register_script(quota_lua(quota, 4) + APPEND_TURN)
        self._append_turns_at = client.register_script(quota_lua(quota, 3) + APPEND_TURNS_AT)
        self._put_record = client.register_script(quota_lua(quota, 1) + PUT_RECORD)
        self._put_artifact = client.register_script(quota_lua(quota, 1) + PUT_ARTIFACT)
        self._delete_charged = client.register_script(DELETE_CHARGED)
        self._revoke = client.register_script(REVOKE)
        self._mark_exposed = client.register_script(MARK_EXPOSED)
        self._backfill_index = client.register_script(BACKFILL_INDEX)
        self._secret: bytes | None = None

    # --- plumbing ---------------------------------------------------------------------------

    async def guard(self, operation: Awaitable[T]) -> T:
        """Await ``operation``; a Redis outage becomes a 503 the client can retry."""
        try:
            return await operation
        except RedisError as exc:
            logger.warning("zumik: state store call failed: %s: %s", type(exc).__name__, str(exc)[:200])
            raise StoreUnavailableError(
                "The state store is unavailable; nothing was changed unless a response said so. "
                "Retry shortly (with the same Idempotency-Key).",
                retry_after_s=1,
            ) from exc

    async def handle_secret(self) -> bytes:
        if self._secret is None:
            await self._redis.set("zumik:handle-secret", secrets.token_bytes(32), nx=True)
            value = await self._redis.get("zumik:handle-secret")
            if value is None:
                raise RedisError("handle secret vanished")
            self._secret = value if isinstance(value, bytes) else value.encode()
        return self._secret

    # --- objects ----------------------------------------------------------------------------

    async def get_record(self, tenant: str, handle: str) -> StateObject | None:
        """The live object ``handle`` under ``tenant``; None when unknown or revoked."""
        return _live(await self._redis.get(object_key(tenant, handle)))

    async def get_record_any(self, tenant: str, handle: str) -> StateObject | None:
        """The object even if revoked (frozen objects still reach content they were built on);
        None when unknown."""
        raw = await self._redis.get(object_key(tenant, handle))
        return STATE_OBJECT.validate_json(raw) if raw is not None else None

    async def get_records(self, tenant: str, handles: Sequence[str]) -> list[StateObject | None]:
        """The live objects, in the order of ``handles``; None for each unknown or revoked one."""
        if not handles:
            return []
        raws = await self._redis.mget([object_key(tenant, handle) for handle in handles])
        return [_live(raw) for raw in raws]

    async def put_record(
        self, tenant: str, record: StateObject, parents: Sequence[str] = (), live: Sequence[str] = ()
    ) -> bool | ParentNotLive | HandlePurged:
        """Store a new object built on ``parents`` (indexed, so that purging a parent finds it):
        True; False when its handle already exists (records never change). ``live``: the parents
        it needs live, checked in the same step as the write: ``ParentNotLive`` when one is missing
        or revoked (a purge revoked it since it was read), and nothing is written. So a purge that
        revokes objects, then reads what is built on them, finds every object built on them
        (``purge/store.py``). QuotaExceededError when it would take the tenant past its objects or
        stored_bytes quota (nothing is written)."""
        return await self.put_json(tenant, record.id, _canonical(record), parents, live)

    async def put_json(
        self,
        tenant: str,
        handle: str,
        record_json: str,
        parents: Sequence[str] = (),
        live: Sequence[str] = (),
    ) -> bool | ParentNotLive | HandlePurged:
        """``put_record`` of a record already encoded (a stored response's)."""
        linked = list(dict.fromkeys(parents))
        needed = list(dict.fromkeys(live))
        keys = [*quota_keys(tenant), object_key(tenant, handle), purge_mark_key(tenant, handle)]
        keys += [index_key(tenant, handle)]
        keys += [derived_key(tenant, parent) for parent in linked]
        keys += [object_key(tenant, parent) for parent in needed]
        listed = "1" if handle.partition("_")[0] in INDEXED_PREFIXES else ""
        args: list[str | int] = [record_json, handle, len(linked), _now_ms(), listed]
        reply = await self._put_record(keys=keys, args=args)
        raise_refusal(reply)
        if _text(reply[0]) == "gone":
            return ParentNotLive(needed[int(reply[1]) - 1])
        if _text(reply[0]) == "purged":
            return HandlePurged(handle)
        return _text(reply[0]) == "ok"

    async def delete_keys(self, tenant: str, keys: Sequence[str]) -> int:
        """Remove ``keys`` (all the tenant's) and give back what they were charged, in one
        step; returns how many existed."""
        if not keys:
            return 0
        charged = [usage_key(tenant), charges_key(tenant), *keys]
        return int(await self._delete_charged(keys=charged, args=[object_key(tenant, "")]))

    async def mark_exposed(self, tenant: str, handles: list[str]) -> str | None:
        """Note that these objects' content may now be in an engine's KV cache (a purge must then
        also close the tenant's cache scope), if each is live, in one step; else nothing is
        marked and the first handle missing or revoked is returned. A purge revokes before it
        reads these marks (``purge/service.py``), so a request either marks before the revoke,
        and the purge sees it, or is refused here and sends nothing."""
        if not handles:
            return None
        keys = [exposed_key(tenant), *(object_key(tenant, handle) for handle in handles)]
        refused = _text(await self._mark_exposed(keys=keys, args=list(handles)))
        return refused or None

    async def revoke(self, tenant: str, handle: str) -> bool:
        """Mark the object revoked; False when it was unknown or revoked already."""
        keys = [object_key(tenant, handle), index_key(tenant, handle)]
        return bool(await self._revoke(keys=keys, args=[int(time.time()), handle]))

    async def list_page(
        self, tenant: str, kind: HandleKind, limit: int, after: str | None
    ) -> tuple[list[StateObject], bool] | None:
        """Up to ``limit`` of the tenant's live objects of ``kind``, newest first, from the one
        after ``after`` (None: the newest), and whether older ones follow; None when ``after`` is
        not among them (unknown, revoked, another kind or tenant's). A member whose object is no
        longer live (revoked by a gateway of an earlier version) is skipped and taken out."""
        await self._index_built(tenant)
        index = _index(tenant, kind.value)
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(index, after)
            if not isinstance(rank, int):  # None: not in the index (no WITHSCORE: never a list)
                return None
            start = rank + 1
        page: list[StateObject] = []
        stale: list[str] = []
        while True:
            members = await self._redis.zrevrange(index, start, start + limit)
            handles = [_text(member) for member in members if isinstance(member, bytes | str)]
            if not handles:
                break
            for handle, record in zip(handles, await self.get_records(tenant, handles), strict=True):
                if record is None:
                    stale.append(handle)
                elif len(page) == limit:
                    await self._drop_stale(index, stale)
                    return page, True
                else:
                    page.append(record)
            start += len(handles)
        await self._drop_stale(index, stale)
        return page, False

    async def _drop_stale(self, index: str, handles: list[str]) -> None:
        if handles:
            await self._redis.zrem(index, *handles)

    async def own_turn_counts(self, tenant: str, sessions: Sequence[str]) -> list[int]:
        """How many turns each session or branch holds itself, in one round trip."""
        if not sessions:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for session in sessions:
                pipe.llen(turns_key(tenant, session))
            return [int(count) for count in await pipe.execute()]

    async def _index_built(self, tenant: str) -> None:
        """Add the objects stored before the indexes existed: once for a tenant created by an
        earlier version (a tenant created since is marked built at creation), a batch of
        ``BACKFILL_BATCH`` a step, then the tenant is marked."""
        done = index_built_key(tenant)
        if await self._redis.exists(done):
            return
        indexes = [_index(tenant, kind.value) for kind in INDEXED_KINDS]
        prefixes = [f"{kind.value}_" for kind in INDEXED_KINDS]
        listed = tuple(object_key(tenant, prefix) for prefix in prefixes)
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=object_key(tenant, "*"), count=SCAN_COUNT):
            if not _text(key).startswith(listed):  # stored responses and the like: not listed
                continue
            batch.append(_text(key))
            if len(batch) == BACKFILL_BATCH:
                await self._backfill_index(keys=[*indexes, *batch], args=prefixes)
                batch = []
        if batch:
            await self._backfill_index(keys=[*indexes, *batch], args=prefixes)
        await self._redis.set(done, 1)

    # --- artifacts --------------------------------------------------------------------------

    async def artifact_generation(self, tenant: str, address: str) -> int:
        return int(await self._redis.get(await self._gen_key(tenant, address)) or 0)

    async def bump_artifact_generation(self, tenant: str, address: str) -> None:
        await self._redis.incr(await self._gen_key(tenant, address))

    async def _gen_key(self, tenant: str, address: str) -> str:
        name = hmac.new(await self.handle_secret(), address.encode(), hashlib.sha256).hexdigest()[:32]
        return f"z:{{{tenant}}}:gen:{name}"

    async def put_artifact(self, tenant: str, artifact: Artifact, content: bytes) -> None:
        """Store the artifact's record and its bytes (kept once per digest). QuotaExceededError
        when that would take the tenant past a quota (nothing is written)."""
        keys = [
            *quota_keys(tenant), blob_key(tenant, artifact.digest), object_key(tenant, artifact.id),
            bydigest_key(tenant, artifact.digest), index_key(tenant, artifact.id),
        ]  # fmt: skip
        args: list[bytes | str | int] = [content, _canonical(artifact), artifact.id, _now_ms()]
        reply = await self._put_artifact(keys=keys, args=args)
        raise_refusal(reply)

    async def get_blobs(self, tenant: str, digests: list[str]) -> list[bytes | None]:
        if not digests:
            return []
        values = await self._redis.mget([blob_key(tenant, digest) for digest in digests])
        return [value.encode() if isinstance(value, str) else value for value in values]

    # --- turns ------------------------------------------------------------------------------

    async def append_turn(
        self, tenant: str, session: str, turn: Turn, *, idem_key: str | None, request_hash: str
    ) -> AppendOutcome:
        """Append ``turn`` to the live session or branch ``session``, in one round trip. Under
        ``idem_key`` that was used before, nothing is appended and the first entry comes back."""
        return await self.append_turns(tenant, session, [turn], idem_key=idem_key, request_hash=request_hash)

    async def append_turns(
        self, tenant: str, session: str, turns: Sequence[Turn], *, idem_key: str | None, request_hash: str
    ) -> AppendOutcome:
        """Append ``turns`` (in order, all or none) to the live session or branch ``session``, in
        one round trip; the seq is the last turn's. Under ``idem_key`` that was used before,
        nothing is appended and the first entry comes back."""
        idem = _idem(tenant, idem_key) if idem_key else ""
        keys = [object_key(tenant, session), turns_key(tenant, session), idem, *quota_keys(tenant)]
        reply = await self._append_turn(keys=keys, args=[request_hash, *(_canonical(t) for t in turns)])
        raise_refusal(reply, session=session)
        status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if status == "ok":
            return TurnAppended(seq=int(reply[1]))
        if status == "idem":
            return TurnReplayed(first=IDEMPOTENT_ENTRY.validate_json(reply[1]))
        return SessionNotLive()

    async def append_turns_at(
        self, tenant: str, session: str, turns: Sequence[Turn], *, own_count: int
    ) -> int | Literal["moved", "missing"]:
        """Append ``turns`` to the live ``session`` only if it holds ``own_count`` turns of its
        own now (nobody appended since), in one step: the seq of the last turn, else why not."""
        keys = [object_key(tenant, session), turns_key(tenant, session), *quota_keys(tenant)]
        reply = await self._append_turns_at(keys=keys, args=[own_count, *(_canonical(t) for t in turns)])
        raise_refusal(reply, session=session)
        status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if status == "ok":
            return int(reply[1])
        return "moved" if status == "moved" else "missing"

    async def own_turns(self, tenant: str, session: str, limit: int | None = None) -> list[Turn]:
        """The turns appended to ``session`` itself (not its parent's), oldest first; at most
        ``limit`` of them (None: all)."""
        if limit == 0:
            return []
        end = -1 if limit is None else limit - 1
        raws = await self._redis.lrange(turns_key(tenant, session), 0, end)
        return [TURN.validate_json(raw) for raw in raws]

    async def own_turn_count(self, tenant: str, session: str) -> int:
        return int(await self._redis.llen(turns_key(tenant, session)))

    # --- compilations ----------------------------------------------------------------------

    async def pin_compilation(self, tenant: str, snapshot: str, compilation: Compilation) -> None:
        """Record a compilation once; an existing pin for the same key is never overwritten."""
        await self._redis.hsetnx(compilations_key(tenant, snapshot), compilation.key, _canonical(compilation))

    async def compilations(self, tenant: str, snapshot: str) -> list[Compilation]:
        """The snapshot's pinned compilations, in the order of their keys."""
        pinned = await self._redis.hgetall(compilations_key(tenant, snapshot))
        return [COMPILATION.validate_json(pinned[key]) for key in sorted(pinned)]

    # --- idempotency ------------------------------------------------------------------------

    async def idempotent_result(self, tenant: str, key: str) -> IdempotentEntry | None:
        raw = await self._redis.get(_idem(tenant, key))
        return IDEMPOTENT_ENTRY.validate_json(raw) if raw is not None else None

    async def remember_result(
        self, tenant: str, key: str, request_hash: str, result: dict[str, Any]
    ) -> IdempotentEntry:
        """Store the first result for ``key``; returns whichever entry won (first write wins)."""
        entry = IdempotentEntry(request_hash=request_hash, result=result)
        encoded = _encode(IDEMPOTENT_ENTRY.dump_python(entry, mode="json", by_alias=True))
        stored = await self._redis.set(_idem(tenant, key), encoded, nx=True, ex=IDEMPOTENCY_TTL_S)
        if stored:
            return entry
        existing = await self.idempotent_result(tenant, key)
        return existing if existing is not None else entry


def _live(raw: bytes | str | None) -> StateObject | None:
    if raw is None:
        return None
    revoked = raw.startswith(REVOKED_PREFIX) if isinstance(raw, str) else raw.startswith(_REVOKED_MARK)
    if revoked:
        return None
    return STATE_OBJECT.validate_json(raw)


def purge_mark_key(tenant: str, handle: str) -> str:
    """Which purge removed an object of ``handle`` (kept: ``purge/store.py`` writes it)."""
    return f"z:{{{tenant}}}:purge-target:{handle}"


def index_key(tenant: str, handle: str) -> str:
    """The index of ``handle``'s kind (its prefix: ``art``, ``ses``, ``resp``...)."""
    return _index(tenant, handle.partition("_")[0])


def index_built_key(tenant: str) -> str:
    """Set once the tenant's indexes hold every listed object (``tenancy/store.py`` sets it for a
    new tenant: nothing to add)."""
    return f"z:{{{tenant}}}:idx-built"


def _index(tenant: str, prefix: str) -> str:
    return f"z:{{{tenant}}}:idx:{prefix}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def derived_key(tenant: str, handle: str) -> str:
    return f"z:{{{tenant}}}:derived:{handle}"


def bydigest_key(tenant: str, digest: str) -> str:
    return f"z:{{{tenant}}}:bydigest:{digest}"


def exposed_key(tenant: str) -> str:
    return f"z:{{{tenant}}}:exposed"


def object_key(tenant: str, handle: str) -> str:
    return f"z:{{{tenant}}}:o:{handle}"


def blob_key(tenant: str, digest: str) -> str:
    return f"z:{{{tenant}}}:blob:{digest}"


def turns_key(tenant: str, session: str) -> str:
    return f"z:{{{tenant}}}:turns:{session}"


def compilations_key(tenant: str, snapshot: str) -> str:
    return f"z:{{{tenant}}}:comp:{snapshot}"


def _idem(tenant: str, key: str) -> str:
    return f"z:{{{tenant}}}:idem:{key}"


def _canonical(value: StateObject | Turn | Compilation) -> str:
    return _encode(value_json(value))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode(data: Any) -> str:
    """Canonical JSON: keys sorted, compact, UTF-8 (what every earlier version wrote)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
