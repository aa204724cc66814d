"""A short smoke of `zumik bench overhead`: every arm answers every prompt shape as the shape
says, the differences, Server-Timing phases and the plot are written.

The long run is `zumik bench overhead` (docs/benchmarks.md); no timing is asserted here. The
vllm-defaults arm (torch.compile on at vLLM's defaults: a slow start) is left to the bench; its
command line is checked against vLLM's parser in tests/unit/test_bench_overhead.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from profiles import load_builtin
from zumik_serve.bench.overhead import (
    DEFAULT_SHAPES,
    Prompts,
    Shape,
    accounting_summary,
    measure,
    start_direct_vllm,
    tenant_without_accounting,
    wait_ready,
    write_outputs,
)
from zumik_serve.engines.vllm_config import engine_kv_transfer
from zumik_serve.model.resolve import resolve_model_dir
from zumik_serve.store.local_redis import free_port

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def test_overhead_bench_smoke(running_stack, tmp_path: Path) -> None:
    profile = load_builtin("local-cpu")
    model_dir = resolve_model_dir(profile, running_stack.home)
    kv_transfer = engine_kv_transfer(
        profile, model_dir=model_dir, redis_url=running_stack.redis_url, home_root=running_stack.home.root
    )
    ports = {"vllm": free_port(), "vllm-connector": free_port()}
    prompts = Prompts.fresh()
    servers = {
        arm: start_direct_vllm(profile, model_dir, port, tmp_path / f"{arm}.log", kv_transfer, arm=arm)
        for arm, port in ports.items()
    }
    try:
        for arm, port in ports.items():
            wait_ready(f"http://127.0.0.1:{port}", {}, timeout_s=300, process=servers[arm])
        tenant = {"Authorization": f"Bearer {running_stack.tenant_key}"}
        arms = {arm: (f"http://127.0.0.1:{port}", {}) for arm, port in ports.items()}
        arms["zumik"] = (running_stack.url, tenant)
        result = measure(arms, model=running_stack.model, rounds=2, requests=2, warmup=1)
        quiet_key = asyncio.run(tenant_without_accounting(running_stack.redis_url))
        accounting = measure(
            {"vllm": arms["vllm"], "zumik": arms["zumik"],
             "zumik-no-accounting": (running_stack.url, {"Authorization": f"Bearer {quiet_key}"})},
            model=running_stack.model, rounds=2, requests=2, warmup=1, shapes=[Shape.ACCOUNTING],
            prompts=prompts,
        )  # fmt: skip
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(timeout=60)
    shapes = [shape.value for shape in DEFAULT_SHAPES]
    assert result.shapes == shapes and result.arms == ["vllm", "vllm-connector", "zumik"]
    for shape in shapes:
        assert {arm: s.n for arm, s in result.stats[shape].items()} == dict.fromkeys(result.arms, 4)
        assert all(value > 0 for values in result.samples_ms[shape].values() for value in values)
        assert len(set(result.prompt_tokens[shape].values())) == 1, result.prompt_tokens  # same length
        assert set(result.deltas[shape]) == {"zumik-vllm", "vllm-connector-vllm", "zumik-vllm-connector"}
        assert len(result.deltas[shape]["zumik-vllm"].per_round_ms) == 2
        assert {"decide", "first-output"} <= set(result.server_timing_ms[shape]), result.server_timing_ms
    # The shapes are what they say, on every arm: repeated prompts come from the engine's own
    # cache (after the warm-up), unique ones never, the agent shape its shared prefix only.
    cached, tokens, block = result.cached_tokens, result.prompt_tokens, profile.engine.block_size
    for arm in result.arms:
        assert cached["unique"][arm] == 0, cached
        assert cached["repeated"][arm] == block * ((tokens["repeated"][arm] - 1) // block), cached
        prefix = tokens["shared-prefix"][arm] - tokens["unique"][arm]  # the shared system prompt
        assert cached["shared-prefix"][arm] == block * (prefix // block), (cached, tokens)
    json_path, png_path = write_outputs(result, tmp_path / "out")
    written = json.loads(json_path.read_text())
    assert written["shapes"] == shapes and set(written["goals"]) == set(shapes)
    assert written["deltas"]["unique"]["zumik-vllm"]["per_round_ms"] == result.deltas["unique"][
        "zumik-vllm"].per_round_ms  # fmt: skip
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accounting_json, _ = write_outputs(accounting, tmp_path / "accounting")
    summary = json.loads(accounting_json.read_text())["accounting"]
    assert len(summary["accounting_cost_per_round_ms"]) == 2
    assert summary == accounting_summary(accounting)
    # The tenant without accounting (arm 2 above): its prompt again, the capture still reported,
    # opportunity unknown, no ledger.
    with httpx.Client(base_url=running_stack.url, headers={"Authorization": f"Bearer {quiet_key}"}) as quiet:
        prompt = prompts.prompt(Shape.ACCOUNTING, 2, 0)
        body = {"model": running_stack.model, "prompt": prompt, "max_tokens": 1}
        answer = quiet.post("/v1/completions", json=body)
        assert answer.status_code == 200
        assert "x-zumik-reuse-opportunity-tokens" not in answer.headers
        assert answer.headers["x-zumik-reuse-evidence"] == "opportunity=unknown; captured=observed"
        assert int(answer.headers["x-zumik-reuse-captured-tokens"]) > 0
        assert quiet.get("/v2/reuse").json()["groups"] == []
