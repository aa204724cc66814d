"""Gateway: the stateless FastAPI ingress deployment (N replicas) of the separate placement.

It wires (``app/context.py``) and holds no policy: its engines are Serve handles to the
EngineReplica deployments, its metrics Ray's.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from zumik_serve.api.app import App
from zumik_serve.api.drain import DrainReport, drain_app
from zumik_serve.app.context import GatewaySettings, Metrics, make_gateway_app
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
    ) -> None:
        """``engines``: the first model group's replicas by id, or ``group``: its one deployment
        whose replicas Zumik picks (``app/replica_group.py``); ``other_groups``: each other
        model's (by its served name); ``owner``: the profile's scheduler owner, when several
        gateways route or a group's engines report (``app/scheduler_actor.py``)."""
        self._engines = GroupEngines(group) if group is not None else ray_clients(engines)
        self._owner = owner
        self._app = make_gateway_app(
            settings, self._engines, ray_metrics(settings),
            other_groups={model: ray_clients(handles) for model, handles in (other_groups or {}).items()},
            nodes=ray_node_sweeper(settings.kv_tiers),
        )  # fmt: skip

    async def __serve_build_asgi_app__(self) -> App:
        scheduler = self._app.state.pipeline.context.dispatcher.scheduler
        self._link = link_gateway(scheduler, self._engines, self._owner)
        return self._app

    async def drain(self, timeout_s: float) -> DrainReport:
        """New requests get 503; waits up to ``timeout_s`` for those in flight (``app/shutdown.py``)."""
        return await drain_app(self._app, timeout_s)
