"""GPU check of the KV connector's real copy path, on every cache layout vLLM's CUDA backends use.

Runs the functions the connector itself calls (``kvstore.transfer.BlockCopier``: batched
gathers and scatters, pinned staging, non-blocking copies on a side stream), the block format
(``kvstore.codec``), the disk tier (``kvstore.tiers.disk``) and the shard addressing
(``kvstore.layout``), on caches built the way vLLM 0.32 builds them (one int8 buffer per group
viewed ``[L, B, H, N, C]`` with the resolved stride order, one ``[B, H, N, C]`` view per layer,
FP8 as ``uint8``). It needs only PyTorch, numpy and safetensors: no vLLM, no model.

Per layout (bf16 and FP8; the four physical orders, block-first among them; MLA in bf16 and
FP8; a manager block split into kernel blocks) and per rank of a simulated TP=2 engine:

    store     copy blocks out of rank r's cache, encode them under rank r's shard, write them
    restore   read them back into a zeroed cache of rank r: bit for bit the original bytes
    isolate   rank 1 finds none of rank 0's blocks under its addresses; rank 0's bytes copied
              under rank 1's address do not decode; a K/V-first (pre-0.2x vLLM) cache is refused

On CUDA it also measures, in the same run, restore and store bandwidth of the real path against
one pinned host<->device ``memcpy`` of the same bytes (the link's ceiling): the connector's whole
restore from a host (shared-memory) tier and a disk tier (``TierManager.restore`` into the
staging buffer, then the copy and scatters), Redis's path (values checked and copied by the
sink), blocks already in memory (``inject``), and the parts: the host fill, the device half,
one thread's checksum. And the synchronizing CUDA calls of each half that torch's sync debug
mode counts (what vLLM's ``VLLM_GPU_SYNC_CHECK`` reports in the engine step): none in a restore
(the forward waits, not the CPU) and none in a store, whose one wait for its bytes is on its own
event (not counted; it runs inside vLLM's ``gpu_sync_allowed``), where a copy of the block ids
from pageable memory was one. The same checks run on CPU
(``--device cpu``) in the unit suite, without the CUDA-only parts. ``tests/gpu/device_run.sh``
runs it on a lent GPU machine; its figures of 2026-12-04 (one H200) are in docs/benchmarks.md.

    python tests/gpu/kv_transfer_check.py --blocks 256 --out gpu-kv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

import kvstore.manager  # noqa: E402
from kvstore.codec import decode_block, encode_block  # noqa: E402
from kvstore.hostcopy import COPY_THREADS, PARALLEL_COPY_BYTES, copy_all  # noqa: E402
from kvstore.keys import BlockKey, ScopeId  # noqa: E402
from kvstore.layout import KvLayout, KvShard, shard_digest  # noqa: E402
from kvstore.manager import TierManager  # noqa: E402
from kvstore.sealing import AesGcmSealer  # noqa: E402
from kvstore.tier import BlockAddress  # noqa: E402
from kvstore.tiers.disk import DiskTier  # noqa: E402
from kvstore.tiers.shared_memory import SharedMemoryTier  # noqa: E402
from kvstore.transfer import BlockCopier, CacheLayoutError, restore_into  # noqa: E402

# vLLM 0.32 KVCacheLayout stride orders of the logical [L, B, H, N, C] buffer.
ORDERS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
}
COMPAT = "c" * 64


@dataclass(frozen=True)
class Case:
    name: str
    heads: int  # H of one rank
    content: int  # C in elements of dtype
    dtype: torch.dtype
    physical: str
    kernel_split: int = 1  # kernel blocks per manager block
    spec: str = "FullAttentionSpec"


def cases(head_size: int, kv_heads: int) -> list[Case]:
    kv = 2 * head_size  # K and V packed in C
    found = [Case(f"bf16 {order}", kv_heads, kv, torch.bfloat16, order) for order in ORDERS]
    found += [Case(f"fp8 {order}", kv_heads, kv, torch.uint8, order) for order in ("LBNHC", "LBHNC", "BLNHC")]
    found += [
        Case("mla bf16", 1, 576, torch.bfloat16, "LBNHC", spec="MLAAttentionSpec"),
        Case("mla fp8_ds_mla", 1, 656, torch.uint8, "LBNHC", spec="MLAAttentionSpec"),
        Case("bf16 LBNHC kernel-split x2", kv_heads, kv, torch.bfloat16, "LBNHC", kernel_split=2),
    ]
    return found


def layer_views(
    case: Case, layers: int, blocks: int, tokens: int, device: str, seed: int
) -> dict[str, torch.Tensor]:
    """Per-layer ``[B*R, H, N/R, C]`` views of one int8 buffer, as vLLM's create_kv_cache_views."""
    itemsize = torch.empty(0, dtype=case.dtype).element_size()
    rows, n = blocks * case.kernel_split, tokens // case.kernel_split
    shape = (layers, rows, case.heads, n, case.content * itemsize)
    strides = [0] * 5
    current = 1
    for dim in reversed(ORDERS[case.physical]):
        strides[dim] = current
        current *= shape[dim]
    generator = torch.Generator(device=device).manual_seed(seed)
    raw = torch.randint(-128, 128, (current,), dtype=torch.int8, device=device, generator=generator)
    view = torch.as_strided(raw, shape, strides)
    return {f"model.layers.{layer}.self_attn.attn": view[layer].view(case.dtype) for layer in range(layers)}


