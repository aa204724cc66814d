"""Where a user finds Zumik's metrics: the Ray dashboard and the metrics export port of the Ray
head a stack starts, chosen before ``ray.init`` and read back (URLs) once Ray runs.

    zumik serve (defaults)                  what is there
      http://127.0.0.1:8265                 Ray dashboard (Serve, actors, logs; its Metrics tab
                                            embeds Grafana when RAY_GRAFANA_HOST is set)
      http://127.0.0.1:8080/metrics         Ray's metrics export: ray_zumik_*, ray_vllm_*,
                                            ray_serve_* (Prometheus text, read by
                                            deploy/prometheus/prometheus.yml)
      <session dir>/prom_metrics_service_discovery.json
                                            every node's metrics address (Prometheus file_sd)

Listening addresses: the dashboard on ``dashboard_host`` (loopback unless asked). Ray binds its
metrics port like its other ports (GCS, raylet, object manager): on every interface of a Linux
node, and prints it under the node's address; a firewall or an unpublished container port keeps
it private. A Ray cluster joined through ``RAY_ADDRESS`` keeps the ports its own ``ray start``
chose (``--metrics-export-port``, ``--dashboard-host``); the URLs are read from it all the same.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, replace
from typing import Any

from zumik_serve.store.local_redis import free_port

LOOPBACK = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8265  # Ray's own default
DEFAULT_METRICS_PORT = 8080  # the port Ray's docs use for --metrics-export-port
DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # Ray writes it in its session folder


class MonitoringPortError(ValueError):
    """A fixed dashboard or metrics port is taken: the stack does not start."""


@dataclass(frozen=True)
class MonitoringOptions:
    """How a Ray head this stack starts exposes itself. The defaults suit a library caller (a
    bench or a test beside ``zumik serve``): no dashboard and a free metrics port. ``zumik
    serve`` asks for the dashboard and fixed ports (``cli.py``)."""

    include_dashboard: bool = False
    dashboard_host: str = LOOPBACK
    dashboard_port: int | None = None  # None: Ray's 8265, or the next free one
    metrics_port: int | None = None  # None: a free port, picked when the stack starts

    def resolved(self) -> MonitoringOptions:
        """These options with the metrics port fixed, after checking that fixed ports are free."""
        if self.include_dashboard and self.dashboard_port is not None:
            _check_free(self.dashboard_host, self.dashboard_port, "dashboard", "--dashboard-port")
        if self.metrics_port is None:
            return replace(self, metrics_port=free_port())
        _check_free("", self.metrics_port, "metrics", "--metrics-port")  # Ray binds every interface
        return self

    def ray_init_kwargs(self) -> dict[str, Any]:
        """``ray.init`` arguments for a local head (call on ``resolved()`` options)."""
        kwargs: dict[str, Any] = {
            "include_dashboard": self.include_dashboard,
            "dashboard_host": self.dashboard_host,
            "_metrics_export_port": self.metrics_port,
        }
        if self.dashboard_port is not None:
            kwargs["dashboard_port"] = self.dashboard_port
        return kwargs

    def describe(self) -> str:
        dashboard = (
            f"dashboard on {self.dashboard_host}:{self.dashboard_port or DEFAULT_DASHBOARD_PORT}"
            if self.include_dashboard
            else "no dashboard"
        )
        return f"{dashboard}, metrics on port {self.metrics_port}"


@dataclass(frozen=True)
class MonitoringUrls:
    """Where the running stack's monitoring answers."""

    dashboard: str | None  # None: no dashboard (not asked for, or Ray without its dependencies)
    metrics: tuple[str, ...]  # every alive node's metrics export, the gateway's node among them
    discovery_file: str  # Prometheus file_sd of every node's metrics address (on the head)


def monitoring_urls(ray_context: Any) -> MonitoringUrls:
    """The URLs of the Ray cluster this process is connected to (``ray_context``: what
    ``ray.init`` returned)."""
    import ray

    dashboard = str(getattr(ray_context, "dashboard_url", "") or "")
    if dashboard and "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    metrics = tuple(
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    )
    session_dir = str(ray_context.address_info.get("session_dir") or "")
    return MonitoringUrls(
        dashboard=dashboard or None,
        metrics=metrics,
        discovery_file=os.path.join(session_dir, DISCOVERY_FILE),
    )


def _check_free(host: str, port: int, what: str, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise MonitoringPortError(
                f"the {what} port {host or '*'}:{port} is already in use (another `zumik serve` or Ray "
                f"head?); stop it or choose another port with {flag}"
            ) from None
