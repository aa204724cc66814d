"""Gateway: the stateless FastAPI ingress deployment (N replicas), wiring service to HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from ray import serve

from kvstore.tiers.build import build_tiers
from zumik_serve.api.app import build_app
from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
from zumik_serve.engines.ray_client import RayEngineClient
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge_service import PurgeService
from zumik_serve.service import EngineClient, GatewayService, ModelCard
from zumik_serve.state_service import StateService
from zumik_serve.store.kv_probe import KvProbe
from zumik_serve.store.purge_store import RedisPurgeStore
from zumik_serve.store.state_store import RedisStateStore
from zumik_serve.store.tenant_store import RedisTenantStore
from zumik_serve.tenancy import Authenticator


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
    dev_key: str | None = None

    def __repr__(self) -> str:  # the dev key must never reach a log line
        return (
            f"GatewaySettings(profile_name={self.profile_name!r}, served_model="
            f"{self.served_model!r}, redis_url={self.redis_url!r}, dev_key=<redacted>)"
        )


def make_gateway_app(settings: GatewaySettings, engine: EngineClient) -> FastAPI:
    """The gateway's FastAPI app over ``engine``; the same app in both topologies."""
    redis_client = aioredis.from_url(settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    tenants = RedisTenantStore(redis_client)
    service = GatewayService(
        models=[ModelCard(id=settings.served_model, created_s=settings.model_created_s)],
        authenticator=Authenticator(tenants, dev_key=settings.dev_key),
        engine=engine,
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
    )
    app = build_app(service, state, purges, max_body_bytes=settings.max_body_bytes)
    app.state.kv_probe = (
        KvProbe(redis_client, compat_digest=settings.compat_digest, block_size=settings.block_size)
        if settings.kv_redis_tier
        else None
    )
    return app


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Gateway:
    """The separate topology: its own replicas, reaching engines through a Serve handle."""

    def __init__(self, settings: GatewaySettings, engine: Any) -> None:
        self._app = make_gateway_app(settings, RayEngineClient(engine))

    async def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
