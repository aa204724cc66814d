"""Decision records and alias releases in Redis, scoped by tenant.

    z:{tenant}:dec:{id}               {"record": <DecisionRecord JSON>, "attempts": [...]} (30 days)
    z:{tenant}:rel:{id}               a release (JSON), never changed
    z:{tenant}:alias:{name}           the id of the alias' current release
    z:{tenant}:alias-history:{name}   list of its release ids, oldest first

Publishing is one Lua script: the release is stored only if the alias still points where the
publisher saw it point, so two concurrent publishes never lose one another's history.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

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


class RedisRoutingStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def save_decision(
        self, tenant: str, record: dict[str, Any], attempts: list[dict[str, Any]]
    ) -> None:
        value = json.dumps({"record": record, "attempts": attempts}, separators=(",", ":"))
        await self._redis.set(f"z:{{{tenant}}}:dec:{record['decision_id']}", value, ex=DECISION_TTL_S)

    async def decision(self, tenant: str, decision_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(f"z:{{{tenant}}}:dec:{decision_id}")
        return json.loads(raw) if raw is not None else None

    async def publish(self, tenant: str, alias: str, release: dict[str, Any], expected: str | None) -> bool:
        keys = [
            f"z:{{{tenant}}}:alias:{alias}",
            f"z:{{{tenant}}}:alias-history:{alias}",
            f"z:{{{tenant}}}:rel:{release['id']}",
        ]
        body = json.dumps(release, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return bool(await self._redis.eval(PUBLISH, len(keys), *keys, expected or "", release["id"], body))

    async def resolve(self, tenant: str, alias: str) -> dict[str, Any] | None:
        """The alias' current release in one round trip; None when there is no such alias."""
        raw = await self._redis.eval(RESOLVE, 1, f"z:{{{tenant}}}:alias:{alias}", f"z:{{{tenant}}}:rel:")
        return json.loads(raw) if raw else None

    async def current_release_id(self, tenant: str, alias: str) -> str | None:
        value = await self._redis.get(f"z:{{{tenant}}}:alias:{alias}")
        return value.decode() if isinstance(value, bytes) else value

    async def release(self, tenant: str, release_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(f"z:{{{tenant}}}:rel:{release_id}")
        return json.loads(raw) if raw is not None else None

    async def history(self, tenant: str, alias: str) -> list[str]:
        ids = await self._redis.lrange(f"z:{{{tenant}}}:alias-history:{alias}", 0, -1)
        return [item.decode() if isinstance(item, bytes) else item for item in ids]
