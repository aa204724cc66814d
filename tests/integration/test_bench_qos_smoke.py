"""A short smoke of `zumik bench qos` against the shared stack: the arms run, the burst is
answered only with 200s and well-formed 429s, the outputs and the plot are written. No timing
is asserted (the figures are the bench's, docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.conftest import RunningStack
from zumik_serve.bench.qos import QosResult, measure_burst, measure_ttft, write_outputs

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def test_qos_bench_smoke(running_stack: RunningStack, tmp_path: Path) -> None:
    url, key, model = running_stack.url, running_stack.tenant_key, running_stack.model
    ttft, tallies = asyncio.run(measure_ttft(url, key, model, rounds=1, probes=3, flood_clients=4))
    assert {arm: len(values) for arm, values in ttft.items()} == {
        "idle": 3, "batch flood": 3, "same-class flood": 3}  # fmt: skip
    assert all(value > 0 for values in ttft.values() for value in values)
    flood = tallies["batch flood"]
    assert flood.get("sent", 0) >= 4 and set(flood) <= {"sent", "200", "429"}
    burst = asyncio.run(measure_burst(url, key, model, 40))
    assert burst["server_errors"] == 0 and burst["connection_errors"] == 0 and burst["malformed_429"] == 0
    assert burst["status_counts"].get("429", 0) > 0 and burst["status_counts"].get("200", 0) > 0
    result = QosResult(rounds=1, probes_per_round=3, flood_clients=4, ttft_ms=ttft, burst=burst)
    json_path, png_path = write_outputs(result, tmp_path)
    assert json_path.stat().st_size > 0 and png_path.read_bytes()[:4] == b"\x89PNG"
