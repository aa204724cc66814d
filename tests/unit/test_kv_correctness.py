"""KV blocks are interchangeable only when everything that made their bytes is equal.

Invariants held here, on real tiers (host shared memory, disk, Redis), real sealing and the
connector's real copy code (``kvstore.transfer``):
- two TP ranks' blocks of one prompt never share an address, in any tier, sealed or not;
- a rank never restores another rank's block, even one copied under its address;
- a block stored under one adapter, vLLM version or KV layout is a miss under any other;
- multimodal inputs key the blocks that hold them (and every later one), not the earlier ones;
- the layout comes from vLLM's own KV cache spec, and what the connector cannot copy (hybrid
  models, sliding-window groups, unknown specs, kernel-split views it was not told of) is
  refused at start with a message saying what to do;
- the model fingerprint covers every byte of the weights, hashed once per file version;
- an engine whose weights differ from its profile's refuses to start, naming both digests.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
import torch

from kvstore.codec import decode_block, encode_block
from kvstore.compat import CompatKey, CompatMismatch, check_engine_compat, derive_compat_key
from kvstore.fingerprint import FileDigestCache, model_fingerprint, tokenizer_fingerprint
from kvstore.keys import adapter_seed, chain_block_keys, scope_id, seed_from_digest
from kvstore.layout import KvLayout, KvShard, LayoutError, check_view, shard_digest
from kvstore.manager import TierManager
from kvstore.sealing import AesGcmSealer
from kvstore.tier import BlockAddress, TierBackend
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.shared_memory import SharedMemoryTier
from kvstore.transfer import BlockCopier, CacheLayoutError
from profiles import load_builtin

pytestmark = pytest.mark.redis

PROFILE = load_builtin("local-cpu")
COMPAT = derive_compat_key(PROFILE, model_fingerprint="m" * 64, tokenizer_fingerprint="t" * 64)
BLOCK = 16
LAYOUT = KvLayout(
    spec="FullAttentionSpec", physical="LBNHC", torch_dtype="bfloat16", cache_dtype="auto",
    quant_mode="NONE", block_size=BLOCK, num_kv_heads=2, head_size=8, head_size_v=8,
    block_shape=(2, BLOCK, 16),
)  # fmt: skip
TOKENS = [(i * 7) % 500 + 3 for i in range(5 * BLOCK + 3)]


def make_addresses(shard: str, *, seed: bytes | None = None, salt: str = "salt") -> list[BlockAddress]:
    keys = chain_block_keys(TOKENS, BLOCK, seed or seed_from_digest(COMPAT.digest(), salt))
    return [BlockAddress(shard, key, scope_id(salt)) for key in keys]


def make_caches(num_layers: int, num_blocks: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.attn": torch.randn((num_blocks, 2, BLOCK, 16), generator=generator).to(
            torch.bfloat16
        )
        for i in range(num_layers)
    }


@pytest.fixture
def tiers(tmp_path: Path, module_redis_url: str) -> list[TierBackend]:
    client = redis.Redis.from_url(module_redis_url)
    return [SharedMemoryTier(tmp_path / "shm", 1 << 24), DiskTier(tmp_path / "disk"), RedisTier(client)]


def test_two_ranks_blocks_never_collide_in_any_tier(tiers: list[TierBackend]) -> None:
    rank0, rank1 = (shard_digest(COMPAT.digest(), LAYOUT, KvShard(tp, 2)) for tp in (0, 1))
    pp1 = shard_digest(COMPAT.digest(), LAYOUT, KvShard(0, 2, 1, 2))
    assert len({rank0, rank1, pp1, shard_digest(COMPAT.digest(), LAYOUT, KvShard())}) == 4
    mine, theirs = make_addresses(rank0), make_addresses(rank1)
    assert not set(mine) & set(theirs)
    for tier in tiers:
        for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert tier.store(a, f"rank0-{index}".encode()) and tier.store(b, f"rank1-{index}".encode())
        assert [tier.load(a) for a in mine] == [f"rank0-{i}".encode() for i in range(len(mine))]
        assert [tier.load(b) for b in theirs] == [f"rank1-{i}".encode() for i in range(len(theirs))]


def test_a_rank_never_restores_another_ranks_block(tmp_path: Path) -> None:
    """Rank 0 and rank 1 of a TP=2 engine store their shards of the same prompt through the
    connector's copy code; fresh ranks restore each its own bytes. Rank 0's file copied under
    rank 1's address (a misfiled copy) is refused, plain or sealed."""
    rank_shards = [KvShard(tp, 2) for tp in (0, 1)]
    digests = [shard_digest(COMPAT.digest(), LAYOUT, shard) for shard in rank_shards]
    disk = DiskTier(tmp_path / "disk")
    sealer = AesGcmSealer(b"k" * 32)
    originals = [make_caches(3, 8, seed=rank) for rank in (0, 1)]
    block_ids = [1, 4, 6, 2, 7]
    for rank, caches in enumerate(originals):
        blocks = BlockCopier(caches, 8).extract(block_ids)
        for address, tensors in zip(make_addresses(digests[rank]), blocks, strict=True):
            assert disk.store(address, encode_block(tensors, address))
    for rank in (0, 1):
        fresh = {name: torch.zeros_like(cache) for name, cache in originals[rank].items()}
        copier = BlockCopier(fresh, 8)
        addresses = make_addresses(digests[rank])
        decoded = [decode_block(disk.load(address) or b"", address) for address in addresses]
        assert all(block is not None for block in decoded)
        assert copier.inject(block_ids, [block for block in decoded if block is not None]) == len(block_ids)
        for name, cache in fresh.items():
            assert torch.equal(
                cache[block_ids].view(torch.uint8), originals[rank][name][block_ids].view(torch.uint8)
            )
            assert not torch.equal(cache[block_ids], originals[1 - rank][name][block_ids])
    # A misfiled copy: rank 0's bytes under rank 1's address do not decode, and sealed do not open.
    mine, theirs = make_addresses(digests[0])[0], make_addresses(digests[1])[0]
    stolen = disk.load(mine)
    assert stolen is not None and decode_block(stolen, theirs) is None
    assert sealer.open(sealer.seal(stolen, mine), theirs) is None
    assert sealer.open(sealer.seal(stolen, mine), mine) == stolen


