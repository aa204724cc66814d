"""SharedMemoryTier: the host-RAM tier, as files in shared memory (``/dev/shm``), bounded per node.

vLLM runs its scheduler and its model worker in different processes: the scheduler plans what
to load, the worker loads and stores. A dict in one of them is invisible to the other, so the
host tier lives in RAM-backed files both can see. Every process of the node that uses the
folder (engine workers, TP ranks, several engines, the gateway's purge) counts into one ledger
in it (``tiers/budget.py``), so ``capacity_bytes`` bounds the node, not each process: the
least recently used blocks, whichever process wrote them, go first. Engines of one node share
the folder (blocks of different compat keys live under their own digest). Its files are 0600
in 0700 folders, and an existing folder is used only if this user owns it (another user could
otherwise read blocks there, or plant them).
"""

from __future__ import annotations

from pathlib import Path

from kvstore.atomic_file import claim_private_dir
from kvstore.tier import Tier
from kvstore.tiers.disk import DiskTier


class SharedMemoryTier(DiskTier):
    tier = Tier.HOST
    durable = False  # RAM: a power loss takes every block with it, so no write is flushed to a disk

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        super().__init__(root, capacity_bytes)
        if self.root.exists():  # /dev/shm is shared by every user: adopt only a folder of ours
            claim_private_dir(self.root)
            self._root_claimed = True
