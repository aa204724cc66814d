"""ZumikKVConnector: vLLM's KV connector over Zumik's tiers (``KVConnectorBase_V1``).

Loaded by vLLM with ``kv_connector_module_path: kvstore.connector`` and configured through
``kv_connector_extra_config`` (``kvstore_config`` below builds it from a profile):

    compat_digest        the engine's compat key digest (block keys are seeded with it)
    host_capacity_bytes  the host-RAM tier, files in shared memory (0: none); ``shm_root``
                         overrides /dev/shm
    redis_url            the Redis tier (absent: none)
    disk_root            the disk tier (absent: none)
    keyring_redis_url    where the per-scope data keys live (absent: no keyring; then nothing
                         is sealed and purged scopes are not fenced off)
    seal                 seal blocks in the persistent tiers with the scope's data key
    redis_password_file  the Redis user's password, read from this file (the URLs name the
                         user, ``zumik-kv``, and hold no password: vLLM logs this config)

Per request, on the scheduler side:

    prompt token ids ─► block keys (seed = compat digest | request.cache_salt), filed under the
                        salt's scope (``keys.scope_id``)
                     ─► TierManager.plan: longest continuous prefix some tier holds
                     ─► tokens vLLM may load beyond its own prefix cache (whole blocks)

and on the worker side, each step: blocks to load are copied from tier values into the paged KV
cache before the forward (``start_load_kv``); full prompt blocks computed in this step are read
out of the paged cache after it (``wait_for_save``) and stored in every tier. A block copies all
layers at once, on the block dimension of each layer's cache. Any tier failure is a miss (the
engine recomputes); the connector never fails a request.

Per request, what the cache gave it goes back to the caller in the final output's
``kv_transfer_params`` (vLLM's channel for connector results) under ``zumik_kv``:

    {"engine_tokens": <the engine's own prefix cache>, "tiers": {"redis": <tokens>, ...},
     "bytes": <restored>, "ms": <restore time>}

The tier split is the scheduler's plan, corrected by the worker's report when it arrives before
the request finishes (a failed load keeps the request running, so it always does); bytes and
time come from the worker (absent when the request finished in the step that restored it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvstore.codec import decode_block, encode_block
from kvstore.keys import chain_block_keys, scope_id, seed_from_digest
from kvstore.manager import TierManager
from kvstore.tier import BlockAddress, TierEvent
from kvstore.tiers.build import build_manager

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under vLLM's logger tree so that its handler (INFO, with the process name) prints our lines.
logger = logging.getLogger("vllm.zumik.kvstore")
RESTORE_LOG = "zumik kv restore"

STORED_MEMORY_BLOCKS = 100_000
_MANAGERS: dict[tuple[Any, ...], TierManager] = {}
_MANAGERS_LOCK = threading.Lock()


def shared_manager(config: dict[str, Any]) -> TierManager:
    """One TierManager per process and configuration. vLLM's scheduler and worker run in
    different processes; the tiers they share are therefore all outside the process (shared
    memory, Redis, disk)."""
    identity = tuple(sorted((key, str(value)) for key, value in config.items()))
    with _MANAGERS_LOCK:
        manager = _MANAGERS.get(identity)
        if manager is None:
            manager = _MANAGERS[identity] = build_manager(config)
        return manager


@dataclass
class ZumikKVConnectorStats(KVConnectorStats):
    """Tier events since the last report: ``{"<event>:<tier>": [num_blocks, num_bytes]}``.

    vLLM gathers these from the scheduler and the worker each step, logs them, and records them
    as Prometheus metrics (Ray metrics under Ray Serve, with ``log_engine_metrics``).
    """

    def record(self, events: list[TierEvent]) -> ZumikKVConnectorStats:
        for event in events:
            key = f"{event.kind.value}:{event.tier.name.lower()}"
            blocks, num_bytes = self.data.get(key, (0, 0))
            self.data[key] = [blocks + event.num_blocks, num_bytes + event.num_bytes]
        return self

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, (blocks, num_bytes) in other.data.items():
            mine = self.data.get(key, (0, 0))
            self.data[key] = [mine[0] + blocks, mine[1] + num_bytes]
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced: dict[str, int | float] = {}
        for key, (blocks, num_bytes) in sorted(self.data.items()):
            reduced[f"{key}_blocks"] = blocks
            reduced[f"{key}_bytes"] = num_bytes
        return reduced

    def is_empty(self) -> bool:
        return not self.data


class ZumikKVPromMetrics(KVConnectorPromMetrics):
    """``zumik:kv_tier_blocks`` and ``zumik:kv_tier_bytes`` counters by event and tier."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        names = [*labelnames, "event", "tier"]
        self._blocks: Any = self._counter_cls(
            name="zumik:kv_tier_blocks", documentation="KV blocks by tier event (hit, miss, load, store, "
            "eviction, failure) and tier", labelnames=names,
        )  # fmt: skip
        self._bytes: Any = self._counter_cls(
            name="zumik:kv_tier_bytes", documentation="KV bytes loaded or stored, by tier event and tier",
            labelnames=names,
        )  # fmt: skip

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        base = self.per_engine_labelvalues[engine_idx]
        for key, (blocks, num_bytes) in transfer_stats_data.items():
            event, tier = key.split(":", 1)
            self._blocks.labels(*base, event, tier).inc(blocks)
            if num_bytes:
                self._bytes.labels(*base, event, tier).inc(num_bytes)


