"""kvstore: compat keys, block keys, tiers and the ordered walk, on real tiers.

Invariants held here:
- every profile field is classified as affecting the compat key or not (a new field fails this);
- block keys agree across processes and differ across compat keys and cache salts;
- the walk takes each block from the nearest tier and stops at the first gap;
- a truncated, corrupt, foreign or undecryptable block is a miss with a failure event, never an
  exception; promotion copies far blocks to nearer tiers; the host tier evicts LRU.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pydantic
import pytest

from kvstore.codec import decode_block, encode_block
from kvstore.compat import PROFILE_FIELD_EFFECTS, FieldEffect, derive_compat_key
from kvstore.keys import chain_block_keys, scope_seed
from kvstore.manager import TierManager
from kvstore.sealing import AesGcmSealer
from kvstore.tier import BlockAddress, Tier, TierEventKind
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.shared_memory import SharedMemoryTier
from profiles import Profile, load_builtin

PROFILE = load_builtin("local-cpu")
COMPAT = derive_compat_key(PROFILE, model_fingerprint="m" * 64, tokenizer_fingerprint="t" * 64)


def _leaf_fields(model: type[pydantic.BaseModel], prefix: str = "") -> set[str]:
    leaves: set[str] = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        candidates = typing.get_args(annotation) or (annotation,)
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, pydantic.BaseModel)]
        if nested:
            leaves |= _leaf_fields(nested[0], f"{prefix}{name}.")
        else:
            leaves.add(f"{prefix}{name}")
    return leaves


def test_every_profile_field_is_classified_for_the_compat_key() -> None:
    assert _leaf_fields(Profile) == set(PROFILE_FIELD_EFFECTS)


@pytest.mark.parametrize("path", sorted(PROFILE_FIELD_EFFECTS))
def test_compat_digest_moves_exactly_with_affecting_fields(path: str) -> None:
    section, _, field = path.rpartition(".")
    samples = {
        "region": "eu-west-1", "engine.device": "cuda", "engine.dtype": "float16",
        "engine.quantization": "fp8", "engine.kv_cache_dtype": "fp8", "engine.block_size": 64,
        "engine.tensor_parallel_size": 2, "engine.pipeline_parallel_size": 2,
        "engine.vllm_args": {"hf_overrides": {"rope_theta": 20000.0}},
    }  # fmt: skip
    if path in ("model.source", "model.tokenizer"):
        key = "model_fingerprint" if path == "model.source" else "tokenizer_fingerprint"
        changed = derive_compat_key(
            PROFILE, **{"model_fingerprint": "m" * 64, "tokenizer_fingerprint": "t" * 64, key: "x" * 64}
        )
        assert changed.digest() != COMPAT.digest()
        return
    if PROFILE_FIELD_EFFECTS[path] is FieldEffect.NEUTRAL:
        return  # neutral fields are not inputs of derive_compat_key at all
    data = PROFILE.model_dump(mode="json")
    target = data[section] if section else data
    target[field] = samples[path]
    if path == "engine.device":
        data["engine"]["gpu_memory_utilization"] = 0.9
    changed = derive_compat_key(
        Profile.model_validate(data), model_fingerprint="m" * 64, tokenizer_fingerprint="t" * 64
    )
    assert changed.digest() != COMPAT.digest(), path


def test_kv_neutral_vllm_args_keep_the_compat_key_and_other_groups_have_their_own() -> None:
    data = PROFILE.model_dump(mode="json")
    data["engine"]["vllm_args"] = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    neutral = derive_compat_key(
        Profile.model_validate(data), model_fingerprint="m" * 64, tokenizer_fingerprint="t" * 64
    )
    assert neutral.digest() == COMPAT.digest()
    data["engine"]["vllm_args"]["calculate_kv_scales"] = True  # not classified: counts
    assert (
        derive_compat_key(
            Profile.model_validate(data), model_fingerprint="m" * 64, tokenizer_fingerprint="t" * 64
        ).digest()
        != COMPAT.digest()
    )
    data = PROFILE.model_dump(mode="json")
    other_engine = {**data["engine"], "block_size": 64}
    data["models"] = [{"model": {"source": "builtin:tiny-b", "served_name": "other"}, "engine": other_engine}]
    two = Profile.model_validate(data)
    fingerprints = {"model_fingerprint": "m" * 64, "tokenizer_fingerprint": "t" * 64}
    assert derive_compat_key(two, **fingerprints).digest() == COMPAT.digest()
    assert derive_compat_key(two, **fingerprints, group=two.model_groups()[1]).block_size == 64


def test_block_keys_agree_across_processes_and_split_by_scope() -> None:
    tokens = list(range(100))
    keys = chain_block_keys(tokens, 32, scope_seed(COMPAT, "salt-a"))
    assert len(keys) == 3  # only full blocks
    code = (
        "from kvstore.keys import chain_block_keys, scope_seed; from kvstore.compat import derive_compat_key;"
        "from profiles import load_builtin;"
        "c = derive_compat_key(load_builtin('local-cpu'), model_fingerprint='m'*64,"
        " tokenizer_fingerprint='t'*64);"
        "print(','.join(chain_block_keys(list(range(100)), 32, scope_seed(c, 'salt-a'))))"
    )
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip().split(",") == keys
    assert chain_block_keys(tokens, 32, scope_seed(COMPAT, "salt-b"))[0] != keys[0]
    assert chain_block_keys(tokens[:64], 32, scope_seed(COMPAT, "salt-a")) == keys[:2]  # prefix property
    assert (
        chain_block_keys([*tokens[:32], 999, *tokens[33:]], 32, scope_seed(COMPAT, "salt-a"))[1:] != keys[1:]
    )


def _address(index: int) -> BlockAddress:
    keys = chain_block_keys(list(range(32 * 8)), 32, scope_seed(COMPAT, "s"))
    return BlockAddress(COMPAT.digest(), keys[index])


def _value(address: BlockAddress, fill: float = 1.0) -> bytes:
    return encode_block({"kv": np.full((4, 2, 32, 8), fill, dtype=np.float32)}, address)


def test_walk_takes_nearest_tier_and_stops_at_first_gap(tmp_path: Path) -> None:
    host, disk = SharedMemoryTier(tmp_path / "shm", 1 << 24), DiskTier(tmp_path / "disk")
    addresses = [_address(i) for i in range(5)]
    for index in (0, 3, 4):
        host.store(addresses[index], _value(addresses[index]))
    for index in (0, 1, 4):
        disk.store(addresses[index], _value(addresses[index]))
    manager = TierManager([disk, host])
    plan = manager.plan(addresses)
    assert plan.sources == (Tier.HOST, Tier.DISK)  # block 2 is nowhere: 3 and 4 are not used
    values = manager.load(plan)
    assert [decode_block(v, a) is not None for v, a in zip(values, plan.addresses, strict=True)] == [
        True,
        True,
    ]
    assert host.contains([addresses[1]]) == [True]  # promoted from disk to host
    kinds = {(e.kind, e.tier) for e in manager.take_events()}
    assert {
        (TierEventKind.HIT, Tier.HOST),
        (TierEventKind.HIT, Tier.DISK),
        (TierEventKind.MISS, Tier.DISK),
    } <= kinds


def test_corrupt_truncated_or_foreign_blocks_are_misses(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    a0, a1, a2 = _address(0), _address(1), _address(2)
    disk.store(a0, _value(a0))
    disk.store(a1, _value(a1)[:50])  # truncated
    disk.store(a2, _value(a0))  # another block's bytes under this address
    assert decode_block(disk.load(a1) or b"", a1) is None
    assert decode_block(disk.load(a2) or b"", a2) is None
    assert decode_block(b"\xff" * 40, a0) is None
    assert decode_block(disk.load(a0) or b"", a0) is not None
    disk.path(a0).write_bytes(b"")  # emptied
    assert decode_block(disk.load(a0) or b"", a0) is None


def test_host_tier_evicts_least_recently_used(tmp_path: Path) -> None:
    value = _value(_address(0))
    host = SharedMemoryTier(tmp_path, capacity_bytes=len(value) * 2)
    a0, a1, a2 = _address(0), _address(1), _address(2)
    host.store(a0, value)
    host.store(a1, value)
    host.load(a0)  # a1 is now the least recently used
    host.store(a2, value)
    assert host.contains([a0, a1, a2]) == [True, False, True]
    (event,) = host.take_events()
    assert event.kind is TierEventKind.EVICTION and event.num_blocks == 1


def test_sealed_persistent_tier_is_unreadable_once_the_key_is_gone(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    address = _address(0)
    TierManager([disk], sealer=AesGcmSealer(b"k" * 32)).store(address, _value(address))
    assert b"zumik-kv-block" not in disk.load(address)  # stored sealed, not in the clear
    assert TierManager([disk], sealer=AesGcmSealer(b"k" * 32)).load(TierManager([disk]).plan([address]))
    other_key = TierManager([disk], sealer=AesGcmSealer(b"x" * 32))
    assert other_key.load(other_key.plan([address])) == []  # destroyed key: a miss
    assert any(e.kind is TierEventKind.FAILURE for e in other_key.take_events())


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer_fingerprint": "u" * 64},
        {"kv_cache_dtype": "fp8"},
        {"block_size": 64},
        {"region": "eu-west-1"},
    ],
)
def test_same_tokens_under_another_compat_key_reuse_nothing(tmp_path: Path, change: dict) -> None:
    import dataclasses

    tokens = list(range(32 * 6))
    disk = DiskTier(tmp_path)
    stored = [BlockAddress(COMPAT.digest(), k) for k in chain_block_keys(tokens, 32, scope_seed(COMPAT, "s"))]
    for address in stored:
        disk.store(address, _value(address))
    other = dataclasses.replace(COMPAT, **change)
    block = other.block_size
    wanted = [
        BlockAddress(other.digest(), k) for k in chain_block_keys(tokens, block, scope_seed(other, "s"))
    ]
    assert TierManager([disk]).plan(wanted).num_blocks == 0
    assert TierManager([disk]).plan(stored).num_blocks == len(stored)  # the positive control


def test_shared_memory_tier_is_bounded_across_processes(tmp_path: Path) -> None:
    value = _value(_address(0))
    first = SharedMemoryTier(tmp_path, capacity_bytes=len(value) * 2)
    first.store(_address(0), value)
    first.store(_address(1), value)
    # A later process (a restarted engine) adopts the files and keeps the bound.
    second = SharedMemoryTier(tmp_path, capacity_bytes=len(value) * 2)
    assert second.used_bytes == 2 * len(value)
    second.store(_address(2), value)
    assert second.contains([_address(0), _address(1), _address(2)]) == [False, True, True]
    assert SharedMemoryTier(tmp_path, capacity_bytes=1 << 20).load(_address(2)) == value


def test_connector_stats_sum_events_by_kind_and_tier() -> None:
    pytest.importorskip("vllm")
    from kvstore.connector import ZumikKVConnector, ZumikKVConnectorStats
    from kvstore.tier import TierEvent

    first = ZumikKVConnectorStats(data={}).record(
        [TierEvent(TierEventKind.LOAD, Tier.REDIS, 2, 200), TierEvent(TierEventKind.LOAD, Tier.REDIS, 1, 100)]
    )
    second = ZumikKVConnector.build_kv_connector_stats(
        ZumikKVConnectorStats(data={}).record([TierEvent(TierEventKind.MISS, Tier.DISK, 4)]).to_dict()
    )
    assert second is not None
    merged = first.aggregate(second)
    assert merged.reduce() == {
        "load:redis_blocks": 3, "load:redis_bytes": 300, "miss:disk_blocks": 4, "miss:disk_bytes": 0,
    }  # fmt: skip
    assert not merged.is_empty()
    merged.reset()
    assert merged.is_empty()


def test_connector_keys_adapter_requests_apart_and_bypasses_unnamed_adapters(tmp_path: Path) -> None:
    """A LoRA request's blocks are keyed by its adapter (name and files): stored apart from the
    base model's blocks of the same tokens. A LoRA request vLLM names no adapter folder for
    never loads from nor stores to a tier, and is counted once."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    connector = _scheduler_side(TierManager([SharedMemoryTier(tmp_path / "shm", 1 << 20)]))
    tokens = list(range(100))

    def request(rid: str, lora: object) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, cache_salt="s", prompt_token_ids=tokens, lora_request=lora)

    named = SimpleNamespace(lora_name="a", lora_int_id=1, lora_path=str(adapter))
    unnamed = SimpleNamespace(lora_name="b", lora_int_id=2, lora_path="")
    for rid, lora in (("lora", named), ("unnamed", unnamed), ("unnamed", unnamed), ("base", None)):
        assert connector.get_num_new_matched_tokens(request(rid, lora), 0) == (0, False)  # type: ignore[arg-type]
    scheduled = [
        SimpleNamespace(req_id=rid, block_ids=([0, 1, 2, 3],), prompt_token_ids=tokens, num_computed_tokens=0)
        for rid in ("lora", "unnamed", "base")
    ]
    for rid, lora in (("lora", named), ("unnamed", unnamed), ("base", None)):  # all three scheduled
        connector.update_state_after_alloc(request(rid, lora), _allocated([0, 1, 2, 3]), 0)  # type: ignore[arg-type]
    output = _step(scheduled, scheduled={"lora": 100, "unnamed": 100, "base": 100})
    meta = connector.build_connector_meta(output)
    assert [store.request_id for store in meta.stores] == ["lora", "base"]
    lora_keys, base_keys = ({a.key for a in store.addresses} for store in meta.stores)
    assert len(lora_keys) == len(base_keys) == 3 and not lora_keys & base_keys
    stats = connector.get_kv_connector_stats()
    # The adapter and the base request looked in the tiers (3 full blocks each, none held yet).
    assert stats is not None and stats.data == {"miss:host": [6, 0], "bypassed:lora": [1, 0]}


