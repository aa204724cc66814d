"""Decision records and alias releases in Redis, scoped by tenant.

    z:{tenant}:dec:{id}               {"record": <DecisionRecord JSON>, "attempts": [...]} (30 days,
                                      and at most ``DECISIONS_PER_TENANT`` a tenant: the oldest go)
    z:{tenant}:decs                   sorted set: decision id, scored by its ``now_ms`` (the list)
    z:{tenant}:dec-src:{handle}       set of the decisions whose prompt carried that state
                                      object's content (a purge of the object removes them)
    z:{tenant}:reach:{handle}         hash: provider route → {"kind", "retention_days",
                                      "last_sent_at_s"} (``routing/reach.py``)
    z:{tenant}:rel:{id}               a release (canonical JSON), never changed
    z:{tenant}:alias:{name}           the id of the alias' current release
    z:{tenant}:alias-history:{name}   list of its release ids, oldest first
    zumik:salt-epoch:{tenant}         read only, with a request's release (``tenancy/store.py``)
    z:{tenant}:rate                   the rate admission, with a request's release lookup; the
                                      rate settlement, with a whole answer's decision record
                                      (``qos/store.py``)

Publishing is one Lua script: the release is stored only if the alias still points where the
publisher saw it point, so two concurrent publishes never lose one another's history. Every
key of a tenant shares its hash tag, so the scripts and multi-key reads stay in one slot.
Recording provider reach is one script too: it refuses when a source object is revoked or gone
(``REACH``), so a purge that revoked first and reads the reach after misses no send.

A request pays a Redis round trip in CPU whatever it carries, so its two routing steps are one
round trip each: the release lookup reads the tenant's salt epoch with the release and, for a
request whose reserved tokens are known before it runs, takes its rate admission (``LOOKUP``);
the decision record's save applies the rate settlement of a whole answer (``SAVE``). The
salt epoch's key carries no tenant hash tag, which the single Redis primary Zumik runs on allows.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from zumik_serve.errors import RateLimitExceededError
from zumik_serve.qos.quota import RateReservation, RateSettlement
from zumik_serve.qos.store import ADMIT_LUA, SETTLE_LUA, RateAdmission, rate_key, settle_args
from zumik_serve.routing.decision import DecisionRecord
from zumik_serve.routing.reach import ProviderReach
from zumik_serve.routing.release import AliasState, Release
from zumik_serve.routing.retry import ATTEMPTS, Attempt
from zumik_serve.state.store import REVOKED_PREFIX, object_key
from zumik_serve.tenancy.store import salt_epoch_key

DECISION_TTL_S = 30 * 24 * 3600
# A record is about 2 KB: one tenant's steady traffic would otherwise fill the state Redis, which
# does not evict, and every tenant's writes would then fail. Past this many, the oldest go.
DECISIONS_PER_TENANT = 100_000
RELEASES_PARSED = 1024  # stored releases kept parsed (``_parsed_release``), least recently read dropped

# KEYS: n object keys, then their n reach keys, then the tenant's own reach key. ARGV: route,
# reach JSON, its expiry (unix s), the revoked-record prefix. Returns 0 when recorded, else the
# (1-based) index of the first object that is revoked or gone (then nothing is written). The
# tenant's own line takes every send (with or without objects): a deletion of the tenant names
# every provider its content reached. An existing line of the route is replaced only by one that
# expires later, so concurrent sends keep the latest expiry.
REACH = """
local n = (#KEYS - 1) / 2
for i = 1, n do
  local record = redis.call('GET', KEYS[i])
  if not record or string.sub(record, 1, string.len(ARGV[4])) == ARGV[4] then return i end
end
for i = n + 1, #KEYS do
  local old = redis.call('HGET', KEYS[i], ARGV[1])
  local keep = false
  if old then
    local line = cjson.decode(old)
    keep = line['last_sent_at_s'] + line['retention_days'] * 86400 > tonumber(ARGV[3])
  end
  if not keep then redis.call('HSET', KEYS[i], ARGV[1], ARGV[2]) end
end
return 0
"""

# KEYS: alias, history, release. ARGV: expected current ("" for none), release id, release JSON.
PUBLISH = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX') then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: the decision, the tenant's list, then the index of each source object, then (with a
# settlement) the tenant's rate. ARGV: the record (JSON), its ttl (s), its id, its now_ms, the
# list's oldest score kept, the most records kept, the records' key prefix, then (with a
# settlement) ``settle_args``. One atomic step (as MULTI was), one reply to read. The records
# past the most kept (the oldest) are removed by their key, built from the prefix: every key
# is the tenant's, under its hash tag, in the slot of the declared ones.
SAVE = (
    SETTLE_LUA
    + """
local ttl = tonumber(ARGV[2])
local last = #KEYS
if ARGV[8] then
  zq_settle(KEYS[last], tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]))
  last = last - 1
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if over > 0 then
  -- the oldest, but never the record just saved (another gateway's clock may run behind)
  local removed = 0
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, over)) do
    if removed < over and id ~= ARGV[3] then
      redis.call('ZREM', KEYS[2], id)
      redis.call('UNLINK', ARGV[7] .. id)
      removed = removed + 1
    end
  end
