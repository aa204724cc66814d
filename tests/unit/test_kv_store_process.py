"""The write-behind stores in a child process (``kvstore/store_process.py``, issue 15).

Invariants held here, with real child processes over real files and real redis-servers:
- batches are encoded, sealed and written by the child (tiers built from the connector's
  config), and the tier events it makes reach the parent's ``TierManager.take_events``; the
  tiers' occupancy it measures reaches the parent's ``usage``;
- ``submit`` never waits: while the child is stopped, a batch that does not fit in
  ``max_pending_bytes`` is dropped whole and counted, and what was taken is written once it
  runs again;
- ``close`` waits at most its timeout and counts (and returns) what was not reported written;
- a block the child cannot encode is lost alone (counted); a batch that cannot be handed over
  (it does not pickle) is counted and the writer goes on;
- a child that dies loses what it was sent, counted as dropped; the next batch starts a new
  one; the child dies with its parent;
- the child runs at lower priority than its parent, on the cores it is given.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.codec import decode_block
from kvstore.keys import BlockKey, ScopeId
from kvstore.store_process import StoreProcess
from kvstore.tier import BlockAddress, Tier, TierEventKind
from kvstore.tiers.build import build_manager
from kvstore.write_behind import EncodeBlocks, StoreBatch, Values
from tests.support.kv_redis import state_and_kv
from zumik_serve.store.local_redis import LocalRedis

COMPAT = "c" * 64
A = ScopeId("aaaaaaaaaaaaaaaa")


def _address(index: int) -> BlockAddress:
    return BlockAddress(COMPAT, BlockKey(f"{index:032x}"), A)


def _batch(first: int, count: int, layer_bytes: int = 1024) -> StoreBatch:
    """``count`` new blocks of two layers, as the connector copies them out of the cache."""
    addresses = tuple(_address(index) for index in range(first, first + count))
    blocks = tuple(
        {f"layer{j}": np.full(layer_bytes, index + j, dtype=np.uint8) for j in range(2)}
        for index in range(first, first + count)
    )
    return StoreBatch(addresses, count * 2 * layer_bytes, EncodeBlocks(blocks, addresses))


def _files_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "host_capacity_bytes": 1 << 24,
        "shm_root": str(tmp_path / "shm"),
        "disk_root": str(tmp_path / "disk"),
    }


def _events(writer: StoreProcess, kind: TierEventKind) -> list[tuple[Tier, int]]:
    return [(event.tier, event.num_blocks) for event in writer.manager.take_events() if event.kind is kind]


def _wait_for(condition: Any, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """Pids a test stopped (SIGSTOP): let go again whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_the_child_writes_every_tier_and_its_events_and_occupancy_reach_the_parent(tmp_path: Path) -> None:
    config = _files_config(tmp_path)
    manager = build_manager(config)
    writer = StoreProcess(manager, config, max_pending_bytes=1 << 20, usage_every_s=0.0)
    assert writer.submit(_batch(0, 2))
    promoted = _batch(2, 1)
    value = promoted.value(0)
    assert writer.submit(StoreBatch(promoted.addresses, len(value), Values((value,)), sources=(Tier.DISK,)))
    assert writer.flush(timeout_s=60)
    host, disk = manager.tiers
    assert host.contains([_address(index) for index in range(3)]) == [True, True, True]
    assert disk.contains([_address(index) for index in range(3)]) == [True, True, False]  # a promotion
    restored = manager.load_prefix([_address(0), _address(1)])
    assert [
        block["layer1"][0] for block in map(decode_block, restored.values, restored.addresses) if block
    ] == [
        1,
        2,
    ]
    assert sorted(_events(writer, TierEventKind.STORE)) == [(Tier.HOST, 1), (Tier.HOST, 2), (Tier.DISK, 2)]
    assert any(usage.tier is Tier.HOST and usage.used_bytes > 0 for usage in writer.usage)
    assert writer.close() == 0
    assert writer.pid is None


def test_a_full_queue_drops_whole_batches_while_the_child_is_stopped(
    tmp_path: Path, stopped: list[int]
) -> None:
    config = _files_config(tmp_path)
    writer = StoreProcess(build_manager(config), config, max_pending_bytes=6 * 2048, usage_every_s=None)
    assert writer.submit(_batch(0, 1)) and writer.flush(timeout_s=60)  # the child is up
    assert writer.pid is not None
    os.kill(writer.pid, signal.SIGSTOP)
    stopped.append(writer.pid)
    started = time.monotonic()
    assert writer.submit(_batch(1, 2))
    assert writer.submit(_batch(3, 4))  # 6 blocks pending: the bound
    assert not writer.submit(_batch(7, 1))  # no room: dropped whole, not waited for
    assert time.monotonic() - started < 10.0  # (a stopped child never made submit wait)
    assert writer.pending_bytes == 6 * 2048
    assert _events(writer, TierEventKind.DROPPED) == [(Tier.ENGINE, 1)]

    os.kill(writer.pid, signal.SIGCONT)
    assert writer.flush(timeout_s=60)
    host = writer.manager.tiers[0]
    assert host.contains([_address(index) for index in range(8)]) == [True] * 7 + [False]
    assert writer.pending_bytes == 0
    assert writer.close() == 0


