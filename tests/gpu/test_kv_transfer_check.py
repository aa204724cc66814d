"""Runs the GPU KV transfer check where a CUDA GPU is present; skipped elsewhere."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU visible to PyTorch")
def test_kv_blocks_move_between_host_gpu_and_disk() -> None:
    from tests.gpu.kv_transfer_check import run_check

    result = run_check(num_blocks=32, repeats=2)
    assert result["disk_round_trip_identical"] is True
    assert all(value > 0 for value in result["gbps"].values())
