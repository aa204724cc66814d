"""The colocated placement: an engine replica that also serves the gateway app in-process.

Requests reach it straight from Serve's proxy (or HAProxy), and the gateway calls the engine as a
local coroutine (``engines/replica.py``'s ``InProcessEngineClient``): one network hop fewer than
Gateway → EngineReplica.

The replica runs its code on Serve's own event loop (``colocated_options``), the one that
serves HTTP: by default Serve runs a replica's code on a second loop in a thread of its own and
hands each request, and each message of its response, from one thread to the other.
"""

from __future__ import annotations

import copy
from typing import Any

from zumik_serve.api.drain import DrainReport, drain_app
from zumik_serve.app.context import GatewaySettings, make_gateway_app
from zumik_serve.app.gateway import ray_clients, ray_metrics
from zumik_serve.app.node_sweep import ray_node_sweeper
from zumik_serve.engines.protocol import EngineClient
from zumik_serve.engines.replica import EngineReplica, InProcessEngineClient

# Read by Serve when a replica's process starts. "0": the replica's own code (the gateway app,
# vLLM's AsyncLLM and its output handler) runs on the loop that serves HTTP, as in vLLM's own
# server. With the default, a request crosses threads on its way in and each response message on
# its way out, the two threads sharing one GIL (issue #15; docs/benchmarks.md has the runs, whose
# gain is within this machine's noise so far).
SEPARATE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"


def colocated_options(options: dict[str, Any]) -> dict[str, Any]:
    """The engine group's Serve deployment ``options`` for the colocated replica: its code on
    Serve's own event loop, merged into ``ray_actor_options.runtime_env.env_vars`` (every other
    option and variable kept, ``options`` not changed)."""
    merged = copy.deepcopy(options)
    actor_options = merged.setdefault("ray_actor_options", {})
    runtime_env = actor_options.get("runtime_env") or {}
    env_vars = {**(runtime_env.get("env_vars") or {}), SEPARATE_THREAD_ENV: "0"}
    actor_options["runtime_env"] = {**runtime_env, "env_vars": env_vars}
    return merged


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