def layout_of_case(case: Case, tokens: int) -> KvLayout:
    mla = case.spec == "MLAAttentionSpec"
    return KvLayout(
        spec=case.spec, physical=case.physical, torch_dtype=str(case.dtype).removeprefix("torch."),
        cache_dtype="fp8" if case.dtype == torch.uint8 else "auto",
        quant_mode="FP8_PER_TENSOR" if case.dtype == torch.uint8 else "NONE", block_size=tokens,
        num_kv_heads=case.heads, head_size=case.content if mla else case.content // 2,
        head_size_v=0 if mla else case.content // 2,
        block_shape=(case.heads, tokens, case.content),
    )  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_case(
    case: Case, *, device: str, layers: int, blocks: int, tokens: int, folder: Path
) -> dict[str, Any]:
    layout = layout_of_case(case, tokens)
    shards = [shard_digest(COMPAT, layout, KvShard(rank, 2)) for rank in (0, 1)]
    keys = [BlockKey(f"{index:032x}") for index in range(blocks)]
    scope = ScopeId("check")
    disk = DiskTier(folder / case.name.replace(" ", "-"))
    block_ids = list(range(blocks - 1, -1, -1))  # any order: block i of the prompt in engine block B-1-i
    originals: list[dict[str, torch.Tensor]] = []
    for rank in (0, 1):
        caches = layer_views(case, layers, blocks, tokens, device, seed=rank + 1)
        originals.append({name: view.clone() for name, view in caches.items()})
        copied = BlockCopier(caches, blocks).extract(block_ids)
        for key, tensors in zip(keys, copied, strict=True):
            address = BlockAddress(shards[rank], key, scope)
            assert disk.store(address, encode_block(tensors, address)), "the disk tier refused a block"
    result: dict[str, Any] = {"bit_exact": True, "isolated": True}
    for rank in (0, 1):
        caches = layer_views(case, layers, blocks, tokens, device, seed=99)
        for view in caches.values():
            view.view(torch.uint8).zero_()
        copier = BlockCopier(caches, blocks)
        decoded = []
        for key in keys:
            address = BlockAddress(shards[rank], key, scope)
            value = disk.load(address)
            block = decode_block(value, address) if value is not None else None
            assert block is not None, f"{case.name}: rank {rank} lost a block"
            decoded.append(block)
        restored = copier.inject(block_ids, decoded)
        copier.synchronize()
        _sync(device)
        same = restored == blocks and all(
            torch.equal(caches[name].view(torch.uint8), originals[rank][name].view(torch.uint8))
            for name in caches
        )
        other = all(
            not torch.equal(caches[name].view(torch.uint8), originals[1 - rank][name].view(torch.uint8))
            for name in caches
        )
        result["bit_exact"] = result["bit_exact"] and same
        result["isolated"] = result["isolated"] and other
    # Rank 0's bytes under rank 1's address: refused.
    stolen = disk.load(BlockAddress(shards[0], keys[0], scope))
    result["isolated"] = bool(
        result["isolated"]
        and stolen is not None
        and decode_block(stolen, BlockAddress(shards[1], keys[0], scope)) is None
    )
    return result


