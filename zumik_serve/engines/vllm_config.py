"""Profile → vLLM engine settings, as plain data (no vLLM import here).

Every engine knob Zumik sets comes from the profile, so two replicas of one profile always run
with identical settings, and the direct-vLLM arm of ``zumik bench overhead`` can be started with
exactly the same ones (``vllm_cli_args``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from profiles import Device, Profile


def vllm_engine_kwargs(profile: Profile) -> dict[str, Any]:
    """vLLM engine (and OpenAI front-end) arguments for one replica of ``profile``."""
    engine = profile.engine
    kwargs: dict[str, Any] = {
        "dtype": engine.dtype,
        "block_size": engine.block_size,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "enforce_eager": engine.enforce_eager,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "kv_cache_dtype": engine.kv_cache_dtype,
        "seed": engine.seed,
        "scheduling_policy": engine.scheduling_policy,  # 'priority': QoS classes reach the engine
        # Fill usage.prompt_tokens_details.cached_tokens from vLLM's count of cached tokens.
        "enable_prompt_tokens_details": True,
        "disable_log_stats": False,
    }
    if engine.quantization is not None:
        kwargs["quantization"] = engine.quantization
    if engine.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
    if engine.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    return kwargs


def kv_transfer_config(
    profile: Profile, *, compat_digest: str, redis_url: str, home_root: Path
) -> dict[str, Any] | None:
    """vLLM ``kv_transfer_config`` loading Zumik's connector over the profile's tiers, or None."""
    tiers = profile.kv_tiers
    if not tiers.enabled:
        return None
    extra: dict[str, Any] = {
        "compat_digest": compat_digest,
        "host_capacity_bytes": tiers.host_capacity_bytes,
        "keyring_redis_url": redis_url,  # per-scope data keys and purge tombstones
        "seal": tiers.seal,
    }
    if tiers.redis:
        extra["redis_url"] = redis_url
    if tiers.disk_root:
        extra["disk_root"] = tiers.disk_root.replace("$ZUMIK_HOME", str(home_root))
    return {
        "kv_connector": "ZumikKVConnector",
        "kv_connector_module_path": "kvstore.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",  # a block that fails to restore is recomputed
        "kv_connector_extra_config": extra,
    }


def engine_kv_transfer(
    profile: Profile, *, model_dir: Path, redis_url: str, home_root: Path
) -> dict[str, Any] | None:
    """The connector config of ``profile``'s engines, with the compat key derived from the
    model and tokenizer on disk (the same for every engine that serves them)."""
    from kvstore.compat import derive_compat_key
    from kvstore.fingerprint import model_fingerprint, tokenizer_fingerprint

    if not profile.kv_tiers.enabled:
        return None
    tokenizer_dir = Path(profile.model.tokenizer) if profile.model.tokenizer else model_dir
    compat = derive_compat_key(
        profile,
        model_fingerprint=model_fingerprint(model_dir),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_dir),
    )
    return kv_transfer_config(
        profile, compat_digest=compat.digest(), redis_url=redis_url, home_root=home_root
    )


def llm_config_kwargs(
    profile: Profile,
    model_dir: Path,
    tokenizer_dir: Path | None,
    kv_transfer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``ray.serve.llm.LLMConfig`` serving ``profile``."""
    loading: dict[str, Any] = {
        "model_id": profile.model.served_name,
        "model_source": str(model_dir),
    }
    if tokenizer_dir is not None:
        loading["tokenizer_source"] = str(tokenizer_dir)
    engine_kwargs = vllm_engine_kwargs(profile)
    if kv_transfer is not None:
        engine_kwargs["kv_transfer_config"] = kv_transfer
    kwargs: dict[str, Any] = {
        "model_loading_config": loading,
        "engine_kwargs": engine_kwargs,
        "deployment_config": {
            "num_replicas": profile.engine.num_replicas,
            "ray_actor_options": {"num_cpus": profile.engine.cpus_per_replica},
        },
        # Streamed tokens leave the replica at once; batching would add up to 50 ms to TTFT.
        "experimental_configs": {"stream_batching_interval_ms": 0},
        # vLLM engine metrics (and the KV connector's zumik:kv_tier_* counters) as Ray metrics.
        "log_engine_metrics": True,
    }
    if profile.engine.device is Device.CPU:
        kwargs["accelerator_config"] = {"kind": "cpu"}
    if profile.engine.accelerator_type is not None:
        kwargs["accelerator_type"] = profile.engine.accelerator_type
    return kwargs


def vllm_cli_args(profile: Profile, model_dir: Path, kv_transfer: dict[str, Any] | None = None) -> list[str]:
    """The same settings as arguments of vLLM's own OpenAI server (for side-by-side benchmarks)."""
    args = ["--model", str(model_dir), "--served-model-name", profile.model.served_name]
    if kv_transfer is not None:
        args += ["--kv-transfer-config", json.dumps(kv_transfer)]
    for key, value in vllm_engine_kwargs(profile).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if key == "enable_prefix_caching":
                args.append(flag if value else "--no-enable-prefix-caching")
            elif value:
                args.append(flag)
        else:
            args.extend([flag, str(value)])
    return args
