"""Zumik's KV connector in real vLLM engines on CPU: restore into fresh engine processes, and
within one engine the prompts vLLM prefills in chunks or preempts and resumes.

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


def _run_engine(
    model_dir: Path, config: dict, prompts: list[list[int]], mode: str = "generate", **engine: int
) -> tuple[list[dict], str]:
    """``zumik_serve.bench.kv_engine`` in a process of its own: its results and its log."""
    request = {"model_dir": str(model_dir), "config": config, "prompts": prompts, "mode": mode, **engine}
    result = subprocess.run(
        [sys.executable, "-m", "zumik_serve.bench.kv_engine", json.dumps(request)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), result.stdout + result.stderr  # vLLM logs to stdout


def _compat_key(model_dir: Path, tmp_path: Path) -> CompatKey:
    """The compat key of kv_engine's settings on this model: each engine recomputes it from the
    files it loads and refuses to start on a mismatch."""
    return CompatKey(
        model_fingerprint=model_fingerprint(model_dir, cache_path=tmp_path / "fingerprints.json"),
        tokenizer_fingerprint=tokenizer_fingerprint(model_dir), device="cpu", dtype="bfloat16",
        weights_quantization="none", kv_cache_dtype="auto", block_size=BLOCK, tensor_parallel_size=1,
        pipeline_parallel_size=1, region="test", vllm_version=installed_vllm_version(),
    )  # fmt: skip


def _disk_only(model_dir: Path, tmp_path: Path) -> dict:
    key = _compat_key(model_dir, tmp_path)
    return {"compat_digest": key.digest(), "compat_key": key.as_config(), "host_capacity_bytes": 0,
            "disk_root": str(tmp_path / "kv")}  # fmt: skip


def test_restore_into_fresh_engines_from_redis_and_disk(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny")
    key = _compat_key(model_dir, tmp_path)
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


def test_every_chunk_of_a_long_prompt_is_stored_and_the_whole_prompt_restores(tmp_path: Path) -> None:
    """An engine that computes at most 128 tokens a step prefills a 700-token prompt in six
    chunks, the first as a new request and the rest as a running one. Every chunk's full blocks
    are stored: after vLLM's own cache is reset, the whole prompt restores from the disk tier
    (the connector once stored the first chunk only, and 128 tokens restored)."""
    model_dir = build_tiny_model(tmp_path / "tiny")
    prompt = [(i * 7) % 900 + 10 for i in range(700)]
    (result,), _ = _run_engine(
        model_dir, _disk_only(model_dir, tmp_path), [prompt], "prime", max_num_batched_tokens=128
    )
    assert result["cached"] == 0
    assert result["host_cached"] == (len(prompt) - 1) // BLOCK * BLOCK  # 21 blocks: all but the last token's


def test_a_request_resumed_after_a_preemption_gets_its_evicted_blocks_from_the_tiers(tmp_path: Path) -> None:
    """A KV cache of 72 blocks, three prompts of 23 blocks each (all stored in the disk tier by a
    run of each alone, then vLLM's own cache reset), generated at once: the first decode step
    needs a block more than the cache has, and vLLM preempts one request. The other two, decoding
    on, take its freed blocks (its last ones first) and write their own KV into them. When it
    resumes, vLLM's own cache still holds its first blocks, and the tier gives the rest.

    vLLM's V1 model runner (the CPU engines') sends a resumed request as a running one, not as a
    new one: the connector once dropped such a load, and the engine took the stale blocks for the
    prompt's KV (that request's answer went wrong from its third token). Once resumed, the
    request runs alone, as in its run alone: its greedy answer is the same to the last token."""
    model_dir = build_tiny_model(tmp_path / "tiny")
    prompts = [[(i * m) % 900 + 10 for i in range(23 * BLOCK)] for m in (7, 11, 13)]
    results, _ = _run_engine(
        model_dir,
        _disk_only(model_dir, tmp_path),
        prompts,
        "pressure",
        max_tokens=100,
        kv_cache_bytes=9 << 20,
    )
    assert {result["preemptions"] for result in results} == {1}
    resumed = [result for result in results if result["kv"]["engine_tokens"] > 0]  # vLLM's cache had a part
    assert len(resumed) == 1
    (report,) = [result["kv"] for result in resumed]
    assert report["tiers"].get("disk", 0) > 0 and report["bytes"] > 0  # the tier's blocks were loaded
    assert resumed[0]["ids"] == resumed[0]["alone_ids"]
    for result in results:  # the two never preempted restored their prompts whole at first
        if result is not resumed[0]:
            assert result["kv"]["tiers"] == {"disk": 22 * BLOCK}