def _scheduler_side(manager: TierManager) -> typing.Any:
    """A ZumikKVConnector's scheduler side over ``manager``, without an engine (rank 0's shard
    digest "s" * 64, blocks of 32 tokens)."""
    from collections import OrderedDict

    from kvstore.connector import ZumikKVConnector

    connector = ZumikKVConnector.__new__(ZumikKVConnector)
    connector.__dict__.update(
        _compat_digest=COMPAT.digest(), _block_size=32, _manager=manager, _shard="s" * 64,
        _shard_digests=["s" * 64], _key_sources={}, _adapter_fingerprints={}, _writer=None,
        _usage_reported=None, _connector_metadata=None,
        _addresses={}, _reuse={}, _bypassing=set(), _bypassed={}, _pending_loads={}, _load_plans={},
        _planned_tiers={}, _stored=OrderedDict(), _prompts={}, _prefilling=set(), _lookup_events={},
    )  # fmt: skip
    return connector


def _step(
    new: list[typing.Any] = (), cached: typing.Sequence[tuple[str, int]] = (),  # type: ignore[assignment]
    resumed: typing.AbstractSet[str] = frozenset(), scheduled: dict[str, int] | None = None,
    blocks: dict[str, list[int]] | None = None,
) -> typing.Any:  # fmt: skip
    """A vLLM ``SchedulerOutput`` of one step, as the connector reads it: the new requests, the
    running ones (``cached``: id and tokens computed before the step, ``resumed``: those vLLM's
    V1 model runner resumes after a preemption), tokens scheduled per request, and the block ids
    the scheduler's block state resolves per request."""
    from types import SimpleNamespace

    tables = blocks or {}
    return SimpleNamespace(
        scheduled_new_reqs=list(new), num_scheduled_tokens=scheduled or {},
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[rid for rid, _ in cached], num_computed_tokens=[computed for _, computed in cached],
            resumed_req_ids=set(resumed),
        ),
        kv_connector_block_state=SimpleNamespace(
            get_block_ids=lambda rid: (tables[rid],) if rid in tables else None
        ),
    )  # fmt: skip


