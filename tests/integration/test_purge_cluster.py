"""A purge across a Ray cluster of two nodes (two ``ray start`` on this machine, no vLLM).

Each node has its own temp folder, a custom resource and its own KV tier roots
(``ZUMIK_KV_SHM_ROOT``, ``ZUMIK_KV_DISK_ROOT`` in its environment), so the two nodes' host and
disk tiers are different folders, as on two machines. The purge runs in a driver process of its
own (this test process may hold the shared stack's Ray connection) with ``RayNodeSweeper``.

Invariants held here:
- a purge removes the scope's blocks from the host and disk tiers of every node, keeps another
  tenant's, and its receipt lists both nodes (id, hostname, blocks removed, re-check) as done;
- ``zumik tenant delete --ray-address`` joins the cluster and sweeps the deleted tenant's blocks
  from every node's host and disk tiers the same way, its receipt listing both nodes;
- after one node's raylet is killed, a purge lists that node as not swept with the reason, lowers
  ``kv_host`` to ``unindexed`` (blocks there are unreachable, not removed), and the receipt
  still verifies; the live node is swept as before.

The cluster's processes (every process whose command line names its temp folders) are killed by
id when the test ends, however it ends; nothing here stops any other Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvstore.keys import BlockKey, ScopeId, scope_id
from kvstore.tier import BlockAddress
from zumik_serve.purge.nodes import DISK_ROOT_ENV, SHM_ROOT_ENV, node_tier_config, node_tiers
from zumik_serve.purge.receipt import verify_receipt
from zumik_serve.server_secrets import generate_missing, load_server_secrets
from zumik_serve.store.local_redis import LocalRedis, free_port
from zumik_serve.tenancy.tenant import TenantId, cache_salt

pytestmark = [pytest.mark.ray, pytest.mark.redis]

COMPAT = "e" * 64
RAY = str(Path(sys.executable).with_name("ray"))
NODE_START_S = 90.0  # how long a node may take to join (both share 2 busy cores)


@dataclass
class Node:
    name: str  # also its custom resource: zumik_test_<name>
    temp_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    root: Path
    address: str
    nodes: dict[str, Node]
    config: dict[str, Any]
    redis: LocalRedis
    auth: dict[str, str]  # the Ray token's environment, for the driver

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    def scope(self, tenant: str) -> str:
        secret = load_server_secrets(self.secrets).cache_salt_secret
        return scope_id(cache_salt(secret, TenantId(tenant), 0))

    def write_blocks(self, node: str, scope: str, count: int) -> None:
        for tier in node_tiers(node_tier_config(self.config, self.nodes[node].env)):
            for index in range(count):
                address = BlockAddress(COMPAT, BlockKey(f"{index:032x}"), ScopeId(scope))
                assert tier.store(address, b"kv-block-%d" % index)

    def blocks(self, node: str, scope: str) -> list[Path]:
        roots = [Path(self.nodes[node].env[SHM_ROOT_ENV]), Path(self.nodes[node].env[DISK_ROOT_ENV])]
        return [p for root in roots for p in root.rglob("*.kv") if p.parent.parent.name == scope]

    def purge(self, tenant: str, alive: int) -> dict[str, Any]:
        """Run a purge of a new exposed snapshot of ``tenant`` in a driver process, once the
        cluster has ``alive`` live nodes; its receipt, public key and the nodes it saw."""
        request = {"address": self.address, "alive": alive, "tenant": tenant, "config": self.config,
                   "redis_url": self.redis.url, "secrets": str(self.secrets)}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", "from tests.integration.test_purge_cluster import driver; driver()"],
            input=json.dumps(request).encode(), capture_output=True, timeout=240,
            cwd=Path(__file__).parents[2], env={**os.environ, **self.auth, "RAY_USAGE_STATS_ENABLED": "0"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-4000:]
        return json.loads(done.stdout.decode().strip().splitlines()[-1])

    def zumik(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI as an operator runs it beside the cluster: the cluster's Redis and secrets."""
        env = {**os.environ, **self.auth, "RAY_USAGE_STATS_ENABLED": "0", "ZUMIK_REDIS_URL": self.redis.url,
               "ZUMIK_HOME": str(self.root / "home"), "ZUMIK_SECRETS_DIR": str(self.secrets)}  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        return subprocess.run(
            [sys.executable, "-m", "zumik_serve.cli", *args], capture_output=True, text=True, timeout=240,
            cwd=Path(__file__).parents[2], env=env,
        )  # fmt: skip


def _start_node(node: Node, args: list[str]) -> None:
    log = (node.temp_dir / "ray-start.log").open("wb")
    node.process = subprocess.Popen(
        [RAY, "start", "--block", *args], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **node.env}, start_new_session=True,
    )  # fmt: skip


def _node_args(node: Node) -> list[str]:
    ports = [free_port() for _ in range(4)]
    return [
        f"--temp-dir={node.temp_dir}", "--num-cpus=1", "--object-store-memory=80000000",
        f"--resources={json.dumps({f'zumik_test_{node.name}': 1})}", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--min-worker-port=0", "--max-worker-port=0",
        f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
        f"--metrics-export-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}",
    ]  # fmt: skip


