"""Tenants and API key digests in Redis.

zumik:tenant:{id}          hash   name, created_at_s, qos (comma-joined class names, absent:
                                  every class), reuse ("off" when the tenant keeps no ledger),
                                  profiles (comma-joined profile names, absent: every profile),
                                  deleting (while a deletion runs: its job, ``purge/deletion.py``)
zumik:tenant-name:{name}   string tenant id (names are unique)
zumik:apikey:{sha256}      string tenant id: what authentication reads
zumik:tenant-keys:{id}     hash   key id → {"sha256", "hint", "created_at_s"} (JSON): the
                                  tenant's keys, for listing and revoking. Keys created before
                                  this index have no entry; they still authenticate, are found by
                                  a SCAN of zumik:apikey:* and are listed as ``legacy``
zumik:salt-epoch:{id}      int    the epoch of the tenant's cache salt; a purge moves it on, so
                                  every KV block cached before is unreachable

The hash's encoding lives here only: callers get and give ``Tenant`` values.

Every change of the directory is one Lua script, so nothing is ever half done: a tenant's name
claim, record, first key and index entry appear together (``CREATE_TENANT``); a key is never
created for a tenant being deleted (``CREATE_KEY``); marking a tenant deleted and removing all
its keys is one step (``REVOKE_ALL``), and so is removing its record with its name
(``FORGET_TENANT``). The scripts name some keys they compute (the index's entries), which is
right for the single Redis primary Zumik runs on, not for Redis Cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from zumik_serve.errors import StoreUnavailableError
from zumik_serve.state.store import index_built_key
from zumik_serve.tenancy.tenant import (
    ApiKeyInfo,
    KeyId,
    Tenant,
    TenantId,
    hash_api_key,
    key_hint,
    key_id_of,
    new_api_key,
    new_tenant_id,
    validate_tenant_name,
)

SCAN_COUNT = 1000

# KEYS: name claim, tenant record, api key, key index, state-object lists built mark. ARGV:
# tenant id, key id, index entry, then the record's field, value pairs.
CREATE_TENANT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('SET', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
redis.call('SET', KEYS[5], 1)
return 1
"""

# KEYS: tenant record, api key, key index. ARGV: tenant id, key id, index entry.
CREATE_KEY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HEXISTS', KEYS[1], 'deleting') == 1 then return 'deleting' end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX') then return 'taken' end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return 'ok'
"""

# KEYS: key index, api key. ARGV: tenant id, key id. Returns 1 when a key was revoked.
REVOKE_KEY = """
local removed = redis.call('HDEL', KEYS[1], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  removed = 1
end
return removed
"""

# KEYS: tenant record, key index, then legacy api keys. ARGV: tenant id, deletion JSON.
# Marks the tenant deleted (first deletion wins) and removes every key; returns the deletion.
REVOKE_ALL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'deleting', ARGV[2])
for _, entry in ipairs(redis.call('HVALS', KEYS[2])) do
  local key = 'zumik:apikey:' .. cjson.decode(entry)['sha256']
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
redis.call('DEL', KEYS[2])
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
return redis.call('HGET', KEYS[1], 'deleting')
"""

# KEYS: tenant record. ARGV: deletion JSON. Never creates a record (0 when there is none).
SAVE_DELETION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'deleting', ARGV[1])
return 1
"""

# KEYS: tenant record, key index, salt epoch, name claim, then leftover keys. ARGV: tenant id.
FORGET_TENANT = """
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
for i = 1, #KEYS do
  if i ~= 4 then redis.call('UNLINK', KEYS[i]) end
