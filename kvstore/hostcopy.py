"""Host-side work of a KV restore or store spread over threads: byte copies, file reads and
checksums of whole blocks (numpy, ``os.preadv`` and xxhash release the GIL while they work).

One thread's memcpy moves a fraction of what a host<->GPU link does: on an H200 machine
(2026-12-04, ``tests/gpu/device_run.sh``) one thread copied 9 GB/s into pinned memory and
16 threads about 40 GB/s, against 55 GB/s host-to-device. Work is split only when a batch
holds at least ``PARALLEL_COPY_BYTES``: on vLLM's CPU layout a restore writes the cache's own
rows and blocks are small, so the engine's own threads are left alone there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

PARALLEL_COPY_BYTES = 8 << 20
COPY_THREADS = max(1, min(16, os.cpu_count() or 1))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()

Item = TypeVar("Item")
Result = TypeVar("Result")


def copy_all(jobs: Iterable[tuple[np.ndarray, np.ndarray]], threads: int | None = None) -> None:
    """``destination[...] = source`` for every pair, same-shaped ``uint8`` arrays; a batch of
    at least ``PARALLEL_COPY_BYTES`` is split over ``threads`` (default ``COPY_THREADS``)."""
    pairs = list(jobs)
    parallel = sum(destination.nbytes for destination, _ in pairs) >= PARALLEL_COPY_BYTES
    map_blocks(_copy_pair, pairs, parallel=parallel, threads=threads)


def map_blocks(
    work: Callable[[Item], Result], items: Sequence[Item], *, parallel: bool, threads: int | None = None
) -> list[Result]:
    """``[work(item) for item in items]``, in order; with ``parallel``, on up to ``threads``
    threads (default ``COPY_THREADS``), each taking every n-th item. ``work`` must not share
    mutable state between items."""
    count = COPY_THREADS if threads is None else threads
    if not parallel or count < 2 or len(items) < 2:
        return [work(item) for item in items]
    count = min(count, len(items))
    results: list[Result | None] = [None] * len(items)

    def run(start: int) -> None:
        for index in range(start, len(items), count):
            results[index] = work(items[index])

    for _ in _threads().map(run, range(count)):
        pass
    return results  # type: ignore[return-value]  # every slot filled above


def _copy_pair(pair: tuple[np.ndarray, np.ndarray]) -> None:
    destination, source = pair
    destination[...] = source


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="zumik-kv-host")
        return _pool
