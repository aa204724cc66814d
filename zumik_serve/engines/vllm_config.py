"""Profile → vLLM engine settings, as plain data (no vLLM import here).

Every engine knob Zumik sets comes from the profile, so two replicas of one profile always run
with identical settings, and the direct-vLLM arm of ``zumik bench overhead`` can be started with
exactly the same ones (``vllm_cli_args``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from profiles import Device, ModelGroupSpec, Profile
from profiles.model import EngineSpec
from zumik_serve.home import ZumikHome
from zumik_serve.secret_files import secrets_dir
from zumik_serve.store.redis_acl import engine_redis_access


def vllm_engine_kwargs(
    profile: Profile, group: ModelGroupSpec | None = None, adapter_dirs: dict[str, Path] | None = None
) -> dict[str, Any]:
    """vLLM engine (and OpenAI front-end) arguments for one replica of ``profile``'s engine
    group ``group`` (default: its own model and engine), serving its adapters from
    ``adapter_dirs`` (adapter name → folder)."""
    group = group or profile.model_groups()[0]
    engine = group.engine
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
    }
    if engine.quantization is not None:
        kwargs["quantization"] = engine.quantization
    if engine.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
    if engine.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    adapters = group.model.adapters
    if adapters:
        dirs = adapter_dirs or {}
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = len(adapters)
        kwargs["lora_modules"] = [
            {"name": adapter.name, "path": str(dirs.get(adapter.name, adapter.source)),
             "base_model_name": group.model.served_name}
            for adapter in adapters
        ]  # fmt: skip
    kwargs.update(engine.vllm_args)  # checked against vLLM's parser (engines/vllm_args.py)
    return kwargs


def vllm_arg_tokens(name: str, value: Any) -> list[str]:
    """``name: value`` as ``vllm serve`` command-line tokens (the form vLLM's parser checks):
    true/false as ``--flag``/``--no-flag``, a dict as JSON, a list as several values."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag if value else f"--no-{name.replace('_', '-')}"]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError("an empty list; leave the argument out instead")
        return [flag, *(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)]
    if isinstance(value, str | int | float):
        return [flag, str(value)]
    raise ValueError(f"a {type(value).__name__} is not a value vLLM's command line can take")


def kv_transfer_config(
    profile: Profile,
    *,
    compat_digest: str,
    redis_url: str,
    home_root: Path,
    kv_redis_url: str | None = None,
) -> dict[str, Any] | None:
    """vLLM ``kv_transfer_config`` loading Zumik's connector over the profile's tiers, or None.
    ``redis_url`` is the gateway's state Redis, where the per-scope data keys stay;
    ``kv_redis_url`` the KV Redis (its own server, bounded, LRU; None: the state Redis, which
    only tools and tests take: ``build_serve_app`` refuses to deploy without a KV Redis). The
    engines reach both as user ``zumik-kv``, its password
    in ``redis-kv.password`` of the secrets folder (``secret_files.secrets_dir``)."""
    tiers = profile.kv_tiers
    if not tiers.enabled:
        return None
    # The engines log in as zumik-kv (KV keys only); vLLM logs this config, so it names the
    # password's file, never the password.
    folder = secrets_dir(ZumikHome(home_root))
    access = engine_redis_access(redis_url, folder)
    extra: dict[str, Any] = {
        "compat_digest": compat_digest,
        "host_capacity_bytes": tiers.host_capacity_bytes,  # per node
        "keyring_redis_url": access.url,  # per-scope data keys and purge tombstones (never evicted)
        "seal": tiers.seal,
        "write_behind_max_bytes": tiers.write_behind_max_bytes,
    }
    if access.password_file is not None:
        extra["redis_password_file"] = str(access.password_file)
    if tiers.redis:
        kv_access = access if kv_redis_url is None else engine_redis_access(kv_redis_url, folder)
        extra["redis_url"] = kv_access.url
        extra["redis_scope_max_bytes"] = profile.quota.kv_bytes  # per cache scope (tenant)
    if tiers.disk_root:
        extra["disk_root"] = tiers.disk_root.replace("$ZUMIK_HOME", str(home_root))
        extra["disk_capacity_bytes"] = tiers.disk_capacity_bytes
    return {
        "kv_connector": "ZumikKVConnector",
        "kv_connector_module_path": "kvstore.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",  # a block that fails to restore is recomputed
        "kv_connector_extra_config": extra,
    }


def engine_kv_transfer(
    profile: Profile,
    *,
    model_dir: Path,
    redis_url: str,
    home_root: Path,
    group: ModelGroupSpec | None = None,
    kv_redis_url: str | None = None,
) -> dict[str, Any] | None:
    """The connector config of the engines of ``group`` (default: the profile's own model),
    with the compat key derived from the model and tokenizer on disk (the same for every
    engine that serves them)."""
    from kvstore.compat import derive_compat_key
    from kvstore.fingerprint import model_fingerprint, tokenizer_fingerprint

    if not profile.kv_tiers.enabled:
        return None
    group = group or profile.model_groups()[0]
    tokenizer_dir = Path(group.model.tokenizer) if group.model.tokenizer else model_dir
    compat = derive_compat_key(
        profile,
        model_fingerprint=model_fingerprint(model_dir),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_dir),
        group=group,
    )
    config = kv_transfer_config(
        profile, compat_digest=compat.digest(), redis_url=redis_url, home_root=home_root,
        kv_redis_url=kv_redis_url,
    )  # fmt: skip
    if config is not None:  # each engine recomputes the key from its own files, refuses a mismatch
        config["kv_connector_extra_config"]["compat_key"] = compat.as_config()
    return config