end
return 1
"""


# KEYS: api key. ARGV: the tenant record's key prefix. What authentication reads, in one round
# trip: false for an unknown key, else {tenant id, the record's field, value pairs}.
TENANT_FOR_KEY = """
local tenant = redis.call('GET', KEYS[1])
if not tenant then return false end
return {tenant, redis.call('HGETALL', ARGV[1] .. tenant)}
"""


class TenantExistsError(ValueError):
    pass


class TenantNotFoundError(ValueError):
    pass


class TenantDeletingError(ValueError):
    """The tenant is being deleted: no new key, no new work; the deletion can only finish."""


@dataclass(frozen=True)
class TenantSummary:
    """A tenant as ``zumik tenant list`` shows it: ``keys`` counts its indexed keys (legacy keys
    are not counted); ``deleting`` while a deletion has started and not finished."""

    tenant: Tenant
    keys: int
    deleting: bool


class RedisTenantStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._create_tenant = client.register_script(CREATE_TENANT)
        self._create_key = client.register_script(CREATE_KEY)
        self._revoke_key = client.register_script(REVOKE_KEY)
        self._revoke_all = client.register_script(REVOKE_ALL)
        self._save_deletion = client.register_script(SAVE_DELETION)
        self._forget_tenant = client.register_script(FORGET_TENANT)
        self._tenant_for_key = client.register_script(TENANT_FOR_KEY)

    async def create_tenant(
        self, name: str, *, qos_classes: frozenset[str] | None = None, reuse_accounting: bool = True,
        profiles: frozenset[str] | None = None,
    ) -> tuple[Tenant, str]:  # fmt: skip
        """Create a tenant and its first API key; returns the key (shown once, never stored).
        ``qos_classes``: the QoS classes its requests may use (None: every class); ``profiles``:
        the profiles it may use (None: every profile)."""
        validate_tenant_name(name)
        tenant = Tenant(
            id=new_tenant_id(), name=name, created_at_s=int(time.time()), qos_classes=qos_classes,
            reuse_accounting=reuse_accounting, profiles=profiles,
        )  # fmt: skip
        api_key = new_api_key()
        key_hash = hash_api_key(api_key)
        fields = [part for item in _fields_of(tenant).items() for part in item]
        created = await self._create_tenant(
            keys=[
                _name_key(name),
                _tenant_key(tenant.id),
                _apikey_key(key_hash),
                _index_key(tenant.id),
                index_built_key(tenant.id),  # its state-object lists: nothing stored before them
            ],  # fmt: skip
            args=[tenant.id, key_id_of(key_hash), _index_entry(api_key, tenant.created_at_s), *fields],
        )
        if not created:
            raise TenantExistsError(f"tenant {name!r} already exists; pick another name")
        return tenant, api_key

    async def salt_epoch(self, tenant: TenantId) -> int:
        try:
            return int(await self._redis.get(salt_epoch_key(tenant)) or 0)
        except RedisError as exc:
            raise StoreUnavailableError(
                "the state store is unavailable; retry shortly", retry_after_s=1
            ) from exc

    async def rotate_salt_epoch(self, tenant: TenantId) -> int:
        """Move the tenant's salt epoch on; returns the new epoch."""
        return int(await self._redis.incr(salt_epoch_key(tenant)))

    async def tenant_for_key_hash(self, key_hash: str) -> Tenant | None:
        """The tenant whose key has the digest ``key_hash``, in one round trip
        (``TENANT_FOR_KEY``); None when the key or its tenant's record is gone."""
        try:
            found = await self._tenant_for_key(keys=[_apikey_key(key_hash)], args=[_tenant_key("")])
        except RedisError as exc:
            raise StoreUnavailableError(
                "the state store is unavailable; retry shortly", retry_after_s=1
            ) from exc
        if not found or not found[1]:
            return None
        pairs = [_text(part) for part in found[1]]
        return _tenant_of(TenantId(_text(found[0])), dict(zip(pairs[::2], pairs[1::2], strict=True)))

    # --- the directory, for the operator (``zumik tenant ...``) -------------------------------

    async def tenant_by_name(self, name: str) -> Tenant | None:
        """The tenant named ``name`` (being deleted or not); None when there is none."""
        validate_tenant_name(name)
        tenant_id = await self._redis.get(_name_key(name))
        if tenant_id is None:
            return None
        fields = await self._redis.hgetall(_tenant_key(_text(tenant_id)))
        if not fields:
            return None
        return _tenant_of(TenantId(_text(tenant_id)), {_text(k): _text(v) for k, v in fields.items()})

    async def require(self, name: str) -> Tenant:
        tenant = await self.tenant_by_name(name)
        if tenant is None:
            raise TenantNotFoundError(f"no tenant is named {name!r}; `zumik tenant list` shows them")
        return tenant

    async def list_tenants(self) -> list[TenantSummary]:
        """Every tenant, by name. One SCAN of the name claims: an operator's command, not a
        request path."""
        names = sorted(await self._scan(_name_key("*")))
        summaries: list[TenantSummary] = []
        for name_key in names:
            tenant = await self.tenant_by_name(name_key.removeprefix(_name_key("")))
            if tenant is None:
                continue
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hlen(_index_key(tenant.id))
                pipe.hexists(_tenant_key(tenant.id), "deleting")
                keys, deleting = await pipe.execute()
            summaries.append(TenantSummary(tenant, int(keys), bool(deleting)))
        return summaries

    async def create_key(self, tenant: Tenant) -> tuple[ApiKeyInfo, str]:
        """A new API key of ``tenant``: its info and the key (shown once, never stored)."""
        api_key = new_api_key()
        key_hash = hash_api_key(api_key)
        created_at_s = int(time.time())
        outcome = _text(
            await self._create_key(
                keys=[_tenant_key(tenant.id), _apikey_key(key_hash), _index_key(tenant.id)],
                args=[tenant.id, key_id_of(key_hash), _index_entry(api_key, created_at_s)],
            )
        )
        if outcome == "deleting":
            raise TenantDeletingError(
                f"tenant {tenant.name!r} is being deleted; finish it with `zumik tenant delete {tenant.name}`"
            )
        if outcome != "ok":  # "missing": deleted meanwhile; "taken": a 256-bit collision
            raise TenantNotFoundError(f"tenant {tenant.name!r} no longer exists")
        return ApiKeyInfo(key_id_of(key_hash), key_hint(api_key), created_at_s), api_key

    async def list_keys(self, tenant: TenantId) -> list[ApiKeyInfo]:
        """The tenant's keys, oldest first; legacy keys (no index entry) last, by id."""
        entries = await self._redis.hgetall(_index_key(tenant))
        keys = [
            ApiKeyInfo(KeyId(_text(key_id)), entry["hint"], int(entry["created_at_s"]))
            for key_id, entry in ((key_id, json.loads(raw)) for key_id, raw in entries.items())
        ]
        keys.sort(key=lambda info: (info.created_at_s or 0, info.id))
        indexed = {info.id for info in keys}
        legacy = [key_id_of(key_hash) for key_hash in await self._legacy_key_hashes(tenant)]
        keys += [ApiKeyInfo(key_id, None, None, True) for key_id in sorted(legacy) if key_id not in indexed]
        return keys

    async def revoke_key(self, tenant: TenantId, key_id: KeyId) -> bool:
        """Delete one key of ``tenant`` (False when it has no such key). Gateways refuse it within
        ``REVOCATION_BOUND_S``."""
        raw = await self._redis.hget(_index_key(tenant), key_id)
        if raw is not None:
            hashes = [json.loads(raw)["sha256"]]
        else:  # a legacy key: its id is the start of its digest
            prefix = key_id.removeprefix("key_")
            hashes = await self._legacy_key_hashes(tenant, prefix=prefix)
        revoked = False
        for key_hash in hashes:
            keys = [_index_key(tenant), _apikey_key(key_hash)]
            revoked = bool(await self._revoke_key(keys=keys, args=[tenant, key_id])) or revoked
        return revoked

    async def revoke_all_keys(self, tenant: TenantId, deletion: str) -> str | None:
        """Mark ``tenant`` deleted (its record keeps ``deletion``, unless an earlier deletion is
        there) and remove every key of it, at once; returns the deletion the record keeps, None
        when the tenant has no record."""
        legacy = [_apikey_key(key_hash) for key_hash in await self._legacy_key_hashes(tenant)]
        kept = await self._revoke_all(
            keys=[_tenant_key(tenant), _index_key(tenant), *legacy], args=[tenant, deletion]
        )
        return None if kept is None else _text(kept)

    async def deletion(self, tenant: TenantId) -> str | None:
        """The deletion the tenant's record keeps (None: not being deleted)."""
        raw = await self._redis.hget(_tenant_key(tenant), "deleting")
        return None if raw is None else _text(raw)

    async def save_deletion(self, tenant: TenantId, deletion: str) -> None:
        """Store the deletion's progress in the record (only while the record exists)."""
        if not await self._save_deletion(keys=[_tenant_key(tenant)], args=[deletion]):
            raise TenantNotFoundError(f"tenant {tenant} no longer exists")

    async def handles(self, tenant: TenantId) -> list[str]:
        """Every object handle the tenant holds (live or revoked), sorted."""
        prefix = f"z:{{{tenant}}}:o:"
        return sorted({key.removeprefix(prefix) for key in await self._scan(prefix + "*")})

    async def data_keys(self, tenant: TenantId) -> list[str]:
        """Every key under the tenant's prefixes, ``z:{tenant}:`` (its hash tag) and the untagged
        ``z:tenant:`` of older BYOK keys."""
        found: set[str] = set()
        for prefix in (f"z:{{{tenant}}}:", f"z:{tenant}:"):
            found.update(await self._scan(prefix + "*"))
        return sorted(found)

    async def unlink(self, keys: Sequence[str]) -> int:
        removed = 0
        for start in range(0, len(keys), SCAN_COUNT):
            removed += int(await self._redis.unlink(*keys[start : start + SCAN_COUNT]))
        return removed

    async def forget(self, tenant: Tenant) -> None:
        """Remove the record, key index, salt epoch and name claim of ``tenant`` and whatever is
        still under its prefixes, in one step: afterwards the name is free."""
        leftovers = await self.data_keys(tenant.id)
        await self._forget_tenant(
            keys=[_tenant_key(tenant.id), _index_key(tenant.id), salt_epoch_key(tenant.id),
                  _name_key(tenant.name), *leftovers],
            args=[tenant.id],
        )  # fmt: skip

    async def _scan(self, pattern: str) -> list[str]:
        return [_text(key) async for key in self._redis.scan_iter(match=pattern, count=SCAN_COUNT)]

    async def _legacy_key_hashes(self, tenant: TenantId, *, prefix: str = "") -> list[str]:
        """Digests of the tenant's keys made before the index (one SCAN of every key digest)."""
        found = await self._scan(_apikey_key(prefix + "*"))
        if not found:
            return []
        owners = await self._redis.mget(found)
        indexed = {
            json.loads(raw)["sha256"] for raw in (await self._redis.hgetall(_index_key(tenant))).values()
        }
        hashes = [key.removeprefix(_apikey_key("")) for key, owner in zip(found, owners, strict=True)
                  if owner is not None and _text(owner) == tenant]  # fmt: skip
        return sorted(h for h in hashes if h not in indexed)


