"""DiskTier: one file per block, written atomically (temp file, rename), within a byte budget.

    <root>/<compat digest>/<scope>/<key[:2]>/<key>.kv
    <root>/.budget        the bytes its blocks take (``tiers/budget.py``), when it has a budget

Files are 0600 and folders 0700; the root must be this user's (``atomic_file.claim_private_dir``,
checked before the first write), so no other user of the host reads or plants a block.

With ``capacity_bytes``, every process storing under ``root`` keeps it within that many bytes,
removing the least recently used blocks first (a load counts as a use; a process marks a block
used at most once per ``TOUCH_INTERVAL_S``, so recency is that coarse). Without, it grows
unbounded (only the tools and tests that want a plain folder of blocks build it so).

A missing, truncated or unreadable file is a miss plus a failure event, never an exception.
Values are opaque here (safetensors bytes from ``kvstore.codec``, possibly sealed); ``open_block``
hands a restore the file itself, to read an unsealed block straight into the engine's cache.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from kvstore.atomic_file import PRIVATE_FILE_MODE, claim_private_dir, make_private_dirs
from kvstore.keys import ScopeId
from kvstore.tier import BlockAddress, Tier, TierEvent, TierEventKind, TierUsage
from kvstore.tiers.budget import FolderBudget, touch

TOUCH_INTERVAL_S = 1.0  # a block's use is marked on its file at most once per this, per process
TOUCH_MEMO = 1 << 16  # blocks remembered as marked (then forgotten at once: marked again)


class DiskTier:
    tier = Tier.DISK
    durable = True  # its files outlive a power loss: an unsealed block is flushed before its rename

    def __init__(self, root: Path, capacity_bytes: int | None = None) -> None:
        self.root = Path(root)
        self._events: deque[TierEvent] = deque()
        self._root_claimed = False
        self.budget = None if capacity_bytes is None else FolderBudget(self.root, capacity_bytes)
        self.touch_interval_s = TOUCH_INTERVAL_S
        self._touched: dict[tuple[str, str, str], float] = {}  # block -> when marked used (monotonic)
        self._temp_token = secrets.token_hex(4)  # in temporary file names (with pid and thread)

    @property
    def capacity_bytes(self) -> int | None:
        return None if self.budget is None else self.budget.capacity_bytes

    @property
    def used_bytes(self) -> int:
        """The ledger's bytes (0 without a budget: nothing counts them)."""
        if self.budget is None or not self.root.is_dir():
            return 0
        self._claim_root()
        return self.budget.used_bytes()

    def path(self, address: BlockAddress) -> Path:
        return Path(self._path(address))

    def _path(self, address: BlockAddress) -> str:
        key = address.key
        return f"{self.root}/{address.compat_digest}/{address.scope}/{key[:2]}/{key}.kv"

    def contains(self, addresses: Sequence[BlockAddress]) -> list[bool]:
        return [self.holds(address) for address in addresses]

    def holds(self, address: BlockAddress) -> bool:
        """One ``stat`` of the block's file (``LocalLookups``); not a use (no LRU mark)."""
        return os.path.isfile(self._path(address))

    def load(self, address: BlockAddress) -> bytes | None:
        return self.load_many([address])[0]

    def load_many(self, addresses: Sequence[BlockAddress]) -> list[bytes | None]:
        values: list[bytes | None] = []
        for address in addresses:
            path = self.path(address)
            try:
                values.append(path.read_bytes())
            except FileNotFoundError:
                values.append(None)
                continue
            except OSError as exc:
                self._failure(f"read: {exc.strerror}")
                values.append(None)
                continue
            if self.budget is not None and self._due(address):
                touch(path)  # most recently used, for every process's LRU
        return values

    def open_block(self, address: BlockAddress) -> int | None:
        """A read-only file descriptor of the block's file (the caller closes it), so that a
        restore reads it straight into place (``codec.BlockSink.read_file``); None on a miss or
        a failure. Counts as a use, like ``load``."""
        try:
            fd = os.open(self._path(address), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._failure(f"read: {exc.strerror}")
            return None
        if self.budget is not None and self._due(address):
            now = time.time_ns()
            with contextlib.suppress(OSError):
                os.utime(fd, ns=(now, now))  # most recently used, for every process's LRU
        return fd

    def _due(self, address: BlockAddress) -> bool:
        """Whether a use of ``address`` is to be marked on its file now: not when this process
        marked it less than ``touch_interval_s`` ago (the file's mtime is at least that mark:
        only a store, setting it to its own now, changes it otherwise). Recency is then that
        coarse, like Redis' LRU clock (1 s), and a restore of recent blocks writes no inode."""
        now = time.monotonic()
        key = (address.compat_digest, address.scope, address.key)
        last = self._touched.get(key)
        if last is not None and now - last < self.touch_interval_s:
            return False
        if len(self._touched) >= TOUCH_MEMO:
            self._touched.clear()
        self._touched[key] = now
        return True

    def store(self, address: BlockAddress, value: bytes) -> bool:
        return self.store_many([(address, value)])[0]

    def store_many(self, blocks: Sequence[tuple[BlockAddress, bytes]], *, sealed: bool = False) -> list[bool]:
        """Write each block's file (``_write_file``: atomic; flushed to the disk unless
        ``sealed`` or in RAM) within the budget, room for the whole batch made under one lock
        of it (``FolderBudget.admit_many``); whether each was stored. A block twice in the
        batch is written once, with its last value."""
        try:
            self._claim_root()
        except OSError as exc:
            self._failure(f"write: {exc.strerror or exc}", len(blocks))
            return [False] * len(blocks)
        sync = self.durable and not sealed
        # a block twice in one batch: its last value is written, and answers for both
        block_paths = [self._path(address) for address, _ in blocks]
        last = {path: index for index, path in enumerate(block_paths)}
        paths = list(last)
        values = [blocks[index][1] for index in last.values()]
        written = [False] * len(paths)
        evicted = evicted_bytes = 0
        if self.budget is None:
            for index, path in enumerate(paths):
                written[index] = self._write(path, values[index], sync)
        else:
            try:
                sizes = [(path, len(value)) for path, value in zip(paths, values, strict=True)]
                with self.budget.admit_many(sizes) as admission:
                    for index, reservation in enumerate(admission.reservations):
                        if reservation is None:
                            continue  # larger than the whole budget
                        written[index] = self._write(paths[index], values[index], sync)
                        if written[index]:
                            admission.wrote(index)
                            evicted += reservation.evicted_blocks
                            evicted_bytes += reservation.evicted_bytes
            except OSError as exc:  # the ledger, or making room: what was not written is not stored
                self._failure(f"write: {exc.strerror or exc}", written.count(False))
        if evicted:
            self._events.append(TierEvent(TierEventKind.EVICTION, self.tier, evicted, evicted_bytes, "lru"))
        done = dict(zip(paths, written, strict=True))
        return [done[path] for path in block_paths]

    def _write(self, path: str, value: bytes, sync: bool) -> bool:
        """``_write_file``; False (a failure event) when it raised ``OSError``."""
        try:
            self._write_file(path, value, sync=sync)
        except OSError as exc:
            self._failure(f"write: {exc.strerror or exc}")
            return False
        return True

    def _write_file(self, path: str, value: bytes, *, sync: bool) -> None:
        """Write ``value`` to a temporary file beside ``path`` (0600; named after this process,
        tier and thread, so no two writers share one), then rename it into place: a reader sees no
        file or a whole one, and a process that dies meanwhile leaves at most a temporary file.

        ``sync`` flushes the file to the disk before the rename. Without it a power loss can
        leave a renamed file whose bytes never reached the disk (zeros, or only a prefix), and
        an unsealed block's checks (its header and sizes) would not catch a prefix followed by
        zeros. It is skipped where it guards nothing: for sealed values, whose AES-GCM tag fails
        on any such file (a miss: the block is recomputed), and in the host tier, which is RAM
        (a power loss takes every block with it). Each fsync of a block cost about 0.3 ms of
        CPU and 1 ms of waiting on this machine's disk."""
        folder, _, name = path.rpartition("/")
        temp = f"{folder}/.{name}.{os.getpid()}.{self._temp_token}.{threading.get_ident()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, PRIVATE_FILE_MODE)
        except FileNotFoundError:  # a new folder, or one a purge removed
            make_private_dirs(Path(folder))
            fd = os.open(temp, flags, PRIVATE_FILE_MODE)
        try:
            try:
                os.fchmod(fd, PRIVATE_FILE_MODE)  # whatever the umask
                view = memoryview(value)
                while view:
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def remove(self, addresses: Sequence[BlockAddress]) -> int:
        removed = removed_bytes = 0
        for address in addresses:
            path = self.path(address)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            removed_bytes += size
        self._refund(removed_bytes)
        return removed

    def remove_scopes(self, scopes: Sequence[ScopeId]) -> int:
        return sum(self.remove_scope(scope) for scope in scopes)  # a folder per scope: no listing to share

    def remove_scope(self, scope: ScopeId) -> int:
        removed = removed_bytes = 0
        if not self.root.is_dir():
            return 0
        for folder in self.root.glob(f"*/{scope}"):
            for path in folder.glob("*/*.kv"):
                removed += 1
                with contextlib.suppress(FileNotFoundError):
                    removed_bytes += path.stat().st_size
            shutil.rmtree(folder)
        self._refund(removed_bytes)
        return removed

    def take_events(self) -> list[TierEvent]:
        events: list[TierEvent] = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def usage(self) -> TierUsage | None:
        if self.budget is None:
            return None
        try:
            return TierUsage(self.tier, self.used_bytes, self.budget.capacity_bytes)
        except OSError:
            return None

    def _claim_root(self) -> None:
        if not self._root_claimed:
            claim_private_dir(self.root)
            self._root_claimed = True

    def _refund(self, num_bytes: int) -> None:
        if self.budget is not None and num_bytes and self.root.is_dir():
            self._claim_root()
            self.budget.refund(num_bytes)

    def _failure(self, reason: str, num_blocks: int = 1) -> None:
        self._events.append(TierEvent(TierEventKind.FAILURE, self.tier, num_blocks, 0, reason))
