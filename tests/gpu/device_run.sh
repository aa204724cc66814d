#!/usr/bin/env bash
# The GPU checks a lent GPU machine with only PyTorch can run (no vLLM, Ray or network), as one
# short script: the machine, the copy-path check (kv_transfer_check.py) with its bandwidth
# figures, its pytest on CUDA, and a profile of the bandwidth arms' host time. Reports go to
# $OUT (or ./gpu-out). About 40 seconds on one H200 (2026-12-04). The vLLM checks
# (vllm_restore_check.py, e2e_check.py) need a machine with vLLM CUDA.
#
#     bash tests/gpu/device_run.sh
#
# Where the machine's Python has its own xxhash, the checksum figures are that build's: the
# H200 image's hashed 6.7 GB/s on one thread against 9.3-11.0 for xxhash 4.1.0 (what
# pyproject.toml installs). To measure with 4.1.0, put its wheel in .whl/ and run
#     pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site bash tests/gpu/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
  nproc
  python3 -c 'import torch, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__)'
} 2>&1 | tee "$out/machine.txt"
timeout 300 python3 tests/gpu/kv_transfer_check.py --out "$out/gpu-kv.json" > "$out/kv-check.log" 2>&1 || status=1
tail -40 "$out/kv-check.log"
timeout 200 python3 -m pytest -q -p no:asyncio -o addopts="" tests/gpu/test_kv_transfer_check.py 2>&1 | tee "$out/pytest.log" || status=1
# where the host's time goes in the bandwidth arms (a diagnostic: never fails the run)
timeout 120 python3 -c "
import cProfile, pstats, sys
sys.path.insert(0, '.')
from tests.gpu.kv_transfer_check import measure_bandwidth
cProfile.run('measure_bandwidth(layers=32, blocks=256, tokens=16, repeats=2)', '$out/bandwidth.prof')
pstats.Stats('$out/bandwidth.prof').sort_stats('tottime').print_stats(22)
" > "$out/profile.txt" 2>&1
head -60 "$out/profile.txt" | tail -32
echo "device_run status=$status"
exit $status
