"""Where the connector's work runs on a vLLM CPU engine: it takes no core from the forward.

vLLM's CPU backend binds each rank's OpenMP threads (the forward) to a list of cores and leaves
``reserve_cpu_num`` cores to the engine core, the API server and other threads. With any KV
connector configured it reserves one more core per rank, for the transfer threads of NIXL's
prefill/decode split (``vllm/utils/ompmultiprocessing.py``). Zumik's connector has no such
threads: loads run in the step, stores in one store process (``store_process.py``). So:

- ``engine_environment`` pins the reservation to what vLLM reserves without a connector (one
  core per local rank on x86, Arm and RISC-V). On a 2-core node vLLM's extra core would leave
  no core reserved at all, the forward's threads on both cores beside the busy engine core: about
  5 ms more per short request than the same engine without a connector
  (``zumik bench overhead``, docs/benchmarks.md).
- ``spare_cpus`` names the cores the forward's threads are not bound to, where the store process
  (or the write-behind thread) and its hand-over threads run (they would otherwise inherit the
  worker's binding, the forward's first core).

    cores:      0    1    2    3
    forward     ✓    ✓    ✓    ·      OMP threads, bound by vLLM
    reserved    ·    ·    ·    ✓      engine core, API server, the store process
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

RESERVED_CPUS_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
_ONLINE_CPUS = "/sys/devices/system/cpu/online"


def engine_environment(local_world_size: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables for a vLLM CPU engine of ``local_world_size`` ranks on this node
    (tensor x pipeline parallel) that runs Zumik's connector: the cores vLLM reserves without a
    connector. Empty when ``environ`` (default: this process's) already sets the reservation:
    an operator's choice stands."""
    if local_world_size <= 0:
        raise ValueError("local_world_size must be positive")
    if RESERVED_CPUS_ENV in (os.environ if environ is None else environ):
        return {}
    return {RESERVED_CPUS_ENV: str(local_world_size)}


def forward_cpus(environ: Mapping[str, str]) -> frozenset[int] | None:
    """The cores vLLM bound this worker's OpenMP threads to, read from the variables it sets
    before it starts the worker (``OMP_PLACES``, Intel's ``KMP_AFFINITY`` or GNU's
    ``GOMP_CPU_AFFINITY``); None when it bound none (not a CPU engine, or ``nobind``)."""
    if environ.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind":
        return None
    if places := environ.get("OMP_PLACES"):
        if ":" in places:  # interval notation ({0:4}): not what vLLM writes; do not guess
            return None
        return _cpu_ids(places) or None
    if proclist := re.search(r"proclist=\[([^\]]*)\]", environ.get("KMP_AFFINITY", "")):
        return _cpu_ids(proclist.group(1)) or None
    if gomp := environ.get("GOMP_CPU_AFFINITY"):
        return _cpu_ids(gomp) or None
    return None


def spare_cpus(
    environ: Mapping[str, str] | None = None, online: frozenset[int] | None = None
) -> frozenset[int] | None:
    """The node's online cores that the forward's threads are not bound to, or None when that
    is unknown or nothing is left (then a thread keeps the binding it inherits)."""
    forward = forward_cpus(os.environ if environ is None else environ)
    if forward is None:
        return None
    spare = (online_cpus() if online is None else online) - forward
    return spare or None


def online_cpus() -> frozenset[int]:
    try:
        with open(_ONLINE_CPUS, encoding="ascii") as listing:
            cpus = _cpu_ids(listing.read())
    except OSError:
        cpus = frozenset()
    return cpus or frozenset(range(os.cpu_count() or 1))


def move_this_thread(cpus: frozenset[int] | None) -> bool:
    """Run the calling thread on ``cpus`` (Linux: the affinity of pid 0 is the calling
    thread's); False when not possible (None, another OS, a cpuset that excludes them)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        return False
    return True


def _cpu_ids(text: str) -> frozenset[int]:
    """Cores named in lists like ``{0,1,2}``, ``0-3,8`` or ``0 1 2``."""
    cpus: set[int] = set()
    for first, last in re.findall(r"(\d+)(?:-(\d+))?", text):
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)
