"""A batch of blocks is stored with each tier written once (issue 15: the store path's CPU).

Invariants held here, on real redis-servers (the KV user's ACL) and real files:
- a batch is one Redis round trip (one script, one SET per value), and counts a scope's bytes
  and applies its limit exactly as the same stores one after another would: a block over the
  limit in the middle of a batch is refused (never readable), the blocks around it are stored;
- a refused or stored block leaves no incoming value behind; a block keeps the tier's TTL (or
  none when the tier has none); a server that lost its scripts (restarted) still stores;
- a block is sealed once for every persistent tier: Redis and disk hold the same bytes, and
  each opens them on its own;
- nothing of a purged scope is written, even in the middle of a batch of other scopes;
- the write-behind thread hands a batch to the tiers at once; a block it cannot encode is lost
  alone (counted);
- an unsealed block file is flushed to its disk before its rename; a sealed one (its tag
  catches a torn file) and the host tier's (RAM) are not;
- a file tier takes its budget's lock once a batch and keeps the ledger exact: least recently
  used blocks are evicted first, never a block of the batch itself (a rescan in the middle of
  a batch counts the blocks it charged for), a write that fails is refunded, a block twice in
  a batch is written once;
- ``encode_block`` writes the safetensors header itself: safetensors' reader loads its values,
  and blocks written by safetensors' writer (stored before) decode the same; every block of a
  layout has the same header but for its key;
- commands packed here carry large values as they are (never copied); their replies come back
  in order, an error reply as a value, and a cut connection is replaced.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from kvstore.codec import CHECKSUM_BYTES, FORMAT, checksum, decode_block, encode_block, header_length
from kvstore.keys import BlockKey, ScopeId
from kvstore.manager import TierManager
from kvstore.sealing import ScopedSealer
from kvstore.tier import BlockAddress, Tier, TierEventKind
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_keyring import RedisKeyring
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.resp import INLINE_BYTES, pack_commands, send_commands
from kvstore.tiers.shared_memory import SharedMemoryTier
from kvstore.write_behind import StoreBatch, WriteBehind
from tests.support.kv_redis import kv_client, state_and_kv
from zumik_serve.store.local_redis import LocalRedis

COMPAT = "c" * 64
A = ScopeId("aaaaaaaaaaaaaaaa")
B = ScopeId("bbbbbbbbbbbbbbbb")


def _address(index: int, scope: ScopeId = A) -> BlockAddress:
    return BlockAddress(COMPAT, BlockKey(f"{index:032x}"), scope)


def _value(address: BlockAddress, size: int = 4096) -> bytes:
    tensors = {"kv": np.frombuffer(np.random.default_rng(int(address.key, 16)).bytes(size), np.uint8)}
    return encode_block(tensors, address)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRedis, LocalRedis]]:
    """A state Redis (data keys) and a KV Redis (blocks), with the users ``zumik serve`` makes."""
    with state_and_kv(tmp_path_factory, kv_maxmemory_bytes=64 << 20) as servers:
        yield servers


def _admin(server: LocalRedis) -> redis.Redis:
    admin = redis.Redis.from_url(server.admin_url)
    admin.flushall()
    admin.config_resetstat()
    return admin


def _calls(admin: redis.Redis) -> dict[str, int]:
    return {
        name.removeprefix("cmdstat_"): stats["calls"] for name, stats in admin.info("commandstats").items()
    }


@pytest.mark.redis
def test_a_batch_is_one_round_trip_counted_as_stores_one_after_another(servers: Any) -> None:
    _, kv = servers
    admin = _admin(kv)
    sizes = [1000, 3000, 2000, 1500]
    limit = 1000 + 3000 + 1500 + 100  # the third block would pass it; the fourth fits again
    tier = RedisTier(kv_client(kv), scope_max_bytes=limit)
    blocks = [(_address(index), bytes([index]) * size) for index, size in enumerate(sizes)]
    assert tier.store_many([(_address(0, B), b"b")]) == [True]  # the script is loaded once, here
    admin.config_resetstat()

    assert tier.store_many(blocks) == [True, True, False, True]
    calls = _calls(admin)
    assert calls["evalsha"] == 1 and calls["set"] == 4  # one script for the batch, its values SET
    assert tier.scope_bytes(A) == 1000 + 3000 + 1500
    assert tier.contains([address for address, _ in blocks]) == [True, True, False, True]
    assert tier.load_many([address for address, _ in blocks]) == [
        blocks[0][1],
        blocks[1][1],
        None,
        blocks[3][1],
    ]
    assert admin.keys("kv:incoming:*") == []  # taken or deleted, none left behind

    # The same blocks again: each replaces itself (counted once), the refused one still is.
    assert tier.store_many(blocks) == [True, True, False, True]
    assert tier.scope_bytes(A) == 1000 + 3000 + 1500
    # One store after another (``store``) gives the same answers and the same count.
    admin.flushall()
    assert [tier.store(address, value) for address, value in blocks] == [True, True, False, True]
    assert tier.scope_bytes(A) == 1000 + 3000 + 1500


@pytest.mark.redis
def test_a_batch_counts_each_scope_against_its_own_limit(servers: Any) -> None:
    state, kv = servers
    _admin(kv)
    redis.Redis.from_url(state.admin_url).set(f"kv:limit:{B}", "2500")  # B's own limit
    tier = RedisTier(kv_client(kv), scope_max_bytes=None, limits=kv_client(state))
    blocks = [(_address(index, scope), b"x" * 1000) for index in range(3) for scope in (A, B)]

    assert tier.store_many(blocks) == [True, True, True, True, True, False]
    assert (tier.scope_bytes(A), tier.scope_bytes(B)) == (3000, 2000)


@pytest.mark.redis
def test_stored_blocks_keep_the_tiers_ttl_or_none(servers: Any) -> None:
    _, kv = servers
    admin = _admin(kv)
    expiring, lasting = RedisTier(kv_client(kv), ttl_s=600), RedisTier(kv_client(kv), ttl_s=None)
    assert expiring.store_many([(_address(0), b"a")]) == [True]
    assert lasting.store_many([(_address(1), b"b")]) == [True]
    assert 590 <= admin.ttl(RedisTier.redis_key(_address(0))) <= 600
    assert admin.ttl(RedisTier.redis_key(_address(1))) == -1  # no TTL, as the tier asked
    assert admin.zscore(f"kv:expiry:{A}", RedisTier.redis_key(_address(0))) is not None


@pytest.mark.redis
def test_a_server_that_lost_its_scripts_still_stores(servers: Any) -> None:
    _, kv = servers
    admin = _admin(kv)
    tier = RedisTier(kv_client(kv))
    assert tier.store_many([(_address(0), b"a")]) == [True]
    admin.script_flush()  # as after a restart
    assert tier.store_many([(_address(1), b"b"), (_address(2), b"c")]) == [True, True]
    assert tier.load_many([_address(1), _address(2)]) == [b"b", b"c"]
    assert tier.scope_bytes(A) == 3 and admin.keys("kv:incoming:*") == []


@pytest.mark.redis
def test_a_sealed_batch_is_sealed_once_and_opens_from_either_tier(servers: Any, tmp_path: Path) -> None:
    state, kv = servers
    _admin(kv)
    keyring = RedisKeyring(kv_client(state), cache_ttl_s=0)
    remote, disk = RedisTier(kv_client(kv)), DiskTier(tmp_path / "disk")
    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    manager = TierManager([host, remote, disk], sealer=ScopedSealer(keyring), keyring=keyring)
    addresses = [_address(index) for index in range(3)]
    values = [_value(address) for address in addresses]

    manager.store_many(addresses, values)
    at_rest = remote.load_many(addresses)
    assert at_rest == disk.load_many(addresses)  # the same nonce and ciphertext: sealed once
    assert all(value is not None and b"zumik-kv-block" not in value for value in at_rest)
    assert host.load_many(addresses) == values  # the host tier holds plain blocks
    stores = {(e.tier, e.num_blocks) for e in manager.take_events() if e.kind is TierEventKind.STORE}
    assert stores == {(Tier.HOST, 3), (Tier.REDIS, 3), (Tier.DISK, 3)}  # one event a tier a batch
    for only in (remote, disk):
        restored = TierManager([only], sealer=ScopedSealer(keyring), keyring=keyring).load_prefix(addresses)
        assert list(restored.values) == values and set(restored.sources) == {only.tier}
        assert all(
            decode_block(value, address) is not None for value, address in zip(values, addresses, strict=True)
        )


@pytest.mark.redis
def test_nothing_of_a_purged_scope_is_written_in_the_middle_of_a_batch(servers: Any, tmp_path: Path) -> None:
    state, kv = servers
    _admin(kv)
    keyring = RedisKeyring(kv_client(state), cache_ttl_s=0)
    tiers = [
        SharedMemoryTier(tmp_path / "shm", 1 << 24),
        RedisTier(kv_client(kv)),
        DiskTier(tmp_path / "disk"),
    ]
    manager = TierManager(tiers, sealer=ScopedSealer(keyring), keyring=keyring)
    keyring.data_key(B, create=True)
    keyring.destroy(B)  # B was purged while its requests were in flight
    addresses = [_address(0, A), _address(0, B), _address(1, A), _address(1, B), _address(2, A)]

    manager.store_many(addresses, [_value(address) for address in addresses])
    for tier in tiers:
        assert tier.contains(addresses) == [True, False, True, False, True], tier.tier
    assert not (tmp_path / "disk" / COMPAT / B).exists() and not (tmp_path / "shm" / COMPAT / B).exists()


def test_only_unsealed_blocks_on_disk_are_flushed_before_their_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(fd), fsync(fd))[1])
    blocks = [(_address(index), _value(_address(index))) for index in range(2)]
    disk, host = DiskTier(tmp_path / "disk", 1 << 24), SharedMemoryTier(tmp_path / "shm", 1 << 24)

    assert disk.store_many(blocks) == [True, True] and len(flushed) == 2
    assert disk.store_many(blocks, sealed=True) == [True, True] and len(flushed) == 2
    assert host.store_many(blocks) == [True, True] and len(flushed) == 2
    assert disk.load_many([address for address, _ in blocks]) == [value for _, value in blocks]
    leftovers = [path.name for path in (tmp_path / "disk").rglob(".*") if path.name != ".budget"]
    assert leftovers == []  # every temporary file was renamed into place


def test_a_batch_recreates_a_folder_a_purge_removed(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk")
    assert disk.store_many([(_address(0), b"a")]) == [True]
    assert disk.remove_scope(A) == 1
    assert disk.store_many([(_address(0), b"a"), (_address(1), b"b")]) == [True, True]
    assert disk.load_many([_address(0), _address(1)]) == [b"a", b"b"]


@pytest.mark.redis
def test_the_writer_hands_each_batch_to_the_tiers_at_once(servers: Any, tmp_path: Path) -> None:
    """One Redis round trip for a batch through the write-behind thread; a block whose value
    cannot be made is lost alone (counted), the rest of its batch is stored."""
    _, kv = servers
    admin = _admin(kv)
    remote = RedisTier(kv_client(kv))
    assert remote.store_many([(_address(0, B), b"b")]) == [True]  # the script is loaded once, here
    manager = TierManager([SharedMemoryTier(tmp_path / "shm", 1 << 24), remote])
    writer = WriteBehind(manager, max_pending_bytes=1 << 20, usage_every_s=None)
    addresses = tuple(_address(index) for index in range(4))

    def value(index: int) -> bytes:
        if index == 2:
            raise ValueError("a block that cannot be encoded")
        return _value(addresses[index])

    admin.config_resetstat()
    assert writer.submit(StoreBatch(addresses, 4 * 4096, value))
    assert writer.flush(timeout_s=60)
    writer.close()
    assert _calls(admin)["evalsha"] == 1
    assert remote.contains(list(addresses)) == [True, True, False, True]
    events = manager.take_events()
    failures = [(e.tier, e.num_blocks) for e in events if e.kind is TierEventKind.FAILURE]
    assert failures == [(Tier.ENGINE, 1)]


# --- the store path's CPU: one budget lock a batch, a header written here, RESP packed here ---


def _files(root: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in root.rglob("*.kv")}


def test_a_batch_takes_the_budget_lock_once_and_evicts_least_recently_used_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskTier(tmp_path / "disk", capacity_bytes=4 * 1000 + 10)
    assert disk.store_many([(_address(index), b"o" * 1000) for index in range(4)]) == [True] * 4
    assert disk.load(_address(0)) is not None  # block 1 is now the least recently used
    locks: list[int] = []
    flock = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (locks.append(op), flock(fd, op))[1])

    assert disk.store_many([(_address(index), b"n" * 1000) for index in (10, 11)]) == [True, True]
    assert locks == [fcntl.LOCK_EX, fcntl.LOCK_UN]  # one lock for the batch
    assert disk.contains([_address(index) for index in (0, 1, 2, 3, 10, 11)]) == [
        True, False, False, True, True, True,
    ]  # fmt: skip
    assert disk.used_bytes == sum(_files(tmp_path / "disk").values()) == 4000
    assert [(e.kind, e.num_blocks, e.num_bytes) for e in disk.take_events()] == [
        (TierEventKind.EVICTION, 2, 2000)
    ]


def test_a_batch_never_evicts_its_own_blocks_and_a_rescan_counts_them(tmp_path: Path) -> None:
    """A process whose view of the folder is empty rescans it in the middle of a batch: the
    blocks it already charged for (not written yet) still count, so the folder stays within its
    budget and the ledger says what is there."""
    root = tmp_path / "disk"
    first = DiskTier(root, capacity_bytes=3 * 1000 + 10)
    assert first.store_many([(_address(index), b"o" * 1000) for index in range(2)]) == [True, True]
    other = DiskTier(root, capacity_bytes=3 * 1000 + 10)  # another process: no candidates known

    assert other.store_many([(_address(index), b"n" * 1000) for index in (10, 11)]) == [True, True]
    held = _files(root)
    assert len(held) == 3 and sum(held.values()) <= 3 * 1000 + 10
    assert other.used_bytes == sum(held.values())
    assert other.contains([_address(10), _address(11)]) == [True, True]
    # a batch larger than the folder: every older block goes, none of its own, the rest refused
    whole = [(_address(index), b"w" * 1000) for index in (20, 21, 22, 23)]
    assert other.store_many(whole) == [True, True, True, False]
    assert set(_files(root)) == {f"{_address(index).key}.kv" for index in (20, 21, 22)}
    assert other.used_bytes == 3000


def test_a_write_that_fails_in_a_batch_is_refunded_and_the_rest_stored(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk", capacity_bytes=1 << 20)
    addresses = [BlockAddress(COMPAT, BlockKey(f"{index:02x}" + "0" * 30), A) for index in range(3)]
    folder = tmp_path / "disk" / COMPAT / A
    folder.mkdir(parents=True)
    (folder / addresses[1].key[:2]).write_bytes(b"")  # a file where the block's folder goes

    assert disk.store_many([(address, b"x" * 1000) for address in addresses]) == [True, False, True]
    assert disk.used_bytes == sum(_files(tmp_path / "disk").values()) == 2000
    failures = [e for e in disk.take_events() if e.kind is TierEventKind.FAILURE]
    assert [e.num_blocks for e in failures] == [1]


def test_a_block_twice_in_a_batch_is_written_once_with_its_last_value(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk", capacity_bytes=1 << 20)
    blocks = [(_address(0), b"a" * 10), (_address(1), b"b" * 20), (_address(0), b"c" * 30)]
    assert disk.store_many(blocks) == [True, True, True]
    assert disk.load_many([_address(0), _address(1)]) == [b"c" * 30, b"b" * 20]
    assert disk.used_bytes == 50


def test_encoded_blocks_are_safetensors_files_and_older_blocks_still_decode() -> None:
    """``encode_block`` writes the safetensors header itself: the value loads with safetensors'
    own reader and decodes; a block written by safetensors' writer (every block stored before)
    decodes the same; a dtype without a name here goes through safetensors' writer."""
    address = _address(7)
    tensors = {
        "model.layers.1.attn": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "model.layers.0.attn": np.arange(5, dtype=np.uint8),
        "half": np.ones(3, dtype=np.float16),
        "flags": np.array([True, False]),
        "scalar": np.array(2.5),
        "empty": np.zeros(0, dtype=np.int64),
        "strided": np.arange(20, dtype=np.int32)[::2],
    }
    value = encode_block(tensors, address)
    loaded = safetensors_load(value[:-CHECKSUM_BYTES])
    decoded = decode_block(value, address)
    assert decoded is not None
    for name, array in tensors.items():
        for got in (loaded[name], decoded[name]):
            assert got.dtype == array.dtype and got.shape == array.shape and (got == array).all(), name
    assert value[-CHECKSUM_BYTES:] == checksum([value[header_length(value) or 0 : -CHECKSUM_BYTES]])
    assert decode_block(value, _address(8)) is None  # another block's address

    metadata = {"format": FORMAT, "compat": address.compat_digest, "key": address.key}
    tensors["strided"] = np.ascontiguousarray(tensors["strided"])  # safetensors' writer wants it so
    body = safetensors_save(tensors, metadata=metadata)
    older = bytes(body) + checksum([memoryview(body)[header_length(body) or 0 :]])
    decoded = decode_block(older, address)
    assert decoded is not None and all((decoded[name] == tensors[name]).all() for name in tensors)

    swapped = {"x": np.arange(3, dtype=">f4")}  # not in native byte order: safetensors' writer
    assert (decode_block(encode_block(swapped, address), address) or {})["x"].tolist() == [0.0, 1.0, 2.0]