def test_connector_looks_in_the_tiers_only_past_the_engines_own_hit(tmp_path: Path) -> None:
    """Only blocks past vLLM's prefix-cache hit are looked up, and nothing at all when vLLM holds
    every full block before the last prompt token: no tier call, no event. Blocks the engine
    holds need not be in a tier for the ones after them to restore."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from kvstore.keys import scope_id, seed_from_digest

    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    manager = TierManager([host])
    connector = _scheduler_side(manager)
    tokens = list(range(100))  # 3 full blocks; the last token is always the engine's
    keys = chain_block_keys(tokens, 32, seed_from_digest(COMPAT.digest(), "s"))
    addresses = [BlockAddress("s" * 64, key, scope_id("s")) for key in keys]
    for address in addresses[1:]:  # block 0 is not in the tier: only the engine holds it
        host.store(address, _value(address))

    def request(rid: str) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, cache_salt="s", prompt_token_ids=tokens, lora_request=None)

    assert connector.get_num_new_matched_tokens(request("all-cached"), 96) == (0, False)
    assert manager.take_events() == []  # no lookup
    assert connector.get_num_new_matched_tokens(request("cold"), 0) == (0, False)  # block 0: nowhere
    assert connector.get_num_new_matched_tokens(request("warm"), 32) == (64, False)
    assert manager.take_events() == []  # counted once vLLM schedules them
    for rid, external in (("cold", 0), ("warm", 64)):
        connector.update_state_after_alloc(request(rid), _allocated([0, 1, 2, 3]), external)
    events = manager.take_events()
    assert {(e.kind, e.tier, e.num_blocks) for e in events} == {
        (TierEventKind.MISS, Tier.HOST, 3),  # the cold request's 3 blocks
        (TierEventKind.HIT, Tier.HOST, 2),  # the warm one asked for blocks 1-2 only
    }


def test_a_lookup_counts_once_when_vllm_schedules_the_request_whatever_it_asked_before(
    tmp_path: Path,
) -> None:
    """vLLM asks the connector again, step after step, about a request it cannot schedule yet,
    and the scheduler asks each other rank's shard too: the tiers' hits and misses count once,
    for the blocks every rank holds, when the request is scheduled."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from kvstore.keys import scope_id, seed_from_digest

    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    manager = TierManager([host])
    connector = _scheduler_side(manager)
    connector._shard_digests = ["s" * 64, "t" * 64]  # tensor parallel 2: rank 1 files under "t"
    tokens = list(range(100))  # 3 full blocks, all loadable
    keys = chain_block_keys(tokens, 32, seed_from_digest(COMPAT.digest(), "s"))
    for shard, held in (("s" * 64, 3), ("t" * 64, 2)):  # rank 1 lacks block 2
        for key in keys[:held]:
            address = BlockAddress(shard, key, scope_id("s"))
            host.store(address, _value(address))
    request = SimpleNamespace(request_id="r", cache_salt="s", prompt_token_ids=tokens, lora_request=None)
    for _ in range(3):  # waiting for room: asked three times
        assert connector.get_num_new_matched_tokens(request, 0) == (64, False)
    assert manager.take_events() == []
    connector.update_state_after_alloc(request, _allocated([5, 6, 7, 8]), 64)  # type: ignore[arg-type]
    events = manager.take_events()
    assert sorted((e.kind.value, e.tier, e.num_blocks) for e in events) == sorted(
        [(TierEventKind.HIT.value, Tier.HOST, 2), (TierEventKind.MISS.value, Tier.HOST, 1)]
    )


