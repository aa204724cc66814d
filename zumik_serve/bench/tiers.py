"""``zumik bench tiers``: time to first token restoring KV from each tier vs recomputing it.

For prompts of about 512, 1024 and 2040 tokens (the tiny model's context is 2048), in fresh
vLLM engine processes on CPU with Zumik's connector:

    recompute   process 1, nothing cached anywhere: prefill computes every block (and the
                connector stores them in the host, Redis and disk tiers)
    host        process 1 again, after resetting vLLM's own prefix cache: restore from host RAM
    redis       process 2, configured with only the Redis tier
    disk        process 3, configured with only the disk tier

Each restore's bandwidth (bytes / seconds, logged by the connector) is set beside the ceiling of
its medium measured in the same run: a memcpy, ``redis-benchmark`` GETs of one block's size,
and sequential reads of block-sized files into one reused buffer (``file_read``; reading each
into a fresh object, ``file_read_bytes``, is also reported: it is the allocator's ceiling more
than the medium's). The bench's tiers are unsealed (no keyring): a sealed restore also decrypts.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from kvstore.connector import RESTORE_LOG
from zumik_serve.store.local_redis import LocalRedis

LOG_PATTERN = re.compile(RESTORE_LOG + r" blocks=(\d+) bytes=(\d+) seconds=([0-9.]+) tiers=(\S*)")


def _engine(
    model_dir: Path, config: dict[str, Any], prompts: list[list[int]], mode: str
) -> tuple[list[dict], list]:
    request = {
        "model_dir": str(model_dir),
        "config": config,
        "prompts": prompts,
        "mode": mode,
        "max_tokens": 1,
    }
    result = subprocess.run(
        [sys.executable, "-m", "zumik_serve.bench.kv_engine", json.dumps(request)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the engine process failed: {result.stderr[-2000:]}")
    restores = [
        {"blocks": int(m[1]), "bytes": int(m[2]), "seconds": float(m[3]), "tiers": m[4]}
        for m in LOG_PATTERN.finditer(result.stdout + result.stderr)  # vLLM logs to stdout
    ]
    return json.loads(lines[-1].removeprefix("RESULT ")), restores


def _ceilings(redis_server: LocalRedis, folder: Path, block_bytes: int, count: int = 256) -> dict[str, float]:
    payload = np.random.default_rng(0).integers(0, 255, size=block_bytes * count, dtype=np.uint8)
    target = np.empty_like(payload)
    best = min(_timed(lambda: np.copyto(target, payload)) for _ in range(5))
    memcpy = payload.nbytes / best
    binary = shutil.which("redis-benchmark")
    redis_rate = 0.0
    if binary:
        # SET first, so that the GETs read values of one block's size (not empty replies).
        command = [binary, "-h", redis_server.host, "-p", str(redis_server.port), "-t", "set,get"]
        admin = urlsplit(redis_server.admin_url)  # a throwaway server's; its keys are not kv:*
        command += ["--user", str(admin.username), "-a", unquote(str(admin.password))]
        command += ["-n", str(count * 4), "-c", "1", "-d", str(block_bytes), "--csv", "-q"]
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
        for line in out.splitlines():
            cells = [cell.strip('"') for cell in line.split(",")]
            if cells and cells[0] == "GET":
                redis_rate = float(cells[1]) * block_bytes
    files = []
    for index in range(count):
        path = folder / f"ceiling-{index}.bin"
        path.write_bytes(payload[index * block_bytes : (index + 1) * block_bytes].tobytes())
        files.append(path)
    # Into one reused buffer: a fresh object per read (``read_bytes``) measures the allocator
    # (fresh pages for every block) more than the medium, 5-9x slower here than the medium.
    buffer = bytearray(block_bytes)

    def read_into() -> None:
        for path in files:
            with path.open("rb", buffering=0) as file:
                file.readinto(buffer)

    file_read = block_bytes * count / min(_timed(read_into) for _ in range(3))
    fresh = block_bytes * count / min(_timed(lambda: [p.read_bytes() for p in files]) for _ in range(3))
    return {"memcpy": memcpy, "redis_get": redis_rate, "file_read": file_read, "file_read_bytes": fresh}


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_tiers(model_dir: Path, lengths: list[int], on_step: Any = print) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(10, 900, size=length)] for length in lengths]
    # A compat digest of this run only: nothing from an earlier run (shared memory outlives
    # processes) can be mistaken for a restore, and the recompute arm really recomputes.
    compat = secrets.token_hex(32)
    # A shared-memory folder of this run's own (the host tier's budget is the node's: a run must
    # neither evict a running engine's blocks nor count them).
    shm_base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    shm_root = shm_base / f"zumik-bench-tiers-{compat[:12]}"
    with tempfile.TemporaryDirectory(prefix="zumik-bench-tiers-") as scratch:
        folder = Path(scratch)
        # A KV Redis as `zumik serve` starts one: maxmemory (ample here), volatile-lru, no AOF.
        redis_server = LocalRedis(data_dir=folder / "redis", role="kv", maxmemory_bytes=4 << 30).start()
        try:
            base = {"compat_digest": compat, "host_capacity_bytes": 0}
            kv = redis_server.kv_access  # as in a deployment: the zumik-kv user, vLLM logs no password
            redis_tier = {"redis_url": kv.url, "redis_password_file": str(kv.password_file)}
            all_tiers = {**base, "host_capacity_bytes": 1 << 30, **redis_tier,
                         "disk_root": str(folder / "kv"), "disk_capacity_bytes": 4 << 30,
                         "shm_root": str(shm_root)}  # fmt: skip
            on_step("process 1: recompute, then restore from host RAM (stores every tier)")
            primed, host_logs = _engine(model_dir, all_tiers, prompts, "prime")
            on_step("process 2: restore from Redis")
            from_redis, redis_logs = _engine(model_dir, {**base, **redis_tier}, prompts, "restore")
            on_step("process 3: restore from disk")
            from_disk, disk_logs = _engine(
                model_dir,
                {**base, "disk_root": str(folder / "kv"), "disk_capacity_bytes": 4 << 30},
                prompts,
                "restore",
            )
            block_bytes = host_logs[0]["bytes"] // max(host_logs[0]["blocks"], 1) if host_logs else 131072
            on_step("medium ceilings: memcpy, redis-benchmark GET, file reads")
            ceilings = _ceilings(redis_server, folder, block_bytes)
        finally:
            redis_server.stop()
            shutil.rmtree(shm_root, ignore_errors=True)
    rows = []
    for index, length in enumerate(lengths):
        recompute = primed[index]["seconds"]
        tiers = {
            "host": (primed[index]["host_seconds"], primed[index]["host_cached"], host_logs, "memcpy"),
            "redis": (from_redis[index]["seconds"], from_redis[index]["cached"], redis_logs, "redis_get"),
            "disk": (from_disk[index]["seconds"], from_disk[index]["cached"], disk_logs, "file_read"),
        }
        row: dict[str, Any] = {"tokens": length, "recompute_ttft_s": recompute}
        for name, (seconds, cached, logs, medium) in tiers.items():
            log = logs[index] if index < len(logs) else None
            bandwidth = log["bytes"] / log["seconds"] if log and log["seconds"] > 0 else 0.0
            row[name] = {
                "ttft_s": seconds, "cached_tokens": cached, "ratio_to_recompute": seconds / recompute,
                "restore_bytes_per_s": bandwidth, "ceiling_bytes_per_s": ceilings[medium],
                "fraction_of_ceiling": bandwidth / ceilings[medium] if ceilings[medium] else None,
            }  # fmt: skip
        rows.append(row)
    return {"lengths": lengths, "block_bytes": block_bytes, "ceilings_bytes_per_s": ceilings, "rows": rows}


def run_tiers_bench(args: Any, console: Any) -> int:
    from rich.table import Table

    from profiles import load_builtin
    from zumik_serve.home import ZumikHome
    from zumik_serve.model.resolve import resolve_model_dir

    model_dir = resolve_model_dir(load_builtin("local-cpu"), ZumikHome.from_env().ensure())
    lengths = [int(x) for x in args.lengths.split(",")]
    result = measure_tiers(model_dir, lengths, on_step=lambda message: console.log(message))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiers.json").write_text(json.dumps(result, indent=2))
    _plot(result, args.out / "tiers.png")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table(title="TTFT restoring from each tier vs recompute (fresh engines, tiny model on CPU)")
    for column in (
        "tokens",
        "recompute ms",
        "tier",
        "ttft ms",
        "x recompute",
        "cached",
        "restore MB/s",
        "ceiling MB/s",
    ):
        table.add_column(column)
    for row in result["rows"]:
        for tier in ("host", "redis", "disk"):
            cell = row[tier]
            recompute_ms, ttft_ms = row["recompute_ttft_s"] * 1e3, cell["ttft_s"] * 1e3
            table.add_row(
                str(row["tokens"]), f"{recompute_ms:.1f}", tier, f"{ttft_ms:.1f}",
                f"{cell['ratio_to_recompute']:.2f}", str(cell["cached_tokens"]),
                f"{cell['restore_bytes_per_s'] / 1e6:.0f}", f"{cell['ceiling_bytes_per_s'] / 1e6:.0f}",
            )  # fmt: skip
    console.print(table)
    console.print(f"wrote {args.out / 'tiers.json'} and {args.out / 'tiers.png'}")
    return 0


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    lengths = result["lengths"]
    ax.plot(lengths, [r["recompute_ttft_s"] * 1e3 for r in result["rows"]], marker="o", label="recompute")
    for tier in ("host", "redis", "disk"):
        ax.plot(
            lengths,
            [r[tier]["ttft_s"] * 1e3 for r in result["rows"]],
            marker="o",
            label=f"restore from {tier}",
        )
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("KV restore vs recompute, fresh vLLM CPU engines")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
