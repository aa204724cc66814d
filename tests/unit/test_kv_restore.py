"""Restores put blocks straight into the engine's KV cache, and check every block on the way.

Invariants held here, on real tiers (shared memory, disk, a real redis-server), real sealing and
the connector's real copy code (``kvstore.transfer``):
- on vLLM's CPU layout (each block of a layer one contiguous run) a block file is read into
  the cache's own blocks, with no staging buffer; other layouts (physical LBNHC, kernel-split
  blocks) go through staging and one scatter per layer; every way is bit-exact;
- a truncated, extended, foreign or damaged block is refused (a failure event): the restore's
  prefix ends there, unless a farther tier holds an intact copy, which is then used;
- sealed blocks are decrypted straight into their places (``Sealer.opening``: the tag checked
  last, the places wiped when it does not verify; a header that is not the address's is refused
  before any tensor is written), and blocks to promote are opened into one reused buffer
  (``Sealer.open_into``) and come back as owned values equal to what was stored; both give
  exactly what ``open`` gives and nothing for a value that does not authenticate, so a tampered
  block never stays in the cache and the engine recomputes it (nothing counted from it);
- a restore marks each block file used (LRU) at most once per ``touch_interval_s`` per process,
  and the budget's eviction then keeps it over older blocks;
- a Redis restore reads the ``MGET`` reply into one reused buffer (RESP2 and RESP3 clients),
  misses are None, and an error reply leaves the client usable;
- headers checked by one restore are compared as bytes by the next ones (``KnownHeaders``, kept
  by the worker), and a block whose header differs (another key, another shard) is still
  refused; a restore's buffers (plaintext, file reads) are reused by the next restore;
- ``prepare_restores`` (the worker's start) connects to Redis and sizes the reply buffer, so the
  first restore grows nothing; an unreachable Redis makes it a failure event, not an error;
- the connector recomputes from the first block that did not restore.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

import kvstore.codec
import kvstore.manager
from kvstore import hostcopy
from kvstore.codec import KnownHeaders, decode_block, encode_block
from kvstore.keys import BlockKey, ScopeId
from kvstore.manager import Placed, TierManager
from kvstore.sealing import AesGcmSealer, ScopedSealer
from kvstore.tier import BlockAddress, Tier, TierEventKind
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_keyring import RedisKeyring
from kvstore.tiers.redis_tier import MgetReader, RedisTier
from kvstore.tiers.shared_memory import SharedMemoryTier
from kvstore.transfer import BlockCopier
from zumik_serve.store.local_redis import LocalRedis

COMPAT = "d" * 64
SCOPE = ScopeId("0123456789abcdef")
LAYERS, BLOCKS, HEADS, TOKENS, CONTENT = 3, 16, 2, 8, 16
SOURCE_IDS = [3, 9, 1, 12, 6]
TARGET_IDS = [2, 7, 11, 4, 14]


def _addresses(count: int = len(SOURCE_IDS)) -> list[BlockAddress]:
    return [BlockAddress(COMPAT, BlockKey(f"{index:032x}"), SCOPE) for index in range(count)]


def _caches(layout: str, seed: int) -> dict[str, torch.Tensor]:
    """Per layer a ``[B, H, N, C]`` bf16 view over one buffer, as vLLM builds them: ``LBHNC``
    (vLLM's CPU layout: blocks contiguous), ``LBNHC`` (heads inside tokens: not contiguous in
    canonical order) or ``split`` (each manager block two kernel blocks of N/2 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "LBNHC":
        raw = torch.randn((LAYERS, BLOCKS, TOKENS, HEADS, CONTENT), generator=generator).to(torch.bfloat16)
        return {f"layer{index}": raw[index].permute(0, 2, 1, 3) for index in range(LAYERS)}
    raw = torch.randn((LAYERS, BLOCKS, HEADS, TOKENS, CONTENT), generator=generator).to(torch.bfloat16)
    if layout == "split":
        raw = raw.reshape(LAYERS, BLOCKS * 2, HEADS, TOKENS // 2, CONTENT)
    return {f"layer{index}": raw[index] for index in range(LAYERS)}


def _values(caches: dict[str, torch.Tensor], addresses: list[BlockAddress]) -> list[bytes]:
    blocks = BlockCopier(caches, BLOCKS).extract(SOURCE_IDS[: len(addresses)])
    return [encode_block(tensors, address) for tensors, address in zip(blocks, addresses, strict=True)]


def _restore(
    manager: TierManager,
    copier: BlockCopier,
    addresses: list[BlockAddress],
    headers: KnownHeaders | None = None,
) -> Placed:
    """What the connector's ``_restore`` does (``headers``: the worker's, kept across restores)."""
    target = copier.restore_target(TARGET_IDS[: len(addresses)])
    placed = manager.restore(addresses, target.sink(headers))
    target.commit(placed.num_blocks)
    copier.synchronize()
    return placed


def _same_blocks(restored: dict[str, torch.Tensor], original: dict[str, torch.Tensor], count: int) -> bool:
    copier, source = BlockCopier(restored, BLOCKS), BlockCopier(original, BLOCKS)
    got = copier.extract(TARGET_IDS[:count])
    want = source.extract(SOURCE_IDS[:count])
    same = [bool((got[i][name] == want[i][name]).all()) for i in range(count) for name in original]
    return bool(same) and all(same)


@pytest.fixture(scope="module")
def kv_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    server = LocalRedis(data_dir=tmp_path_factory.mktemp("kv"), role="kv", maxmemory_bytes=64 << 20).start()
    yield server
    server.stop()


def _client(server: LocalRedis, protocol: int = 3) -> redis.Redis:
    access = server.kv_access
    assert access.password_file is not None
    return redis.Redis.from_url(access.url, password=access.password_file.read_text(), protocol=protocol)


@pytest.mark.parametrize("tier_kind", ["host", "disk"])
def test_block_files_are_read_into_the_caches_own_blocks(tmp_path: Path, tier_kind: str) -> None:
    original = _caches("LBHNC", seed=1)
    addresses = _addresses()
    values = _values(original, addresses)
    budget = 1 << 24  # both with a budget: a restore marks each block used (LRU)
    tier = (
        SharedMemoryTier(tmp_path / "shm", budget)
        if tier_kind == "host"
        else DiskTier(tmp_path / "d", budget)
    )
    manager = TierManager([tier])
    for address, value in zip(addresses, values, strict=True):
        assert tier.store(address, value)
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    copier = BlockCopier(fresh, BLOCKS)
    for address in addresses:
        os.utime(tier.path(address), ns=(1, 1))
    placed = _restore(manager, copier, addresses)
    assert all(tier.path(address).stat().st_mtime_ns > 1 for address in addresses)  # used now
    assert placed.num_blocks == len(addresses) and set(placed.sources) == {tier.tier}
    assert placed.sizes == tuple(len(value) for value in values) and placed.promote == {}
    assert copier._host.numel() == 0  # no staging: the files went straight into the cache
    assert _same_blocks(fresh, original, len(addresses))
    untouched = [index for index in range(BLOCKS) if index not in TARGET_IDS]
    assert all(not cache[untouched].view(torch.uint8).any() for cache in fresh.values())
    loads = [event for event in manager.take_events() if event.kind is TierEventKind.LOAD]
    assert [(e.tier, e.num_blocks, e.num_bytes) for e in loads] == [(tier.tier, 5, sum(map(len, values)))]


@pytest.mark.parametrize("layout", ["LBNHC", "split"])
@pytest.mark.redis
def test_other_layouts_restore_through_staging_bit_exact(
    tmp_path: Path, kv_redis: LocalRedis, layout: str
) -> None:
    original = _caches(layout, seed=2)
    addresses = _addresses()
    values = _values(original, addresses)
    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    remote = RedisTier(_client(kv_redis))
    for index, (address, value) in enumerate(zip(addresses, values, strict=True)):
        assert (host if index < 2 else remote).store(address, value)  # a run from each tier
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    copier = BlockCopier(fresh, BLOCKS)
    placed = _restore(TierManager([host, remote]), copier, addresses)
    assert placed.sources == (Tier.HOST, Tier.HOST, Tier.REDIS, Tier.REDIS, Tier.REDIS)
    assert copier._host.numel() > 0  # staged, then scattered
    assert _same_blocks(fresh, original, len(addresses))
    assert sorted(placed.promote) == [2, 3, 4]  # Redis blocks go to the host tier: owned values
    assert [placed.promote[index] for index in (2, 3, 4)] == values[2:]


def test_a_damaged_block_ends_the_prefix_unless_a_farther_tier_has_it(tmp_path: Path) -> None:
    original = _caches("LBHNC", seed=3)
    addresses = _addresses()
    values = _values(original, addresses)
    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    for address, value in zip(addresses, values, strict=True):
        assert host.store(address, value)
    host.path(addresses[3]).write_bytes(values[3] + b"\0")  # longer than its header says
    host.path(addresses[4]).write_bytes(values[4][:-1])  # truncated
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    manager = TierManager([host])
    placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses)
    assert placed.num_blocks == 3 and _same_blocks(fresh, original, 3)
    failures = [event for event in manager.take_events() if event.kind is TierEventKind.FAILURE]
    assert sum(event.num_blocks for event in failures) == 2

    # Another block's bytes (after intact ones: a known header only differs by its key) and
    # a damaged header are refused too; a farther tier's intact copies are used instead.
    host.path(addresses[1]).write_bytes(values[0])
    host.path(addresses[2]).write_bytes(values[2].replace(b'"U8"', b'"U9"', 1))
    disk = DiskTier(tmp_path / "disk", 1 << 24)
    for address, value in zip(addresses, values, strict=True):
        assert disk.store(address, value)
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    placed = _restore(TierManager([host, disk]), BlockCopier(fresh, BLOCKS), addresses)
    assert placed.sources == (Tier.HOST, Tier.DISK, Tier.DISK, Tier.DISK, Tier.DISK)
    assert _same_blocks(fresh, original, len(addresses))
    assert sorted(placed.promote) == [1, 2, 3, 4]  # disk blocks are promoted: read as values


def _flipped(value: bytes) -> bytes:
    """``value`` with one byte of its tensors changed: the header (and its size) intact."""
    middle = len(value) // 2
    return value[:middle] + bytes([value[middle] ^ 0x40]) + value[middle + 1 :]


def test_a_sealed_block_is_trusted_on_its_tag_and_an_unsealed_one_on_its_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On vLLM's CPU layout a sealed block is opened whole and then copied like an unsealed
    value; its AES-GCM tag already covered its tensors and their checksum, so the checksum is
    not computed again (as the staged path's ``take_sealed`` never did). The same blocks
    unsealed are checked one checksum each."""
    original = _caches("LBHNC", seed=5)
    addresses = _addresses()
    values = _values(original, addresses)
    hashed: list[str] = []  # the checksums a restore computes, by the function computing them
    digest, checksum = kvstore.codec.xxhash.xxh3_64_digest, kvstore.codec.checksum

    def value_digest(data: Any) -> bytes:
        hashed.append("value")
        return digest(data)

    def file_checksum(parts: Any) -> bytes:
        hashed.append("file")
        return checksum(parts)

    monkeypatch.setattr(kvstore.codec.xxhash, "xxh3_64_digest", value_digest)
    monkeypatch.setattr(kvstore.codec, "checksum", file_checksum)
    _, sealed = _sealed_disk(tmp_path, b"k" * 32, 1 << 24, addresses, values)
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    assert _restore(sealed, BlockCopier(fresh, BLOCKS), addresses).num_blocks == len(addresses)
    assert _same_blocks(fresh, original, len(addresses)) and hashed == []
    plain = DiskTier(tmp_path / "plain", 1 << 24)
    for address, value in zip(addresses, values, strict=True):
        assert plain.store(address, value)
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    assert _restore(TierManager([plain]), BlockCopier(fresh, BLOCKS), addresses).num_blocks == len(addresses)
    assert _same_blocks(fresh, original, len(addresses)) and len(hashed) == len(addresses)


@pytest.mark.redis
def test_an_unsealed_block_whose_tensor_bytes_changed_is_refused_on_every_path(
    tmp_path: Path, kv_redis: LocalRedis
) -> None:
    """Unsealed, only the checksum after the tensors tells a changed byte: a file read straight
    into the cache (host), a file read twice with a known header (its second block), a value
    copied in (Redis), and ``decode_block`` each refuse it; the farther tier's copy is used."""
    original = _caches("LBHNC", seed=8)
    addresses = _addresses()
    values = _values(original, addresses)
    assert decode_block(_flipped(values[0]), addresses[0]) is None
    assert decode_block(values[0], addresses[0]) is not None
    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    client = _client(kv_redis)
    remote = RedisTier(client)
    disk = DiskTier(tmp_path / "disk", 1 << 24)
    for address, value in zip(addresses, values, strict=True):
        assert host.store(address, value) and remote.store(address, value) and disk.store(address, value)
    for index in (0, 2):  # the first file (header parsed) and a later one (header known)
        host.path(addresses[index]).write_bytes(_flipped(values[index]))
    client.set(RedisTier.redis_key(addresses[0]), _flipped(values[0]))
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    manager = TierManager([host, remote, disk])
    placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses)
    assert placed.sources == (Tier.DISK, Tier.HOST, Tier.REDIS, Tier.HOST, Tier.HOST)
    assert _same_blocks(fresh, original, len(addresses))
    failures = [event for event in manager.take_events() if event.kind is TierEventKind.FAILURE]
    assert {(event.tier, event.num_blocks) for event in failures} == {(Tier.HOST, 2), (Tier.REDIS, 1)}


def _sealed_disk(
    tmp_path: Path, key: bytes, capacity: int, addresses: list[BlockAddress], values: list[bytes]
) -> tuple[DiskTier, TierManager]:
    """A disk tier behind a manager that seals with ``key``, holding ``values`` at ``addresses``."""
    disk = DiskTier(tmp_path / "disk", capacity)
    manager = TierManager([disk], sealer=AesGcmSealer(key))
    for address, value in zip(addresses, values, strict=True):
        manager.store(address, value)
    return disk, manager


def test_sealed_blocks_are_opened_then_copied_and_a_tampered_one_is_refused(tmp_path: Path) -> None:
    original = _caches("LBHNC", seed=4)
    addresses = _addresses()
    values = _values(original, addresses)
    disk, manager = _sealed_disk(tmp_path, b"k" * 32, 1 << 24, addresses, values)
    assert disk.load(addresses[0]) != values[0]  # sealed on disk
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses)
    assert placed.num_blocks == len(addresses) and _same_blocks(fresh, original, len(addresses))
    sealed = bytearray(disk.load(addresses[2]) or b"")
    sealed[-20] ^= 1
    disk.path(addresses[2]).write_bytes(bytes(sealed))
    for cache in fresh.values():
        cache.fill_(7.0)
    untouched = {name: torch.full_like(cache, 7.0) for name, cache in fresh.items()}
    copier = BlockCopier(fresh, BLOCKS)
    placed = _restore(manager, copier, addresses)
    assert placed.num_blocks == 2
    # vLLM's CPU layout: the tampered block was opened whole outside the cache, its tag checked
    # there, so no byte of it reached its rows
    refused = copier.extract([TARGET_IDS[2]])[0]
    before = BlockCopier(untouched, BLOCKS).extract([TARGET_IDS[2]])[0]
    assert all(bytes(memoryview(refused[name])) == bytes(memoryview(before[name])) for name in before)


