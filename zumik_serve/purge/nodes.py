"""The node-local KV tiers (host RAM, local disk) of a purge: swept on every node, each node reported.

The host tier (files in ``/dev/shm``) and the disk tier live on each node's own filesystem, so
the purge's tiers step sweeps them once per node that may hold the scope's blocks; the Redis
tier is one for the region and is swept once, by the gateway (``purge/service.py``)::

    gateway: NodeSweeper.sweep(scopes)
      ├─ node A ─► sweep_here(node A, config, scopes): remove each scope, then re-check
      │            → NodeReport(counts={HOST: (removed, remaining), DISK: ...})
      ├─ node B ─► dead, unreachable, failed or timed out
      │            → NodeReport(error="why"), no counts: nothing there can be shown removed
      └─ ...

``NodeSweeper`` has two implementations: ``LocalNodeSweeper`` (no Ray: the gateway's process is
the one node) and ``app/node_sweep.py``'s ``RayNodeSweeper`` (a task pinned to each node). The
tiers step sweeps twice (the second time after the engines' key caches expired); ``merge_passes``
turns both passes into what the job stores per tier and node (``NodeTierSweep``), and the receipt
lists it (``receipt.NodeEntry``): a node is clean only when the last pass reached it and its
re-check found no block of the scopes left.

The tier roots of a node are the profile's (``shm_root``, ``disk_root`` of the connector config),
unless that node's environment names others: ``ZUMIK_KV_SHM_ROOT``, ``ZUMIK_KV_DISK_ROOT`` (several
Ray nodes on one host, a node whose disk tier is mounted elsewhere). The engines of that node must
use the same roots, or the sweep looks where their blocks are not.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ConfigDict

from kvstore.keys import ScopeId
from kvstore.tier import Tier, TierBackend
from kvstore.tiers.build import build_tiers
from kvstore.tiers.disk import DiskTier

NODE_TIERS = (Tier.HOST, Tier.DISK)  # per node; every other tier is shared by the region
SHM_ROOT_ENV = "ZUMIK_KV_SHM_ROOT"
DISK_ROOT_ENV = "ZUMIK_KV_DISK_ROOT"
LOCAL_NODE_ID = "local"  # the node id of the one node a gateway without Ray sweeps


@dataclass(frozen=True)
class NodeRef:
    """A node of the cluster: ``node_id`` is Ray's (hex), ``hostname`` what that node calls itself."""

    node_id: str
    hostname: str


@dataclass(frozen=True)
class NodeTierCount:
    """One sweep of one tier on one node: blocks it removed, and blocks of the scopes its re-check
    (a listing after the removal) still found."""

    removed_blocks: int
    remaining_blocks: int


@dataclass(frozen=True)
class NodeReport:
    """One node's answer to one sweep. ``error`` None: the node was swept and ``counts`` has each
    node tier of the config. ``error`` set: it could not be swept (why, in words) and ``counts``
    is empty."""

    node: NodeRef
    counts: Mapping[Tier, NodeTierCount] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class NodeTierSweep:
    """What a purge did to one node tier on one node, over both passes (stored in the job).

    ``removed_blocks``: removed by both passes. ``remaining_blocks``: the last pass's re-check;
    None when the last pass did not reach the node. ``reason`` None means the node is clean (the
    last pass reached it and found nothing left); otherwise it says why the node is not shown
    clean (the sweep failed there, the node was down, blocks remained)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    node_id: str
    hostname: str
    removed_blocks: int
    remaining_blocks: int | None = None
    reason: str | None = None

    @property
    def clean(self) -> bool:
        return self.reason is None


class NodeSweeper(Protocol):
    """Sweeps the node tiers of every node that may hold blocks.

    ``tiers``: the node tiers the config has (each clean node reports exactly these).
    ``sweep`` never raises for a node it could not sweep: that node's report says why. It
    returns one report per node, in no particular order."""

    @property
    def tiers(self) -> tuple[Tier, ...]: ...

    async def sweep(self, scopes: Sequence[str]) -> list[NodeReport]: ...


def node_tier_config(config: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The connector config with this node's roots: ``ZUMIK_KV_SHM_ROOT`` replaces ``shm_root``,
    ``ZUMIK_KV_DISK_ROOT`` replaces ``disk_root`` (only where the config has a disk tier)."""
    mine = dict(config)
    if environ.get(SHM_ROOT_ENV):
        mine["shm_root"] = environ[SHM_ROOT_ENV]
    if environ.get(DISK_ROOT_ENV) and mine.get("disk_root"):
        mine["disk_root"] = environ[DISK_ROOT_ENV]
    return mine