@pytest.mark.parametrize(
    "change",
    ["adapter", "other adapter files", "vllm version", "physical layout", "fp8 cache", "mla", "block format"],
)
def test_a_block_under_another_adapter_vllm_version_or_layout_is_a_miss(
    tiers: list[TierBackend], change: str
) -> None:
    base_shard = shard_digest(COMPAT.digest(), LAYOUT, KvShard())
    manager = TierManager(tiers)
    for address in make_addresses(base_shard):
        manager.store(address, b"block")
    assert manager.plan(make_addresses(base_shard)).num_blocks == 5
    seed = seed_from_digest(COMPAT.digest(), "salt")
    layout, compat, request_seed = LAYOUT, COMPAT, seed
    if change == "adapter":
        request_seed = adapter_seed(seed, "support-bot", "f" * 64)
    elif change == "other adapter files":  # the same adapter name, re-trained weights
        assert adapter_seed(seed, "support-bot", "f" * 64) != adapter_seed(seed, "support-bot", "e" * 64)
        request_seed = adapter_seed(seed, "support-bot", "e" * 64)
    elif change == "vllm version":
        compat = replace(COMPAT, vllm_version="vllm==0.33.0")
        request_seed = seed_from_digest(compat.digest(), "salt")
    elif change == "physical layout":
        layout = replace(LAYOUT, physical="LBHNC")
    elif change == "fp8 cache":
        layout = replace(LAYOUT, torch_dtype="uint8", cache_dtype="fp8_e4m3", quant_mode="FP8_PER_TENSOR",
                         block_shape=(2, BLOCK, 32))  # fmt: skip
    elif change == "mla":
        layout = replace(LAYOUT, spec="MLAAttentionSpec", num_kv_heads=1, head_size=32, head_size_v=0,
                         block_shape=(1, BLOCK, 32))  # fmt: skip
    elif change == "block format":
        layout = replace(LAYOUT, format_version=LAYOUT.format_version + 1)
    shard = shard_digest(compat.digest(), layout, KvShard())
    assert manager.plan(make_addresses(shard, seed=request_seed)).num_blocks == 0


