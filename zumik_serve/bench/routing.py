"""``zumik bench routing``: how much reuse each way of choosing a replica captures.

Two vLLM CPU replicas of the tiny model, each with a small KV cache (``local-cpu-2x``: 32 MiB,
about 8k tokens), so one replica cannot hold a workload's whole working set. Arms, one after
another on the same request sequences, each on freshly started engines:

    rr-nocache   Ray Serve's own balancing, prefix caching off   (the floor)
    rr-cache     Ray Serve's own balancing, prefix caching on    (what a plain deployment gets)
    zumik        Zumik's scheduler: prefix residency and load    (``routing.replica_choice``)

Workloads (token-id prompts on ``/v1/completions``, so that sharing is exact and the ideal is
computable from the workload itself; ``--seed`` makes them identical across runs):

    no_reuse        unique prompts (the control: throughput must not drop)
    shared_prefix   groups sharing a long prefix, interleaved across groups
    agent_sessions  sessions that resend a shared tools block + their growing history
    mooncake        a rescaled slice of the Mooncake conversation trace: each of its hash ids
                    (a 512-token block there) becomes one block of ``block_size`` tokens here;
                    read from ``../shared/data/mooncake`` and skipped, saying so, when absent

Per arm and workload: token-weighted hit ratio (cached / prompt tokens), capture efficiency
(hit ratio over the ideal one: every block-aligned prefix seen before is a hit, unlimited
cache), prefill tokens computed, TTFT p50/p90 and throughput. Separately, the scheduler's
decision time (prefix keys + ``decide``) by prompt length, in-process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from profiles import Profile, load_builtin
from zumik_serve.bench.routing_cluster import (
    cluster_figures,
    owners_table,
    run_cluster_only,
    time_decisions,
    token_decision_times_us,
    with_context,
)

ARMS = ("rr-nocache", "rr-cache", "zumik")
WORKLOADS = ("no_reuse", "shared_prefix", "agent_sessions", "mooncake")
VOCAB = (10, 1000)  # token ids drawn from here: plain tokens of the tiny model
DECISION_LENGTHS = (1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class ArmResult:
    arm: str
    workload: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    ideal_cached_tokens: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    wall_s: float

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def ideal_ratio(self) -> float:
        return self.ideal_cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def capture_efficiency(self) -> float | None:
        return self.hit_ratio / self.ideal_ratio if self.ideal_ratio else None

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            hit_ratio=self.hit_ratio, ideal_ratio=self.ideal_ratio,
            capture_efficiency=self.capture_efficiency, prefill_tokens=self.prefill_tokens,
            tokens_per_s=self.prompt_tokens / self.wall_s if self.wall_s else 0.0,
        )  # fmt: skip
        return data


# --- workloads ---------------------------------------------------------------------------------


def _tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(count)]


def no_reuse(rng: random.Random, scale: int) -> list[list[int]]:
    return [_tokens(rng, 600) for _ in range(4 * scale)]


def shared_prefix(rng: random.Random, scale: int) -> list[list[int]]:
    groups = [_tokens(rng, 1400) for _ in range(8)]  # 8 x 1400 tokens: more than one replica holds
    return [groups[i % len(groups)] + _tokens(rng, 40) for i in range(4 * scale)]


def agent_sessions(rng: random.Random, scale: int) -> list[list[int]]:
    tools = _tokens(rng, 500)
    histories = [tools + _tokens(rng, 300) for _ in range(6)]
    prompts = []
    for turn in range(4 * scale):
        session = turn % len(histories)
        histories[session] = histories[session] + _tokens(rng, 60)
        prompts.append(list(histories[session]))
    return prompts


def mooncake(
    rng: random.Random, scale: int, *, block_size: int, trace: Path | None
) -> list[list[int]] | None:
    if trace is None or not trace.is_file():
        return None
    blocks: dict[int, list[int]] = {}
    prompts = []
    with trace.open() as lines:
        for line in lines:
            hash_ids = json.loads(line)["hash_ids"][:40]  # at most 40 blocks: within max_model_len
            for hash_id in hash_ids:
                blocks.setdefault(hash_id, _tokens(rng, block_size))
            prompts.append([token for hash_id in hash_ids for token in blocks[hash_id]] + _tokens(rng, 8))
            if len(prompts) >= 4 * scale:
                break
    return prompts


def ideal_cached(prompts: list[list[int]], block_size: int) -> list[int]:
    """Per request, the tokens an unlimited cache would serve: the longest whole-block prefix
    some earlier request shares (never the last token, which the engine always computes)."""
    seen: set[tuple[int, ...]] = set()
    result = []
    for prompt in prompts:
        loadable = (len(prompt) - 1) // block_size
        hit = 0
        while hit < loadable and tuple(prompt[: (hit + 1) * block_size]) in seen:
            hit += 1
        result.append(hit * block_size)
        for blocks in range(1, len(prompt) // block_size + 1):
            seen.add(tuple(prompt[: blocks * block_size]))
    return result


def make_workloads(seed: int, scale: int, block_size: int, trace: Path | None) -> dict[str, list[list[int]]]:
    workloads: dict[str, list[list[int]]] = {
        "no_reuse": no_reuse(random.Random(seed), scale),
        "shared_prefix": shared_prefix(random.Random(seed + 1), scale),
        "agent_sessions": agent_sessions(random.Random(seed + 2), scale),
    }
    traced = mooncake(random.Random(seed + 3), scale, block_size=block_size, trace=trace)
    if traced is not None:
        workloads["mooncake"] = traced
    return workloads


# --- arms --------------------------------------------------------------------------------------


def arm_profile(arm: str) -> Profile:
    """``local-cpu-2x`` with only its BYOC route, as each arm runs it."""
    base = load_builtin("local-cpu-2x")
    data = base.model_dump(mode="json")
    data["routes"] = [route for route in data["routes"] if route["kind"] == "byoc"]
    data["routing"] = {**data["routing"], "default_route": "local", "fallback_order": ["local"],
                       "replica_choice": "scheduler" if arm == "zumik" else "serve"}  # fmt: skip
    data["engine"]["enable_prefix_caching"] = arm != "rr-nocache"
    data["name"] = f"bench-routing-{arm}"
    return Profile.model_validate(data)


async def stream_completion(
    client: httpx.AsyncClient, model: str, prompt: list[int], *, what: str, max_tokens: int = 2
) -> tuple[float, int]:
    """One streamed ``/v1/completions`` of token ids: time to the first chunk with a choice (ms)
    and ``cached_tokens`` from the usage chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first: float | None = None
    cached = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{what}: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - started
            usage = chunk.get("usage")
            if usage:
                cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return (first if first is not None else time.perf_counter() - started) * 1000, cached


