"""SharedMemoryTier: the host-RAM tier, as files in shared memory (``/dev/shm``).

vLLM runs its scheduler and its model worker in different processes: the scheduler plans what
to load, the worker loads and stores. A dict in one of them is invisible to the other, so the
host tier lives in RAM-backed files both can see. The worker is the only writer; it bounds the
tier's size with an LRU over the files (those left by earlier processes included), removing the
oldest past ``capacity_bytes``. Engines of one node with the same compat key share the folder.
Its files are 0600 in 0700 folders, and an existing folder is used only if this user owns it
(another user could otherwise read blocks there, or plant them).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from kvstore.atomic_file import claim_private_dir
from kvstore.keys import BlockKey, ScopeId
from kvstore.tier import BlockAddress, Tier, TierEvent, TierEventKind
from kvstore.tiers.disk import DiskTier


class SharedMemoryTier(DiskTier):
    tier = Tier.HOST

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        super().__init__(root)
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._written: OrderedDict[BlockAddress, int] = OrderedDict()  # oldest first
        if self.root.exists():  # /dev/shm is shared by every user: adopt only a folder of ours
            claim_private_dir(self.root)
            self._root_claimed = True
        self._adopt_existing()

    def _adopt_existing(self) -> None:
        """Files left by an earlier process (shared memory outlives engines) count too, oldest
        first, so that a restarted engine keeps the tier within its bound."""
        try:
            files = sorted(self.root.glob("*/*/*/*.kv"), key=lambda path: path.stat().st_mtime)
        except OSError:
            return
        for path in files:
            address = BlockAddress(path.parents[2].name, BlockKey(path.stem), ScopeId(path.parents[1].name))
            size = path.stat().st_size
            self._written[address] = size
            self.used_bytes += size

    def load(self, address: BlockAddress) -> bytes | None:
        value = super().load(address)
        if value is not None and address in self._written:
            self._written.move_to_end(address)
        return value

    def store(self, address: BlockAddress, value: bytes) -> bool:
        if len(value) > self.capacity_bytes:
            return False
        evicted = evicted_bytes = 0
        while self._written and self.used_bytes + len(value) > self.capacity_bytes:
            old, size = self._written.popitem(last=False)
            self.path(old).unlink(missing_ok=True)
            self.used_bytes -= size
            evicted += 1
            evicted_bytes += size
        if evicted:
            self._events.append(TierEvent(TierEventKind.EVICTION, self.tier, evicted, evicted_bytes, "lru"))
        if not super().store(address, value):
            return False
        previous = self._written.pop(address, 0)
        self._written[address] = len(value)
        self.used_bytes += len(value) - previous
        return True
