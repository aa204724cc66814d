"""The CPU priority of the serving processes: the profile's ``niceness``, not Ray's 15.

Ray starts every worker process at niceness 15 (its ``worker_niceness`` setting), so without
this the engine replica, vLLM's engine core (a child process of the replica, which inherits its
niceness), the colocated or separate gateway, the scheduler owner, Serve's proxy and HAProxy (a
child of the proxy) would all yield to anything else on the machine. A process that is not root
cannot lower its own niceness, so the value has to be set where Ray starts the worker. Two
levers, both read by Ray's core worker as ``RAY_worker_niceness`` before it renices itself:

- a Ray head this stack starts inherits the variable from the driver's environment, and gives
  it to every worker it starts (Serve's controller and proxy, HAProxy, the replicas);
- each Zumik deployment carries it in its ``runtime_env``, so that its replicas get the
  profile's niceness on a Ray cluster started elsewhere too (KubeRay, ``ray start``), where
  Serve's proxy and HAProxy keep the cluster's setting (docs/byoc.md says how to set it).
"""

from __future__ import annotations

import copy
import os
from typing import Any

WORKER_NICENESS_ENV = "RAY_worker_niceness"  # RayConfig's worker_niceness, read from the env


def with_niceness(options: dict[str, Any], niceness: int) -> dict[str, Any]:
    """Serve deployment ``options`` whose replicas start at ``niceness``: merged into
    ``ray_actor_options.runtime_env.env_vars``, every other option and variable kept."""
    return with_env_vars(options, {WORKER_NICENESS_ENV: str(niceness)})


def with_env_vars(options: dict[str, Any], env_vars: dict[str, str]) -> dict[str, Any]:
    """Serve deployment ``options`` whose replicas' processes start with ``env_vars`` (merged into
    ``ray_actor_options.runtime_env.env_vars``), every other option and variable kept, ``options``
    not changed."""
    merged = copy.deepcopy(options)
    actor_options = merged.setdefault("ray_actor_options", {})
    runtime_env = actor_options.get("runtime_env") or {}
    actor_options["runtime_env"] = {
        **runtime_env,
        "env_vars": {**(runtime_env.get("env_vars") or {}), **env_vars},
    }
    return merged


def process_niceness(pid: int) -> int:
    """A process's nice value, read from ``/proc/<pid>/stat`` (field 19), as ``ps -o ni`` shows."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return int(fields[16])  # fields after the name start at field 3 (state)


def engine_replica_pids() -> list[int]:
    """The process ids of this Ray cluster's engine replica actors (named by Serve, found
    through Ray's GCS; the calling process must be connected to the cluster)."""
    return _actor_pids("EngineReplica")


def serve_proxy_pids() -> list[int]:
    """The process ids of Serve's proxy actors (HAProxy, when on, runs as their child)."""
    return _actor_pids("SERVE_PROXY")


def _actor_pids(name_part: str) -> list[int]:
    import ray

    pids: list[int] = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if name_part in entry["name"]:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            pid: Any = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
            pids.append(int(pid))
    return pids