def test_close_waits_its_timeout_and_counts_what_was_not_written(tmp_path: Path, stopped: list[int]) -> None:
    config = _files_config(tmp_path)
    writer = StoreProcess(build_manager(config), config, max_pending_bytes=1 << 20, usage_every_s=None)
    assert writer.submit(_batch(0, 1)) and writer.flush(timeout_s=60)
    assert writer.pid is not None
    pid = writer.pid
    os.kill(pid, signal.SIGSTOP)
    stopped.append(pid)
    writer.submit(_batch(1, 2))
    writer.submit(_batch(3, 3))
    assert writer.close(timeout_s=0.5) == 5  # sent or queued, never reported written
    assert not writer.submit(_batch(6, 1))  # closed: nothing more is taken
    assert sum(blocks for _, blocks in _events(writer, TierEventKind.DROPPED)) == 6
    assert writer.pending_bytes == 0
    assert _wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid))  # it was stopped for good


def test_a_block_the_child_cannot_encode_is_lost_alone_and_a_batch_that_cannot_be_sent_is_counted(
    tmp_path: Path,
) -> None:
    config = _files_config(tmp_path)
    writer = StoreProcess(build_manager(config), config, max_pending_bytes=1 << 20, usage_every_s=None)
    good = _batch(0, 3)
    assert isinstance(good.value, EncodeBlocks)
    blocks = list(good.value.blocks)
    blocks[1] = {"layer0": "not an array"}  # type: ignore[dict-item]
    assert writer.submit(
        StoreBatch(good.addresses, good.num_bytes, EncodeBlocks(tuple(blocks), good.addresses))
    )
    assert writer.submit(StoreBatch((_address(5),), 10, lambda _: b"value"))  # a lambda does not pickle
    assert writer.submit(_batch(6, 1))  # the writer goes on
    assert writer.flush(timeout_s=60)
    host = writer.manager.tiers[0]
    assert host.contains([_address(index) for index in (0, 1, 2, 5, 6)]) == [True, False, True, False, True]
    assert sorted(_events(writer, TierEventKind.FAILURE)) == [(Tier.ENGINE, 1), (Tier.ENGINE, 1)]
    assert writer.close() == 0


def test_a_dead_child_loses_its_batches_counted_and_the_next_batch_starts_another(
    tmp_path: Path, stopped: list[int]
) -> None:
    config = _files_config(tmp_path)
    writer = StoreProcess(build_manager(config), config, max_pending_bytes=1 << 20, restart_after_s=0.0)
    assert writer.submit(_batch(0, 1)) and writer.flush(timeout_s=60)
    first = writer.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # it takes a batch it never writes
    stopped.append(first)
    assert writer.submit(_batch(1, 2))
    assert _wait_for(lambda: _sent(writer) == 1)
    os.kill(first, signal.SIGKILL)
    assert writer.flush(timeout_s=60)  # lost, not pending forever
    assert (Tier.ENGINE, 2) in _events(writer, TierEventKind.DROPPED)
    assert writer.submit(_batch(3, 1)) and writer.flush(timeout_s=60)
    assert writer.pid not in (None, first)
    assert writer.manager.tiers[0].contains([_address(3)]) == [True]
    assert writer.close() == 0


def test_the_child_runs_below_its_parent_on_the_cores_it_is_given(tmp_path: Path) -> None:
    config = _files_config(tmp_path)
    cpus = frozenset(sorted(os.sched_getaffinity(0))[-1:])
    writer = StoreProcess(build_manager(config), config, max_pending_bytes=1 << 20, cpus=cpus, niceness=5)
    assert writer.submit(_batch(0, 1)) and writer.flush(timeout_s=60)
    assert writer.pid is not None
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, writer.pid) == min(mine + 5, 19)
    assert os.sched_getaffinity(writer.pid) == set(cpus)
    assert writer.close() == 0


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys, numpy as np
        from kvstore.tiers.build import build_manager
        from kvstore.store_process import StoreProcess
        from kvstore.tier import BlockAddress
        from kvstore.write_behind import EncodeBlocks, StoreBatch
        config = {_files_config(tmp_path)!r}
        writer = StoreProcess(build_manager(config), config, max_pending_bytes=1 << 20)
        address = (BlockAddress("c" * 64, "0" * 32),)
        assert writer.submit(StoreBatch(address, 4, EncodeBlocks(({{"l": np.zeros(4)}},), address)))
        assert writer.flush(60)
        print(writer.pid, flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.split()[0])
    assert _wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child))