@pytest.mark.redis
@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_restores_read_the_reply_into_one_reused_buffer(kv_redis: LocalRedis, protocol: int) -> None:
    client = _client(kv_redis, protocol)
    tier = RedisTier(client)
    addresses = _addresses(6)
    values = [bytes([index]) * (300_000 + index) for index in range(6)]  # past the first buffer
    tier.remove(addresses)
    for address, value in zip(addresses, values, strict=True):
        if address != addresses[4]:
            assert tier.store(address, value)
    first = list(tier.load_views(addresses))
    assert [None if view is None else bytes(view) for view in first] == [*values[:4], None, values[5]]
    second = list(tier.load_views(addresses[:2]))
    assert [bytes(view or b"") for view in second] == values[:2]
    buffer: Any = second[0]
    assert buffer is not None and buffer.obj is tier._reader._buffer  # reused, not reallocated
    with pytest.raises(redis.ResponseError):  # MGET of no key: an error reply
        list(MgetReader().each(client, []))
    assert client.ping() and client.mget([tier.redis_key(addresses[0])]) == [values[0]]
    assert list(tier.load_views([addresses[3]])) == [memoryview(values[3])]


@pytest.mark.redis
def test_redis_values_are_handed_over_as_they_arrive_and_a_stop_midway_closes_the_connection(
    kv_redis: LocalRedis,
) -> None:
    """A restore takes each value while Redis still sends the next: the first comes before the
    reply's last byte was read (48 values of 1 MiB, more than a socket buffers). A reader
    stopped midway closes its connection, whose unread rest would otherwise answer the pool's
    next command."""
    client = _client(kv_redis)
    tier = RedisTier(client)
    addresses = _addresses(48)
    values = [bytes([index]) * (1 << 20) for index in range(len(addresses))]
    for address, value in zip(addresses, values, strict=True):
        assert tier.store(address, value)
    reply_bytes = len(b"*48\r\n") + sum(len(b"$%d\r\n" % len(value)) + len(value) + 2 for value in values)
    views = tier.load_views(addresses)
    first = next(iter(views))
    assert first is not None and bytes(first) == values[0]
    # the rest still on its way: a socket buffers at most tcp_rmem's 32 MiB here, the reply is 48
    assert tier._reader._filled < reply_bytes
    assert [bytes(view or b"") for view in views] == values[1:]
    assert tier.take_events() == []
    stopped = tier.load_views(addresses)
    assert isinstance(stopped, Generator) and bytes(next(stopped) or b"") == values[0]
    stopped.close()  # the restore stopped here (an exception in the sink)
    assert client.ping() and client.get(RedisTier.redis_key(addresses[1])) == values[1]
    assert [bytes(view or b"") for view in tier.load_views(addresses[:3])] == values[:3]
    tier.remove(addresses)  # 48 MiB out of the module's KV Redis (64 MiB)


