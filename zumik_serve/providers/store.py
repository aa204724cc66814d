"""Tenants' own provider keys in Redis, sealed by ``KeyVault`` (plaintext never reaches Redis).

z:{tenant}:byok:{route}     string  sealed key (see ``zumik_serve.providers.byok``)
z:{tenant}:byok-index       hash    route → {"key_hint", "updated_at"} (JSON), for ``describe``

The ``{tenant}`` is a hash tag: one tenant's BYOK keys share a Redis Cluster slot, as its other
keys do. Versions before it wrote ``z:<tenant>:byok:...`` without the braces;
``tag_untagged_keys`` (run by ``zumik secrets migrate``) moves those under the tagged names.

The master key that seals them is a file (``byok-master.key``) or ``ZUMIK_BYOK_MASTER_KEY``
(``server_secrets.py``), never in Redis: a copy of the Redis dataset or its AOF files alone
yields no provider key. Losing the master key makes every stored BYOK key unreadable (tenants
enter their keys again); a wrong one fails every open.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.exceptions import RedisError

from zumik_serve.errors import StoreUnavailableError
from zumik_serve.providers.byok import KeyVault, mask

ROUTE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UNTAGGED_KEY = re.compile(r"z:(?P<tenant>[A-Za-z0-9_-]{1,64}):byok:(?P<route>[a-z0-9][a-z0-9._-]{0,63})")
_UNTAGGED_INDEX = re.compile(r"z:(?P<tenant>[A-Za-z0-9_-]{1,64}):byok-index")


@dataclass(frozen=True)
class ByokKeyInfo:
    """Which key a route has, without the key: ``key_hint`` is its masked form (``mask``) and
    ``updated_at`` when it was stored (unix seconds)."""

    route: str
    key_hint: str
    updated_at: int

    def to_json(self) -> dict[str, Any]:
        return _KEY_INFO.dump_python(self, mode="json")


@dataclass(frozen=True)
class _IndexEntry:
    """A route's entry in the index hash (the route is the hash field)."""

    key_hint: str
    updated_at: int


_KEY_INFO: TypeAdapter[ByokKeyInfo] = TypeAdapter(ByokKeyInfo)
_INDEX_ENTRY: TypeAdapter[_IndexEntry] = TypeAdapter(_IndexEntry)


class RedisByokStore:
    """Put, read, delete and list a tenant's provider keys, one per route."""

    def __init__(self, client: aioredis.Redis, vault: KeyVault) -> None:
        self._redis = client
        self._vault = vault

    def __repr__(self) -> str:
        return "RedisByokStore(vault=<redacted>)"

    async def put(self, tenant: str, route: str, api_key: str) -> ByokKeyInfo:
        """Seal and store the route's key (replacing one set before); what ``describe`` now
        lists for the route."""
        _check(tenant, route)
        sealed = self._vault.seal(tenant, route, api_key)
        entry = _IndexEntry(key_hint=mask(api_key), updated_at=int(time.time()))
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(_key(tenant, route), sealed)
                pipe.hset(_index(tenant), route, _INDEX_ENTRY.dump_json(entry))
                await pipe.execute()
        except RedisError as exc:
            raise _unavailable() from exc
        return ByokKeyInfo(route=route, key_hint=entry.key_hint, updated_at=entry.updated_at)

    async def get(self, tenant: str, route: str) -> str | None:
        """The plaintext key, None when none is set; ``SealedKeyError`` if the stored value does
        not open (another master key, or a value copied from elsewhere)."""
        _check(tenant, route)
        try:
            sealed = await self._redis.get(_key(tenant, route))
        except RedisError as exc:
            raise _unavailable() from exc
        if sealed is None:
            return None
        return self._vault.open(tenant, route, sealed if isinstance(sealed, bytes) else sealed.encode())

    async def delete(self, tenant: str, route: str) -> bool:
        """True when a key was set and is now gone."""
        _check(tenant, route)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(_key(tenant, route))
                pipe.hdel(_index(tenant), route)
                removed, _ = await pipe.execute()
        except RedisError as exc:
            raise _unavailable() from exc
        return bool(removed)

    async def describe(self, tenant: str) -> list[ByokKeyInfo]:
        """Which routes have a key, with a masked hint; sorted by route. No key is opened."""
        if not TENANT_PATTERN.match(tenant):
            raise ValueError(f"invalid tenant id {tenant!r}")
        try:
            entries = await self._redis.hgetall(_index(tenant))
        except RedisError as exc:
            raise _unavailable() from exc
        result: list[ByokKeyInfo] = []
        for raw_route, raw_entry in entries.items():
            entry = _INDEX_ENTRY.validate_json(raw_entry)
            route = raw_route.decode() if isinstance(raw_route, bytes) else raw_route
            result.append(ByokKeyInfo(route=route, key_hint=entry.key_hint, updated_at=entry.updated_at))
        return sorted(result, key=lambda item: item.route)


async def tag_untagged_keys(client: aioredis.Redis) -> int:
    """Move every BYOK key and index an earlier version stored without the ``{tenant}`` hash tag
    under its tagged name; returns how many Redis keys moved. A tagged value already there (the
    tenant set the key again since) wins over the old one. Safe to run again after a crash: each
    key is copied before the old name is deleted."""
    moved = 0
    async for raw in client.scan_iter(match="z:*:byok*", count=1000):
        name = raw.decode() if isinstance(raw, bytes) else raw
        if (found := _UNTAGGED_KEY.fullmatch(name)) is not None:
            value = await client.get(name)
            if value is not None:
                await client.set(_key(found["tenant"], found["route"]), value, nx=True)
        elif (found := _UNTAGGED_INDEX.fullmatch(name)) is not None:
            for route, entry in (await client.hgetall(name)).items():
                await client.hsetnx(_index(found["tenant"]), route, entry)
        else:
            continue
        moved += int(await client.delete(name))
    return moved


def _key(tenant: str, route: str) -> str:
    return f"z:{{{tenant}}}:byok:{route}"


def _index(tenant: str) -> str:
    return f"z:{{{tenant}}}:byok-index"


def _check(tenant: str, route: str) -> None:
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(f"invalid tenant id {tenant!r}")
    if not ROUTE_PATTERN.match(route):
        raise ValueError(f"invalid route name {route!r}: lower-case letters, digits, '.', '_', '-'")


def _unavailable() -> StoreUnavailableError:
    return StoreUnavailableError("the state store is unavailable; retry shortly", retry_after_s=1)
