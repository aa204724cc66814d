"""What runs inside a Serve app's replica processes: their threads and Serve's loop settings,
read through Ray from the test process (which must be connected to the cluster)."""

from __future__ import annotations

from dataclasses import dataclass

from zumik_serve.app.priority import WORKER_NICENESS_ENV
from zumik_serve.app.serve_loop import ON_SERVE_LOOP


@dataclass(frozen=True)
class ReplicaThreads:
    actor: str  # Serve's name for the replica's actor (it names the deployment)
    threads: tuple[str, ...]  # its Python threads' names (a thread's name carries its target's)
    loop_env: dict[str, str | None]  # the replica's value of each of Serve's loop settings
    niceness_env: str | None  # the niceness Ray was told to start it at (``app/priority.py``)


def replica_threads(name_part: str = "") -> list[ReplicaThreads]:
    """Every live Serve replica whose actor name contains ``name_part``."""
    import os
    import threading

    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if "SERVE_REPLICA" not in entry["name"] or name_part not in entry["name"]:
            continue
        actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
        names, env, niceness = ray.get(
            actor.__ray_call__.remote(
                lambda _self: (
                    [thread.name for thread in threading.enumerate()],
                    {name: os.environ.get(name) for name in ON_SERVE_LOOP},
                    os.environ.get(WORKER_NICENESS_ENV),
                )
            ),
            timeout=60,
        )
        found.append(ReplicaThreads(entry["name"], tuple(names), env, niceness))
    return found


def loop_threads(replica: ReplicaThreads) -> list[str]:
    """The replica's threads that run a second event loop: Serve's for the replica's own code,
    or the router of the handles it calls."""
    return [
        name for name in replica.threads
        if "_run_user_code_event_loop" in name or "_run_router_event_loop" in name
    ]  # fmt: skip
