"""GatewayContext: everything a gateway process serves requests with, built once at start.

``app/gateway.py`` builds it from the profile and the settings (Redis, engines, providers); the
HTTP app keeps this one typed value (``api/app.py``) and handlers reach the pipeline and the
feature services through it, never through loose attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from profiles import Profile
from zumik_serve.engines.models import ServedModels
from zumik_serve.pipeline.limits import GenerationLimits
from zumik_serve.providers.keys import ByokKeys
from zumik_serve.purge.service import PurgeService
from zumik_serve.qos.admission import AdmissionController
from zumik_serve.qos.store import RedisQuotaStore
from zumik_serve.responses.service import ResponsesService
from zumik_serve.reuse.service import ReuseService
from zumik_serve.routing.dispatch import Dispatcher
from zumik_serve.routing.service import RoutingService
from zumik_serve.state.service import StateService
from zumik_serve.store.kv_probe import KvProbe
from zumik_serve.telemetry.tracing import Tracing
from zumik_serve.tenancy.salts import CacheSalts
from zumik_serve.tenancy.tenant import Authenticator


@dataclass(frozen=True)
class GatewayContext:
    profile: Profile
    models: ServedModels
    authenticator: Authenticator
    salts: CacheSalts
    dispatcher: Dispatcher  # the first model group's (its model, its adapters, the providers)
    state: StateService
    routing: RoutingService
    reuse: ReuseService
    purges: PurgeService
    admission: AdmissionController
    limits: GenerationLimits
    tracing: Tracing
    byok: ByokKeys
    kv_probe: KvProbe | None  # None: the profile has no Redis KV tier to probe
    max_body_bytes: int
    responses: ResponsesService
    dispatchers: Mapping[str, Dispatcher] = field(default_factory=dict)  # by served name
    quotas: RedisQuotaStore | None = None  # per-tenant rate limits; None: none counted

    def dispatcher_for(self, model: str) -> Dispatcher:
        """The dispatcher of the engine group serving ``model`` (the first group's by default)."""
        return self.dispatchers.get(model, self.dispatcher)

    @property
    def priority_scheduling(self) -> bool:
        """Whether the engines schedule by priority (then each QoS class passes its own)."""
        return self.profile.engine.scheduling_policy == "priority"
