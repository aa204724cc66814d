"""PurgeService: remove a target and what derives from it from every store, then sign a receipt.

A purge is a job (``purge/job.py``) kept in Redis and run as ordered, idempotent steps; each
finished step is saved before the next starts, so a purge cut short (a crash, a Redis outage)
resumes where it stopped and never signs more than it did. ``PurgeService._steps`` is the table
of step → method:

    revoke    every handle of the closure stops resolving            (all surfaces, at once)
    rotate    the tenant's salt epoch moves on                         engine KV: unindexed
    keys      the data keys of the tenant's old scopes become tombstones; the opportunity
              index of those scopes is removed
    tiers     every block of those scopes leaves host RAM, Redis, disk (swept twice, the second
              time after engine processes' key caches expired); host RAM and disk on every node
              (``purge/nodes.py``), each node listed, a node not swept lowering its store
    objects   records, content, turns, compilations, indexes, idempotency results
    providers the managed/BYOK routes the closure's content was sent to (recorded at send time)
                                                                       provider: provider_expiry
    decisions decision records whose prompt carried the closure's content are removed
    compact   Redis rewrites its AOF; old files are gone; claimed only with AOF on, appendfsync
              always and RDB snapshots off                             Redis: compacted
    receipt   classes per store → the receipt (weakest store, capped by the profile's ceiling),
              signed and appended to the tenant's hash-chained log

The KV steps run only when the closure's content may have reached an engine (``exposed``),
read after the revoke: a request marks an object exposed only while it is live, so one racing
the purge is either seen here or refused (404) before it sends anything.
Sealed tier blocks count as crypto-erased only when their key's removal is compacted too.

A purge whose target is the tenant's own id purges its cache scope: what plain ``/v1``
requests (which have no handle) left in the KV caches. Its steps are the purge's, but for three
(``_scope_steps``): revoke names the tenant as the closure and counts it exposed (no object is
revoked), objects removes nothing, and providers lists every route the tenant's content reached
without dropping the tenant's own record of them (a later deletion still names them). Each
such request starts a new purge (the scope is used again after one), unless one is unfinished:
then it resumes that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvstore.keys import ScopeId, scope_id
from kvstore.tier import Tier, TierBackend
from kvstore.tiers.redis_keyring import KEY_CACHE_TTL_S
from zumik_serve.errors import NotFoundError, RateLimitExceededError
from zumik_serve.ids import HandleKind, handle_kind, new_handle
from zumik_serve.purge.classes import GuaranteeClass, weakest
from zumik_serve.purge.derived import RoutingTraces, decision_entry, provider_entries, reuse_index_entry
from zumik_serve.purge.job import PurgeId, PurgeJob, PurgeStatus, PurgeStep, TierSweep, saved
from zumik_serve.purge.nodes import NODE_TIERS, LocalNodeSweeper, NodeReport, NodeSweeper, merge_passes
from zumik_serve.purge.receipt import (
    FIRST_SEQ,
    ChainHead,
    NodeEntry,
    PublicKeyRecord,
    ReceiptSigner,
    StoreEntry,
    StoreResult,
    build_receipt,
    receipt_hash,
)
from zumik_serve.purge.signing_keys import SigningKeys
from zumik_serve.purge.store import ReceiptPage, RedisPurgeStore
from zumik_serve.tenancy.tenant import TenantId, cache_salt

logger = logging.getLogger("ray.serve")

PURGEABLE = frozenset(
    {HandleKind.ARTIFACT, HandleKind.BUNDLE, HandleKind.SESSION, HandleKind.BRANCH, HandleKind.SNAPSHOT}
)
# What the rotate step reached in engines: their cached blocks are unreachable, not erased.
ENGINE_ENTRY = StoreEntry(
    "kv_engine", "salt_epoch_rotated", StoreResult.DONE, GuaranteeClass.UNINDEXED,
    "cached blocks are unreachable under the new cache salt; engine memory is not zeroed",
)  # fmt: skip

# Saves a job part way through a step, for a step that must not repeat what it already did.
Checkpoint = Callable[[PurgeJob], Awaitable[None]]
# One step: (tenant, job, checkpoint) → the job with the step's result (``run`` saves it).
Step = Callable[[str, PurgeJob, Checkpoint], Awaitable[PurgeJob]]


@dataclass(frozen=True)
class PurgeOutcome:
    """A finished purge has a receipt; an unfinished one says which steps are done and why not."""

    job: PurgeJob
    receipt: dict[str, Any] | None  # the signed receipt's JSON object


class PurgeService:
    """Runs purges (``purge``; ``resume_pending`` at start) and serves their receipts and the
    keys that signed them. Purges of one tenant may run at once: the chain head decides order."""

    def __init__(
        self,
        store: RedisPurgeStore,
        *,
        signing_keys: SigningKeys,
        profile: str,
        ceiling: GuaranteeClass,
        tiers: Sequence[TierBackend],
        sealed: bool,
        salt_secret: Callable[[], Awaitable[bytes]],
        salt_epoch: Callable[[TenantId], Awaitable[int]],
        rotate_salt_epoch: Callable[[TenantId], Awaitable[int]],
        forget_scopes: Callable[[list[str]], Awaitable[int]] | None = None,
        traces: RoutingTraces | None = None,
        key_cache_ttl_s: float = KEY_CACHE_TTL_S,
        step_delay_s: float = 0.0,
        nodes: NodeSweeper | None = None,
        max_per_minute: int | None = None,
    ) -> None:
        """``tiers``: the connector's tiers as this process builds them. The Redis tier is swept
        from here; the node tiers (host RAM, disk) by ``nodes`` on every node of the cluster
        (None: this process's own node tiers, the one node of a gateway without Ray).
        ``max_per_minute``: new purges a tenant may start in a minute (None: no bound, for the
        operator's tools); past it, 429 with Retry-After."""
        self._store = store
        self._running: set[str] = set()  # ids of the jobs this process is running now
        self._max_per_minute = max_per_minute
        self.profile = profile
        self.ceiling = ceiling
        self._tiers = [tier for tier in tiers if tier.tier not in NODE_TIERS]
        self._nodes = nodes if nodes is not None else LocalNodeSweeper(tiers)
        self._sealed = sealed
        self._salt_secret = salt_secret
        self._salt_epoch = salt_epoch
        self._rotate_salt_epoch = rotate_salt_epoch
        self._forget_scopes = forget_scopes  # the opportunity index of purged scopes
        self._traces = traces  # provider reach and decision records (None: nothing recorded)
        self._key_cache_ttl_s = key_cache_ttl_s
        self._step_delay_s = step_delay_s  # only to let tests stop a purge between steps
        self._signing_keys = signing_keys
        # Every step, in the order it runs.
        self._steps: dict[PurgeStep, Step] = {
            PurgeStep.REVOKE: self._revoke,
            PurgeStep.ROTATE: self._rotate,
            PurgeStep.KEYS: self._destroy_keys,
            PurgeStep.TIERS: self._sweep_tiers,
            PurgeStep.OBJECTS: self._delete_objects,
            PurgeStep.PROVIDERS: self._providers,
            PurgeStep.DECISIONS: self._decisions,
            PurgeStep.COMPACT: self._compact,
            PurgeStep.RECEIPT: self._sign_receipt,
        }
        if list(self._steps) != list(PurgeStep):
            raise RuntimeError("the purge step table must list every PurgeStep, in order")
        # A purge of the tenant's cache scope (the target is the tenant id): three steps differ.
        self._scope_steps: dict[PurgeStep, Step] = {
            **self._steps,
            PurgeStep.REVOKE: self._revoke_scope,
            PurgeStep.OBJECTS: self._no_objects,
            PurgeStep.PROVIDERS: self._scope_providers,
        }

    def step(self, step: PurgeStep) -> Step:
        """The method that runs ``step``: a tenant deletion (``purge/deletion.py``) runs the
        purge's own steps but for the ones it replaces."""
        return self._steps[step]

    async def signer(self) -> ReceiptSigner:
        """The key that signs receipts now (a rotation reaches it without a restart)."""
        return self._signing_keys.signer()

    async def public_keys(self) -> list[PublicKeyRecord]:
        """The current signing key, then every retired one (their receipts still verify)."""
        return self._signing_keys.public_keys()

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

    async def receipts(self, tenant: str, limit: int, after: str | None) -> ReceiptPage:
        """A page of the tenant's receipts, newest first (``limit``, ``after``: as checked by
        ``validation.page_query``); 404 when ``after`` is none of its receipts."""
        page = await self._store.receipt_page(tenant, limit, after)
        if page is None:
            raise NotFoundError(
                f"No receipt {after!r} exists for you: 'after' takes the last_id of the page before.",
                code="receipt_not_found", param="after",
            )  # fmt: skip
        return page

    async def purge(self, tenant: str, target: str) -> PurgeOutcome:
        """Purge ``target`` (or resume its purge); the same target always gets the same purge.
        ``target`` the tenant's own id: its cache scope, a new purge unless one is unfinished."""
        if target == tenant:
            unfinished = await self._store.unfinished_scope_purge(tenant)
            if unfinished is not None:
                return await self.run(tenant, unfinished)
            await self._admit(tenant)
            new = PurgeJob(
                id=PurgeId(new_handle(HandleKind.RECEIPT)), target=tenant, created_at=int(time.time())
            )
            return await self.run(tenant, await self._store.start_scope_purge(tenant, new))
        if handle_kind(target) not in PURGEABLE:
            raise NotFoundError(
                f"No object {target!r} exists for you to purge. 'target' takes an artifact, bundle, "
                "session, branch or snapshot id, or your tenant id (your cache scope).",
                param="target",
                code="object_not_found",
            )
        found = await self._store.job_for_target(tenant, target)
        if found is not None:  # resumed, or its receipt again: no new work
            return await self.run(tenant, found)
        if not await self._store.exists(tenant, target):
            raise NotFoundError(
                f"No object {target!r} exists for you (unknown or another tenant's).",
                param="target",
                code="object_not_found",
            )
        await self._admit(tenant)
        new = PurgeJob(id=PurgeId(new_handle(HandleKind.RECEIPT)), target=target, created_at=int(time.time()))
        return await self.run(tenant, await self._store.claim(tenant, new))

    async def _admit(self, tenant: str) -> None:
        """Count a new purge of ``tenant`` against ``max_per_minute``; 429 past it."""
        if self._max_per_minute is None:
            return
        retry_after_s = await self._store.take_purge_slot(tenant, self._max_per_minute)
        if retry_after_s is not None:
            raise RateLimitExceededError(
                f"You started {self._max_per_minute} purges this minute, as many as this deployment "
                f"allows (each rewrites the state store and sweeps every KV tier). Retry after "
                f"{retry_after_s} s; a purge already started resumes without waiting.",
                retry_after_s=retry_after_s,
            )

    async def resume_pending(self) -> int:
        """Finish every purge a crash or an outage left unfinished; returns how many finished."""
        finished = 0
        for pending in await self._store.pending():
            try:
                job = await self._store.job(pending.tenant, pending.purge_id)
            except ValueError as exc:  # a damaged job stays pending; the others still finish
                logger.error(
                    "zumik: purge %s of %s cannot be read: %s", pending.purge_id, pending.tenant, exc
                )
                continue
            if job is not None and (await self.run(pending.tenant, job)).receipt is not None:
                finished += 1
        return finished

    async def run(self, tenant: str, job: PurgeJob) -> PurgeOutcome:
        """Run the steps ``job`` has not done, saving it after each; a step that fails leaves it
        incomplete (and pending) with the error, and the outcome has no receipt. A job this
        process is running already is not run a second time beside it: the outcome is the job
        as it is, without a receipt (asking again costs nothing, which the rate of new purges
        relies on)."""
        if job.status is PurgeStatus.DONE:
            return PurgeOutcome(job, await self._store.receipt(tenant, job.id))
        if job.id in self._running:
            return PurgeOutcome(job, None)
        self._running.add(job.id)
        try:
            return await self._run(tenant, job)
        finally:
            self._running.discard(job.id)

    async def _run(self, tenant: str, job: PurgeJob) -> PurgeOutcome:
        latest = job

        async def checkpoint(current: PurgeJob) -> None:
            nonlocal latest
            latest = current
            await self._store.save_job(tenant, current)

        steps = self._scope_steps if job.target == tenant else self._steps
        try:
            for step, run_step in steps.items():
                if step in latest.done:
                    continue
                await checkpoint((await run_step(tenant, latest, checkpoint)).finished(step))
                if self._step_delay_s:
                    await asyncio.sleep(self._step_delay_s)
        except Exception as exc:  # the job stays pending; saying so is the answer
            failed = latest.failed(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):  # Redis itself is down: the job stays pending there
                await self._store.save_job(tenant, failed)
            return PurgeOutcome(failed, None)
        return PurgeOutcome(latest, await self._store.receipt(tenant, latest.id))

    # --- steps: each returns the job with its result; ``run`` saves it ------------------------

    async def _revoke(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        # Read the closure again after each revoke: an object built on it in between (a snapshot
        # of a session being purged) is found by the next read. A new object is written with its
        # links only while the objects it reads are live (``StateStore.put_record``), so once a
        # read finds nothing new, nothing more can be built on the closure.
        closure: tuple[str, ...] = ()
        while new := [h for h in await self._store.closure(tenant, job.target) if h not in closure]:
            await self._store.index_purged(tenant, new, job.id)
            await self._store.revoke_all(tenant, new)
            closure += tuple(new)
        # Read after the revoke: a request marks an object exposed only while it is live
        # (``StateStore.mark_exposed``), so a mark this read misses was refused, and that
        # request sent nothing. Read before it, a request marking in between went unseen.
        exposed = await self._store.any_exposed(tenant, closure)
        return replace(job, closure=closure, exposed=exposed)

    async def _revoke_scope(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        # Plain requests leave no object: the scope itself may hold what any of them sent.
        return replace(job, closure=(tenant,), exposed=True)

    async def _no_objects(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        return replace(job, removed_keys=0)

    async def _scope_providers(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        # The tenant's own line names every route any of its content reached (a send is recorded
        # before it leaves); it stays for the tenant's deletion, whose receipt must name them too.
        if self._traces is None:
            return replace(job, providers=())
        return replace(job, providers=tuple(await self._traces.reached(tenant, (tenant,))))

    async def _rotate(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        if not saved(job.exposed, "exposed"):
            return job
        tenant_id = TenantId(tenant)
        if job.old_epoch is None:
            job = replace(job, old_epoch=await self._salt_epoch(tenant_id))
            await checkpoint(job)  # a resumed job must not rotate twice
        if await self._salt_epoch(tenant_id) <= saved(job.old_epoch, "old_epoch"):
            await self._rotate_salt_epoch(tenant_id)
        return replace(job, entries=replace(job.entries, kv_engine=ENGINE_ENTRY))

    async def _destroy_keys(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        if not saved(job.exposed, "exposed"):
            return job
        secret = await self._salt_secret()
        epochs = range(saved(job.old_epoch, "old_epoch") + 1)
        scopes = tuple(scope_id(cache_salt(secret, TenantId(tenant), epoch)) for epoch in epochs)
        await self._store.destroy_data_keys(scopes)
        if self._forget_scopes is not None:
            await self._forget_scopes(list(scopes))
        return replace(job, scopes=scopes)

    async def _sweep_tiers(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        if not saved(job.exposed, "exposed") or not (self._tiers or self._nodes.tiers):
            return job
        scopes = saved(job.scopes, "scopes")
        counts, reports = await self._sweep(scopes)
        # Engine processes cache data keys briefly; after that nothing can write these scopes.
        await asyncio.sleep(self._key_cache_ttl_s + 0.2)
        again, reports_again = await self._sweep(scopes)

        def swept(tier: Tier) -> TierSweep | None:
            if tier in self._nodes.tiers:
                nodes = merge_passes(tier, reports, reports_again)
                return TierSweep(sum(node.removed_blocks for node in nodes), nodes)
            return TierSweep(counts[tier] + again[tier]) if tier in counts else None

        entries = replace(
            job.entries, kv_host=swept(Tier.HOST), kv_redis=swept(Tier.REDIS), kv_disk=swept(Tier.DISK)
        )
        return replace(job, entries=entries)

    async def _sweep(self, scopes: Sequence[str]) -> tuple[dict[Tier, int], list[NodeReport]]:
        """One pass: the shared tiers from here (blocks removed per tier), the node tiers on
        every node (one report per node)."""
        counts = await asyncio.to_thread(_sweep, self._tiers, scopes)
        return counts, await self._nodes.sweep(scopes)

    async def _delete_objects(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        removed = await self._store.delete_objects(tenant, saved(job.closure, "closure"))
        return replace(job, removed_keys=removed)

    async def _providers(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        if self._traces is None:
            return replace(job, providers=())
        closure = saved(job.closure, "closure")
        if job.providers is None:  # read after the revoke: no send of the closure can follow it
            job = replace(job, providers=tuple(await self._traces.reached(tenant, closure)))
            await checkpoint(job)  # saved before the lines are dropped
        await self._traces.forget_reach(tenant, closure)
        return job

    async def _decisions(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        if self._traces is None:
            return replace(job, decisions_removed=0)
        removed = await self._traces.forget_decisions(tenant, saved(job.closure, "closure"))
        return replace(job, decisions_removed=removed)

    async def _compact(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        return replace(job, compaction=await self._store.compact())

    async def _sign_receipt(self, tenant: str, job: PurgeJob, checkpoint: Checkpoint) -> PurgeJob:
        if await self._store.receipt(tenant, job.id) is not None:
            return job  # signed and appended before a crash
        signer = await self.signer()
        stores = receipt_stores(job, sealed=self._sealed, opportunity_index=self._forget_scopes is not None)
        while True:
            head = await self._store.chain_head(tenant)
            seq = FIRST_SEQ if head is None else head.seq + 1
            unsigned = build_receipt(
                receipt_id=job.id, tenant=tenant, target=job.target, issued_at=int(time.time()),
                profile=self.profile, profile_ceiling=self.ceiling, stores=stores,
                purged=saved(job.closure, "closure"), seq=seq,
                prev_receipt_hash=None if head is None else head.hash,
            )  # fmt: skip
            receipt = signer.sign(unsigned)
            if await self._store.append_receipt(tenant, receipt, head, ChainHead(seq, receipt_hash(receipt))):
                return job
            if await self._store.receipt(tenant, job.id) is not None:
                return job  # another gateway resuming this job signed it


def receipt_stores(job: PurgeJob, *, sealed: bool, opportunity_index: bool = False) -> list[StoreEntry]:
    """What each store that held the data reached, from the steps' saved results (the receipt's
    ``stores``, in this order: redis_state, kv_engine, kv_host, kv_redis, kv_disk, then the
    stores of derivatives (``purge/derived.py``): reuse_index (when ``opportunity_index``: the
    keys step removed the scopes' index), decision_records, provider:<route>...)."""
    compaction = saved(job.compaction, "compaction")
    compacted = compaction.done
    redis_class = GuaranteeClass.COMPACTED if compacted else GuaranteeClass.DELETED
    removed_keys = 0 if job.removed_keys is None else job.removed_keys
    entries = [
        StoreEntry(
            store="redis_state",
            action="unlink" + ("+aof_rewrite" if compacted else ""),
            result=StoreResult.DONE,
            guarantee_class=redis_class,
            detail=f"{removed_keys} keys removed; {compaction.detail}",
        )
    ]
    if job.entries.kv_engine is not None:
        entries.append(job.entries.kv_engine)
    erased = sealed and compacted
    for name, sweep, sealed_class, plain_class in (
        ("kv_host", job.entries.kv_host, GuaranteeClass.DELETED, GuaranteeClass.DELETED),
        ("kv_redis", job.entries.kv_redis, GuaranteeClass.CRYPTO_ERASED, redis_class),
        ("kv_disk", job.entries.kv_disk, GuaranteeClass.CRYPTO_ERASED, GuaranteeClass.DELETED),
    ):
        if sweep is None:
            continue
        cls = sealed_class if erased and name != "kv_host" else plain_class
        action = ("key_destroyed+" if erased and name != "kv_host" else "") + "unlink_scope"
        if sweep.nodes is None:  # the Redis tier, or a job saved before nodes were listed
            entries.append(
                StoreEntry(name, action, StoreResult.DONE, cls, f"{sweep.removed_blocks} blocks removed")
            )
        else:
            # Without the sweep, a node's blocks are unreachable under the rotated salt; sealed
            # ones are erased anyway once their key's removal is compacted.
            unswept = cls if cls is GuaranteeClass.CRYPTO_ERASED else GuaranteeClass.UNINDEXED
            entries.append(node_tier_entry(name, action, sweep, swept=cls, unswept=unswept))
    if opportunity_index and job.scopes is not None:
        entries.append(reuse_index_entry(redis_class))
    decisions = decision_entry(
        job.decisions_removed or 0,
        redis_class,
        compacted_after=_before(job, PurgeStep.DECISIONS, PurgeStep.COMPACT),
    )
    if decisions is not None:
        entries.append(decisions)
    entries.extend(provider_entries(job.providers or ()))
    return entries


def node_tier_entry(
    name: str, action: str, sweep: TierSweep, *, swept: GuaranteeClass, unswept: GuaranteeClass
) -> StoreEntry:
    """A node tier's receipt line: each node, ``swept`` where it is clean, ``unswept`` (with the
    reason) where it is not; the store states the weakest of its nodes."""
    nodes = tuple(
        NodeEntry(
            node_id=node.node_id,
            hostname=node.hostname,
            result=StoreResult.DONE if node.clean else StoreResult.FAILED,
            guarantee_class=swept if node.clean else unswept,
            removed_blocks=node.removed_blocks,
            detail=node.reason or "",
            remaining_blocks=node.remaining_blocks,
        )  # fmt: skip
        for node in sweep.nodes or ()
    )
    if not nodes:  # no node answered at all
        return StoreEntry(name, action, StoreResult.DONE, unswept, "no node could be swept")
    clean = sum(1 for node in nodes if node.result is StoreResult.DONE)
    detail = f"{sweep.removed_blocks} blocks removed; {clean} of {len(nodes)} nodes swept clean"
    missed = [
        f"{node.hostname} ({node.node_id}): {node.detail}"
        for node in nodes
        if node.result is not StoreResult.DONE
    ]
    if missed:
        detail += "; not swept: " + "; ".join(missed)
    return StoreEntry(
        name, action, StoreResult.DONE, weakest(node.guarantee_class for node in nodes), detail, nodes=nodes
    )


def _before(job: PurgeJob, first: PurgeStep, then: PurgeStep) -> bool:
    """Whether ``first`` finished before ``then`` (a job a version without ``first`` started
    may have done ``then`` already; ``first`` then ran after it)."""
    return first in job.done and then in job.done and job.done.index(first) < job.done.index(then)


def _sweep(tiers: Sequence[TierBackend], scopes: Sequence[str]) -> dict[Tier, int]:
    counts: dict[Tier, int] = {}
    for tier in tiers:
        counts[tier.tier] = tier.remove_scopes([ScopeId(scope) for scope in scopes])
    return counts
