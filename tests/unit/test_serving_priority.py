"""The serving priority: a profile's niceness reaches each deployment's runtime_env, and the
nice value read from /proc is the one the kernel applies.

The running stack's processes are checked in tests/integration/test_serving_priority.py.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from pydantic import ValidationError

from profiles import Profile, load_builtin
from zumik_serve.app.priority import WORKER_NICENESS_ENV, process_niceness, with_niceness


def test_with_niceness_keeps_other_options_and_variables() -> None:
    options = {
        "max_ongoing_requests": 7,
        "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1"}, "pip": ["x"]}},
    }
    merged = with_niceness(options, 3)
    assert merged["max_ongoing_requests"] == 7
    assert merged["ray_actor_options"]["num_cpus"] == 1
    assert merged["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"A": "1", WORKER_NICENESS_ENV: "3"}, "pip": ["x"]
    }  # fmt: skip
    assert options["ray_actor_options"]["runtime_env"]["env_vars"] == {"A": "1"}  # not mutated


def test_with_niceness_without_actor_options() -> None:
    merged = with_niceness({}, 0)
    assert merged == {"ray_actor_options": {"runtime_env": {"env_vars": {WORKER_NICENESS_ENV: "0"}}}}


def test_process_niceness_reads_the_kernels_value() -> None:
    assert process_niceness(os.getpid()) == os.nice(0)
    child = subprocess.Popen(["nice", "-n", "7", "sleep", "30"])
    try:
        deadline = 50
        while deadline and process_niceness(child.pid) == os.nice(0):  # until exec'd by nice
            subprocess.run(["sleep", "0.1"], check=True)
            deadline -= 1
        assert process_niceness(child.pid) == min(19, os.nice(0) + 7)
    finally:
        child.kill()
        child.wait()


def test_profile_niceness_defaults_to_normal_priority() -> None:
    assert load_builtin("local-cpu").niceness == 0


@pytest.mark.parametrize("value", [-1, 20])
def test_profile_niceness_out_of_range_is_refused_naming_the_field(value: int) -> None:
    data = load_builtin("local-cpu").model_dump(mode="json")
    data["niceness"] = value
    with pytest.raises(ValidationError, match="niceness"):
        Profile.model_validate(data)
