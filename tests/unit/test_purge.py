"""Purge over a real redis-server (AOF, fsync always) and real tier folders, without an engine.

Invariants held here:
- a purge removes the target and everything built on it; every handle of it stops resolving;
- after a receipt that claims ``compacted`` or more, the plaintext is in no file of Redis'
  data folder (AOF or RDB) and in no tier folder;
- blocks of a purged scope: gone from every tier, their data key destroyed, so a ciphertext
  copy kept aside does not open; nothing new is stored under the scope;
- the receipt verifies offline, states the weakest store and never more than the ceiling;
- receipts of a tenant form a hash chain; another tenant cannot purge or read them;
- a purge cut short (Redis down, a step failing, the process killed with SIGKILL) issues no
  receipt, says which steps are done, and finishes later with a receipt whose claims hold;
- a job the first version (dict jobs) stored loads with its values, is saved back as the same
  JSON, finishes from the step it reached (never rotating twice), and gives the receipt bytes
  that version signed; a chain head it wrote is extended; a damaged job blocks no other;
- steps and statuses keep their stored string values and order;
- a purge body that is not a ``PurgeRequest`` is a 400 naming the field, never echoing a value;
- over HTTP (the real app in process): 200 with the receipt, the same receipt again, 202 with
  the steps done and Retry-After when a step fails, 404 for another tenant, 401 without a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvstore.codec import encode_block
from kvstore.keys import BlockKey, scope_id
from kvstore.manager import TierManager
from kvstore.sealing import ScopedSealer
from kvstore.tier import BlockAddress
from kvstore.tiers.build import build_tiers
from kvstore.tiers.redis_keyring import RedisKeyring
from profiles import load_builtin
from zumik_serve.errors import ConflictError, InvalidRequestError, NotFoundError, RateLimitExceededError
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.job import (
    Compaction,
    KvResults,
    PendingPurge,
    PurgeId,
    PurgeStatus,
    PurgeStep,
    TierSweep,
)
from zumik_serve.purge.receipt import (
    RECEIPT_FIELDS,
    STORE_ENTRIES,
    ChainHead,
    ReceiptHash,
    ReceiptSigner,
    build_receipt,
    canonical_bytes,
    receipt_hash,
    verify_receipt,
)
from zumik_serve.purge.requests import parse_purge_request
from zumik_serve.purge.service import ENGINE_ENTRY, PurgeOutcome, PurgeService, receipt_stores
from zumik_serve.purge.signing_keys import SigningKeys
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.server_secrets import generate_missing, load_server_secrets
from zumik_serve.state.objects import ArtifactRole, TurnRole
from zumik_serve.state.requests import AppendTurn, CreateArtifact, CreateBundle, CreateSession, CreateSnapshot
from zumik_serve.state.service import StateService
from zumik_serve.state.store import RedisStateStore, exposed_key, object_key
from zumik_serve.store.local_redis import LocalRedis
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import TenantId, cache_salt

if TYPE_CHECKING:
    from tests.support.inprocess import InProcessGateway

COMPAT = "c" * 64
CANARY = "CANARY-7f3a9 the secret launch codes of tenant a"


@dataclass
class Harness:
    root: Path
    server: LocalRedis
    tier_config: dict

    @property
    def secrets_dir(self) -> Path:
        """The server's secrets, as ``zumik serve`` generates them before a gateway starts."""
        generate_missing(self.root / "secrets")
        return self.root / "secrets"

    def salt_secret(self) -> bytes:
        return load_server_secrets(self.secrets_dir).cache_salt_secret

    def services(self, *, ceiling: str = "crypto_erased", step_delay_s: float = 0.0):  # type: ignore[no-untyped-def]
        client = aioredis.from_url(self.server.url)
        tenants = RedisTenantStore(client)
        salt_secret = self.salt_secret()

        async def secret() -> bytes:
            return salt_secret

        purges = PurgeService(
            RedisPurgeStore(client, RedisStateStore(client)), signing_keys=SigningKeys(self.secrets_dir),
            profile="test", ceiling=GuaranteeClass(ceiling),
            tiers=build_tiers(self.tier_config), sealed=True, salt_secret=secret,
            salt_epoch=tenants.salt_epoch, rotate_salt_epoch=tenants.rotate_salt_epoch,
            key_cache_ttl_s=0.0, step_delay_s=step_delay_s,
        )  # fmt: skip
        return StateService(RedisStateStore(client), max_artifact_bytes=1 << 20), purges, tenants, client


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    config = {
        "compat_digest": COMPAT, "host_capacity_bytes": 1 << 20, "shm_root": str(tmp_path / "shm"),
        "redis_url": server.url, "disk_root": str(tmp_path / "disk"), "keyring_redis_url": server.url,
        "seal": True,
    }  # fmt: skip
    yield Harness(tmp_path, server, config)
    server.stop()


def _document(content: str) -> CreateArtifact:
    return CreateArtifact(role=ArtifactRole.DOCUMENT, content=content)


async def _objects(state: StateService, tenant: str) -> dict[str, str]:
    art = (await state.create_artifact(tenant, _document(CANARY), None))["id"]
    bnd = (await state.create_bundle(tenant, CreateBundle(artifacts=(art,)), None))["id"]
    ses = (await state.create_session(tenant, CreateSession(bundle=bnd), None))["id"]
    snp = (await state.create_snapshot(tenant, CreateSnapshot(bundle=bnd), None))["id"]
    keep = (await state.create_artifact(tenant, _document("unrelated"), None))["id"]
    return {"art": art, "bnd": bnd, "ses": ses, "snp": snp, "keep": keep}


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def _public_pem(purges: PurgeService) -> bytes:
    keys = await purges.public_keys()
    return keys[0]["public_key"].encode()


