"""``zumik bench overhead``: the latency Zumik's /v1 adds over vLLM's own OpenAI server.

Method (the side-by-side template of ``research/performance-anchors.md`` section 5.2): every
arm is up at once on this machine, and requests alternate between arms (a shuffled order per
request index), so that machine noise hits all of them alike. Each request is a sequential
1-token completion over a keep-alive connection with TCP_NODELAY. Arms:

    vllm-defaults   vLLM's own server at its defaults (the KV cache size aside)
    vllm            vLLM's own server at Zumik's engine settings, no KV connector
    vllm-connector  the same with Zumik's KV connector and the profile's tiers
    zumik           Zumik's stack with the profile (tiers on in local-cpu)

Prompt shapes, each measured in every round (about 70 tokens unless said otherwise):

    repeated        the same prompt every time (the engine's prefix cache holds it)
    shared-prefix   a shared ~117-token prefix and a new ~60-token suffix (the agent shape)
    unique          new tokens from the first one: nothing cached, every block new

Every arm gets prompts of its own (a per-arm, per-run number in front), so that no arm restores
another's blocks from the shared tiers: "nothing to restore" holds for the connector arms.
Differences are reported per shape as pooled p50/p99 differences and as the median (IQR) over
rounds of the per-round p50 differences. Only differences measured in one run mean anything on
these noisy machines.

With ``--accounting`` the arms are vllm, zumik and zumik-no-accounting (a tenant created with
``--no-reuse-accounting``, same stack) on one shape, a ~600-token repeated prompt, so the
opportunity index has blocks to walk; the accounting's cost is the per-round difference of the
two Zumik arms, as a share of the gateway's added latency (goal of issue #6: under 5%).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from profiles import GatewayPlacement, Profile
from zumik_serve.bench.overhead_measure import (
    ACCOUNTING_PROMPT,
    ARM_LABELS,
    DEFAULT_ARMS,
    DEFAULT_SHAPES,
    DIRECT_ARMS,
    OverheadResult,
    Prompts,
    Shape,
    accounting_summary,
    measure,
    parse_selection,
)
from zumik_serve.engines.vllm_config import connector_engine_environment

__all__ = [
    "ACCOUNTING_PROMPT", "DEFAULT_SHAPES", "Prompts", "Shape", "accounting_summary", "direct_vllm_command",
    "measure", "run_overhead_bench", "start_direct_vllm", "tenant_without_accounting", "wait_ready",
    "write_outputs",
]  # fmt: skip


def direct_vllm_command(
    arm: str, profile: Profile, model_dir: Path, port: int, kv_transfer: dict[str, Any] | None = None
) -> list[str]:
    """The command line of a direct arm: vLLM's own OpenAI server, at its defaults
    (``vllm-defaults``: only the model, its served name, the KV cache size so that every engine
    fits this machine, and usage details, which change nothing the engine computes) or at the
    profile's engine settings (``vllm``), with Zumik's KV connector (``vllm-connector``)."""
    from zumik_serve.engines.vllm_config import vllm_cli_args

    if arm == "vllm-defaults":
        args = ["--model", str(model_dir), "--served-model-name", profile.model.served_name,
                "--enable-prompt-tokens-details"]  # fmt: skip
        if profile.engine.kv_cache_memory_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(profile.engine.kv_cache_memory_bytes)]
    elif arm in ("vllm", "vllm-connector"):
        if arm == "vllm-connector" and kv_transfer is None:
            raise ValueError("the vllm-connector arm needs the profile's KV transfer config (kv_tiers on)")
        args = vllm_cli_args(profile, model_dir, kv_transfer if arm == "vllm-connector" else None)
    else:
        raise ValueError(f"{arm!r} is not a direct arm ({', '.join(DIRECT_ARMS)})")
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args,
        "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
    ]  # fmt: skip


def start_direct_vllm(
    profile: Profile,
    model_dir: Path,
    port: int,
    log_path: Path,
    kv_transfer: dict[str, Any] | None = None,
    *,
    arm: str | None = None,
) -> subprocess.Popen[bytes]:
    """A direct arm's server (``arm``; default: ``vllm-connector`` when ``kv_transfer`` is
    given, else ``vllm``), its output in ``log_path``."""
    arm = arm or ("vllm-connector" if kv_transfer is not None else "vllm")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("wb")
    command = direct_vllm_command(arm, profile, model_dir, port, kv_transfer)
    env = {**os.environ}
    if arm == "vllm-connector":  # as Zumik's engines with the connector run (vllm_config.py)
        env.update(connector_engine_environment(profile))
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)


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


def write_outputs(result: OverheadResult, out_dir: Path) -> tuple[Path, Path]:
    """``overhead.json`` (the summary, every sample) and ``overhead.png``: p50/p99 per arm and
    shape, and the differences per shape against their goals."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "overhead.json"
    summary = result.summary()
    if Shape.ACCOUNTING.value in result.shapes:
        summary["accounting"] = accounting_summary(result)
    json_path.write_text(json.dumps({**summary, "samples_ms": result.samples_ms}, indent=2))
    png_path = out_dir / "overhead.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / max(1, len(result.arms))
    for index, arm in enumerate(result.arms):
        xs = [s + index * width for s in range(len(result.shapes))]
        p50 = [result.stats[shape][arm].p50_ms for shape in result.shapes]
        p99 = [result.stats[shape][arm].p99_ms for shape in result.shapes]
        left.bar(xs, p50, width, label=ARM_LABELS.get(arm, arm))
        left.scatter(xs, p99, marker="_", color="black", zorder=3)
    left.set_xticks([s + 0.4 - width / 2 for s in range(len(result.shapes))], result.shapes)
    left.set_ylabel("1-token completion latency (ms): bar p50, dash p99")
    left.set_title(f"{result.rounds} rounds x {result.requests_per_round} requests per arm and shape")
    left.legend(fontsize=8)
    names = sorted({key for deltas in result.deltas.values() for key in deltas})
    width = 0.8 / max(1, len(names))
    for index, key in enumerate(names):
        xs = [s + index * width for s in range(len(result.shapes))]
        values = [
            result.deltas[shape][key].p50_ms if key in result.deltas[shape] else 0.0
            for shape in result.shapes
        ]
        right.bar(xs, values, width, label=key)
    right.axhline(1.0, color="green", linestyle="--", label="goal zumik-vllm p50 <= 1 ms")
    right.axhline(0.3, color="purple", linestyle=":", label="goal connector p50 <= 0.3 ms")
    right.set_xticks([s + 0.4 - width / 2 for s in range(len(result.shapes))], result.shapes)
    right.set_ylabel("difference of pooled p50 (ms)")
    right.set_title("differences per prompt shape")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


