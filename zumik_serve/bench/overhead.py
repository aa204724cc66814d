"""``zumik bench overhead``: the latency Zumik's /v1 adds over vLLM's own OpenAI server.

Method (the side-by-side template of ``research/performance-anchors.md`` section 5.2):
both arms run on this machine at once, with the same engine settings from the same profile;
each round sends ``requests`` sequential 1-token completions to each arm, arms in a shuffled
order per round, over keep-alive connections with TCP_NODELAY. The added latency is reported
as the median over rounds of (Zumik round p50 - direct round p50), with its IQR, beside the
pooled p50/p99 of each arm. Only ratios and differences measured in one run mean anything on
these noisy machines.

With ``--accounting`` a third arm joins: Zumik for a tenant that keeps no reuse accounting
(``zumik tenant create --no-reuse-accounting``), on the same stack, in the same rounds; the
prompt is then a few hundred tokens of repeated prefix, so the opportunity index has blocks to
walk. The accounting's cost is the per-round difference of the two Zumik arms, reported as a
share of the gateway's added latency (goal of issue #6: under 5%).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from profiles import GatewayPlacement, Profile

PROMPT = "Reply with one token."


@dataclass(frozen=True)
class ArmStats:
    name: str
    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float


@dataclass(frozen=True)
class OverheadResult:
    rounds: int
    requests_per_round: int
    direct: ArmStats
    zumik: ArmStats
    added_p50_ms: float
    added_p99_ms: float
    added_round_median_ms: float
    added_round_iqr_ms: tuple[float, float]
    per_round_added_ms: list[float]
    samples_ms: dict[str, list[float]]
    per_round_p50_ms: dict[str, list[float]] | None = None  # every arm's p50, round by round

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples_ms")
        return data


def start_direct_vllm(
    profile: Profile, model_dir: Path, port: int, log_path: Path, kv_transfer: dict[str, Any] | None = None
) -> subprocess.Popen[bytes]:
    """vLLM's own OpenAI server with the profile's engine settings (the baseline arm), the
    KV connector included when the profile has tiers, so that only the gateway differs."""
    from zumik_serve.engines.vllm_config import vllm_cli_args

    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *vllm_cli_args(profile, model_dir, kv_transfer),
        "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
    ]  # fmt: skip
    log = log_path.open("wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})


def wait_ready(
    url: str, headers: dict[str, str], timeout_s: float, process: subprocess.Popen[bytes] | None
) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the baseline vLLM server exited with code {process.returncode}")
            try:
                if client.get(f"{url}/v1/models", headers=headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")


def nodelay_client(base_url: str, headers: dict[str, str]) -> httpx.Client:
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(base_url=base_url, headers=headers, transport=transport, timeout=60.0)


def measure(
    arms: dict[str, tuple[str, dict[str, str]]],
    *,
    model: str,
    rounds: int,
    requests: int,
    warmup: int,
    on_progress: Any = None,
    seed: int = 0,
    prompt: str = PROMPT,
) -> OverheadResult:
    """Interleaved rounds over ``arms`` (name → (base URL, headers)): 'direct' and 'zumik', and
    any others (measured alike, in ``samples_ms`` and ``per_round_p50_ms``)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    clients = {name: nodelay_client(url, headers) for name, (url, headers) in arms.items()}
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in arms}
    per_round: list[float] = []
    per_round_p50: dict[str, list[float]] = {name: [] for name in arms}
    try:
        for client in clients.values():
            for _ in range(warmup):
                _timed_post(client, body)
        for _ in range(rounds):
            order = list(arms)
            rng.shuffle(order)
            round_p50: dict[str, float] = {}
            for name in order:
                latencies = [_timed_post(clients[name], body) for _ in range(requests)]
                samples[name].extend(latencies)
                round_p50[name] = statistics.median(latencies)
                per_round_p50[name].append(round_p50[name])
                if on_progress is not None:
                    on_progress(requests)
            per_round.append(round_p50["zumik"] - round_p50["direct"])
    finally:
        for client in clients.values():
            client.close()
    direct, zumik = _stats("direct", samples["direct"]), _stats("zumik", samples["zumik"])
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else [per_round[0]] * 3
    return OverheadResult(
        rounds=rounds,
        requests_per_round=requests,
        direct=direct,
        zumik=zumik,
        added_p50_ms=zumik.p50_ms - direct.p50_ms,
        added_p99_ms=zumik.p99_ms - direct.p99_ms,
        added_round_median_ms=statistics.median(per_round),
        added_round_iqr_ms=(quartiles[0], quartiles[2]),
        per_round_added_ms=per_round,
        samples_ms=samples,
        per_round_p50_ms=per_round_p50,
    )


