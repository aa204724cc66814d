"""RayNodeSweeper: a purge's node-tier sweep (``purge/nodes.py``) on every node of the Ray cluster.

One task per node the GCS lists as alive, pinned there (``NodeAffinitySchedulingStrategy`` with
``soft=False``: it runs on that node or not at all), sweeps that node's host and disk tiers with
that node's roots. A node the GCS lists as dead, a task that fails, and a task without an answer
after ``timeout_s`` (cancelled then) each give a report with the reason: the purge lowers that
store's class instead of claiming a sweep it did not see.

``zumik tenant delete`` runs outside the cluster's processes: it joins the cluster the stack runs
on (``cluster_node_sweeper``) at the address ``app/ray_head.running_ray_address`` finds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvstore.tier import Tier
from zumik_serve.purge.nodes import NodeRef, NodeReport, node_tier_kinds, sweep_here

CONNECT_TIMEOUT_S = 5.0  # how long a named cluster's GCS may take to accept a connection
DEFAULT_TIMEOUT_S = 120.0  # a disk tier of many blocks takes a while to remove
_REASON_CHARS = 300  # a failed task's message carries a traceback; the receipt gets its head


@ray.remote(num_cpus=0, max_retries=0)
def _sweep_node(node: NodeRef, config: dict[str, Any], scopes: list[str]) -> NodeReport:
    return sweep_here(node, config, scopes, os.environ)


class RayNodeSweeper:
    """``NodeSweeper`` over the Ray cluster this process is connected to."""

    def __init__(self, config: Mapping[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._config = dict(config)
        self._timeout_s = timeout_s

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return node_tier_kinds(self._config)

    async def sweep(self, scopes: Sequence[str]) -> list[NodeReport]:
        return await asyncio.to_thread(self._sweep, list(scopes))

    def _sweep(self, scopes: list[str]) -> list[NodeReport]:
        reports: list[NodeReport] = []
        tasks: dict[Any, NodeRef] = {}
        for info in ray.nodes():
            node = NodeRef(str(info["NodeID"]), str(info.get("NodeManagerHostname") or ""))
            if not info.get("Alive"):
                why = info.get("DeathReasonMessage") or "no reason given"
                reports.append(NodeReport(node, error=f"the node is dead ({_head(str(why))})"))
                continue
            pinned = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
            tasks[_sweep_node.options(scheduling_strategy=pinned).remote(node, self._config, scopes)] = node
        if not tasks:
            return reports
        ready, late = ray.wait(list(tasks), num_returns=len(tasks), timeout=self._timeout_s)
        for task in ready:
            try:
                reports.append(ray.get(task))
            except Exception as exc:  # the node died under the task, its worker crashed, ...
                error = f"the sweep task failed: {type(exc).__name__}: {_head(str(exc))}"
                reports.append(NodeReport(tasks[task], error=error))
        for task in late:
            ray.cancel(task, force=True)
            reports.append(NodeReport(tasks[task], error=f"no answer within {self._timeout_s:g} s"))
        return reports


def ray_node_sweeper(kv_tiers: Mapping[str, Any] | None) -> RayNodeSweeper | None:
    """The sweeper of a gateway in Ray, for its engines' connector config; None when the config
    has no node tier (nothing to sweep per node)."""
    if not kv_tiers or not node_tier_kinds(kv_tiers):
        return None
    return RayNodeSweeper(kv_tiers)


def _head(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:_REASON_CHARS]


def cluster_node_sweeper(address: str | None, config: Mapping[str, Any]) -> RayNodeSweeper | None:
    """The sweeper over every node of the cluster at ``address`` (joined as a driver), or None
    without an address. Raises ``OSError``: a GCS address (``host:port``) that accepts no
    connection within ``CONNECT_TIMEOUT_S`` (``ray.init`` would retry for minutes), or a process
    already joined to another cluster."""
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass  # ConnectionRefusedError, TimeoutError, socket.gaierror: no cluster there
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except OSError:
            raise
        except Exception as exc:  # a version mismatch, an address Ray cannot take
            raise OSError(f"{type(exc).__name__}: {exc}") from exc
    elif ray.get_runtime_context().gcs_address != address and address != "auto":
        joined = ray.get_runtime_context().gcs_address
        raise OSError(f"this process is already joined to the Ray cluster at {joined}")
    return RayNodeSweeper(config)
