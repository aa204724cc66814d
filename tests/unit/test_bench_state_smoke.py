"""A short smoke of `zumik bench state` on a real redis-server: every arm runs, and a session
append is one Redis round trip. No rate is asserted (the long run is in docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from zumik_serve.bench.state import run_state_bench

pytestmark = pytest.mark.redis


def test_bench_state_smoke(tmp_path: Path) -> None:
    args = argparse.Namespace(ops=300, concurrency=10, out=tmp_path, json=False)
    assert run_state_bench(args, Console(file=io.StringIO())) == 0
    summary = json.loads((tmp_path / "state.json").read_text())
    assert summary["redis_benchmark_set_per_s"] > 0
    arms = {arm["name"]: arm for arm in summary["arms"]}
    assert set(arms) == {"artifact create", "session append", "session read"}
    assert arms["session append"]["round_trips_per_op"] <= 1.05  # one EVALSHA (plus set-up)
    assert all(arm["ops_per_s"] > 0 and arm["ratio_to_set"] > 0 for arm in arms.values())
    assert (tmp_path / "state.png").read_bytes()[:4] == b"\x89PNG"