@pytest.mark.redis
async def test_purge_of_an_artifact_removes_what_derives_and_compacts(harness: Harness) -> None:
    state, purges, _, _ = harness.services()
    ids = await _objects(state, "ten_a")
    assert _files_containing(harness.root / "redis", CANARY.encode())  # the control: it was on disk

    outcome = await purges.purge("ten_a", ids["art"])
    receipt = outcome.receipt
    assert receipt is not None
    assert set(receipt["purged"]) == {ids["art"], ids["bnd"], ids["ses"], ids["snp"]}
    assert receipt["guarantee_class"] == "compacted"  # never exposed: Redis is the only store
    assert [s["store"] for s in receipt["stores"]] == ["redis_state"]
    assert verify_receipt(receipt, await _public_pem(purges)).ok
    assert _files_containing(harness.root / "redis", CANARY.encode()) == []
    for handle in ("art", "bnd", "ses", "snp"):
        with pytest.raises(NotFoundError):
            await state.read("ten_a", _kind(ids[handle]), ids[handle])
    assert (await state.read("ten_a", _kind(ids["keep"]), ids["keep"]))["content"] == "unrelated"
    # The same purge again returns the same receipt; the same content gets a new handle.
    assert (await purges.purge("ten_a", ids["art"])).receipt == receipt
    again = await state.create_artifact("ten_a", _document(CANARY), None)
    assert again["id"] != ids["art"]


@pytest.mark.redis
async def test_purge_of_an_exposed_snapshot_closes_the_scope_in_every_tier(harness: Harness) -> None:
    state, purges, tenants, _ = harness.services()
    ids = await _objects(state, "ten_a")
    await state.snapshot_messages("ten_a", ids["snp"])  # its content went to an engine
    secret = harness.salt_secret()
    scope = scope_id(cache_salt(secret, TenantId("ten_a"), 0))
    other_scope = scope_id(cache_salt(secret, TenantId("ten_b"), 0))
    keyring = RedisKeyring(redis.Redis.from_url(harness.server.url), cache_ttl_s=0)
    manager = TierManager(build_tiers(harness.tier_config), sealer=ScopedSealer(keyring), keyring=keyring)
    mine = [BlockAddress(COMPAT, BlockKey(f"{i:032x}"), scope) for i in range(3)]
    theirs = BlockAddress(COMPAT, BlockKey("f" * 32), other_scope)
    for address in [*mine, theirs]:
        manager.store(address, encode_block({"l": np.full((2, 4), 3, dtype=np.uint8)}, address))
    disk_file = next((harness.root / "disk").rglob(f"{mine[0].key}.kv"))
    ciphertext = disk_file.read_bytes()

    receipt = (await purges.purge("ten_a", ids["snp"])).receipt
    assert receipt is not None
    stores = {s["store"]: s for s in receipt["stores"]}
    assert stores["kv_engine"]["guarantee_class"] == "unindexed"
    assert stores["kv_redis"]["guarantee_class"] == stores["kv_disk"]["guarantee_class"] == "crypto_erased"
    assert stores["kv_host"]["guarantee_class"] == "deleted"
    assert receipt["guarantee_class"] == "unindexed"  # the engine's memory bounds it
    assert await tenants.salt_epoch(TenantId("ten_a")) == 1
    assert manager.plan(mine).num_blocks == 0
    assert manager.plan([theirs]).num_blocks == 1  # another tenant's blocks stay
    # A ciphertext copy kept aside does not open any more: its key is destroyed.
    disk_file.parent.mkdir(parents=True, exist_ok=True)
    disk_file.write_bytes(ciphertext)
    assert manager.plan(mine[:1]).num_blocks == 1 and manager.load(manager.plan(mine[:1])) == []
    # In-flight requests of the purged scope cannot store blocks back.
    late = BlockAddress(COMPAT, BlockKey("e" * 32), scope)
    manager.store(late, encode_block({"l": np.zeros((2, 4), dtype=np.uint8)}, late))
    assert manager.plan([late]).num_blocks == 0
    # The snapshot was built on the artifact, not the other way round: the artifact stays.
    assert (await state.read("ten_a", _kind(ids["art"]), ids["art"]))["content"] == CANARY


async def test_a_request_racing_a_purge_is_either_seen_as_exposure_or_refused(harness: Harness) -> None:
    """A request reads a snapshot as live, then a purge of it starts. If the request marks the
    snapshot exposed before the purge's revoke, the purge sees the mark and closes the scope
    (it once read the marks before revoking, and missed one landing in between); if it marks
    after, the mark is refused, the request gets 404 and sends nothing."""
    state, purges, tenants, client = harness.services()
    ids = await _objects(state, "ten_a")
    store = purges._store
    index_purged = store.index_purged

    async def request_marks_meanwhile(tenant: str, handles: Sequence[str], purge_id: PurgeId) -> None:
        await index_purged(tenant, handles, purge_id)
        assert await RedisStateStore(client).mark_exposed(tenant, [ids["snp"]]) is None  # still live

    store.index_purged = request_marks_meanwhile  # type: ignore[method-assign]
    receipt = (await purges.purge("ten_a", ids["snp"])).receipt
    assert receipt is not None
    assert "kv_engine" in {entry["store"] for entry in receipt["stores"]}  # the scope was closed
    assert await tenants.salt_epoch(TenantId("ten_a")) == 1
    # The purge runs after the request read the snapshot as live and before it marks it: the
    # mark is refused, the request gets 404 and reads no content; the purge saw nothing exposed.
    ids = await _objects(state, "ten_b")
    store.index_purged = index_purged  # type: ignore[method-assign]
    check_size = state._check_snapshot_size

    async def purged_meanwhile(*args: Any, **kwargs: Any) -> Any:
        checked = await check_size(*args, **kwargs)
        await purges.purge("ten_b", ids["snp"])
        return checked

    state._check_snapshot_size = purged_meanwhile  # type: ignore[method-assign]
    with pytest.raises(NotFoundError, match=ids["snp"]):
        await state.snapshot_messages("ten_b", ids["snp"])
    assert not await client.sismember(exposed_key("ten_b"), ids["snp"])
    assert await tenants.salt_epoch(TenantId("ten_b")) == 0  # never exposed: nothing to close