def tree_state() -> dict[str, Any]:
    """The code measured: the commit and whether the work tree had changes (the bench may run
    on a tree mid-change; the figures then belong to that state, not to the commit)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return ""
        return done.stdout.strip()

    changed = git("diff", "--name-only", "HEAD").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "changed_files": changed}


def run_overhead_bench(args: Any, console: Any) -> int:
    """The CLI command: start every arm, measure interleaved, report, plot."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from profiles import resolve_profile
    from zumik_serve.app.priority import engine_replica_pids, process_niceness
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
    accounting = bool(getattr(args, "accounting", False))
    if accounting:
        arm_names: list[str] = ["vllm", "zumik", "zumik-no-accounting"]
        shapes: list[Shape] = [Shape.ACCOUNTING]
    else:
        try:
            arm_names, shapes = parse_selection(
                getattr(args, "arms", None) or DEFAULT_ARMS, getattr(args, "shapes", None) or DEFAULT_SHAPES
            )
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            return 2
        if "vllm-connector" in arm_names and not profile.kv_tiers.enabled:
            arm_names.remove("vllm-connector")
            console.log(f"profile {profile.name} has no KV tiers: no vllm-connector arm")
    console.log(f"arms: {', '.join(arm_names)}; shapes: {', '.join(s.value for s in shapes)} "
                f"(gateway {profile.gateway.placement.value}, ingress {args.ingress})")  # fmt: skip
    home = ZumikHome.from_env().ensure()
    model_dir = resolve_model_dir(profile, home)
    dev_key = os.environ.get("ZUMIK_DEV_KEY") or "zk-bench-" + os.urandom(16).hex()
    stack = LocalStack(StackConfig.from_env(profile, port=free_port(), dev_key=dev_key, ingress=args.ingress))
    direct: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    context: dict[str, Any] = {"tree": tree_state(), "profile": profile.name, "ingress": args.ingress,
                               "placement": profile.gateway.placement.value}  # fmt: skip
    try:
        with console.status("starting the Zumik stack and vLLM's own OpenAI servers (a few minutes)"):
            stack.start(lambda message: console.log(message))
            kv_transfer = engine_kv_transfer(
                profile, model_dir=model_dir, redis_url=stack.redis_url, home_root=stack.config.home.root,
                kv_redis_url=stack.kv_redis_url,  # the KV Redis Zumik's engines store blocks in
            )  # fmt: skip
            for arm in (a for a in arm_names if a in DIRECT_ARMS):  # start together, wait together
                port = free_port()
                process = start_direct_vllm(
                    profile, model_dir, port, args.out / f"{arm}.log", kv_transfer, arm=arm
                )
                direct[arm] = (process, f"http://127.0.0.1:{port}")
            for arm, (process, url) in list(direct.items()):
                try:
                    wait_ready(url, {}, timeout_s=600, process=process)
                except (RuntimeError, TimeoutError) as exc:
                    if arm == "vllm":  # every difference is taken against it
                        raise RuntimeError(f"{exc}; see {args.out / 'vllm.log'}") from None
                    console.log(f"[red]{arm} did not start ({exc}); measuring without it, see "
                                f"{args.out / (arm + '.log')}[/red]")  # fmt: skip
                    context.setdefault("arms_not_started", {})[arm] = str(exc)
                    process.kill()
                    process.wait(timeout=30)
                    del direct[arm]
                    arm_names.remove(arm)
                    continue
                console.log(f"{arm} ready at {url}")
        urls: dict[str, tuple[str, dict[str, str]]] = {}
        for arm in arm_names:
            if arm in direct:
                urls[arm] = (direct[arm][1], {})
            elif arm == "zumik":
                urls[arm] = (stack.url, {"Authorization": f"Bearer {dev_key}"})
            elif arm == "zumik-no-accounting":  # the same stack, a tenant without reuse accounting
                key = asyncio.run(tenant_without_accounting(stack.redis_url))
                urls[arm] = (stack.url, {"Authorization": f"Bearer {key}"})
        context["niceness"] = {
            **{arm: process_niceness(process.pid) for arm, (process, _) in direct.items()},
            **{f"zumik-replica-{pid}": process_niceness(pid) for pid in engine_replica_pids()},
        }
        total = len(urls) * len(shapes) * args.rounds * args.requests
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("interleaved requests", total=total)
            result = measure(
                urls, model=profile.model.served_name, rounds=args.rounds, requests=args.requests,
                warmup=args.warmup, shapes=shapes, on_progress=lambda n: progress.advance(task, n),
            )  # fmt: skip
    finally:
        stack.stop()
        for process, _ in direct.values():
            process.terminate()
        for process, _ in direct.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    result.context.update(context)
    json_path, png_path = write_outputs(result, args.out)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
        return 0
    _print_tables(result, console)
    if accounting:
        summary = accounting_summary(result)
        share, added = summary["accounting_share_of_added"], summary["gateway_added_round_median_ms"]
        of_added = (
            f"{100 * share:.1f}% of the gateway's added {added:.2f} ms (goal < 5%)"
            if share is not None
            else f"no share: the gateway's added latency came out at {added:.2f} ms (run more rounds)"
        )
        console.print(
            f"reuse accounting: {summary['accounting_cost_round_median_ms']:.3f} ms per request (median of "
            f"round differences), {of_added}"
        )
    console.print(f"wrote {json_path} and {png_path}")
    return 0


