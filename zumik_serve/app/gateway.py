"""Gateway: the stateless FastAPI ingress deployment (N replicas) of the separate placement.

It wires (``app/context.py``) and holds no policy: its engines are Serve handles to the
EngineReplica deployments, its metrics Ray's.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from zumik_serve.api.app import App
from zumik_serve.api.drain import DrainReport, drain_app
from zumik_serve.app.context import (
    GatewaySettings,
    Metrics,
    ServedProfile,
    make_gateway_app,
    purge_tier_config,
)
from zumik_serve.app.metrics import RayDecisionMetrics, RayReuseMetrics
from zumik_serve.app.node_sweep import ray_node_sweeper
from zumik_serve.app.replica_group import GroupEngines
from zumik_serve.app.scheduler_actor import link_gateway
from zumik_serve.engines.protocol import EngineClient
from zumik_serve.engines.ray_client import RayEngineClient


def ray_metrics(settings: GatewaySettings) -> Metrics:
    return Metrics(decisions=RayDecisionMetrics(settings.profile_name), reuse=RayReuseMetrics())


def ray_clients(handles: dict[str, Any]) -> dict[str, EngineClient]:
    return {replica: RayEngineClient(handle) for replica, handle in handles.items()}


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Gateway:
    """The separate topology: its own replicas, reaching engines through a Serve handle."""

    def __init__(
        self,
        settings: GatewaySettings,
        engines: dict[str, Any],
        other_groups: dict[str, dict[str, Any]] | None = None,
        *,
        group: Any = None,
        owner: Any = None,
        more: list[dict[str, Any]] | None = None,
    ) -> None:
        """``engines``: the first model group's replicas by id, or ``group``: its one deployment
        whose replicas Zumik picks (``app/replica_group.py``); ``other_groups``: each other
        model's (by its served name); ``owner``: the profile's scheduler owner, when several
        gateways route or a group's engines report (``app/scheduler_actor.py``). ``more``: the
        other profiles this gateway serves, each with the same keys (``application.py``)."""
        served = [
            {
                "settings": settings,
                "engines": engines,
                "other_groups": other_groups,
                "group": group,
                "owner": owner,
            },
            *(more or []),
        ]
        self._wired = [
            (
                GroupEngines(entry["group"]) if entry["group"] is not None else ray_clients(entry["engines"]),
                entry,
            )
            for entry in served
        ]
        profiles = [
            ServedProfile(
                entry["settings"],
                clients,
                ray_metrics(entry["settings"]),
                other_groups={model: ray_clients(h) for model, h in (entry["other_groups"] or {}).items()},
            )
            for clients, entry in self._wired
        ]
        first = profiles[0]
        tier_configs = [profile.settings.kv_tiers for profile in profiles]
        self._app = make_gateway_app(
            first.settings, first.engines, first.metrics, other_groups=first.other_groups,
            nodes=ray_node_sweeper(purge_tier_config(tier_configs)), more=profiles[1:],
        )  # fmt: skip

    async def __serve_build_asgi_app__(self) -> App:
        self._links = [
            link_gateway(pipeline.context.dispatcher.scheduler, clients, entry["owner"])
            for pipeline, (clients, entry) in zip(
                self._app.state.pipelines.values(), self._wired, strict=True
            )
        ]
        return self._app

    async def drain(self, timeout_s: float) -> DrainReport:
        """New requests get 503; waits up to ``timeout_s`` for those in flight (``app/shutdown.py``)."""
        return await drain_app(self._app, timeout_s)