def test_the_ranks_restore_reports_of_a_request_make_one() -> None:
    """vLLM aggregates the workers' metadata of a step: a request restores what its shortest
    rank restored, all ranks' bytes, in the slowest rank's time (not the last rank's report)."""
    pytest.importorskip("vllm")
    from kvstore.connector import RestoreReport, ZumikWorkerMetadata

    rank0 = ZumikWorkerMetadata(
        {"a": RestoreReport({"host": 3}, 300, 0.002), "b": RestoreReport({"disk": 1}, 100, 0.001)}
    )
    rank1 = ZumikWorkerMetadata({"a": RestoreReport({"host": 2}, 200, 0.003)})
    merged = rank0.aggregate(rank1)
    assert isinstance(merged, ZumikWorkerMetadata)
    assert merged.restores == {
        "a": RestoreReport({"host": 2}, 500, 0.003),
        "b": RestoreReport({"disk": 1}, 100, 0.001),  # only one rank reported it this step
    }


def _allocated(block_ids: list[int]) -> typing.Any:
    """vLLM's ``KVCacheBlocks`` of a request, as the connector reads them: its block ids."""
    from types import SimpleNamespace

    return SimpleNamespace(get_block_ids=lambda: (block_ids,))


def test_a_block_the_tiers_lost_is_stored_again_and_one_they_hold_is_not(tmp_path: Path) -> None:
    """The scheduler remembers what it stored so that it never writes a block twice, but a
    block no tier holds any more (evicted, expired, purged, a store the write-behind queue
    dropped) is forgotten by the lookup that misses it, and stored when it is computed again.
    Blocks the tiers still hold are not."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from kvstore.keys import scope_id, seed_from_digest

    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    connector = _scheduler_side(TierManager([host]))
    tokens = list(range(100))  # 3 full blocks, all loadable (the last token is the engine's)
    keys = chain_block_keys(tokens, 32, seed_from_digest(COMPAT.digest(), "s"))
    addresses = [BlockAddress("s" * 64, key, scope_id("s")) for key in keys]

    def stored_by(rid: str, computed: int) -> list[BlockAddress]:
        """The addresses a request stores when it is scheduled with ``computed`` tokens known."""
        request = SimpleNamespace(request_id=rid, cache_salt="s", prompt_token_ids=tokens, lora_request=None)
        connector.get_num_new_matched_tokens(request, computed)
        new = SimpleNamespace(
            req_id=rid, block_ids=([0, 1, 2, 3],), prompt_token_ids=tokens, num_computed_tokens=computed
        )
        meta = connector.build_connector_meta(_step([new], scheduled={rid: len(tokens) - computed}))
        return [address for store in meta.stores for address in store.addresses]

    assert stored_by("first", 0) == addresses  # its stores never land (the queue dropped them)
    assert stored_by("second", 0) == addresses  # the lookup missed block 0: all three again
    for address in addresses:  # now they land
        host.store(address, _value(address))
    assert stored_by("held", 0) == []  # the tiers hold all three: the engine computes none
    host.remove(addresses[1:2])  # evicted
    # block 0 restores; blocks 1-2 are past the first block no tier holds: stored again
    assert stored_by("evicted", 32) == addresses[1:]
    for address in addresses[1:]:
        host.store(address, _value(address))
    assert stored_by("after", 32) == []  # held again: nothing is written twice


def test_each_chunk_of_a_long_prompt_stores_the_full_blocks_it_computes(tmp_path: Path) -> None:
    """vLLM prefills a prompt longer than a step's token budget in chunks, one a step: the first
    comes as a new request, the rest as a running one. Every chunk's full blocks are stored;
    once the prompt is computed (decoding) the request costs the step nothing."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from kvstore.keys import scope_id, seed_from_digest

    connector = _scheduler_side(TierManager([SharedMemoryTier(tmp_path / "shm", 1 << 24)]))
    tokens = list(range(200))  # 6 full blocks and 8 tokens
    keys = chain_block_keys(tokens, 32, seed_from_digest(COMPAT.digest(), "s"))
    addresses = [BlockAddress("s" * 64, key, scope_id("s")) for key in keys]
    request = SimpleNamespace(request_id="long", cache_salt="s", prompt_token_ids=tokens, lora_request=None)
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
    table = list(range(10, 17))  # the request's blocks as vLLM allocates them: all 7 by the end

    def stored(meta: typing.Any) -> list[tuple[list[int], list[BlockAddress]]]:
        return [(store.block_ids, store.addresses) for store in meta.stores]

    new = SimpleNamespace(
        req_id="long", block_ids=(table[:2],), prompt_token_ids=tokens, num_computed_tokens=0
    )
    first = connector.build_connector_meta(_step([new], scheduled={"long": 64}))
    assert stored(first) == [([10, 11], addresses[0:2])]
    blocks = {"long": table[:4]}
    second = connector.build_connector_meta(
        _step(cached=[("long", 64)], scheduled={"long": 64}, blocks=blocks)
    )
    assert stored(second) == [([12, 13], addresses[2:4])]  # the old connector stored nothing here
    blocks = {"long": table}
    last = connector.build_connector_meta(
        _step(cached=[("long", 128)], scheduled={"long": 72}, blocks=blocks)
    )
    assert stored(last) == [([14, 15], addresses[4:6])]  # up to 200 tokens: blocks 4-5 are full
    assert "long" not in connector._prefilling
    decoding = connector.build_connector_meta(
        _step(cached=[("long", 200)], scheduled={"long": 1}, blocks=blocks)
    )
    assert stored(decoding) == [] and decoding.loads == []


