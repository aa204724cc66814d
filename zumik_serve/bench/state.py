"""``zumik bench state``: state-store throughput and latency next to ``redis-benchmark``.

Arms, run one after the other against one redis-server (AOF on, ``appendfsync always``, the
setting Zumik acknowledges writes with), all at the same concurrency:

    redis-benchmark SET      the server's own ceiling for a durable write at this concurrency
    artifact create          StateService.create_artifact (content-addressed, 2 round trips + 1 MULTI)
    session append           StateService.append_turn (one EVALSHA; the first also loads the script)
    session read             StateService.read of a session (record + turns)

The figure is the ratio of each arm's rate to redis-benchmark's SET rate, and the number of
Redis round trips per operation (counted on the client connection).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis

from zumik_serve.state.objects import ArtifactRole, ObjectKind, TurnRole
from zumik_serve.state.requests import AppendTurn, CreateArtifact, CreateSession
from zumik_serve.state.service import StateService
from zumik_serve.state.store import RedisStateStore
from zumik_serve.store.local_redis import LocalRedis

TENANT = "ten_bench"


@dataclass(frozen=True)
class ArmResult:
    name: str
    ops: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    round_trips_per_op: float | None
    ratio_to_set: float | None = None


class CountingRedis(aioredis.Redis):
    """Counts client round trips: one per command, one per executed pipeline."""

    round_trips = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        CountingRedis.round_trips += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction=transaction, shard_hint=shard_hint)
        original = pipe.execute

        async def execute(raise_on_error: bool = True) -> Any:
            CountingRedis.round_trips += 1
            return await original(raise_on_error=raise_on_error)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe


def redis_benchmark_set(admin_url: str, requests: int, clients: int) -> float:
    """redis-benchmark's SET rate, logged in with ``admin_url``'s user (its keys are not Zumik's)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark is not installed (it comes with `apt-get install redis-server`)")
    url = urlsplit(admin_url)
    command = [binary, "-h", str(url.hostname), "-p", str(url.port), "-t", "set", "-n", str(requests)]
    command += ["-c", str(clients), "--user", str(url.username), "-a", unquote(str(url.password))]
    command += ["-d", "256", "-r", "100000", "--csv", "-q"]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout
    for line in output.splitlines():
        cells = [cell.strip('"') for cell in line.split(",")]
        if cells and cells[0] == "SET":
            return float(cells[1])
    raise RuntimeError(f"could not read redis-benchmark's output: {output[:200]}")


async def _run_arm(name: str, ops: int, concurrency: int, operation: Any) -> ArmResult:
    latencies: list[float] = []
    counter = iter(range(ops))
    CountingRedis.round_trips = 0

    async def worker() -> None:
        for index in counter:
            t0 = time.perf_counter()
            await operation(index)
            latencies.append((time.perf_counter() - t0) * 1000.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    ordered = sorted(latencies)
    return ArmResult(
        name=name, ops=ops, ops_per_s=ops / elapsed, p50_ms=statistics.median(ordered),
        p99_ms=ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        round_trips_per_op=CountingRedis.round_trips / ops,
    )  # fmt: skip


async def measure_state(url: str, *, ops: int, concurrency: int, on_arm: Any = None) -> list[ArmResult]:
    client = CountingRedis.from_url(url)
    state = StateService(RedisStateStore(client), max_artifact_bytes=1 << 20)
    # Warm up: the handle secret, and the append script in the server's script cache.
    warm = (await state.create_session(TENANT, CreateSession(), None))["id"]
    await state.append_turn(TENANT, warm, AppendTurn(role=TurnRole.USER, content="warm"), None)
    await state.create_artifact(TENANT, CreateArtifact(role=ArtifactRole.DOCUMENT, content="warm"), None)
    sessions = [(await state.create_session(TENANT, CreateSession(), None))["id"] for _ in range(concurrency)]
    run = f"{time.time_ns()}"

    async def create(index: int) -> None:
        content = f"{run}-{index}" + "x" * 200
        await state.create_artifact(TENANT, CreateArtifact(role=ArtifactRole.DOCUMENT, content=content), None)

    async def append(index: int) -> None:
        turn = AppendTurn(role=TurnRole.USER, content=f"t{index}")
        await state.append_turn(TENANT, sessions[index % concurrency], turn, None)

    async def read(index: int) -> None:
        await state.read(TENANT, ObjectKind.SESSIONS, sessions[index % concurrency])

    results = []
    try:
        for name, operation in (
            ("artifact create", create),
            ("session append", append),
            ("session read", read),
        ):
            result = await _run_arm(name, ops, concurrency, operation)
            results.append(result)
            if on_arm is not None:
                on_arm(result)
    finally:
        await client.aclose()
    return results


def run_state_bench(args: Any, console: Any) -> int:
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="zumik-bench-state-") as data_dir:
        server = LocalRedis(data_dir=Path(data_dir)).start()
        try:
            console.log(f"redis-server with AOF, appendfsync always, at {server.redacted_url}")
            console.log(f"redis-benchmark SET, {args.ops} requests, {args.concurrency} clients")
            set_rate = redis_benchmark_set(server.admin_url, args.ops, args.concurrency)
            results = asyncio.run(
                measure_state(server.url, ops=args.ops, concurrency=args.concurrency,
                              on_arm=lambda r: console.log(f"{r.name}: {r.ops_per_s:,.0f} ops/s"))
            )  # fmt: skip
        finally:
            server.stop()
    results = [ArmResult(**{**asdict(r), "ratio_to_set": r.ops_per_s / set_rate}) for r in results]
    summary = {
        "concurrency": args.concurrency,
        "ops_per_arm": args.ops,
        "redis_benchmark_set_per_s": set_rate,
        "arms": [asdict(r) for r in results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "state.json").write_text(json.dumps(summary, indent=2))
    _plot(results, set_rate, args.out / "state.png")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    table = Table(
        title=f"State store vs redis-benchmark SET ({set_rate:,.0f}/s), fsync always, c={args.concurrency}"
    )
    for column in ("operation", "ops/s", "ratio to SET", "p50 ms", "p99 ms", "round trips/op"):
        table.add_column(column)
    for r in results:
        cells = [f"{r.ops_per_s:,.0f}", f"{r.ratio_to_set:.2f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}"]
        table.add_row(r.name, *cells, f"{r.round_trips_per_op:.2f}")
    console.print(table)
    console.print(f"wrote {args.out / 'state.json'} and {args.out / 'state.png'}")
    return 0


def _plot(results: list[ArmResult], set_rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = ["redis-benchmark SET", *(r.name for r in results)]
    rates = [set_rate, *(r.ops_per_s for r in results)]
    ax.bar(names, rates, color=["gray", "tab:blue", "tab:orange", "tab:green"])
    ax.axhline(0.3 * set_rate, color="red", linestyle="--", label="30% of SET (goal for append)")
    ax.set_ylabel("operations per second")
    ax.set_title("Zumik state store on one redis-server (AOF, fsync always)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