@pytest.mark.redis
def test_the_connector_recomputes_from_the_first_block_that_did_not_restore(
    tmp_path: Path, kv_redis: LocalRedis
) -> None:
    pytest.importorskip("vllm")
    from kvstore.connector import ZumikConnectorMetadata, ZumikKVConnector, _Transfer

    original = _caches("LBHNC", seed=5)
    addresses = _addresses()
    values = _values(original, addresses)
    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    remote = RedisTier(_client(kv_redis))
    for index in (0, 1, 3):
        assert host.store(addresses[index], values[index])
    remote.remove([addresses[2]])
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    worker = ZumikKVConnector.__new__(ZumikKVConnector)
    meta = ZumikConnectorMetadata(loads=[_Transfer("r", list(TARGET_IDS), addresses)])
    worker.__dict__.update(
        _kv_caches=fresh, _copier=BlockCopier(fresh, BLOCKS), _manager=TierManager([host, remote]),
        _writer=None, _extra={}, _connector_metadata=meta, _load_errors=set(), _worker_restores={},
        _headers=KnownHeaders(),
    )  # fmt: skip
    worker.start_load_kv(None)  # type: ignore[arg-type]
    assert worker.get_block_ids_with_load_errors() == set(TARGET_IDS[2:])
    report = worker._worker_restores["r"]
    assert report.tiers == {"host": 2} and report.num_bytes == len(values[0]) + len(values[1])
    assert _same_blocks(fresh, original, 2)