def host_syncs(*, layers: int, blocks: int, tokens: int) -> dict[str, int]:
    """Synchronizing CUDA calls (torch's sync debug mode, "warn") in one store's copy-out and
    one restore's copy-in of ``blocks`` blocks, after one of each has allocated the pinned
    buffers. vLLM's ``VLLM_GPU_SYNC_CHECK`` reports these in the engine step unless allowed."""
    (case, *_) = cases(128, 8)  # bf16, block-first
    copier = BlockCopier(layer_views(case, layers, blocks, tokens, "cuda", seed=3), blocks)
    block_ids = list(range(blocks))
    copied = copier.extract(block_ids)
    copier.inject(block_ids, copied)
    copier.synchronize()
    torch.cuda.synchronize()
    steps: dict[str, Callable[[], object]] = {
        "store": lambda: copier.extract(block_ids),
        "restore": lambda: copier.inject(block_ids, copied),
    }
    counts: dict[str, int] = {}
    for name, step in steps.items():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts[name] = sum("synchronizing CUDA operation" in str(w.message) for w in seen)
        copier.synchronize()
        torch.cuda.synchronize()
    return counts


def refuses_kv_first(device: str) -> bool:
    """A pre-refactor FlashAttention cache ``(2, B, N, H, D)`` is not copied as blocks."""
    try:
        BlockCopier({"l0": torch.zeros((2, 64, 16, 8, 128), dtype=torch.bfloat16, device=device)}, 64)
    except CacheLayoutError:
        return True
    return False


