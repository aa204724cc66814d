"""Tenants and API key digests in Redis.

zumik:tenant:{id}          hash   name, created_at_s, qos (comma-joined class names, absent:
                                  every class), reuse ("off" when the tenant keeps no ledger)
zumik:tenant-name:{name}   string tenant id (names are unique)
zumik:apikey:{sha256}      string tenant id
zumik:salt-epoch:{id}      int    the epoch of the tenant's cache salt; a purge moves it on, so
                                  every KV block cached before is unreachable

The hash's encoding lives here only: callers get and give ``Tenant`` values.
"""

from __future__ import annotations

import secrets
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from zumik_serve.errors import StoreUnavailableError
from zumik_serve.tenancy.tenant import (
    Tenant,
    TenantId,
    hash_api_key,
    new_api_key,
    new_tenant_id,
    validate_tenant_name,
)


class TenantExistsError(ValueError):
    pass


class RedisTenantStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def create_tenant(
        self, name: str, *, qos_classes: frozenset[str] | None = None, reuse_accounting: bool = True
    ) -> tuple[Tenant, str]:
        """Create a tenant and its first API key; returns the key (shown once, never stored).
        ``qos_classes``: the QoS classes its requests may use (None: every class)."""
        validate_tenant_name(name)
        tenant = Tenant(
            id=new_tenant_id(), name=name, created_at_s=int(time.time()), qos_classes=qos_classes,
            reuse_accounting=reuse_accounting,
        )  # fmt: skip
        api_key = new_api_key()
        claimed = await self._redis.set(f"zumik:tenant-name:{name}", tenant.id, nx=True)
        if not claimed:
            raise TenantExistsError(f"tenant {name!r} already exists; pick another name")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(f"zumik:tenant:{tenant.id}", mapping=_fields_of(tenant))
            pipe.set(f"zumik:apikey:{hash_api_key(api_key)}", tenant.id)
            await pipe.execute()
        return tenant, api_key

    async def server_secret(self, name: str) -> bytes:
        """A 32-byte server secret kept in Redis, created once (first writer wins)."""
        key = f"zumik:secret:{name}"
        try:
            await self._redis.set(key, secrets.token_bytes(32), nx=True)
            value = await self._redis.get(key)
        except RedisError as exc:
            raise StoreUnavailableError(
                "the state store is unavailable; retry shortly", retry_after_s=1
            ) from exc
        if value is None:
            raise StoreUnavailableError("the server secret could not be read; retry shortly", retry_after_s=1)
        return value if isinstance(value, bytes) else value.encode()

    async def salt_epoch(self, tenant: TenantId) -> int:
        try:
            return int(await self._redis.get(f"zumik:salt-epoch:{tenant}") or 0)
        except RedisError as exc:
            raise StoreUnavailableError(
                "the state store is unavailable; retry shortly", retry_after_s=1
            ) from exc

    async def rotate_salt_epoch(self, tenant: TenantId) -> int:
        """Move the tenant's salt epoch on; returns the new epoch."""
        return int(await self._redis.incr(f"zumik:salt-epoch:{tenant}"))

    async def tenant_for_key_hash(self, key_hash: str) -> Tenant | None:
        try:
            tenant_id = await self._redis.get(f"zumik:apikey:{key_hash}")
            if tenant_id is None:
                return None
            tenant_id = _text(tenant_id)
            fields = await self._redis.hgetall(f"zumik:tenant:{tenant_id}")
        except RedisError as exc:
            raise StoreUnavailableError(
                "the state store is unavailable; retry shortly", retry_after_s=1
            ) from exc
        if not fields:
            return None
        return _tenant_of(TenantId(tenant_id), {_text(k): _text(v) for k, v in fields.items()})


def _fields_of(tenant: Tenant) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {"name": tenant.name, "created_at_s": tenant.created_at_s}
    if tenant.qos_classes is not None:
        fields["qos"] = ",".join(sorted(tenant.qos_classes))
    if not tenant.reuse_accounting:
        fields["reuse"] = "off"
    return fields


def _tenant_of(tenant_id: TenantId, fields: dict[str, str]) -> Tenant:
    return Tenant(
        id=tenant_id,
        name=fields["name"],
        created_at_s=int(fields["created_at_s"]),
        qos_classes=frozenset(fields["qos"].split(",")) if fields.get("qos") else None,
        reuse_accounting=fields.get("reuse") != "off",
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
