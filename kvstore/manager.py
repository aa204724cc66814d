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

The scheduler's ``plan`` walks the same way and stops at the first gap too: a prompt whose
first block no tier holds costs one probe per tier and nothing more (see ``plan``).

Reads are batched: ``load`` reads each run of blocks planned from one tier with one
``load_many`` (one ``MGET`` pipeline for Redis); ``load_prefix`` asks each tier, nearest first,
once for every block the nearer ones did not give, so a restore costs at most one round trip per
tier and no separate ``contains``. ``restore`` (the engine worker's) walks the same way but puts
each block straight into the engine's cache through a ``BlockSink``: an unsealed block file is
read into place (no value in memory), a Redis reply lands in the tier's reused buffer.
Writes (``store``; ``store_many`` for a batch: each tier written once, each block sealed once
for every persistent tier) are meant to run behind the engine step (``write_behind.py``); the
manager itself is thread-safe for one writer thread beside the step's reads.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from kvstore.hostcopy import PARALLEL_COPY_BYTES, map_blocks
from kvstore.keys import ScopeId
from kvstore.tier import (
    BlockAddress,
    BlockSink,
    FileBlocks,
    Keyring,
    LocalLookups,
    PreparesRestores,
    ProbesFirst,
    Sealer,
    Tier,
    TierBackend,
    TierEvent,
    TierEventKind,
    TierUsage,
    ViewLoads,
)


@dataclass(frozen=True)
class KvPlan:
    """Where each block of the longest restorable prefix comes from."""

    addresses: tuple[BlockAddress, ...]
    sources: tuple[Tier, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.sources)


@dataclass(frozen=True)
class Restored:
    """The longest prefix of the asked blocks that loaded and opened: values in order, each with
    the tier it came from."""

    addresses: tuple[BlockAddress, ...]
    values: tuple[bytes, ...]
    sources: tuple[Tier, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Placed:
    """The longest prefix of the asked blocks that a restore put in place (``restore``): each
    block's tier and value bytes, and the owned values of those to promote, by index."""

    addresses: tuple[BlockAddress, ...]
    sources: tuple[Tier, ...]
    sizes: tuple[int, ...]
    promote: dict[int, bytes]

    @property
    def num_blocks(self) -> int:
        return len(self.sources)

    @property
    def num_bytes(self) -> int:
        return sum(self.sizes)


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
        # how plan's walk asks each tier (a runtime protocol check is slow enough to do once)
        self._local = frozenset(backend.tier for backend in self.tiers if isinstance(backend, LocalLookups))
        self._probes_first = frozenset(b.tier for b in self.tiers if isinstance(b, ProbesFirst))
        self._events_lock = threading.Lock()
        # restore's buffer for a block file read whole, reused by every restore (one at a time:
        # the engine worker's step)
        self._file_buffer = _Buffer(memoryview(bytearray(1 << 17)))
        # buffers of each thread that restores (``_thread_buffer``): a sealed block opened
        # whole, and (a big staged restore's threads) a sealed block file read whole; the
        # sealer's key lookups (the keyring, its caches) are taken one at a time
        self._thread_buffers = threading.local()
        self._sealer_lock = threading.Lock()

    def plan(self, addresses: Sequence[BlockAddress], *, record: bool = True) -> KvPlan:
        """The longest continuous prefix of ``addresses`` some tier holds, nearest tier first;
        its hits (per tier) and misses logged as events unless ``record`` is False (then
        ``plan_events`` gives them to the caller, who logs them when they count).

        It runs in the engine's scheduler, on every new request, so it asks no more than the
        rule of continuity needs. It walks the blocks in order, each through the tiers nearest
        first, and stops at the first block that no tier holds. A tier of local checks
        (``LocalLookups``: a file's stat) is asked one block at a time, so never about a block
        past the end of the prefix. A tier with a round trip is asked about the first block
        and, only when it holds it, about every later one in the same round trip
        (``ProbesFirst``); when the walk needs it past a block it lacks, it is asked once more,
        about every block from there. So a prompt whose first block no tier holds costs one
        stat per file tier and one single-key ``EXISTS``; a prefix the host tier holds, no
        round trip; one that only Redis holds, one round trip."""
        plan = self._walk(addresses)
        if record:
            for event in self.plan_events(plan, len(addresses)):
                self.record(event)
        return plan

    def plan_events(self, plan: KvPlan, num_asked: int) -> list[TierEvent]:
        """The events of ``plan`` when ``num_asked`` blocks were asked for: each tier's hits, and
        the blocks past its prefix, missed in the farthest tier."""
        events = []
        for backend in self.tiers:
            hits = sum(1 for source in plan.sources if source is backend.tier)
            if hits:
                events.append(TierEvent(TierEventKind.HIT, backend.tier, hits))
        missed = num_asked - plan.num_blocks
        if missed and self.tiers:
            events.append(TierEvent(TierEventKind.MISS, self.tiers[-1].tier, missed))
        return events

    def _walk(self, addresses: Sequence[BlockAddress]) -> KvPlan:
        sources: list[Tier] = []
        answers: dict[Tier, dict[int, bool]] = {}  # round-trip tiers' answers, by block index
        for index in range(len(addresses)):
            source = next((b.tier for b in self.tiers if self._holds(b, addresses, index, answers)), None)
            if source is None:
                break
            sources.append(source)
        return KvPlan(addresses=tuple(addresses[: len(sources)]), sources=tuple(sources))

    def _holds(
        self,
        backend: TierBackend,
        addresses: Sequence[BlockAddress],
        index: int,
        answers: dict[Tier, dict[int, bool]],
    ) -> bool:
        """Whether ``backend`` holds block ``index`` of ``addresses`` (``plan``'s walk)."""
        if backend.tier in self._local:
            return cast(LocalLookups, backend).holds(addresses[index])
        known = answers.setdefault(backend.tier, {})
        if index not in known:
            if index == 0 and backend.tier in self._probes_first:
                held = cast(ProbesFirst, backend).contains_if_first(addresses)
                known.update(enumerate(held) if held is not None else [(0, False)])
            elif index == 0:
                known[0] = backend.contains(addresses[:1])[0]
            else:
                known.update(enumerate(backend.contains(addresses[index:]), start=index))
        return known[index]

    def load(self, plan: KvPlan) -> list[bytes]:
        """Values of the plan's blocks in order, each run from one tier read at once; stops at
        the first block that fails to load. Loaded blocks are promoted to nearer tiers here (the
        engine's restore uses ``load_prefix`` and promotes behind the step instead)."""
        values: list[bytes] = []
        start = 0
        while start < plan.num_blocks:
            source = plan.sources[start]
            end = start
            while end < plan.num_blocks and plan.sources[end] is source:
                end += 1
            run = plan.addresses[start:end]
            loaded = self._by_tier[source].load_many(run)
            for address, raw in zip(run, loaded, strict=True):
                value = self._open(address, raw, source)
                if value is None:
                    self.record(TierEvent(TierEventKind.FAILURE, source, 1, 0, "unreadable block"))
                    return values
                values.append(value)
                self.record(TierEvent(TierEventKind.LOAD, source, 1, len(value)))
                self.store(address, value, source=source)
            start = end
        return values

    def load_prefix(self, addresses: Sequence[BlockAddress]) -> Restored:
        """The longest prefix of ``addresses`` the tiers give now: each tier, nearest first, is
        asked once (``load_many``) for every block the nearer tiers did not give. Nothing is
        promoted here (``promotions`` names what to store behind the step)."""
        values: list[bytes | None] = [None] * len(addresses)
        sources: list[Tier | None] = [None] * len(addresses)
        for backend in self.tiers:
            wanted = [index for index, value in enumerate(values) if value is None]
            if not wanted:
                break
            loaded = backend.load_many([addresses[index] for index in wanted])
            for index, raw in zip(wanted, loaded, strict=True):
                value = self._open(addresses[index], raw, backend.tier)
                if raw is not None and value is None:
                    self.record(TierEvent(TierEventKind.FAILURE, backend.tier, 1, 0, "unreadable block"))
                values[index], sources[index] = value, (backend.tier if value is not None else None)
        prefix = next((index for index, value in enumerate(values) if value is None), len(values))
        restored = Restored(
            addresses=tuple(addresses[:prefix]),
            values=tuple(value for value in values[:prefix] if value is not None),
            sources=tuple(source for source in sources[:prefix] if source is not None),
        )
        for backend in self.tiers:
            pairs = zip(restored.values, restored.sources, strict=True)
            sizes = [len(value) for value, source in pairs if source is backend.tier]
            if sizes:
                self.record(TierEvent(TierEventKind.LOAD, backend.tier, len(sizes), sum(sizes)))
        return restored

    def restore(self, addresses: Sequence[BlockAddress], sink: BlockSink) -> Placed:
        """``load_prefix`` into ``sink`` (the engine's cache): each tier, nearest first, is
        asked once for every block the nearer ones did not give, and each block it gives goes
        straight to the sink, which checks it. A file tier whose blocks are neither sealed nor
        promoted hands over the files (``FileBlocks``): the sink reads each into place (no
        value in memory); sealed, each file is read into one reused buffer. Redis reads a run
        into its own reused buffer (``ViewLoads``) unless its blocks are promoted. A sealed
        block is decrypted straight into the cache where it lands in one run (staged), opened
        whole into a scratch buffer and taken from there where its places are many rows (vLLM's
        CPU layout; ``_take_sealed``), or, to be promoted, opened into one buffer reused for
        every block (``Sealer.open_into``); either way it is taken only when it authenticates.
        A block the sink refuses is a failure, and a farther tier may still give it. Blocks to
        promote come back as owned values (``Placed.promote``). Where the sink knows its
        blocks' size (a staged restore: every CUDA cache) and the run holds at least
        ``hostcopy.PARALLEL_COPY_BYTES``, files are read, Redis's values checked and copied,
        and sealed blocks decrypted, on several threads (AES-GCM releases the GIL as ``memcpy``
        does); a sealed block file is then read whole into its thread's buffer and decrypted
        from there."""
        count = len(addresses)
        sources: list[Tier | None] = [None] * count
        sizes = [0] * count
        promote: dict[int, bytes] = {}
        tiers = list(self._by_tier)
        for backend in self.tiers:
            wanted = [index for index in range(count) if sources[index] is None]
            if not wanted:
                break
            promoted = bool(self.promotion.targets(backend.tier, tiers))
            sealed = backend.tier in self.persistent and self.sealer is not None
            failures = 0
            # a big restore's reads, checks and copies run on several threads (``hostcopy``)
            parallel = sink.block_bytes * len(wanted) >= PARALLEL_COPY_BYTES
            if isinstance(backend, FileBlocks) and not promoted and (parallel or not sealed):
                reads = [(addresses[index], index) for index in wanted]
                reader = self._open_file_into if sealed else self._read_into
                read = map_blocks(functools.partial(reader, backend, sink), reads, parallel=parallel)
                for index, size in zip(wanted, read, strict=True):
                    if size is None:
                        continue
                    if size:
                        sources[index], sizes[index] = backend.tier, size
                    else:
                        failures += 1
            else:
                asked = [addresses[index] for index in wanted]
                loaded: Iterable[bytes | memoryview | None]
                batch: list[tuple[int, bytes | memoryview, BlockAddress]] = []  # taken after the loop
                sealed_batch: list[tuple[int, BlockAddress, bytes | memoryview]] = []  # opened after it
                reused = False  # each value overwrites the last: taken before the next is read
                if isinstance(backend, ViewLoads) and not promoted:
                    # the tier's buffer, each value as soon as it is in: taken below while the
                    # next one arrives (unless the run goes to threads, after the loop)
                    loaded = backend.load_views(asked)
                elif isinstance(backend, FileBlocks) and not promoted:
                    loaded = _file_values(backend, asked, self._file_buffer)  # into one reused buffer
                    reused = True
                else:
                    loaded = backend.load_many(asked)
                for index, raw in zip(wanted, loaded, strict=True):
                    if raw is None:
                        continue
                    if sealed and not promoted and parallel and not reused:
                        sealed_batch.append((index, addresses[index], raw))
                        continue
                    if sealed and not promoted:
                        # decrypted into the cache (``_take_sealed``): a value that does not
                        # authenticate is never taken, and none of its bytes stay there
                        size = self._take_sealed(sink, index, addresses[index], raw)
                        if not size:
                            failures += 1
                            continue
                        sources[index], sizes[index] = backend.tier, size
                        continue
                    value: bytes | memoryview | None
                    if sealed:
                        # opened into one buffer reused for the run (no fresh plaintext per
                        # block): its owned copy is promoted
                        value = self._open_whole(addresses[index], raw)
                    else:
                        value = raw
                        if not promoted and not reused and parallel:  # valid for the run: on threads
                            batch.append((index, value, addresses[index]))
                            continue
                    if value is None or not sink.take(index, value, addresses[index], authenticated=sealed):
                        failures += 1
                        continue
                    sources[index], sizes[index] = backend.tier, len(value)
                    if promoted:
                        promote[index] = bytes(value)
                taken = sink.take_many(batch, parallel=parallel) if batch else []
                for (index, value, _), took in zip(batch, taken, strict=True):
                    if took:
                        sources[index], sizes[index] = backend.tier, len(value)
                    else:
                        failures += 1
                take_sealed = functools.partial(self._take_sealed_job, sink)
                opened_sizes = map_blocks(take_sealed, sealed_batch, parallel=True) if sealed_batch else []
                for (index, _, _), size in zip(sealed_batch, opened_sizes, strict=True):
                    if size:
                        sources[index], sizes[index] = backend.tier, size
                    else:
                        failures += 1
            if failures:
                self.record(TierEvent(TierEventKind.FAILURE, backend.tier, failures, 0, "unreadable block"))
        prefix = next((index for index, source in enumerate(sources) if source is None), count)
        placed = Placed(
            addresses=tuple(addresses[:prefix]),
            sources=tuple(source for source in sources[:prefix] if source is not None),
            sizes=tuple(sizes[:prefix]),
            promote={index: value for index, value in promote.items() if index < prefix},
        )
        for backend in self.tiers:
            loaded_sizes = [
                size
                for size, source in zip(placed.sizes, placed.sources, strict=True)
                if source is backend.tier
            ]
            if loaded_sizes:
                self.record(TierEvent(TierEventKind.LOAD, backend.tier, len(loaded_sizes), sum(loaded_sizes)))
        return placed

    def prepare_restores(self, max_bytes: int) -> None:
        """Pay each tier's one-time restore costs now (``PreparesRestores``; the engine worker,
        when its caches are registered), for restores of up to ``max_bytes``."""
        for backend in self.tiers:
            if isinstance(backend, PreparesRestores):
                backend.prepare_restores(max_bytes)

    @staticmethod
    def _read_into(backend: FileBlocks, sink: BlockSink, read: tuple[BlockAddress, int]) -> int | None:
        address, index = read
        return TierManager._read_file(backend, address, index, sink)

    @staticmethod
    def _read_file(backend: FileBlocks, address: BlockAddress, index: int, sink: BlockSink) -> int | None:
        """The block's size read into ``sink`` from its file, 0 when refused, None on a miss."""
        fd = backend.open_block(address)
        if fd is None:
            return None
        try:
            return sink.read_file(index, fd, address)
        except OSError:
            return 0
        finally:
            os.close(fd)

    def _open_file_into(
        self, backend: FileBlocks, sink: BlockSink, read: tuple[BlockAddress, int]
    ) -> int | None:
        """A sealed block file read whole into this thread's buffer and decrypted into
        ``sink``: its size, 0 when refused, None on a miss."""
        address, index = read
        fd = backend.open_block(address)
        if fd is None:
            return None
        try:
            value = _read_whole(fd, self._thread_buffer("file"))
        except OSError:
            return 0
        finally:
            os.close(fd)
        return self._take_sealed(sink, index, address, value)

    def _take_sealed_job(self, sink: BlockSink, job: tuple[int, BlockAddress, bytes | memoryview]) -> int:
        index, address, value = job
        return self._take_sealed(sink, index, address, value)

    def promotions(self, restored: Restored) -> list[int]:
        """Indexes of ``restored``'s blocks that the promotion policy stores in a nearer tier."""
        tiers = list(self._by_tier)
        sources = enumerate(restored.sources)
        return [index for index, source in sources if self.promotion.targets(source, tiers)]

    def store(self, address: BlockAddress, value: bytes, *, source: Tier | None = None) -> None:
        """Store a block: a newly computed one (``source`` None) in every tier the store policy
        names; one loaded from ``source`` in the nearer tiers the promotion policy names."""
        self.store_many([address], [value], None if source is None else [source])

    def store_many(
        self,
        addresses: Sequence[BlockAddress],
        values: Sequence[bytes],
        sources: Sequence[Tier | None] | None = None,
    ) -> None:
        """``store`` for a batch (the write-behind thread's): each tier is written once for the
        whole batch (``TierBackend.store_many``: one Redis round trip, one budget lock per
        folder), nearest tier first, and a block goes to persistent tiers sealed once (the
        same sealed bytes to Redis and disk: one nonce, one plaintext, one address; two
        identical copies of a ciphertext reveal nothing more than one). ``sources``: None
        when every block is newly computed, else each block's tier (None: newly computed).
        Nothing is written for a block of a destroyed (purged) scope."""
        tiers = list(self._by_tier)
        destroyed = self._destroyed_scopes(addresses)
        by_tier: dict[Tier, list[tuple[BlockAddress, bytes]]] = {}
        unsealable: dict[Tier, int] = {}
        for index, (address, value) in enumerate(zip(addresses, values, strict=True)):
            if address.scope in destroyed:
                continue  # purged: in-flight requests of it must not write blocks back
            source = None if sources is None else sources[index]
            targets = self.storing.targets(tiers) if source is None else self.promotion.targets(source, tiers)
            sealed: bytes | None = None
            if self.sealer is not None and any(target in self.persistent for target in targets):
                sealed = self.sealer.seal(value, address)
            for target in targets:
                stored: bytes | None = value
                if target in self.persistent and self.sealer is not None:
                    stored = sealed
                if stored is None:
                    unsealable[target] = unsealable.get(target, 0) + 1
                    continue
                by_tier.setdefault(target, []).append((address, stored))
        for target, count in unsealable.items():
            self.record(TierEvent(TierEventKind.FAILURE, target, count, 0, "cannot seal"))
        for backend in self.tiers:
            blocks = by_tier.get(backend.tier)
            if not blocks:
                continue
            sealed_values = backend.tier in self.persistent and self.sealer is not None
            written = backend.store_many(blocks, sealed=sealed_values)
            sizes = [len(value) for (_, value), done in zip(blocks, written, strict=True) if done]
            if sizes:
                self.record(TierEvent(TierEventKind.STORE, backend.tier, len(sizes), sum(sizes)))

    def _destroyed_scopes(self, addresses: Sequence[BlockAddress]) -> set[ScopeId]:
        """The scopes of ``addresses`` whose keys were destroyed (asked once per scope)."""
        if self.keyring is None:
            return set()
        scopes = {address.scope for address in addresses}
        return {scope for scope in scopes if self.keyring.is_destroyed(scope)}

    def usage(self) -> list[TierUsage]:
        """Occupancy of every tier that can tell (reads files or asks servers: not in a step)."""
        return [usage for backend in self.tiers if (usage := backend.usage()) is not None]

    def remove(self, addresses: Sequence[BlockAddress]) -> dict[Tier, int]:
        return {backend.tier: backend.remove(addresses) for backend in self.tiers}

    def remove_scope(self, scope: ScopeId) -> dict[Tier, int]:
        """Remove every block of ``scope`` from every tier (raises when a tier cannot)."""
        return {backend.tier: backend.remove_scopes((scope,)) for backend in self.tiers}

    def take_events(self) -> list[TierEvent]:
        with self._events_lock:
            events, self._events = self._events, []
        for backend in self.tiers:
            events.extend(backend.take_events())
        return events

    def record(self, event: TierEvent) -> None:
        """Add an event of the caller's (the write-behind queue's drops) to the log."""
        with self._events_lock:
            self._events.append(event)

    def _open(self, address: BlockAddress, value: bytes | None, tier: Tier) -> bytes | None:
        if value is not None and tier in self.persistent and self.sealer is not None:
            value = self.sealer.open(value, address)
        return value

    def _take_sealed(
        self, sink: BlockSink, index: int, address: BlockAddress, value: bytes | memoryview
    ) -> int:
        """A sealed value decrypted into ``sink``'s places: its size, or 0.

        Where a block lands in one run (``sink.takes_whole_blocks``: staged, every CUDA cache)
        it is decrypted straight into it (``Sealer.opening``), one call for its tensors. Where
        its places are many small rows (vLLM's CPU layout: one per layer), one call per place
        costs more than the bytes: the block is opened in one call into this thread's scratch
        buffer (the tag checked there, so nothing unauthenticated reaches the cache) and taken
        from it like an unsealed value (in process 1.07-1.45x the rate on 64-128 KiB blocks;
        within noise in ``zumik bench tiers``, docs/benchmarks.md), but for its checksum: the tag
        covered it, as it does in ``take_sealed``. Its places are then never written unless it
        authenticates."""
        assert self.sealer is not None
        if not sink.takes_whole_blocks:
            opened = self._open_whole(address, value)
            if opened is None or not sink.take(index, opened, address, authenticated=True):
                return 0
            return len(opened)
        with self._sealer_lock:  # the key lookup; the decryption below runs unlocked
            opening = self.sealer.opening(value, address)
        return 0 if opening is None else sink.take_sealed(index, opening, address)

    def _thread_buffer(self, use: str) -> _Buffer:
        """This thread's own buffer for ``use``: "file" (a sealed file read whole), "opened" (a
        sealed block opened whole)."""
        buffer: _Buffer | None = getattr(self._thread_buffers, use, None)
        if buffer is None:
            buffer = _Buffer(memoryview(bytearray(1 << 17)))
            setattr(self._thread_buffers, use, buffer)
        return buffer

    def _open_whole(self, address: BlockAddress, value: bytes | memoryview) -> memoryview | None:
        """A sealed value (maybe a view of a tier's buffer) opened in one call into this
        thread's "opened" buffer, grown to fit and reused for every block: a view valid until
        the thread opens the next; None when it does not open. Only restores that open one
        block at a time come here, so the lock (for the key lookup) costs no parallelism."""
        assert self.sealer is not None
        buffer = self._thread_buffer("opened")
        if len(buffer.view) < len(value):  # a value opens to fewer bytes than it has
            buffer.view = memoryview(bytearray(len(value)))
        with self._sealer_lock:
            return self.sealer.open_into(value, address, buffer.view)


@dataclass
class _Buffer:
    """A buffer that grows (a new one: views of the old one may still be read)."""

    view: memoryview


def _file_values(
    backend: FileBlocks, addresses: Sequence[BlockAddress], buffer: _Buffer
) -> Iterator[memoryview | None]:
    """The values of ``addresses``' block files in order (None: a miss; empty: unreadable),
    each read into ``buffer``, reused for the next (a view valid until then): no fresh bytes
    object per block, and no ``fstat`` while the files are no longer than the last one."""
    for address in addresses:
        fd = backend.open_block(address)
        if fd is None:
            yield None
            continue
        try:
            value = _read_whole(fd, buffer)
        except OSError:
            value = buffer.view[:0]
        finally:
            os.close(fd)
        yield value


def _read_whole(fd: int, buffer: _Buffer) -> memoryview:
    """The file ``fd`` read whole into ``buffer`` (grown when too small): a view of its bytes,
    valid until the buffer's next read."""
    read = os.preadv(fd, [buffer.view], 0)
    while read == len(buffer.view):  # it may go on: read it whole
        buffer.view = memoryview(bytearray(max(os.fstat(fd).st_size + 1, 2 * len(buffer.view))))
        read = os.preadv(fd, [buffer.view], 0)
    return buffer.view[:read]
