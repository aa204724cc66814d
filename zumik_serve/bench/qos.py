"""``zumik bench qos``: QoS classes and backpressure against a running Zumik, arms side by side.

1. Interactive time to first token (streamed chat, sequential probes) in three arms, interleaved
   in rounds (arm order shuffled per round), so machine noise hits them alike:
     idle          nothing else runs
     batch flood   ``--flood`` clients send long ``batch`` requests back to back (a 429 is
                   retried after its Retry-After): the class Zumik keeps apart
     same-class    the same flood sent as ``interactive``: what the probes would see without
                   classes (the flood competes for the probes' own slots)
   Goal (issue #9): batch-flood p50 within 1.5x of idle p50.
2. A burst of ``--burst-factor`` x the batch class's capacity (running + queued), all at once:
   every answer is a 200 or a 429 with an integer Retry-After and an OpenAI error object; time to
   reject by percentile; then ``--sustain-s`` seconds at 3x the capacity, with the gateway
   process's RSS before and after (when its pid is visible: same machine).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from zumik_serve.providers.sse import sse_lines

PROBE = "Answer briefly: what is a cache?"
FLOOD = "Write a long essay about caches, queues and schedulers."


@dataclass
class QosResult:
    rounds: int
    probes_per_round: int
    flood_clients: int
    ttft_ms: dict[str, list[float]] = field(default_factory=dict)
    burst: dict[str, Any] = field(default_factory=dict)
    sustained: dict[str, Any] = field(default_factory=dict)

    def p50(self, arm: str) -> float:
        return statistics.median(self.ttft_ms[arm])

    def summary(self) -> dict[str, Any]:
        idle = self.p50("idle")
        return {
            "rounds": self.rounds, "probes_per_round": self.probes_per_round,
            "flood_clients": self.flood_clients,
            "ttft_p50_ms": {arm: round(self.p50(arm), 2) for arm in self.ttft_ms},
            "ttft_p90_ms": {arm: round(_pct(values, 0.9), 2) for arm, values in self.ttft_ms.items()},
            "ratio_to_idle": {arm: round(self.p50(arm) / idle, 3) for arm in self.ttft_ms},
            "goal_batch_flood_within_1_5x": self.p50("batch flood") <= 1.5 * idle,
            "burst": self.burst, "sustained": self.sustained,
        }  # fmt: skip


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))] if ordered else float("nan")


async def _ttft(client: httpx.AsyncClient, model: str, qos: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": PROBE}], "max_tokens": 8, "stream": True}
    started = time.perf_counter()
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-zumik-qos": qos}
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"a probe got {response.status_code}: {(await response.aread())[:200]!r}")
        first = None
        async for line in sse_lines(response.aiter_bytes()):
            if first is None and line.startswith("data: {"):
                first = (time.perf_counter() - started) * 1000
    if first is None:
        raise RuntimeError("a probe streamed no chunk")
    return first


async def _flood(
    client: httpx.AsyncClient, model: str, qos: str, stop: asyncio.Event, tally: dict[str, int]
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": FLOOD}], "max_tokens": 256}
    while not stop.is_set():
        tally["sent"] = tally.get("sent", 0) + 1
        try:
            response = await client.post("/v1/chat/completions", json=body, headers={"x-zumik-qos": qos})
        except httpx.HTTPError:
            tally["errors"] = tally.get("errors", 0) + 1
            continue
        tally[str(response.status_code)] = tally.get(str(response.status_code), 0) + 1
        if response.status_code == 429:
            await asyncio.sleep(min(5.0, float(response.headers.get("retry-after", "1"))))


async def measure_ttft(
    url: str, key: str, model: str, *, rounds: int, probes: int, flood_clients: int, seed: int = 0,
    on_progress: Any = None,
) -> tuple[dict[str, list[float]], dict[str, dict[str, int]]]:  # fmt: skip
    arms = {"idle": None, "batch flood": "batch", "same-class flood": "interactive"}
    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    tallies: dict[str, dict[str, int]] = {arm: {} for arm in arms}
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=flood_clients + 8, max_keepalive_connections=flood_clients + 8)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=300) as client:
        await _ttft(client, model, "interactive")  # warm-up
        for _ in range(rounds):
            order = list(arms)
            rng.shuffle(order)
            for arm in order:
                stop = asyncio.Event()
                flood_class = arms[arm]
                tasks = []
                if flood_class is not None:
                    tasks = [asyncio.create_task(_flood(client, model, flood_class, stop, tallies[arm]))
                             for _ in range(flood_clients)]  # fmt: skip
                    await asyncio.sleep(1.0)  # let the flood fill the engine
                for _ in range(probes):
                    samples[arm].append(await _ttft(client, model, "interactive"))
                    if on_progress is not None:
                        on_progress(1)
                stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    return samples, tallies


IDLE_WAIT_S = 300.0


async def wait_idle(client: httpx.AsyncClient, *, timeout_s: float = IDLE_WAIT_S) -> float:
    """Wait until the gateway serves nothing (``/healthz``'s ``in_flight``; the check itself not
    counted): a flood's requests run on after their clients went away, holding their class's
    slots, and a burst measured meanwhile would meet them instead of an idle gateway. Returns
    the seconds waited; raises ``TimeoutError`` past ``timeout_s``."""
    started = time.monotonic()
    while True:
        health = await client.get("/healthz")
        if health.status_code == 200 and health.json().get("in_flight", 0) <= 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the gateway still serves {health.text} after {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


async def measure_burst(url: str, key: str, model: str, n: int) -> dict[str, Any]:
    """``n`` batch requests at once, from an idle gateway: statuses, Retry-After and error
    shape, time to reject."""
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    headers = {"Authorization": f"Bearer {key}", "x-zumik-qos": "batch"}
    body = {"model": model, "messages": [{"role": "user", "content": FLOOD}], "max_tokens": 128}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=300) as client:
        await wait_idle(client)
        await asyncio.gather(*(client.get("/v1/models") for _ in range(min(n, 64))))  # open connections first
        gate = asyncio.Event()

        async def one() -> tuple[int, float, bool]:
            await gate.wait()
            started = time.perf_counter()
            try:
                response = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                return -1, (time.perf_counter() - started) * 1000, False
            elapsed = (time.perf_counter() - started) * 1000
            well_formed = True
            if response.status_code == 429:
                error = response.json().get("error", {})
                retry_after = response.headers.get("retry-after", "")
                well_formed = retry_after.isdigit() and int(retry_after) >= 1 and set(error) == {
                    "message", "type", "param", "code"}  # fmt: skip
            return response.status_code, elapsed, well_formed

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0.2)
        gate.set()
        results = await asyncio.gather(*tasks)
    statuses = [status for status, _, _ in results]
    rejects = [elapsed for status, elapsed, _ in results if status == 429]
    return {
        "requests": n,
        "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "server_errors": sum(1 for s in statuses if s >= 500),
        "connection_errors": statuses.count(-1),
        "malformed_429": sum(1 for status, _, ok in results if status == 429 and not ok),
        "reject_ms": {"p50": round(_pct(rejects, 0.5), 2), "p99": round(_pct(rejects, 0.99), 2)}
        if rejects
        else {},
        "reject_samples_ms": [round(value, 2) for value in rejects],
    }


async def measure_sustained(
    url: str, key: str, model: str, *, clients: int, seconds: float
) -> dict[str, Any]:
    tally: dict[str, int] = {}
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=300) as client:  # fmt: skip
        tasks = [asyncio.create_task(_flood(client, model, "batch", stop, tally)) for _ in range(clients)]
        await asyncio.sleep(seconds)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"clients": clients, "seconds": seconds, "status_counts": tally}


def gateway_rss_bytes() -> int | None:
    """RSS of the local process serving the gateway (a Serve replica of the Zumik app), if visible."""
    import psutil

    for process in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        if "ServeReplica:zumik:" in cmdline and ("EngineReplica" in cmdline or "Gateway" in cmdline):
            return int(process.info["memory_info"].rss)
    return None


def write_outputs(result: QosResult, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "qos.json", out / "qos.png"
    json_path.write_text(json.dumps({**result.summary(), "ttft_ms": result.ttft_ms}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    arms = list(result.ttft_ms)
    left.boxplot([result.ttft_ms[arm] for arm in arms], tick_labels=arms, showfliers=False)
    left.axhline(1.5 * result.p50("idle"), color="green", linestyle="--", label="goal: 1.5 x idle p50")
    left.set_ylabel("interactive time to first token (ms)")
    left.set_title(
        f"{result.rounds} rounds x {result.probes_per_round} probes, {result.flood_clients} flood clients"
    )
    left.legend()
    samples = result.burst.get("reject_samples_ms") or [0.0]
    right.hist(samples, bins=30)
    right.set_xlabel("time to a 429 (ms)")
    right.set_ylabel("requests")
    right.set_title(f"burst of {result.burst.get('requests')}: {result.burst.get('status_counts')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


def run_qos_bench(args: Any, console: Any) -> int:
    import os

    from rich.progress import Progress
    from rich.table import Table

    key = args.key or os.environ.get("ZUMIK_DEV_KEY")
    if not key:
        console.print("[red]error:[/red] pass --key or set ZUMIK_DEV_KEY (the bench needs a running Zumik)")
        return 2
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
        try:
            model = client.get("/v1/models").json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            console.print(f"[red]error:[/red] no Zumik answers at {args.url}; start one with `zumik serve`")
            return 2
    result = QosResult(rounds=args.rounds, probes_per_round=args.probes, flood_clients=args.flood)
    with Progress(console=console) as progress:
        task = progress.add_task("interactive probes (idle / batch flood / same-class flood)",
                                 total=3 * args.rounds * args.probes)  # fmt: skip
        result.ttft_ms, tallies = asyncio.run(measure_ttft(
            args.url, key, model, rounds=args.rounds, probes=args.probes, flood_clients=args.flood,
            seed=args.seed, on_progress=lambda n: progress.advance(task, n),
        ))  # fmt: skip
    console.log(f"flood answers: {tallies}")
    with console.status(f"burst of {args.burst} batch requests"):
        result.burst = asyncio.run(measure_burst(args.url, key, model, args.burst))
    if args.sustain_s > 0:
        before = gateway_rss_bytes()
        with console.status(f"{args.sustain_s:.0f} s of sustained overload"):
            result.sustained = asyncio.run(
                measure_sustained(args.url, key, model, clients=args.sustain_clients, seconds=args.sustain_s)
            )
        after = gateway_rss_bytes()
        if before and after:
            result.sustained.update(
                rss_before_mb=round(before / 2**20, 1),
                rss_after_mb=round(after / 2**20, 1),
                rss_growth=round(after / before - 1, 4),
            )
    json_path, png_path = write_outputs(result, args.out)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        table = Table(title="Interactive TTFT under floods (streamed chat, ms)")
        for column in ("arm", "p50", "p90", "x idle p50"):
            table.add_column(column)
        for arm in result.ttft_ms:
            table.add_row(arm, f"{result.p50(arm):.1f}", f"{_pct(result.ttft_ms[arm], 0.9):.1f}",
                          f"{summary['ratio_to_idle'][arm]:.2f}")  # fmt: skip
        console.print(table)
        burst = {k: v for k, v in result.burst.items() if k != "reject_samples_ms"}
        console.print(f"burst: {burst}")
        if result.sustained:
            console.print(f"sustained: {result.sustained}")
        console.print(f"wrote {json_path} and {png_path}")
    ok = summary["goal_batch_flood_within_1_5x"] and not result.burst["server_errors"]
    return 0 if ok and not result.burst["connection_errors"] else 1
