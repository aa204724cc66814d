"""``zumik bench tiers``: time to first token restoring KV from each tier vs recomputing it.

For prompts of about 512, 1024 and 2040 tokens (the tiny model's context is 2048), in fresh
vLLM engine processes on CPU with Zumik's connector:

    recompute   process 1, nothing cached anywhere: prefill computes every block (and the
                connector stores them in the host, Redis and disk tiers)
    engine hit  each process again after its restores, vLLM's own prefix cache holding the
                prompt (no tier asked): the floor of a restore's TTFT in that process, beside
                which each restore's own cost is shown (processes differ by several ms a step)
    host        process 1 again, after resetting vLLM's own prefix cache: restore from host RAM
    redis       process 2, configured with only the Redis tier
    disk        process 3, configured with only the disk tier

Redis and disk blocks are sealed (AES-GCM, a data key per scope), as a deployment's default profile
stores them (``--plain``: unsealed); host blocks never are. Each engine restores every prompt
once fresh (its TTFT is the one compared with recompute) and ``REPEATS`` times more after
resetting vLLM's prefix cache: a fresh engine's first restore also pays one-time costs (the
tier's connection, its buffers growing), so bandwidth is reported for both, and the warm
restores' median is what is set beside the ceilings, which are warm figures too.

Each medium's ceiling is measured in the same run on the same bytes a restore reads: as many
blocks of the restored block's size, read the way a tier of that medium must read them:

    memcpy      one C copy of all of them (a reference: no tier of files or servers reaches it)
    shm_read    one file per block in shared memory, each read into one reused buffer (the
                host tier's medium)
    redis_mget  one ``MGET`` of all of them (a restore's one round trip), its reply received
                into one reused buffer and not parsed: the server and the socket, no client
                work (``redis-benchmark``'s figures are reported too: ``redis_get``, one ``GET``
                per block, and ``redis_benchmark_mget``, whose client copies the reply again)
    file_read   one file per block on the disk tier's file system, into one reused buffer
                (``file_read_bytes``: each into a fresh object, the allocator's ceiling)
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
import redis

from kvstore.connector import RESTORE_LOG
from zumik_serve.store.local_redis import LocalRedis

REPEATS = 5  # warm restores per prompt and engine, after the fresh one
LOG_PATTERN = re.compile(RESTORE_LOG + r" blocks=(\d+) bytes=(\d+) seconds=([0-9.]+) tiers=(\S*)")


def _engine(
    model_dir: Path, config: dict[str, Any], prompts: list[list[int]], mode: str
) -> tuple[list[dict], list]:
    """Per prompt, the engine's result and its restores' logs, in order (the fresh one first)."""
    request = {
        "model_dir": str(model_dir),
        "config": config,
        "prompts": prompts,
        "mode": mode,
        "max_tokens": 1,
        "repeats": REPEATS,
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
    per_prompt = [
        restores[index * (REPEATS + 1) : (index + 1) * (REPEATS + 1)] for index in range(len(prompts))
    ]
    return json.loads(lines[-1].removeprefix("RESULT ")), per_prompt


def _ceilings(
    redis_server: LocalRedis, folders: dict[str, Path], block_bytes: int, count: int
) -> dict[str, float]:
    """Bytes per second of each medium for ``count`` blocks of ``block_bytes`` (see the module's
    docstring); ``folders``: "shm" and "disk", where the block files go."""
    total = block_bytes * count
    payload = np.random.default_rng(0).integers(0, 255, size=total, dtype=np.uint8)
    target = np.empty_like(payload)
    memcpy = total / min(_timed(lambda: np.copyto(target, payload)) for _ in range(15))
    client = redis.Redis.from_url(redis_server.admin_url)  # a throwaway server's; keys not kv:*
    keys = [f"ceiling:{index}" for index in range(count)]
    for index, key in enumerate(keys):
        client.set(key, payload[index * block_bytes : (index + 1) * block_bytes].tobytes())
    reply_bytes = len(b"*%d\r\n" % count) + count * (len(b"$%d\r\n" % block_bytes) + block_bytes + 2)
    reply = bytearray(reply_bytes)
    redis_mget = total / min(_timed(lambda: _drain_mget(client, keys, reply)) for _ in range(15))
    client.close()
    redis_get = benchmark_mget = 0.0
    binary = shutil.which("redis-benchmark")
    if binary:
        admin = urlsplit(redis_server.admin_url)  # a throwaway server's; its keys are not kv:*
        command = [binary, "-h", redis_server.host, "-p", str(redis_server.port)]
        command += [
            "--user",
            str(admin.username),
            "-a",
            unquote(str(admin.password)),
            "-c",
            "1",
            "--csv",
            "-q",
        ]
        # SET first, so that the GETs read values of one block's size (not empty replies).
        redis_get = _benchmark_rps(
            command + ["-t", "set,get", "-n", str(count * 16), "-d", str(block_bytes)], "GET"
        )
        redis_get *= block_bytes
        benchmark_mget = _benchmark_rps(command + ["-n", "200", "MGET", *keys], "MGET") * total
    buffer = bytearray(block_bytes)
    rates: dict[str, float] = {}
    fresh = 0.0
    for medium, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index in range(count):
            path = folder / f"ceiling-{index}.bin"
            path.write_bytes(payload[index * block_bytes : (index + 1) * block_bytes].tobytes())
            files.append(path)

        def read_into(files: list[Path] = files) -> None:
            for path in files:
                with path.open("rb", buffering=0) as file:
                    file.readinto(buffer)

        rates[medium] = total / min(_timed(read_into) for _ in range(15))
        if medium == "disk":
            fresh = total / min(_timed(lambda files=files: [p.read_bytes() for p in files]) for _ in range(5))
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "memcpy": memcpy, "shm_read": rates["shm"], "redis_mget": redis_mget, "redis_get": redis_get,
        "redis_benchmark_mget": benchmark_mget,
        "file_read": rates["disk"], "file_read_bytes": fresh,
    }  # fmt: skip


def _drain_mget(client: redis.Redis, keys: list[str], reply: bytearray) -> None:
    """Send one ``MGET`` of ``keys`` and receive its reply, exactly ``len(reply)`` bytes, into
    ``reply`` (not parsed)."""
    connection = client.connection_pool.get_connection()
    try:
        connection.send_command("MGET", *keys)
        sock: Any = connection._sock
        view, received = memoryview(reply), 0
        while received < len(reply):
            got = sock.recv_into(view[received:])
            if got == 0:
                raise ConnectionError("Redis closed the connection during an MGET reply")
            received += got
    finally:
        client.connection_pool.release(connection)


def _benchmark_rps(command: list[str], test: str) -> float:
    """Requests per second ``redis-benchmark`` reports for its test named ``test``."""
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    for line in out.splitlines():
        cells = [cell.strip('"') for cell in line.split('","')]
        if cells and cells[0].split(" ")[0] == test:
            return float(cells[1])
    return 0.0


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_tiers(
    model_dir: Path, lengths: list[int], on_step: Any = print, *, sealed: bool = True
) -> dict[str, Any]:
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
            base: dict[str, Any] = {"compat_digest": compat, "host_capacity_bytes": 0}
            kv = redis_server.kv_access  # as in a deployment: the zumik-kv user, vLLM logs no password
            redis_tier = {"redis_url": kv.url, "redis_password_file": str(kv.password_file)}
            if sealed:  # the data keys in the same server (a deployment keeps them in the state Redis)
                base |= {
                    "keyring_redis_url": kv.url,
                    "redis_password_file": str(kv.password_file),
                    "seal": True,
                }
            disk_tier = {"disk_root": str(folder / "kv"), "disk_capacity_bytes": 4 << 30}
            all_tiers = {**base, "host_capacity_bytes": 1 << 30, **redis_tier, **disk_tier,
                         "shm_root": str(shm_root)}  # fmt: skip
            on_step("process 1: recompute, then restore from host RAM (stores every tier)")
            primed, host_logs = _engine(model_dir, all_tiers, prompts, "prime")
            on_step("process 2: restore from Redis")
            from_redis, redis_logs = _engine(model_dir, {**base, **redis_tier}, prompts, "restore")
            on_step("process 3: restore from disk")
            from_disk, disk_logs = _engine(model_dir, {**base, **disk_tier}, prompts, "restore")
            first = host_logs[-1][0] if host_logs and host_logs[-1] else {"bytes": 131072, "blocks": 1}
            block_bytes = first["bytes"] // max(first["blocks"], 1)
            on_step("medium ceilings: memcpy, shared-memory file reads, Redis MGET, file reads")
            media = {"shm": shm_root / "ceiling", "disk": folder / "ceiling"}
            ceilings = _ceilings(redis_server, media, block_bytes, max(first["blocks"], 1))
        finally:
            redis_server.stop()
            shutil.rmtree(shm_root, ignore_errors=True)
    rows = []
    for index, length in enumerate(lengths):
        recompute = primed[index]["seconds"]
        tiers = {
            "host": (primed[index]["host_seconds"], primed[index], host_logs, "shm_read"),
            "redis": (from_redis[index]["seconds"], from_redis[index], redis_logs, "redis_mget"),
            "disk": (from_disk[index]["seconds"], from_disk[index], disk_logs, "file_read"),
        }
        engine_hit = float(np.median(primed[index]["engine_hit_seconds"]))
        row: dict[str, Any] = {
            "tokens": length, "recompute_ttft_s": recompute,
            # vLLM's own prefix cache holding the prompt, in the recompute's process: a
            # restore's TTFT cannot be lower
            "engine_hit_ttft_s": engine_hit, "engine_hit_cached_tokens": primed[index]["engine_hit_cached"],
            "engine_hit_ratio_to_recompute": engine_hit / recompute,
        }  # fmt: skip
        for name, (seconds, result, logs, medium) in tiers.items():
            own_hit = float(np.median(result["engine_hit_seconds"]))  # in the restoring process
            cached = result["host_cached"] if name == "host" else result["cached"]
            restores = logs[index] if index < len(logs) else []
            rates = [log["bytes"] / log["seconds"] for log in restores if log["seconds"] > 0]
            fresh = rates[0] if rates else 0.0
            warm = float(np.median(rates[1:])) if len(rates) > 1 else 0.0
            ceiling = ceilings[medium]
            warm_ttft = float(np.median(result["warm_seconds"])) if result.get("warm_seconds") else None
            row[name] = {
                "ttft_s": seconds, "warm_ttft_s": warm_ttft,
                "cached_tokens": cached, "ratio_to_recompute": seconds / recompute,
                # what the restore adds over vLLM's own prefix cache in the same process (the
                # fresh restore, then warm)
                "engine_hit_ttft_s": own_hit, "engine_hit_cached_tokens": result["engine_hit_cached"],
                "over_engine_hit_s": seconds - own_hit,
                "warm_over_engine_hit_s": None if warm_ttft is None else warm_ttft - own_hit,
                "sealed": sealed and name != "host", "ceiling": medium,
                "restore_bytes_per_s": warm, "first_restore_bytes_per_s": fresh,
                "ceiling_bytes_per_s": ceiling,
                "fraction_of_ceiling": warm / ceiling if ceiling else None,
                "first_fraction_of_ceiling": fresh / ceiling if ceiling else None,
            }  # fmt: skip
        rows.append(row)
    return {
        "lengths": lengths, "block_bytes": block_bytes, "sealed": sealed, "repeats": REPEATS,
        "ceilings_bytes_per_s": ceilings, "rows": rows,
    }  # fmt: skip


def run_tiers_bench(args: Any, console: Any) -> int:
    from rich.table import Table

    from profiles import load_builtin
    from zumik_serve.home import ZumikHome
    from zumik_serve.model.resolve import resolve_model_dir

    model_dir = resolve_model_dir(load_builtin("local-cpu"), ZumikHome.from_env().ensure())
    lengths = [int(x) for x in args.lengths.split(",")]
    sealed = not getattr(args, "plain", False)
    result = measure_tiers(model_dir, lengths, on_step=lambda message: console.log(message), sealed=sealed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiers.json").write_text(json.dumps(result, indent=2))
    _plot(result, args.out / "tiers.png")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    title = "TTFT restoring from each tier vs recompute (fresh engines, tiny model on CPU)"
    table = Table(title=f"{title}; Redis and disk {'sealed' if sealed else 'unsealed'}")
    columns = ("tokens", "recompute ms", "tier", "ttft ms", "x recompute", "cached", "first MB/s",
               "warm MB/s", "ceiling MB/s", "warm / ceiling")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for row in result["rows"]:
        for tier in ("host", "redis", "disk"):
            cell = row[tier]
            recompute_ms, ttft_ms = row["recompute_ttft_s"] * 1e3, cell["ttft_s"] * 1e3
            table.add_row(
                str(row["tokens"]), f"{recompute_ms:.1f}", tier, f"{ttft_ms:.1f}",
                f"{cell['ratio_to_recompute']:.2f}", str(cell["cached_tokens"]),
                f"{cell['first_restore_bytes_per_s'] / 1e6:.0f}", f"{cell['restore_bytes_per_s'] / 1e6:.0f}",
                f"{cell['ceiling_bytes_per_s'] / 1e6:.0f} ({cell['ceiling']})",
                f"{cell['fraction_of_ceiling'] or 0:.2f}",
            )  # fmt: skip
    console.print(table)
    for row in result["rows"]:
        hit_ms = row["engine_hit_ttft_s"] * 1e3
        console.print(
            f"{row['tokens']} tokens from vLLM's own prefix cache (no tier asked; the floor of a "
            f"restore's TTFT): {hit_ms:.1f} ms, {row['engine_hit_ratio_to_recompute']:.2f}x recompute; "
            "a restore adds over it in its own process, fresh / warm: "
            + ", ".join(
                f"{tier} {row[tier]['over_engine_hit_s'] * 1e3:.1f} / "
                f"{(row[tier]['warm_over_engine_hit_s'] or 0) * 1e3:.1f} ms"
                for tier in ("host", "redis", "disk")
            )
        )
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
    ax.plot(
        lengths, [r["engine_hit_ttft_s"] * 1e3 for r in result["rows"]], linestyle="--", color="grey",
        label="vLLM's own prefix cache (the floor)",
    )  # fmt: skip
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("KV restore vs recompute, fresh vLLM CPU engines")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
