"""Building the Ray Serve application of one profile, in one of two topologies:

    separate (default)   proxy → Gateway (N replicas) ──handle──► EngineReplica (vLLM)
    colocated            proxy → EngineReplica serving the gateway app in-process (vLLM)

The gateway code is the same in both; only how it reaches the engine differs. ``colocated``
saves the handle hop (several ms here, see docs/benchmarks.md) at the price of gateway
replicas that cannot scale apart from engines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.llm import LLMConfig

from profiles import GatewayPlacement, Profile
from zumik_serve.app.colocated import IngressEngineReplica
from zumik_serve.app.context import GatewaySettings
from zumik_serve.app.gateway import Gateway
from zumik_serve.engines.replica import EngineReplica
from zumik_serve.engines.vllm_config import engine_kv_transfer, llm_config_kwargs
from zumik_serve.home import ZumikHome

APP_NAME = "zumik"


def build_serve_app(
    profile: Profile,
    *,
    model_dir: Path,
    redis_url: str,
    dev_key: str | None,
    home: ZumikHome,
) -> serve.Application:
    tokenizer_dir = Path(profile.model.tokenizer) if profile.model.tokenizer else None
    kv_transfer = engine_kv_transfer(profile, model_dir=model_dir, redis_url=redis_url, home_root=home.root)
    compat_digest = kv_transfer["kv_connector_extra_config"]["compat_digest"] if kv_transfer else ""
    llm_config = LLMConfig(**llm_config_kwargs(profile, model_dir, tokenizer_dir, kv_transfer))
    # Serve's default cap of 5 ongoing requests per replica would queue requests inside Ray, out
    # of sight of Zumik's admission (and below the engine's max_num_seqs): admission bounds them.
    options = {
        **EngineReplica.get_deployment_options(llm_config),
        "max_ongoing_requests": gateway_max_ongoing_requests(profile),
    }
    settings = GatewaySettings(
        profile_name=profile.name,
        served_model=profile.model.served_name,
        model_created_s=int(time.time()),
        redis_url=redis_url,
        max_body_bytes=profile.gateway.max_body_bytes,
        max_artifact_bytes=profile.gateway.max_artifact_bytes,
        model_dir=str(tokenizer_dir or model_dir),
        compat_digest=compat_digest,
        block_size=profile.engine.block_size,
        kv_redis_tier=profile.kv_tiers.enabled and profile.kv_tiers.redis,
        purge_ceiling=profile.purge.ceiling,
        kv_tiers=kv_transfer["kv_connector_extra_config"] if kv_transfer else None,
        profile_json=profile.model_dump_json(),
        dev_key=dev_key,
    )
    if profile.gateway.placement is GatewayPlacement.COLOCATED:
        # Ray's stubs type serve.deployment(cls) as a decorator factory; it returns a Deployment.
        ingress_engine: Any = serve.deployment(serve.ingress()(IngressEngineReplica))
        return ingress_engine.options(name="EngineReplica", **options).bind(llm_config, settings)
    engine_deployment: Any = serve.deployment(EngineReplica)
    if profile.engine.num_replicas == 1 or profile.routing.replica_choice == "serve":
        engines = {"r0": engine_deployment.options(name="EngineReplica", **options).bind(llm_config)}
    else:
        # A replica group the scheduler chooses from: one deployment per replica, so that the
        # gateway's handle reaches exactly the replica its decision picked (docs/architecture.md).
        single = {**options, "num_replicas": 1}
        engines = {
            f"r{index}": engine_deployment.options(name=f"EngineReplica-r{index}", **single).bind(llm_config)
            for index in range(profile.engine.num_replicas)
        }
    gateway: Any = Gateway
    return gateway.options(
        num_replicas=profile.gateway.num_replicas, max_ongoing_requests=gateway_max_ongoing_requests(profile)
    ).bind(settings, engines)


def gateway_max_ongoing_requests(profile: Profile) -> int:
    """Serve's own cap on a gateway replica: above every QoS class's running and queued slots,
    so that Zumik's admission answers an overload with 429 before Serve queues anything (Serve's
    default of 5 would queue requests out of Zumik's sight). The colocated engine replica has
    ray.serve.llm's default, which is unbounded."""
    slots = sum(spec.max_running + spec.max_queued for spec in profile.qos.classes.values())
    return slots + NON_GENERATION_HEADROOM


NON_GENERATION_HEADROOM = 64  # /v1/models, /v2 objects, health checks beside the generations
