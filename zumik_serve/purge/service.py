"""PurgeService: remove a target and what derives from it from every store, then sign a receipt.

A purge is a job kept in Redis and run as ordered, idempotent steps; each finished step is saved
before the next starts, so a purge cut short (a crash, a Redis outage) resumes where it stopped
and never signs more than it did:

    revoke    every handle of the closure stops resolving            (all surfaces, at once)
    rotate    the tenant's salt epoch moves on                         engine KV: unindexed
    keys      the data keys of the tenant's old scopes become tombstones; the opportunity
              index of those scopes is removed
    tiers     every block of those scopes leaves host RAM, Redis, disk (swept twice, the second
              time after engine processes' key caches expired)
    objects   records, content, turns, compilations, indexes, idempotency results
    compact   Redis rewrites its AOF; old files are gone               Redis: compacted
    receipt   classes per store → the receipt (weakest store, capped by the profile's ceiling),
              signed and appended to the tenant's hash-chained log

The KV steps run only when the closure's content may have reached an engine (``exposed``).
Sealed tier blocks count as crypto-erased only when their key's removal is compacted too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.keys import ScopeId, scope_id
from kvstore.tier import Tier, TierBackend
from kvstore.tiers.redis_keyring import KEY_CACHE_TTL_S
from zumik_serve.errors import NotFoundError
from zumik_serve.ids import HandleKind, handle_kind, new_handle
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.receipt import (
    ReceiptSigner,
    StoreEntry,
    StoreResult,
    build_receipt,
    public_key_record,
    receipt_hash,
)
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.tenancy.tenant import TenantId, cache_salt

STEPS = ("revoke", "rotate", "keys", "tiers", "objects", "compact", "receipt")
TIER_STORES = {Tier.HOST: "kv_host", Tier.REDIS: "kv_redis", Tier.DISK: "kv_disk"}
PURGEABLE = frozenset(
    {HandleKind.ARTIFACT, HandleKind.BUNDLE, HandleKind.SESSION, HandleKind.BRANCH, HandleKind.SNAPSHOT}
)


@dataclass(frozen=True)
class PurgeOutcome:
    """A finished purge has a receipt; an unfinished one says which steps are done and why not."""

    job: dict[str, Any]
    receipt: dict[str, Any] | None


class PurgeService:
    def __init__(
        self,
        store: RedisPurgeStore,
        *,
        profile: str,
        ceiling: GuaranteeClass,
        tiers: Sequence[TierBackend],
        sealed: bool,
        salt_secret: Callable[[], Awaitable[bytes]],
        salt_epoch: Callable[[TenantId], Awaitable[int]],
        rotate_salt_epoch: Callable[[TenantId], Awaitable[int]],
        forget_scopes: Callable[[list[str]], Awaitable[int]] | None = None,
        key_cache_ttl_s: float = KEY_CACHE_TTL_S,
        step_delay_s: float = 0.0,
    ) -> None:
        self._store = store
        self.profile = profile
        self.ceiling = ceiling
        self._tiers = list(tiers)
        self._sealed = sealed
        self._salt_secret = salt_secret
        self._salt_epoch = salt_epoch
        self._rotate_salt_epoch = rotate_salt_epoch
        self._forget_scopes = forget_scopes  # the opportunity index of purged scopes
        self._key_cache_ttl_s = key_cache_ttl_s
        self._step_delay_s = step_delay_s  # only to let tests stop a purge between steps
        self._signer: ReceiptSigner | None = None

    async def signer(self) -> ReceiptSigner:
        if self._signer is None:
            pem = await self._store.signing_key_pem(lambda: ReceiptSigner.generate().private_pem())
            self._signer = ReceiptSigner.from_pem(pem)
            await self._store.publish_public_key(self._signer.key_id, self._signer.public_pem())
        return self._signer

    async def public_keys(self) -> list[dict[str, Any]]:
        current = await self.signer()
        keys = [public_key_record(current)]
        for key_id, pem in sorted((await self._store.public_keys()).items()):
            if key_id != current.key_id:
                keys.append({"key_id": key_id, "algorithm": "ed25519", "public_key": pem.decode()})
        return keys

    async def receipt(self, tenant: str, receipt_id: str) -> dict[str, Any]:
        receipt = None
        if handle_kind(receipt_id) is HandleKind.RECEIPT:
            receipt = await self._store.receipt(tenant, receipt_id)
        if receipt is None:
            raise NotFoundError(
                f"No receipt {receipt_id!r} exists for you. Receipt ids come from POST /v2/purge.",
                code="receipt_not_found",
            )
        return receipt

    async def purge(self, tenant: str, target: Any) -> PurgeOutcome:
        """Purge ``target`` (or resume its purge); the same target always gets the same purge."""
        if not isinstance(target, str) or handle_kind(target) not in PURGEABLE:
            raise NotFoundError(
                f"No object {target!r} exists for you to purge. 'target' takes an artifact, bundle, "
                "session, branch or snapshot id.",
                param="target",
                code="object_not_found",
            )
        if await self._store.record_any(tenant, target) is None:
            job = await self._store.job_for_target(tenant, target)
            if job is None:
                raise NotFoundError(
                    f"No object {target!r} exists for you (unknown or another tenant's).",
                    param="target",
                    code="object_not_found",
                )
        else:
            job = {
                "id": new_handle(HandleKind.RECEIPT), "target": target, "status": "running",
                "created_at": int(time.time()), "done": [], "entries": {}, "error": None,
            }  # fmt: skip
            job = await self._store.claim(tenant, target, job)
        return await self.run(tenant, job)

    async def resume_pending(self) -> int:
        """Finish every purge a crash or an outage left unfinished; returns how many finished."""
        finished = 0
        for tenant, purge_id in await self._store.pending():
            job = await self._store.job(tenant, purge_id)
            if job is not None and (await self.run(tenant, job)).receipt is not None:
                finished += 1
        return finished

    async def run(self, tenant: str, job: dict[str, Any]) -> PurgeOutcome:
        if job["status"] == "done":
            return PurgeOutcome(job, await self._store.receipt(tenant, job["id"]))
        try:
            for step in STEPS:
                if step in job["done"]:
                    continue
                await getattr(self, f"_step_{step}")(tenant, job)
                job["done"].append(step)
                job["status"] = "done" if step == "receipt" else "running"
                job["error"] = None
                await self._store.save_job(tenant, job)
                if self._step_delay_s:
                    await asyncio.sleep(self._step_delay_s)
        except Exception as exc:  # the job stays pending; saying so is the answer
            job["status"] = "incomplete"
            job["error"] = f"{type(exc).__name__}: {exc}"[:500]
            with contextlib.suppress(Exception):  # Redis itself is down: the job stays pending there
                await self._store.save_job(tenant, job)
            return PurgeOutcome(job, None)
        return PurgeOutcome(job, await self._store.receipt(tenant, job["id"]))

    # --- steps -------------------------------------------------------------------------------

    async def _step_revoke(self, tenant: str, job: dict[str, Any]) -> None:
        job["closure"] = await self._store.closure(tenant, job["target"])
        job["exposed"] = await self._store.any_exposed(tenant, job["closure"])
        await self._store.index_purged(tenant, job["closure"], job["id"])
        await self._store.revoke_all(tenant, job["closure"])

    async def _step_rotate(self, tenant: str, job: dict[str, Any]) -> None:
        if not job["exposed"]:
            return
        tenant_id = TenantId(tenant)
        if job.get("old_epoch") is None:
            job["old_epoch"] = await self._salt_epoch(tenant_id)
            await self._store.save_job(tenant, job)  # a resumed job must not rotate twice
        if await self._salt_epoch(tenant_id) <= job["old_epoch"]:
            await self._rotate_salt_epoch(tenant_id)
        job["entries"]["kv_engine"] = _entry(
            "kv_engine", "salt_epoch_rotated", GuaranteeClass.UNINDEXED,
            "cached blocks are unreachable under the new cache salt; engine memory is not zeroed",
        )  # fmt: skip

    async def _step_keys(self, tenant: str, job: dict[str, Any]) -> None:
        if not job["exposed"]:
            return
        secret = await self._salt_secret()
        job["scopes"] = [
            scope_id(cache_salt(secret, TenantId(tenant), epoch)) for epoch in range(job["old_epoch"] + 1)
        ]
        await self._store.destroy_data_keys(job["scopes"])
        if self._forget_scopes is not None:
            await self._forget_scopes(job["scopes"])

    async def _step_tiers(self, tenant: str, job: dict[str, Any]) -> None:
        if not job["exposed"] or not self._tiers:
            return
        scopes = job["scopes"]
        counts = await asyncio.to_thread(_sweep, self._tiers, scopes)
        # Engine processes cache data keys briefly; after that nothing can write these scopes.
        await asyncio.sleep(self._key_cache_ttl_s + 0.2)
        again = await asyncio.to_thread(_sweep, self._tiers, scopes)
        for tier, name in TIER_STORES.items():
            if tier in counts:
                job["entries"][name] = {"removed_blocks": counts[tier] + again[tier]}

    async def _step_objects(self, tenant: str, job: dict[str, Any]) -> None:
        job["removed_keys"] = await self._store.delete_objects(tenant, job["closure"])

    async def _step_compact(self, tenant: str, job: dict[str, Any]) -> None:
        compaction = await self._store.compact()
        job["compaction"] = {"done": compaction.done, "detail": compaction.detail}

    async def _step_receipt(self, tenant: str, job: dict[str, Any]) -> None:
        if await self._store.receipt(tenant, job["id"]) is not None:
            return  # signed and appended before a crash
        signer = await self.signer()
        stores = self._store_entries(job)
        while True:
            head = await self._store.chain_head(tenant)
            seq = 1 if head is None else int(head["seq"]) + 1
            unsigned = build_receipt(
                receipt_id=job["id"], tenant=tenant, target=job["target"], issued_at=int(time.time()),
                profile=self.profile, profile_ceiling=self.ceiling, stores=stores, purged=job["closure"],
                seq=seq, prev_receipt_hash=None if head is None else head["hash"],
            )  # fmt: skip
            receipt = signer.sign(unsigned)
            new_head = {"seq": seq, "hash": receipt_hash(receipt)}
            if await self._store.append_receipt(tenant, receipt, head, new_head):
                return
            if await self._store.receipt(tenant, job["id"]) is not None:
                return  # another gateway resuming this job signed it

    def _store_entries(self, job: dict[str, Any]) -> list[StoreEntry]:
        """What each store that held the data reached, from the steps' saved results."""
        compacted = bool(job["compaction"]["done"])
        redis_class = GuaranteeClass.COMPACTED if compacted else GuaranteeClass.DELETED
        entries = [
            StoreEntry(
                store="redis_state",
                action="unlink" + ("+aof_rewrite" if compacted else ""),
                result=StoreResult.DONE,
                guarantee_class=redis_class,
                detail=f"{job.get('removed_keys', 0)} keys removed; {job['compaction']['detail']}",
            )
        ]
        if "kv_engine" in job["entries"]:
            entries.append(StoreEntry.from_json(job["entries"]["kv_engine"]))
        erased = self._sealed and compacted
        for name, sealed_class, plain_class in (
            ("kv_host", GuaranteeClass.DELETED, GuaranteeClass.DELETED),
            ("kv_redis", GuaranteeClass.CRYPTO_ERASED, redis_class),
            ("kv_disk", GuaranteeClass.CRYPTO_ERASED, GuaranteeClass.DELETED),
        ):
            if name not in job["entries"]:
                continue
            cls = sealed_class if erased and name != "kv_host" else plain_class
            action = ("key_destroyed+" if erased and name != "kv_host" else "") + "unlink_scope"
            removed = job["entries"][name]["removed_blocks"]
            entries.append(StoreEntry(name, action, StoreResult.DONE, cls, f"{removed} blocks removed"))
        return entries


def _sweep(tiers: Sequence[TierBackend], scopes: Sequence[str]) -> dict[Tier, int]:
    counts: dict[Tier, int] = {}
    for tier in tiers:
        counts[tier.tier] = sum(tier.remove_scope(ScopeId(scope)) for scope in scopes)
    return counts


def _entry(store: str, action: str, cls: GuaranteeClass, detail: str) -> dict[str, Any]:
    return StoreEntry(store, action, StoreResult.DONE, cls, detail).to_json()
