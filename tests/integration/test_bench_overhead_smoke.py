"""A short smoke of `zumik bench overhead`: both arms answer, the numbers and the plot are written.

The long run is `zumik bench overhead` (docs/benchmarks.md); no timing is asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profiles import load_builtin
from zumik_serve.bench.overhead import measure, start_direct_vllm, wait_ready, write_outputs
from zumik_serve.model.resolve import resolve_model_dir
from zumik_serve.store.local_redis import free_port

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def test_overhead_bench_smoke(running_stack, tmp_path: Path) -> None:
    profile = load_builtin("local-cpu")
    port = free_port()
    direct = start_direct_vllm(
        profile, resolve_model_dir(profile, running_stack.home), port, tmp_path / "vllm.log"
    )
    try:
        direct_url = f"http://127.0.0.1:{port}"
        wait_ready(direct_url, {}, timeout_s=300, process=direct)
        arms = {
            "direct": (direct_url, {}),
            "zumik": (running_stack.url, {"Authorization": f"Bearer {running_stack.tenant_key}"}),
        }
        result = measure(arms, model=running_stack.model, rounds=2, requests=3, warmup=1)
    finally:
        direct.terminate()
        direct.wait(timeout=60)
    assert result.direct.n == result.zumik.n == 6
    assert len(result.per_round_added_ms) == 2
    assert all(value > 0 for value in result.samples_ms["direct"] + result.samples_ms["zumik"])
    json_path, png_path = write_outputs(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["rounds"] == 2
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
