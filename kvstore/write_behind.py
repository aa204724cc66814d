"""WriteBehind: stores to the tiers happen on a thread of their own, never in the engine step.

    engine step (wait_for_save)                     writer thread
      blocks copied out of the paged cache ──submit──► bounded queue ──► encode, seal, write
      (the copy stays in the step: vLLM may           (at most max_pending_bytes; a batch
       reuse the blocks once the step ends)             that does not fit is dropped, counted;
                                                        each tier written once per batch)

``submit`` never waits: it takes the batch when the queue has room and otherwise drops it whole
and counts it (a ``dropped`` event, tier ENGINE: the blocks never reached a tier). A dropped
store costs a later recompute, never a failed request. ``close`` (the worker's shutdown, and
at interpreter exit) stops taking batches and waits up to ``timeout_s`` for the queue to
drain; what is left then is counted as dropped and logged.

On a vLLM CPU engine the thread runs on the cores the forward's threads are not bound to
(``cpu_placement.spare_cpus``, given as ``cpus``), not on the core it would inherit (the
forward's first). The thread also measures the tiers' occupancy (``TierManager.usage``, which
reads files and asks servers) every ``usage_every_s``, so that the step's stats only read the
last figures.

The thread shares the engine process's GIL with the scheduler and the forward's Python glue;
``store_process.StoreProcess`` keeps this contract (``StoreQueue``) with the writing done in a
child process instead. A batch for it must pickle: ``EncodeBlocks`` and ``Values`` do.
"""

from __future__ import annotations

import abc
import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvstore.codec import encode_block
from kvstore.cpu_placement import move_this_thread
from kvstore.manager import TierManager
from kvstore.tier import BlockAddress, Tier, TierEvent, TierEventKind, TierUsage

logger = logging.getLogger("vllm.zumik.kvstore")


@dataclass(frozen=True)
class StoreBatch:
    """Blocks to store, in order. ``value(i)`` makes block ``i``'s value (the writer thread
    calls it: encoding happens there); ``num_bytes`` is what the batch holds in memory until
    written. ``sources``: None for newly computed blocks (stored in every tier), else the tier
    each block was loaded from (promoted to the nearer tiers)."""

    addresses: tuple[BlockAddress, ...]
    num_bytes: int
    value: Callable[[int], bytes]
    sources: tuple[Tier, ...] | None = None


@dataclass(frozen=True)
class EncodeBlocks:
    """``StoreBatch.value`` of blocks copied out of the paged cache: block ``index`` encoded
    (``codec.encode_block``) where the writer runs. It pickles (the arrays out of band), so a
    store process can take it."""

    blocks: tuple[dict[str, np.ndarray], ...]
    addresses: tuple[BlockAddress, ...]

    def __call__(self, index: int) -> bytes:
        return encode_block(self.blocks[index], self.addresses[index])


@dataclass(frozen=True)
class Values:
    """``StoreBatch.value`` of values already encoded (restored blocks to promote)."""

    values: tuple[bytes, ...]

    def __call__(self, index: int) -> bytes:
        return self.values[index]


