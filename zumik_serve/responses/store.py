"""Stored responses in Redis: one record per response under the state store's object key, filed
as built on the session or branch that holds its turns and on the response it continues (so a
purge of either reaches it, ``purge/store.py``'s closure)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis.asyncio as aioredis

from zumik_serve.responses.records import StoredResponse
from zumik_serve.state.outcomes import HandlePurged, ParentNotLive
from zumik_serve.state.store import REVOKED_PREFIX, RedisStateStore, object_key


class RedisResponseStore:
    def __init__(self, client: aioredis.Redis, state: RedisStateStore) -> None:
        self._redis = client
        self._state = state

    async def put(
        self, tenant: str, record: StoredResponse, parents: Sequence[str]
    ) -> bool | ParentNotLive | HandlePurged:
        """Store the record built on ``parents``, each still live (``ParentNotLive`` otherwise,
        and nothing is written; ``RedisStateStore.put_record``), counted in the tenant's objects
        and stored_bytes quotas with the state objects' (QuotaExceededError when it does not
        fit, and nothing is written)."""
        return await self._state.put_json(tenant, record.id, record.model_dump_json(), parents, live=parents)

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The live record (None when unknown, deleted, purged or another kind of object)."""
        raw = await self._redis.get(object_key(tenant, response_id))
        if raw is None or _revoked(raw):
            return None
        return _record(raw)

    async def get_many(self, tenant: str, response_ids: Sequence[str]) -> list[StoredResponse | None]:
        """Records live or deleted (a deleted response still holds its part of a later one's
        conversation); None where purged."""
        if not response_ids:
            return []
        raws = await self._redis.mget([object_key(tenant, rid) for rid in response_ids])
        # A deleted record is the same JSON with "revoked_at" first, which the model ignores.
        return [None if raw is None else _record(raw) for raw in raws]

    async def delete(self, tenant: str, response_id: str) -> bool:
        """Mark the record deleted (revoked); False when it was not live."""
        return await self._state.revoke(tenant, response_id)


def _revoked(raw: bytes | str) -> bool:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return text.startswith(REVOKED_PREFIX)


def _record(raw: bytes | str) -> StoredResponse | None:
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("object") != "response":
        return None
    return StoredResponse.model_validate(data)