@dataclass
class _Transfer:
    request_id: str
    block_ids: list[int]  # engine block ids, one per address
    addresses: list[BlockAddress]


@dataclass
class ZumikConnectorMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    stores: list[_Transfer] = field(default_factory=list)


@dataclass
class RestoreReport:
    """What one request restored from the tiers in one step (worker side)."""

    tiers: dict[str, int]  # tier name -> blocks restored
    num_bytes: int
    seconds: float


@dataclass
class ZumikWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: the restores each request really got."""

    restores: dict[str, RestoreReport] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, ZumikWorkerMetadata):
            self.restores.update(other.restores)
        return self


class ZumikKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._compat_digest = str(extra["compat_digest"])
        self._block_size = int(vllm_config.cache_config.block_size)
        self._manager = shared_manager(extra)
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._load_errors: set[int] = set()
        # scheduler side: per request, the addresses it may load and how many tokens that is
        self._pending_loads: dict[str, list[BlockAddress]] = {}
        self._load_plans: dict[str, tuple[int, list[BlockAddress]]] = {}
        # scheduler side: per request, the engine's own hit and what the tiers gave (zumik_kv)
        self._reuse: dict[str, dict[str, Any]] = {}
        self._planned_tiers: dict[str, dict[str, int]] = {}
        # worker side: restores done since the last step's worker metadata
        self._worker_restores: dict[str, RestoreReport] = {}
        # Addresses this engine already stored, newest last, bounded (a re-store is only waste).
        self._stored: OrderedDict[BlockAddress, None] = OrderedDict()
        self._salts: dict[str, str | None] = {}
        # Requests whose KV depends on more than their tokens (a LoRA adapter, multimodal
        # inputs): the block keys cannot tell them apart, so they never load from or store to
        # a tier. Counted per reason until the next stats report.
        self._bypassing: set[str] = set()
        self._bypassed: dict[str, int] = {}

    # --- scheduler side ---------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        self._salts[request.request_id] = request.cache_salt
        self._reuse[request.request_id] = {"engine_tokens": int(num_computed_tokens), "tiers": {}}
        reason = _bypass_reason(request)
        if reason is not None:
            if request.request_id not in self._bypassing:
                self._bypassing.add(request.request_id)
                self._bypassed[reason] = self._bypassed.get(reason, 0) + 1
            return 0, False
        token_ids = list(request.prompt_token_ids or [])
        # The last prompt token is always computed by the engine (it yields the first logits).
        loadable = (len(token_ids) - 1) // self._block_size * self._block_size
        if loadable <= num_computed_tokens:
            return 0, False
        keys = chain_block_keys(
            token_ids[:loadable], self._block_size, seed_from_digest(self._compat_digest, request.cache_salt)
        )
        scope = scope_id(request.cache_salt)
        addresses = [BlockAddress(self._compat_digest, key, scope) for key in keys]
        plan = self._manager.plan(addresses)
        restorable = plan.num_blocks * self._block_size
        if restorable <= num_computed_tokens:
            return 0, False
        first_block = num_computed_tokens // self._block_size
        self._load_plans[request.request_id] = (first_block, list(plan.addresses[first_block:]))
        tiers: dict[str, int] = {}
        for tier in plan.sources[first_block:]:
            tiers[tier.name.lower()] = tiers.get(tier.name.lower(), 0) + self._block_size
        self._planned_tiers[request.request_id] = tiers
        return restorable - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        plan = self._load_plans.pop(request.request_id, None)
        planned = self._planned_tiers.pop(request.request_id, {})
        if num_external_tokens > 0 and plan is not None:
            self._pending_loads[request.request_id] = plan[1]
            self._reuse.setdefault(request.request_id, {"engine_tokens": 0})["tiers"] = planned

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(meta, ZumikWorkerMetadata):
            return
        for request_id, report in meta.restores.items():
            entry = self._reuse.get(request_id)
            if entry is None:  # finished already (it restored and finished in one step)
                continue
            entry["tiers"] = {tier: blocks * self._block_size for tier, blocks in report.tiers.items()}
            entry["bytes"] = entry.get("bytes", 0) + report.num_bytes
            entry["ms"] = round(entry.get("ms", 0.0) + report.seconds * 1000, 3)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = ZumikConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            block_ids = list(new.block_ids[0])
            token_ids = list(new.prompt_token_ids or [])
            if new.req_id in self._bypassing:
                continue
            addresses = self._pending_loads.pop(new.req_id, None)
            if addresses:
                first = new.num_computed_tokens // self._block_size - len(addresses)
                first = max(first, 0)
                meta.loads.append(_Transfer(new.req_id, block_ids[first : first + len(addresses)], addresses))
            # Store the full prompt blocks this step computes; blocks before num_computed_tokens
            # came from a cache (the engine's own or a tier) and are not stored again.
            scheduled = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            computed_after = min(new.num_computed_tokens + scheduled, len(token_ids))
            first_new = new.num_computed_tokens // self._block_size
            full_blocks = computed_after // self._block_size
            if full_blocks <= first_new:
                continue
            salt = self._salts.get(new.req_id)
            seed = seed_from_digest(self._compat_digest, salt)
            keys = chain_block_keys(token_ids[: full_blocks * self._block_size], self._block_size, seed)
            scope = scope_id(salt)
            store = [
                (block_ids[index], BlockAddress(self._compat_digest, keys[index], scope))
                for index in range(first_new, min(full_blocks, len(block_ids)))
            ]
            store = [(b, a) for b, a in store if a not in self._stored]
            if store:
                for _, address in store:
                    self._stored[address] = None
                while len(self._stored) > STORED_MEMORY_BLOCKS:
                    self._stored.popitem(last=False)
                meta.stores.append(_Transfer(new.req_id, [b for b, _ in store], [a for _, a in store]))
        self._pending_loads.clear()
        return meta

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        events = self._manager.take_events()
        if not events and not self._bypassed:
            return None
        stats = ZumikKVConnectorStats(data={}).record(events)
        for reason, requests in self._bypassed.items():
            stats.data[f"bypassed:{reason}"] = [requests, 0]  # requests, not blocks
        self._bypassed = {}
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return ZumikKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return ZumikKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._salts.pop(request.request_id, None)
        self._bypassing.discard(request.request_id)
        self._load_plans.pop(request.request_id, None)
        self._planned_tiers.pop(request.request_id, None)
        reuse = self._reuse.pop(request.request_id, None)
        return False, ({"zumik_kv": reuse} if reuse is not None else None)

    # --- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        for name, tensor in list(self._kv_caches.items())[:1]:
            logger.info("zumik kv connector: layer %s cache %s %s", name, tuple(tensor.shape), tensor.dtype)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ZumikConnectorMetadata)
        for transfer in meta.loads:
            started = time.perf_counter()
            plan = self._manager.plan(transfer.addresses)
            values = self._manager.load(plan)
            restored = 0
            for index, (block_id, address) in enumerate(
                zip(transfer.block_ids, transfer.addresses, strict=True)
            ):
                tensors = decode_block(values[index], address) if index < len(values) else None
                if tensors is None or not self._inject(block_id, tensors):
                    # vLLM recomputes from the first block that did not load (policy "recompute").
                    self._load_errors.update(transfer.block_ids[index:])
                    logger.warning("zumik kv: %d block(s) not restorable; the engine recomputes them",
                                   len(transfer.block_ids) - index)  # fmt: skip
                    break
                restored += 1
            by_tier: dict[str, int] = {}
            for tier in plan.sources[:restored]:
                by_tier[tier.name.lower()] = by_tier.get(tier.name.lower(), 0) + 1
            elapsed = time.perf_counter() - started
            num_bytes = sum(len(value) for value in values[:restored])
            self._worker_restores[transfer.request_id] = RestoreReport(by_tier, num_bytes, elapsed)
            sources = ",".join(sorted(by_tier))
            logger.info(
                "%s blocks=%d bytes=%d seconds=%.6f tiers=%s", RESTORE_LOG, restored,
                num_bytes, elapsed, sources,
            )  # fmt: skip

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._worker_restores:
            return None
        restores, self._worker_restores = self._worker_restores, {}
        return ZumikWorkerMetadata(restores=restores)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _inject(self, block_id: int, tensors: dict[str, np.ndarray]) -> bool:
        for name, cache in self._kv_caches.items():
            target = cache[block_id]
            source = tensors.get(name)
            if source is None or source.nbytes != target.numel() * target.element_size():
                return False
            target.copy_(torch.from_numpy(source).view(cache.dtype).reshape(target.shape))
        return True

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ZumikConnectorMetadata)
        for transfer in meta.stores:
            for block_id, address in zip(transfer.block_ids, transfer.addresses, strict=True):
                tensors = {
                    name: cache[block_id].detach().cpu().contiguous().view(torch.uint8).numpy()
                    for name, cache in self._kv_caches.items()
                }
                self._manager.store(address, encode_block(tensors, address))


def _bypass_reason(request: Request) -> str | None:
    """Why ``request``'s KV cannot be filed under its tokens alone, or None when it can."""
    if getattr(request, "lora_request", None) is not None:
        return "lora"
    if getattr(request, "mm_features", None):
        return "multimodal"
    return None