def test_blocks_of_one_layout_share_their_header_but_for_the_key() -> None:
    """A restore checks the next block's header by comparing bytes (``KnownHeaders``): the
    header is the same for every block of a layout, with the key in its place."""
    tensors = {f"layer{index}": np.zeros(64, dtype=np.uint8) for index in range(3)}
    heads = []
    for index in range(4):
        value = encode_block(tensors, _address(index))
        head = value[: header_length(value)]
        heads.append(head.replace(_address(index).key.encode(), b"K" * 32))
        assert (header_length(value) or 0) % 8 == 0  # the data starts 8-aligned
    assert len(set(heads)) == 1


def test_commands_are_packed_with_large_values_as_they_are() -> None:
    value = b"v" * (INLINE_BYTES + 1)
    buffers = pack_commands([("SET", "k", value, "EX", 5), ("GET", "k")])
    assert any(buffer is value for buffer in buffers)  # never copied
    assert b"".join(bytes(buffer) for buffer in buffers) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n$2\r\nEX\r\n$1\r\n5\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        % (len(value), value)
    )


@pytest.mark.redis
def test_sent_commands_answer_in_order_with_error_replies_as_values(servers: Any) -> None:
    _, kv = servers
    admin = _admin(kv)
    client = kv_client(kv)
    big = os.urandom(200_000)
    replies = send_commands(client, [("SET", "kv:x", big), ("INCR", "kv:x"), ("GET", "kv:x")])
    assert replies is not None
    assert replies[0] == b"OK" and isinstance(replies[1], redis.ResponseError) and replies[2] == big
    admin.client_kill_filter(_type="normal", skipme=True)  # the pooled connection is cut meanwhile
    assert send_commands(client, [("GET", "kv:x")]) == [big]  # the pool gives a fresh one
    with pytest.raises(redis.ConnectionError):  # cut in the middle of the replies
        send_commands(admin, [("PING",), ("CLIENT", "KILL", "SKIPME", "no", "TYPE", "normal"), ("PING",)])
    assert send_commands(admin, [("GET", "kv:x")]) == [big]