@pytest.mark.redis
async def test_a_snapshot_racing_a_purge_of_its_session_is_purged_with_it_or_refused(
    harness: Harness,
) -> None:
    """A snapshot of a session is created while the session is purged. Built between the purge's
    read of what derives from the session and its revoke, it is found by the purge's next read
    and purged with it (it once survived, holding the session's turns); built after the revoke,
    it is refused (404) and nothing is stored."""
    state, purges, _, client = harness.services()
    store = purges._store
    closure = store.closure
    ids = await _objects(state, "ten_a")
    said = "TURN-5c1e what only the session holds"
    await state.append_turn("ten_a", ids["ses"], AppendTurn(role=TurnRole.USER, content=said), None)
    made: list[str] = []

    async def snapshot_meanwhile(tenant: str, target: str) -> tuple[str, ...]:
        found = await closure(tenant, target)
        if not made:  # the first read, before anything is revoked
            made.append((await state.create_snapshot(tenant, CreateSnapshot(session=ids["ses"]), None))["id"])
        return found

    store.closure = snapshot_meanwhile  # type: ignore[method-assign]
    receipt = (await purges.purge("ten_a", ids["ses"])).receipt
    assert receipt is not None and made[0] in receipt["purged"], (made, receipt["purged"])
    assert await client.get(object_key("ten_a", made[0])) is None
    assert not _files_containing(harness.root / "redis", said.encode())

    # After the revoke: refused, and no record or link is left behind.
    ids = await _objects(state, "ten_b")
    store.closure = closure  # type: ignore[method-assign]
    revoke_all = store.revoke_all
    refused: list[NotFoundError] = []

    async def snapshot_after_the_revoke(tenant: str, handles: Sequence[str]) -> None:
        await revoke_all(tenant, handles)
        if not refused:
            with pytest.raises(NotFoundError, match=ids["ses"]) as caught:
                await state.create_snapshot(tenant, CreateSnapshot(session=ids["ses"]), None)
            refused.append(caught.value)

    store.revoke_all = snapshot_after_the_revoke  # type: ignore[method-assign]
    receipt = (await purges.purge("ten_b", ids["ses"])).receipt
    assert receipt is not None and refused and refused[0].status == 404
    assert set(receipt["purged"]) == {ids["ses"]}
    snapshots = [key async for key in client.scan_iter(match=object_key("ten_b", "snp_*"))]
    assert snapshots == [object_key("ten_b", ids["snp"]).encode()]  # the one made before the purge


@pytest.mark.redis
async def test_a_purge_of_the_tenants_own_id_closes_its_cache_scope_and_keeps_its_objects(
    harness: Harness,
) -> None:
    """Plain /v1 requests have no handle: a purge whose target is the tenant's id purges what
    they left, its cache scope. The salt moves on, the scope's blocks leave every tier and its
    key is destroyed; no object is touched and another tenant's blocks stay. Each such purge is
    a new one (the scope is used again after it), each with its own receipt in the chain; one
    left unfinished is resumed by the next request."""
    state, purges, tenants, client = harness.services()
    ids = await _objects(state, "ten_a")
    secret = harness.salt_secret()
    keyring = RedisKeyring(redis.Redis.from_url(harness.server.url), cache_ttl_s=0)
    manager = TierManager(build_tiers(harness.tier_config), sealer=ScopedSealer(keyring), keyring=keyring)

    def blocks(tenant: str, epoch: int) -> list[BlockAddress]:
        scope = scope_id(cache_salt(secret, TenantId(tenant), epoch))
        addresses = [BlockAddress(COMPAT, BlockKey(f"{i:032x}"), scope) for i in range(2)]
        for address in addresses:
            manager.store(address, encode_block({"l": np.full((2, 4), 7, dtype=np.uint8)}, address))
        return addresses

    mine, theirs = blocks("ten_a", 0), blocks("ten_b", 0)
    with pytest.raises(NotFoundError, match="or your tenant id"):
        await purges.purge("ten_a", "ten_b")  # another tenant's id is no target of yours
    first = (await purges.purge("ten_a", "ten_a")).receipt
    assert first is not None and verify_receipt(first, await _public_pem(purges)).ok
    assert (first["target"], first["purged"], first["seq"]) == ("ten_a", ["ten_a"], 1)
    stores = {s["store"]: s for s in first["stores"]}
    assert stores["kv_engine"]["guarantee_class"] == "unindexed"
    assert stores["kv_redis"]["guarantee_class"] == stores["kv_disk"]["guarantee_class"] == "crypto_erased"
    assert await tenants.salt_epoch(TenantId("ten_a")) == 1
    assert manager.plan(mine).num_blocks == 0 and manager.plan(theirs).num_blocks == 2
    for kind, handle in ids.items():
        assert (await state.read("ten_a", _kind(handle), handle))["id"] == handle, kind

    # The next scope's blocks; a second purge is a new one that closes it too.
    again = blocks("ten_a", 1)
    store = purges._store
    sweep = purges._steps[PurgeStep.TIERS]

    async def cut(tenant: str, job: Any, checkpoint: Any) -> Any:
        raise ConnectionError("Redis went away")

    purges._scope_steps[PurgeStep.TIERS] = cut
    cut_short = await purges.purge("ten_a", "ten_a")
    assert cut_short.receipt is None and PurgeStep.TIERS not in cut_short.job.done
    purges._scope_steps[PurgeStep.TIERS] = sweep
    second = (await purges.purge("ten_a", "ten_a")).receipt  # resumes the unfinished one
    assert second is not None and second["id"] == cut_short.job.id != first["id"] and second["seq"] == 2
    assert await tenants.salt_epoch(TenantId("ten_a")) == 2  # the resumed job did not rotate twice
    assert manager.plan(again).num_blocks == 0 and await store.pending() == []
    third = (await purges.purge("ten_a", "ten_a")).receipt
    assert third is not None and third["id"] not in (first["id"], second["id"]) and third["seq"] == 3


