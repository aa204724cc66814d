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
    disk_capacity_bytes  the disk tier's byte budget (LRU); host_capacity_bytes is per node
    write_behind_max_bytes  bound of the store queue (default 256 MiB; beyond it stores drop)
    write_behind_process  stores written by a child process (``store_process.py``, the
                         default) rather than a thread of the engine process (false)

Per request, on the scheduler side:

    prompt token ids ─► block keys (seed = compat digest | request.cache_salt), filed under the
                        salt's scope (``keys.scope_id``)
                     ─► TierManager.plan: longest continuous prefix some tier holds
                     ─► tokens vLLM may load beyond its own prefix cache (whole blocks)

and on the worker side, each step: blocks to load are read from the tiers (one read per tier
for the whole run: ``TierManager.restore``) straight into the paged KV cache before the forward
(``start_load_kv``: a host or disk block file is read into the cache's own blocks, with no
buffer in between, on vLLM's CPU layout; a Redis reply lands in a reused buffer and each block
is copied once); full prompt blocks computed in this step are copied out of the
paged cache after it, one gather per layer for all of the step's blocks (``wait_for_save``),
and handed to the write-behind queue (``write_behind.py``; its writer a child process,
``store_process.py``), which encodes them and stores them in every tier: the step never waits
on a tier, and vLLM may reuse the blocks as soon as the step ends because the copy is already
out. Promotions of restored blocks go the same way. Any tier
failure is a miss (the engine recomputes), a full store queue a dropped store (counted); the
connector never fails a request.

