"""FolderBudget: a byte budget over the block files of one folder, kept by every process using it.

    <root>/.budget     the ledger: bytes of the folder's block files (decimal text), changed only
                       while the file is locked (``flock``), so every process of the node (engine
                       workers, TP ranks, several engines, the gateway's purge) counts into it

A block is stored inside ``admit``, which holds the lock while it makes room, charges the
block's size and the caller writes the file (so the ledger never misses a block being written,
and no two processes overfill the folder between them). When the folder would pass
``capacity_bytes``, the least recently used block files are removed until it fits: recency is
a file's mtime, which a store sets and a load moves to now (``touch``), so a block another
process reads is recent for this one too. Each process keeps the candidates it knows (its last
scan of the folder, then its own stores) oldest first and checks a candidate's mtime before
removing it (a newer one was used meanwhile: it goes to the back); it rescans the folder only
when it has no candidate left, and a rescan also sets the ledger to the bytes really there (a
process killed while writing, or a file removed by hand, is corrected).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvstore.atomic_file import PRIVATE_FILE_MODE

LEDGER = ".budget"
LEDGER_WIDTH = 24


@dataclass(frozen=True)
class Reservation:
    """Room made for one block: ``delta_bytes`` charged to the ledger (the new size minus the
    size of the file it replaces), and what was evicted for it."""

    delta_bytes: int
    evicted_blocks: int
    evicted_bytes: int


class FolderBudget:
    def __init__(self, root: Path, capacity_bytes: int, pattern: str = "*/*/*/*.kv") -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self._pattern = pattern
        self._candidates: deque[tuple[int, Path]] = deque()  # (mtime ns, path), oldest first
        self._fd: int | None = None
        self._lock = threading.Lock()  # this process's threads; flock orders the processes

    @contextlib.contextmanager
    def admit(self, path: Path, size_bytes: int) -> Iterator[Reservation | None]:
        """Room for ``size_bytes`` at ``path`` (replacing what is there), charged, while the
        caller writes the file in the ``with`` block; None when the block cannot fit even in
        an empty folder (nothing is charged; write nothing). An exception in the block takes
        the charge back. Afterwards the file is the most recently used block."""
        if size_bytes > self.capacity_bytes:
            yield None
            return
        with self._locked() as fd:
            reservation = self._reserve(fd, path, size_bytes)
            if reservation is None:
                yield None
                return
            try:
                yield reservation
            except BaseException:
                _write(fd, self._ledger(fd) - reservation.delta_bytes)
                raise
            now = time.time_ns()
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, ns=(now, now))
            self._candidates.append((now, path))

    def _reserve(self, fd: int, path: Path, size_bytes: int) -> Reservation | None:
        """Evict least recently used files until ``size_bytes`` fits, then charge it (the lock
        is held); None when nothing more can be evicted."""
        try:
            old = path.stat().st_size
        except FileNotFoundError:
            old = 0
        delta = size_bytes - old
        used = self._ledger(fd)
        evicted = evicted_bytes = 0
        rescanned = False
        while used + delta > self.capacity_bytes:
            if not self._candidates:
                if rescanned:
                    _write(fd, used)
                    return None  # nothing left to evict (the folder holds only this block)
                used = self._rescan()
                rescanned = True
                continue
            mtime_ns, candidate = self._candidates.popleft()
            if candidate == path:
                continue
            try:
                info = candidate.stat()
            except FileNotFoundError:
                continue  # evicted or purged by another process
            if info.st_mtime_ns > mtime_ns:
                self._candidates.append((info.st_mtime_ns, candidate))  # used since: recent
                continue
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                used -= info.st_size
                evicted += 1
                evicted_bytes += info.st_size
        _write(fd, used + delta)
        return Reservation(delta, evicted, evicted_bytes)

    def refund(self, num_bytes: int) -> None:
        """Take ``num_bytes`` off the ledger (a failed write's reservation, removed blocks)."""
        if num_bytes:
            with self._locked() as fd:
                _write(fd, max(self._ledger(fd) - num_bytes, 0))

    def used_bytes(self) -> int:
        with self._locked() as fd:
            return self._ledger(fd)

    def _ledger(self, fd: int) -> int:
        """The ledger's bytes; a new ledger starts from a scan (blocks may predate it)."""
        used = _read(fd)
        if used is None:
            used = self._rescan()
            _write(fd, used)
        return used

    def _rescan(self) -> int:
        """Every block file of the folder, oldest first, as candidates; the ledger's bytes."""
        files: list[tuple[int, Path]] = []
        total = 0
        for path in self.root.glob(self._pattern):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            files.append((info.st_mtime_ns, path))
            total += info.st_size
        files.sort()
        self._candidates = deque(files)
        return total

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        with self._lock:
            if self._fd is None:
                flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                self._fd = os.open(self.root / LEDGER, flags, PRIVATE_FILE_MODE)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield self._fd
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def touch(path: Path) -> None:
    """Mark a block file used now (its place in every process's LRU)."""
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


def _read(fd: int) -> int | None:
    """The ledger's bytes; None for a new (empty) or damaged ledger."""
    text = os.pread(fd, LEDGER_WIDTH, 0).strip()
    try:
        return max(int(text), 0) if text else None
    except ValueError:
        return None


def _write(fd: int, used_bytes: int) -> None:
    os.pwrite(fd, str(max(used_bytes, 0)).ljust(LEDGER_WIDTH).encode(), 0)