def _opened_in_pieces(sealer: Any, sealed: bytes | memoryview, address: BlockAddress) -> bytes | None:
    """``sealed`` opened in three pieces (``Sealer.opening``), or None unless it verifies."""
    opening = sealer.opening(sealed, address)
    if opening is None:
        return None
    pieces = [bytearray(8), bytearray(100), bytearray(opening.size - 108)]
    assert all(opening.read_into(piece) for piece in pieces)
    return b"".join(pieces) if opening.verify() else None


@pytest.mark.redis
def test_open_into_gives_the_bytes_open_gives_and_nothing_that_does_not_authenticate(
    kv_redis: LocalRedis,
) -> None:
    keyring = RedisKeyring(_client(kv_redis))
    address = _addresses(1)[0]
    value = _values(_caches("LBHNC", seed=6), [address])[0]
    for sealer in (AesGcmSealer(b"k" * 32), ScopedSealer(keyring)):
        sealed = sealer.seal(value, address)
        assert sealed is not None
        out = memoryview(bytearray(len(sealed)))
        for given in (sealed, memoryview(bytearray(sealed))):  # bytes, or a view of a tier's buffer
            opened = sealer.open_into(given, address, out)
            assert opened is not None and opened.obj is out.obj  # into the caller's buffer
            assert bytes(opened) == sealer.open(given, address) == value
        for position in (0, 11, 12, len(sealed) // 2, len(sealed) - 1):  # nonce, data, tag
            tampered = bytearray(sealed)
            tampered[position] ^= 1
            assert sealer.open(bytes(tampered), address) is None
            assert sealer.open_into(memoryview(tampered), address, out) is None
        for other in (
            BlockAddress("e" * 64, address.key, address.scope),
            BlockAddress(address.compat_digest, BlockKey("f" * 32), address.scope),
            BlockAddress(address.compat_digest, address.key, ScopeId("fedcba9876543210")),
        ):  # the associated data names the address: another's copy does not open
            assert sealer.open(sealed, other) is None and sealer.open_into(sealed, other, out) is None
        assert sealer.open_into(sealed[:27], address, out) is None  # shorter than nonce and tag
        assert sealer.open_into(sealed, address, out[: len(value) - 1]) is None  # no room
        assert _opened_in_pieces(sealer, sealed, address) == value  # an opening: the same bytes
        for position in (0, 11, 12, len(sealed) // 2, len(sealed) - 1):
            tampered = bytearray(sealed)
            tampered[position] ^= 1
            assert _opened_in_pieces(sealer, memoryview(tampered), address) is None
        assert _opened_in_pieces(sealer, sealed, BlockAddress("e" * 64, address.key, address.scope)) is None
        assert sealer.opening(sealed[:27], address) is None
        opening = sealer.opening(sealed, address)
        assert opening is not None and not opening.read_into(bytearray(len(value) + 1))  # past the end
        assert not opening.verify()  # not every byte read: never verified
    scoped = ScopedSealer(keyring)
    scope = ScopeId("00000000deadbeef")
    mine = BlockAddress(COMPAT, BlockKey("a" * 32), scope)
    sealed = scoped.seal(value, mine)
    assert sealed is not None
    keyring.destroy(scope)  # crypto-erasure: nothing of the scope opens, into a buffer either
    assert scoped.open_into(sealed, mine, memoryview(bytearray(len(sealed)))) is None


def _sealed_tier(kind: str, tmp_path: Path, kv_redis: LocalRedis) -> DiskTier | RedisTier:
    if kind == "disk":
        return DiskTier(tmp_path / "disk", 1 << 24)
    tier = RedisTier(_client(kv_redis))
    tier.remove(_addresses())
    return tier


def _tamper(tier: DiskTier | RedisTier, address: BlockAddress) -> None:
    sealed = bytearray(tier.load(address) or b"")
    sealed[len(sealed) // 2] ^= 1  # a bit of the ciphertext: the tag no longer verifies
    if isinstance(tier, DiskTier):
        tier.path(address).write_bytes(bytes(sealed))
    else:
        tier._redis.set(tier.redis_key(address), bytes(sealed))


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_a_tampered_sealed_block_is_never_written_into_the_cache(
    tmp_path: Path, kv_redis: LocalRedis, kind: str
) -> None:
    original = _caches("LBHNC", seed=7)
    addresses = _addresses()
    values = _values(original, addresses)
    tier = _sealed_tier(kind, tmp_path, kv_redis)
    sealer = AesGcmSealer(b"s" * 32)
    manager = TierManager([tier], sealer=sealer)
    for address, value in zip(addresses, values, strict=True):
        manager.store(address, value)
    assert tier.load(addresses[0]) != values[0]  # sealed in the tier
    _tamper(tier, addresses[2])
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses)
    assert placed.num_blocks == 2 and placed.sizes == (len(values[0]), len(values[1]))
    assert _same_blocks(fresh, original, 2)
    # decrypted into its place and wiped there when its tag did not verify: the tampered
    # block's place in the cache holds none of its bytes (zeros)
    assert all(not cache[TARGET_IDS[2]].view(torch.uint8).any() for cache in fresh.values())
    events = manager.take_events()
    loads = [(e.tier, e.num_blocks, e.num_bytes) for e in events if e.kind is TierEventKind.LOAD]
    assert loads == [(tier.tier, 2, len(values[0]) + len(values[1]))]
    assert [e.num_blocks for e in events if e.kind is TierEventKind.FAILURE] == [1]


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_the_connector_recomputes_a_tampered_sealed_block_and_counts_none_from_it(
    tmp_path: Path, kv_redis: LocalRedis, kind: str
) -> None:
    pytest.importorskip("vllm")
    from kvstore.connector import ZumikConnectorMetadata, ZumikKVConnector, _Transfer

    original = _caches("LBHNC", seed=8)
    addresses = _addresses()
    values = _values(original, addresses)
    tier = _sealed_tier(kind, tmp_path, kv_redis)
    manager = TierManager([tier], sealer=AesGcmSealer(b"c" * 32))
    for address, value in zip(addresses, values, strict=True):
        manager.store(address, value)
    _tamper(tier, addresses[1])
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    worker = ZumikKVConnector.__new__(ZumikKVConnector)
    meta = ZumikConnectorMetadata(loads=[_Transfer("r", list(TARGET_IDS), addresses)])
    worker.__dict__.update(
        _kv_caches=fresh, _copier=BlockCopier(fresh, BLOCKS), _manager=manager,
        _writer=None, _extra={}, _connector_metadata=meta, _load_errors=set(), _worker_restores={},
        _headers=KnownHeaders(),
    )  # fmt: skip
    worker.start_load_kv(None)  # type: ignore[arg-type]
    assert worker.get_block_ids_with_load_errors() == set(TARGET_IDS[1:])  # recomputed
    report = worker._worker_restores["r"]
    assert report.tiers == {kind: 1} and report.num_bytes == len(values[0])
    assert _same_blocks(fresh, original, 1)


def test_sealed_block_files_larger_than_the_read_buffer_restore_bit_exact(tmp_path: Path) -> None:
    heads, tokens, content = 4, 32, 128  # bf16: 32 KiB per layer-block, 96 KiB a block (3 layers)
    generator = torch.Generator().manual_seed(9)
    raw = torch.randn((LAYERS, BLOCKS, heads, tokens, content), generator=generator).to(torch.bfloat16)
    original = {f"layer{index}": raw[index] for index in range(LAYERS)}
    addresses = _addresses()
    values = _values(original, addresses)
    disk, manager = _sealed_disk(tmp_path, b"b" * 32, 1 << 26, addresses, values)
    bigger = BlockCopier(original, BLOCKS).extract([SOURCE_IDS[3]])[0]
    grown = {name: np.concatenate([row, row]) for name, row in bigger.items()}  # 192 KiB
    manager.store(addresses[3], encode_block(grown, addresses[3]))  # not this cache's layout
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses)
    assert placed.num_blocks == 3 and _same_blocks(fresh, original, 3)  # read whole, then refused
    manager.store(addresses[3], values[3])
    disk.path(addresses[4]).write_bytes(b"")  # an empty file: refused, not an error
    placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses)
    assert placed.num_blocks == 4 and _same_blocks(fresh, original, 4)


