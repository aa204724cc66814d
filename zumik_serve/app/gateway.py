"""Gateway: the stateless FastAPI ingress deployment (N replicas), wiring service to HTTP."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from ray import serve
from redis.exceptions import RedisError

from kvstore.tiers.build import build_tiers
from profiles import Profile
from profiles.model import RouteKind
from zumik_serve.api.app import build_app
from zumik_serve.api.limits import GenerationLimits
from zumik_serve.app.metrics import RayDecisionMetrics, RayReuseMetrics
from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
from zumik_serve.engines.ray_client import RayEngineClient
from zumik_serve.pipeline.service import EngineClient, GatewayService, ModelCard
from zumik_serve.providers.byok import KeyVault
from zumik_serve.providers.store import RedisByokStore, load_or_create_master_key
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.service import PurgeService
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.qos.admission import AdmissionController
from zumik_serve.reuse.service import ReuseService
from zumik_serve.reuse.store import RedisReuseStore
from zumik_serve.routing.dispatch import Dispatcher
from zumik_serve.routing.scheduler import ProfileScheduler
from zumik_serve.routing.service import RoutingService
from zumik_serve.routing.store import RedisRoutingStore
from zumik_serve.state.service import StateService
from zumik_serve.state.store import RedisStateStore
from zumik_serve.store.kv_probe import KvProbe
from zumik_serve.telemetry.tracing import Tracing
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import Authenticator

logger = logging.getLogger("ray.serve")
REDIS_POOL_CONNECTIONS = 48


@dataclass(frozen=True)
class GatewaySettings:
    profile_name: str
    served_model: str
    model_created_s: int
    redis_url: str
    max_body_bytes: int
    max_artifact_bytes: int
    model_dir: str
    compat_digest: str
    block_size: int
    kv_redis_tier: bool
    purge_ceiling: str = "crypto_erased"
    kv_tiers: dict[str, Any] | None = None  # the engines' connector config (a purge sweeps its tiers)
    profile_json: str = ""  # the whole profile (routes, routing policy) as JSON
    dev_key: str | None = None

    def __repr__(self) -> str:  # the dev key must never reach a log line
        return (
            f"GatewaySettings(profile_name={self.profile_name!r}, served_model="
            f"{self.served_model!r}, redis_url={self.redis_url!r}, dev_key=<redacted>)"
        )


def make_gateway_app(settings: GatewaySettings, engines: dict[str, EngineClient]) -> FastAPI:
    """The gateway's FastAPI app over its BYOC engine replicas (``{"r0": client, ...}``) and the
    profile's provider routes; the same app in both topologies."""
    # A bounded pool that requests wait on: with admission (not Serve) bounding concurrency, a
    # burst would otherwise open a connection per request at once and time out connecting.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=REDIS_POOL_CONNECTIONS, timeout=30,
        socket_timeout=15.0, socket_connect_timeout=5.0,  # a refused connection still fails at once
        health_check_interval=2,  # a pooled connection idle 2 s is pinged first (stale after a restart)
    )  # fmt: skip
    redis_client = aioredis.Redis(connection_pool=pool)
    tenants = RedisTenantStore(redis_client)
    profile = Profile.model_validate_json(settings.profile_json)
    routing_store = RedisRoutingStore(redis_client)
    byoc = [route.name for route in profile.effective_routes() if route.kind is RouteKind.BYOC]
    scheduler = ProfileScheduler(profile, replicas={name: sorted(engines) for name in byoc[:1]})
    dispatcher = Dispatcher(
        scheduler,
        engines=engines,
        decisions=_DecisionSink(routing_store),
        byok_key=_ByokKeys(redis_client).get,
        metrics=RayDecisionMetrics(profile.name),
    )
    service = GatewayService(
        models=[ModelCard(id=settings.served_model, created_s=settings.model_created_s)],
        authenticator=Authenticator(tenants, dev_key=settings.dev_key),
        dispatcher=dispatcher,
        tokenizer_factory=lambda: HfChatTokenizer(Path(settings.model_dir)),
        salt_secret=lambda: tenants.server_secret("cache-salt"),
        salt_epoch=tenants.salt_epoch,
    )
    state_store = RedisStateStore(redis_client)
    state = StateService(state_store, max_artifact_bytes=settings.max_artifact_bytes)
    kv_tiers = settings.kv_tiers or {}
    purges = PurgeService(
        RedisPurgeStore(redis_client, state_store),
        profile=settings.profile_name,
        ceiling=GuaranteeClass(settings.purge_ceiling),
        tiers=build_tiers(kv_tiers) if kv_tiers else [],
        sealed=bool(kv_tiers.get("seal")),
        salt_secret=service.salt_secret,
        salt_epoch=tenants.salt_epoch,
        rotate_salt_epoch=tenants.rotate_salt_epoch,
        forget_scopes=RedisReuseStore(redis_client).forget_scopes,
    )
    app = build_app(service, state, purges, max_body_bytes=settings.max_body_bytes)
    app.state.admission = AdmissionController(profile.qos)
    app.state.priority_scheduling = profile.engine.scheduling_policy == "priority"
    app.state.limits = GenerationLimits.of(profile)
    app.state.tracing = Tracing(profile.telemetry.traces)
    app.state.routing = RoutingService(routing_store, profile)
    reuse_store = RedisReuseStore(redis_client)
    app.state.reuse = ReuseService(
        reuse_store,
        profile,
        scope_digest=settings.compat_digest or profile.fingerprint(),
        metrics=RayReuseMetrics(),
    )
    app.state.byok = _ByokKeys(redis_client)
    app.state.kv_probe = (
        KvProbe(redis_client, compat_digest=settings.compat_digest, block_size=settings.block_size)
        if settings.kv_redis_tier
        else None
    )
    return app


class _DecisionSink:
    def __init__(self, store: RedisRoutingStore) -> None:
        self._store = store

    async def save(self, tenant: str, record: dict[str, Any], attempts: list[dict[str, Any]]) -> None:
        try:
            await self._store.save_decision(tenant, record, attempts)
        except RedisError:  # the answer still goes out; its record is lost, and the log says so
            logger.warning(
                "zumik: decision %s could not be recorded (Redis unavailable)", record["decision_id"]
            )


class _ByokKeys:
    """Tenants' provider keys, opened with the master key loaded on first use."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._store: RedisByokStore | None = None

    async def store(self) -> RedisByokStore:
        if self._store is None:
            self._store = RedisByokStore(
                self._client, KeyVault(await load_or_create_master_key(self._client))
            )
        return self._store

    async def get(self, tenant: str, route: str) -> str | None:
        return await (await self.store()).get(tenant, route)


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Gateway:
    """The separate topology: its own replicas, reaching engines through a Serve handle."""

    def __init__(self, settings: GatewaySettings, engines: dict[str, Any]) -> None:
        self._app = make_gateway_app(settings, {rid: RayEngineClient(h) for rid, h in engines.items()})

    async def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
