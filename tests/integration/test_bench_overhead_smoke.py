"""A short smoke of `zumik bench overhead`: both arms answer, the numbers and the plot are written.

The long run is `zumik bench overhead` (docs/benchmarks.md); no timing is asserted here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from profiles import load_builtin
from zumik_serve.bench.overhead import (
    ACCOUNTING_PROMPT,
    accounting_summary,
    measure,
    start_direct_vllm,
    tenant_without_accounting,
    wait_ready,
    write_outputs,
)
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
        quiet_key = asyncio.run(tenant_without_accounting(running_stack.redis_url))
        arms = {
            "direct": (direct_url, {}),
            "zumik": (running_stack.url, {"Authorization": f"Bearer {running_stack.tenant_key}"}),
            "zumik-no-accounting": (running_stack.url, {"Authorization": f"Bearer {quiet_key}"}),
        }
        result = measure(
            arms, model=running_stack.model, rounds=2, requests=3, warmup=1, prompt=ACCOUNTING_PROMPT
        )
    finally:
        direct.terminate()
        direct.wait(timeout=60)
    assert result.direct.n == result.zumik.n == 6
    assert len(result.per_round_added_ms) == 2
    assert all(value > 0 for value in result.samples_ms["direct"] + result.samples_ms["zumik"])
    json_path, png_path = write_outputs(result, tmp_path / "out")
    written = json.loads(json_path.read_text())
    assert written["rounds"] == 2
    assert len(written["accounting"]["accounting_cost_per_round_ms"]) == 2
    assert accounting_summary(result)["gateway_added_round_median_ms"] == written["accounting"][
        "gateway_added_round_median_ms"]  # fmt: skip
    # The tenant without accounting: capture still reported, opportunity unknown, no ledger.
    with httpx.Client(base_url=running_stack.url, headers={"Authorization": f"Bearer {quiet_key}"}) as quiet:
        body = {"model": running_stack.model, "prompt": ACCOUNTING_PROMPT, "max_tokens": 1}
        answer = quiet.post("/v1/completions", json=body)
        assert answer.status_code == 200
        assert "x-zumik-reuse-opportunity-tokens" not in answer.headers
        assert answer.headers["x-zumik-reuse-evidence"] == "opportunity=unknown; captured=observed"
        assert int(answer.headers["x-zumik-reuse-captured-tokens"]) > 0
        assert quiet.get("/v2/reuse").json()["groups"] == []
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
