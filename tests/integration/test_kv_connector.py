"""Zumik's KV connector in real vLLM engines on CPU: restore into fresh engine processes.

Process 1 computes two prompts and stores their blocks in the Redis and disk tiers. Then prompt
B's Redis entries are deleted and some of its disk files are damaged (found under the shard
digest the connector reports: blocks are filed per KV layout and rank). Both engines check their
weights against the compat key they are given before they start. Process 2, a fresh engine:
- prompt A restores from Redis: at least 90% of its block-aligned tokens are reported cached,
  and its greedy output is identical to the full computation of process 1;
- prompt B restores from disk up to the first damaged block (a truncated file), then recomputes:
  fewer tokens cached, the output is still identical, and nothing fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from kvstore.compat import CompatKey, installed_vllm_version
from kvstore.fingerprint import model_fingerprint, tokenizer_fingerprint
from kvstore.keys import chain_block_keys, seed_from_digest
from kvstore.tier import BlockAddress
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_tier import RedisTier
from zumik_serve.model.tiny import build_tiny_model
from zumik_serve.store.local_redis import LocalRedis

pytestmark = [pytest.mark.vllm, pytest.mark.redis]

BLOCK = 32


def _run_engine(model_dir: Path, config: dict, prompts: list[list[int]]) -> tuple[list[dict], str]:
    request = {"model_dir": str(model_dir), "config": config, "prompts": prompts, "mode": "generate"}
    result = subprocess.run(
        [sys.executable, "-m", "zumik_serve.bench.kv_engine", json.dumps(request)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), result.stdout + result.stderr  # vLLM logs to stdout


def test_restore_into_fresh_engines_from_redis_and_disk(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny")
    # The compat key of kv_engine's settings on this model: each engine recomputes it from the
    # files it loads and refuses to start on a mismatch.
    key = CompatKey(
        model_fingerprint=model_fingerprint(model_dir, cache_path=tmp_path / "fingerprints.json"),
        tokenizer_fingerprint=tokenizer_fingerprint(model_dir), device="cpu", dtype="bfloat16",
        weights_quantization="none", kv_cache_dtype="auto", block_size=BLOCK, tensor_parallel_size=1,
        pipeline_parallel_size=1, region="test", vllm_version=installed_vllm_version(),
    )  # fmt: skip
    compat = key.digest()
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    try:
        kv = server.kv_access  # the engines' least-privilege user, its password in a file
        config = {"compat_digest": compat, "compat_key": key.as_config(), "host_capacity_bytes": 0,
                  "redis_url": kv.url, "redis_password_file": str(kv.password_file),
                  "disk_root": str(tmp_path / "kv")}  # fmt: skip
        prompt_a = [(i * 7) % 900 + 10 for i in range(700)]
        prompt_b = [(i * 11) % 900 + 10 for i in range(650)]
        first, first_log = _run_engine(model_dir, config, [prompt_a, prompt_b])
        assert f"match compat digest {compat[:16]}" in first_log
        assert [r["cached"] for r in first] == [0, 0]
        assert [r["kv"]["tiers"] for r in first] == [{}, {}]  # the connector's report: nothing restored
        shard = first[0]["kv"]["shard"]  # the digest this engine's rank files its blocks under
        assert shard != compat and "shard tp0of1-pp0of1" in first_log

        keys_b = chain_block_keys(
            prompt_b[: (len(prompt_b) - 1) // BLOCK * BLOCK], BLOCK, seed_from_digest(compat, None)
        )
        client = redis.Redis.from_url(server.url)
        redis_keys = [RedisTier.redis_key(BlockAddress(shard, key)) for key in keys_b]
        assert client.delete(*redis_keys) == len(keys_b)
        disk = DiskTier(tmp_path / "kv")
        disk.path(BlockAddress(shard, keys_b[10])).write_bytes(b"truncated")  # the walk stops here
        disk.path(BlockAddress(shard, keys_b[14])).unlink()  # a later gap, never reached

        second, log = _run_engine(model_dir, config, [prompt_a, prompt_b])
        assert Path(str(kv.password_file)).read_text() not in log  # vLLM logs its engine config
    finally:
        server.stop()
    aligned_a = (len(prompt_a) - 1) // BLOCK * BLOCK
    assert second[0]["cached"] >= 0.9 * aligned_a
    assert second[0]["ids"] == first[0]["ids"]
    # The connector's per-request report (kv_transfer_params["zumik_kv"]) names the tier and
    # counts what it restored; the engine's own prefix cache was empty in this fresh process.
    assert second[0]["kv"]["tiers"] == {"redis": second[0]["cached"]}
    assert second[0]["kv"]["engine_tokens"] == 0
    # Blocks 0-13 exist in some tier, so vLLM plans to load 14 blocks; block 10 fails to decode,
    # the connector reports blocks 10-13 as load errors and vLLM recomputes them.
    assert second[1]["cached"] <= 14 * BLOCK
    assert "4 block(s) not restorable" in log
    assert second[1]["ids"] == first[1]["ids"]
    # The failed load kept the request running, so the worker's count (10 blocks, then the
    # truncated one) replaced the plan's 14, with the bytes and time it took.
    assert second[1]["kv"]["tiers"] == {"disk": 10 * BLOCK}
    assert second[1]["kv"]["bytes"] > 0 and second[1]["kv"]["ms"] >= 0