@pytest.mark.redis
def test_sealed_stores_through_the_child_open_in_the_parent(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Redis and disk as deployed: the child logs in with the password file named by the config
    and seals with the keyring's data key; the parent's tiers open what it wrote."""
    with state_and_kv(tmp_path_factory, kv_maxmemory_bytes=64 << 20) as (state, kv):
        config = _redis_config(state, kv, tmp_path_factory.mktemp("tiers"))
        manager = build_manager(config)
        writer = StoreProcess(manager, config, max_pending_bytes=1 << 20, usage_every_s=0.0)
        assert writer.submit(_batch(0, 2)) and writer.flush(timeout_s=60)
        assert writer.close() == 0
        assert sorted(_events(writer, TierEventKind.STORE)) == [
            (Tier.HOST, 2),
            (Tier.REDIS, 2),
            (Tier.DISK, 2),
        ]
        for backend in manager.tiers:
            alone = type(manager)([backend], sealer=manager.sealer, keyring=manager.keyring)
            restored = alone.load_prefix([_address(0), _address(1)])
            assert [
                decode_block(v, a) is not None
                for v, a in zip(restored.values, restored.addresses, strict=True)
            ] == [
                True,
                True,
            ]
        raw = manager.tiers[1].load_many([_address(0)])[0]
        assert raw is not None and b"layer0" not in raw  # sealed in Redis
        assert {usage.tier for usage in writer.usage} >= {Tier.HOST, Tier.REDIS}


def _redis_config(state: LocalRedis, kv: LocalRedis, root: Path) -> dict[str, Any]:
    access = kv.kv_access
    assert access.password_file is not None
    return {
        "redis_url": access.url,
        "keyring_redis_url": state.kv_access.url,
        "redis_password_file": str(access.password_file),
        "seal": True,
        "host_capacity_bytes": 1 << 24,
        "shm_root": str(root / "shm"),
        "disk_root": str(root / "disk"),
    }


def _sent(writer: StoreProcess) -> int:
    child = writer._child  # noqa: SLF001 (how many batches the child holds unreported)
    return 0 if child is None else len(child.sent)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_the_connector_stores_a_steps_blocks_through_the_process_unless_switched_off(tmp_path: Path) -> None:
    """``wait_for_save`` hands the step's copied-out blocks to the store process (the default),
    which writes the bytes of the step; ``write_behind_process: false`` keeps the thread."""
    pytest.importorskip("vllm")
    import torch

    from kvstore.connector import (
        ZumikConnectorMetadata,
        ZumikKVConnector,
        _Transfer,
        flush_writes,
        shared_writer,
    )
    from kvstore.transfer import BlockCopier
    from kvstore.write_behind import WriteBehind

    config = _files_config(tmp_path)
    caches = {f"layer{j}": torch.randn(16, 2, 8, 32).to(torch.bfloat16) for j in range(2)}
    original = {name: cache[3:5].clone() for name, cache in caches.items()}
    manager = build_manager(config)
    worker = ZumikKVConnector.__new__(ZumikKVConnector)
    meta = ZumikConnectorMetadata(stores=[_Transfer("r", [3, 4], [_address(0), _address(1)])])
    worker.__dict__.update(
        _kv_caches=caches, _copier=BlockCopier(caches, 16), _manager=manager, _writer=None, _extra=config,
        _connector_metadata=meta,
    )  # fmt: skip
    worker.wait_for_save()
    for cache in caches.values():
        cache[3:5].zero_()  # vLLM reuses the blocks once the step ends
    assert isinstance(worker._writer, StoreProcess)
    assert flush_writes(60)
    worker.shutdown()
    restored = manager.load_prefix([_address(0), _address(1)])
    assert restored.num_blocks == 2
    for index, (value, address) in enumerate(zip(restored.values, restored.addresses, strict=True)):
        tensors = decode_block(value, address)
        assert tensors is not None
        for name in caches:
            assert (
                tensors[name].tobytes()
                == original[name][index].contiguous().view(torch.uint8).numpy().tobytes()
            )
    thread_config = {**config, "write_behind_process": "false"}
    assert isinstance(shared_writer(thread_config, build_manager(thread_config)), WriteBehind)