@pytest.mark.parametrize("tier_kind", ["host", "disk"])
def test_a_restore_marks_a_block_used_once_per_interval_and_the_lru_keeps_it(
    tmp_path: Path, tier_kind: str
) -> None:
    original = _caches("LBHNC", seed=10)
    addresses = _addresses()
    values = _values(original, addresses)
    budget = sum(len(value) for value in values[:3])  # room for three blocks
    tier = (
        SharedMemoryTier(tmp_path / "shm", budget)
        if tier_kind == "host"
        else DiskTier(tmp_path / "d", budget)
    )
    manager = TierManager([tier])
    for address, value in zip(addresses[:3], values[:3], strict=True):
        assert tier.store(address, value)
    copier = BlockCopier({name: torch.zeros_like(cache) for name, cache in original.items()}, BLOCKS)
    tier.touch_interval_s = 3600.0
    assert _restore(manager, copier, addresses[:1]).num_blocks == 1
    marked = tier.path(addresses[0]).stat().st_mtime_ns
    assert marked > tier.path(addresses[2]).stat().st_mtime_ns  # the restore made it the newest
    assert _restore(manager, copier, addresses[:1]).num_blocks == 1
    assert tier.path(addresses[0]).stat().st_mtime_ns == marked  # marked already: no write
    assert tier.store(addresses[3], values[3])  # evicts the least recently used: block 1
    assert tier.contains(addresses[:4]) == [True, False, True, True]
    tier.touch_interval_s = 0.0
    assert _restore(manager, copier, addresses[2:3]).num_blocks == 1
    assert tier.path(addresses[2]).stat().st_mtime_ns > tier.path(addresses[3]).stat().st_mtime_ns
    assert tier.store(addresses[4], values[4])  # now block 0 is the least recently used
    assert tier.contains(addresses) == [False, False, True, True, True]


