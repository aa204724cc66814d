"""Zumik's replica choice inside one engine deployment: a Ray Serve ``RequestRouter``.

A BYOC group is one Serve deployment (``num_replicas`` or ``autoscaling_config``); the gateway's
scheduler picks the replica (prefix residency and load, ``routing/scheduler.py``) and the call
carries the pick as the keyword ``zumik_replica`` (``app/replica_group.py``):

    gateway ─ decide() → Pick(local, <replica id>) ─ handle.generate.remote(call, body,
              zumik_replica=<id>) ─► ZumikRequestRouter.choose_replicas ─► that replica

The router runs inside the gateway's handle (Serve builds it per handle, per process). It
honours the pick when that replica is running, else leaves the choice to the ranks Serve would
use (the replica left between the decision and the send). It also tells the gateway which
replicas are running (``replica_group.membership``).

Serve pickles this module by value into each handle's process: keep it to the router, and
reach shared state through ``replica_group`` (a module, pickled by reference).
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from zumik_serve.app import replica_group
from zumik_serve.routing.scheduler import ANY_REPLICA


def zumik_router_config() -> RequestRouterConfig:
    """The ``request_router_config`` of a group deployment Zumik chooses replicas in."""
    path: Any = f"{__name__}.{ZumikRequestRouter.__name__}"  # Ray's stubs type it as a dict
    return RequestRouterConfig(request_router_class=path)


def ranked(candidates: list[Any], wanted: str | None) -> list[list[Any]]:
    """The ranks for one request: the wanted replica alone when it is a candidate, else every
    candidate in one rank (Serve picks the least loaded of two)."""
    if wanted and wanted != ANY_REPLICA:
        chosen = [replica for replica in candidates if replica.replica_id.unique_id == wanted]
        if chosen:
            return [chosen]
    return [candidates]


class ZumikRequestRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        wanted = pending_request.kwargs.get(replica_group.HINT) if pending_request is not None else None
        return ranked(candidate_replicas, wanted if isinstance(wanted, str) else None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        deployment = self._deployment_id
        replica_group.membership(deployment.app_name, deployment.name).update(
            tuple(sorted(replica.replica_id.unique_id for replica in replicas))
        )