def _processes_under(folders: list[Path]) -> list[int]:
    """Ids of this user's processes whose command line names one of ``folders``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(str(folder) in cmdline for folder in folders):
            found.append(int(entry.name))
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # Short temp folders: Ray puts unix sockets under them (108 bytes at most per path).
    temps = {name: Path(tempfile.mkdtemp(prefix=f"zk-{name}-", dir="/tmp")) for name in ("a", "b")}
    # Token authentication (`ray start`'s default), with a token of this cluster's own.
    token = tmp_path / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    nodes = {
        name: Node(
            name,
            temp,
            {
                **auth,
                SHM_ROOT_ENV: str(tmp_path / name / "shm"),
                DISK_ROOT_ENV: str(tmp_path / name / "disk"),
            },
        )  # fmt: skip
        for name, temp in temps.items()
    }
    # The head's GCS notices a dead raylet within about a second (default: tens of seconds).
    nodes["a"].env |= {
        "RAY_health_check_period_ms": "300", "RAY_health_check_timeout_ms": "300",
        "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0",
    }  # fmt: skip
    redis = LocalRedis(data_dir=tmp_path / "redis").start()
    generate_missing(tmp_path / "secrets")
    gcs_port = free_port()
    config = {
        "compat_digest": COMPAT, "host_capacity_bytes": 1 << 20, "shm_root": str(tmp_path / "profile-shm"),
        "disk_root": str(tmp_path / "profile-disk"), "keyring_redis_url": redis.url, "seal": True,
    }  # fmt: skip
    try:
        head = ["--head", f"--port={gcs_port}", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}"]  # fmt: skip
        _start_node(nodes["a"], [*head, *_node_args(nodes["a"])])
        address = f"127.0.0.1:{gcs_port}"
        _start_node(nodes["b"], [f"--address={address}", *_node_args(nodes["b"])])
        yield Cluster(tmp_path, address, nodes, config, redis, auth)
    finally:
        for node in nodes.values():
            if node.process is not None:
                _kill([node.process.pid])
        _kill(_processes_under(list(temps.values())))
        for node in nodes.values():
            if node.process is not None:
                node.process.wait(timeout=30)
        redis.stop()
        for temp in temps.values():
            shutil.rmtree(temp, ignore_errors=True)


def test_purge_and_tenant_delete_sweep_every_node_and_a_dead_one_lowers_the_class(cluster: Cluster) -> None:
    scope_a, scope_other = cluster.scope("ten_a"), cluster.scope("ten_other")
    for node in ("a", "b"):
        cluster.write_blocks(node, scope_a, 3)
        cluster.write_blocks(node, scope_other, 1)

    first = cluster.purge("ten_a", alive=2)

    receipt, pem = first["receipt"], first["public_key"].encode()
    assert verify_receipt(receipt, pem).ok
    assert cluster.blocks("a", scope_a) == [] and cluster.blocks("b", scope_a) == []
    assert len(cluster.blocks("a", scope_other)) == len(cluster.blocks("b", scope_other)) == 2
    stores = {entry["store"]: entry for entry in receipt["stores"]}
    node_ids = first["node_ids"]  # resource name -> Ray node id
    for store in ("kv_host", "kv_disk"):
        listed = {node["node_id"]: node for node in stores[store]["nodes"]}
        assert set(listed) == {node_ids["a"], node_ids["b"]}
        for node in listed.values():
            assert (node["result"], node["removed_blocks"], node["remaining_blocks"]) == ("done", 3, 0)
            assert node["hostname"]
    assert stores["kv_host"]["guarantee_class"] == "deleted"

    # `zumik tenant delete` joins the cluster (both nodes are up: the purge saw them) and sweeps
    # every node's tiers of the deleted tenant, as the gateway's purge does.
    created = cluster.zumik("tenant", "create", "leaving", "--json")
    assert created.returncode == 0, created.stderr
    scope_gone = cluster.scope(json.loads(created.stdout)["tenant_id"])
    for node in ("a", "b"):
        cluster.write_blocks(node, scope_gone, 2)
    receipt_file = cluster.root / "deletion.json"
    deleted = cluster.zumik(
        "tenant", "delete", "leaving", "--yes", "--receipt-out", str(receipt_file),
        "--ray-address", cluster.address,
    )  # fmt: skip
    assert deleted.returncode == 0, deleted.stderr[-4000:]
    assert f"every node of the Ray cluster at {cluster.address}" in " ".join(deleted.stderr.split())
    receipt = json.loads(receipt_file.read_text())
    assert verify_receipt(receipt, pem).ok
    assert cluster.blocks("a", scope_gone) == [] and cluster.blocks("b", scope_gone) == []
    assert len(cluster.blocks("a", scope_other)) == len(cluster.blocks("b", scope_other)) == 2
    stores = {entry["store"]: entry for entry in receipt["stores"]}
    for store in ("kv_host", "kv_disk"):
        listed = {node["node_id"]: node for node in stores[store]["nodes"]}
        assert set(listed) == {node_ids["a"], node_ids["b"]}
        assert {(node["result"], node["removed_blocks"]) for node in listed.values()} == {("done", 2)}

    # Node b's raylet dies: a purge now cannot sweep it, and says so.
    raylets = [pid for pid in _processes_under([cluster.nodes["b"].temp_dir]) if _is_raylet(pid)]
    assert raylets, "node b's raylet was not found"
    _kill(raylets)
    scope_b = cluster.scope("ten_b")
    for node in ("a", "b"):
        cluster.write_blocks(node, scope_b, 2)

    second = cluster.purge("ten_b", alive=1)

    receipt = second["receipt"]
    assert verify_receipt(receipt, second["public_key"].encode()).ok
    assert cluster.blocks("a", scope_b) == []
    assert len(cluster.blocks("b", scope_b)) == 4  # really not swept: the receipt must say so
    stores = {entry["store"]: entry for entry in receipt["stores"]}
    host = {node["node_id"]: node for node in stores["kv_host"]["nodes"]}
    assert host[node_ids["a"]]["result"] == "done" and host[node_ids["a"]]["guarantee_class"] == "deleted"
    dead = host[node_ids["b"]]
    assert (dead["result"], dead["guarantee_class"]) == ("failed", "unindexed")
    assert "dead" in dead["detail"] and "remaining_blocks" not in dead
    assert stores["kv_host"]["guarantee_class"] == "unindexed"
    assert "not swept" in stores["kv_host"]["detail"]


def _is_raylet(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "raylet"
    except OSError:
        return False


# -- the driver process -------------------------------------------------------------------------


def driver() -> None:
    """Reads a request (JSON on stdin), connects to the cluster, purges an exposed snapshot of
    the tenant with ``RayNodeSweeper``, prints the receipt, the public key and the node ids."""
    request = json.loads(sys.stdin.read())
    import ray

    ray.init(address=request["address"], logging_level="ERROR", log_to_driver=False)
    deadline = time.monotonic() + NODE_START_S
    while sum(1 for node in ray.nodes() if node["Alive"]) != request["alive"]:
        if time.monotonic() > deadline:
            raise SystemExit(f"the cluster never had {request['alive']} live nodes: {ray.nodes()}")
        time.sleep(0.2)
    node_ids = {
        name.removeprefix("zumik_test_"): node["NodeID"]
        for node in ray.nodes()
        for name in node["Resources"]
        if name.startswith("zumik_test_")
    }
    receipt, public_key = asyncio.run(_purge(request))
    print(json.dumps({"receipt": receipt, "public_key": public_key, "node_ids": node_ids}))


async def _purge(request: dict[str, Any]) -> tuple[dict[str, Any], str]:
    import redis.asyncio as aioredis

    from kvstore.tiers.build import build_tiers
    from zumik_serve.app.node_sweep import RayNodeSweeper
    from zumik_serve.purge.classes import GuaranteeClass
    from zumik_serve.purge.service import PurgeService
    from zumik_serve.purge.signing_keys import SigningKeys
    from zumik_serve.purge.store import RedisPurgeStore
    from zumik_serve.state.objects import ArtifactRole
    from zumik_serve.state.requests import CreateArtifact, CreateBundle, CreateSnapshot
    from zumik_serve.state.service import StateService
    from zumik_serve.state.store import RedisStateStore
    from zumik_serve.tenancy.store import RedisTenantStore

    client = aioredis.from_url(request["redis_url"])
    tenants = RedisTenantStore(client)
    secrets = Path(request["secrets"])
    salt_secret = load_server_secrets(secrets).cache_salt_secret

    async def secret() -> bytes:
        return salt_secret

    purges = PurgeService(
        RedisPurgeStore(client, RedisStateStore(client)), signing_keys=SigningKeys(secrets), profile="test",
        ceiling=GuaranteeClass.CRYPTO_ERASED, tiers=build_tiers(request["config"]), sealed=True,
        salt_secret=secret, salt_epoch=tenants.salt_epoch, rotate_salt_epoch=tenants.rotate_salt_epoch,
        key_cache_ttl_s=0.0, nodes=RayNodeSweeper(request["config"], timeout_s=60),
    )  # fmt: skip
    state = StateService(RedisStateStore(client), max_artifact_bytes=1 << 20)
    tenant = request["tenant"]
    document = CreateArtifact(role=ArtifactRole.DOCUMENT, content="what the cluster cached")
    art = (await state.create_artifact(tenant, document, None))["id"]
    bnd = (await state.create_bundle(tenant, CreateBundle(artifacts=(art,)), None))["id"]
    snp = (await state.create_snapshot(tenant, CreateSnapshot(bundle=bnd), None))["id"]
    await state.snapshot_messages(tenant, snp)  # its content went to an engine
    outcome = await purges.purge(tenant, snp)
    if outcome.receipt is None:
        raise SystemExit(f"the purge did not finish: {outcome.job.error}")
    return outcome.receipt, (await purges.public_keys())[0]["public_key"]