def test_headers_checked_once_serve_later_restores_and_a_foreign_block_is_still_refused(
    tmp_path: Path,
) -> None:
    original = _caches("LBHNC", seed=11)
    addresses = _addresses()
    values = _values(original, addresses)
    disk = DiskTier(tmp_path / "disk", 1 << 24)
    shm = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    for address, value in zip(addresses, values, strict=True):
        assert disk.store(address, value) and shm.store(address, value)
    headers = KnownHeaders()
    for tier in (shm, disk):
        manager = TierManager([tier])
        for _ in range(2):  # the second restore compares every header with one checked before
            fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
            placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses, headers)
            assert placed.num_blocks == len(addresses) and _same_blocks(fresh, original, len(addresses))
        assert headers.last is not None
        tier.path(addresses[2]).write_bytes(values[1])  # block 1's intact bytes filed as block 2
        fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
        placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses, headers)
        assert placed.num_blocks == 2 and _same_blocks(fresh, original, 2)
        events = manager.take_events()
        assert [(e.tier, e.num_blocks) for e in events if e.kind is TierEventKind.FAILURE] == [(tier.tier, 1)]


def test_a_sealed_restore_reuses_its_buffers_and_a_staged_one_decrypts_into_the_cache(tmp_path: Path) -> None:
    """vLLM's CPU layout: each block is opened whole into one plaintext buffer, reused by every
    block and restore, as the file buffer is. Staged, a block is decrypted
    straight into its run: no plaintext buffer at all."""
    original = _caches("LBHNC", seed=12)
    addresses = _addresses()
    values = _values(original, addresses)
    disk, manager = _sealed_disk(tmp_path, b"b" * 32, 1 << 24, addresses, values)
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    assert _restore(manager, BlockCopier(fresh, BLOCKS), addresses).num_blocks == len(addresses)
    read, opened = manager._file_buffer.view, manager._thread_buffers.opened.view
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    assert _restore(manager, BlockCopier(fresh, BLOCKS), addresses).num_blocks == len(addresses)
    assert manager._file_buffer.view is read and manager._thread_buffers.opened.view is opened
    assert _same_blocks(fresh, original, len(addresses))
    staged = _caches("LBNHC", seed=12)
    staged_values = _values(staged, addresses)
    _, staged_manager = _sealed_disk(tmp_path / "staged", b"b" * 32, 1 << 24, addresses, staged_values)
    fresh = {name: torch.zeros_like(cache) for name, cache in staged.items()}
    assert _restore(staged_manager, BlockCopier(fresh, BLOCKS), addresses).num_blocks == len(addresses)
    assert _same_blocks(fresh, staged, len(addresses))
    assert not hasattr(staged_manager._thread_buffers, "opened")  # decrypted in place
    # block 1's value sealed as block 2 (it authenticates): its header names another key, so it
    # is refused before any of its tensors reaches the cache
    disk.path(addresses[2]).write_bytes(AesGcmSealer(b"b" * 32).seal(values[1], addresses[2]))
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    assert _restore(manager, BlockCopier(fresh, BLOCKS), addresses).num_blocks == 2
    assert all(not cache[TARGET_IDS[2]].view(torch.uint8).any() for cache in fresh.values())


