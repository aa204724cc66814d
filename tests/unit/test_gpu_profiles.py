"""The GPU profiles use what Zumik is for: KV tiers on (host tier per node, disk tier on the
image's data volume, the KV tier's own Redis), vLLM's prefix caching, and, with several
replicas, Zumik's scheduler choosing the replica of each request. Checked with the real
builders: the connector config the engines get, and Ray Serve LLM's own ``LLMConfig`` and
deployment options (its placement of a tensor-parallel replica on one node).

(That vLLM's argument parser accepts each profile's engine settings: tests/unit/test_vllm_args.py.
That the manifests serving them are sized from these tiers: tests/unit/test_deploy.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from profiles import Device, GatewayPlacement, Profile, builtin_names, load_builtin
from zumik_serve.engines.vllm_config import kv_transfer_config, llm_config_kwargs

GPU_PROFILES = [name for name in builtin_names() if load_builtin(name).engine.device is Device.CUDA]
DATA_DIR = "/var/lib/zumik"  # the image's data folder, a volume wherever deploy/ runs it


def test_the_gpu_profiles_are_the_three_of_the_guide() -> None:
    assert set(GPU_PROFILES) == {"llama-8b-h100", "qwen-small-gpu", "llama-70b-h100-tp2"}


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_load_with_region_and_quantization(name: str) -> None:
    profile = load_builtin(name)
    assert profile.region and profile.region != "local"
    assert (
        "quantization" in profile.engine.model_fields_set
        and "kv_cache_dtype" in profile.engine.model_fields_set
    )
    assert profile.engine.gpu_memory_utilization or profile.engine.kv_cache_memory_bytes


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_turn_every_kv_tier_and_prefix_caching_on(name: str) -> None:
    profile = load_builtin(name)
    tiers = profile.kv_tiers
    assert profile.engine.enable_prefix_caching
    assert tiers.enabled and tiers.host_capacity_bytes > 0 and tiers.redis and tiers.seal
    assert tiers.disk_root and tiers.disk_root.startswith(f"{DATA_DIR}/")
    # The disk tier is the larger, slower tier behind the host tier.
    assert tiers.disk_capacity_bytes > tiers.host_capacity_bytes


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_hand_the_qos_classes_priorities_to_vllms_scheduler(name: str) -> None:
    """With fcfs, vLLM ignores the priority each QoS class sends: an interactive request would
    wait behind a batch backlog in the engine's queue."""
    profile = load_builtin(name)
    kwargs = llm_config_kwargs(profile, Path(profile.model.source), None)
    assert profile.engine.scheduling_policy == kwargs["engine_kwargs"]["scheduling_policy"] == "priority"


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_with_several_replicas_zumiks_scheduler_picks_the_replica(name: str) -> None:
    """Colocated, each replica serves its own gateway and Serve's proxy picks the replica;
    separate, the gateways call the replica group through Zumik's router (app/application.py)."""
    profile = load_builtin(name)
    assert profile.routing.replica_choice == "scheduler"
    if profile.engine.num_replicas > 1:
        assert profile.gateway.placement is GatewayPlacement.SEPARATE
        assert profile.gateway.num_replicas >= 2  # one owner of the scheduler state across them
    else:
        assert profile.gateway.placement is GatewayPlacement.COLOCATED
    assert sum(load_builtin(n).engine.num_replicas > 1 for n in GPU_PROFILES) >= 2


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_the_engines_get_zumiks_connector_over_every_tier(name: str, tmp_path: Path) -> None:
    profile = load_builtin(name)
    home = tmp_path / "home"
    (home / "secrets").mkdir(parents=True)
    (home / "secrets" / "redis-kv.password").write_text("k" * 64)
    config = kv_transfer_config(
        profile,
        compat_digest="c" * 64,
        redis_url="redis://zumik-gateway:p@zumik-redis:6379/0",
        kv_redis_url="redis://zumik-gateway:p@zumik-redis-kv:6379/0",
        home_root=home,
    )
    assert config is not None and config["kv_connector_module_path"] == "kvstore.connector"
    extra = config["kv_connector_extra_config"]
    assert extra["host_capacity_bytes"] == profile.kv_tiers.host_capacity_bytes
    assert extra["redis_url"] == "redis://zumik-kv@zumik-redis-kv:6379/0"  # the KV Redis, no password
    assert extra["keyring_redis_url"] == "redis://zumik-kv@zumik-redis:6379/0"  # data keys: state Redis
    assert extra["disk_root"] == profile.kv_tiers.disk_root
    assert extra["disk_capacity_bytes"] == profile.kv_tiers.disk_capacity_bytes


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_behind() -> object:
    """Ray Serve LLM's deployment options start a local Ray instance when none is up; shut it
    down after this module so that the integration stack's own ``ray.init`` starts clean."""
    import ray

    was_up = ray.is_initialized()
    yield
    if not was_up and ray.is_initialized():
        ray.shutdown()


def _deployment_options(profile: Profile) -> dict[str, object]:
    from ray.serve.llm import LLMConfig

    from zumik_serve.engines.replica import EngineReplica

    kwargs = llm_config_kwargs(profile, Path(profile.model.source), None)
    options: dict[str, object] = EngineReplica.get_deployment_options(LLMConfig(**kwargs))
    return options


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_ray_places_each_replica_on_one_node_with_its_gpus(name: str) -> None:
    """Ray Serve LLM's own deployment options for the profile (as app/application.py builds
    them): one GPU bundle per rank; a tensor-parallel replica STRICT_PACK (all its ranks on one
    node, which deploy/kuberay's worker pods are sized to hold)."""
    profile = load_builtin(name)
    options = _deployment_options(profile)
    bundles = options["placement_group_bundles"]
    assert isinstance(bundles, list)
    ranks = profile.engine.tensor_parallel_size * profile.engine.pipeline_parallel_size
    assert sum(bundle.get("GPU", 0) for bundle in bundles) == ranks
    if profile.engine.accelerator_type:
        assert all(f"accelerator_type:{profile.engine.accelerator_type}" in bundle for bundle in bundles)
    assert options["placement_group_strategy"] == ("STRICT_PACK" if ranks > 1 else "PACK")
    assert any(name for name in GPU_PROFILES if load_builtin(name).engine.tensor_parallel_size > 1)
