"""HostMemoryTier: a bounded host-RAM tier with a named eviction policy (LRU)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvstore.tier import BlockAddress, Tier, TierEvent, TierEventKind


class HostMemoryTier:
    tier = Tier.HOST

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._blocks: OrderedDict[BlockAddress, bytes] = OrderedDict()  # oldest use first
        self._events: list[TierEvent] = []

    def contains(self, addresses: Sequence[BlockAddress]) -> list[bool]:
        return [address in self._blocks for address in addresses]

    def load(self, address: BlockAddress) -> bytes | None:
        value = self._blocks.get(address)
        if value is not None:
            self._blocks.move_to_end(address)
        return value

    def store(self, address: BlockAddress, value: bytes) -> bool:
        if len(value) > self.capacity_bytes:
            return False
        if address in self._blocks:
            self._blocks.move_to_end(address)
            return True
        evicted = evicted_bytes = 0
        while self.used_bytes + len(value) > self.capacity_bytes:  # LRU eviction
            _, old = self._blocks.popitem(last=False)
            self.used_bytes -= len(old)
            evicted += 1
            evicted_bytes += len(old)
        if evicted:
            self._events.append(TierEvent(TierEventKind.EVICTION, self.tier, evicted, evicted_bytes, "lru"))
        self._blocks[address] = value
        self.used_bytes += len(value)
        return True

    def remove(self, addresses: Sequence[BlockAddress]) -> int:
        removed = 0
        for address in addresses:
            value = self._blocks.pop(address, None)
            if value is not None:
                self.used_bytes -= len(value)
                removed += 1
        return removed

    def take_events(self) -> list[TierEvent]:
        events, self._events = self._events, []
        return events