def test_multimodal_inputs_key_the_blocks_that_hold_them_and_later_ones() -> None:
    pytest.importorskip("vllm")
    from kvstore.connector import _block_extras

    def request(identifier: str | None) -> Any:  # the fields of vllm.v1.request.Request it reads
        features = (
            [
                SimpleNamespace(
                    identifier=identifier, mm_position=SimpleNamespace(offset=2 * BLOCK + 3, length=20)
                )
            ]
            if identifier
            else None
        )
        return SimpleNamespace(
            mm_features=features, prompt_embeds=None, lora_request=None, cache_salt="salt",
            num_prompt_tokens=len(TOKENS), prompt_token_ids=TOKENS,
        )  # fmt: skip

    assert _block_extras(request(None), BLOCK) is None  # text only: the gateway's keys
    cat, dog = _block_extras(request("cat-image"), BLOCK), _block_extras(request("dog-image"), BLOCK)
    assert cat is not None and dog is not None and set(cat) == {2, 3}  # the image spans blocks 2-3
    seed = seed_from_digest(COMPAT.digest(), "salt")
    plain = chain_block_keys(TOKENS, BLOCK, seed)
    with_cat, with_dog = (
        chain_block_keys(TOKENS, BLOCK, seed, cat),
        chain_block_keys(TOKENS, BLOCK, seed, dog),
    )
    assert with_cat[:2] == plain[:2] == with_dog[:2]  # before the image: shared
    assert all(len({p, c, d}) == 3 for p, c, d in zip(plain[2:], with_cat[2:], with_dog[2:], strict=True))


def test_worker_ranks_file_the_schedulers_blocks_under_their_own_shard() -> None:
    pytest.importorskip("vllm")
    from kvstore.connector import ZumikConnectorMetadata, ZumikKVConnector, _Transfer

    digests = [shard_digest(COMPAT.digest(), LAYOUT, KvShard(tp, 2)) for tp in (0, 1)]
    addresses = make_addresses(digests[0])
    for rank in (0, 1):
        worker = ZumikKVConnector.__new__(ZumikKVConnector)
        worker.__dict__.update(_shard=digests[rank], _shard_digests=digests, _connector_metadata=None)
        meta = ZumikConnectorMetadata(stores=[_Transfer("r", [1, 2, 3, 4, 5], addresses)])
        worker.bind_connector_metadata(meta)
        bound = worker._get_connector_metadata()
        assert isinstance(bound, ZumikConnectorMetadata)
        (store,) = bound.stores
        assert [a.compat_digest for a in store.addresses] == [digests[rank]] * 5
        assert [a.key for a in store.addresses] == [a.key for a in addresses]
        assert [a.compat_digest for a in meta.stores[0].addresses] == [digests[0]] * 5  # not mutated
    stray = replace(LAYOUT, physical="LBHNC")
    worker.bind_connector_metadata(ZumikConnectorMetadata())
    with pytest.raises(LayoutError, match="disagree on the KV layout"):
        other = make_addresses(shard_digest(COMPAT.digest(), stray, KvShard(0, 2)))
        worker.bind_connector_metadata(ZumikConnectorMetadata(loads=[_Transfer("r", [1], other[:1])]))


def _vllm_config(groups: list[Any], layout: str | None = "LBNHC") -> object:
    from vllm.v1.kv_cache_interface import KVCacheConfig

    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups, kv_cache_layout=layout)


def test_layout_comes_from_vllms_kv_cache_spec() -> None:
    pytest.importorskip("vllm")
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, KVQuantMode, MLAAttentionSpec

    from kvstore.layout import layout_of

    def group(spec: object) -> KVCacheGroupSpec:
        return KVCacheGroupSpec(layer_names=["model.layers.0.attn"], kv_cache_spec=spec)  # type: ignore[arg-type]

    bf16 = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    layout = layout_of(_vllm_config([group(bf16)]), cache_dtype="auto")
    assert (layout.spec, layout.torch_dtype, layout.block_shape, layout.physical) == (
        "FullAttentionSpec", "bfloat16", (8, 16, 256), "LBNHC"
    )  # fmt: skip
    fp8 = FullAttentionSpec(
        block_size=16,
        num_kv_heads=8,
        head_size=128,
        dtype=torch.uint8,
        kv_quant_mode=KVQuantMode.FP8_PER_TENSOR,
    )
    fp8_layout = layout_of(_vllm_config([group(fp8)]), cache_dtype="fp8_e4m3")
    assert (fp8_layout.torch_dtype, fp8_layout.quant_mode, fp8_layout.block_shape) == (
        "uint8", "FP8_PER_TENSOR", (8, 16, 256)
    )  # fmt: skip
    mla = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    mla_layout = layout_of(_vllm_config([group(mla)], layout="LBHNC"), cache_dtype="auto")
    assert (mla_layout.spec, mla_layout.block_shape, mla_layout.head_size_v) == (
        "MLAAttentionSpec",
        (1, 16, 576),
        0,
    )
    assert len({layout.digest(), fp8_layout.digest(), mla_layout.digest()}) == 3
    check_view(layout, "l0", (64, 8, 16, 256), "bfloat16", 64)
    check_view(layout, "l0", (128, 8, 8, 256), "bfloat16", 64)  # two kernel blocks per block
    with pytest.raises(LayoutError, match="cannot copy it"):
        check_view(layout, "l0", (2, 64, 16, 8, 128), "bfloat16", 64)  # K/V-first (old vLLM)
    with pytest.raises(LayoutError, match="cannot copy it"):
        check_view(layout, "l0", (64, 8, 16, 256), "float16", 64)


