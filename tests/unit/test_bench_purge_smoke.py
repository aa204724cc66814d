"""A short smoke of `zumik bench purge` on a real redis-server: every arm purges for real (a
receipt each), sealed blocks restore, the plot is written. No time is asserted (the long run is
in docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from zumik_serve.bench.purge import LATENCY_ARMS, run_purge_bench

pytestmark = pytest.mark.redis


def test_bench_purge_smoke(tmp_path: Path) -> None:
    args = argparse.Namespace(
        iterations=1, blocks=4, block_bytes=4096, rounds=2, out=tmp_path, json=False, sweep_keys=2000,
        sweep_epochs=[1, 3],
    )  # fmt: skip
    assert run_purge_bench(args, Console(file=io.StringIO())) == 0
    summary = json.loads((tmp_path / "purge.json").read_text())
    assert set(summary["latency_s"]) == set(LATENCY_ARMS)
    assert all(stats["n"] == 1 and stats["p50"] > 0 for stats in summary["latency_s"].values())
    assert set(summary["sweep_s"]) == {"1", "3"}  # each arm removed every block it should, or it raised
    assert all(row["scan_per_scope"] > 0 and row["one_walk"] > 0 for row in summary["sweep_s"].values())
    assert set(summary["sealing"]) == {"redis", "disk"}
    assert all(row["sealed_mb_s"] > 0 and row["plain_mb_s"] > 0 for row in summary["sealing"].values())
    assert (tmp_path / "purge.png").read_bytes()[:4] == b"\x89PNG"