def test_a_request_resumed_after_a_preemption_loads_what_the_tiers_hold_into_its_new_blocks(
    tmp_path: Path,
) -> None:
    """The load of a request vLLM accepted tier tokens for goes into the blocks it allocated for
    them, whether the request is new or resumed after a preemption: vLLM's V1 model runner (the
    CPU engines') sends a resumed request as a running one, and a load left out then would have
    the engine take those blocks' stale contents for the prompt's KV."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from kvstore.keys import scope_id, seed_from_digest

    host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
    connector = _scheduler_side(TierManager([host]))
    tokens = list(range(100))  # 3 full blocks, all loadable
    keys = chain_block_keys(tokens, 32, seed_from_digest(COMPAT.digest(), "s"))
    addresses = [BlockAddress("s" * 64, key, scope_id("s")) for key in keys]
    for address in addresses:
        host.store(address, _value(address))
    request = SimpleNamespace(request_id="r", cache_salt="s", prompt_token_ids=tokens, lora_request=None)

    # First scheduled as a new request, vLLM's own cache holding block 0: blocks 1-2 load.
    assert connector.get_num_new_matched_tokens(request, 32) == (64, False)
    connector.update_state_after_alloc(request, _allocated([3, 4, 5, 6]), 64)  # type: ignore[arg-type]
    new = SimpleNamespace(
        req_id="r", block_ids=([3, 4, 5, 6],), prompt_token_ids=tokens, num_computed_tokens=96
    )
    meta = connector.build_connector_meta(_step([new], scheduled={"r": 4}))
    assert [(load.block_ids, load.addresses) for load in meta.loads] == [([4, 5], addresses[1:])]
    # Preempted (its blocks freed and reused), then resumed with new blocks and nothing cached by
    # vLLM: all three load, into the blocks allocated now, though the request is not a new one.
    assert connector.get_num_new_matched_tokens(request, 0) == (96, False)
    connector.update_state_after_alloc(request, _allocated([8, 2, 9, 7]), 96)  # type: ignore[arg-type]
    resumed = _step(cached=[("r", 96)], resumed={"r"}, scheduled={"r": 4}, blocks={"r": [8, 2, 9, 7]})
    meta = connector.build_connector_meta(resumed)
    assert [(load.block_ids, load.addresses) for load in meta.loads] == [([8, 2, 9], addresses)]
    assert meta.stores == []  # the tiers hold its blocks: nothing is written twice
    assert connector.build_connector_meta(_step(cached=[("r", 100)], scheduled={"r": 1})).loads == []


def test_connector_per_layer_hooks_are_skipped_in_a_step_with_nothing_to_load_or_store() -> None:
    pytest.importorskip("vllm")
    from kvstore.connector import ZumikConnectorMetadata, _Transfer

    worker = _scheduler_side(TierManager([]))  # the same object serves as a worker here
    assert not worker.has_connector_metadata()
    worker.bind_connector_metadata(ZumikConnectorMetadata())
    assert not worker.has_connector_metadata()  # vLLM then calls neither per-layer hook
    worker.bind_connector_metadata(ZumikConnectorMetadata(stores=[_Transfer("r", [1], [_address(0)])]))
    assert worker.has_connector_metadata()
    assert worker.requires_kv_delivery is False  # stores are copied out in the step


def test_tier_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Blocks are 0600; every folder a tier makes (its root and missing parents included) 0700,
    and an existing root of this user loses group and other access."""
    import os
    import stat

    (tmp_path / "shm").mkdir(mode=0o755)
    (tmp_path / "shm").chmod(0o755)
    previous = os.umask(0o022)  # files would be 0644 and folders 0755 without the tiers' care
    try:
        host = SharedMemoryTier(tmp_path / "shm", 1 << 24)
        disk = DiskTier(tmp_path / "home" / "kv" / "disk")
        for tier in (host, disk):
            assert tier.store(_address(0), _value(_address(0)))
    finally:
        os.umask(previous)
    written = [*(tmp_path / "shm").rglob("*"), *(tmp_path / "home").rglob("*")]
    files = [path for path in written if path.is_file()]
    folders = [tmp_path / "shm", tmp_path / "home", *(path for path in written if path.is_dir())]
    # two blocks and the host tier's budget ledger (the disk tier here has no budget)
    assert len(files) == 3 and (tmp_path / "shm" / ".budget") in files
    assert len(folders) == 1 + 3 + 3 + 3  # shm, home/kv/disk, then 3 levels each
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {"0o600"}
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in folders} == {"0o700"}


def test_a_tier_root_that_is_a_link_or_another_users_is_refused(tmp_path: Path) -> None:
    """/dev/shm is shared by every user: a folder someone else made (or a link they planted) at
    the tier's path is never read from or written to."""
    import os

    from kvstore.atomic_file import ForeignFolderError

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ForeignFolderError, match="not a folder of this user"):
        SharedMemoryTier(tmp_path / "link", 1 << 20)
    disk = DiskTier(tmp_path / "link")
    assert not disk.store(_address(0), _value(_address(0)))
    (event,) = disk.take_events()
    assert event.kind is TierEventKind.FAILURE and "not a folder of this user" in event.detail
    assert list((tmp_path / "elsewhere").iterdir()) == []
    if os.geteuid() == 0:  # only root can give a folder away
        (tmp_path / "theirs").mkdir()
        os.chown(tmp_path / "theirs", 54321, -1)
        with pytest.raises(ForeignFolderError):
            SharedMemoryTier(tmp_path / "theirs", 1 << 20)
