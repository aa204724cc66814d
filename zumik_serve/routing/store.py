"""Decision records and alias releases in Redis, scoped by tenant.

    z:{tenant}:dec:{id}               {"record": <DecisionRecord JSON>, "attempts": [...]} (30 days)
    z:{tenant}:rel:{id}               a release (canonical JSON), never changed
    z:{tenant}:alias:{name}           the id of the alias' current release
    z:{tenant}:alias-history:{name}   list of its release ids, oldest first

Publishing is one Lua script: the release is stored only if the alias still points where the
publisher saw it point, so two concurrent publishes never lose one another's history. Every
key of a tenant shares its hash tag, so the scripts and multi-key reads stay in one slot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from zumik_serve.routing.decision import DecisionRecord
from zumik_serve.routing.release import AliasState, Release
from zumik_serve.routing.retry import ATTEMPTS, Attempt

DECISION_TTL_S = 30 * 24 * 3600

# KEYS: alias, history, release. ARGV: expected current ("" for none), release id, release JSON.
PUBLISH = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX') then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: alias. ARGV: the release key prefix. The current release's JSON, or false: one round trip.
RESOLVE = """
local current = redis.call('GET', KEYS[1])
if not current then return false end
return redis.call('GET', ARGV[1] .. current)
"""


@dataclass(frozen=True)
class StoredDecision:
    """A decision as recorded. ``record`` is the record's JSON exactly as it was written
    (``DecisionRecord.to_json``), not re-parsed: replay compares it byte for byte with what the
    recorded inputs give now, so a record altered in the store shows up as not equal.
    ``attempts`` are the attempts that carried it out, in order, as the dispatcher wrote them."""

    record: dict[str, Any]
    attempts: tuple[dict[str, Any], ...]


class RedisRoutingStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._publish = client.register_script(PUBLISH)
        self._resolve = client.register_script(RESOLVE)

    async def save_decision(self, tenant: str, record: DecisionRecord, attempts: Sequence[Attempt]) -> None:
        """Record a decision with its attempts, for 30 days: ``{"record", "attempts"}``, each as
        its JSON, serialised by pydantic in one step (this is on the request's path)."""
        value = (
            b'{"record":'
            + record.to_json_bytes()
            + b',"attempts":'
            + ATTEMPTS.dump_json(tuple(attempts))
            + b"}"
        )
        await self._redis.set(_key(tenant, "dec", record.decision_id), value, ex=DECISION_TTL_S)

    async def decision(self, tenant: str, decision_id: str) -> StoredDecision | None:
        raw = await self._redis.get(_key(tenant, "dec", decision_id))
        if raw is None:
            return None
        stored = json.loads(raw)
        return StoredDecision(record=stored["record"], attempts=tuple(stored["attempts"]))

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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
