"""Gateway: the stateless FastAPI ingress deployment (N replicas) of the separate placement.

It wires (``app/context.py``) and holds no policy: its engines are Serve handles to the
EngineReplica deployments, its metrics Ray's.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from zumik_serve.api.app import App
from zumik_serve.app.context import GatewaySettings, Metrics, make_gateway_app
from zumik_serve.app.metrics import RayDecisionMetrics, RayReuseMetrics
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
    ) -> None:
        """``engines``: the first model group's replicas by id; ``other_groups``: each other
        model's (by its served name)."""
        self._app = make_gateway_app(
            settings, ray_clients(engines), ray_metrics(settings),
            other_groups={model: ray_clients(handles) for model, handles in (other_groups or {}).items()},
        )  # fmt: skip

    async def __serve_build_asgi_app__(self) -> App:
        return self._app