async def measure_arm(
    url: str, api_key: str, model: str, arm: str, workload: str, prompts: list[list[int]], *,
    block_size: int, concurrency: int, on_request: Callable[[], None] = lambda: None,
) -> ArmResult:  # fmt: skip
    ttfts: list[float] = []
    cached: list[int] = [0] * len(prompts)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(prompts)):
        queue.put_nowait(index)
    headers = {"Authorization": f"Bearer {api_key}"}

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                ttft_ms, cached[index] = await stream_completion(
                    client, model, prompts[index], what=f"{arm}/{workload}"
                )
                ttfts.append(ttft_ms)
                on_request()

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - began
    ordered = sorted(ttfts)
    return ArmResult(
        arm=arm, workload=workload, requests=len(prompts), prompt_tokens=sum(len(p) for p in prompts),
        cached_tokens=sum(cached), ideal_cached_tokens=sum(ideal_cached(prompts, block_size)),
        ttft_p50_ms=statistics.median(ordered), ttft_p90_ms=ordered[int(0.9 * (len(ordered) - 1))],
        wall_s=wall_s,
    )  # fmt: skip


def decision_times_us(profile: Profile, *, samples: int = 200) -> dict[int, dict[str, float]]:
    """Time of one scheduling decision (prefix keys of the prompt + ``decide``), by length."""
    from zumik_serve.routing.decision import NO_EVIDENCE
    from zumik_serve.routing.scheduler import CHARS_PER_TOKEN, ProfileScheduler, SchedulingRequest

    scheduler = ProfileScheduler(
        with_context(profile, max(DECISION_LENGTHS)), replicas={"local": ["r0", "r1"]}
    )
    rng = random.Random(7)
    result: dict[int, dict[str, float]] = {}
    for length in DECISION_LENGTHS:
        text = "".join(rng.choice("abcdefghij ") for _ in range(length * CHARS_PER_TOKEN))
        request = SchedulingRequest(
            tenant="ten_bench", cache_salt="s" * 64, prompt_text=text, expected_output_tokens=16,
            request_digest="d" * 32, release_id=None, snapshot_id=None, allowed_routes=None,
            evidence=NO_EVIDENCE,
        )  # fmt: skip
        result[length] = time_decisions(scheduler, request, samples=samples)
    return result


