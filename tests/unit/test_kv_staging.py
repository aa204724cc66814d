"""Block-major staging: a block moves between a tier's bytes and the staging buffer in one copy.

Where the engine's cache is not vLLM's CPU layout (every CUDA cache, and CPU caches whose blocks
are not contiguous), a restore lands in a staging buffer first (``BlockCopier.restore_target``).
That buffer holds each block's layers back to back in the order a block value holds them (by
name), so ``BlockSink`` (``RestoreTarget.sink``) reads, checks and copies a whole block at
once, as does ``BlockCopier.inject`` with blocks copied out by ``extract`` (``contiguous_run``),
and large batches of host copies run on several threads (``hostcopy.copy_all``). These are the
same functions the GPU check runs on CUDA (``tests/gpu/kv_transfer_check.py``).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from kvstore import hostcopy
from kvstore.codec import BlockSink, encode_block
from kvstore.hostcopy import PARALLEL_COPY_BYTES, copy_all
from kvstore.keys import BlockKey
from kvstore.tier import BlockAddress
from kvstore.transfer import BlockCopier, contiguous_run

BLOCKS, HEADS, TOKENS, WIDTH = 6, 2, 4, 16
NAMES = ["layers.2.attn", "layers.10.attn", "layers.1.attn"]  # sorted order differs from this one


def strided_caches(seed: int) -> dict[str, torch.Tensor]:
    """Per layer a ``[B, H, N, C]`` view of a heads-first buffer: its blocks are not contiguous,
    so the copier stages restores instead of writing the cache's own rows."""
    generator = torch.Generator().manual_seed(seed)
    caches = {}
    for name in NAMES:
        raw = torch.randint(0, 256, (HEADS, BLOCKS, TOKENS, WIDTH), dtype=torch.uint8, generator=generator)
        caches[name] = raw.permute(1, 0, 2, 3)
    return caches


def address(index: int) -> BlockAddress:
    return BlockAddress("c" * 64, BlockKey(f"{index:032x}"))


def test_contiguous_run_covers_back_to_back_views_in_order_only() -> None:
    rows = np.arange(40, dtype=np.uint8).reshape(2, 20)
    views = [rows[1, 0:5], rows[1, 5:12], rows[1, 12:20]]
    run = contiguous_run(views)
    assert run is not None and run.tolist() == list(range(20, 40))
    run[0] = 99
    assert rows[1, 0] == 99  # a view, not a copy
    assert contiguous_run(views[::-1]) is None  # out of order
    assert contiguous_run([rows[1, 0:5], rows[1, 6:12]]) is None  # a gap
    assert contiguous_run([np.zeros(5, np.uint8), np.zeros(5, np.uint8)]) is None  # two buffers
    assert contiguous_run([]) is None


def test_a_staged_restore_takes_each_block_in_one_copy_bit_for_bit() -> None:
    source = BlockCopier(strided_caches(1), BLOCKS)
    block_ids = [4, 0, 5]
    values = [encode_block(block, address(i)) for i, block in enumerate(source.extract(block_ids))]
    caches = strided_caches(2)
    for cache in caches.values():
        cache.zero_()
    copier = BlockCopier(caches, BLOCKS)
    target = copier.restore_target([1, 3, 2])
    assert [name for name, _ in target.layers] == sorted(NAMES)  # a block value's data order

    def per_layer(index: int) -> dict[str, np.ndarray]:
        raise AssertionError("a staged block is taken whole, never layer by layer")

    sink = BlockSink(per_layer, None, target.whole, target.layers)
    assert all(sink.take(i, value, address(i)) for i, value in enumerate(values))
    target.commit(3)
    original = strided_caches(1)
    for name in NAMES:
        for restored, stored in zip([1, 3, 2], block_ids, strict=True):
            assert torch.equal(caches[name][restored], original[name][stored])
        assert not caches[name][0].any() and not caches[name][4].any()  # nothing else written


def test_inject_of_blocks_copied_out_writes_them_back_exactly() -> None:
    original = strided_caches(3)
    blocks = BlockCopier(original, BLOCKS).extract([0, 1, 2, 3])
    caches = strided_caches(4)
    assert BlockCopier(caches, BLOCKS).inject([5, 4, 3, 2], blocks) == 4
    for name in NAMES:
        for restored, stored in zip([5, 4, 3, 2], [0, 1, 2, 3], strict=True):
            assert torch.equal(caches[name][restored], original[name][stored])


def test_copy_all_splits_a_large_batch_over_threads_and_copies_every_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(7)
    count = PARALLEL_COPY_BYTES // (1 << 20) + 3
    sources = [rng.integers(0, 256, 1 << 20, dtype=np.uint8) for _ in range(count)]
    destinations = [np.zeros_like(source) for source in sources]
    workers: set[str] = set()
    copy_pair = hostcopy._copy_pair
    pool = hostcopy._threads()
    parts: list[int] = []

    def tracked(pair: tuple[np.ndarray, np.ndarray]) -> None:
        workers.add(threading.current_thread().name)
        copy_pair(pair)

    class CountingPool:  # the split, as handed to the pool (which threads run the parts is its choice)
        def map(self, run: Any, starts: Any) -> Any:
            parts.extend(starts)
            return pool.map(run, parts)

    monkeypatch.setattr(hostcopy, "_copy_pair", tracked)
    monkeypatch.setattr(hostcopy, "_threads", CountingPool)
    copy_all(zip(destinations, sources, strict=True), threads=3)
    assert parts == [0, 1, 2]  # three strided parts
    assert workers and all(name.startswith("zumik-kv-host") for name in workers), workers
    assert all(np.array_equal(d, s) for d, s in zip(destinations, sources, strict=True))
    small = [np.zeros(4, np.uint8)]
    workers.clear()
    copy_all([(small[0], np.arange(4, dtype=np.uint8))], threads=3)  # below the threshold: in line
    assert small[0].tolist() == [0, 1, 2, 3] and workers == {threading.current_thread().name}
