"""A short smoke of `zumik bench routing`'s parts on the shared stack: the workloads and their
ideal, one arm measured for real (hits counted from the engine's usage), the decision timer and
the plot. The full three-arm run on two replicas is `zumik bench routing` (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.integration.conftest import DEV_KEY, RunningStack
from zumik_serve.bench.routing import (
    DECISION_LENGTHS,
    arm_profile,
    arrival_offsets,
    decision_times_us,
    ideal_cached,
    measure_arm,
    plot_routing,
    shared_prefix,
)

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def test_ideal_counts_whole_blocks_seen_before_never_the_last_token() -> None:
    a = list(range(10, 74))  # 64 tokens: two blocks of 32
    assert ideal_cached([a, a, a[:40] + [5] * 10, a[:33]], 32) == [0, 32, 32, 32]


def test_one_arm_measured_on_the_real_stack(running_stack: RunningStack, tmp_path: Path) -> None:
    workload = shared_prefix(random.Random(3), 4)  # 8 groups, request i in group i % 8
    prompts = workload[:2] + workload[8:10]  # two groups, each seen twice
    result = asyncio.run(
        measure_arm(running_stack.url, DEV_KEY, running_stack.model, "zumik", "shared_prefix", prompts,
                    block_size=32, concurrency=2)
    )  # fmt: skip
    assert result.requests == 4 and result.prompt_tokens == sum(len(p) for p in prompts)
    assert 0 < result.cached_tokens <= result.ideal_cached_tokens + 32 * len(prompts)
    assert result.ttft_p50_ms > 0 and result.capture_efficiency is not None
    opened = asyncio.run(
        measure_arm(running_stack.url, DEV_KEY, running_stack.model, "zumik", "shared_prefix", prompts,
                    block_size=32, concurrency=2, arrivals=arrival_offsets(20.0, len(prompts), seed=1),
                    profile=running_stack.stack.config.profile.name)  # as the side-by-side open loop asks
    )  # fmt: skip
    assert opened.arrival == "open" and opened.requests == 4 and opened.rate_per_s is not None
    assert opened.cached_tokens > 0  # the same prompts again: their prefixes are cached by now
    times = decision_times_us(arm_profile("zumik"), samples=5)
    assert set(times) == set(DECISION_LENGTHS) and all(t["p50"] > 0 for t in times.values())
    summary = {"results": [result.to_json(), {**result.to_json(), "arm": "rr-cache"}]}
    plot_routing(summary, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
