"""The serving processes run at the profile's niceness (0 in local-cpu), not Ray's default 15.

Read from ``/proc/<pid>/stat`` of the running stack's processes: the engine replica (the
colocated gateway runs in it) and every process it started (vLLM's engine core among them),
Serve's proxy actor and HAProxy under it.
"""

from __future__ import annotations

import psutil
import pytest

from zumik_serve.app.priority import engine_replica_pids, process_niceness, serve_proxy_pids

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def _with_children(pids: list[int], what: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for pid in pids:
        found[pid] = what
        for child in psutil.Process(pid).children(recursive=True):
            found[child.pid] = f"{child.name()} under the {what}"
    return found


def test_serving_processes_run_at_the_profiles_niceness(running_stack) -> None:
    expected = running_stack.stack.config.profile.niceness
    assert expected == 0
    replicas, proxies = engine_replica_pids(), serve_proxy_pids()
    assert replicas and proxies, (replicas, proxies)
    checked = {**_with_children(replicas, "engine replica"), **_with_children(proxies, "Serve proxy")}
    assert any("VLLM" in what for what in checked.values()), checked  # vLLM's engine core
    assert any(what.startswith("haproxy") for what in checked.values()), checked
    niceness = {f"{what} ({pid})": process_niceness(pid) for pid, what in checked.items()}
    assert set(niceness.values()) == {expected}, niceness
