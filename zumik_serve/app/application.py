"""Building the Ray Serve application of one profile, in one of two topologies:

    separate (default)   proxy → Gateway (N replicas) ──handle──► EngineReplica (vLLM)
    colocated            proxy → EngineReplica serving the gateway app in-process (vLLM)

The gateway code is the same in both; only how it reaches the engine differs. ``colocated``
saves the handle hop (several ms here, see docs/benchmarks.md) at the price of gateway
replicas that cannot scale apart from engines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.llm import LLMConfig

from profiles import GatewayPlacement, ModelGroupSpec, Profile
from zumik_serve.app.colocated import IngressEngineReplica
from zumik_serve.app.context import GatewaySettings
from zumik_serve.app.gateway import Gateway
from zumik_serve.app.request_router import zumik_router_config
from zumik_serve.app.scheduler_actor import SchedulerOwner
from zumik_serve.app.serve_loop import zumik_replica_options
from zumik_serve.engines.replica import EngineReplica, with_kv_events
from zumik_serve.engines.vllm_args import chat_content_format, engine_kwargs_for_vllm, parse_vllm_args
from zumik_serve.engines.vllm_config import engine_kv_transfer, llm_config_kwargs
from zumik_serve.home import ZumikHome
from zumik_serve.model.resolve import resolve_adapter, resolve_source
from zumik_serve.model.tiny_lora import read_adapter_info
from zumik_serve.secret_files import secrets_dir
from zumik_serve.store.client import DURABILITY_ENV, check_access, check_durability
from zumik_serve.store.local_redis import KV_REDIS_URL_ENV
from zumik_serve.tenancy.tenant import check_dev_key

logger = logging.getLogger("ray.serve")

APP_NAME = "zumik"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


# A replica group's engines publish vLLM's KV cache events to the profile's scheduler owner
# (issue #17 item 3; engines/replica.py): residency then follows what each engine really holds,
# evictions included, with the gateways' record of sends beside it for events that lag.
ENGINE_KV_EVENTS = True


def build_serve_app(
    profile: Profile,
    *,
    model_dir: Path,
    redis_url: str,
    dev_key: str | None,
    home: ZumikHome,
    kv_redis_url: str | None = None,
    more: Sequence[tuple[Profile, Path]] = (),
) -> serve.Application:
    """``profile``'s Serve application: one engine group per model (``profile.model_groups()``;
    ``model_dir`` holds the first group's weights, the others are resolved here), and the gateway
    in front of them. A Redis that refuses ``redis_url``'s user stops the build here, saying
    what to check (an unreachable one does not: the gateway retries it). ``kv_redis_url``: the
    KV tier's own Redis (gateway user's URL), needed when a profile keeps KV blocks in Redis:
    they never share the state Redis, which does not evict (they would grow until its memory
    limit, and every tenant's writes would then fail).

    ``more``: other profiles (with their model folders) served beside it, each with its own
    engines, scheduler owner and policy; the gateway (``profile``'s placement, replicas and
    limits) serves them all, ``x-zumik-profile`` choosing (the first profile without it).
    Several profiles need the separate placement: a colocated gateway is one engine's."""
    served = [(profile, model_dir), *more]
    names = [served_profile.name for served_profile, _ in served]
    if len(set(names)) != len(names):
        raise ValueError(f"A profile is given twice ({', '.join(names)}); name each profile once.")
    if more and any(p.gateway.placement is GatewayPlacement.COLOCATED for p, _ in served):
        colocated = [p.name for p, _ in served if p.gateway.placement is GatewayPlacement.COLOCATED]
        raise ValueError(
            f"Profile(s) {', '.join(colocated)} use the colocated placement, where the gateway is one "
            "engine's; serving several profiles needs gateway.placement: separate in every one of them."
        )
    in_redis = [p.name for p, _ in served if p.kv_tiers.enabled and p.kv_tiers.redis]
    if in_redis and kv_redis_url is None:
        raise ValueError(
            f"Profile(s) {', '.join(in_redis)} keep KV blocks in Redis, and no KV Redis is named: set "
            f"{KV_REDIS_URL_ENV} (or args.kv_redis_url in a Serve config) to a Redis of its own with "
            "maxmemory and an LRU policy (deploy/redis/kv-redis.yaml), or set kv_tiers.redis: false in "
            "the profile. KV blocks never go into the state Redis, which does not evict."
        )
    check_dev_key(dev_key)
    check_access(redis_url)
    if (gap := check_durability(redis_url)) is not None:
        logger.warning(
            "zumik: %s=unchecked; the state Redis may lose acknowledged writes: %s", DURABILITY_ENV, gap
        )
    parts = [
        _profile_parts(
            served_profile,
            served_dir,
            redis_url=redis_url,
            dev_key=dev_key,
            home=home,
            kv_redis_url=kv_redis_url,
            prefix="" if index == 0 else f"{served_profile.name}-",
        )
        for index, (served_profile, served_dir) in enumerate(served)
    ]
    first = parts[0]
    if profile.gateway.placement is GatewayPlacement.COLOCATED:
        # Ray's stubs type serve.deployment(cls) as a decorator factory; it returns a Deployment.
        ingress_engine: Any = serve.deployment(serve.ingress()(IngressEngineReplica))
        return ingress_engine.options(name="EngineReplica", **first.engine.options).bind(
            first.engine.llm_config, first.settings, first.other_groups
        )
    gateway: Any = Gateway
    gateway_options = zumik_replica_options(
        {"ray_actor_options": dict(gateway.ray_actor_options or {})}, profile.niceness
    )
    return gateway.options(
        num_replicas=profile.gateway.num_replicas,
        # Each profile admits its own QoS slots: Serve's cap is above all of them together.
        max_ongoing_requests=sum(gateway_max_ongoing_requests(p) for p, _ in served),
        **gateway_options,
    ).bind(
        first.settings, first.engines, first.other_groups, group=first.group, owner=first.owner,
        more=[part.bind_args() for part in parts[1:]],
    )  # fmt: skip


@dataclass(frozen=True)
class _ProfileParts:
    """One profile's deployments and its gateway settings, bound for one Serve app."""

    settings: GatewaySettings
    engine: _EngineGroup  # its first model group's
    engines: dict[str, Any]  # the first group's replicas by id (empty when ``group`` is set)
    other_groups: dict[str, dict[str, Any]]
    group: Any  # the first group's one deployment whose replicas Zumik picks, or None
    owner: Any  # its scheduler owner, or None

    def bind_args(self) -> dict[str, Any]:
        """What ``Gateway`` takes for one more profile (``app/gateway.py``)."""
        return {
            "settings": self.settings, "engines": self.engines, "other_groups": self.other_groups,
            "group": self.group, "owner": self.owner,
        }  # fmt: skip


def _profile_parts(
    profile: Profile,
    model_dir: Path,
    *,
    redis_url: str,
    dev_key: str | None,
    home: ZumikHome,
    kv_redis_url: str | None,
    prefix: str,
) -> _ProfileParts:
    """``profile``'s engine deployments (named with ``prefix``: unique in the app), its scheduler
    owner and its gateway settings."""
    groups = profile.model_groups()
    model_dirs = [model_dir, *(resolve_source(group.model.source, home) for group in groups[1:])]
    grouped = is_replica_group(profile)
    engine_groups = [
        _engine_group(
            profile, group, index, group_dir, redis_url=redis_url, home=home, kv_redis_url=kv_redis_url,
            kv_events=ENGINE_KV_EVENTS and grouped and index == 0,
        )
        for index, (group, group_dir) in enumerate(zip(groups, model_dirs, strict=True))
    ]  # fmt: skip
    paired = list(zip(groups, engine_groups, strict=True))
    first = engine_groups[0]
    settings = GatewaySettings(
        profile_name=profile.name,
        served_model=profile.model.served_name,
        model_created_s=int(time.time()),
        redis_url=redis_url,
        max_body_bytes=profile.gateway.max_body_bytes,
        max_artifact_bytes=profile.gateway.max_artifact_bytes,
        model_dir=str(first.tokenizer_dir),
        compat_digest=first.compat_digest,
        block_size=profile.engine.block_size,
        kv_redis_tier=profile.kv_tiers.enabled and profile.kv_tiers.redis,
        purge_ceiling=profile.purge.ceiling,
        purge_max_per_minute=profile.purge.max_per_minute,
        kv_tiers=first.kv_tiers,
        kv_redis_url=kv_redis_url,
        profile_json=profile.model_dump_json(),
        dev_key=dev_key,
        tokenizer_dirs={group.model.served_name: str(g.tokenizer_dir) for group, g in paired},
        secrets_dir=str(secrets_dir(home)),
        engine_kv_events=ENGINE_KV_EVENTS and grouped,
        chat_content_format=(
            chat_content_format(first.tokenizer_dir, profile.engine.vllm_args)
            if ENGINE_KV_EVENTS and grouped
            else None
        ),
    )
    engine_deployment: Any = serve.deployment(EngineReplica)
    # Every group after the first: one deployment (of its num_replicas), reached by handle.
    other_groups = {
        group.model.served_name: {
            "r0": engine_deployment.options(name=f"{prefix}EngineReplica-{index}", **g.options).bind(
                g.llm_config
            )
        }
        for index, (group, g) in enumerate(paired)
        if index > 0
    }
    if profile.gateway.placement is GatewayPlacement.COLOCATED:
        return _ProfileParts(settings, first, {}, other_groups, None, None)
    group = None
    if not grouped:
        engines = {
            "r0": engine_deployment.options(name=f"{prefix}EngineReplica", **first.options).bind(
                first.llm_config
            )
        }
    else:
        # A replica group the scheduler chooses from: one deployment (its replicas may come and
        # go), each call naming the replica its decision picked (app/request_router.py).
        # Its engines publish KV events (engines/replica.py) to the scheduler owner.
        engines = {}
        group = engine_deployment.options(
            name=f"{prefix}EngineReplica", **{**first.options, "request_router_config": zumik_router_config()}
        ).bind(first.llm_config)
    # One owner of the scheduler state when several gateways route or a group's engines report
    # what they hold (app/scheduler_actor.py).
    owner_deployment: Any = SchedulerOwner
    owner = None
    if profile.gateway.num_replicas > 1 or group is not None:
        owner = owner_deployment.options(
            name=f"{prefix}SchedulerOwner",
            **zumik_replica_options(
                {"ray_actor_options": dict(owner_deployment.ray_actor_options or {})}, profile.niceness
            ),
        ).bind(profile.model_dump_json())
    return _ProfileParts(settings, first, engines, other_groups, group, owner)


@dataclass(frozen=True)
class _EngineGroup:
    llm_config: LLMConfig
    options: dict[str, Any]
    tokenizer_dir: Path
    compat_digest: str
    kv_tiers: dict[str, Any] | None


def _engine_group(
    profile: Profile,
    group: ModelGroupSpec,
    index: int,
    model_dir: Path,
    *,
    redis_url: str,
    home: ZumikHome,
    kv_redis_url: str | None = None,
    kv_events: bool = False,
) -> _EngineGroup:
    """One engine group's LLMConfig and deployment options, its vllm_args checked by vLLM's
    own parser first (a wrong one stops the deploy here, naming it); ``kv_events``: its engines
    publish KV cache events (a replica group's)."""
    field = "engine.vllm_args" if index == 0 else f"models[{index - 1}].engine.vllm_args"
    parsed = parse_vllm_args(group.engine.vllm_args, field=field)
    tokenizer_dir = Path(group.model.tokenizer) if group.model.tokenizer else None
    adapter_dirs = {adapter.name: resolve_adapter(adapter.source, home) for adapter in group.model.adapters}
    kv_transfer = engine_kv_transfer(
        profile, model_dir=model_dir, redis_url=redis_url, home_root=home.root, group=group,
        kv_redis_url=kv_redis_url,
    )  # fmt: skip
    kwargs = llm_config_kwargs(
        profile, model_dir, tokenizer_dir, kv_transfer, group=group, adapter_dirs=adapter_dirs
    )
    engine_kwargs = {**kwargs["engine_kwargs"], **parsed}
    if kv_events:  # before the LLMConfig: ray.serve.llm caches the engine config it builds
        engine_kwargs = with_kv_events(engine_kwargs)
    if adapter_dirs and "max_lora_rank" not in parsed:  # the smallest vLLM allows that fits them all
        rank = max(read_adapter_info(path).rank for path in adapter_dirs.values())
        engine_kwargs["max_lora_rank"] = next((r for r in LORA_RANKS if r >= rank), rank)
    kwargs["engine_kwargs"] = engine_kwargs_for_vllm(engine_kwargs)
    llm_config = LLMConfig(**kwargs)
    # Serve's default cap of 5 ongoing requests per replica would queue requests inside Ray, out
    # of sight of Zumik's admission (and below the engine's max_num_seqs): admission bounds them.
    options = {
        **EngineReplica.get_deployment_options(llm_config),
        "max_ongoing_requests": gateway_max_ongoing_requests(profile),
    }
    # Ray would start the replica at niceness 15; its code and its handles' router on Serve's loop
    options = zumik_replica_options(options, profile.niceness)
    return _EngineGroup(
        llm_config=llm_config,
        options=options,
        tokenizer_dir=tokenizer_dir or model_dir,
        compat_digest=kv_transfer["kv_connector_extra_config"]["compat_digest"] if kv_transfer else "",
        kv_tiers=kv_transfer["kv_connector_extra_config"] if kv_transfer else None,
    )


def is_replica_group(profile: Profile) -> bool:
    """Whether the first engine group is one deployment whose replicas Zumik picks (separate
    placement, several or autoscaled replicas, ``replica_choice: scheduler``)."""
    several = profile.engine.num_replicas > 1 or profile.engine.autoscaling is not None
    return (
        profile.gateway.placement is not GatewayPlacement.COLOCATED
        and several
        and profile.routing.replica_choice == "scheduler"
    )


def gateway_max_ongoing_requests(profile: Profile) -> int:
    """Serve's own cap on a gateway replica: above every QoS class's running and queued slots,
    so that Zumik's admission answers an overload with 429 before Serve queues anything (Serve's
    default of 5 would queue requests out of Zumik's sight). The colocated engine replica has
    ray.serve.llm's default, which is unbounded."""
    slots = sum(spec.max_running + spec.max_queued for spec in profile.qos.classes.values())
    return slots + NON_GENERATION_HEADROOM


NON_GENERATION_HEADROOM = 64  # /v1/models, /v2 objects, health checks beside the generations
