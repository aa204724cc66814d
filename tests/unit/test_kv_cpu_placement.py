"""Where the KV connector's work runs on a vLLM CPU engine (``kvstore/cpu_placement.py``).

Invariants:
- a CPU engine with the connector reserves the cores vLLM reserves without one (one per local
  rank), unless the operator's environment already says how many;
- the cores vLLM bound the forward to are read from each variable vLLM may set, and the
  write-behind thread runs on the node's other cores (never on none: then it stays put);
- the write-behind thread really moves there, and the thread that starts it does not.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kvstore.cpu_placement import (
    RESERVED_CPUS_ENV,
    engine_environment,
    forward_cpus,
    move_this_thread,
    online_cpus,
    spare_cpus,
)
from kvstore.manager import TierManager
from kvstore.tier import BlockAddress
from kvstore.tiers.disk import DiskTier
from kvstore.write_behind import StoreBatch, WriteBehind


def test_a_connector_engine_reserves_one_core_per_local_rank_unless_the_operator_chose() -> None:
    assert engine_environment(1, environ={}) == {RESERVED_CPUS_ENV: "1"}
    assert engine_environment(4, environ={}) == {RESERVED_CPUS_ENV: "4"}
    assert engine_environment(2, environ={RESERVED_CPUS_ENV: "0"}) == {}
    with pytest.raises(ValueError):
        engine_environment(0, environ={})


@pytest.mark.parametrize(
    ("environ", "cores"),
    [
        ({"OMP_PLACES": "{0,1,2}", "OMP_PROC_BIND": "true"}, {0, 1, 2}),
        ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[4,5,6]"}, {4, 5, 6}),
        ({"GOMP_CPU_AFFINITY": "0 2 4"}, {0, 2, 4}),
        ({"OMP_PLACES": "{0-3}"}, {0, 1, 2, 3}),
    ],
)
def test_the_forward_cores_are_read_from_what_vllm_sets(environ: dict[str, str], cores: set[int]) -> None:
    assert forward_cpus(environ) == cores


@pytest.mark.parametrize(
    "environ",
    [{}, {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_PLACES": "{0}"}, {"OMP_PLACES": "{0:4}"}],
)
def test_no_binding_or_an_unknown_form_names_no_forward_cores(environ: dict[str, str]) -> None:
    assert forward_cpus(environ) is None
    assert spare_cpus(environ, online=frozenset({0, 1})) is None


def test_the_spare_cores_are_the_online_ones_the_forward_does_not_use() -> None:
    online = frozenset({0, 1, 2, 3})
    assert spare_cpus({"OMP_PLACES": "{0,1,2}"}, online=online) == {3}
    assert spare_cpus({"OMP_PLACES": "{0,1,2,3}"}, online=online) is None  # nothing left: stay put
    assert online_cpus()


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="one core"
)
def test_the_write_behind_thread_runs_on_the_spare_cores_and_its_starter_does_not_move(
    tmp_path: Path,
) -> None:
    cores = sorted(os.sched_getaffinity(0))
    forward, spare = frozenset(cores[:1]), frozenset(cores[1:])
    seen: list[set[int]] = []

    def value(index: int) -> bytes:  # runs on the writer thread
        seen.append(os.sched_getaffinity(0))
        return b"block"

    def run() -> None:
        assert move_this_thread(forward)  # as vLLM binds the worker's main thread
        writer = WriteBehind(TierManager([DiskTier(tmp_path / "kv")]), max_pending_bytes=1 << 20, cpus=spare)
        batch = StoreBatch(addresses=(BlockAddress("c" * 64, "k" * 32),), num_bytes=5, value=value)  # type: ignore[arg-type]
        assert writer.submit(batch) and writer.flush(10)
        writer.close()
        assert os.sched_getaffinity(0) == forward

    starter = threading.Thread(target=run)
    starter.start()
    starter.join()
    assert seen == [set(spare)]
    assert not move_this_thread(None)


def test_zumik_cpu_engines_with_the_connector_carry_the_reservation() -> None:
    from profiles import resolve_profile
    from zumik_serve.engines.vllm_config import connector_engine_environment, llm_config_kwargs

    profile = resolve_profile("local-cpu")
    kv = {"kv_connector": "ZumikKVConnector", "kv_connector_extra_config": {"compat_digest": "d" * 64}}
    options = llm_config_kwargs(profile, Path("/models/tiny"), None, kv)["deployment_config"][
        "ray_actor_options"
    ]
    if RESERVED_CPUS_ENV in os.environ:  # an operator's choice stands
        assert connector_engine_environment(profile) == {}
        return
    assert options["runtime_env"]["env_vars"] == {RESERVED_CPUS_ENV: "1"}
    without = llm_config_kwargs(profile, Path("/models/tiny"), None, None)["deployment_config"][
        "ray_actor_options"
    ]
    assert "runtime_env" not in without
