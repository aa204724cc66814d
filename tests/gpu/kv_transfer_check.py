"""GPU check: KV-shaped blocks between pinned host memory, the GPU, and the disk tier's files.

Needs only PyTorch (and safetensors, which ships with it in the image) and a CUDA GPU. Reports,
in one run, the bandwidth of:

    ceiling   one large contiguous copy, pinned host -> GPU and GPU -> host
    blocks    N separate KV blocks, pinned host -> GPU and GPU -> host (what a tier restore does)
    disk      the same blocks written as safetensors files (one per block, tmp + fsync + rename,
              the disk tier's format) and read back into pinned memory, then to the GPU

and each as a fraction of the ceiling measured in the same run.

    python tests/gpu/kv_transfer_check.py --blocks 256 --out gpu-kv.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# An 8B Llama block: 32 layers x K,V x 16 tokens x 8 KV heads x 128 dims, bf16 = 2 MiB.
DEFAULT_SHAPE = (32, 2, 16, 8, 128)


def _gbps(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / 1e9


def run_check(num_blocks: int, shape: tuple[int, ...] = DEFAULT_SHAPE, repeats: int = 3) -> dict[str, object]:
    import torch
    from safetensors.torch import load_file, save_file

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible to PyTorch")
    device = torch.device("cuda")
    dtype = torch.bfloat16
    block_bytes = torch.empty(shape, dtype=dtype).numel() * 2
    total_bytes = block_bytes * num_blocks

    def timed(fn) -> float:  # best of `repeats`, synchronized with CUDA events
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1000.0)
        return best

    def ceilings() -> tuple[float, float]:  # buffers freed on return
        big_host = torch.empty(total_bytes // 2, dtype=dtype).pin_memory()
        big_gpu = torch.empty_like(big_host, device=device)
        h2d = _gbps(total_bytes, timed(lambda: big_gpu.copy_(big_host, non_blocking=True)))
        d2h = _gbps(total_bytes, timed(lambda: big_host.copy_(big_gpu, non_blocking=True)))
        return h2d, d2h

    ceiling_h2d, ceiling_d2h = ceilings()

    generator = torch.Generator().manual_seed(0)
    host_blocks = [torch.randn(shape, generator=generator).to(dtype).pin_memory() for _ in range(num_blocks)]
    gpu_blocks = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_blocks)]

    def h2d() -> None:
        for host, gpu in zip(host_blocks, gpu_blocks, strict=True):
            gpu.copy_(host, non_blocking=True)

    def d2h() -> None:
        for host, gpu in zip(host_blocks, gpu_blocks, strict=True):
            host.copy_(gpu, non_blocking=True)

    blocks_h2d = _gbps(total_bytes, timed(h2d))
    blocks_d2h = _gbps(total_bytes, timed(d2h))

    with tempfile.TemporaryDirectory(prefix="zumik-gpu-kv-") as folder:
        paths = [Path(folder, f"block-{index:06d}.safetensors") for index in range(num_blocks)]
        t0 = time.perf_counter()
        for path, gpu in zip(paths, gpu_blocks, strict=True):
            tmp = path.with_suffix(".tmp")
            save_file({"kv": gpu.cpu()}, str(tmp), metadata={"format": "zumik-kv-block/1"})
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        disk_write = _gbps(total_bytes, time.perf_counter() - t0)

        restored = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for path, target in zip(paths, restored, strict=True):
            target.copy_(load_file(str(path))["kv"].pin_memory(), non_blocking=True)
        torch.cuda.synchronize()
        disk_to_gpu = _gbps(total_bytes, time.perf_counter() - t0)
        identical = all(torch.equal(a, b) for a, b in zip(restored, gpu_blocks, strict=True))

    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "num_blocks": num_blocks,
        "block_bytes": block_bytes,
        "total_bytes": total_bytes,
        "gbps": {
            "ceiling_h2d": ceiling_h2d,
            "ceiling_d2h": ceiling_d2h,
            "blocks_h2d": blocks_h2d,
            "blocks_d2h": blocks_d2h,
            "disk_write_from_gpu": disk_write,
            "disk_read_to_gpu": disk_to_gpu,
        },
        "fraction_of_ceiling": {
            "blocks_h2d": blocks_h2d / ceiling_h2d,
            "blocks_d2h": blocks_d2h / ceiling_d2h,
            "disk_read_to_gpu": disk_to_gpu / ceiling_h2d,
        },
        "disk_round_trip_identical": identical,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run_check(args.blocks)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if result["disk_round_trip_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