@pytest.mark.redis
async def test_a_tenant_starts_at_most_its_purges_a_minute_and_asking_again_is_free(harness: Harness) -> None:
    """Each purge rewrites Redis' AOF and sweeps every tier: a tenant may start
    ``purge.max_per_minute`` a minute; past it, 429 with Retry-After and nothing started. Asking
    again for a finished purge's receipt, or resuming one, starts nothing and is not counted;
    another tenant has its own count."""
    state, purges, _, client = harness.services()
    limited = PurgeService(
        purges._store, signing_keys=SigningKeys(harness.secrets_dir), profile="test",
        ceiling=GuaranteeClass.CRYPTO_ERASED, tiers=[], sealed=True, salt_secret=purges._salt_secret,
        salt_epoch=purges._salt_epoch, rotate_salt_epoch=purges._rotate_salt_epoch, max_per_minute=2,
    )  # fmt: skip
    now = time.time()
    if now % 60 > 50:  # the test's purges must land in one minute's window
        await asyncio.sleep(61 - now % 60)
    first, second, third = [
        {"keep": (await state.create_artifact("ten_a", _document(f"note {n}"), None))["id"]} for n in range(3)
    ]
    done = (await limited.purge("ten_a", first["keep"])).receipt
    assert done is not None and (await limited.purge("ten_a", second["keep"])).receipt is not None
    with pytest.raises(RateLimitExceededError, match="Retry after") as refused:
        await limited.purge("ten_a", third["keep"])
    assert refused.value.status == 429 and 1 <= (refused.value.retry_after_s or 0) <= 60
    assert await state.read("ten_a", _kind(third["keep"]), third["keep"])  # nothing started
    assert (await limited.purge("ten_a", first["keep"])).receipt == done  # asked again: free
    theirs = (await state.create_artifact("ten_b", _document("note 0"), None))["id"]
    assert (await limited.purge("ten_b", theirs)).receipt is not None
    assert await purges._store.take_purge_slot("ten_c", 1, now_s=120.0) is None
    assert await purges._store.take_purge_slot("ten_c", 1, now_s=150.5) == 30  # until 180 s
    assert await purges._store.take_purge_slot("ten_c", 1, now_s=180.0) is None  # the next window


@pytest.mark.redis
async def test_a_retry_under_the_key_of_a_purged_object_is_409_and_makes_nothing(harness: Harness) -> None:
    """Under an Idempotency-Key a create's handle derives from the key: a retry after a purge
    once made the purged handle again. The purge leaves a tombstone in the key's place (no handle,
    no digest of the request): the retry is a 409 saying to use a new key, and creates nothing."""
    state, purges, _, client = harness.services()
    art = (await state.create_artifact("ten_a", _document("keyed content"), None))["id"]
    request = CreateBundle(artifacts=(art,))
    bundle = (await state.create_bundle("ten_a", request, "key-1"))["id"]
    assert (await state.create_bundle("ten_a", request, "key-1"))["id"] == bundle  # a retry, before
    receipt = (await purges.purge("ten_a", bundle)).receipt
    assert receipt is not None and receipt["purged"] == [bundle]
    [idem] = [key async for key in client.scan_iter(match="z:{ten_a}:idem:*")]
    assert bundle.encode() not in await client.get(idem) and 0 < await client.ttl(idem) <= 24 * 3600
    with pytest.raises(ConflictError, match="new Idempotency-Key") as refused:
        await state.create_bundle("ten_a", request, "key-1")
    assert refused.value.status == 409 and refused.value.code == "idempotent_result_purged"
    assert await client.exists(object_key("ten_a", bundle)) == 0  # the purged handle stays gone
    await client.delete(idem)  # 24 h later the key's tombstone is gone: the handle's purge mark is not
    with pytest.raises(ConflictError, match="new Idempotency-Key"):
        await state.create_bundle("ten_a", request, "key-1")
    assert await client.exists(object_key("ten_a", bundle)) == 0
    fresh = (await state.create_bundle("ten_a", request, "key-2"))["id"]
    assert fresh != bundle


@pytest.mark.redis
async def test_a_purge_asked_for_again_while_it_runs_is_not_run_twice(harness: Harness) -> None:
    """Asking again for a purge is free of the rate of new purges, so it must not cost a second
    run: while one runs in this process, the same request answers at once with the job as it is
    (no receipt: 202 over HTTP), and one AOF rewrite is all the purge makes."""
    state, purges, _, client = harness.services(step_delay_s=0.2)
    art = (await state.create_artifact("ten_a", _document("asked twice"), None))["id"]
    rewrites = (await client.info("persistence"))["aof_rewrites"]
    first = asyncio.create_task(purges.purge("ten_a", art))
    await asyncio.sleep(0.1)
    again = await purges.purge("ten_a", art)
    assert not first.done()  # answered while the first request still runs the purge
    assert again.receipt is None and again.job.status is not PurgeStatus.DONE
    done = await first
    assert done.receipt is not None and done.job.id == again.job.id
    assert (await client.info("persistence"))["aof_rewrites"] == rewrites + 1
    assert (await purges.purge("ten_a", art)).receipt == done.receipt


@pytest.mark.redis
@pytest.mark.parametrize("ceiling", ["revoked", "unindexed", "deleted", "compacted", "crypto_erased"])
async def test_receipt_never_states_more_than_the_ceiling(harness: Harness, ceiling: str) -> None:
    state, purges, _, _ = harness.services(ceiling=ceiling)
    ids = await _objects(state, "ten_a")
    receipt = (await purges.purge("ten_a", ids["art"])).receipt
    assert receipt is not None and receipt["profile_ceiling"] == ceiling
    assert GuaranteeClass(receipt["guarantee_class"]).rank <= GuaranteeClass(ceiling).rank
    assert GuaranteeClass(receipt["guarantee_class"]).rank <= GuaranteeClass.COMPACTED.rank
    assert verify_receipt(receipt, await _public_pem(purges)).ok