end
redis.call('EXPIRE', KEYS[2], ttl)
for i = 3, last do
  redis.call('SADD', KEYS[i], ARGV[3])
  redis.call('EXPIRE', KEYS[i], ttl)
end
return 0
"""
)

# KEYS: alias. ARGV: the release key prefix. The current release's JSON, or false: one round trip.
RESOLVE = """
local current = redis.call('GET', KEYS[1])
if not current then return false end
return redis.call('GET', ARGV[1] .. current)
"""


# KEYS: the tenant's salt epoch, then the alias (none: no alias to resolve), then with an
# admission the ``RateAdmission`` keys. ARGV: the release key prefix, a pinned release's id (""
# for none), the salt epoch the admission's scope was derived at ("" for none: no admission),
# then the ``RateAdmission`` args. A request's lookups, and its rate admission, in one round
# trip: {the salt epoch, the alias' current release's JSON, the pinned release's JSON, the
# admission's reply}, each false when absent. The admission runs only when the epoch read is the
# one its scope was derived at (else its scope is another's: the caller admits on its own).
LOOKUP = (
    ADMIT_LUA
    + """
local admits = ARGV[3] ~= ''
local lookups = #KEYS
if admits then lookups = lookups - 3 end
local release = false
if lookups >= 2 then
  local current = redis.call('GET', KEYS[2])
  if current then release = redis.call('GET', ARGV[1] .. current) end
end
local pinned = false
if ARGV[2] ~= '' then pinned = redis.call('GET', ARGV[1] .. ARGV[2]) end
local epoch = redis.call('GET', KEYS[1])
local admitted = false
if admits and (epoch or '0') == ARGV[3] then
  admitted = zq_admit(KEYS[lookups + 1], KEYS[lookups + 2], KEYS[lookups + 3], ARGV, 4)
end
return {epoch, release, pinned, admitted}
"""
)


@dataclass(frozen=True)
class RequestLookup:
    """What a request reads before it runs, in one round trip (``LOOKUP``): the tenant's salt
    epoch (0 before its first purge), its alias' current release and a pinned release (None:
    no such alias or release, or none asked for), and its rate admission's outcome when one was
    asked for at the epoch read (None: none ran; the refusal is the error to raise)."""

    salt_epoch: int
    current: Release | None
    pinned: Release | None
    admitted: RateReservation | RateLimitExceededError | None = None  # None: no admission ran


@dataclass(frozen=True)
class StoredDecision:
    """A decision as recorded. ``record`` is the record's JSON exactly as it was written
    (``DecisionRecord.to_json``), not re-parsed: replay compares it byte for byte with what the
    recorded inputs give now, so a record altered in the store shows up as not equal.
    ``attempts`` are the attempts that carried it out, in order, as the dispatcher wrote them."""

    record: dict[str, Any]
    attempts: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class DecisionPage:
    """Decision ids of one page of a tenant's list, newest first, and whether more follow."""

    ids: tuple[str, ...]
    decisions: tuple[StoredDecision, ...]
    has_more: bool


