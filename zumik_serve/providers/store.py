"""Tenants' own provider keys in Redis, sealed by ``KeyVault`` (plaintext never reaches Redis).

z:{tenant}:byok:{route}     string  sealed key (see ``zumik_serve.providers.byok``)
z:{tenant}:byok-index       hash    route → {"key_hint", "updated_at"} (JSON), for ``describe``
zumik:byok-master-key       string  32 random bytes, when ZUMIK_BYOK_MASTER_KEY is not set

Where the master key lives is a trade-off, chosen by the operator:

* Default, in Redis (``SET NX``, first writer wins, so every replica agrees): nothing to
  configure, and deleting that one Redis key crypto-erases every stored BYOK key. But the master
  key sits beside the values it seals: sealing then guards against a sealed value leaking alone
  (a log line, a partial dump, a value copied under another tenant), not against someone who
  holds the whole Redis dataset or its AOF files.
* ``ZUMIK_BYOK_MASTER_KEY`` (base64 of 32 bytes, e.g. from a secret manager): a Redis dump alone
  no longer yields keys. The operator must keep and distribute the key; losing it makes every
  stored BYOK key unreadable (tenants enter their keys again), and a wrong one fails every open.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.exceptions import RedisError

from zumik_serve.errors import StoreUnavailableError
from zumik_serve.providers.byok import MASTER_KEY_BYTES, KeyVault, mask

MASTER_KEY_ENV = "ZUMIK_BYOK_MASTER_KEY"
MASTER_KEY_REDIS_KEY = "zumik:byok-master-key"
ROUTE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


async def load_or_create_master_key(
    client: aioredis.Redis, environ: Mapping[str, str] | None = None
) -> bytes:
    """``ZUMIK_BYOK_MASTER_KEY`` when set (a bad value fails here, naming the variable), else the
    key in Redis, created once with 32 random bytes. See the module docstring for the trade-off."""
    env = os.environ if environ is None else environ
    configured = env.get(MASTER_KEY_ENV)
    if configured:
        try:
            key = base64.b64decode(configured, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{MASTER_KEY_ENV} is not valid base64") from None
        if len(key) != MASTER_KEY_BYTES:
            raise ValueError(f"{MASTER_KEY_ENV} must decode to {MASTER_KEY_BYTES} bytes, got {len(key)}")
        return key
    try:
        await client.set(MASTER_KEY_REDIS_KEY, secrets.token_bytes(MASTER_KEY_BYTES), nx=True)
        value = await client.get(MASTER_KEY_REDIS_KEY)
    except RedisError as exc:
        raise StoreUnavailableError("the state store is unavailable; retry shortly", retry_after_s=1) from exc
    if not isinstance(value, bytes) or len(value) != MASTER_KEY_BYTES:
        raise RuntimeError(f"Redis key {MASTER_KEY_REDIS_KEY} does not hold {MASTER_KEY_BYTES} bytes")
    return value


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


def _key(tenant: str, route: str) -> str:
    return f"z:{tenant}:byok:{route}"


def _index(tenant: str) -> str:
    return f"z:{tenant}:byok-index"


def _check(tenant: str, route: str) -> None:
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(f"invalid tenant id {tenant!r}")
    if not ROUTE_PATTERN.match(route):
        raise ValueError(f"invalid route name {route!r}: lower-case letters, digits, '.', '_', '-'")


def _unavailable() -> StoreUnavailableError:
    return StoreUnavailableError("the state store is unavailable; retry shortly", retry_after_s=1)
