"""DiskTier: one file per block, written atomically (temp file, fsync, rename).

    <root>/<compat digest>/<scope>/<key[:2]>/<key>.kv

Files are 0600 and folders 0700; the root must be this user's (``atomic_file.claim_private_dir``,
checked before the first write), so no other user of the host reads or plants a block.

A missing, truncated or unreadable file is a miss plus a failure event, never an exception.
Values are opaque here (safetensors bytes from ``kvstore.codec``, possibly sealed).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from kvstore.atomic_file import claim_private_dir, make_private_dirs, write_atomic
from kvstore.keys import ScopeId
from kvstore.tier import BlockAddress, Tier, TierEvent, TierEventKind


class DiskTier:
    tier = Tier.DISK

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._events: list[TierEvent] = []
        self._root_claimed = False

    def path(self, address: BlockAddress) -> Path:
        key = address.key
        return Path(f"{self.root}/{address.compat_digest}/{address.scope}/{key[:2]}/{key}.kv")

    def contains(self, addresses: Sequence[BlockAddress]) -> list[bool]:
        return [self.path(address).is_file() for address in addresses]

    def load(self, address: BlockAddress) -> bytes | None:
        try:
            return self.path(address).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._events.append(TierEvent(TierEventKind.FAILURE, self.tier, 1, 0, f"read: {exc.strerror}"))
            return None

    def store(self, address: BlockAddress, value: bytes) -> bool:
        path = self.path(address)
        try:
            if not self._root_claimed:
                claim_private_dir(self.root)
                self._root_claimed = True
            make_private_dirs(path.parent)
            write_atomic(path, value)
        except OSError as exc:
            reason = f"write: {exc.strerror or exc}"
            self._events.append(TierEvent(TierEventKind.FAILURE, self.tier, 1, 0, reason))
            return False
        return True

    def remove(self, addresses: Sequence[BlockAddress]) -> int:
        removed = 0
        for address in addresses:
            try:
                self.path(address).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def remove_scope(self, scope: ScopeId) -> int:
        removed = 0
        if not self.root.is_dir():
            return 0
        for folder in self.root.glob(f"*/{scope}"):
            removed += sum(1 for _ in folder.glob("*/*.kv"))
            shutil.rmtree(folder)
        return removed

    def take_events(self) -> list[TierEvent]:
        events, self._events = self._events, []
        return events
