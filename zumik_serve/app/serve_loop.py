"""Where a Zumik replica's own code and its handles' router run: on the loop that serves it.

By default Ray Serve runs a replica's code on a second event loop, in a thread of its own, and
the router of every handle the replica calls on a third loop in yet another thread. Each request
then crosses threads on its way in, each message of a streamed answer on its way out, and each
call through a handle (gateway to engine replica, gateway to the scheduler owner, an engine's KV
events to the owner) crosses again, the threads sharing one GIL. Ray's throughput-optimized mode
(``RAY_SERVE_THROUGHPUT_OPTIMIZED``) turns both off for a whole cluster; Zumik's deployments turn
them off for their own replicas through their ``runtime_env``, so it holds on a cluster started
elsewhere too (KubeRay, ``ray start``), where Serve's proxy and controller keep the cluster's
settings. The price, which Zumik's replicas pay already: nothing on their loop may block
(tokenizing, file sweeps and tier work run in pools or other processes), and every handle call
is made from that loop (all of Zumik's are awaited in coroutines).

``tests/integration/test_colocated_loop.py`` and ``test_routing_2x.py`` check the running
replicas' threads.
"""

from __future__ import annotations

from typing import Any

from zumik_serve.app.priority import with_env_vars, with_niceness

USER_CODE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
ROUTER_LOOP_ENV = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"
ON_SERVE_LOOP = {USER_CODE_THREAD_ENV: "0", ROUTER_LOOP_ENV: "0"}


def on_serve_loop(options: dict[str, Any]) -> dict[str, Any]:
    """Serve deployment ``options`` whose replicas run their code, and route their handles'
    calls, on Serve's own event loop: merged into ``ray_actor_options.runtime_env.env_vars``
    (read by Serve when a replica's process starts), every other option and variable kept,
    ``options`` not changed."""
    return with_env_vars(options, ON_SERVE_LOOP)


def zumik_replica_options(options: dict[str, Any], niceness: int) -> dict[str, Any]:
    """What every Zumik deployment's replicas run with: the profile's ``niceness``
    (``app/priority.py``) and Serve's own loop for their code and handles."""
    return on_serve_loop(with_niceness(options, niceness))