@pytest.mark.redis
def test_prepare_restores_connects_and_sizes_the_reply_buffer_before_the_first_restore(
    kv_redis: LocalRedis,
) -> None:
    original = _caches("LBHNC", seed=13)
    addresses = _addresses()
    values = _values(original, addresses)
    client = _client(kv_redis, protocol=2)
    tier = RedisTier(client)
    for address, value in zip(addresses, values, strict=True):
        assert tier.store(address, value)
    tier = RedisTier(_client(kv_redis, protocol=2))
    manager = TierManager([tier])
    manager.prepare_restores(len(values) * (len(values[0]) + 4096))
    buffer = tier._reader._buffer
    assert len(buffer) >= len(values) * (len(values[0]) + 4096)
    assert tier._redis.connection_pool._created_connections == 1  # connected before any restore
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    assert _restore(manager, BlockCopier(fresh, BLOCKS), addresses).num_blocks == len(addresses)
    assert tier._reader._buffer is buffer  # the reply fit: nothing grew
    assert _same_blocks(fresh, original, len(addresses))
    assert [event.kind for event in manager.take_events()] == [TierEventKind.LOAD]  # no failure
    unreachable = RedisTier(redis.Redis(port=1, socket_connect_timeout=0.5))
    TierManager([unreachable]).prepare_restores(1 << 20)  # no error: a failure event
    assert [e.kind for e in unreachable.take_events()] == [TierEventKind.FAILURE]


