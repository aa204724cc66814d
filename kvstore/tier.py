"""Tiers of KV blocks and the one small protocol they share.

    Tier (ordered by distance from the engine; a nearer tier is cheaper to load from)
      ENGINE = 0   vLLM's own prefix cache (tracked, not owned: Zumik never writes it)
      HOST   = 1   bounded host RAM of this node (shared memory)
      REDIS  = 2   shared by every node of a region
      DISK   = 3   safetensors files on local or network disk

A tier stores opaque block values (safetensors bytes, possibly sealed by a ``Sealer``) under a
``(compat digest, scope, block key)`` address; the scope (``keys.scope_id`` of the request's cache
salt) groups a tenant's blocks so that a purge removes them all at once. Every method but
``remove_scope`` and ``remove_scopes`` reports a miss or a failure as a value (None, False) and
never raises for it: a broken tier is a slow path, not a client error.

Each tier is bounded: the host tier by a byte budget per node (``tiers/budget.py``), the disk
tier by a byte budget per folder, the Redis tier by its server's ``maxmemory`` with an LRU
policy (a Redis of its own, apart from tenant state). ``usage`` reports what a tier holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Protocol, runtime_checkable

from kvstore.keys import SHARED_SCOPE, BlockKey, ScopeId


class Tier(IntEnum):
    ENGINE = 0
    HOST = 1
    REDIS = 2
    DISK = 3


class TierEventKind(StrEnum):
    HIT = "hit"
    MISS = "miss"
    LOAD = "load"
    STORE = "store"
    EVICTION = "eviction"
    FAILURE = "failure"
    DROPPED = "dropped"  # a store the write-behind queue had no room for (never reached the tier)


@dataclass(frozen=True)
class TierEvent:
    kind: TierEventKind
    tier: Tier
    num_blocks: int
    num_bytes: int = 0
    detail: str = ""


@dataclass(frozen=True)
class TierUsage:
    """What a tier holds now: ``used_bytes`` of its blocks, against ``capacity_bytes`` (None: no
    bound known to Zumik), and ``evictions`` the tier made since it started counting (for Redis,
    the server's own ``evicted_keys``; None when the tier cannot tell)."""

    tier: Tier
    used_bytes: int
    capacity_bytes: int | None
    evictions: int | None = None


@dataclass(frozen=True)
class BlockAddress:
    compat_digest: str
    key: BlockKey
    scope: ScopeId = SHARED_SCOPE


class TierBackend(Protocol):
    """One tier. Implementations: ``tiers/shared_memory.py``, ``tiers/disk.py``, ``tiers/redis_tier.py``."""

    tier: Tier

    def contains(self, addresses: Sequence[BlockAddress]) -> list[bool]:
        """Which addresses this tier holds now (False for any it cannot answer)."""
        ...

    def load(self, address: BlockAddress) -> bytes | None:
        """The stored value, or None on a miss or a failure."""
        ...

    def load_many(self, addresses: Sequence[BlockAddress]) -> list[bytes | None]:
        """The values of ``addresses`` in order (None for each miss or failure), read in as few
        round trips as the medium allows: one ``MGET`` pipeline for Redis, no per-block
        bookkeeping beyond the read for files."""
        ...

    def store(self, address: BlockAddress, value: bytes) -> bool:
        """Store a value; False when the tier could not (full, unreachable)."""
        ...

    def store_many(self, blocks: Sequence[tuple[BlockAddress, bytes]], *, sealed: bool = False) -> list[bool]:
        """Store each ``(address, value)`` as ``store`` would, in order, in as few round trips
        as the medium allows (one for Redis); whether each was stored. ``sealed``: every value
        is sealed (``Sealer``), so a torn or stale copy never opens, and a file tier may skip
        flushing a file to its disk before renaming it into place (see ``tiers/disk.py``)."""
        ...

    def remove(self, addresses: Sequence[BlockAddress]) -> int:
        """Remove addresses; returns how many were present."""
        ...

    def remove_scope(self, scope: ScopeId) -> int:
        """Remove every block of ``scope`` under every compat key; returns how many were removed.
        Unlike the other methods it raises on failure: a purge must know it did not finish."""
        ...

    def remove_scopes(self, scopes: Sequence[ScopeId]) -> int:
        """``remove_scope`` of each of ``scopes`` (a purge sweeps every salt epoch a tenant has
        had), in one pass over the medium where it has to list what it holds: one ``SCAN`` of
        the Redis keyspace for all of them, not one per scope."""
        ...

    def take_events(self) -> list[TierEvent]:
        """Events since the last call (evictions, failures), oldest first. Safe to call from
        another thread than the one storing (the write-behind thread stores)."""
        ...

    def usage(self) -> TierUsage | None:
        """Occupancy now (it may read a file or ask a server: never call it in an engine
        step), or None when the tier cannot tell."""
        ...


@runtime_checkable
class FileBlocks(Protocol):
    """A tier of one file per block (host, disk) can hand a restore the file, to read an unsealed
    block straight into the engine's cache (``TierManager.restore``)."""

    def open_block(self, address: BlockAddress) -> int | None:
        """A read-only file descriptor of the block's file (the caller closes it); None on a
        miss or a failure. Counts as a use (LRU), like ``load``."""
        ...


@runtime_checkable
class LocalLookups(Protocol):
    """A tier that tells whether it holds a block by a local check (a file's stat), with no round
    trip: the scheduler's walk (``TierManager.plan``) asks it one block at a time, in order, and
    never about a block past the end of the prefix."""

    def holds(self, address: BlockAddress) -> bool:
        """Whether this tier holds ``address`` now (False when it cannot tell)."""
        ...


@runtime_checkable
class ProbesFirst(Protocol):
    """A tier with a round trip (Redis) that can answer for a prompt's blocks in one, and look
    past the first block only when it holds it (``TierManager.plan``)."""

    def contains_if_first(self, addresses: Sequence[BlockAddress]) -> list[bool] | None:
        """``contains(addresses)`` in one round trip, or None when this tier lacks the first
        address (or cannot answer): then no other address was looked up."""
        ...


@runtime_checkable
class ViewLoads(Protocol):
    """A tier that can read a run of blocks into a buffer of its own, reused (Redis: one
    ``MGET`` reply read into it, no object per block)."""

    def load_views(self, addresses: Sequence[BlockAddress]) -> Iterable[memoryview | None]:
        """Like ``load_many``, but views of the tier's buffer, valid until its next call, each
        given as soon as it is read (the caller takes one while the next arrives)."""
        ...


@runtime_checkable
class PreparesRestores(Protocol):
    """A tier with one-time costs for its first restore (Redis: its connection, its reply
    buffer), which it can pay before (``TierManager.prepare_restores``, at the engine's start)."""

    def prepare_restores(self, max_bytes: int) -> None:
        """Get ready for restores of up to ``max_bytes``; never raises for a tier failure."""
        ...


class BlockSink(Protocol):
    """Where a restore puts the blocks it reads (``codec.BlockSink``): each call checks the
    block against its address and the engine's layout, and says whether it took it."""

    def read_file(self, index: int, fd: int, address: BlockAddress) -> int:
        """Block ``index`` from an open file: its value's bytes, or 0 when not taken."""
        ...

    def take(
        self, index: int, value: bytes | memoryview, address: BlockAddress, *, authenticated: bool = False
    ) -> bool:
        """Block ``index`` from its (opened) value in memory; ``authenticated``: a sealed value
        whose tag was just checked (its checksum is then not computed again)."""
        ...

    def take_many(
        self, blocks: Sequence[tuple[int, bytes | memoryview, BlockAddress]], *, parallel: bool = False
    ) -> list[bool]:
        """``take`` of each (index, value, address); their checks and copies on several
        threads when ``parallel``."""
        ...

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's tensors, or 0 when the sink does not know them."""
        ...

    @property
    def takes_whole_blocks(self) -> bool:
        """True when each block lands in one run (a staged restore), not in many small rows."""
        ...

    def take_sealed(self, index: int, opening: Opening, address: BlockAddress) -> int:
        """Block ``index`` decrypted straight into its places (``Opening``): its value's bytes,
        or 0 when not taken (then its places hold none of its bytes)."""
        ...


class Opening(Protocol):
    """A sealed value opened piece by piece, in order (``Sealer.opening``). Nothing read is to
    be trusted before ``verify()`` is True: the tag is checked once every byte was read."""

    size: int  # the plaintext's bytes

    @property
    def remaining(self) -> int: ...

    def read_into(self, out: Any) -> bool:
        """The next ``len(out)`` bytes decrypted into ``out``; False (nothing written) when
        fewer remain."""
        ...

    def verify(self) -> bool: ...


class Sealer(Protocol):
    """Seals values before a persistent tier stores them (e.g. AES-GCM with a per-scope key), so
    that destroying the scope's key erases every copy. ``seal`` returns None when it cannot seal
    now (key store unreachable, the scope's key destroyed): the block is then not stored. ``open``
    returns None for a value it cannot open (wrong key, tampered, key destroyed): a miss, never
    an exception."""

    def seal(self, value: bytes, address: BlockAddress) -> bytes | None: ...

    def open(self, sealed: bytes | memoryview, address: BlockAddress) -> bytes | None: ...

    def open_into(
        self, sealed: bytes | memoryview, address: BlockAddress, out: memoryview
    ) -> memoryview | None:
        """``open``, the plaintext written into ``out`` (``sealing.opened_size`` bytes at
        least) and returned as a view of it; None as ``open`` (``out`` then holds nothing to
        use)."""
        ...

    def opening(self, sealed: bytes | memoryview, address: BlockAddress) -> Opening | None:
        """``sealed`` to open piece by piece (a restore decrypts into the engine's cache); None
        when it cannot be opened (too short, the scope's key destroyed or unreachable)."""
        ...


class Keyring(Protocol):
    """Data keys per isolation scope (``tiers/redis_keyring.py``).

    ``data_key`` returns the scope's key, creating it when ``create`` is set and none exists;
    None when the scope's key was destroyed (purged: nothing may be stored or read under it
    again) or the key store cannot answer. ``is_destroyed`` is True only for a purged scope.
    """

    def data_key(self, scope: ScopeId, *, create: bool) -> bytes | None: ...

    def is_destroyed(self, scope: ScopeId) -> bool: ...