def measure_bandwidth(*, layers: int, blocks: int, tokens: int, repeats: int) -> dict[str, Any]:
    """Restore and store through BlockCopier vs one pinned memcpy of the same bytes (CUDA)."""
    case = Case("bf16 LBNHC", 8, 256, torch.bfloat16, "LBNHC")
    caches = layer_views(case, layers, blocks, tokens, "cuda", seed=5)
    copier = BlockCopier(caches, blocks)
    block_ids = list(range(blocks))
    host_blocks = copier.extract(block_ids)
    total = copier.bytes_per_block * blocks
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    device_buffer = torch.empty(total, dtype=torch.uint8, device="cuda")
    encoded = [
        encode_block(t, BlockAddress(COMPAT, BlockKey(f"{i:032x}"))) for i, t in enumerate(host_blocks)
    ]

    def best(step: Any) -> float:
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return min(times)

    def restore_decoded() -> None:
        copier.inject(block_ids, host_blocks)

    def fill(threads: int) -> None:  # the host half of a restore: bytes into pinned staging
        target = copier.restore_target(block_ids)
        copy_all(
            ((row, tensors[name].reshape(-1)) for index, tensors in enumerate(host_blocks)
             for name, row in target.block(index).items()),
            threads=threads,
        )  # fmt: skip

    def restore_through_sink() -> None:  # Redis's path: values checked and copied into staging
        target = copier.restore_target(block_ids)
        items = [(i, value, BlockAddress(COMPAT, BlockKey(f"{i:032x}"))) for i, value in enumerate(encoded)]
        taken = sum(target.sink().take_many(items, parallel=True))
        assert taken == blocks, "the sink refused a block"
        target.commit(taken)

    def restore_from(manager: TierManager) -> None:  # the connector's ``_restore``
        placed = restore_into(manager, copier.restore_target(block_ids), addresses)
        assert placed.num_blocks == blocks, "a tier lost a block"

    def checksums() -> None:
        for value in encoded:
            xxhash.xxh3_64_digest(value)

    def commit_only() -> None:  # the device half: one pinned host-to-device copy, the scatters
        copier.restore_target(block_ids).commit(blocks)
        copier.synchronize()

    def restore_encoded() -> None:
        decoded = [
            decode_block(v, BlockAddress(COMPAT, BlockKey(f"{i:032x}"))) for i, v in enumerate(encoded)
        ]
        copier.inject(block_ids, [d for d in decoded if d is not None])

    addresses = [BlockAddress(COMPAT, BlockKey(f"{i:032x}")) for i in range(blocks)]
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=shm) as host_root, tempfile.TemporaryDirectory() as disk_root:
        host, disk = SharedMemoryTier(Path(host_root), 4 * total), DiskTier(Path(disk_root), 4 * total)
        sealed_disk = DiskTier(Path(disk_root) / "sealed", 4 * total)
        sealing = TierManager([sealed_disk], sealer=AesGcmSealer(b"k" * 32))  # as deployed
        sealing.store_many(addresses, encoded)
        for address, value in zip(addresses, encoded, strict=True):
            assert host.store(address, value) and disk.store(address, value)
        from_tiers = {
            "restore_host_tier": best(lambda: restore_from(TierManager([host]))),
            "restore_disk_tier": best(lambda: restore_from(TierManager([disk]))),
            "restore_sealed_disk_tier": best(lambda: restore_from(sealing)),
        }
    seconds = {
        **from_tiers,
        "h2d_memcpy_pinned": best(lambda: device_buffer.copy_(pinned, non_blocking=True)),
        "d2h_memcpy_pinned": best(lambda: pinned.copy_(device_buffer, non_blocking=True)),
        "restore_blocks": best(restore_decoded),
        "restore_blocks_with_decode": best(restore_encoded),
        "restore_through_sink": best(restore_through_sink),
        "store_blocks": best(lambda: copier.extract(block_ids)),
        "fill_per_layer_1_thread": best(lambda: fill(1)),
        f"fill_per_layer_{COPY_THREADS}_threads": best(lambda: fill(COPY_THREADS)),
        "commit_h2d_and_scatter": best(commit_only),
        "xxh3_checksum_1_thread": best(checksums),
    }
    gbps = {name: round(total / value / 1e9, 2) for name, value in seconds.items()}
    return {
        "bytes": total, "block_bytes": copier.bytes_per_block, "gbps": gbps,
        "restore_vs_h2d": round(gbps["restore_blocks"] / gbps["h2d_memcpy_pinned"], 3),
        "restore_with_decode_vs_h2d": round(
            gbps["restore_blocks_with_decode"] / gbps["h2d_memcpy_pinned"], 3
        ),
        "restore_through_sink_vs_h2d": round(gbps["restore_through_sink"] / gbps["h2d_memcpy_pinned"], 3),
        "restore_host_tier_vs_h2d": round(gbps["restore_host_tier"] / gbps["h2d_memcpy_pinned"], 3),
        "restore_disk_tier_vs_h2d": round(gbps["restore_disk_tier"] / gbps["h2d_memcpy_pinned"], 3),
        "restore_sealed_disk_tier_vs_h2d": round(
            gbps["restore_sealed_disk_tier"] / gbps["h2d_memcpy_pinned"], 3
        ),
        "store_vs_d2h": round(gbps["store_blocks"] / gbps["d2h_memcpy_pinned"], 3),
        "copy_threads": COPY_THREADS,
        "xxhash": xxhash.VERSION,
        "pinned_staging": bool(copier._host.is_pinned()),
        "side_stream": copier._stream is not None and copier._stream != torch.cuda.current_stream(),
    }  # fmt: skip


