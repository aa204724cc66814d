"""Purge over a real redis-server (AOF, fsync always) and real tier folders, without an engine.

Invariants held here:
- a purge removes the target and everything built on it; every handle of it stops resolving;
- after a receipt that claims ``compacted`` or more, the plaintext is in no file of Redis'
  data folder (AOF or RDB) and in no tier folder;
- blocks of a purged scope: gone from every tier, their data key destroyed, so a ciphertext
  copy kept aside does not open; nothing new is stored under the scope;
- the receipt verifies offline, states the weakest store and never more than the ceiling;
- receipts of a tenant form a hash chain; another tenant cannot purge or read them;
- a purge cut short (Redis down, the process killed with SIGKILL) issues no receipt and
  finishes later with a receipt whose claims hold.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from kvstore.codec import encode_block
from kvstore.keys import BlockKey, scope_id
from kvstore.manager import TierManager
from kvstore.sealing import ScopedSealer
from kvstore.tier import BlockAddress
from kvstore.tiers.build import build_tiers
from kvstore.tiers.redis_keyring import RedisKeyring
from zumik_serve.errors import NotFoundError
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.receipt import receipt_hash, verify_receipt
from zumik_serve.purge.service import PurgeService
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.state.service import StateService
from zumik_serve.state.store import RedisStateStore
from zumik_serve.store.local_redis import LocalRedis
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import TenantId, cache_salt

pytestmark = pytest.mark.redis

COMPAT = "c" * 64
CANARY = "CANARY-7f3a9 the secret launch codes of tenant a"


@dataclass
class Harness:
    root: Path
    server: LocalRedis
    tier_config: dict

    def services(self, *, ceiling: str = "crypto_erased", step_delay_s: float = 0.0):  # type: ignore[no-untyped-def]
        client = aioredis.from_url(self.server.url)
        tenants = RedisTenantStore(client)

        async def secret() -> bytes:
            return await tenants.server_secret("cache-salt")

        purges = PurgeService(
            RedisPurgeStore(client, RedisStateStore(client)), profile="test", ceiling=GuaranteeClass(ceiling),
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


async def _objects(state: StateService, tenant: str) -> dict[str, str]:
    art = (await state.create_artifact(tenant, {"role": "document", "content": CANARY}, None))["id"]
    bnd = (await state.create_bundle(tenant, {"artifacts": [art]}, None))["id"]
    ses = (await state.create_session(tenant, {"bundle": bnd}, None))["id"]
    snp = (await state.create_snapshot(tenant, {"bundle": bnd}, None))["id"]
    keep = (await state.create_artifact(tenant, {"role": "document", "content": "unrelated"}, None))["id"]
    return {"art": art, "bnd": bnd, "ses": ses, "snp": snp, "keep": keep}


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def _public_pem(purges: PurgeService) -> bytes:
    keys = await purges.public_keys()
    return keys[0]["public_key"].encode()


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
    again = await state.create_artifact("ten_a", {"role": "document", "content": CANARY}, None)
    assert again["id"] != ids["art"]


async def test_purge_of_an_exposed_snapshot_closes_the_scope_in_every_tier(harness: Harness) -> None:
    state, purges, tenants, _ = harness.services()
    ids = await _objects(state, "ten_a")
    await state.snapshot_messages("ten_a", ids["snp"])  # its content went to an engine
    secret = await tenants.server_secret("cache-salt")
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


@pytest.mark.parametrize("ceiling", ["revoked", "unindexed", "deleted", "compacted", "crypto_erased"])
async def test_receipt_never_states_more_than_the_ceiling(harness: Harness, ceiling: str) -> None:
    state, purges, _, _ = harness.services(ceiling=ceiling)
    ids = await _objects(state, "ten_a")
    receipt = (await purges.purge("ten_a", ids["art"])).receipt
    assert receipt is not None and receipt["profile_ceiling"] == ceiling
    assert GuaranteeClass(receipt["guarantee_class"]).rank <= GuaranteeClass(ceiling).rank
    assert GuaranteeClass(receipt["guarantee_class"]).rank <= GuaranteeClass.COMPACTED.rank
    assert verify_receipt(receipt, await _public_pem(purges)).ok


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


async def test_purge_cut_short_by_a_redis_outage_resumes_and_never_over_claims(harness: Harness) -> None:
    state, purges, _, client = harness.services(step_delay_s=0.3)
    ids = await _objects(state, "ten_a")

    task = asyncio.create_task(purges.purge("ten_a", ids["art"]))
    await asyncio.sleep(0.5)
    harness.server.stop()
    outcome = await task
    assert outcome.receipt is None and outcome.job["status"] != "done"
    harness.server.start()
    state, purges, _, _ = harness.services()
    job = await _store(harness).job_for_target("ten_a", ids["art"])
    assert job is not None and job["status"] != "done"  # saved as pending before the outage
    assert await purges.resume_pending() == 1
    receipt = await purges.receipt("ten_a", job["id"])
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
    assert any(job is not None and job["status"] != "done" for job in jobs), "the kill came too late"
    for job in jobs:  # nothing unfinished has a receipt
        if job is not None and job["status"] != "done":
            assert await store.receipt("ten_a", job["id"]) is None

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