def salt_epoch_key(tenant: str) -> str:
    """The key of the tenant's salt epoch (a request's release lookup reads it too,
    ``routing/store.py``)."""
    return f"zumik:salt-epoch:{tenant}"


def _name_key(name: str) -> str:
    return f"zumik:tenant-name:{name}"


def _tenant_key(tenant: str) -> str:
    return f"zumik:tenant:{tenant}"


def _apikey_key(key_hash: str) -> str:
    return f"zumik:apikey:{key_hash}"


def _index_key(tenant: str) -> str:
    return f"zumik:tenant-keys:{tenant}"


def _index_entry(api_key: str, created_at_s: int) -> str:
    return json.dumps(
        {"sha256": hash_api_key(api_key), "hint": key_hint(api_key), "created_at_s": created_at_s},
        separators=(",", ":"), sort_keys=True,
    )  # fmt: skip


def _fields_of(tenant: Tenant) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {"name": tenant.name, "created_at_s": tenant.created_at_s}
    if tenant.qos_classes is not None:
        fields["qos"] = ",".join(sorted(tenant.qos_classes))
    if not tenant.reuse_accounting:
        fields["reuse"] = "off"
    if tenant.profiles is not None:
        fields["profiles"] = ",".join(sorted(tenant.profiles))
    return fields


def _tenant_of(tenant_id: TenantId, fields: dict[str, str]) -> Tenant:
    return Tenant(
        id=tenant_id,
        name=fields["name"],
        created_at_s=int(fields["created_at_s"]),
        qos_classes=frozenset(fields["qos"].split(",")) if fields.get("qos") else None,
        reuse_accounting=fields.get("reuse") != "off",
        profiles=frozenset(fields["profiles"].split(",")) if fields.get("profiles") else None,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