@pytest.mark.redis
async def test_receipts_chain_and_stay_with_their_tenant(harness: Harness) -> None:
    state, purges, _, _ = harness.services()
    first = await _objects(state, "ten_a")
    second = await _objects(state, "ten_a")
    r1 = (await purges.purge("ten_a", first["snp"])).receipt
    r2 = (await purges.purge("ten_a", second["keep"])).receipt
    assert r1 is not None and r2 is not None
    assert (r1["seq"], r1["prev_receipt_hash"]) == (1, None)
    assert (r2["seq"], r2["prev_receipt_hash"]) == (2, receipt_hash(r1))
    assert await purges.receipt("ten_a", r1["id"]) == r1
    with pytest.raises(NotFoundError):
        await purges.receipt("ten_b", r1["id"])
    with pytest.raises(NotFoundError):
        await purges.purge("ten_b", first["art"])  # another tenant's handle: not found
    assert (await state.read("ten_a", _kind(first["art"]), first["art"]))["content"] == CANARY


@pytest.mark.redis
async def test_purge_cut_short_by_a_redis_outage_resumes_and_never_over_claims(harness: Harness) -> None:
    state, purges, _, client = harness.services(step_delay_s=0.3)
    ids = await _objects(state, "ten_a")

    task = asyncio.create_task(purges.purge("ten_a", ids["art"]))
    await asyncio.sleep(0.5)
    harness.server.stop()
    outcome = await task
    assert outcome.receipt is None and outcome.job.status is not PurgeStatus.DONE
    harness.server.start()
    state, purges, _, _ = harness.services()
    job = await _store(harness).job_for_target("ten_a", ids["art"])
    assert job is not None and job.status is not PurgeStatus.DONE  # saved as pending before the outage
    assert await purges.resume_pending() == 1
    receipt = await purges.receipt("ten_a", job.id)
    assert receipt["guarantee_class"] == "compacted"
    assert _files_containing(harness.root / "redis", CANARY.encode()) == []


PURGE_DRIVER = """
import asyncio, json, sys
from tests.unit.test_purge import Harness
from zumik_serve.store.local_redis import LocalRedis
from pathlib import Path
config = json.loads(sys.argv[1])
server = LocalRedis(data_dir=Path(config["root"]) / "redis")
server.port = config["port"]
h = Harness(Path(config["root"]), server, config["tiers"])
_, purges, _, _ = h.services(step_delay_s=0.4)
async def main():
    await asyncio.gather(*(purges.purge("ten_a", target) for target in config["targets"]))
asyncio.run(main())
"""


@pytest.mark.redis
async def test_kill_9_in_the_middle_of_purges_then_every_purge_finishes_honestly(harness: Harness) -> None:
    state, _, _, _ = harness.services()
    batches = [await _objects(state, "ten_a") for _ in range(3)]
    for ids in batches:
        await state.snapshot_messages("ten_a", ids["snp"])
    # The batches share the content-addressed artifacts; purging one removes all three batches.
    targets = [batches[0]["snp"], batches[1]["snp"], batches[0]["art"], batches[0]["keep"]]
    config = {
        "root": str(harness.root),
        "port": harness.server.port,
        "tiers": harness.tier_config,
        "targets": targets,
    }
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    driver = subprocess.Popen([sys.executable, "-c", PURGE_DRIVER, json.dumps(config)], env=env)
    await asyncio.sleep(3.0)  # model loading is not involved: the purges are a few steps in
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    store = _store(harness)
    jobs = [await store.job_for_target("ten_a", target) for target in targets]
    assert any(job is not None and job.status is not PurgeStatus.DONE for job in jobs), (
        "the kill came too late"
    )
    for job in jobs:  # nothing unfinished has a receipt
        if job is not None and job.status is not PurgeStatus.DONE:
            assert await store.receipt("ten_a", job.id) is None

    _, purges, _, _ = harness.services()
    await purges.resume_pending()
    for target in targets:
        receipt = (await purges.purge("ten_a", target)).receipt
        assert receipt is not None and verify_receipt(receipt, await _public_pem(purges)).ok
        claimed = GuaranteeClass(receipt["guarantee_class"])
        assert claimed.rank <= GuaranteeClass.COMPACTED.rank
    assert await store.pending() == []
    assert _files_containing(harness.root / "redis", CANARY.encode()) == []
    ids = await store.receipt_ids("ten_a")
    receipts = [await store.receipt("ten_a", rid) for rid in ids]
    assert [r["seq"] for r in receipts] == list(range(1, len(receipts) + 1))
    assert {r["target"] for r in receipts} <= set(targets)
    for previous, current in zip(receipts, receipts[1:], strict=False):
        assert current["prev_receipt_hash"] == receipt_hash(previous)


def _kind(handle: str):  # type: ignore[no-untyped-def]
    from zumik_serve.state.objects import ObjectKind

    return {
        "art": ObjectKind.ARTIFACTS, "bnd": ObjectKind.BUNDLES, "ses": ObjectKind.SESSIONS,
        "snp": ObjectKind.SNAPSHOTS, "brn": ObjectKind.BRANCHES,
    }[handle[:3]]  # fmt: skip


def _store(harness: Harness) -> RedisPurgeStore:
    client = aioredis.from_url(harness.server.url)
    return RedisPurgeStore(client, RedisStateStore(client))


# -- jobs and chain heads the first version stored ----------------------------------------------
# Jobs in the exact form the first version (dict jobs) wrote to Redis; SNP, SCOPE and PRG are put in.