def measure_tier_half(*, device: str, layers: int, blocks: int, tokens: int, repeats: int) -> dict[str, Any]:
    """The host half of a staged restore (a tier's blocks read, checked or decrypted into the
    staging buffer: ``TierManager.restore`` into the target's sink, no device copy), on one
    thread against ``hostcopy``'s threads, alternating, the median of each: from a host tier
    (unsealed, ``/dev/shm``) and from a disk tier sealed as deployed."""
    case = Case("bf16 LBNHC", 8, 256, torch.bfloat16, "LBNHC")
    copier = BlockCopier(layer_views(case, layers, blocks, tokens, device, seed=6), blocks)
    block_ids = list(range(blocks))
    addresses = [BlockAddress(COMPAT, BlockKey(f"{i:032x}")) for i in range(blocks)]
    encoded = [encode_block(t, a) for t, a in zip(copier.extract(block_ids), addresses, strict=True)]
    total = copier.bytes_per_block * blocks
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    result: dict[str, Any] = {"bytes": total, "copy_threads": COPY_THREADS}
    with tempfile.TemporaryDirectory(dir=shm) as host_root, tempfile.TemporaryDirectory() as disk_root:
        sealer = AesGcmSealer(b"k" * 32)  # as deployed
        managers = {
            "host_tier": TierManager([SharedMemoryTier(Path(host_root), 4 * total)]),
            "sealed_disk_tier": TierManager([DiskTier(Path(disk_root), 4 * total)], sealer=sealer),
        }
        for name, manager in managers.items():
            manager.store_many(addresses, encoded)
            times: dict[str, list[float]] = {"one_thread": [], "threads": []}
            for repeat in range(2 * repeats):
                arms = ("one_thread", "threads") if repeat % 2 == 0 else ("threads", "one_thread")
                for arm in arms:
                    # one thread: no restore is big enough to be spread
                    kvstore.manager.PARALLEL_COPY_BYTES = (
                        1 << 62 if arm == "one_thread" else PARALLEL_COPY_BYTES
                    )
                    try:
                        sink = copier.restore_target(block_ids).sink()
                        started = time.perf_counter()
                        placed = manager.restore(addresses, sink)
                        times[arm].append(time.perf_counter() - started)
                    finally:
                        kvstore.manager.PARALLEL_COPY_BYTES = PARALLEL_COPY_BYTES
                    assert placed.num_blocks == blocks, "a tier lost a block"
            gbps = {arm: round(total / statistics.median(seconds) / 1e9, 2) for arm, seconds in times.items()}
            result[name] = {**gbps, "ratio": round(gbps["threads"] / gbps["one_thread"], 2)}
    return result


def run_check(
    *, device: str = "cuda", layers: int = 32, blocks: int = 64, tokens: int = 16, head_size: int = 128,
    kv_heads: int = 8, bandwidth_blocks: int = 256, repeats: int = 3, tier_half: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Every layout's round trip and rank isolation; on CUDA (or with ``tier_half``) the
    bandwidth figures too."""
    started = time.perf_counter()
    result: dict[str, Any] = {"device": device, "torch": torch.__version__, "cases": {}}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(prefix="zumik-kv-check-") as scratch:
        for case in cases(head_size, kv_heads):
            result["cases"][case.name] = check_case(
                case, device=device, layers=layers, blocks=blocks, tokens=tokens, folder=Path(scratch)
            )
    result["refuses_kv_first"] = refuses_kv_first(device)
    syncs_ok = True
    if device == "cuda":
        result["host_syncs"] = host_syncs(layers=layers, blocks=blocks, tokens=tokens)
        syncs_ok = result["host_syncs"] == {"store": 0, "restore": 0}
        result["bandwidth"] = measure_bandwidth(
            layers=layers, blocks=bandwidth_blocks, tokens=tokens, repeats=repeats
        )
    if device == "cuda" or tier_half:
        result["tier_half"] = measure_tier_half(
            device=device, layers=layers, blocks=bandwidth_blocks, tokens=tokens, repeats=repeats
        )
    result["ok"] = (
        result["refuses_kv_first"]
        and syncs_ok
        and all(case["bit_exact"] and case["isolated"] for case in result["cases"].values())
    )
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=256, help="blocks in the bandwidth measurement")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tier-half", action="store_true",
        help="also on CPU: a staged restore's host half on one thread against hostcopy's threads",
    )  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run_check(
        device=args.device, layers=args.layers, bandwidth_blocks=args.blocks, repeats=args.repeats,
        tier_half=args.tier_half,
    )  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
