"""FolderBudget: a byte budget over the block files of one folder, kept by every process using it.

    <root>/.budget     the ledger: bytes of the folder's block files (decimal text), changed only
                       while the file is locked (``flock``), so every process of the node (engine
                       workers, TP ranks, several engines, the gateway's purge) counts into it

A batch of blocks is stored inside ``admit_many``, which holds the lock while it makes room for
them, charges their sizes and the caller writes the files (so the ledger never misses a block
being written, and no two processes overfill the folder between them): one lock, one read and
one write of the ledger a batch. When the folder would pass ``capacity_bytes``, the least
recently used block files are removed until it fits (never a file of the batch): recency is
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
from collections.abc import Iterator, Sequence
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


@dataclass
class Admission:
    """Room made for a batch of blocks (``FolderBudget.admit_many``): block ``i``'s
    ``reservations[i]`` (None: write nothing), and whether the caller wrote its file."""

    reservations: list[Reservation | None]
    written: list[bool]

    def wrote(self, index: int) -> None:
        """Block ``index``'s file is written: its charge stands."""
        self.written[index] = True


class FolderBudget:
    def __init__(self, root: Path, capacity_bytes: int, pattern: str = "*/*/*/*.kv") -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self._pattern = pattern
        self._candidates: deque[tuple[int, str]] = deque()  # (mtime ns, path), oldest first
        self._fd: int | None = None
        self._lock = threading.Lock()  # this process's threads; flock orders the processes

    @contextlib.contextmanager
    def admit_many(self, blocks: Sequence[tuple[str, int]]) -> Iterator[Admission]:
        """Room for each ``(path, size_bytes)`` (each replacing what is at its path; no path
        twice), made and charged under one lock, held while the caller writes the files in
        the ``with`` block and marks each it wrote (``Admission.wrote``). A block gets None
        when it cannot fit even in an empty folder (nothing is charged for it; write nothing).
        When the block ends, by an exception too, the charge of each file not marked written
        is taken back, and each written file becomes the most recently used block, in order."""
        paths = [path for path, _ in blocks]
        if len(set(paths)) != len(paths):
            raise ValueError("a path is admitted twice in one batch")
        batch = frozenset(paths)
        with self._locked() as fd:
            used = self._ledger(fd)
            reserved = 0  # charged for this batch so far (not on disk yet: a rescan misses it)
            reservations: list[Reservation | None] = []
            for path, size_bytes in blocks:
                reservation = None
                if size_bytes <= self.capacity_bytes:
                    reservation, used = self._reserve(path, size_bytes, used, reserved, batch)
                if reservation is not None:
                    reserved += reservation.delta_bytes
                reservations.append(reservation)
            _write(fd, used)
            admission = Admission(reservations, [False] * len(blocks))
            try:
                yield admission
            finally:
                unwritten = [
                    reservation.delta_bytes
                    for reservation, written in zip(reservations, admission.written, strict=True)
                    if reservation is not None and not written
                ]
                if unwritten:
                    _write(fd, self._ledger(fd) - sum(unwritten))
                for index, (path, _) in enumerate(blocks):
                    if reservations[index] is not None and admission.written[index]:
                        now = time.time_ns()
                        with contextlib.suppress(FileNotFoundError):
                            os.utime(path, ns=(now, now))
                        self._candidates.append((now, path))

    def _reserve(
        self, path: str, size_bytes: int, used: int, reserved: int, batch: frozenset[str]
    ) -> tuple[Reservation | None, int]:
        """Evict least recently used files until ``size_bytes`` fits in ``used`` (the ledger's
        bytes, ``reserved`` of them charged for files of ``batch`` not written yet), then charge
        it (the lock is held): the reservation (None when nothing more can be evicted) and the
        ledger's bytes after it. No file of ``batch`` is evicted."""
        try:
            old = os.stat(path).st_size
        except OSError:  # none there (or no folder: its write fails, refunded)
            old = 0
        delta = size_bytes - old
        evicted = evicted_bytes = 0
        rescanned = False
        while used + delta > self.capacity_bytes:
            if not self._candidates:
                if rescanned:
                    return None, used  # nothing left to evict (the folder holds only this batch)
                used = self._rescan() + reserved
                rescanned = True
                continue
            mtime_ns, candidate = self._candidates.popleft()
            if candidate in batch:
                continue  # charged for, or being replaced: back once written
            try:
                info = os.stat(candidate)
            except FileNotFoundError:
                continue  # evicted or purged by another process
            if info.st_mtime_ns > mtime_ns:
                self._candidates.append((info.st_mtime_ns, candidate))  # used since: recent
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(candidate)
                used -= info.st_size
                evicted += 1
                evicted_bytes += info.st_size
        return Reservation(delta, evicted, evicted_bytes), used + delta

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
        files: list[tuple[int, str]] = []
        total = 0
        for path in self.root.glob(self._pattern):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            files.append((info.st_mtime_ns, str(path)))
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