FIRST_VERSION_JOB_AFTER_TIERS = (
    '{"closure":["SNP"],"created_at":1796160540,"done":["revoke","rotate","keys","tiers"],'
    '"entries":{"kv_disk":{"removed_blocks":4},"kv_engine":{"action":"salt_epoch_rotated","detail":'
    '"cached blocks are unreachable under the new cache salt; engine memory is not zeroed",'
    '"guarantee_class":"unindexed","result":"done","store":"kv_engine"},"kv_host":{"removed_blocks":2},'
    '"kv_redis":{"removed_blocks":3}},"error":null,"exposed":true,"id":"PRG","old_epoch":0,'
    '"scopes":["SCOPE"],"status":"running","target":"SNP"}'
)
FIRST_VERSION_JOB_EXPOSED = (
    '{"closure":["snp_zyeygo62ouevb4by7vktdo3xsu","snp_qqeygo62ouevb4by7vktdo3xsu"],"compaction":'
    '{"detail":"AOF rewritten; only the new base and increment files remain","done":true},'
    '"created_at":1796160540,"done":["revoke","rotate","keys","tiers","objects","compact"],"entries":'
    '{"kv_disk":{"removed_blocks":5},"kv_engine":{"action":"salt_epoch_rotated","detail":"cached blocks '
    'are unreachable under the new cache salt; engine memory is not zeroed","guarantee_class":"unindexed",'
    '"result":"done","store":"kv_engine"},"kv_host":{"removed_blocks":3},"kv_redis":{"removed_blocks":4}},'
    '"error":null,"exposed":true,"id":"prg_wohc2uejhejgh33lfqtntsgyke","old_epoch":1,"removed_keys":7,'
    '"scopes":["7dd59956750118aa","0123456789abcdef"],"status":"running",'
    '"target":"snp_zyeygo62ouevb4by7vktdo3xsu"}'
)
FIRST_VERSION_JOB_PLAIN = (
    '{"closure":["art_35khqsojdut25xq5lislnvmbaa"],"compaction":{"detail":"Redis runs without an AOF; '
    'its RDB snapshots are not rewritten here","done":false},"created_at":1796160545,"done":["revoke",'
    '"rotate","keys","tiers","objects","compact"],"entries":{},"error":null,"exposed":false,'
    '"id":"prg_zztpftehlmupkseiklh54xfzca","removed_keys":3,"status":"running",'
    '"target":"art_35khqsojdut25xq5lislnvmbaa"}'
)
# sha256 of the canonical bytes of the receipt the first version signed from each job above
# (fixed key, issued_at 1700000000, seq 2, prev_receipt_hash "cd" * 32), sealed tiers or not.
FIRST_VERSION_RECEIPT_SHA256 = {
    (FIRST_VERSION_JOB_EXPOSED, True): "f3fc849cfc8ff9c63685271bb0bfe67020bd55f2d1e46f7ad7539a1de8aebe4e",
    (FIRST_VERSION_JOB_EXPOSED, False): "6a8cf7fd5e952169bd211030b757b1c24b7c1b8821e12ffb7892df8f77f95528",
    (FIRST_VERSION_JOB_PLAIN, True): "2022542de0073aac00eabeec58b73642531da693773861c43845ccc498c689f9",
    (FIRST_VERSION_JOB_PLAIN, False): "2022542de0073aac00eabeec58b73642531da693773861c43845ccc498c689f9",
}
FIXED_SIGNER = ReceiptSigner(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


async def _put_first_version_job(client: aioredis.Redis, tenant: str, raw: str) -> PurgeId:
    purge_id = PurgeId(json.loads(raw)["id"])
    await client.set(f"z:{{{tenant}}}:purge:{purge_id}", raw)
    await client.sadd("zumik:purges:pending", f"{tenant}|{purge_id}")
    return purge_id


@pytest.mark.redis
@pytest.mark.parametrize(
    "raw", [FIRST_VERSION_JOB_AFTER_TIERS, FIRST_VERSION_JOB_EXPOSED, FIRST_VERSION_JOB_PLAIN]
)
async def test_job_in_the_first_versions_format_loads_and_saves_back_the_same_json(
    harness: Harness, raw: str
) -> None:
    _, _, _, client = harness.services()
    store = _store(harness)
    purge_id = await _put_first_version_job(client, "ten_a", raw)
    job = await store.job("ten_a", purge_id)
    assert job is not None and job.id == purge_id and job.status is PurgeStatus.RUNNING
    assert job.done[:2] == (PurgeStep.REVOKE, PurgeStep.ROTATE) and job.error is None
    await store.save_job("ten_a", job)
    again = json.loads(await client.get(f"z:{{ten_a}}:purge:{purge_id}"))
    # The same JSON; only "error": null is left out (absent and null read the same in both versions).
    assert again == {name: value for name, value in json.loads(raw).items() if value is not None}


@pytest.mark.redis
async def test_job_in_the_first_versions_format_has_its_typed_values(harness: Harness) -> None:
    _, _, _, client = harness.services()
    job = await _store(harness).job(
        "ten_a", await _put_first_version_job(client, "ten_a", FIRST_VERSION_JOB_EXPOSED)
    )
    assert job is not None
    assert job.closure == ("snp_zyeygo62ouevb4by7vktdo3xsu", "snp_qqeygo62ouevb4by7vktdo3xsu")
    assert (job.exposed, job.old_epoch, job.removed_keys) == (True, 1, 7)
    assert job.scopes == ("7dd59956750118aa", "0123456789abcdef")
    assert job.entries == KvResults(ENGINE_ENTRY, TierSweep(3), TierSweep(4), TierSweep(5))
    assert job.compaction == Compaction(True, "AOF rewritten; only the new base and increment files remain")
    # The steps that version had, up to compact.
    assert [step.value for step in job.done] == ["revoke", "rotate", "keys", "tiers", "objects", "compact"]


@pytest.mark.redis
@pytest.mark.parametrize(("raw", "sealed"), list(FIRST_VERSION_RECEIPT_SHA256))
async def test_receipt_from_a_first_version_job_has_the_bytes_that_version_signed(
    harness: Harness, raw: str, sealed: bool
) -> None:
    _, _, _, client = harness.services()
    job = await _store(harness).job("ten_a", await _put_first_version_job(client, "ten_a", raw))
    assert job is not None and job.closure is not None
    unsigned = build_receipt(
        receipt_id=job.id, tenant="ten_a", target=job.target, issued_at=1_700_000_000, profile="test",
        profile_ceiling=GuaranteeClass.CRYPTO_ERASED, stores=receipt_stores(job, sealed=sealed),
        purged=job.closure, seq=2, prev_receipt_hash="cd" * 32,
    )  # fmt: skip
    signed = canonical_bytes(FIXED_SIGNER.sign(unsigned))
    assert hashlib.sha256(signed).hexdigest() == FIRST_VERSION_RECEIPT_SHA256[(raw, sealed)]


@pytest.mark.redis
async def test_purge_left_unfinished_by_the_first_version_finishes_with_its_results(harness: Harness) -> None:
    state, purges, tenants, client = harness.services()
    ids = await _objects(state, "ten_a")
    await state.snapshot_messages("ten_a", ids["snp"])
    await tenants.rotate_salt_epoch(TenantId("ten_a"))  # the rotate step it finished
    scope = scope_id(cache_salt(harness.salt_secret(), TenantId("ten_a"), 0))
    prg = "prg_" + "w" * 26
    await client.set(f"z:{{ten_a}}:purge-target:{ids['snp']}", prg)
    raw = FIRST_VERSION_JOB_AFTER_TIERS.replace("SNP", ids["snp"]).replace("SCOPE", scope).replace("PRG", prg)
    await _put_first_version_job(client, "ten_a", raw)

    assert await purges.resume_pending() == 1
    receipt = await purges.receipt("ten_a", prg)
    assert verify_receipt(receipt, await _public_pem(purges)).ok
    assert receipt["purged"] == [ids["snp"]] and receipt["guarantee_class"] == "unindexed"
    stores = {entry["store"]: entry for entry in receipt["stores"]}
    assert stores["kv_engine"] == STORE_ENTRIES.dump_python([ENGINE_ENTRY], mode="json", exclude_none=True)[0]
    assert [stores[name]["detail"] for name in ("kv_host", "kv_redis", "kv_disk")] == [
        "2 blocks removed", "3 blocks removed", "4 blocks removed",
    ]  # fmt: skip
    assert stores["kv_redis"]["guarantee_class"] == stores["kv_disk"]["guarantee_class"] == "crypto_erased"
    assert await tenants.salt_epoch(TenantId("ten_a")) == 1  # not rotated a second time
    store = _store(harness)
    job = await store.job("ten_a", PurgeId(prg))
    assert job is not None and job.status is PurgeStatus.DONE and job.done == tuple(PurgeStep)
    assert await store.pending() == []
    assert (await purges.purge("ten_a", ids["snp"])).receipt == receipt
    with pytest.raises(NotFoundError):
        await state.read("ten_a", _kind(ids["snp"]), ids["snp"])


@pytest.mark.redis
async def test_chain_head_the_first_version_wrote_is_extended(harness: Harness) -> None:
    state, purges, _, client = harness.services()
    first_hash = "a16a45e7c83012b513774b08c0f4c11df54406c00be9f0579a5cc70e08309416"
    await client.set("z:{ten_a}:receipt-head", '{"hash":"' + first_hash + '","seq":1}')
    assert await _store(harness).chain_head("ten_a") == ChainHead(1, ReceiptHash(first_hash))
    ids = await _objects(state, "ten_a")
    receipt = (await purges.purge("ten_a", ids["keep"])).receipt
    assert receipt is not None and (receipt["seq"], receipt["prev_receipt_hash"]) == (2, first_hash)


@pytest.mark.redis
async def test_a_damaged_job_stays_pending_and_others_still_finish(harness: Harness) -> None:
    state, purges, _, client = harness.services()
    await client.set("z:{ten_a}:purge:prg_" + "d" * 26, '{"id": "prg_' + "d" * 26 + '", "status": 7}')
    await client.sadd("zumik:purges:pending", "ten_a|prg_" + "d" * 26)
    ids = await _objects(state, "ten_b")
    stopped = (await _stopped_purge(harness, "ten_b", ids["keep"])).job
    assert await purges.resume_pending() == 1
    assert await purges.receipt("ten_b", stopped.id) is not None
    assert await _store(harness).pending() == [PendingPurge("ten_a", PurgeId("prg_" + "d" * 26))]


async def _stopped_purge(harness: Harness, tenant: str, target: str) -> PurgeOutcome:
    """A purge whose compact step fails: Redis refuses CONFIG GET (as a managed Redis may)."""
    _, purges, _, _ = harness.services()
    admin = aioredis.from_url(harness.server.admin_url)
    await admin.execute_command("ACL", "SETUSER", "zumik-gateway", "-config")
    try:
        outcome = await purges.purge(tenant, target)
    finally:
        await admin.execute_command("ACL", "SETUSER", "zumik-gateway", "+config|get")
        await admin.aclose()
    assert outcome.receipt is None and outcome.job.status is PurgeStatus.INCOMPLETE
    before_compact = tuple(PurgeStep)[: tuple(PurgeStep).index(PurgeStep.COMPACT)]
    assert outcome.job.done == before_compact and outcome.job.error is not None
    return outcome


# -- steps and the request body -------------------------------------------------------------------


def test_steps_have_stable_values_and_run_in_their_order() -> None:
    assert [step.value for step in PurgeStep] == [
        "revoke", "rotate", "keys", "tiers", "objects", "providers", "decisions", "compact", "receipt",
    ]  # fmt: skip
    assert [status.value for status in PurgeStatus] == ["running", "incomplete", "done"]


@pytest.mark.redis
async def test_a_stopped_purge_says_which_steps_are_done_and_resumes(harness: Harness) -> None:
    state, purges, _, _ = harness.services()
    ids = await _objects(state, "ten_a")
    stopped = (await _stopped_purge(harness, "ten_a", ids["art"])).job
    assert stopped.error is not None and stopped.error.startswith("NoPermissionError: ")
    outcome = await purges.purge("ten_a", ids["art"])
    assert outcome.receipt is not None and outcome.job.id == stopped.id
    assert outcome.job.status is PurgeStatus.DONE and outcome.job.error is None


def test_purge_request_takes_a_target() -> None:
    assert parse_purge_request({"target": "art_x"}).target == "art_x"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "target"),
        ({"target": "art_x", "zeta": 1, "extra": 1}, "extra"),  # unknown fields first, by name
        ({"extra": "SECRET-VALUE"}, "extra"),
        ({"target": 12345}, "target"),
        ({"target": ["SECRET-VALUE"]}, "target"),
        ({"target": None}, "target"),
        ({"x" * 500: 1, "target": "art_x"}, "x" * 64),  # a long name is cut, not sent back whole
    ],
)
def test_purge_request_refusal_names_the_field_and_never_echoes_the_value(
    body: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_purge_request(body)
    error = caught.value
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)
    assert (
        "SECRET-VALUE" not in error.message and "12345" not in error.message and "x" * 65 not in error.message
    )
    assert "target" in error.message  # it says what the body takes


