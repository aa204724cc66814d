"""Every Zumik deployment runs its replicas' code, and their handles' router, on Serve's own
event loop: the options carry Serve's settings in the replica's runtime_env, every other option
and variable kept (``app/serve_loop.py``).

That every deployment of each placement gets them, and that the running replicas have no second
event-loop thread, is checked on the real stack in tests/integration/test_colocated_loop.py and
test_routing_2x.py (building the app starts Ray, which a unit test does not).
"""

from __future__ import annotations

from zumik_serve.app.priority import WORKER_NICENESS_ENV, with_niceness
from zumik_serve.app.serve_loop import ON_SERVE_LOOP, ROUTER_LOOP_ENV, USER_CODE_THREAD_ENV, on_serve_loop


def test_the_settings_are_serves_own() -> None:
    from ray.serve._private import constants

    assert hasattr(constants, USER_CODE_THREAD_ENV) and hasattr(constants, ROUTER_LOOP_ENV)
    assert ON_SERVE_LOOP == {USER_CODE_THREAD_ENV: "0", ROUTER_LOOP_ENV: "0"}


def test_serve_loop_options_keep_other_options_and_variables() -> None:
    options = with_niceness(
        {
            "max_ongoing_requests": 7,
            "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1"}}},
        },
        0,
    )
    merged = on_serve_loop(options)
    assert merged["max_ongoing_requests"] == 7
    assert merged["ray_actor_options"]["num_cpus"] == 1
    assert merged["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "A": "1", WORKER_NICENESS_ENV: "0", **ON_SERVE_LOOP
    }  # fmt: skip
    assert USER_CODE_THREAD_ENV not in options["ray_actor_options"]["runtime_env"]["env_vars"]  # not mutated


def test_serve_loop_options_without_actor_options() -> None:
    assert on_serve_loop({}) == {"ray_actor_options": {"runtime_env": {"env_vars": ON_SERVE_LOOP}}}
