"""The colocated placement: an engine replica that also serves the gateway app in-process.

Requests reach it straight from Serve's proxy (or HAProxy), and the gateway calls the engine as a
local coroutine (``engines/replica.py``'s ``InProcessEngineClient``): one network hop fewer than
Gateway → EngineReplica.

Like every Zumik replica it runs its code on Serve's own event loop, the one that serves HTTP
(``app/serve_loop.py``): the gateway app, vLLM's AsyncLLM and its output handler share it, as in
vLLM's own server.
"""

from __future__ import annotations

from typing import Any

from zumik_serve.api.drain import DrainReport, drain_app
from zumik_serve.app.context import GatewaySettings, make_gateway_app
from zumik_serve.app.gateway import ray_clients, ray_metrics
from zumik_serve.app.node_sweep import ray_node_sweeper
from zumik_serve.engines.protocol import EngineClient
from zumik_serve.engines.replica import EngineReplica, InProcessEngineClient


class IngressEngineReplica(EngineReplica):
    async def __init__(  # type: ignore[misc]
        self,
        llm_config: Any,
        settings: GatewaySettings,
        other_groups: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """``other_groups``: Serve handles of the other models' engine groups (by served name)."""
        await super().__init__(llm_config)
        engines: dict[str, EngineClient] = {"r0": InProcessEngineClient(self)}
        self._gateway_app = make_gateway_app(
            settings, engines, ray_metrics(settings),
            other_groups={model: ray_clients(handles) for model, handles in (other_groups or {}).items()},
            nodes=ray_node_sweeper(settings.kv_tiers),
        )  # fmt: skip

    async def __serve_build_asgi_app__(self) -> Any:
        return self._gateway_app

    async def drain(self, timeout_s: float) -> DrainReport:
        """New requests get 503; waits up to ``timeout_s`` for those in flight (``app/shutdown.py``)."""
        return await drain_app(self._gateway_app, timeout_s)