# -- the HTTP surface (the real app in process) ---------------------------------------------------


# The app is imported here, not at the top: PURGE_DRIVER imports this module and must reach its
# purges quickly.


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zumik_serve.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _gateway(harness: Harness, model_dir: Path) -> InProcessGateway:
    from tests.support.inprocess import make_gateway

    return make_gateway(harness.server.url, model_dir, secrets_dir=harness.secrets_dir)


@pytest.mark.redis
async def test_a_cache_scope_purge_over_http_and_the_purge_rate_of_the_profile(
    harness: Harness, model_dir: Path
) -> None:
    """``{"target": <the tenant's id>}`` purges its cache scope (200, a receipt naming the
    tenant); with the profile's ``purge.max_per_minute`` spent, the next new purge is a 429 with
    Retry-After, as the gateway deploys it."""
    from tests.support.inprocess import make_gateway
    from zumik_serve.tenancy.tenant import DEV_TENANT

    profile = load_builtin("local-cpu")
    profile = profile.model_copy(update={"purge": profile.purge.model_copy(update={"max_per_minute": 1})})
    if time.time() % 60 > 55:  # both purges in one minute's window
        await asyncio.sleep(61 - time.time() % 60)
    gateway = make_gateway(harness.server.url, model_dir, profile=profile, secrets_dir=harness.secrets_dir)
    async with gateway.client() as http:
        response = await http.post("/v2/purge", json={"target": DEV_TENANT})
        assert response.status_code == 200, response.text
        receipt = response.json()["receipt"]
        assert (receipt["target"], receipt["purged"], receipt["tenant"]) == (
            DEV_TENANT,
            [DEV_TENANT],
            DEV_TENANT,
        )
        refused = await http.post("/v2/purge", json={"target": DEV_TENANT})
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.redis
async def test_purge_over_http_answers_in_the_shapes_clients_rely_on(
    harness: Harness, model_dir: Path
) -> None:
    gateway = _gateway(harness, model_dir)
    other_key = await gateway.create_tenant("other")
    async with gateway.client() as http, gateway.client(other_key) as other:
        created = await http.post("/v2/artifacts", json={"role": "document", "content": CANARY})
        art = created.json()["id"]
        assert (await other.post("/v2/purge", json={"target": art})).status_code == 404
        response = await http.post("/v2/purge", json={"target": art})
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"receipt"}
        receipt = response.json()["receipt"]
        assert set(receipt) == RECEIPT_FIELDS and receipt["purged"] == [art]
        assert (await http.post("/v2/purge", json={"target": art})).json()["receipt"] == receipt
        assert (await http.get(f"/v2/receipts/{receipt['id']}")).json() == receipt
        assert (await other.get(f"/v2/receipts/{receipt['id']}")).status_code == 404
        keys = (await http.get("/v2/keys")).json()["keys"]
        key = next(k for k in keys if k["key_id"] == receipt["key_id"])
        assert set(key) == {"key_id", "algorithm", "public_key", "status"} and key["algorithm"] == "ed25519"
        assert key["status"] == "current"
        assert verify_receipt(receipt, key["public_key"].encode()).ok

        missing = await http.post("/v2/purge", json={"target": "art_" + "a" * 26})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        for body, param in (
            ({}, "target"),
            ({"target": "x", "extra": 1}, "extra"),
            ({"target": 5}, "target"),
        ):
            refused = await http.post("/v2/purge", json=body)
            assert refused.status_code == 400, body
            assert refused.json()["error"]["type"] == "invalid_request_error"
            assert refused.json()["error"]["param"] == param
        assert (await http.post("/v2/purge", content=b"{not json")).status_code == 400
        assert (await http.get("/v2/receipts/prg_" + "b" * 26)).status_code == 404
    async with gateway.client(api_key="zk-unknown") as stranger:
        assert (await stranger.post("/v2/purge", json={"target": "x"})).status_code == 401
        assert (await stranger.get("/v2/keys")).status_code == 401