@pytest.mark.redis
@pytest.mark.parametrize("tier_kind", ["host", "redis", "disk-sealed", "redis-sealed"])
def test_a_big_staged_restore_runs_on_several_threads_and_still_refuses_a_changed_block(
    tmp_path: Path, kv_redis: LocalRedis, tier_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staged (every CUDA cache), a restore of at least ``PARALLEL_COPY_BYTES`` reads its block
    files (host tier) or checks and copies its values (Redis), and decrypts sealed blocks (disk
    and Redis, as deployed), on ``hostcopy``'s threads: the blocks land bit for bit, and a
    block with one changed byte is still refused. On vLLM's CPU layout the sink weighs
    nothing, so a restore there stays on the engine's thread."""
    assert BlockCopier(_caches("LBHNC", seed=1), BLOCKS).restore_target([0]).sink().block_bytes == 0
    monkeypatch.setattr(kvstore.manager, "PARALLEL_COPY_BYTES", 1)  # these blocks are small
    asked: list[bool] = []
    workers: set[str] = set()

    def spy(work: Any, items: Any, *, parallel: bool, threads: int | None = None) -> list[Any]:
        asked.append(parallel)

        def tracked(item: Any) -> Any:
            workers.add(threading.current_thread().name)
            return work(item)

        return hostcopy.map_blocks(tracked, items, parallel=parallel, threads=2)

    monkeypatch.setattr(kvstore.manager, "map_blocks", spy)  # block files
    monkeypatch.setattr(kvstore.codec, "map_blocks", spy)  # values (``BlockSink.take_many``)
    original = _caches("LBNHC", seed=9)
    addresses = _addresses()
    values = _values(original, addresses)
    tier: SharedMemoryTier | RedisTier | DiskTier
    client = _client(kv_redis)
    if tier_kind == "host":
        tier = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    elif tier_kind == "disk-sealed":
        tier = DiskTier(tmp_path / "disk", 1 << 24)
    else:
        tier = RedisTier(client)
    manager = TierManager([tier], sealer=AesGcmSealer(b"k" * 32) if tier_kind.endswith("sealed") else None)
    manager.store_many(addresses, values)
    stored = tier.load(addresses[3])
    assert stored is not None and (stored != values[3]) == tier_kind.endswith("sealed")
    if isinstance(tier, RedisTier):
        client.set(RedisTier.redis_key(addresses[3]), _flipped(stored))
    else:
        tier.path(addresses[3]).write_bytes(_flipped(stored))
    fresh = {name: torch.zeros_like(cache) for name, cache in original.items()}
    placed = _restore(manager, BlockCopier(fresh, BLOCKS), addresses)
    assert placed.num_blocks == 3 and _same_blocks(fresh, original, 3)
    assert asked == [True] and any(name.startswith("zumik-kv-host") for name in workers), (asked, workers)
    failures = [event for event in manager.take_events() if event.kind is TierEventKind.FAILURE]
    assert [(event.tier, event.num_blocks) for event in failures] == [(tier.tier, 1)]