Per request, what the cache gave it goes back to the caller in the final output's
``kv_transfer_params`` (vLLM's channel for connector results) under ``zumik_kv``:

    {"engine_tokens": <the engine's own prefix cache>, "tiers": {"redis": <tokens>, ...},
     "bytes": <restored>, "ms": <restore time>}

The tier split is the scheduler's plan, corrected by the worker's report when it arrives before
the request finishes (a failed load keeps the request running, so it always does); bytes and
time come from the worker (absent when the request finished in the step that restored it).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
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

from kvstore.codec import KnownHeaders
from kvstore.compat import CompatKey, CompatMismatch, check_engine_compat
from kvstore.cpu_placement import spare_cpus
from kvstore.fingerprint import adapter_fingerprint
from kvstore.keys import ScopeId, adapter_seed, chain_block_keys, scope_id, seed_from_digest
from kvstore.layout import KvLayout, KvShard, LayoutError, check_view, layout_of, shard_digest
from kvstore.manager import KvPlan, Placed, TierManager
from kvstore.store_process import StoreProcess
from kvstore.tier import BlockAddress, TierEvent, TierUsage
from kvstore.tiers.build import build_manager
from kvstore.transfer import BlockCopier, restore_into
from kvstore.write_behind import EncodeBlocks, StoreBatch, StoreQueue, Values, WriteBehind

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
HEADER_ROOM_BYTES = 4096  # a block value's bytes beyond its tensors' (header, seal, framing)
WRITE_BEHIND_MAX_BYTES = 256 << 20
_MANAGERS: dict[tuple[Any, ...], TierManager] = {}
WRITE_BEHIND_PROCESS = True
_WRITERS: dict[int, StoreQueue] = {}
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


def flush_writes(timeout_s: float = 60.0) -> bool:
    """Wait until this process's write-behind queues are written (a harness that restores what
    it just computed, e.g. ``zumik bench tiers``; vLLM's ``collective_rpc`` runs it on workers)."""
    with _MANAGERS_LOCK:
        writers = list(_WRITERS.values())
    return all(writer.flush(timeout_s) for writer in writers)


def shared_writer(config: dict[str, Any], manager: TierManager) -> StoreQueue:
    """The write-behind queue of ``manager`` (one per process and configuration, worker side),
    its writer on the cores the forward's threads leave (``cpu_placement``): a child process
    with tiers of its own built from ``config`` (``write_behind_process``, the default), else
    a thread of this process writing through ``manager``."""
    with _MANAGERS_LOCK:
        writer = _WRITERS.get(id(manager))
        if writer is None:
            limit = int(config.get("write_behind_max_bytes") or WRITE_BEHIND_MAX_BYTES)
            in_child = _flag(config.get("write_behind_process", WRITE_BEHIND_PROCESS))
            writer = _WRITERS[id(manager)] = (
                StoreProcess(manager, config, max_pending_bytes=limit, cpus=spare_cpus())
                if in_child
                else WriteBehind(manager, max_pending_bytes=limit, cpus=spare_cpus())
            )
        return writer


def _flag(value: Any) -> bool:
    """A boolean of the extra config, which may come as a string (``--kv-transfer-config``)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


@dataclass
class ZumikKVConnectorStats(KVConnectorStats):
    """Tier events since the last report: ``{"<event>:<tier>": [num_blocks, num_bytes]}``, and
    the tiers' occupancy when measured since: ``{"usage:<tier>": [used_bytes, capacity_bytes]}``
    (capacity 0: unbounded or unknown; a later figure replaces an earlier one, never adds).

    vLLM gathers these from the scheduler and the worker each step, logs them, and records them
    as Prometheus metrics (Ray metrics under Ray Serve, with ``log_engine_metrics``).
    """

    def record(self, events: list[TierEvent]) -> ZumikKVConnectorStats:
        for event in events:
            key = f"{event.kind.value}:{event.tier.name.lower()}"
            blocks, num_bytes = self.data.get(key, (0, 0))
            self.data[key] = [blocks + event.num_blocks, num_bytes + event.num_bytes]
        return self

    def record_usage(self, usage: Sequence[TierUsage]) -> ZumikKVConnectorStats:
        for tier_usage in usage:
            key = f"{USAGE}:{tier_usage.tier.name.lower()}"
            self.data[key] = [tier_usage.used_bytes, tier_usage.capacity_bytes or 0]
        return self

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, (blocks, num_bytes) in other.data.items():
            if key.startswith(f"{USAGE}:"):
                self.data[key] = [blocks, num_bytes]  # a gauge: the later figure
                continue
            mine = self.data.get(key, (0, 0))
            self.data[key] = [mine[0] + blocks, mine[1] + num_bytes]
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced: dict[str, int | float] = {}
        for key, (first, second) in sorted(self.data.items()):
            names = ("used_bytes", "capacity_bytes") if key.startswith(f"{USAGE}:") else ("blocks", "bytes")
            reduced[f"{key}_{names[0]}"] = first
            reduced[f"{key}_{names[1]}"] = second
        return reduced

    def is_empty(self) -> bool:
        return not self.data


USAGE = "usage"
GAUGE_REFRESH_S = 5.0  # under Ray's gauge TTL: twice its 10 s export interval by default


class ZumikKVPromMetrics(KVConnectorPromMetrics):
    """``zumik:kv_tier_blocks`` and ``zumik:kv_tier_bytes`` counters by event and tier (events
    include ``eviction`` and ``dropped``: stores the write-behind queue had no room for, tier
    ``engine``); ``zumik:kv_tier_used_bytes`` and ``zumik:kv_tier_capacity_bytes`` gauges by
    tier (the host tier's are the node's, the Redis tier's its server's).

    vLLM hands the tiers' occupancy over only in engine steps, and Ray's metrics agent drops a
    gauge that was not set again within two export intervals: an idle engine's occupancy would
    vanish from the dashboard. A daemon thread sets the last figures again every
    ``GAUGE_REFRESH_S``, so the series shows the last occupancy the engine measured."""

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
        tier_names = [*labelnames, "tier"]
        self._used: Any = self._gauge_cls(
            name="zumik:kv_tier_used_bytes", documentation="Bytes a KV tier holds now (host: the node's "
            "shared memory folder; redis: the KV server's used_memory)", labelnames=tier_names,
        )  # fmt: skip
        self._capacity: Any = self._gauge_cls(
            name="zumik:kv_tier_capacity_bytes", documentation="A KV tier's byte bound (0: none known)",
            labelnames=tier_names,
        )  # fmt: skip
        self._last_usage: dict[tuple[object, ...], tuple[int, int]] = {}  # labels -> used, capacity
        self._usage_lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        base = self.per_engine_labelvalues[engine_idx]
        for key, (blocks, num_bytes) in transfer_stats_data.items():
            event, tier = key.split(":", 1)
            if event == USAGE:
                self._set_usage((*base, tier), blocks, num_bytes)
                continue
            self._blocks.labels(*base, event, tier).inc(blocks)
            if num_bytes:
                self._bytes.labels(*base, event, tier).inc(num_bytes)

    def _set_usage(self, labels: tuple[object, ...], used: int, capacity: int) -> None:
        with self._usage_lock:
            self._last_usage[labels] = (used, capacity)
            self._publish_usage()
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, name="zumik-kv-gauges", daemon=True)
                self._refresher.start()

    def _publish_usage(self) -> None:
        """Set both gauges of every tier to its last figures (the caller holds the lock)."""
        for labels, (used, capacity) in self._last_usage.items():
            self._used.labels(*labels).set(used)
            self._capacity.labels(*labels).set(capacity)

    def _refresh(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._usage_lock:
                self._publish_usage()


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

    def with_rank(self, other: RestoreReport) -> RestoreReport:
        """This rank's report and ``other``'s, of the same request and step, as one."""
        shorter = other if sum(other.tiers.values()) < sum(self.tiers.values()) else self
        return RestoreReport(
            dict(shorter.tiers), self.num_bytes + other.num_bytes, max(self.seconds, other.seconds)
        )


@dataclass
class ZumikWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: the restores each request really got."""

    restores: dict[str, RestoreReport] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Every rank's reports of a step made one (vLLM's output aggregator): a request's restore
        is as long as the shortest rank's (the blocks every rank has), its bytes all ranks' and
        its time the slowest rank's (they restore side by side)."""
        if isinstance(other, ZumikWorkerMetadata):
            for request_id, theirs in other.restores.items():
                mine = self.restores.get(request_id)
                self.restores[request_id] = theirs if mine is None else mine.with_rank(theirs)
        return self


class ZumikKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._compat_digest = str(extra["compat_digest"])
        self._block_size = int(vllm_config.cache_config.block_size)
        if role == KVConnectorRole.SCHEDULER:  # once per engine, on the engine's node
            _check_engine_compat(vllm_config, extra)
        # What the blocks' bytes depend on beyond the compat key (refuses what it cannot copy),
        # and the shards blocks are filed under: this rank's (worker side, set when the caches
        # are registered) and every rank's (the scheduler plans a block only if all hold it).
        self._layout = _engine_layout(vllm_config, kv_cache_config)
        shards = _engine_shard(vllm_config, kv_cache_config, 0, 0).all_shards()
        self._shard_digests = [shard_digest(self._compat_digest, self._layout, shard) for shard in shards]
        self._shard = self._shard_digests[0]  # the scheduler sends rank 0's addresses
        self._copier: BlockCopier | None = None
        self._headers = KnownHeaders()  # worker side: block headers its restores checked
        self._key_sources: dict[str, _KeySource] = {}
        self._adapter_fingerprints: dict[str, str] = {}
        self._manager = shared_manager(extra)
        self._extra = extra
        self._writer: StoreQueue | None = None  # worker side, made at the first store
        self._usage_reported: Sequence[TierUsage] | None = None
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._load_errors: set[int] = set()
        # scheduler side: per request, the first block past vLLM's own hit and the addresses the
        # tiers may give from there (the lookup's plan), then the load vLLM allocated blocks for
        self._load_plans: dict[str, tuple[int, list[BlockAddress]]] = {}
        self._pending_loads: dict[str, _Transfer] = {}
        # scheduler side: per request, its prompt's token ids (until it finishes), and the
        # requests whose prompt is not all computed yet (a long prompt's prefill comes in
        # chunks, one a step, and each chunk's full blocks are stored)
        self._prompts: dict[str, Sequence[int]] = {}
        self._prefilling: set[str] = set()
        # scheduler side: per request, the hits and misses of its last lookup (rank 0's view of
        # what every rank holds), logged when vLLM schedules it
        self._lookup_events: dict[str, list[TierEvent]] = {}
        # scheduler side: per request, the engine's own hit and what the tiers gave (zumik_kv)
        self._reuse: dict[str, dict[str, Any]] = {}
        self._planned_tiers: dict[str, dict[str, int]] = {}
        # worker side: restores done since the last step's worker metadata
        self._worker_restores: dict[str, RestoreReport] = {}
        # Addresses this engine already stored, newest last, bounded (a re-store is only waste).
        # A lookup forgets those the tiers turn out not to hold (``get_num_new_matched_tokens``).
        self._stored: OrderedDict[BlockAddress, None] = OrderedDict()
        # scheduler side: per request, rank 0's addresses of its full prompt blocks
        self._addresses: dict[str, list[BlockAddress]] = {}
        # Requests whose KV depends on something the block keys cannot name (an adapter vLLM
        # gives no readable path for): they never load from or store to a tier. Counted per
        # reason until the next stats report.
        self._bypassing: set[str] = set()
        self._bypassed: dict[str, int] = {}

    # --- scheduler side ---------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens the tiers can give beyond vLLM's own prefix cache. Only blocks past vLLM's hit
        are looked up, and none when it has every full block before the last prompt token
        (that token is always computed: it yields the first logits): then this costs no tier
        call and derives no block key."""
        request_id = request.request_id
        self._reuse[request_id] = {"engine_tokens": int(num_computed_tokens), "tiers": {}}
        self._lookup_events.pop(request_id, None)  # an earlier lookup's, which this one replaces
        source = self._key_sources.get(request_id)
        if source is None and request_id not in self._bypassing:
            source = self._key_source(request)
        if source is None:
            return 0, False
        token_ids = request.prompt_token_ids or ()
        first_block = num_computed_tokens // self._block_size  # vLLM's hit ends in or after it
        loadable_blocks = (len(token_ids) - 1) // self._block_size
        if loadable_blocks <= first_block:
            return 0, False
        wanted = self._block_addresses(request_id, token_ids)[first_block:loadable_blocks]
        plan = self._manager.plan(wanted, record=False)
        num_blocks = plan.num_blocks
        for other in self._shard_digests[1:]:  # every rank must hold a block for it to load
            if num_blocks:
                mine = [BlockAddress(other, a.key, a.scope) for a in wanted[:num_blocks]]
                num_blocks = min(num_blocks, self._manager.plan(mine, record=False).num_blocks)
        # The hits and misses count once the request is scheduled (``update_state_after_alloc``):
        # vLLM asks again, step after step, about a request it cannot schedule yet.
        usable = KvPlan(addresses=plan.addresses[:num_blocks], sources=plan.sources[:num_blocks])
        self._lookup_events[request_id] = self._manager.plan_events(usable, len(wanted))
        for address in wanted[num_blocks:]:
            # Not held (past the first block a tier lacks, on some rank): if this engine stored
            # it, the copy is gone (evicted, expired, purged, or a store that was dropped or
            # failed), so it is stored again the next time it is computed.
            self._stored.pop(address, None)
        restorable = (first_block + num_blocks) * self._block_size
        if restorable <= num_computed_tokens:
            return 0, False
        self._load_plans[request_id] = (first_block, list(plan.addresses[:num_blocks]))
        tiers: dict[str, int] = {}
        for tier in plan.sources[:num_blocks]:
            tiers[tier.name.lower()] = tiers.get(tier.name.lower(), 0) + self._block_size
        self._planned_tiers[request_id] = tiers
        return restorable - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """The load of a request vLLM accepted tokens from the tiers for, into the blocks it
        allocated for them (``blocks``: all the request's blocks, vLLM's hit first). Named here,
        not from the step's new requests: a request resumed after a preemption is not one of them
        with vLLM's V1 model runner (the one CPU engines use), and a load left out would have
        the engine take those blocks' stale contents for the prompt's KV."""
        request_id = request.request_id
        for event in self._lookup_events.pop(request_id, ()):
            self._manager.record(event)
        plan = self._load_plans.pop(request_id, None)
        planned = self._planned_tiers.pop(request_id, {})
        if num_external_tokens > 0 and plan is not None:
            first_block, addresses = plan
            block_ids = blocks.get_block_ids()[0][first_block : first_block + len(addresses)]
            if len(block_ids) != len(addresses):  # vLLM allocates every block it accepted
                raise RuntimeError(
                    f"request {request_id}: {len(addresses)} block(s) accepted from the tiers, "
                    f"{len(block_ids)} allocated for them"
                )
            self._pending_loads[request_id] = _Transfer(request_id, list(block_ids), addresses)
            self._reuse.setdefault(request_id, {"engine_tokens": 0})["tiers"] = planned

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
        """This step's loads (every request vLLM allocated tier blocks for, new or resumed) and
        stores: the full prompt blocks each scheduled request computes in this step, the
        first chunk of a new prompt, each later chunk of a long one, and a resumed request's
        recomputed blocks (those the tiers already hold are not written again)."""
        meta = ZumikConnectorMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._bypassing:
                continue
            token_ids = new.prompt_token_ids or ()
            self._prompts[new.req_id] = token_ids
            self._store_computed(meta, new.req_id, new.block_ids[0], new.num_computed_tokens,
                                 scheduled.get(new.req_id, 0), token_ids)  # fmt: skip
        cached = scheduler_output.scheduled_cached_reqs
        resumed = cached.resumed_req_ids
        if self._prefilling or resumed:  # else every cached request is decoding: nothing to store
            block_state = scheduler_output.kv_connector_block_state
            for index, request_id in enumerate(cached.req_ids):
                if request_id not in self._prefilling and request_id not in resumed:
                    continue
                prompt = self._prompts.get(request_id)
                block_ids = block_state.get_block_ids(request_id) if block_state is not None else None
                if prompt is None or not block_ids:
                    self._prefilling.discard(request_id)
                    continue
                self._store_computed(meta, request_id, block_ids[0], cached.num_computed_tokens[index],
                                     scheduled.get(request_id, 0), prompt)  # fmt: skip
        return meta

    def _store_computed(
        self, meta: ZumikConnectorMetadata, request_id: str, block_ids: Sequence[int], num_computed: int,
        num_scheduled: int, token_ids: Sequence[int],
    ) -> None:  # fmt: skip
        """Add to ``meta`` the stores of the full prompt blocks that ``request_id`` computes in
        this step (from ``num_computed`` tokens on, ``num_scheduled`` more); blocks before
        ``num_computed`` came from a cache (the engine's own or a tier) and are not stored
        again, nor is a block this engine stored before."""
        computed_after = min(num_computed + num_scheduled, len(token_ids))
        if computed_after < len(token_ids):
            self._prefilling.add(request_id)
        else:
            self._prefilling.discard(request_id)
        first_new = num_computed // self._block_size
        full_blocks = min(computed_after // self._block_size, len(block_ids))
        if full_blocks <= first_new:
            return
        if request_id not in self._key_sources:
            return  # its keys were never derived: nothing is stored rather than misfiled
        block_addresses = self._block_addresses(request_id, token_ids)
        store = [
            (block_ids[index], block_addresses[index])
            for index in range(first_new, full_blocks)
            if block_addresses[index] not in self._stored
        ]
        if not store:
            return
        for _, address in store:
            self._stored[address] = None
        while len(self._stored) > STORED_MEMORY_BLOCKS:
            self._stored.popitem(last=False)
        meta.stores.append(_Transfer(request_id, [b for b, _ in store], [a for _, a in store]))

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        events = self._manager.take_events()
        usage = self._writer.usage if self._writer is not None else ()
        measured_anew = usage is not self._usage_reported and usage != self._usage_reported
        if not events and not self._bypassed and not measured_anew:
            return None
        self._usage_reported = usage
        stats = ZumikKVConnectorStats(data={}).record(events).record_usage(usage if measured_anew else ())
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
        self._key_sources.pop(request.request_id, None)
        self._addresses.pop(request.request_id, None)
        self._prompts.pop(request.request_id, None)
        self._prefilling.discard(request.request_id)
        self._lookup_events.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._bypassing.discard(request.request_id)
        self._load_plans.pop(request.request_id, None)
        self._planned_tiers.pop(request.request_id, None)
        reuse = self._reuse.pop(request.request_id, None)
        if reuse is not None:
            reuse["shard"] = self._shard  # where rank 0 filed its blocks (a gateway's KvProbe)
        return False, ({"zumik_kv": reuse} if reuse is not None else None)

    def _key_source(self, request: Request) -> _KeySource | None:
        """How ``request``'s block keys are derived (remembered until it finishes), or None when
        they cannot name what its KV depends on: then it bypasses the tiers, counted."""
        seed = seed_from_digest(self._compat_digest, request.cache_salt)
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            identity = self._adapter_identity(lora)
            if identity is None:
                self._bypassing.add(request.request_id)
                self._bypassed["lora"] = self._bypassed.get("lora", 0) + 1
                return None
            seed = adapter_seed(seed, *identity)
        source = _KeySource(seed, scope_id(request.cache_salt), _block_extras(request, self._block_size))
        self._key_sources[request.request_id] = source
        return source

    def _adapter_identity(self, lora: Any) -> tuple[str, str] | None:
        """(name, fingerprint of the adapter's files) of a LoRA request, or None when vLLM names
        no adapter folder this process can read (the fingerprint is taken once per path)."""
        path = str(getattr(lora, "lora_path", "") or "")
        if not path:
            return None
        fingerprint = self._adapter_fingerprints.get(path)
        if fingerprint is None:
            try:
                fingerprint = adapter_fingerprint(Path(path))
            except OSError:
                return None
            self._adapter_fingerprints[path] = fingerprint
        return str(getattr(lora, "lora_name", "")), fingerprint

    def _block_addresses(self, request_id: str, token_ids: Sequence[int]) -> list[BlockAddress]:
        """Rank 0's addresses of every full block of the request's prompt ``token_ids``
        (``_key_source`` ran), derived once per request: the lookup and the store share them."""
        addresses = self._addresses.get(request_id)
        if addresses is None or len(addresses) != len(token_ids) // self._block_size:
            source = self._key_sources[request_id]
            keys = chain_block_keys(token_ids, self._block_size, source.seed, source.extras)
            addresses = [BlockAddress(self._shard, key, source.scope) for key in keys]
            self._addresses[request_id] = addresses
        return addresses

    # --- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Checks every layer's view against the layout vLLM's spec describes (refusing to
        start otherwise) and files this rank's blocks under its own shard."""
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        num_blocks = int(self._kv_cache_config.num_blocks)
        for name, tensor in kv_caches.items():
            dtype = str(tensor.dtype).removeprefix("torch.")
            check_view(self._layout, name, tuple(tensor.shape), dtype, num_blocks)
        self._kv_caches = dict(kv_caches)
        self._copier = BlockCopier(self._kv_caches, num_blocks)
        # A restore's one-time costs (a connection, a reply buffer) paid now, not by the first
        # request that restores: a request restores at most its whole context.
        max_blocks = -(-int(self._vllm_config.model_config.max_model_len) // self._block_size)
        self._manager.prepare_restores(max_blocks * (self._copier.bytes_per_block + HEADER_ROOM_BYTES))
        tp_rank, pp_rank = get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
        shard = _engine_shard(self._vllm_config, self._kv_cache_config, tp_rank, pp_rank)
        self._shard = shard_digest(self._compat_digest, self._layout, shard)
        logger.info(
            "zumik kv connector: %d layers, %s, %d bytes a block, shard %s (%s)", len(kv_caches),
            self._layout.describe(), self._copier.bytes_per_block, shard.label(), self._shard[:16],
        )  # fmt: skip

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a store never holds blocks past its step (``wait_for_save``
        copies them out), so a preempted request's hand-off is never pending."""
        return False

    def has_connector_metadata(self) -> bool:
        """False unless this step has blocks to load or store: vLLM then skips the per-layer
        hooks (``wait_for_layer_load``, ``save_kv_layer``; once per layer per step), which
        have nothing to do here anyway (loads happen before the forward, stores after it)."""
        meta = self._connector_metadata
        return isinstance(meta, ZumikConnectorMetadata) and bool(meta.loads or meta.stores)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """The scheduler names rank 0's addresses; this rank loads and stores its own shard's
        (same keys and scopes, its own digest), so no rank ever reads another's block."""
        if (
            isinstance(connector_metadata, ZumikConnectorMetadata)
            and self._shard != self._shard_digests[0]
            and (connector_metadata.loads or connector_metadata.stores)
        ):
            connector_metadata = ZumikConnectorMetadata(
                loads=[self._for_this_rank(transfer) for transfer in connector_metadata.loads],
                stores=[self._for_this_rank(transfer) for transfer in connector_metadata.stores],
            )
        super().bind_connector_metadata(connector_metadata)

    def _for_this_rank(self, transfer: _Transfer) -> _Transfer:
        addresses = []
        for address in transfer.addresses:
            if address.compat_digest != self._shard_digests[0]:
                raise LayoutError(
                    f"the scheduler filed a block under {address.compat_digest[:16]}, not rank 0's "
                    f"shard {self._shard_digests[0][:16]} of this worker's layout: the two disagree "
                    "on the KV layout"
                )
            addresses.append(BlockAddress(self._shard, address.key, address.scope))
        return _Transfer(transfer.request_id, list(transfer.block_ids), addresses)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, ZumikConnectorMetadata):
            raise TypeError(f"ZumikKVConnector was bound {type(meta).__name__}, not its own metadata")
        for transfer in meta.loads:
            started = time.perf_counter()
            placed = self._restore(transfer)
            restored = placed.num_blocks
            if restored < len(transfer.block_ids):
                # vLLM recomputes from the first block that did not load (policy "recompute").
                self._load_errors.update(transfer.block_ids[restored:])
                logger.warning("zumik kv: %d block(s) not restorable; the engine recomputes them",
                               len(transfer.block_ids) - restored)  # fmt: skip
            by_tier: dict[str, int] = {}
            for tier in placed.sources:
                by_tier[tier.name.lower()] = by_tier.get(tier.name.lower(), 0) + 1
            self._promote(placed)
            elapsed = time.perf_counter() - started
            num_bytes = placed.num_bytes
            self._worker_restores[transfer.request_id] = RestoreReport(by_tier, num_bytes, elapsed)
            sources = ",".join(sorted(by_tier))
            logger.info(
                "%s blocks=%d bytes=%d seconds=%.6f tiers=%s", RESTORE_LOG, restored,
                num_bytes, elapsed, sources,
            )  # fmt: skip

    def _restore(self, transfer: _Transfer) -> Placed:
        """The transfer's blocks read from the tiers straight into the paged cache (one read per
        tier for the run: ``TierManager.restore``; on vLLM's CPU layout each file is read into
        the cache's own blocks, on CUDA into pinned staging copied over on a side stream:
        ``transfer.restore_into``)."""
        if self._copier is None:
            return Placed((), (), (), {})
        target = self._copier.restore_target(transfer.block_ids)
        try:
            return restore_into(self._manager, target, transfer.addresses, self._headers)
        except Exception:  # a tier's bug is a miss: the engine recomputes, the request goes on
            logger.exception("zumik kv: loading from the tiers failed")
            return Placed((), (), (), {})

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._worker_restores:
            return None
        restores, self._worker_restores = self._worker_restores, {}
        return ZumikWorkerMetadata(restores=restores)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _inject(self, block_id: int, tensors: dict[str, np.ndarray]) -> bool:
        """Copy one decoded block into the paged cache; False (nothing written) when it lacks a
        layer or a layer's bytes are not one block of it."""
        return self._inject_many([block_id], [tensors]) == 1

    def _inject_many(self, block_ids: list[int], blocks: list[dict[str, np.ndarray]]) -> int:
        """Copy decoded blocks into the paged cache in one batch (``transfer.BlockCopier``: on
        CUDA pinned staging and a side stream the forward waits on); how many were written,
        from the first: it stops at the first malformed block."""
        if self._copier is None:
            return 0
        return self._copier.inject(block_ids, blocks)

    def _extract(self, block_id: int) -> dict[str, np.ndarray]:
        """One block of every layer as owned bytes in canonical [H, N, C] order (``transfer``)."""
        return self._copy_out([block_id])[0]

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        """Copy this step's new blocks out of the paged cache (in the step: vLLM may reuse them
        once it ends) and hand them to the write-behind queue (the store process); never waits on a tier."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, ZumikConnectorMetadata):
            raise TypeError(f"ZumikKVConnector was bound {type(meta).__name__}, not its own metadata")
        if not meta.stores or not self._kv_caches:
            return
        block_ids = [block_id for transfer in meta.stores for block_id in transfer.block_ids]
        addresses = tuple(address for transfer in meta.stores for address in transfer.addresses)
        blocks = tuple(self._copy_out(block_ids))
        num_bytes = sum(array.nbytes for block in blocks for array in block.values())
        # encoded where the writer runs (``EncodeBlocks`` pickles for a store process)
        self._store_queue().submit(StoreBatch(addresses, num_bytes, EncodeBlocks(blocks, addresses)))

    def _copy_out(self, block_ids: list[int]) -> list[dict[str, np.ndarray]]:
        """Per block, ``{layer: bytes}`` copied out of the paged cache (one gather per layer
        for all the blocks): nothing here is a view of the cache, so it outlives the step."""
        if self._copier is None:
            return []
        return self._copier.extract(block_ids)  # canonical [H, N, C] bytes, any physical layout

    def _promote(self, placed: Placed) -> None:
        """Restored blocks from a far tier go to the nearer ones, behind the step."""
        indexes = sorted(placed.promote)
        if not indexes:
            return
        values = tuple(placed.promote[index] for index in indexes)
        batch = StoreBatch(
            addresses=tuple(placed.addresses[index] for index in indexes),
            num_bytes=sum(len(value) for value in values),
            value=Values(values),
            sources=tuple(placed.sources[index] for index in indexes),
        )
        self._store_queue().submit(batch)

    def _store_queue(self) -> StoreQueue:
        if self._writer is None:
            self._writer = shared_writer(self._extra, self._manager)
        return self._writer

    def shutdown(self) -> None:
        """Write what the queue holds (bounded wait); what cannot be written is counted."""
        if self._writer is not None:
            self._writer.close()


@dataclass(frozen=True)
class _KeySource:
    """What a request's block keys are derived from besides its tokens (``keys``)."""

    seed: bytes  # compat digest | cache salt [| adapter]
    scope: ScopeId
    extras: dict[int, bytes] | None  # block index -> digest of its multimodal / embedding inputs


_SEEDED_EXTRAS = (("cache_salt",), ("lora",))


def _block_extras(request: Request, block_size: int) -> dict[int, bytes] | None:
    """Per full prompt block, a digest of vLLM's own extra hash keys for it (multimodal input
    hashes with their offsets, prompt-embedding hashes): the inputs besides token ids that make
    its KV. None for a text-only request (its keys are then those a gateway computes)."""
    if not getattr(request, "mm_features", None) and getattr(request, "prompt_embeds", None) is None:
        return None
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

    extras: dict[int, bytes] = {}
    mm_index = 0
    for index in range(int(request.num_prompt_tokens) // block_size):
        start = index * block_size
        keys, mm_index = generate_block_hash_extra_keys(request, start, start + block_size, mm_index)
        # The salt is in the seed, and so is the adapter (by its files, not its path).
        kept = [key for key in keys or () if not (isinstance(key, tuple) and key[:1] in _SEEDED_EXTRAS)]
        if kept:
            extras[index] = hashlib.sha256(repr(kept).encode()).digest()
    return extras


def _check_engine_compat(vllm_config: VllmConfig, extra: dict[str, Any]) -> None:
    """Refuse to start when the weights, tokenizer or vLLM this engine really loaded (or the
    engine settings it really runs with) give another compat digest than its profile's."""
    declared = extra.get("compat_key")
    if declared is None:
        logger.warning(
            "zumik kv connector: no compat_key in kv_connector_extra_config, so this engine cannot "
            "check its weights against compat_digest %s (configs from engine_kv_transfer have it)",
            extra["compat_digest"],
        )
        return
    model = vllm_config.model_config
    model_dir = Path(str(model.model))
    tokenizer_dir = Path(str(model.tokenizer or model.model))
    if not (model_dir / "config.json").is_file():
        raise CompatMismatch(
            f"this engine loaded {model.model}, not a model folder on this node, so it cannot check its "
            "weights against the profile's compat digest: serve the model from a local folder"
        )
    observed = {
        "device": str(vllm_config.device_config.device_type),
        "block_size": int(vllm_config.cache_config.block_size),
        "kv_cache_dtype": str(vllm_config.cache_config.cache_dtype),
        "tensor_parallel_size": int(vllm_config.parallel_config.tensor_parallel_size),
        "pipeline_parallel_size": int(vllm_config.parallel_config.pipeline_parallel_size),
    }
    started = time.perf_counter()
    mine = check_engine_compat(
        str(extra["compat_digest"]), CompatKey.from_config(declared), model_dir=model_dir,
        tokenizer_dir=tokenizer_dir, observed=observed,
    )  # fmt: skip
    logger.info(
        "zumik kv connector: this engine's weights, tokenizer and %s match compat digest %s (%.1f s)",
        mine.vllm_version, mine.digest()[:16], time.perf_counter() - started,
    )  # fmt: skip


def _engine_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> KvLayout:
    parallel = vllm_config.parallel_config
    context = int(getattr(parallel, "decode_context_parallel_size", 1)) * int(
        getattr(parallel, "prefill_context_parallel_size", 1)
    )
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    return layout_of(kv_cache_config, cache_dtype=cache_dtype, context_parallel=context)


def _engine_shard(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, tp_rank: int, pp_rank: int
) -> KvShard:
    parallel = vllm_config.parallel_config
    return KvShard.of_rank(
        tp_rank, int(parallel.tensor_parallel_size), pp_rank, int(parallel.pipeline_parallel_size),
        tp_replicas=int(getattr(kv_cache_config, "kv_tp_replicas", 1) or 1),
    )  # fmt: skip
