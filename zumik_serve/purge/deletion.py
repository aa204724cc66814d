"""TenantDeletion: every API key of a tenant revoked at once, then a purge of all it has, signed.

A deletion is a ``PurgeJob`` whose target is the tenant id, run with the purge's own steps
(``PurgeService.step``) except three it replaces:

    revoke    one script marks the tenant deleted (no key can be created for it any more) and
              removes every API key of it; after ``REVOCATION_BOUND_S`` no gateway accepts one
              (``tenancy/tenant.py``). Then every object of the tenant is revoked; the closure
              is the tenant id followed by every handle, and ``exposed`` is set: any request of
              the tenant may have left KV blocks under its cache salt, not only its objects
    rotate, keys, tiers           as a purge: every scope of the tenant (epochs 0..now) closes
    objects   nothing yet: the steps after it read what routing kept of the objects
    providers, decisions          as a purge, over every handle
    compact   every key under the tenant's prefix (objects, content, sessions, snapshots,
              bundles, releases and aliases, BYOK keys, the reuse ledger, decision records,
              quotas, purge jobs) is unlinked, but for its receipt log, and its unfinished purges
              are forgotten; then Redis rewrites its AOF as in a purge
    receipt   as a purge: the receipt continues the tenant's chain; its target is the tenant id

The job lives in the tenant's record (``deleting``), saved after every step, so running the
deletion again resumes it where it stopped, and a finished one gives the same receipt again.
``forget`` then removes the record, the receipt log, the key index, the salt epoch and the name
claim in one step: the name is free and no key carries the tenant id. The receipt is the
caller's to keep (``zumik tenant delete --receipt-out``): Zumik keeps no copy once forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import TypeAdapter

from zumik_serve.ids import HandleKind, new_handle
from zumik_serve.purge.job import PurgeId, PurgeJob, PurgeStatus, PurgeStep
from zumik_serve.purge.service import Checkpoint, PurgeService, Step
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.tenancy.store import RedisTenantStore, TenantNotFoundError
from zumik_serve.tenancy.tenant import REVOCATION_BOUND_S, Tenant, TenantId

_JOB: TypeAdapter[PurgeJob] = TypeAdapter(PurgeJob)
# Keys the compact step leaves for the receipt step: the tenant's receipt chain.
_RECEIPT_KEYS = ("receipt-head", "receipts", "receipt:")

# Called after each step is saved (tests stop a deletion there, as a crash would).
AfterStep = Callable[[PurgeStep], Awaitable[None]]


@dataclass(frozen=True)
class DeletionOutcome:
    """A finished deletion has the signed receipt; an unfinished one's job says which steps are
    done and why it stopped (``job.error``)."""

    tenant: Tenant
    job: PurgeJob
    receipt: dict[str, Any] | None


class TenantDeletion:
    def __init__(
        self,
        tenants: RedisTenantStore,
        purges: PurgeService,
        purge_store: RedisPurgeStore,
        *,
        revocation_wait_s: float = REVOCATION_BOUND_S,
        after_step: AfterStep | None = None,
    ) -> None:
        self._tenants = tenants
        self._purges = purges
        self._purge_store = purge_store
        self._revocation_wait_s = revocation_wait_s
        self._after_step = after_step
        replaced: dict[PurgeStep, Step] = {
            PurgeStep.REVOKE: self._revoke,
            PurgeStep.OBJECTS: self._defer_objects,
            PurgeStep.COMPACT: self._sweep_and_compact,
        }
        self._steps = {step: replaced.get(step) or purges.step(step) for step in PurgeStep}

    async def delete(self, name: str) -> DeletionOutcome:
        """Delete the tenant ``name``, or resume its deletion. ``TenantNotFoundError`` when no
        tenant has that name."""
        tenant = await self._tenants.require(name)
        new = PurgeJob(
            id=PurgeId(new_handle(HandleKind.RECEIPT)), target=tenant.id, created_at=int(time.time())
        )
        kept = await self._tenants.revoke_all_keys(tenant.id, _dumps(new))
        if kept is None:
            raise TenantNotFoundError(f"tenant {name!r} no longer exists")
        job = _JOB.validate_json(kept)
        if job.status is PurgeStatus.DONE:
            return DeletionOutcome(tenant, job, await self._purge_store.receipt(tenant.id, job.id))
        latest = job

        async def checkpoint(current: PurgeJob) -> None:
            nonlocal latest
            latest = current
            await self._tenants.save_deletion(tenant.id, _dumps(current))

        try:
            for step, run_step in self._steps.items():
                if step in latest.done:
                    continue
                await checkpoint((await run_step(tenant.id, latest, checkpoint)).finished(step))
                if self._after_step is not None:
                    await self._after_step(step)
        except Exception as exc:  # the job stays in the record; running the deletion again resumes it
            failed = latest.failed(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await self._tenants.save_deletion(tenant.id, _dumps(failed))
            return DeletionOutcome(tenant, failed, None)
        return DeletionOutcome(tenant, latest, await self._purge_store.receipt(tenant.id, latest.id))

    async def forget(self, outcome: DeletionOutcome) -> None:
        """After the receipt is kept elsewhere: remove what is left, free the name."""
        if outcome.receipt is None:
            raise ValueError("the deletion has not finished; run it again to resume it first")
        await self._tenants.forget(outcome.tenant)

    # --- the steps it replaces ----------------------------------------------------------------

    async def _revoke(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        # The keys went when the deletion started; an earlier run may have been cut short before
        # this step, so once more (it is idempotent), then wait until no gateway accepts them.
        await self._tenants.revoke_all_keys(TenantId(tenant), _dumps(job))
        await asyncio.sleep(self._revocation_wait_s)
        handles = await self._tenants.handles(TenantId(tenant))
        await self._purge_store.revoke_all(tenant, handles)
        return replace(job, closure=(tenant, *handles), exposed=True)

    async def _defer_objects(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        return job  # the compact step removes every key of the tenant, after the traces are read

    async def _sweep_and_compact(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        if job.compaction is None:
            await self._purge_store.drop_pending(tenant)
            keys = [
                key
                for key in await self._tenants.data_keys(TenantId(tenant))
                if not _receipt_key(tenant, key)
            ]
            removed = await self._tenants.unlink(keys)
            job = replace(job, removed_keys=(job.removed_keys or 0) + removed)
            await checkpoint(job)  # the count survives a crash during the rewrite
        return await self._purges.step(PurgeStep.COMPACT)(tenant, job, checkpoint)


def _receipt_key(tenant: str, key: str) -> bool:
    return any(key.startswith(f"z:{{{tenant}}}:{part}") for part in _RECEIPT_KEYS)


def _dumps(job: PurgeJob) -> str:
    return _JOB.dump_json(job, exclude_none=True).decode()
