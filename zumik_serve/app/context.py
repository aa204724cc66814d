"""The gateway's wiring: ``GatewaySettings`` (what a Serve deployment is built with) into the one
typed ``GatewayContext`` a gateway process serves with, and its FastAPI app. No Ray here: the
same wiring runs in the Serve deployments and in the in-process tests."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.tiers.build import build_tiers
from profiles import Profile
from profiles.model import RouteKind, group_served_names
from zumik_serve.api.app import App, build_app
from zumik_serve.engines.chat_prompt import ContentFormat
from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
from zumik_serve.engines.models import ServedModels, model_cards
from zumik_serve.engines.protocol import EngineClient
from zumik_serve.errors import NotFoundError, StoreUnavailableError
from zumik_serve.home import ZumikHome
from zumik_serve.pipeline.context import GatewayContext
from zumik_serve.pipeline.limits import GenerationLimits
from zumik_serve.providers.byok import KeyVault
from zumik_serve.providers.keys import ByokKeys
from zumik_serve.providers.store import RedisByokStore
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.nodes import NodeSweeper
from zumik_serve.purge.service import PurgeService
from zumik_serve.purge.signing_keys import SigningKeys
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.qos.admission import AdmissionController
from zumik_serve.qos.quota import RateSettlement
from zumik_serve.qos.store import RedisQuotaStore
from zumik_serve.responses.service import ResponsesService
from zumik_serve.responses.store import RedisResponseStore
from zumik_serve.reuse.service import ReuseMetrics, ReuseService
from zumik_serve.reuse.store import RedisReuseStore
from zumik_serve.routing.decision import DecisionRecord
from zumik_serve.routing.dispatch import DecisionMetrics, Dispatcher
from zumik_serve.routing.reach import ProviderReach
from zumik_serve.routing.retry import Attempt
from zumik_serve.routing.scheduler import ProfileScheduler
from zumik_serve.routing.service import RoutingService
from zumik_serve.routing.store import RedisRoutingStore
from zumik_serve.secret_files import secrets_dir
from zumik_serve.server_secrets import load_server_secrets
from zumik_serve.state.limits import SnapshotLimits
from zumik_serve.state.service import StateService
from zumik_serve.state.store import RedisStateStore
from zumik_serve.state.tokenizing import Tokenization
from zumik_serve.store.client import gateway_client, guard
from zumik_serve.store.kv_probe import KvProbe
from zumik_serve.store.redis_acl import redact_url
from zumik_serve.telemetry.tracing import Tracing
from zumik_serve.tenancy.salts import CacheSalts
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import Authenticator

logger = logging.getLogger("ray.serve")


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
    purge_max_per_minute: int = 10  # new purges a tenant may start in a minute (profile.purge)
    kv_tiers: dict[str, Any] | None = None  # the engines' connector config (a purge sweeps its tiers)
    kv_redis_url: str | None = None  # the KV Redis (gateway user's URL); None: KV blocks are in redis_url's
    profile_json: str = ""  # the whole profile (routes, routing policy) as JSON
    dev_key: str | None = None
    # Each model group's tokenizer folder, by its model's served name (default: model_dir).
    tokenizer_dirs: dict[str, str] = field(default_factory=dict)
    # Where the server's secrets are read from (server_secrets.py); "": $ZUMIK_SECRETS_DIR, else
    # $ZUMIK_HOME/secrets, of this process.
    secrets_dir: str = ""
    # The first group's engines report KV events (``application.py`` ``ENGINE_KV_EVENTS``): its
    # scheduler keys chat prompts by the engine's block hashes too, rebuilt with the content
    # format its vLLM renders the template with (``engines/vllm_args.py``; None: not rebuilt).
    engine_kv_events: bool = False
    chat_content_format: ContentFormat | None = None

    def __repr__(self) -> str:  # the dev key and Redis password must never reach a log line
        return (
            f"GatewaySettings(profile_name={self.profile_name!r}, served_model="
            f"{self.served_model!r}, redis_url={redact_url(self.redis_url)!r}, dev_key=<redacted>)"
        )


@dataclass(frozen=True)
class Metrics:
    """Where decision and reuse metrics go (``app/metrics.py``'s Ray metrics in a deployment)."""

    decisions: DecisionMetrics | None = None
    reuse: ReuseMetrics | None = None


@dataclass(frozen=True)
class ServedProfile:
    """One more profile a gateway serves (``x-zumik-profile`` selects it): its settings, its
    engines (its first group's replicas by id) and its other model groups' (by model)."""

    settings: GatewaySettings
    engines: dict[str, EngineClient]
    metrics: Metrics = field(default_factory=Metrics)
    other_groups: dict[str, dict[str, EngineClient]] | None = None


def make_gateway_app(
    settings: GatewaySettings,
    engines: dict[str, EngineClient],
    metrics: Metrics | None = None,
    *,
    other_groups: dict[str, dict[str, EngineClient]] | None = None,
    nodes: NodeSweeper | None = None,
    more: Sequence[ServedProfile] = (),
) -> App:
    """The gateway's FastAPI app over its BYOC engine replicas (``{"r0": client, ...}``), the
    other model groups' replicas (by model) and the profile's provider routes; the same app in
    both topologies. ``more``: the other profiles it serves (the first is the default); a purge
    through any of them sweeps every profile's tiers (``purge_tier_config``). ``nodes``: where
    a purge sweeps the node tiers (None: this process's node)."""
    tier_configs = [settings.kv_tiers, *(served.settings.kv_tiers for served in more)]
    purge_tiers = purge_tier_config(tier_configs) if more else None
    contexts = [
        build_context(
            served.settings,
            served.engines,
            served.metrics,
            other_groups=served.other_groups,
            nodes=nodes,
            purge_tiers=purge_tiers,
        )
        for served in [ServedProfile(settings, engines, metrics or Metrics(), other_groups), *more]
    ]
    return build_app(contexts[0], more=contexts[1:])


# Where each KV tier keeps its blocks: profiles served together must agree on them.
_TIER_LOCATIONS = {"host": ("shm_root",), "redis": ("redis_url",), "disk": ("disk_root",)}


def purge_tier_config(configs: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The tiers a purge sweeps when a gateway serves several profiles: every tier any of them
    uses (blocks of each profile live under its own compat digest in the same places), so a
    purge through one profile also removes the tenant's blocks another profile stored. Profiles
    whose tiers live in different places cannot share a gateway: ``ValueError`` names them."""
    given = [dict(config) for config in configs if config]
    if not given:
        return None
    merged: dict[str, Any] = {}
    for config in given:
        uses = {
            "host": int(config.get("host_capacity_bytes") or 0) > 0,
            "redis": bool(config.get("redis_url")),
            "disk": bool(config.get("disk_root")),
        }
        for tier, keys in _TIER_LOCATIONS.items():
            if not uses[tier]:
                continue
            if merged.get(f"_{tier}") and any(merged.get(key) != config.get(key) for key in keys):
                where = ", ".join(f"{key}={config.get(key)!r} vs {merged.get(key)!r}" for key in keys)
                raise ValueError(
                    f"The profiles served together keep their {tier} KV tier in different places "
                    f"({where}); give them the same tier locations, or serve them from separate "
                    "deployments."
                )
            merged[f"_{tier}"] = True
            for key in keys:
                if config.get(key) is not None:
                    merged[key] = config[key]
        for key, value in config.items():
            if key.endswith("_capacity_bytes") or key == "redis_scope_max_bytes":
                known = [int(v) for v in (value, merged.get(key)) if v is not None]
                merged[key] = max(known) if known else None  # None: unbounded
            elif key == "seal":
                merged[key] = bool(merged.get(key)) or bool(value)
            else:
                merged.setdefault(key, value)
    return {key: value for key, value in merged.items() if not key.startswith("_")}


def build_context(
    settings: GatewaySettings,
    engines: dict[str, EngineClient],
    metrics: Metrics,
    *,
    other_groups: dict[str, dict[str, EngineClient]] | None = None,
    nodes: NodeSweeper | None = None,
    purge_tiers: Mapping[str, Any] | None = None,
) -> GatewayContext:
    """Everything a gateway process serves with, built once: stores over one Redis pool, the
    profile's scheduler and dispatchers (one per model group), the feature services.
    ``purge_tiers``: the tiers a purge sweeps (default: this profile's engines')."""
    # Secrets first: a missing or malformed file stops the gateway here, naming the file.
    folder = Path(settings.secrets_dir) if settings.secrets_dir else secrets_dir(ZumikHome.from_env())
    server_secrets = load_server_secrets(folder)
    signing_keys = SigningKeys(folder)
    redis_client = gateway_client(settings.redis_url)
    profile = Profile.model_validate_json(settings.profile_json)
    tenants = RedisTenantStore(redis_client)

    async def cache_salt_secret() -> bytes:
        return server_secrets.cache_salt_secret

    salts = CacheSalts(cache_salt_secret, tenants.salt_epoch)
    routing_store = RedisRoutingStore(redis_client)
    byok = ByokKeys(lambda: _open_byok_store(redis_client, server_secrets.byok_master_key))
    decisions = _DecisionSink(routing_store)
    reach = _ReachSink(routing_store)

    def dispatcher_of(
        group_profile: Profile, replicas: dict[str, EngineClient], *, engine_events: bool = False
    ) -> Dispatcher:
        byoc = [route.name for route in group_profile.effective_routes() if route.kind is RouteKind.BYOC]
        scheduler = ProfileScheduler(
            group_profile, replicas={name: sorted(replicas) for name in byoc[:1]}, engine_events=engine_events
        )
        return Dispatcher(
            scheduler,
            engines=replicas,
            decisions=decisions,
            byok_key=byok.get,
            reach=reach,
            metrics=metrics.decisions,
        )

    dispatcher = dispatcher_of(profile, engines, engine_events=settings.engine_kv_events)
    groups = profile.model_groups()
    dispatchers = {name: dispatcher for name in group_served_names(groups[0])}
    for group in groups[1:]:
        replicas = (other_groups or {}).get(group.model.served_name)
        if not replicas:
            raise ValueError(f"no engine replicas were given for model {group.model.served_name!r}")
        group_dispatcher = dispatcher_of(profile.group_profile(group), replicas)
        dispatchers.update({name: group_dispatcher for name in group_served_names(group)})
    tokenizer_dirs = settings.tokenizer_dirs or {settings.served_model: settings.model_dir}
    state_store = RedisStateStore(redis_client, profile.quota)
    reuse_store = RedisReuseStore(redis_client)
    kv_tiers = dict(purge_tiers if purge_tiers is not None else settings.kv_tiers or {})
    purges = PurgeService(
        RedisPurgeStore(redis_client, state_store),
        signing_keys=signing_keys,
        profile=settings.profile_name,
        ceiling=GuaranteeClass(settings.purge_ceiling),
        max_per_minute=settings.purge_max_per_minute,
        tiers=build_tiers(kv_tiers) if kv_tiers else [],
        sealed=bool(kv_tiers.get("seal")),
        salt_secret=salts.secret,
        salt_epoch=tenants.salt_epoch,
        rotate_salt_epoch=tenants.rotate_salt_epoch,
        forget_scopes=reuse_store.forget_scopes,
        traces=routing_store,
        nodes=nodes,
    )
    state = StateService(
        state_store,
        max_artifact_bytes=settings.max_artifact_bytes,
        limits=SnapshotLimits.of(profile.gateway),
        tokenization=Tokenization(profile.gateway.max_tokenize_bytes),
    )
    return GatewayContext(
        profile=profile,
        models=ServedModels(
            model_cards(
                {g.model.served_name: tuple(a.name for a in g.model.adapters) for g in groups},
                settings.model_created_s,
            ),
            tokenizer_factory=lambda model: HfChatTokenizer(
                Path(tokenizer_dirs.get(model, settings.model_dir)),
                chat_content_format=settings.chat_content_format if model == settings.served_model else None,
            ),
        ),
        authenticator=Authenticator(tenants, dev_key=settings.dev_key),
        salts=salts,
        dispatcher=dispatcher,
        dispatchers=dispatchers,
        state=state,
        responses=ResponsesService(state, RedisResponseStore(redis_client, state_store)),
        routing=RoutingService(routing_store, profile),
        reuse=ReuseService(
            reuse_store,
            profile,
            scope_digest=settings.compat_digest or profile.fingerprint(),
            metrics=metrics.reuse,
        ),
        purges=purges,
        admission=AdmissionController(profile.qos),
        limits=GenerationLimits.of(profile),
        tracing=Tracing(profile.telemetry.traces),
        byok=byok,
        kv_probe=(
            KvProbe(
                gateway_client(settings.kv_redis_url) if settings.kv_redis_url else redis_client,
                compat_digest=settings.compat_digest,
                block_size=settings.block_size,
            )  # fmt: skip
            if settings.kv_redis_tier
            else None
        ),
        max_body_bytes=settings.max_body_bytes,
        quotas=RedisQuotaStore(redis_client, profile.quota),
    )


async def _open_byok_store(client: Any, master_key: bytes) -> RedisByokStore:
    return RedisByokStore(client, KeyVault(master_key))


class _DecisionSink:
    def __init__(self, store: RedisRoutingStore) -> None:
        self._store = store

    async def save(
        self, tenant: str, record: DecisionRecord, attempts: Sequence[Attempt], sources: Sequence[str] = (),
        settlement: RateSettlement | None = None,
    ) -> None:  # fmt: skip
        saving = self._store.save_decision(tenant, record, attempts, sources, settlement)
        try:
            await guard(saving, what="decision store")
        except StoreUnavailableError:  # the answer still goes out; its record is lost, and the log says so
            kept = "; its token reservation is kept" if settlement is not None else ""
            logger.warning(
                "zumik: decision %s could not be recorded (Redis unavailable)%s", record.decision_id, kept
            )


class _ReachSink:
    """Provider reach recorded before a send; a store outage is the request's 503 (a send that
    cannot be recorded does not happen), a revoked source its 404."""

    def __init__(self, store: RedisRoutingStore) -> None:
        self._store = store

    async def sent(self, tenant: str, sources: tuple[str, ...], reach: ProviderReach) -> None:
        refused = await guard(self._store.record_reach(tenant, sources, reach), what="provider reach record")
        if refused is not None:
            raise NotFoundError(
                f"No object {refused!r} exists for you any more (revoked or purged while this request "
                "ran); nothing was sent. Send the request again without it.",
                code="object_not_found",
            )