def test_what_the_connector_cannot_copy_is_refused_at_start() -> None:
    pytest.importorskip("vllm")
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheGroupSpec,
        KVQuantMode,
        MambaSpec,
        SlidingWindowSpec,
    )

    from kvstore.layout import layout_of

    full = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    window = SlidingWindowSpec(
        block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16, sliding_window=64
    )
    mamba = MambaSpec(block_size=16, shapes=((4, 8),), dtypes=(torch.bfloat16,))
    nvfp4 = FullAttentionSpec(
        block_size=16, num_kv_heads=8, head_size=128, dtype=torch.uint8, kv_quant_mode=KVQuantMode.NVFP4
    )

    def config(*specs: object) -> object:
        return _vllm_config([KVCacheGroupSpec([f"l{i}"], spec) for i, spec in enumerate(specs)])  # type: ignore[arg-type]

    with pytest.raises(LayoutError, match="2 KV cache groups.*kv_tiers.enabled: false"):
        layout_of(config(full, window), cache_dtype="auto")
    with pytest.raises(LayoutError, match="SlidingWindowSpec is not one"):
        layout_of(config(window), cache_dtype="auto")
    with pytest.raises(LayoutError, match="MambaSpec is not one"):
        layout_of(config(mamba), cache_dtype="auto")
    with pytest.raises(LayoutError, match="NVFP4"):
        layout_of(config(nvfp4), cache_dtype="nvfp4")
    with pytest.raises(LayoutError, match="context parallelism"):
        layout_of(config(full), cache_dtype="auto", context_parallel=2)
    with pytest.raises(LayoutError, match="did not resolve"):
        layout_of(_vllm_config([KVCacheGroupSpec(["l0"], full)], layout=None), cache_dtype="auto")
    with pytest.raises(CacheLayoutError, match="not a blocks-first layout"):
        BlockCopier({"l0": torch.zeros((2, 5, 16, 8))}, 4)