def node_tier_kinds(config: Mapping[str, Any]) -> tuple[Tier, ...]:
    """The node tiers ``config`` turns on (the same on every node), nearest first."""
    kinds: list[Tier] = []
    if int(config.get("host_capacity_bytes") or 0) > 0:
        kinds.append(Tier.HOST)
    if config.get("disk_root"):
        kinds.append(Tier.DISK)
    return tuple(kinds)


def node_tiers(config: Mapping[str, Any]) -> list[DiskTier]:
    """The node tiers of ``config``, built as the engines build them (``kvstore.tiers.build``,
    budgets included, so that what a sweep removes leaves the node's ledgers)."""
    local = {name: value for name, value in config.items() if name != "redis_url"}  # no client
    return [tier for tier in build_tiers(local) if isinstance(tier, DiskTier) and tier.tier in NODE_TIERS]


def sweep_tiers(tiers: Sequence[DiskTier], scopes: Sequence[str]) -> dict[Tier, NodeTierCount]:
    """Remove every block of ``scopes`` from each tier, then list what is left of them.
    Raises when a removal fails (``TierBackend.remove_scopes``)."""
    counts: dict[Tier, NodeTierCount] = {}
    for tier in tiers:
        removed = tier.remove_scopes([ScopeId(scope) for scope in scopes])
        counts[tier.tier] = NodeTierCount(removed, sum(_blocks_left(tier, scope) for scope in scopes))
    return counts


def sweep_here(
    node: NodeRef, config: Mapping[str, Any], scopes: Sequence[str], environ: Mapping[str, str]
) -> NodeReport:
    """Sweep this node's tiers (``config`` with this node's roots); a failure is the report's
    error, never an exception (the sweep of the other nodes goes on)."""
    try:
        return NodeReport(node, sweep_tiers(node_tiers(node_tier_config(config, environ)), scopes))
    except Exception as exc:
        return NodeReport(node, error=f"the sweep failed there: {type(exc).__name__}: {exc}")


class LocalNodeSweeper:
    """The one node of a gateway without Ray: its own process's tiers."""

    def __init__(self, tiers: Sequence[TierBackend], node: NodeRef | None = None) -> None:
        self._tiers = [tier for tier in tiers if isinstance(tier, DiskTier) and tier.tier in NODE_TIERS]
        self._node = node or NodeRef(LOCAL_NODE_ID, socket.gethostname())

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return tuple(tier.tier for tier in self._tiers)

    async def sweep(self, scopes: Sequence[str]) -> list[NodeReport]:
        try:
            return [NodeReport(self._node, sweep_tiers(self._tiers, scopes))]
        except Exception as exc:
            return [NodeReport(self._node, error=f"the sweep failed there: {type(exc).__name__}: {exc}")]


def merge_passes(
    tier: Tier, first: Sequence[NodeReport], second: Sequence[NodeReport]
) -> tuple[NodeTierSweep, ...]:
    """Each node's result for ``tier`` over the two passes, by node id.

    Blocks removed add up over both passes; whether the node is clean is the second pass's
    answer (it ran after nothing could write the scopes any more). A node only the first pass
    reached is not clean: it was gone before the last sweep."""
    nodes: dict[str, NodeTierSweep] = {}
    removed_first = {
        report.node.node_id: report.counts[tier].removed_blocks for report in first if tier in report.counts
    }
    for report in second:
        node_id = report.node.node_id
        before = removed_first.get(node_id, 0)
        count = report.counts.get(tier)
        if report.error is not None or count is None:
            missing = report.error or f"the node did not report its {tier.name.lower()} tier"
            nodes[node_id] = NodeTierSweep(node_id, report.node.hostname, before, None, missing)
            continue
        reason = (
            None
            if count.remaining_blocks == 0
            else f"{count.remaining_blocks} blocks of the scope were still there after the sweep"
        )
        nodes[node_id] = NodeTierSweep(
            node_id, report.node.hostname, before + count.removed_blocks, count.remaining_blocks, reason
        )
    for report in first:
        if report.node.node_id not in nodes:
            node_id = report.node.node_id
            reason = report.error or "it left the cluster before the second sweep"
            removed = removed_first.get(node_id, 0)
            nodes[node_id] = NodeTierSweep(node_id, report.node.hostname, removed, None, reason)
    return tuple(nodes[node_id] for node_id in sorted(nodes))


def _blocks_left(tier: DiskTier, scope: str) -> int:
    """Blocks of ``scope`` under any compat key (``DiskTier``'s layout: root/compat/scope/xx/key.kv)."""
    if not tier.root.is_dir():
        return 0
    return sum(1 for _ in tier.root.glob(f"*/{scope}/*/*.kv"))
