"""The GPU check's copy path (``kv_transfer_check.py``), on CPU in every run and on CUDA where a
GPU is visible: every vLLM cache layout round-trips bit for bit through the connector's copy
code, the disk tier and the block format, and a TP rank never restores another rank's block."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.kv_transfer_check import run_check


def test_copy_path_is_bit_exact_and_rank_isolated_on_cpu() -> None:
    result = run_check(device="cpu", layers=3, blocks=6, head_size=16, kv_heads=2)
    assert len(result["cases"]) == 10
    assert all(case == {"bit_exact": True, "isolated": True} for case in result["cases"].values()), result
    assert result["refuses_kv_first"] and result["ok"]


def test_the_tier_half_measurement_restores_every_block_on_both_arms_on_cpu() -> None:
    """``--tier-half``: every block comes back on one thread and on the threads (it asserts
    so itself), from the host tier and from a sealed disk tier; no timing is judged here."""
    result = run_check(
        device="cpu",
        layers=2,
        blocks=6,
        head_size=16,
        kv_heads=2,
        bandwidth_blocks=8,
        repeats=1,
        tier_half=True,
    )
    assert set(result["tier_half"]) == {"bytes", "copy_threads", "host_tier", "sealed_disk_tier"}
    assert all(result["tier_half"][tier]["threads"] > 0 for tier in ("host_tier", "sealed_disk_tier"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to PyTorch")
def test_copy_path_on_cuda_with_pinned_staging_and_a_side_stream() -> None:
    result = run_check(device="cuda", layers=8, blocks=32, bandwidth_blocks=64, repeats=2)
    assert result["ok"], result
    assert result["bandwidth"]["pinned_staging"] and result["bandwidth"]["side_stream"]
    assert result["host_syncs"] == {"store": 0, "restore": 0}