@pytest.mark.redis
async def test_purge_over_http_that_cannot_finish_is_a_202_then_resumes(
    harness: Harness, model_dir: Path
) -> None:
    gateway = _gateway(harness, model_dir)
    admin = aioredis.from_url(harness.server.admin_url)
    async with gateway.client() as http:
        art = (await http.post("/v2/artifacts", json={"role": "document", "content": CANARY})).json()["id"]
        await admin.execute_command("ACL", "SETUSER", "zumik-gateway", "-config")  # compaction cannot start
        try:
            response = await http.post("/v2/purge", json={"target": art})
        finally:
            await admin.execute_command("ACL", "SETUSER", "zumik-gateway", "+config|get")
        assert response.status_code == 202 and response.headers["retry-after"] == "5"
        body = response.json()
        assert body["receipt"] is None
        progress = body["purge"]
        assert set(progress) == {"id", "target", "status", "steps_done", "error", "message"}
        assert (progress["target"], progress["status"]) == (art, "incomplete")
        assert progress["steps_done"] == [
            "revoke", "rotate", "keys", "tiers", "objects", "providers", "decisions",
        ]  # fmt: skip
        assert progress["error"].startswith("NoPermissionError: ")
        again = await http.post("/v2/purge", json={"target": art})
        assert again.status_code == 200 and again.json()["receipt"]["id"] == progress["id"]
    await admin.aclose()
