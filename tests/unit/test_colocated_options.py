"""The colocated engine replica runs its code on Serve's own event loop: the deployment options
carry Serve's setting in the replica's runtime_env, every other option and variable kept.

That the running replica has no second event-loop thread is checked on the real stack in
tests/integration/test_colocated_loop.py.
"""

from __future__ import annotations

from zumik_serve.app.colocated import SEPARATE_THREAD_ENV, colocated_options
from zumik_serve.app.priority import WORKER_NICENESS_ENV, with_niceness


def test_colocated_options_keep_other_options_and_variables() -> None:
    options = with_niceness(
        {
            "max_ongoing_requests": 7,
            "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1"}}},
        },
        0,
    )
    merged = colocated_options(options)
    assert merged["max_ongoing_requests"] == 7
    assert merged["ray_actor_options"]["num_cpus"] == 1
    assert merged["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "A": "1", WORKER_NICENESS_ENV: "0", SEPARATE_THREAD_ENV: "0"
    }  # fmt: skip
    assert SEPARATE_THREAD_ENV not in options["ray_actor_options"]["runtime_env"]["env_vars"]  # not mutated


def test_colocated_options_without_actor_options() -> None:
    assert colocated_options({}) == {
        "ray_actor_options": {"runtime_env": {"env_vars": {SEPARATE_THREAD_ENV: "0"}}}
    }
