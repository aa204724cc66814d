"""The node tiers of a purge, swept node by node (``purge/nodes.py``), over real tier folders and a
real redis-server; the Ray cluster itself is ``tests/integration/test_purge_cluster.py``.

Invariants held here:
- a node's sweep uses that node's roots (``ZUMIK_KV_SHM_ROOT``, ``ZUMIK_KV_DISK_ROOT`` over the
  profile's), removes every block of the scopes there and nothing else, and re-checks to zero;
- a node whose sweep fails is a report with the reason, never an exception;
- over two passes a node is clean only when the last pass reached it and found nothing left;
- a receipt lists each node under ``kv_host``/``kv_disk``; a node not swept lowers that store
  to what still holds there (``unindexed``; sealed disk blocks stay ``crypto_erased``), with the
  reason, and the receipt verifies; a store claiming more than its nodes does not verify, and
  ``build_receipt`` refuses to write one;
- without Ray the gateway's process is the one node, and a job saved with its nodes signs the
  same receipt when resumed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from kvstore.keys import BlockKey, ScopeId, scope_id
from kvstore.tier import BlockAddress, Tier
from kvstore.tiers.build import build_tiers
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.job import PurgeId, PurgeStep, TierSweep
from zumik_serve.purge.nodes import (
    DISK_ROOT_ENV,
    LOCAL_NODE_ID,
    SHM_ROOT_ENV,
    NodeRef,
    NodeReport,
    NodeTierCount,
    merge_passes,
    node_tier_config,
    node_tiers,
    sweep_here,
)
from zumik_serve.purge.receipt import (
    ReceiptSigner,
    StoreEntry,
    build_receipt,
    store_entries_json,
    verify_receipt,
)
from zumik_serve.purge.service import PurgeService, node_tier_entry, receipt_stores
from zumik_serve.purge.signing_keys import SigningKeys
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.server_secrets import generate_missing, load_server_secrets
from zumik_serve.state.objects import ArtifactRole
from zumik_serve.state.requests import CreateArtifact, CreateBundle, CreateSnapshot
from zumik_serve.state.service import StateService
from zumik_serve.state.store import RedisStateStore
from zumik_serve.store.local_redis import LocalRedis
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import TenantId, cache_salt

COMPAT = "d" * 64
SCOPE = "a" * 16
OTHER_SCOPE = "b" * 16
NODE_A = NodeRef("a" * 56, "host-a")
NODE_B = NodeRef("b" * 56, "host-b")


def _config(root: Path, **extra: Any) -> dict[str, Any]:
    return {
        "compat_digest": COMPAT, "host_capacity_bytes": 1 << 20, "shm_root": str(root / "profile-shm"),
        "disk_root": str(root / "profile-disk"), **extra,
    }  # fmt: skip


def _env(root: Path, node: str) -> dict[str, str]:
    return {SHM_ROOT_ENV: str(root / node / "shm"), DISK_ROOT_ENV: str(root / node / "disk")}


def _write(config: Mapping[str, Any], env: Mapping[str, str], scope: str, count: int, start: int = 0) -> None:
    """``count`` blocks of ``scope`` in every node tier of the node with ``env``."""
    for tier in node_tiers(node_tier_config(config, env)):
        for index in range(start, start + count):
            address = BlockAddress(COMPAT, BlockKey(f"{index:032x}"), ScopeId(scope))
            assert tier.store(address, b"block-%d" % index)


def _blocks(folder: Path, scope: str) -> list[Path]:
    return [path for path in folder.rglob("*.kv") if path.parent.parent.name == scope]


def test_node_sweep_removes_the_scope_from_that_nodes_own_roots_only(tmp_path: Path) -> None:
    config = _config(tmp_path)
    env_a, env_b = _env(tmp_path, "a"), _env(tmp_path, "b")
    _write(config, env_a, SCOPE, 3)
    _write(config, env_a, OTHER_SCOPE, 1)
    _write(config, env_b, SCOPE, 2)

    report = sweep_here(NODE_A, config, [SCOPE], env_a)

    assert report.error is None
    assert report.counts == {Tier.HOST: NodeTierCount(3, 0), Tier.DISK: NodeTierCount(3, 0)}
    assert _blocks(tmp_path / "a", SCOPE) == []
    assert len(_blocks(tmp_path / "a", OTHER_SCOPE)) == 2  # another tenant's blocks stay
    assert len(_blocks(tmp_path / "b", SCOPE)) == 4  # node b's roots are not node a's
    assert not (tmp_path / "profile-shm").exists() and not (tmp_path / "profile-disk").exists()


def test_node_roots_default_to_the_profiles(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _write(config, {}, SCOPE, 2)
    assert sweep_here(NODE_A, config, [SCOPE], {}).counts[Tier.DISK] == NodeTierCount(2, 0)
    assert _blocks(tmp_path / "profile-disk", SCOPE) == []
    # No disk tier in the profile: the node's disk root does not add one.
    without_disk = {k: v for k, v in config.items() if k != "disk_root"}
    tiers = node_tiers(node_tier_config(without_disk, _env(tmp_path, "a")))
    assert [tier.tier for tier in tiers] == [Tier.HOST]


def test_node_whose_sweep_fails_is_a_report_with_the_reason(tmp_path: Path) -> None:
    config = _config(tmp_path)
    env = _env(tmp_path, "a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Path(env[SHM_ROOT_ENV]).mkdir(parents=True)
    (Path(env[SHM_ROOT_ENV]) / "zumik-kv").symlink_to(elsewhere)  # a folder that is not ours to sweep

    report = sweep_here(NODE_A, config, [SCOPE], env)

    assert report.counts == {}
    assert report.error is not None and "ForeignFolderError" in report.error


def test_two_passes_make_a_node_clean_only_when_the_last_one_found_nothing() -> None:
    node_c = NodeRef("c" * 56, "host-c")
    first = [
        NodeReport(NODE_A, {Tier.HOST: NodeTierCount(4, 0)}),
        NodeReport(NODE_B, {Tier.HOST: NodeTierCount(2, 0)}),
        NodeReport(node_c, {Tier.HOST: NodeTierCount(1, 0)}),
    ]
    second = [
        NodeReport(NODE_A, {Tier.HOST: NodeTierCount(1, 0)}),
        NodeReport(NODE_B, error="the node is dead (raylet killed)"),
    ]
    a, b, c = merge_passes(Tier.HOST, first, second)
    assert (a.node_id, a.removed_blocks, a.remaining_blocks, a.clean) == (NODE_A.node_id, 5, 0, True)
    assert (b.removed_blocks, b.remaining_blocks, b.reason) == (2, None, "the node is dead (raylet killed)")
    assert (c.removed_blocks, c.clean) == (1, False)
    assert c.reason is not None and "left the cluster" in c.reason
    left = merge_passes(Tier.DISK, [], [NodeReport(NODE_A, {Tier.DISK: NodeTierCount(0, 2)})])
    assert left[0].reason == "2 blocks of the scope were still there after the sweep"


def test_store_entry_is_the_weakest_of_its_nodes_and_a_stronger_claim_does_not_verify() -> None:
    sweep = merge_passes(
        Tier.HOST,
        [],
        [
            NodeReport(NODE_A, {Tier.HOST: NodeTierCount(3, 0)}),
            NodeReport(NODE_B, error="no answer within 5 s"),
        ],
    )
    entry = node_tier_entry(
        "kv_host", "unlink_scope", TierSweep(3, sweep), swept=GuaranteeClass.DELETED,
        unswept=GuaranteeClass.UNINDEXED,
    )  # fmt: skip
    assert entry.guarantee_class is GuaranteeClass.UNINDEXED
    assert [(n.hostname, n.result.value, n.guarantee_class.value) for n in entry.nodes or ()] == [
        ("host-a", "done", "deleted"), ("host-b", "failed", "unindexed"),
    ]  # fmt: skip
    assert "host-b" in entry.detail and "no answer within 5 s" in entry.detail
    signer = ReceiptSigner.generate()
    receipt = signer.sign(_unsigned([entry]))
    assert verify_receipt(receipt, signer.public_pem()).ok
    assert receipt["stores"][0]["nodes"][1]["detail"] == "no answer within 5 s"
    assert "remaining_blocks" not in receipt["stores"][0]["nodes"][1]  # the last sweep never reached it

    # The same store claiming what only the swept node shows: refused when built, fails verify.
    over = StoreEntry(
        "kv_host", "unlink_scope", entry.result, GuaranteeClass.DELETED, entry.detail, nodes=entry.nodes
    )
    with pytest.raises(ValueError, match="not what its nodes show"):
        _unsigned([over])
    forged = _unsigned([entry])
    forged["stores"][0]["guarantee_class"] = "deleted"
    forged["guarantee_class"] = "deleted"
    result = verify_receipt(signer.sign(forged), signer.public_pem())
    assert not result.ok and "not what its nodes show" in result.reason


def _unsigned(stores: Sequence[StoreEntry]) -> dict[str, Any]:
    return build_receipt(
        receipt_id="prg_x", tenant="ten_a", target="snp_x", issued_at=1_700_000_000, profile="test",
        profile_ceiling=GuaranteeClass.CRYPTO_ERASED, stores=stores, purged=["snp_x"], seq=1,
        prev_receipt_hash=None,
    )  # fmt: skip


# -- the purge over two nodes' folders, one of which cannot be swept ------------------------------


class TwoNodes:
    """Two nodes of one host, each swept with its own roots by ``sweep_here``; node b's host tier
    folder is a link (a folder that is not ours), so its sweep really fails."""

    def __init__(self, config: dict[str, Any], env_a: dict[str, str], env_b: dict[str, str]) -> None:
        self.config, self.env_a, self.env_b = config, env_a, env_b

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return (Tier.HOST, Tier.DISK)

    async def sweep(self, scopes: Sequence[str]) -> list[NodeReport]:
        return [
            sweep_here(NODE_A, self.config, scopes, self.env_a),
            sweep_here(NODE_B, self.config, scopes, self.env_b),
        ]


@dataclass
class Setup:
    root: Path
    server: LocalRedis

    def purges(self, config: dict[str, Any], nodes: Any = None) -> tuple[PurgeService, StateService]:
        secrets = self.root / "secrets"
        generate_missing(secrets)
        salt_secret = load_server_secrets(secrets).cache_salt_secret
        client = aioredis.from_url(self.server.url)
        tenants = RedisTenantStore(client)

        async def secret() -> bytes:
            return salt_secret

        purges = PurgeService(
            RedisPurgeStore(client, RedisStateStore(client)), signing_keys=SigningKeys(secrets),
            profile="test", ceiling=GuaranteeClass.CRYPTO_ERASED, tiers=build_tiers(config),
            sealed=bool(config.get("seal")), salt_secret=secret, salt_epoch=tenants.salt_epoch,
            rotate_salt_epoch=tenants.rotate_salt_epoch, key_cache_ttl_s=0.0, nodes=nodes,
        )  # fmt: skip
        return purges, StateService(RedisStateStore(client), max_artifact_bytes=1 << 20)

    def scope(self, tenant: str) -> str:
        secret = load_server_secrets(self.root / "secrets").cache_salt_secret
        return scope_id(cache_salt(secret, TenantId(tenant), 0))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    yield Setup(tmp_path, server)
    server.stop()


async def _exposed_snapshot(state: StateService, tenant: str) -> str:
    document = CreateArtifact(role=ArtifactRole.DOCUMENT, content="x")
    art = (await state.create_artifact(tenant, document, None))["id"]
    bnd = (await state.create_bundle(tenant, CreateBundle(artifacts=(art,)), None))["id"]
    snp = (await state.create_snapshot(tenant, CreateSnapshot(bundle=bnd), None))["id"]
    await state.snapshot_messages(tenant, snp)  # its content went to an engine
    return str(snp)


@pytest.mark.redis
@pytest.mark.parametrize("sealed", [True, False])
async def test_purge_with_a_node_not_swept_lowers_that_store_and_says_why(setup: Setup, sealed: bool) -> None:
    config = _config(setup.root, keyring_redis_url=setup.server.url, seal=sealed)
    env_a, env_b = _env(setup.root, "a"), _env(setup.root, "b")
    purges, state = setup.purges(config, TwoNodes(config, env_a, env_b))
    snp = await _exposed_snapshot(state, "ten_a")
    _write(config, env_a, setup.scope("ten_a"), 2)
    elsewhere = setup.root / "elsewhere"
    elsewhere.mkdir()
    Path(env_b[SHM_ROOT_ENV]).mkdir(parents=True)
    (Path(env_b[SHM_ROOT_ENV]) / "zumik-kv").symlink_to(elsewhere)

    receipt = (await purges.purge("ten_a", snp)).receipt

    assert receipt is not None
    assert verify_receipt(receipt, (await purges.public_keys())[0]["public_key"].encode()).ok
    assert _blocks(setup.root / "a", setup.scope("ten_a")) == []
    stores = {entry["store"]: entry for entry in receipt["stores"]}
    host, disk = stores["kv_host"], stores["kv_disk"]
    assert host["guarantee_class"] == "unindexed"  # node b's shared memory was not swept
    assert [(n["node_id"], n["result"], n["guarantee_class"]) for n in host["nodes"]] == [
        (NODE_A.node_id, "done", "deleted"), (NODE_B.node_id, "failed", "unindexed"),
    ]  # fmt: skip
    assert host["nodes"][0]["removed_blocks"] == 2 and host["nodes"][0]["remaining_blocks"] == 0
    assert "ForeignFolderError" in host["nodes"][1]["detail"] and "host-b" in host["detail"]
    # Node b's sweep failed for both of its tiers; its sealed disk blocks stay erased by the key.
    assert [n["result"] for n in disk["nodes"]] == ["done", "failed"]
    compacted = stores["redis_state"]["guarantee_class"] == "compacted"
    assert disk["guarantee_class"] == ("crypto_erased" if sealed and compacted else "unindexed")


@pytest.mark.redis
async def test_without_ray_the_gateways_node_is_the_one_node_and_a_resumed_job_signs_the_same(
    setup: Setup,
) -> None:
    config = _config(setup.root, keyring_redis_url=setup.server.url, seal=True)
    purges, state = setup.purges(config)
    snp = await _exposed_snapshot(state, "ten_a")
    _write(config, {}, setup.scope("ten_a"), 3)

    outcome = await purges.purge("ten_a", snp)

    receipt = outcome.receipt
    assert receipt is not None
    host = next(entry for entry in receipt["stores"] if entry["store"] == "kv_host")
    assert [(n["node_id"], n["result"], n["removed_blocks"]) for n in host["nodes"]] == [
        (LOCAL_NODE_ID, "done", 3)
    ]
    assert host["guarantee_class"] == "deleted"
    # The job keeps each node's result: re-signing from the stored job gives the same stores.
    client = aioredis.from_url(setup.server.url)
    store = RedisPurgeStore(client, RedisStateStore(client))
    job = await store.job("ten_a", PurgeId(outcome.job.id))
    assert job is not None and PurgeStep.TIERS in job.done
    assert job.entries.kv_host is not None and job.entries.kv_host.nodes is not None
    raw = json.loads(await client.get(f"z:{{ten_a}}:purge:{job.id}"))
    assert raw["entries"]["kv_host"]["nodes"][0]["node_id"] == LOCAL_NODE_ID
    assert store_entries_json(receipt_stores(job, sealed=True)) == receipt["stores"]
