"""A short smoke of `zumik bench tiers`: three fresh engines, every tier restores the prompt's
blocks, and the medium ceilings are measured. No timing is asserted (see docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zumik_serve.bench.tiers import measure_tiers
from zumik_serve.model.tiny import build_tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.redis]


def test_bench_tiers_smoke(tmp_path: Path) -> None:
    result = measure_tiers(build_tiny_model(tmp_path / "tiny"), [200], on_step=lambda _: None)
    (row,) = result["rows"]
    for tier in ("host", "redis", "disk"):
        assert row[tier]["cached_tokens"] == 192  # (200 - 1) // 32 full blocks, from that tier
        assert row[tier]["restore_bytes_per_s"] > 0
        # its process's own prefix cache held the same blocks (the floor a restore is set beside)
        assert row[tier]["engine_hit_cached_tokens"] == 192 and row[tier]["engine_hit_ttft_s"] > 0
    assert all(value > 0 for value in result["ceilings_bytes_per_s"].values())