def shared_trace() -> Path | None:
    """The Mooncake conversation trace in the project's reference data (``../shared`` beside the
    checkout, or ``$ZUMIK_SHARED_DIR``); a user's clone has none, and the workload is skipped."""
    import os

    roots = [os.environ.get("ZUMIK_SHARED_DIR"), str(Path(__file__).resolve().parents[3] / "shared")]
    for root in roots:
        if root and (Path(root) / "data" / "mooncake" / "conversation_trace.jsonl").is_file():
            return Path(root) / "data" / "mooncake" / "conversation_trace.jsonl"
    return None


def run_routing_bench(args: Any, console: Any) -> int:
    import os

    from rich.progress import Progress
    from rich.table import Table

    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.bench.escalation import print_escalation, run_escalation
    from zumik_serve.home import ZumikHome
    from zumik_serve.store.local_redis import free_port

    if getattr(args, "cluster_only", False):  # in process: bench/routing_cluster.py
        return run_cluster_only(args, console)
    # The escalation arm (bench/escalation.py) runs in process first: managed, BYOC, Zumik's choice.
    escalation = run_escalation(requests=getattr(args, "escalation_requests", 120), seed=args.seed)
    if getattr(args, "escalation_only", False):
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "escalation.json").write_text(json.dumps(escalation, indent=2))
        print(json.dumps(escalation, indent=2)) if args.json else print_escalation(escalation, console)
        return 0 if escalation["within_5_percent"] else 1
    block_size = load_builtin("local-cpu-2x").engine.block_size
    trace = shared_trace()
    if trace is None:
        console.log("mooncake workload skipped: ../shared/data/mooncake is not beside this checkout")
    workloads = make_workloads(args.seed, args.scale, block_size, trace)
    dev_key = os.environ.get("ZUMIK_DEV_KEY") or "zk-bench-" + os.urandom(8).hex()
    results: list[ArmResult] = []
    with tempfile.TemporaryDirectory(prefix="zumik-bench-routing-") as tmp:
        home = ZumikHome(Path(tmp))
        stack: LocalStack | None = None
        try:
            for arm in ARMS:
                profile = arm_profile(arm)
                if stack is None:
                    config = StackConfig.from_env(profile, port=free_port(), dev_key=dev_key, home=home)
                    stack = LocalStack(config).start(console.log)
                else:
                    stack.redeploy(profile, console.log)
                total = sum(len(prompts) for prompts in workloads.values())
                with Progress(console=console, transient=True) as progress:
                    task = progress.add_task(f"{arm}", total=total)
                    for workload, prompts in workloads.items():
                        result = asyncio.run(measure_arm(
                            stack.url, dev_key, profile.model.served_name, arm, workload, prompts,
                            block_size=block_size, concurrency=args.concurrency,
                            on_request=functools.partial(progress.advance, task),
                        ))  # fmt: skip
                        results.append(result)
                        console.log(
                            f"{arm:>10} {workload:<15} hit {result.hit_ratio:.3f} (ideal "
                            f"{result.ideal_ratio:.3f}) ttft p50 {result.ttft_p50_ms:.0f} ms"
                        )
        finally:
            if stack is not None:
                stack.stop()
    decisions = decision_times_us(arm_profile("zumik"))
    cluster = cluster_figures(arm_profile("zumik"), seed=args.seed)  # two gateways, one owner
    token_decisions = token_decision_times_us(arm_profile("zumik"), lengths=DECISION_LENGTHS)
    summary = {
        "seed": args.seed, "scale": args.scale, "concurrency": args.concurrency,
        "results": [r.to_json() for r in results],
        "decision_us": {str(length): times for length, times in decisions.items()},
        "mooncake": str(trace) if trace else None,
        "escalation": escalation,
        "cluster": [arm.to_json() for arm in cluster],
        "decision_us_token_ids": {str(length): times for length, times in token_decisions.items()},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(summary, indent=2))
    plot_routing(summary, args.out / "routing.png")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    table = Table(title="Routing arms on two vLLM CPU replicas (32 MiB KV each)")
    for column in (
        "workload",
        "arm",
        "hit ratio",
        "capture eff.",
        "prefill tokens",
        "TTFT p50 ms",
        "p90 ms",
        "tok/s",
    ):
        table.add_column(column)
    for r in results:
        data = r.to_json()
        efficiency = "-" if r.capture_efficiency is None else f"{r.capture_efficiency:.2f}"
        table.add_row(
            r.workload, r.arm, f"{r.hit_ratio:.3f}", efficiency, f"{r.prefill_tokens:,}",
            f"{r.ttft_p50_ms:.0f}", f"{r.ttft_p90_ms:.0f}", f"{data['tokens_per_s']:,.0f}",
        )  # fmt: skip
    console.print(table)
    timing = Table(title="Scheduler decision time (prefix keys + decide), in-process")
    for column in ("prompt tokens", "p50 us", "p99 us"):
        timing.add_column(column)
    for length, times in decisions.items():
        timing.add_row(str(length), f"{times['p50']:.0f}", f"{times['p99']:.0f}")
    for length, times in token_decisions.items():  # keys: the engine's own block hashes
        timing.add_row(f"{length} (token ids)", f"{times['p50']:.0f}", f"{times['p99']:.0f}")
    console.print(timing)
    print_escalation(escalation, console)
    console.print(owners_table(cluster))
    console.print(f"wrote {args.out / 'routing.json'} and {args.out / 'routing.png'}")
    return 0


def plot_routing(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    arms = list(dict.fromkeys(r["arm"] for r in results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(arms))
    for offset, arm in enumerate(arms):
        rows = {r["workload"]: r for r in results if r["arm"] == arm}
        xs = [index + offset * width for index in range(len(workloads))]
        left.bar(xs, [rows[w]["hit_ratio"] if w in rows else 0 for w in workloads], width, label=arm)
        right.bar(xs, [rows[w]["ttft_p50_ms"] if w in rows else 0 for w in workloads], width, label=arm)
    ideal = {r["workload"]: r["ideal_ratio"] for r in results}
    for index, workload in enumerate(workloads):
        left.hlines(ideal[workload], index - width / 2, index + width * (len(arms) - 0.5), colors="black",
                    linestyles="dashed", label="ideal" if index == 0 else None)  # fmt: skip
    for axis, label in ((left, "token-weighted hit ratio"), (right, "TTFT p50 (ms)")):
        axis.set_xticks([index + width * (len(arms) - 1) / 2 for index in range(len(workloads))], workloads)
        axis.set_ylabel(label)
        axis.legend()
    left.set_title("Cache hits by routing arm (dashed: the workload's ideal)")
    right.set_title("Time to first token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