def _print_tables(result: OverheadResult, console: Any) -> None:
    from rich.table import Table

    table = Table(title="1-token completions, sequential, arms interleaved per request (ms)")
    for column in ("shape", "arm", "n", "prompt tokens", "cached", "p50", "p90", "p99", "mean"):
        table.add_column(column)
    for shape in result.shapes:
        for arm in result.arms:
            s, cached = result.stats[shape][arm], result.cached_tokens[shape][arm]
            table.add_row(shape, arm, str(s.n), f"{result.prompt_tokens[shape][arm]:.0f}",
                          "-" if cached is None else f"{cached:.0f}", f"{s.p50_ms:.2f}", f"{s.p90_ms:.2f}",
                          f"{s.p99_ms:.2f}", f"{s.mean_ms:.2f}")  # fmt: skip
    console.print(table)
    differences = Table(title="differences (ms): pooled p50, p99; median (IQR) of per-round p50 differences")
    for column in ("shape", "difference", "p50", "p99", "round median (IQR)"):
        differences.add_column(column)
    for shape, deltas in result.deltas.items():
        for key, d in deltas.items():
            low, high = d.round_iqr_ms
            differences.add_row(shape, key, f"{d.p50_ms:.2f}", f"{d.p99_ms:.2f}",
                                f"{d.round_median_ms:.2f} ({low:.2f}-{high:.2f})")  # fmt: skip
    console.print(differences)
    for shape, phases in result.server_timing_ms.items():
        if phases:
            console.print(
                f"Zumik Server-Timing medians, {shape}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
            )
    for shape, goals in result.goals().items():
        console.print(
            f"goals, {shape}: " + "; ".join(f"{k}: {'met' if ok else 'not met'}" for k, ok in goals.items())
        )


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