def _model(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_fingerprint_covers_every_byte_and_hashes_each_file_once(tmp_path: Path) -> None:
    size = 5 << 20  # edges of 1 MiB on each side stay equal: only the middle differs
    weights = bytes(range(256)) * (size // 256)
    middle = bytearray(weights)
    middle[size // 2] ^= 1
    cache = tmp_path / "cache.json"
    first = _model(tmp_path / "a", weights)
    fine_tune = _model(tmp_path / "b", bytes(middle))
    assert model_fingerprint(first, cache_path=cache) != model_fingerprint(fine_tune, cache_path=cache)
    # Hashed once: the cache answers for a file of the same size and mtime, even if its bytes
    # changed behind its back, and hashes again once the mtime moves.
    recorded = model_fingerprint(first, cache_path=cache)
    stat = (first / "model.safetensors").stat()
    (first / "model.safetensors").write_bytes(bytes(middle))
    os.utime(first / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_fingerprint(first, cache_path=cache) == recorded
    os.utime(first / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert model_fingerprint(first, cache_path=cache) == model_fingerprint(fine_tune, cache_path=cache)
    with FileDigestCache(cache) as entries:  # the cache file holds one entry per file version
        assert entries.sha256(fine_tune / "model.safetensors") == entries.sha256(first / "model.safetensors")
    cache.write_text("not json")  # a broken cache costs time, never a wrong answer
    assert model_fingerprint(fine_tune, cache_path=cache) == model_fingerprint(
        first, cache_path=tmp_path / "x"
    )


def test_an_engine_with_other_weights_refuses_to_start_naming_both_digests(tmp_path: Path) -> None:
    deployed = _model(tmp_path / "deployed", b"weights of the build node" * 1000)
    other_node = _model(tmp_path / "node-2", b"weights of another node!!" * 1000)
    cache = tmp_path / "cache.json"
    declared = derive_compat_key(
        PROFILE, model_fingerprint=model_fingerprint(deployed, cache_path=cache),
        tokenizer_fingerprint=tokenizer_fingerprint(deployed),
    )  # fmt: skip
    engine = PROFILE.model_groups()[0].engine
    observed = {
        "device": engine.device.value, "block_size": engine.block_size,
        "kv_cache_dtype": engine.kv_cache_dtype, "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
    }  # fmt: skip
    config = CompatKey.from_config(declared.as_config())
    assert (
        check_engine_compat(
            declared.digest(),
            config,
            model_dir=deployed,
            tokenizer_dir=deployed,
            observed=observed,
            cache_path=cache,
        )
        == declared
    )
    with pytest.raises(CompatMismatch) as refused:
        check_engine_compat(
            declared.digest(), config, model_dir=other_node, tokenizer_dir=other_node, observed=observed,
            cache_path=cache,
        )  # fmt: skip
    message = str(refused.value)
    mine = replace(declared, model_fingerprint=model_fingerprint(other_node, cache_path=cache))
    assert declared.digest() in message and mine.digest() in message and "model_fingerprint" in message
    assert "refuses to start" in message and str(other_node) in message
    with pytest.raises(CompatMismatch, match="vllm_version"):
        check_engine_compat(
            declared.digest(), config, model_dir=deployed, tokenizer_dir=deployed, observed=observed,
            vllm_version="vllm==0.11.0", cache_path=cache,
        )  # fmt: skip
    with pytest.raises(CompatMismatch, match="block_size"):
        check_engine_compat(
            declared.digest(), config, model_dir=deployed, tokenizer_dir=deployed,
            observed={**observed, "block_size": engine.block_size * 2}, cache_path=cache,
        )  # fmt: skip
    with pytest.raises(CompatMismatch, match="inconsistent"):
        check_engine_compat("0" * 64, config, model_dir=deployed, tokenizer_dir=deployed, observed=observed)
    with pytest.raises(CompatMismatch, match="not a compat key"):
        CompatKey.from_config({"model_fingerprint": "m"})


def test_deployed_connector_config_carries_the_compat_key_behind_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zumik_serve.engines.vllm_config import engine_kv_transfer

    monkeypatch.setenv("ZUMIK_HOME", str(tmp_path / "home"))  # where the fingerprint cache goes
    from zumik_serve.model.tiny import build_tiny_model

    profile = PROFILE.model_copy(update={"kv_tiers": PROFILE.kv_tiers.model_copy(update={"enabled": True})})
    model_dir = build_tiny_model(tmp_path / "tiny")
    config = engine_kv_transfer(
        profile, model_dir=model_dir, redis_url="redis://localhost:1", home_root=tmp_path
    )
    assert config is not None
    extra = config["kv_connector_extra_config"]
    key = CompatKey.from_config(extra["compat_key"])
    assert key.digest() == extra["compat_digest"] and key.vllm_version.endswith("==0.32.0")
    assert key.model_fingerprint == model_fingerprint(model_dir)
    assert (tmp_path / "home" / "cache" / "fingerprints.json").is_file()


def test_copy_round_trip_is_bit_exact_for_bytes_that_are_not_numbers() -> None:
    """FP8 caches are uint8 views in vLLM 0.32, bf16 ones may hold NaN patterns: the copy moves
    bytes, never values."""
    raw = torch.arange(8 * 2 * BLOCK * 16, dtype=torch.int32).to(torch.uint8).reshape(8, 2, BLOCK, 16)
    caches = {"l0": raw.clone(), "l1": raw.clone()}
    caches["l1"].view(-1)[::7] = 0xFF  # NaN-like byte patterns
    copier = BlockCopier(caches, 8)
    blocks = copier.extract([3, 5])
    target = {name: torch.zeros_like(cache) for name, cache in caches.items()}
    assert BlockCopier(target, 8).inject([0, 1], blocks) == 2
    for name in caches:
        assert torch.equal(target[name][0], caches[name][3]) and torch.equal(target[name][1], caches[name][5])
    truncated = [{**blocks[0], "l1": np.zeros(3, dtype=np.uint8)}]
    assert BlockCopier(target, 8).inject([2], truncated) == 0 and not target["l0"][2].any()