class RedisRoutingStore:
    def __init__(self, client: aioredis.Redis, *, decisions_per_tenant: int = DECISIONS_PER_TENANT) -> None:
        """``decisions_per_tenant``: the most decision records a tenant keeps (the oldest go)."""
        if decisions_per_tenant < 1:
            raise ValueError("decisions_per_tenant must be at least 1")
        self._redis = client
        self._decisions_per_tenant = decisions_per_tenant
        self._publish = client.register_script(PUBLISH)
        self._resolve = client.register_script(RESOLVE)
        self._reach = client.register_script(REACH)
        self._save = client.register_script(SAVE)
        self._lookup = client.register_script(LOOKUP)

    async def save_decision(
        self, tenant: str, record: DecisionRecord, attempts: Sequence[Attempt], sources: Sequence[str] = (),
        settlement: RateSettlement | None = None,
    ) -> None:  # fmt: skip
        """Record a decision with its attempts, for 30 days (the tenant's oldest go past
        ``decisions_per_tenant``): ``{"record", "attempts"}``, each as
        its JSON, serialised by pydantic in one step (this is on the request's path), listed in
        the tenant's decisions and indexed under each state object in ``sources`` (the objects
        whose content its prompt carried); with ``settlement``, the tenant's rate settlement is
        written in the same step. One round trip, one script (``SAVE``)."""
        value = (
            b'{"record":'
            + record.to_json_bytes()
            + b',"attempts":'
            + ATTEMPTS.dump_json(tuple(attempts))
            + b"}"
        )
        decision_id = record.decision_id
        now_ms = record.inputs.now_ms
        keys = [_key(tenant, "dec", decision_id), _list_key(tenant)]
        keys += [_key(tenant, "dec-src", handle) for handle in dict.fromkeys(sources)]
        args: list[bytes | str | int] = [
            value,
            DECISION_TTL_S,
            decision_id,
            now_ms,
            now_ms - DECISION_TTL_S * 1000,
            self._decisions_per_tenant,
            _key(tenant, "dec", ""),
        ]
        if settlement is not None:
            keys.append(rate_key(tenant))
            args += settle_args(settlement)
        await self._save(keys=keys, args=args)

    async def decision_page(self, tenant: str, *, limit: int, after: str | None) -> DecisionPage | None:
        """Up to ``limit`` of the tenant's decisions, newest first, after decision ``after`` (None:
        from the newest); None when ``after`` is not in the list (expired, purged, or not the
        tenant's). A listed decision whose record expired meanwhile is left out."""
        start = 0
        if after is not None:
            rank = cast(int | None, await self._redis.zrevrank(_list_key(tenant), after))
            if rank is None:
                return None
            start = rank + 1
        listed = cast(list[bytes], await self._redis.zrevrange(_list_key(tenant), start, start + limit))
        ids = [_text(item) for item in listed]
        has_more = len(ids) > limit
        ids = ids[:limit]
        raws = await self._redis.mget([_key(tenant, "dec", item) for item in ids]) if ids else []
        found = [(item, _stored(raw)) for item, raw in zip(ids, raws, strict=True) if raw is not None]
        return DecisionPage(
            ids=tuple(item for item, _ in found),
            decisions=tuple(stored for _, stored in found),
            has_more=has_more,
        )

    async def forget_decisions(self, tenant: str, handles: Sequence[str]) -> int:
        """Remove every decision whose prompt carried content of one of ``handles``, with its
        place in the list, then the handles' indexes; returns how many decisions were indexed
        (a removal cut short and run again counts the same ones: the indexes go last; a record
        that expired or left under the tenant's cap is counted too: it is not held either)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for handle in handles:
                pipe.smembers(_key(tenant, "dec-src", handle))
            replies = await pipe.execute()
        ids = sorted({_text(member) for members in replies for member in members})
        if ids:
            await self._redis.unlink(*[_key(tenant, "dec", item) for item in ids])
            await self._redis.zrem(_list_key(tenant), *ids)
        await self._redis.unlink(*[_key(tenant, "dec-src", handle) for handle in handles])
        return len(ids)

    async def record_reach(self, tenant: str, sources: Sequence[str], reach: ProviderReach) -> str | None:
        """Record that content of ``sources``, and of the tenant, goes to ``reach.route`` (see
        ``REACH``; the tenant's own line is the reach of the tenant id, the first handle of a
        tenant deletion's closure); returns the first source that is revoked or gone (then
        nothing is recorded), None when recorded."""
        handles = list(dict.fromkeys(sources))
        line = json.dumps(
            {
                "kind": reach.kind,
                "retention_days": reach.retention_days,
                "last_sent_at_s": reach.last_sent_at_s,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        keys = [object_key(tenant, h) for h in handles] + [_key(tenant, "reach", h) for h in handles]
        keys.append(_key(tenant, "reach", tenant))
        refused = int(
            await self._reach(keys=keys, args=[reach.route, line, reach.expires_at_s, REVOKED_PREFIX])
        )
        return None if refused == 0 else handles[refused - 1]

    async def reached(self, tenant: str, handles: Sequence[str]) -> list[ProviderReach]:
        """Every provider route that content of ``handles`` reached, one line per route (the
        latest expiry over the handles), ordered by route."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for handle in handles:
                pipe.hgetall(_key(tenant, "reach", handle))
            replies = await pipe.execute()
        lines: dict[str, ProviderReach] = {}
        for reply in replies:
            for route, raw in reply.items():
                line = json.loads(raw)
                reach = ProviderReach(
                    route=_text(route), kind=line["kind"], retention_days=int(line["retention_days"]),
                    last_sent_at_s=int(line["last_sent_at_s"]),
                )  # fmt: skip
                lines[reach.route] = reach.merged(lines[reach.route]) if reach.route in lines else reach
        return [lines[route] for route in sorted(lines)]

    async def forget_reach(self, tenant: str, handles: Sequence[str]) -> None:
        """Drop the reach lines of ``handles`` (once a purge has saved them in its job)."""
        await self._redis.unlink(*[_key(tenant, "reach", handle) for handle in handles])

    async def decision(self, tenant: str, decision_id: str) -> StoredDecision | None:
        raw = await self._redis.get(_key(tenant, "dec", decision_id))
        return None if raw is None else _stored(raw)

    async def find_decision(self, decision_id: str) -> tuple[str, StoredDecision] | None:
        """The tenant and record of ``decision_id`` whoever's it is (decision ids are unique): one
        SCAN over every tenant's records, an operator's command (``zumik decision replay``), never
        a request path. None when no record has that id."""
        async for key in self._redis.scan_iter(match=_key("*", "dec", decision_id), count=1000):
            name = _text(key)
            raw = await self._redis.get(name)
            if raw is not None:
                return name[len("z:{") : name.index("}:dec:")], _stored(raw)
        return None

    async def publish(self, tenant: str, release: Release, expected: str | None) -> bool:
        """Store ``release`` and point its alias at it, only if the alias points at ``expected``
        now (None: at nothing) and no release has its id; False otherwise, nothing written."""
        keys = [
            _key(tenant, "alias", release.alias),
            _key(tenant, "alias-history", release.alias),
            _key(tenant, "rel", release.id),
        ]
        args: list[str | bytes] = [expected or "", release.id, release.canonical_json()]
        return bool(await self._publish(keys=keys, args=args))

    async def lookup(
        self, tenant: str, alias: str | None, pinned: str | None = None, *,
        admission: RateAdmission | None = None, admission_epoch: int = 0,
    ) -> RequestLookup:  # fmt: skip
        """The tenant's salt epoch, the current release of ``alias`` (None: none to resolve) and
        the release ``pinned`` (None: none), in one round trip (``LOOKUP``); with ``admission``
        (its scope derived at salt epoch ``admission_epoch``), the rate admission in the same
        step when that is the epoch read."""
        keys = [salt_epoch_key(tenant)]
        args: list[str | int] = [_key(tenant, "rel", ""), pinned or ""]
        if alias is not None:
            keys.append(_key(tenant, "alias", alias))
        if admission is None:
            args.append("")
        else:
            keys += admission.keys
            args += [str(admission_epoch), *admission.args]
        epoch, current, pinned_raw, admitted = await self._lookup(keys=keys, args=args)
        return RequestLookup(
            salt_epoch=int(epoch or 0), current=_release(current), pinned=_release(pinned_raw),
            admitted=admission.outcome(admitted) if admission is not None and admitted else None,
        )  # fmt: skip

    async def resolve(self, tenant: str, alias: str) -> Release | None:
        """The alias' current release in one round trip; None when there is no such alias."""
        raw = await self._resolve(keys=[_key(tenant, "alias", alias)], args=[_key(tenant, "rel", "")])
        return Release.from_json(json.loads(raw)) if raw else None

    async def current_release_id(self, tenant: str, alias: str) -> str | None:
        value = await self._redis.get(_key(tenant, "alias", alias))
        return _text(value) if value is not None else None

    async def release(self, tenant: str, release_id: str) -> Release | None:
        raw = await self._redis.get(_key(tenant, "rel", release_id))
        return Release.from_json(json.loads(raw)) if raw is not None else None

    async def alias(self, tenant: str, alias: str) -> AliasState | None:
        """The alias, its current release and its history in two round trips; None when there
        is no such alias."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(_key(tenant, "alias", alias))
            pipe.lrange(_key(tenant, "alias-history", alias), 0, -1)
            current_id, history_ids = await pipe.execute()
        if current_id is None:
            return None
        current, *history = await self._releases(tenant, [_text(current_id), *map(_text, history_ids)])
        return AliasState(
            name=alias, current=current, history=tuple(item for item in history if item is not None)
        )

    async def history(self, tenant: str, alias: str) -> list[str]:
        ids = await self._redis.lrange(_key(tenant, "alias-history", alias), 0, -1)
        return [_text(item) for item in ids]

    async def _releases(self, tenant: str, release_ids: Sequence[str]) -> list[Release | None]:
        raws = await self._redis.mget([_key(tenant, "rel", rid) for rid in release_ids])
        return [Release.from_json(json.loads(raw)) if raw is not None else None for raw in raws]


def _key(tenant: str, kind: str, name: str) -> str:
    return f"z:{{{tenant}}}:{kind}:{name}"


def _list_key(tenant: str) -> str:
    return f"z:{{{tenant}}}:decs"


def _stored(raw: bytes | str) -> StoredDecision:
    stored = json.loads(raw)
    return StoredDecision(record=stored["record"], attempts=tuple(stored["attempts"]))


def _release(raw: bytes | str | None) -> Release | None:
    return _parsed_release(raw) if raw else None


@functools.lru_cache(maxsize=RELEASES_PARSED)
def _parsed_release(raw: bytes | str) -> Release:
    """A stored release's value, parsed once per process: a release never changes (``publish``
    writes a release id once) and ``Release`` is frozen, so one parsed value serves every request
    that reads the same bytes (each request reads its alias's current release)."""
    return Release.from_json(json.loads(raw))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
