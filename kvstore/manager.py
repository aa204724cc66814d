"""TierManager: the ordered walk over tiers, promotion of loaded blocks, and the event log.

The walk, for block keys k0, k1, ... of one prompt (continuity is the rule):

    block:    k0     k1     k2     k3     k4
    HOST      ✓      ·      ·      ✓      ✓
    REDIS     ✓      ✓      ·      ✓      ·
    DISK      ·      ✓      ✓      ·      ✓
    source    HOST   REDIS  DISK   HOST   HOST    → prefix of 5 blocks

    with k2 in no tier:                           → prefix of 2 blocks; k3, k4 are not used

Each block comes from the nearest tier that holds it; the first block that no tier holds ends
the prefix, because KV for a later block is only valid after every block before it. A block
that loads but does not decode (truncated, corrupt, sealed with a destroyed key) also ends the
prefix there, with a failure event: the engine recomputes from that point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore.keys import ScopeId
from kvstore.tier import BlockAddress, Keyring, Sealer, Tier, TierBackend, TierEvent, TierEventKind


@dataclass(frozen=True)
class KvPlan:
    """Where each block of the longest restorable prefix comes from."""

    addresses: tuple[BlockAddress, ...]
    sources: tuple[Tier, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.sources)


@dataclass(frozen=True)
class PromoteToNearer:
    """Promotion policy: a block loaded from a far tier is also stored in nearer tiers, up to
    ``nearest`` (HOST by default: the next request on this node restores from RAM)."""

    nearest: Tier = Tier.HOST

    def targets(self, source: Tier, tiers: Sequence[Tier]) -> list[Tier]:
        return [tier for tier in tiers if self.nearest <= tier < source]


@dataclass(frozen=True)
class StoreEverywhere:
    """Store policy: a newly computed block goes to every tier Zumik owns (write-through)."""

    def targets(self, tiers: Sequence[Tier]) -> list[Tier]:
        return [tier for tier in tiers if tier is not Tier.ENGINE]


@dataclass
class TierManager:
    tiers: list[TierBackend]
    sealer: Sealer | None = None
    keyring: Keyring | None = None  # when set, nothing is stored under a destroyed (purged) scope
    persistent: frozenset[Tier] = frozenset({Tier.REDIS, Tier.DISK})
    promotion: PromoteToNearer = field(default_factory=PromoteToNearer)
    storing: StoreEverywhere = field(default_factory=StoreEverywhere)
    _events: list[TierEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tiers = sorted(self.tiers, key=lambda backend: backend.tier)
        self._by_tier = {backend.tier: backend for backend in self.tiers}

    def plan(self, addresses: Sequence[BlockAddress]) -> KvPlan:
        """The longest continuous prefix of ``addresses`` some tier holds, nearest tier first."""
        holdings = {backend.tier: backend.contains(addresses) for backend in self.tiers}
        sources: list[Tier] = []
        for index in range(len(addresses)):
            source = next((backend.tier for backend in self.tiers if holdings[backend.tier][index]), None)
            if source is None:
                break
            sources.append(source)
        for backend in self.tiers:
            hits = sum(1 for source in sources if source is backend.tier)
            if hits:
                self._events.append(TierEvent(TierEventKind.HIT, backend.tier, hits))
        missed = len(addresses) - len(sources)
        if missed and self.tiers:
            self._events.append(TierEvent(TierEventKind.MISS, self.tiers[-1].tier, missed))
        return KvPlan(addresses=tuple(addresses[: len(sources)]), sources=tuple(sources))

    def load(self, plan: KvPlan) -> list[bytes]:
        """Values of the plan's blocks in order; stops at the first block that fails to load."""
        values: list[bytes] = []
        for address, source in zip(plan.addresses, plan.sources, strict=True):
            value = self._read(address, source)
            if value is None:
                self._events.append(TierEvent(TierEventKind.FAILURE, source, 1, 0, "unreadable block"))
                break
            values.append(value)
            self._events.append(TierEvent(TierEventKind.LOAD, source, 1, len(value)))
            for target in self.promotion.targets(source, list(self._by_tier)):
                self._write(address, value, target)
        return values

    def store(self, address: BlockAddress, value: bytes) -> None:
        """Store a newly computed block in every tier the store policy names."""
        for target in self.storing.targets(list(self._by_tier)):
            self._write(address, value, target)

    def remove(self, addresses: Sequence[BlockAddress]) -> dict[Tier, int]:
        return {backend.tier: backend.remove(addresses) for backend in self.tiers}

    def remove_scope(self, scope: ScopeId) -> dict[Tier, int]:
        """Remove every block of ``scope`` from every tier (raises when a tier cannot)."""
        return {backend.tier: backend.remove_scope(scope) for backend in self.tiers}

    def take_events(self) -> list[TierEvent]:
        events = self._events
        for backend in self.tiers:
            events.extend(backend.take_events())
        self._events = []
        return events

    def _read(self, address: BlockAddress, tier: Tier) -> bytes | None:
        value = self._by_tier[tier].load(address)
        if value is not None and tier in self.persistent and self.sealer is not None:
            value = self.sealer.open(value, address)
        return value

    def _write(self, address: BlockAddress, value: bytes, tier: Tier) -> None:
        if self.keyring is not None and self.keyring.is_destroyed(address.scope):
            return  # purged scope: in-flight requests of it must not write blocks back
        stored = value
        if tier in self.persistent and self.sealer is not None:
            sealed = self.sealer.seal(value, address)
            if sealed is None:
                self._events.append(TierEvent(TierEventKind.FAILURE, tier, 1, 0, "cannot seal"))
                return
            stored = sealed
        if self._by_tier[tier].store(address, stored):
            self._events.append(TierEvent(TierEventKind.STORE, tier, 1, len(stored)))
