"""``zumik bench purge``: purge latency by what the target touched, and what sealing costs restores.

Everything runs on one redis-server started for the bench (AOF, fsync always) and tier folders
in a temporary directory; no engine is involved (a purge never waits for one).

Latency arms, one purge per iteration, each on a fresh tenant:

    objects    an artifact, bundle and snapshot never sent to an engine (Redis only)
    kv_host    an exposed snapshot with ``--blocks`` KV blocks in the host-RAM tier
    kv_redis   ... with its blocks in the Redis tier (sealed)
    kv_disk    ... with its blocks in the disk tier (sealed)

Every purge includes the AOF rewrite that makes Redis reach ``compacted``; the KV arms also wait
out the engines' data-key cache (``KEY_CACHE_TTL_S``) before their second sweep, so that blocks
written by requests still in flight are gone too. Both are part of the figure on purpose.

Sweep arms: the Redis tier's sweep of a tenant's salt epochs (a purge sweeps every epoch the
tenant has had, each a scope) among ``--sweep-keys`` blocks of other tenants, one ``SCAN`` walk
per scope (how every sweep ran before) against ``remove_scopes`` (one walk for them all),
interleaved, for each of ``--sweep-epochs``.

Sealing arms: the same blocks restored from the Redis and disk tiers, sealed (AES-GCM,
per-scope key) and plain, interleaved round by round. A restore is what the engine's connector
does before copying into its cache: plan, load, open (sealed arm) and decode the safetensors
block. The figure is sealed bandwidth over plain bandwidth (goal: at least 0.8).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis

from kvstore.codec import decode_block, encode_block
from kvstore.keys import BlockKey, scope_id
from kvstore.manager import TierManager
from kvstore.sealing import ScopedSealer
from kvstore.tier import BlockAddress, TierBackend
from kvstore.tiers.build import build_tiers
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_keyring import RedisKeyring
from kvstore.tiers.redis_tier import RedisTier
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.service import PurgeService
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

COMPAT = "b" * 64
LATENCY_ARMS = ("objects", "kv_host", "kv_redis", "kv_disk")


def block_value(address: BlockAddress, block_bytes: int) -> bytes:
    return encode_block({"kv": np.full(block_bytes, 5, dtype=np.uint8)}, address)


async def measure_latency(
    url: str, root: Path, *, iterations: int, blocks: int, block_bytes: int, on_sample: Any
) -> dict[str, list[float]]:
    client = aioredis.from_url(url)
    tenants = RedisTenantStore(client)
    state_store = RedisStateStore(client)
    state = StateService(state_store, max_artifact_bytes=1 << 20)
    samples: dict[str, list[float]] = {arm: [] for arm in LATENCY_ARMS}
    sync_client = redis.Redis.from_url(url)
    keyring = RedisKeyring(sync_client, cache_ttl_s=0)
    generate_missing(root / "secrets")
    secret = load_server_secrets(root / "secrets").cache_salt_secret
    signing_keys = SigningKeys(root / "secrets")

    async def salt_secret() -> bytes:
        return secret

    for iteration in range(iterations):
        for arm in LATENCY_ARMS:
            config = {"compat_digest": COMPAT, "keyring_redis_url": url, "seal": True}
            if arm == "kv_host":
                config |= {"host_capacity_bytes": 1 << 30, "shm_root": str(root / "shm")}
            if arm == "kv_redis":
                config["redis_url"] = url
            if arm == "kv_disk":
                config["disk_root"] = str(root / "disk")
            tiers = build_tiers(config)
            purges = PurgeService(
                RedisPurgeStore(client, state_store), signing_keys=signing_keys, profile="bench",
                ceiling=GuaranteeClass.CRYPTO_ERASED, tiers=tiers, sealed=True, salt_secret=salt_secret,
                salt_epoch=tenants.salt_epoch, rotate_salt_epoch=tenants.rotate_salt_epoch,
            )  # fmt: skip
            tenant = f"ten_bench_{arm}_{iteration}"
            artifact = await state.create_artifact(
                tenant, CreateArtifact(role=ArtifactRole.DOCUMENT, content=f"{arm} {iteration} " * 200), None
            )
            bundle = await state.create_bundle(tenant, CreateBundle(artifacts=(artifact["id"],)), None)
            snapshot = await state.create_snapshot(tenant, CreateSnapshot(bundle=bundle["id"]), None)
            target = artifact["id"]
            if arm != "objects":
                await state.snapshot_messages(tenant, snapshot["id"])  # exposed to an engine
                scope = scope_id(cache_salt(secret, TenantId(tenant), 0))
                manager = TierManager(tiers, sealer=ScopedSealer(keyring), keyring=keyring)
                for index in range(blocks):
                    address = BlockAddress(COMPAT, BlockKey(f"{iteration:08x}{index:024x}"), scope)
                    manager.store(address, block_value(address, block_bytes))
            started = time.perf_counter()
            outcome = await purges.purge(tenant, target)
            elapsed = time.perf_counter() - started
            if outcome.receipt is None:
                raise RuntimeError(f"purge did not finish: {outcome.job.error}")
            samples[arm].append(elapsed)
            on_sample(arm, elapsed, outcome.receipt["guarantee_class"])
    await client.aclose()
    return samples


SWEEP_ARMS = ("scan_per_scope", "one_walk")
SWEEP_BLOCKS_PER_EPOCH = 5


def measure_sweep(url: str, *, keys: int, epochs: Sequence[int], rounds: int = 3) -> dict[str, Any]:
    """Median seconds of each sweep arm per number of epochs (``SWEEP_ARMS``), on ``keys`` blocks
    of 1,000 other tenants' scopes, the tenant's blocks written again before each sweep."""
    client = redis.Redis.from_url(url)
    tier = RedisTier(client)
    with client.pipeline(transaction=False) as pipe:
        for index in range(keys):
            pipe.set(f"kv:{COMPAT}:{scope_id(f'bench-other-{index % 1000}')}:{index:032x}", b"v")
            if index % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
    results: dict[str, Any] = {}
    for count in epochs:
        scopes = [scope_id(f"bench-epoch-{epoch}") for epoch in range(count)]
        seconds: dict[str, list[float]] = {arm: [] for arm in SWEEP_ARMS}
        for _ in range(rounds):
            for arm in SWEEP_ARMS:
                with client.pipeline(transaction=False) as pipe:
                    for scope in scopes:
                        for block in range(SWEEP_BLOCKS_PER_EPOCH):
                            pipe.set(f"kv:{COMPAT}:{scope}:{block:032x}", b"v")
                    pipe.execute()
                started = time.perf_counter()
                if arm == "scan_per_scope":
                    removed = sum(tier.remove_scopes([scope]) for scope in scopes)
                else:
                    removed = tier.remove_scopes(scopes)
                seconds[arm].append(time.perf_counter() - started)
                if removed != SWEEP_BLOCKS_PER_EPOCH * count:
                    raise RuntimeError(f"sweep {arm}: removed {removed} of {SWEEP_BLOCKS_PER_EPOCH * count}")
        medians = {arm: statistics.median(values) for arm, values in seconds.items()}
        results[str(count)] = {**medians, "ratio": medians["scan_per_scope"] / medians["one_walk"]}
    client.close()
    return results


def measure_sealing(url: str, root: Path, *, rounds: int, blocks: int, block_bytes: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    keyring = RedisKeyring(client)
    scope = scope_id("bench-sealing")
    tiers: dict[str, TierBackend] = {"redis": RedisTier(client), "disk": DiskTier(root / "seal-disk")}
    results: dict[str, Any] = {}
    for name, tier in tiers.items():
        sealed_manager = TierManager([tier], sealer=ScopedSealer(keyring), keyring=keyring)
        plain_manager = TierManager([tier])
        sealed = [BlockAddress(COMPAT, BlockKey(f"{1:08x}{i:024x}"), scope) for i in range(blocks)]
        plain = [BlockAddress(COMPAT, BlockKey(f"{2:08x}{i:024x}"), scope) for i in range(blocks)]
        for address in sealed:
            sealed_manager.store(address, block_value(address, block_bytes))
        for address in plain:
            plain_manager.store(address, block_value(address, block_bytes))
        rates: dict[str, list[float]] = {"sealed": [], "plain": []}
        for _ in range(rounds):
            for arm, manager, addresses in (
                ("plain", plain_manager, plain),
                ("sealed", sealed_manager, sealed),
            ):
                started = time.perf_counter()
                values = manager.load(manager.plan(addresses))
                decoded = [
                    decode_block(value, address) for value, address in zip(values, addresses, strict=False)
                ]
                elapsed = time.perf_counter() - started
                if len(values) != blocks or any(tensors is None for tensors in decoded):
                    raise RuntimeError(f"{name}/{arm}: restored {len(values)} of {blocks} blocks")
                rates[arm].append(sum(len(v) for v in values) / elapsed / 1e6)
        sealed_mb_s = statistics.median(rates["sealed"])
        plain_mb_s = statistics.median(rates["plain"])
        results[name] = {
            "sealed_mb_s": sealed_mb_s,
            "plain_mb_s": plain_mb_s,
            "ratio": sealed_mb_s / plain_mb_s,
        }
    return results


def run_purge_bench(args: Any, console: Any) -> int:
    from rich.progress import Progress
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="zumik-bench-purge-") as tmp:
        root = Path(tmp)
        server = LocalRedis(data_dir=root / "redis").start()
        try:
            console.log(f"redis-server with AOF, appendfsync always, at {server.redacted_url}")
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("purges", total=args.iterations * len(LATENCY_ARMS))

                def on_sample(arm: str, seconds: float, cls: str) -> None:
                    progress.advance(task)

                latency = asyncio.run(
                    measure_latency(server.url, root, iterations=args.iterations, blocks=args.blocks,
                                    block_bytes=args.block_bytes, on_sample=on_sample)
                )  # fmt: skip
            console.log(f"sweep: {args.sweep_keys} other blocks, epochs {args.sweep_epochs}")
            sweep = measure_sweep(server.url, keys=args.sweep_keys, epochs=args.sweep_epochs)
            console.log(f"sealing: {args.rounds} interleaved rounds of {args.blocks} blocks per tier")
            sealing = measure_sealing(
                server.url, root, rounds=args.rounds, blocks=args.blocks, block_bytes=args.block_bytes
            )
        finally:
            server.stop()
    summary = {
        "iterations": args.iterations,
        "blocks": args.blocks,
        "block_bytes": args.block_bytes,
        "latency_s": {arm: _percentiles(values) for arm, values in latency.items()},
        "sweep_keys": args.sweep_keys,
        "sweep_s": sweep,
        "sealing": sealing,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "purge.json").write_text(json.dumps(summary, indent=2))
    _plot(summary, args.out / "purge.png")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    table = Table(title=f"Purge latency ({args.iterations} purges per arm, AOF rewrite included)")
    for column in ("target touched", "p50 s", "p99 s"):
        table.add_column(column)
    for arm, stats in summary["latency_s"].items():
        table.add_row(arm, f"{stats['p50']:.3f}", f"{stats['p99']:.3f}")
    console.print(table)
    sealing_table = Table(
        title=f"Restore bandwidth, sealed vs plain ({args.blocks} blocks of ~{args.block_bytes} B)"
    )
    for column in ("tier", "plain MB/s", "sealed MB/s", "sealed/plain"):
        sealing_table.add_column(column)
    for tier, row in sealing.items():
        sealing_table.add_row(
            tier, f"{row['plain_mb_s']:.0f}", f"{row['sealed_mb_s']:.0f}", f"{row['ratio']:.2f}"
        )
    console.print(sealing_table)
    sweep_table = Table(title=f"A tenant's salt epochs swept among {args.sweep_keys} other blocks (Redis)")
    for column in ("epochs", "one SCAN walk each, ms", "one walk for all, ms", "ratio"):
        sweep_table.add_column(column)
    for count, row in summary["sweep_s"].items():
        each, once = row["scan_per_scope"] * 1000, row["one_walk"] * 1000
        sweep_table.add_row(count, f"{each:.1f}", f"{once:.1f}", f"{row['ratio']:.1f}x")
    console.print(sweep_table)
    console.print(f"wrote {args.out / 'purge.json'} and {args.out / 'purge.png'}")
    return 0


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "n": len(ordered),
    }


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, sweep) = plt.subplots(1, 3, figsize=(15, 3.8))
    arms = list(summary["latency_s"])
    p50 = [summary["latency_s"][arm]["p50"] for arm in arms]
    p99 = [summary["latency_s"][arm]["p99"] for arm in arms]
    positions = np.arange(len(arms))
    left.bar(positions - 0.2, p50, 0.4, label="p50")
    left.bar(positions + 0.2, p99, 0.4, label="p99")
    left.set_xticks(positions, arms)
    left.set_ylabel("seconds per purge")
    left.set_title("Purge latency by what the target touched")
    left.legend()
    tiers = list(summary["sealing"])
    ratios = [summary["sealing"][tier]["ratio"] for tier in tiers]
    right.bar(tiers, ratios, color="tab:green")
    right.axhline(0.8, color="red", linestyle="--", label="goal 0.8")
    right.set_ylim(0, max(1.1, *ratios))
    right.set_ylabel("sealed / plain restore bandwidth")
    right.set_title("Cost of sealing on restore")
    right.legend()
    epochs = [int(count) for count in summary["sweep_s"]]
    labels = {"scan_per_scope": "one SCAN walk per epoch (before)", "one_walk": "one walk for all"}
    for arm, label in labels.items():
        sweep.plot(epochs, [summary["sweep_s"][str(n)][arm] for n in epochs], marker="o", label=label)
    sweep.set_xlabel("salt epochs of the purged tenant")
    sweep.set_ylabel("seconds per sweep (Redis tier)")
    sweep.set_title(f"Sweep among {summary['sweep_keys']:,} other blocks")
    sweep.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
