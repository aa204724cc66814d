"""Copies of whole KV blocks between an engine's paged KV cache and host bytes (plain PyTorch).

The connector (``kvstore/connector.py``) hands this module vLLM's per-layer cache views and
nothing else of vLLM, so the same code runs in the engine, in the CPU unit tests and in the GPU
check (``tests/gpu/kv_transfer_check.py``) on a machine with only PyTorch.

What a cache looks like (vLLM 0.32, ``create_kv_cache_views``): per layer a logical
``[B, H, N, C]`` view, blocks first, whatever the physical stride order; where the attention
backend splits a manager block into R kernel blocks, ``[B*R, H, N/R, C]``. A block's bytes are
always written in one canonical order, that of its logical ``[H, N, C]`` view:

    manager block b, layer l  ──►  bytes of cache_l[b] as a contiguous [H, N, C] array
    (kernel-split: cache_l viewed [B, R, H, N/R, C], block b permuted to [H, R, N/R, C])

so the bytes do not depend on the physical layout, and a block copies out and back bit for bit.
Everything is copied as bytes (``uint8`` views of the cache), whatever the dtype (bf16, FP8).

On CUDA a transfer is batched: one host<->device copy of every block and layer through a pinned
staging buffer, ``non_blocking`` on a side stream, and one gather (``index_select``) or
scatter (``index_copy_``) kernel per layer. The staging buffer is block-major, each block's
layers back to back in the order a block value holds them (by name), so a tier's bytes land
in it one block per copy (``RestoreTarget.whole``), and a big batch's host copies run on
several threads (``hostcopy``). A restore records an event the engine's stream
waits on (the forward waits for the restored blocks, the CPU does not); a store waits on the
engine's stream, then for its own copy to land in pinned host memory of its own, which it
returns (block-major, like the staging buffer) without another copy.

Host waits: block ids go to the device from pinned memory, ``non_blocking``, so the only wait of
the CPU on the GPU is a store's, for its bytes (and a restore's, before it reuses the staging
buffer the previous one may still read). Both are deliberate, and run inside vLLM's
``gpu_sync_allowed`` (its ``VLLM_GPU_SYNC_CHECK`` reports every other sync in the engine step;
without vLLM, as in the GPU check, there is nothing to allow).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from kvstore.codec import BlockSink, KnownHeaders
from kvstore.hostcopy import copy_all
from kvstore.manager import Placed, TierManager
from kvstore.tier import BlockAddress

_sync_allowed: Callable[[], contextlib.AbstractContextManager[object]]
try:
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed as _sync_allowed
except ImportError:  # plain PyTorch (the GPU check): no sync checker to tell
    _sync_allowed = contextlib.nullcontext

# Restored blocks arrive as read-only views of the bytes read (no copy before the copy into the
# cache); torch only ever reads them (the source of ``copy_``), so its warning says nothing here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class CacheLayoutError(ValueError):
    """A cache tensor is not blocks-first at manager-block granularity (e.g. a pre-0.2x vLLM
    ``(2, num_blocks, ...)`` K/V-first cache): the connector refuses it."""


def manager_blocks(cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``cache`` as bytes with manager blocks on dim 0: ``[B, H, N, C']`` or, kernel-split,
    ``[B, R, H, N/R, C']`` (``C'`` in bytes)."""
    if cache.dim() != 4:
        raise CacheLayoutError(f"a KV cache view is [B, H, N, C], not of shape {tuple(cache.shape)}")
    if cache.stride(-1) != 1:
        raise CacheLayoutError("a KV cache view's content dimension C must be contiguous")
    as_bytes = cache.view(torch.uint8)
    rows = as_bytes.shape[0]
    if rows == num_blocks:
        return as_bytes
    if rows > num_blocks and rows % num_blocks == 0:
        return as_bytes.unflatten(0, (num_blocks, rows // num_blocks))
    raise CacheLayoutError(
        f"a KV cache view has {rows} blocks on dim 0 for {num_blocks} engine blocks: not a "
        "blocks-first layout Zumik's KV connector can copy"
    )


def block_nbytes(blocks: torch.Tensor) -> int:
    return int(blocks[0].numel())


def canonical(selected: torch.Tensor) -> torch.Tensor:
    """Rows of ``manager_blocks`` (``[k, ...]``) in canonical byte order, shape ``[k, H, N', C']``
    (``[k, H, R, N/R, C']`` when kernel-split): a view, contiguous only if the cache is."""
    if selected.dim() == 5:  # [k, R, H, N/R, C] -> [k, H, R, N/R, C]
        return selected.permute(0, 2, 1, 3, 4)
    return selected


class BlockCopier:
    """Copies whole blocks of every layer of one engine rank's KV cache.

    ``extract`` returns, per block, ``{layer name: uint8 array}`` that the caller owns;
    ``inject`` writes such dicts back and returns how many blocks it wrote, from the first:
    it stops at the first block that lacks a layer or whose bytes are not that layer's block
    size (that block and the ones after it are the caller's to recompute).
    """

    def __init__(self, caches: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        if not caches:
            raise CacheLayoutError("no KV cache layers to copy")
        self.num_blocks = int(num_blocks)
        self._blocks = {name: manager_blocks(cache, self.num_blocks) for name, cache in caches.items()}
        self.block_nbytes = {name: block_nbytes(blocks) for name, blocks in self._blocks.items()}
        # Staged and copied-out blocks are block-major: a block's layers back to back, in the
        # order a block value holds them (by name: ``codec.encode_block``), so that a block
        # moves between a tier's bytes and the staging buffer in one copy (``RestoreTarget.whole``).
        self.layer_order = sorted(self._blocks)
        self._offsets: dict[str, int] = {}
        offset = 0
        for name in self.layer_order:
            self._offsets[name] = offset
            offset += self.block_nbytes[name]
        # (name, bytes) of each layer in that order (``RestoreTarget.layers``)
        self.layers = tuple((name, self.block_nbytes[name]) for name in self.layer_order)
        self.device = next(iter(self._blocks.values())).device
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._host = torch.empty(0, dtype=torch.uint8)  # pinned on CUDA
        # vLLM's CPU layout: restores write the cache's own blocks (``restore_target``)
        self._rows: dict[str, np.ndarray] | None = {}
        for name, blocks in self._blocks.items():
            rows = _host_rows(blocks, self.block_nbytes[name])
            if rows is None:
                self._rows = None
                break
            self._rows[name] = rows
        self._pending: torch.cuda.Event | None = None  # the last copy that reads self._host
        self._host_ids = torch.empty(0, dtype=torch.long)  # a restore's block ids, pinned (CUDA)
        self._extract_ids = torch.empty(0, dtype=torch.long)  # a store's, pinned (CUDA)

    @property
    def bytes_per_block(self) -> int:
        return sum(self.block_nbytes.values())

    def _layer_views(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Per layer, its ``[k, block bytes]`` columns of block-major ``rows`` (``[k, bytes_per_block]``)."""
        return {
            name: rows[:, self._offsets[name] : self._offsets[name] + size]
            for name, size in self.block_nbytes.items()
        }

    def extract(self, block_ids: Sequence[int]) -> list[dict[str, np.ndarray]]:
        layers = self.extract_layers(block_ids)
        return [{name: rows[i] for name, rows in layers.items()} for i in range(len(block_ids))]

    def extract_layers(self, block_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """Per layer, ``[len(block_ids), block bytes]`` (``uint8``, owned by the caller)."""
        count = len(block_ids)
        if count == 0:
            return {name: np.empty((0, size), dtype=np.uint8) for name, size in self.block_nbytes.items()}
        if self._rows is not None:  # vLLM's CPU layout: one numpy gather per layer is the copy
            ids = np.fromiter(block_ids, dtype=np.intp, count=count)
            return {name: rows[ids] for name, rows in self._rows.items()}
        if self._stream is None:  # host memory: one gather per layer is the copy
            index = torch.tensor(list(block_ids), dtype=torch.long)
            return {
                name: canonical(blocks.index_select(0, index)).contiguous().reshape(count, -1).numpy()
                for name, blocks in self._blocks.items()
            }
        # The ids go over from pinned memory, on the side stream (a copy from pageable memory
        # would wait for the engine's stream); the previous store's copy of them has landed.
        if self._extract_ids.numel() < count:
            self._extract_ids = torch.empty(max(self.num_blocks, count), dtype=torch.long, pin_memory=True)
        pinned = self._extract_ids[:count]
        pinned.numpy()[:] = block_ids
        # The blocks land in pinned memory of their own that the caller keeps (no copy after the
        # copy to the host): PyTorch's pinned-memory cache takes it back once the caller drops them.
        host = torch.empty(count * self.bytes_per_block, dtype=torch.uint8, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the forward wrote them
        with torch.cuda.stream(self._stream):
            index = pinned.to(self.device, non_blocking=True)
            staged = torch.empty((count, self.bytes_per_block), dtype=torch.uint8, device=self.device)
            for name in self.layer_order:
                gathered = canonical(self._blocks[name].index_select(0, index))
                start = self._offsets[name]
                staged[:, start : start + self.block_nbytes[name]].view(gathered.shape).copy_(gathered)
            host.copy_(staged.view(-1), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        with _sync_allowed():  # the store's bytes must be on the host: the one wait of a store
            done.synchronize()
        return self._layer_views(host.numpy().reshape(count, self.bytes_per_block))

    def inject(self, block_ids: Sequence[int], blocks: Sequence[Mapping[str, np.ndarray]]) -> int:
        count = 0
        for tensors in blocks[: len(block_ids)]:
            if not all(
                (source := tensors.get(name)) is not None and source.nbytes == size
                for name, size in self.block_nbytes.items()
            ):
                break
            count += 1
        if count == 0:
            return 0
        target = self.restore_target(block_ids[:count])
        jobs: list[tuple[np.ndarray, np.ndarray]] = []
        for index, tensors in enumerate(blocks[:count]):
            sources = [_bytes_of(tensors[name]) for name in self.layer_order]
            whole = target.whole(index)
            source_run = contiguous_run(sources) if whole is not None else None
            if whole is not None and source_run is not None:
                jobs.append((whole, source_run))  # the whole block in one copy
            else:
                places = target.block(index)
                jobs.extend(zip((places[name] for name in self.layer_order), sources, strict=True))
        copy_all(jobs)
        target.commit(count)
        return count

    def restore_target(self, block_ids: Sequence[int]) -> RestoreTarget:
        """Where a restore of ``block_ids`` writes each block's bytes (``RestoreTarget``): the
        cache's own rows when every layer's block is one contiguous run of canonical bytes in
        host memory (vLLM's CPU layout: no staging, no second copy), else a staging buffer
        (pinned on CUDA) that ``commit`` scatters into the cache, one kernel per layer."""
        ids = [int(block_id) for block_id in block_ids]
        if self._rows is not None:
            return RestoreTarget(ids, self._rows, None)
        rows = self._staging(len(ids) * self.bytes_per_block).numpy().reshape(len(ids), self.bytes_per_block)
        views = self._layer_views(rows)
        return RestoreTarget(ids, views, self, rows)

    def _commit_staged(self, block_ids: Sequence[int], views: Mapping[str, np.ndarray], count: int) -> None:
        """Scatter the first ``count`` staged blocks (``restore_target``) into the cache."""
        if count == 0:
            return
        if self._stream is None:  # host memory, a layout whose blocks are not contiguous
            index = torch.tensor(list(block_ids[:count]), dtype=torch.long)
            for name, blocks in self._blocks.items():
                _scatter_rows(blocks, index, torch.from_numpy(np.ascontiguousarray(views[name][:count])))
            return
        # The block ids go over from pinned memory on the side stream too: CUDA syncs a stream
        # before a copy from pageable memory, which made the CPU wait for the engine's stream.
        if self._host_ids.numel() < count:
            self._host_ids = torch.empty(max(self.num_blocks, count), dtype=torch.long, pin_memory=True)
        ids = self._host_ids[:count]
        ids.numpy()[:] = block_ids[:count]
        host = self._host[: count * self.bytes_per_block]
        with torch.cuda.stream(self._stream):
            index = ids.to(self.device, non_blocking=True)
            staged = host.to(self.device, non_blocking=True).view(count, self.bytes_per_block)  # one copy
            for name, blocks in self._blocks.items():
                start = self._offsets[name]
                _scatter_rows(blocks, index, staged[:, start : start + self.block_nbytes[name]])
            done = torch.cuda.Event()
            done.record(self._stream)
        torch.cuda.current_stream(self.device).wait_event(done)  # the forward waits, not the CPU
        self._pending = done  # self._host is read until then

    def synchronize(self) -> None:
        """Wait until the last restore has landed (tests, and before freeing the caches)."""
        if self._pending is not None:
            with _sync_allowed():  # the staging buffer is reused only once its copy has landed
                self._pending.synchronize()
            self._pending = None

    def _staging(self, num_bytes: int) -> torch.Tensor:
        self.synchronize()  # the previous restore may still read the staging buffer
        if self._host.numel() < num_bytes:
            capacity = max(num_bytes, 2 * self._host.numel())
            self._host = torch.empty(capacity, dtype=torch.uint8, pin_memory=self._cuda)
        return self._host[:num_bytes]


def contiguous_run(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """One flat ``uint8`` view over ``arrays`` when they lie back to back, in this order, in
    one numpy buffer (a block's layers in blocks copied out by ``BlockCopier.extract``), else
    None. A block then moves in one copy."""
    if not arrays:
        return None
    root = _root(arrays[0])
    if not root.flags.c_contiguous:
        return None
    start = root.__array_interface__["data"][0]
    first = end = arrays[0].__array_interface__["data"][0]
    for array in arrays:
        if (
            _root(array) is not root
            or not array.flags.c_contiguous
            or array.__array_interface__["data"][0] != end
        ):
            return None
        end += array.nbytes
    return root.reshape(-1).view(np.uint8)[first - start : end - start]


def _root(array: np.ndarray) -> np.ndarray:
    """The array that owns ``array``'s buffer (the end of its chain of views)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _scatter_rows(blocks: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` (``[k, block bytes]``, canonical order) into blocks ``index`` of one layer
    (``manager_blocks``): one ``index_copy_`` for all of them."""
    one = canonical(blocks[:1]).shape[1:]  # [H, ...] of one block, canonical order
    source = rows.reshape(rows.shape[0], *one)
    if blocks.dim() == 5:  # back from [k, H, R, N/R, C] to the view's [k, R, H, N/R, C]
        source = source.permute(0, 2, 1, 3, 4)
    blocks.index_copy_(0, index, source)


def _host_rows(blocks: torch.Tensor, nbytes: int) -> np.ndarray | None:
    """One layer's blocks as a writable ``[B, block bytes]`` array over the cache's own memory,
    or None unless each block is one contiguous run of canonical bytes in host memory."""
    if blocks.device.type != "cpu" or blocks.dim() != 4 or not blocks[0].is_contiguous():
        return None
    if blocks.shape[0] > 1 and blocks.stride(0) < nbytes:  # overlapping blocks: not a cache
        return None
    return blocks.as_strided((blocks.shape[0], nbytes), (blocks.stride(0), 1)).numpy()


class RestoreTarget:
    """Where the blocks of one restore go: ``block(i)`` gives, per layer, a writable flat
    ``uint8`` array of the ``i``-th block's canonical bytes, to fill (a file read straight into
    it, or a copy from a decoded value); ``commit(count)`` then lands the first ``count`` blocks
    in the cache. On vLLM's CPU layout the arrays are the cache's own blocks (written as they
    are filled; ``commit`` has nothing to do), otherwise rows of a staging buffer that
    ``commit`` scatters, one kernel per layer (on CUDA after one host-to-device copy)."""

    def __init__(
        self,
        block_ids: list[int],
        rows: dict[str, np.ndarray],
        copier: BlockCopier | None,
        staged: np.ndarray | None = None,
    ) -> None:
        self.block_ids = block_ids
        self._rows = rows
        self._copier = copier  # None: rows are the cache's own, indexed by block id
        self._staged = staged  # [k, bytes per block], block-major, when staged
        # (name, bytes) of each layer in the order ``whole`` holds them
        self.layers: tuple[tuple[str, int], ...] = copier.layers if copier else ()

    def sink(self, headers: KnownHeaders | None = None) -> BlockSink:
        """A ``codec.BlockSink`` that puts a restore's blocks here (a staged block as one buffer)."""
        return BlockSink(self.block, headers, self.whole if self._staged is not None else None, self.layers)

    def whole(self, index: int) -> np.ndarray | None:
        """The ``index``-th block's bytes, every layer back to back in ``layers`` order (a row of
        the block-major staging buffer), or None where the rows are the cache's own."""
        return None if self._staged is None else self._staged[index]

    def block(self, index: int) -> dict[str, np.ndarray]:
        row = index if self._copier is not None else self.block_ids[index]
        return {name: rows[row] for name, rows in self._rows.items()}

    def commit(self, count: int) -> None:
        if self._copier is not None:
            self._copier._commit_staged(self.block_ids, self._rows, count)


def restore_into(
    manager: TierManager,
    target: RestoreTarget,
    addresses: Sequence[BlockAddress],
    headers: KnownHeaders | None = None,
) -> Placed:
    """The connector's restore: the tiers' blocks for ``addresses`` read into ``target``
    (``TierManager.restore``), then the longest prefix placed committed. In one piece: on an
    H200, chunks whose copies to the device overlapped the next chunk's reads were slower
    (docs/benchmarks.md, "The copy path on a GPU")."""
    placed = manager.restore(addresses, target.sink(headers))
    target.commit(placed.num_blocks)
    return placed


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """``array``'s bytes as a flat ``uint8`` array (no copy when it already is one)."""
    if array.dtype == np.uint8 and array.ndim == 1 and array.flags.c_contiguous:
        return array
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)
