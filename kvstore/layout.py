"""The KV layout an engine really runs with, and the shard each of its ranks files blocks under.

Rule kept here: a block's address names everything that makes its bytes what they are, so that
two blocks under one address are interchangeable and anything else is a miss:

    shard_digest = sha256(compat digest | layout digest | tp shard / tp shards | pp rank / pp size)

    compat digest   the profile's engine: weights, tokenizer, vLLM version, dtypes, sizes
                    (``compat.CompatKey``), checked by each engine against its own files
    layout          what vLLM's KV cache spec and attention backend report for this engine
                    (``KvLayout``): kind (attention, MLA), cache dtype and quantization, the
                    logical ``[H, N, C]`` shape of one block of one layer, vLLM's resolved
                    physical layout (``KVCacheLayout``), and the format the connector writes
    rank            the tensor-parallel shard (a rank holds its own KV heads) and the
                    pipeline stage (a stage holds its own layers)

Every address a tier holds carries a shard digest (``BlockAddress.compat_digest``), so the
digest reaches the tier's key or path, the block's header (``codec``) and the sealing's
associated data (``sealing``): a rank never loads another rank's block, and an engine whose
layout or vLLM version changed never loads blocks written before.

This module knows vLLM only as the values the connector reads from it (``kvstore/connector.py``
turns vLLM's ``KVCacheConfig`` into a ``KvLayout``); it imports nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

# How the connector writes a block: per layer, the bytes of the block's logical [H, N, C] view
# in that order (``transfer.block_bytes``). Bump on any change of that format.
BLOCK_FORMAT_VERSION = 2  # 2: a checksum of the tensors' bytes after them (``codec``)

# vLLM KV cache spec kinds whose blocks the connector can copy whole (one manager block holds
# every layer's KV of block_size tokens, and nothing else depends on the block).
SUPPORTED_SPECS = frozenset({"FullAttentionSpec", "MLAAttentionSpec"})
# vLLM KV quantization modes whose cache bytes carry everything (no per-request side state).
SUPPORTED_QUANT_MODES = frozenset({"NONE", "FP8_PER_TENSOR", "FP8_PER_TOKEN_HEAD", "INT8_PER_TOKEN_HEAD"})


class LayoutError(RuntimeError):
    """The engine's KV cache is one the connector does not understand: it refuses to start."""


@dataclass(frozen=True)
class KvLayout:
    """One engine's KV cache layout, as vLLM reports it (all layers of the group share it).

    ``block_shape`` is the logical ``[H, N, C]`` of one block of one layer in elements of
    ``torch_dtype`` (vLLM views FP8 caches as ``uint8``), ``cache_dtype`` the engine's
    ``kv_cache_dtype`` setting, ``physical`` vLLM's resolved ``KVCacheLayout`` name (the stride
    order of the ``[L, B, H, N, C]`` buffer; the connector's bytes are in logical order, so it
    only separates what vLLM would lay out differently).
    """

    spec: str  # the vLLM KV cache spec class, one of SUPPORTED_SPECS
    physical: str  # vLLM's KVCacheLayout member name (LBHNC, LBNHC, ...)
    torch_dtype: str  # e.g. "bfloat16", "uint8" (FP8)
    cache_dtype: str  # e.g. "auto", "fp8_e4m3"
    quant_mode: str  # vLLM's KVQuantMode name
    block_size: int  # tokens per block
    num_kv_heads: int  # KV heads of this rank (1 for MLA)
    head_size: int
    head_size_v: int  # 0 for MLA: one latent, no separate V
    block_shape: tuple[int, int, int]  # logical [H, N, C] of one block of one layer, in elements
    sliding_window: int | None = None  # a sliding-window model run as full attention
    format_version: int = BLOCK_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.spec not in SUPPORTED_SPECS:
            raise LayoutError(
                f"the KV cache spec {self.spec} is not one Zumik's KV connector can copy (it supports "
                f"{', '.join(sorted(SUPPORTED_SPECS))}); set kv_tiers.enabled: false for this model"
            )
        if self.quant_mode not in SUPPORTED_QUANT_MODES:
            raise LayoutError(
                f"the KV cache quantization {self.quant_mode} (kv_cache_dtype {self.cache_dtype}) keeps "
                "state outside the cache blocks, which Zumik's KV connector does not store; use "
                "kv_cache_dtype auto or fp8, or set kv_tiers.enabled: false"
            )

    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def describe(self) -> str:
        h, n, c = self.block_shape
        return (
            f"{self.spec} {self.physical} {self.torch_dtype} ({self.cache_dtype}, {self.quant_mode}), "
            f"block [H={h}, N={n}, C={c}]"
        )