class StoreQueue(abc.ABC):
    """What the connector hands stores to (``WriteBehind``, ``store_process.StoreProcess``):
    ``submit`` never waits and drops a batch that does not fit whole (counted); ``flush`` waits
    for what was taken; ``close`` takes no more, waits at most ``timeout_s`` and counts what is
    left; ``usage`` is the last occupancy measured off the step. The bounded queue is here;
    a subclass writes what it holds (``_begin`` starts its writer at the first batch taken)."""

    def __init__(
        self,
        manager: TierManager,
        *,
        max_pending_bytes: int,
        usage_every_s: float | None = 5.0,
        cpus: frozenset[int] | None = None,
    ) -> None:
        if max_pending_bytes <= 0:
            raise ValueError("max_pending_bytes must be positive")
        self.manager = manager
        self.cpus = cpus  # where the writer runs (None: where the thread that starts it does)
        self.max_pending_bytes = max_pending_bytes
        self._usage_every_s = usage_every_s
        self._queue: deque[StoreBatch] = deque()
        self._pending_bytes = 0  # taken and not yet written (or counted as dropped)
        self._closed = False
        self._changed = threading.Condition()
        self._begun = False
        self._usage: tuple[TierUsage, ...] = ()

    @property
    def pending_bytes(self) -> int:
        with self._changed:
            return self._pending_bytes

    @property
    def usage(self) -> tuple[TierUsage, ...]:
        """The tiers' occupancy as last measured by the writer (no I/O here); the same object
        until the next measurement."""
        return self._usage

    def submit(self, batch: StoreBatch) -> bool:
        """Queue ``batch`` for the writer and return at once; False (and a dropped event) when
        the queue has no room for it or the writer was closed."""
        with self._changed:
            accepted = not self._closed and self._pending_bytes + batch.num_bytes <= self.max_pending_bytes
            if accepted:
                self._queue.append(batch)
                self._pending_bytes += batch.num_bytes
                self._changed.notify_all()
                if not self._begun:
                    self._begun = True
                    self._begin()
                    atexit.register(self.close)
        if not accepted:
            self._dropped(len(batch.addresses), batch.num_bytes, "write-behind queue full")
        return accepted

    @abc.abstractmethod
    def flush(self, timeout_s: float | None = None) -> bool: ...

    @abc.abstractmethod
    def close(self, timeout_s: float = 30.0) -> int: ...

    @abc.abstractmethod
    def _begin(self) -> None:
        """Start the writer (called once, holding the queue's lock, at the first batch taken)."""

    def _dropped(self, blocks: int, num_bytes: int, why: str) -> None:
        self.manager.record(TierEvent(TierEventKind.DROPPED, Tier.ENGINE, blocks, num_bytes, why))

    def _left_at_shutdown(self, left: list[StoreBatch]) -> int:
        """Count ``left`` (taken, not written when ``close`` gave up) as dropped; its blocks."""
        blocks = sum(len(batch.addresses) for batch in left)
        if blocks:
            self._dropped(blocks, sum(batch.num_bytes for batch in left), "shutdown")
            logger.warning("zumik kv: %d block(s) not stored before shutdown (tiers too slow)", blocks)
        return blocks


class WriteBehind(StoreQueue):
    """The writer on a thread of this process (``StoreQueue``'s constructor)."""

    _busy = False  # a batch taken off the queue is being written
    _thread: threading.Thread | None = None
    _usage_at = float("-inf")  # when the tiers were last measured

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every batch taken so far is written; False if ``timeout_s`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._busy, timeout=timeout_s)

    def close(self, timeout_s: float = 30.0) -> int:
        """Take no more batches; write what is queued within ``timeout_s``. Returns how many
        blocks were left unwritten (counted as dropped)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        deadline = time.monotonic() + timeout_s
        if self.flush(timeout_s) and self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.0))  # its last measurement
        with self._changed:
            left = list(self._queue)
            self._queue.clear()
            for batch in left:
                self._pending_bytes -= batch.num_bytes
            self._changed.notify_all()
        return self._left_at_shutdown(left)

    def _begin(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zumik-kv-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        move_this_thread(self.cpus)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closed, timeout=self._usage_every_s)
                if not self._queue and self._closed:
                    return
                batch = self._queue.popleft() if self._queue else None
                self._busy = batch is not None
            if batch is not None:
                write_batch(self.manager, batch)
                with self._changed:
                    self._pending_bytes -= batch.num_bytes
                    self._busy = False
                    self._changed.notify_all()
            self._measure()

    def _measure(self) -> None:
        if self._usage_every_s is None:
            return
        now = time.monotonic()
        if now - self._usage_at < self._usage_every_s:
            return
        self._usage_at = now
        try:
            self._usage = tuple(self.manager.usage())
        except Exception:  # occupancy is a metric: never worth the thread
            logger.exception("zumik kv: measuring the tiers failed")


def write_batch(manager: TierManager, batch: StoreBatch) -> None:
    """Encode the batch's blocks, then hand them to ``manager`` at once (each tier written once
    per batch). A bug must not end the writer: what raised is lost, counted."""
    addresses: list[BlockAddress] = []
    values: list[bytes] = []
    sources: list[Tier | None] | None = None if batch.sources is None else []
    for index, address in enumerate(batch.addresses):
        try:
            value = batch.value(index)
        except Exception:
            logger.exception("zumik kv: encoding a block failed")
            manager.record(TierEvent(TierEventKind.FAILURE, Tier.ENGINE, 1, 0, "store raised"))
            continue
        addresses.append(address)
        values.append(value)
        if sources is not None and batch.sources is not None:
            sources.append(batch.sources[index])
    if not addresses:
        return
    try:
        manager.store_many(addresses, values, sources)
    except Exception:
        logger.exception("zumik kv: storing a batch failed")
        manager.record(TierEvent(TierEventKind.FAILURE, Tier.ENGINE, len(addresses), 0, "store raised"))
