"""``zumik bench isolation-timing`` (T5c): a prefix tenant A has cached must not make tenant B's
first token come sooner (the timing side channel of a shared prefix cache).

Each round draws two fresh prompts prefixes of equal length (``prefix_fraction`` of the prompt;
each measured prompt ends with a suffix of its own), has tenant A send the first one ``warm``
times, then measures time to first token (streamed ``/v1/completions`` of token ids, one
token) for three requests in a shuffled order:

    a-repeat   A on its own warm prefix: a cache hit (the positive control: the measurement
               must see it, else the run proves nothing)
    b-same     B on A's warm prefix, for the first time: must time like a miss
    b-fresh    B on the second, never sent prefix: a miss

A one-sided Mann-Whitney U test (normal approximation with the tie correction; numpy, no
scipy) asks whether a-repeat is faster than b-fresh (must: p < ``control_alpha``) and whether
b-same is faster than b-fresh (must not: p >= ``leak_alpha``). Each sample also keeps
``cached_tokens``: b-same must report 0 every time (the metadata channel, T5b).

    verdict        exit
    isolated       0    the control sees the hit, b-same is not distinguishable, 0 cached tokens
    leak           1    b-same is faster than a miss, or reported cached tokens
    inconclusive   1    the control did not see A's own hit: no claim either way
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from zumik_serve.bench.routing import VOCAB, stream_completion

ARMS = ("a-repeat", "b-same", "b-fresh")


@dataclass(frozen=True)
class Sample:
    round: int
    arm: str
    ttft_ms: float
    cached_tokens: int


@dataclass
class TimingResult:
    prompt_tokens: int
    prefix_tokens: int
    rounds: int
    warm: int
    samples: list[Sample] = field(default_factory=list)

    def ttfts(self, arm: str) -> list[float]:
        return [s.ttft_ms for s in self.samples if s.arm == arm]

    def cached(self, arm: str) -> list[int]:
        return [s.cached_tokens for s in self.samples if s.arm == arm]

    def summary(self, *, leak_alpha: float, control_alpha: float, seed: int = 0) -> dict[str, Any]:
        fresh = self.ttfts("b-fresh")
        p_control = mann_whitney_less(self.ttfts("a-repeat"), fresh)
        p_leak = mann_whitney_less(self.ttfts("b-same"), fresh)
        b_cached = sum(1 for c in self.cached("b-same") if c > 0)
        if b_cached or (p_leak < leak_alpha and p_control < control_alpha):
            verdict = "leak"
        elif p_control >= control_alpha:
            verdict = "inconclusive"
        else:
            verdict = "isolated"
        return {
            "verdict": verdict,
            "prompt_tokens": self.prompt_tokens, "prefix_tokens": self.prefix_tokens,
            "rounds": self.rounds, "warm": self.warm,
            "ttft_median_ms": {arm: round(statistics.median(self.ttfts(arm)), 2) for arm in ARMS},
            "ratio_b_same_to_b_fresh": median_ratio(self.ttfts("b-same"), fresh, seed=seed),
            "ratio_a_repeat_to_b_fresh": median_ratio(self.ttfts("a-repeat"), fresh, seed=seed),
            "p_b_same_faster": p_leak, "p_a_repeat_faster": p_control,
            "leak_alpha": leak_alpha, "control_alpha": control_alpha,
            "samples_with_cached_tokens": {arm: sum(1 for c in self.cached(arm) if c > 0) for arm in ARMS},
        }  # fmt: skip


# --- statistics --------------------------------------------------------------------------


def mann_whitney_less(x: list[float], y: list[float]) -> float:
    """One-sided p-value of the Mann-Whitney U test that ``x`` tends to be smaller than ``y``:
    normal approximation with the tie correction and a continuity correction (fine from about
    ten samples per side). 1.0 when either side is empty or every value is the same."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return 1.0
    values = np.concatenate([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average ranks, from 1
    u_x = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    ties = float((counts**3 - counts).sum())
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (u_x - n1 * n2 / 2.0 + 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def median_ratio(x: list[float], y: list[float], *, seed: int = 0, resamples: int = 2000) -> dict[str, float]:
    """median(x) / median(y) with a 95% bootstrap interval (each side resampled on its own)."""
    rng = np.random.default_rng(seed)
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    boot_x = np.median(rng.choice(xs, size=(resamples, len(xs))), axis=1)
    boot_y = np.median(rng.choice(ys, size=(resamples, len(ys))), axis=1)
    low, high = np.percentile(boot_x / boot_y, [2.5, 97.5])
    return {"ratio": round(float(np.median(xs) / np.median(ys)), 4),
            "low": round(float(low), 4), "high": round(float(high), 4)}  # fmt: skip


# --- the measurement ---------------------------------------------------------------------


async def measure(
    url: str, key_a: str, key_b: str, model: str, *, rounds: int, prompt_tokens: int = 1900,
    prefix_fraction: float = 0.95, warm: int = 3, seed: int = 0, on_sample: Callable[[], None] = lambda: None,
) -> TimingResult:  # fmt: skip
    """``rounds`` rounds of the three arms (see the module docstring), one request at a time."""
    rng = random.Random(seed)
    prefix_tokens = int(prompt_tokens * prefix_fraction)
    result = TimingResult(prompt_tokens, prefix_tokens, rounds, warm)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(*VOCAB) for _ in range(count)]

    def prompt(prefix: list[int]) -> list[int]:
        return prefix + tokens(prompt_tokens - len(prefix))

    def client(key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)

    async with client(key_a) as a, client(key_b) as b:
        for who, http in (("a", a), ("b", b)):  # warm-up: connections, the first request's costs
            for _ in range(2):
                await stream_completion(
                    http, model, tokens(prompt_tokens), what=f"warm-up {who}", max_tokens=1
                )
        for index in range(rounds):
            shared, fresh = tokens(prefix_tokens), tokens(prefix_tokens)
            for _ in range(warm):
                await stream_completion(a, model, prompt(shared), what="a warms", max_tokens=1)
            arms = {"a-repeat": (a, shared), "b-same": (b, shared), "b-fresh": (b, fresh)}
            order = list(ARMS)
            rng.shuffle(order)
            for arm in order:
                http, prefix = arms[arm]
                ttft_ms, cached = await stream_completion(http, model, prompt(prefix), what=arm, max_tokens=1)
                result.samples.append(Sample(index, arm, round(ttft_ms, 3), cached))
                on_sample()
    return result


# --- outputs and the CLI command ---------------------------------------------------------


def write_outputs(result: TimingResult, summary: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "isolation-timing.json", out / "isolation-timing.png"
    samples = [asdict(s) for s in result.samples]
    json_path.write_text(json.dumps({**summary, "samples": samples}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.boxplot([result.ttfts(arm) for arm in ARMS], tick_labels=list(ARMS), showfliers=False)
    left.set_ylabel("time to first token (ms)")
    left.set_title(f"{result.rounds} rounds, {result.prompt_tokens}-token prompts: {summary['verdict']}")
    for arm in ARMS:
        values = sorted(result.ttfts(arm))
        right.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=arm)
    right.set_xlabel("time to first token (ms)")
    right.set_ylabel("share of samples")
    right.set_title(
        f"p(b-same faster) = {summary['p_b_same_faster']:.3g}, "
        f"p(a-repeat faster) = {summary['p_a_repeat_faster']:.3g}"
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


def run_isolation_timing_bench(args: Any, console: Any) -> int:
    import logging

    from rich.progress import Progress
    from rich.table import Table

    from profiles import resolve_profile
    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.bench.durability import new_tenant
    from zumik_serve.store.local_redis import free_port

    logging.getLogger("httpx").setLevel(logging.WARNING)
    profile = resolve_profile(args.profile)
    stack = LocalStack(StackConfig.from_env(profile, port=free_port(), dev_key=None))
    try:
        with console.status("starting the Zumik stack (about 2 minutes)"):
            stack.start(lambda message: console.log(message))
        (_, key_a), (_, key_b) = (asyncio.run(new_tenant(stack.redis_url, "timing")) for _ in range(2))
        with Progress(console=console) as progress:
            task = progress.add_task("TTFT samples (a-repeat / b-same / b-fresh)", total=3 * args.rounds)
            result = asyncio.run(measure(
                stack.url, key_a, key_b, profile.model.served_name, rounds=args.rounds,
                prompt_tokens=args.prompt_tokens, prefix_fraction=args.prefix_fraction, warm=args.warm,
                seed=args.seed, on_sample=lambda: progress.advance(task),
            ))  # fmt: skip
    finally:
        stack.stop()
    summary = result.summary(leak_alpha=args.leak_alpha, control_alpha=args.control_alpha, seed=args.seed)
    json_path, png_path = write_outputs(result, summary, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        table = Table(title=f"TTFT by arm, {args.rounds} rounds ({summary['verdict']})")
        for column in ("arm", "median (ms)", "x b-fresh (95% CI)", "p (faster than b-fresh)", "cached>0"):
            table.add_column(column)
        fresh_ms = summary["ttft_median_ms"]["b-fresh"]
        for arm, ratio_key, p_key in (
            ("a-repeat", "ratio_a_repeat_to_b_fresh", "p_a_repeat_faster"),
            ("b-same", "ratio_b_same_to_b_fresh", "p_b_same_faster"),
        ):
            r = summary[ratio_key]
            table.add_row(arm, f"{summary['ttft_median_ms'][arm]:.1f}",
                          f"{r['ratio']:.3f} ({r['low']:.3f}-{r['high']:.3f})", f"{summary[p_key]:.3g}",
                          str(summary["samples_with_cached_tokens"][arm]))  # fmt: skip
        table.add_row(
            "b-fresh", f"{fresh_ms:.1f}", "1", "", str(summary["samples_with_cached_tokens"]["b-fresh"])
        )
        console.print(table)
        console.print(f"wrote {json_path} and {png_path}")
    return 0 if summary["verdict"] == "isolated" else 1