@dataclass(frozen=True)
class KvShard:
    """Which part of an engine's KV one rank holds.

    ``tp_shard`` counts distinct KV shards, not ranks: where vLLM replicates KV across TP ranks
    (MLA, or fewer KV heads than ranks: ``kv_tp_replicas`` consecutive ranks hold identical
    KV), those ranks share one shard and its blocks.
    """

    tp_shard: int = 0
    tp_shards: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.tp_shard < self.tp_shards and 0 <= self.pp_rank < self.pp_size):
            raise LayoutError(f"rank out of range: {self}")

    @classmethod
    def of_rank(cls, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int, tp_replicas: int = 1) -> KvShard:
        replicas = max(int(tp_replicas), 1)
        return cls(tp_rank // replicas, max(tp_size // replicas, 1), pp_rank, pp_size)

    def all_shards(self) -> list[KvShard]:
        """Every shard of the engine, this one's kind (the scheduler plans over all of them)."""
        return [
            KvShard(tp, self.tp_shards, pp, self.pp_size)
            for pp in range(self.pp_size)
            for tp in range(self.tp_shards)
        ]

    def label(self) -> str:
        return f"tp{self.tp_shard}of{self.tp_shards}-pp{self.pp_rank}of{self.pp_size}"


def shard_digest(compat_digest: str, layout: KvLayout, shard: KvShard) -> str:
    """The digest a rank files its blocks under (``BlockAddress.compat_digest``)."""
    text = f"zumik-shard|{compat_digest}|{layout.digest()}|{shard.label()}"
    return hashlib.sha256(text.encode()).hexdigest()


def layout_of(kv_cache_config: Any, *, cache_dtype: str, context_parallel: int = 1) -> KvLayout:
    """The ``KvLayout`` of vLLM's ``KVCacheConfig`` (read by attribute; vLLM is not imported).

    Raises ``LayoutError`` for what the connector cannot store correctly: more than one KV cache
    group (a hybrid model, or sliding-window layers under vLLM's hybrid KV cache manager), a
    spec other than full attention or MLA, states spanning several tokens, quantization with
    state outside the blocks, or context parallelism (a block's tokens spread over ranks).
    """
    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        kinds = ", ".join(type(group.kv_cache_spec).__name__ for group in groups)
        raise LayoutError(
            f"the model has {len(groups)} KV cache groups ({kinds}): a hybrid model (sliding-window, "
            "Mamba or draft layers beside full attention). Zumik's KV connector stores one group "
            "only; set kv_tiers.enabled: false in this profile"
        )
    spec = groups[0].kv_cache_spec
    name = type(spec).__name__
    if name not in SUPPORTED_SPECS:
        raise LayoutError(
            f"the KV cache spec {name} is not one Zumik's KV connector can copy (it supports "
            f"{', '.join(sorted(SUPPORTED_SPECS))}); set kv_tiers.enabled: false in this profile"
        )
    if getattr(spec, "tokens_per_state", 1) != 1:
        raise LayoutError(f"{name} stores one state per {spec.tokens_per_state} tokens: not supported")
    if context_parallel != 1:
        raise LayoutError(
            f"context parallelism ({context_parallel} ranks) spreads a block's tokens over ranks: "
            "Zumik's KV connector does not support it; set kv_tiers.enabled: false"
        )
    physical = getattr(kv_cache_config, "kv_cache_layout", None)
    if not physical:
        raise LayoutError("vLLM did not resolve its KV cache layout before starting the connector")
    dtype = spec.dtype
    itemsize = int(dtype.itemsize)
    content = int(spec.state_content_size_bytes)
    if content % itemsize:
        raise LayoutError(f"{name}: content of {content} bytes is not whole {dtype} elements")
    quant = getattr(spec, "kv_quant_mode", None)
    return KvLayout(
        spec=name,
        physical=str(physical),
        torch_dtype=str(dtype).removeprefix("torch."),
        cache_dtype=str(getattr(spec, "cache_dtype_str", None) or cache_dtype),
        quant_mode=quant.name if quant is not None else "NONE",
        block_size=int(spec.block_size),
        num_kv_heads=int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        head_size_v=int(spec.head_size_v),
        block_shape=(int(spec.num_heads), int(spec.num_states), content // itemsize),
        sliding_window=getattr(spec, "sliding_window", None),
    )


def check_view(layout: KvLayout, layer: str, shape: tuple[int, ...], dtype: str, num_blocks: int) -> None:
    """Raises ``LayoutError`` unless a registered cache view is ``[B, H, N, C]`` (or, split into
    R kernel blocks, ``[B*R, H, N/R, C]``) of ``layout`` with ``num_blocks`` manager blocks."""
    h, n, c = layout.block_shape
    ok = (
        len(shape) == 4
        and dtype == layout.torch_dtype
        and shape[0] % num_blocks == 0
        and (shape[1], shape[3]) == (h, c)
        and shape[2] * (shape[0] // num_blocks) == n
    )
    if not ok:
        raise LayoutError(
            f"layer {layer}: the KV cache view is {list(shape)} {dtype}, not the [B={num_blocks}, H={h}, "
            f"N={n}, C={c}] {layout.torch_dtype} vLLM's KV cache spec describes (or B*R kernel blocks "
            "of N/R tokens): Zumik's KV connector cannot copy it; set kv_tiers.enabled: false"
        )