ACCOUNTING_PROMPT = "You are a careful assistant. Follow the tools' schemas exactly. " * 40


def accounting_summary(result: OverheadResult) -> dict[str, Any]:
    """The reuse accounting's cost: per round, (Zumik with accounting) - (Zumik without), and its
    share of the gateway's added latency (Zumik with accounting - vLLM direct)."""
    assert result.per_round_p50_ms is not None
    on, off, direct = (result.per_round_p50_ms[name] for name in ("zumik", "zumik-no-accounting", "direct"))
    cost = [a - b for a, b in zip(on, off, strict=True)]
    added = [a - d for a, d in zip(on, direct, strict=True)]
    share = (
        statistics.median(cost) / statistics.median(added) if statistics.median(added) > 0 else float("nan")
    )
    return {
        "accounting_cost_round_median_ms": round(statistics.median(cost), 3),
        "accounting_cost_per_round_ms": [round(value, 3) for value in cost],
        "gateway_added_round_median_ms": round(statistics.median(added), 3),
        "accounting_share_of_added": round(share, 4),
        "goal_under_5_percent": share < 0.05,
    }


def _timed_post(client: httpx.Client, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    if response.status_code != 200:
        raise RuntimeError(f"{client.base_url} answered {response.status_code}: {response.text[:200]}")
    return elapsed_ms


def _stats(name: str, values: list[float]) -> ArmStats:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return ArmStats(
        name=name, n=len(values), p50_ms=pct(0.5), p90_ms=pct(0.9), p99_ms=pct(0.99),
        mean_ms=statistics.fmean(values),
    )  # fmt: skip


def write_outputs(result: OverheadResult, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "overhead.json"
    summary = result.summary()
    if result.per_round_p50_ms and "zumik-no-accounting" in result.per_round_p50_ms:
        summary["accounting"] = accounting_summary(result)
    json_path.write_text(json.dumps({**summary, "samples_ms": result.samples_ms}, indent=2))
    png_path = out_dir / "overhead.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"direct": "vLLM direct", "zumik": "Zumik /v1", "zumik-no-accounting": "Zumik, no accounting"}
    names = [name for name in labels if name in result.samples_ms]
    left.boxplot([result.samples_ms[name] for name in names], tick_labels=[labels[n] for n in names],
                 showfliers=False)  # fmt: skip
    left.set_ylabel("latency of a 1-token completion (ms)")
    left.set_title(f"{result.rounds} rounds x {result.requests_per_round} requests per arm")
    right.plot(range(1, result.rounds + 1), result.per_round_added_ms, marker="o")
    right.axhline(1.0, color="green", linestyle="--", label="goal p50 <= 1 ms")
    right.set_xlabel("round")
    right.set_ylabel("added p50 (ms)")
    right.set_title(f"added p50: median {result.added_round_median_ms:.2f} ms over rounds")
    right.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


def run_overhead_bench(args: Any, console: Any) -> int:
    """The CLI command: start both arms (or reuse a running Zumik), measure, report, plot."""
    from rich.progress import Progress
    from rich.table import Table

    from profiles import resolve_profile
    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.engines.vllm_config import engine_kv_transfer
    from zumik_serve.home import ZumikHome
    from zumik_serve.model.resolve import resolve_model_dir
    from zumik_serve.store.local_redis import free_port

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Ray's log setup would print each request
    profile = resolve_profile(args.profile)
    if args.placement:
        gateway = profile.gateway.model_copy(update={"placement": GatewayPlacement(args.placement)})
        profile = profile.model_copy(update={"gateway": gateway})
    console.log(
        f"arms: vLLM direct vs Zumik (gateway {profile.gateway.placement.value}, ingress {args.ingress})"
    )
    home = ZumikHome.from_env().ensure()
    model_dir = resolve_model_dir(profile, home)
    dev_key = os.environ.get("ZUMIK_DEV_KEY") or "zk-bench-" + os.urandom(8).hex()
    direct_port = free_port()
    accounting = bool(getattr(args, "accounting", False))
    stack = LocalStack(StackConfig.from_env(profile, port=free_port(), dev_key=dev_key, ingress=args.ingress))
    direct = None
    try:
        with console.status("starting the Zumik stack and vLLM's own OpenAI server (about 2 minutes)"):
            stack.start(lambda message: console.log(message))
            kv_transfer = engine_kv_transfer(
                profile, model_dir=model_dir, redis_url=stack.redis_url, home_root=stack.config.home.root
            )
            direct = start_direct_vllm(
                profile, model_dir, direct_port, args.out / "vllm-direct.log", kv_transfer
            )
            direct_url = f"http://127.0.0.1:{direct_port}"
            wait_ready(direct_url, {}, timeout_s=300, process=direct)
        arms = {"direct": (direct_url, {}), "zumik": (stack.url, {"Authorization": f"Bearer {dev_key}"})}
        if accounting:  # the same stack, a tenant without reuse accounting
            key = asyncio.run(tenant_without_accounting(stack.redis_url))
            arms["zumik-no-accounting"] = (stack.url, {"Authorization": f"Bearer {key}"})
        total = len(arms) * args.rounds * args.requests
        with Progress(console=console) as progress:
            task = progress.add_task("interleaved rounds", total=total)
            result = measure(
                arms, model=profile.model.served_name, rounds=args.rounds, requests=args.requests,
                warmup=args.warmup, on_progress=lambda n: progress.advance(task, n),
                prompt=ACCOUNTING_PROMPT if accounting else PROMPT,
            )  # fmt: skip
    finally:
        stack.stop()
        if direct is not None:
            direct.terminate()
            try:
                direct.wait(timeout=30)
            except subprocess.TimeoutExpired:
                direct.kill()
    json_path, png_path = write_outputs(result, args.out)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
        return 0
    table = Table(title="Zumik /v1 overhead vs vLLM direct (1-token completion, sequential)")
    for column in ("arm", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms"):
        table.add_column(column)
    for arm in (result.direct, result.zumik):
        table.add_row(arm.name, str(arm.n), f"{arm.p50_ms:.2f}", f"{arm.p90_ms:.2f}", f"{arm.p99_ms:.2f}",
                      f"{arm.mean_ms:.2f}")  # fmt: skip
    console.print(table)
    low, high = result.added_round_iqr_ms
    console.print(
        f"added p50 {result.added_p50_ms:.2f} ms, added p99 {result.added_p99_ms:.2f} ms; "
        f"median of round differences {result.added_round_median_ms:.2f} ms (IQR {low:.2f}-{high:.2f})"
    )
    if accounting:
        summary = accounting_summary(result)
        console.print(
            f"reuse accounting: {summary['accounting_cost_round_median_ms']:.3f} ms per request (median of "
            f"round differences), {100 * summary['accounting_share_of_added']:.1f}% of the gateway's added "
            f"{summary['gateway_added_round_median_ms']:.2f} ms (goal < 5%)"
        )
    console.print(f"wrote {json_path} and {png_path}")
    return 0


async def tenant_without_accounting(redis_url: str) -> str:
    import redis.asyncio as aioredis

    from zumik_serve.tenancy.store import RedisTenantStore

    client = aioredis.from_url(redis_url)
    try:
        _, key = await RedisTenantStore(client).create_tenant(
            "bench-no-accounting-" + os.urandom(3).hex(), reuse_accounting=False
        )
    finally:
        await client.aclose()
    return key