def llm_config_kwargs(
    profile: Profile,
    model_dir: Path,
    tokenizer_dir: Path | None,
    kv_transfer: dict[str, Any] | None = None,
    *,
    group: ModelGroupSpec | None = None,
    adapter_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``ray.serve.llm.LLMConfig`` serving ``profile``'s engine group
    ``group`` (default: its own model and engine)."""
    group = group or profile.model_groups()[0]
    loading: dict[str, Any] = {
        "model_id": group.model.served_name,
        "model_source": str(model_dir),
    }
    if tokenizer_dir is not None:
        loading["tokenizer_source"] = str(tokenizer_dir)
    engine_kwargs = vllm_engine_kwargs(profile, group, adapter_dirs)
    if kv_transfer is not None:
        engine_kwargs["kv_transfer_config"] = kv_transfer
    engine = group.engine
    kwargs: dict[str, Any] = {
        "model_loading_config": loading,
        "engine_kwargs": engine_kwargs,
        "deployment_config": {
            **_replicas(engine),
            "ray_actor_options": {"num_cpus": engine.cpus_per_replica},
        },
        # Streamed tokens leave the replica at once; batching would add up to 50 ms to TTFT.
        "experimental_configs": {"stream_batching_interval_ms": 0},
        # vLLM engine metrics (and the KV connector's zumik:kv_tier_* counters) as Ray metrics.
        "log_engine_metrics": True,
    }
    if engine.device is Device.CPU:
        kwargs["accelerator_config"] = {"kind": "cpu"}
        if kv_transfer is not None and (env_vars := connector_engine_environment(profile, group)):
            kwargs["deployment_config"]["ray_actor_options"]["runtime_env"] = {"env_vars": env_vars}
    if engine.accelerator_type is not None:
        kwargs["accelerator_type"] = engine.accelerator_type
    if engine.device is Device.CUDA and engine.tensor_parallel_size * engine.pipeline_parallel_size > 1:
        # One GPU per rank, all on one node (Ray Serve LLM's default, PACK, may spread the ranks
        # over nodes, and NCCL then goes over the network); deploy/kuberay sizes pods to fit.
        kwargs["placement_group_config"] = {"bundle_per_worker": {"GPU": 1}, "strategy": "STRICT_PACK"}
    return kwargs


def connector_engine_environment(profile: Profile, group: ModelGroupSpec | None = None) -> dict[str, str]:
    """Environment of a CPU engine of ``group`` that runs Zumik's KV connector: the cores vLLM
    reserves beside the forward as without a connector (``kvstore/cpu_placement.py``)."""
    engine = (group or profile.model_groups()[0]).engine
    if engine.device is not Device.CPU:
        return {}
    from kvstore.cpu_placement import engine_environment

    return engine_environment(engine.tensor_parallel_size * engine.pipeline_parallel_size)


def vllm_cli_args(profile: Profile, model_dir: Path, kv_transfer: dict[str, Any] | None = None) -> list[str]:
    """The same settings as arguments of vLLM's own OpenAI server (for side-by-side benchmarks)."""
    args = ["--model", str(model_dir), "--served-model-name", profile.model.served_name]
    if kv_transfer is not None:
        args += ["--kv-transfer-config", json.dumps(kv_transfer)]
    for key, value in vllm_engine_kwargs(profile).items():
        args.extend(vllm_arg_tokens(key, value))
    return args


def _replicas(engine: EngineSpec) -> dict[str, Any]:
    """A fixed ``num_replicas``, or Serve's ``autoscaling_config`` (``engine.autoscaling``)."""
    spec = engine.autoscaling
    if spec is None:
        return {"num_replicas": engine.num_replicas}
    config = spec.model_dump(exclude_none=True)  # the fields are Serve's AutoscalingConfig's own
    return {"autoscaling_config": config}
