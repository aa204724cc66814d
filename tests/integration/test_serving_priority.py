"""The serving processes run at the profile's niceness (0 in local-cpu), not Ray's default 15.

Read from ``/proc/<pid>/stat`` of the running stack's processes: the engine replica (the
colocated gateway runs in it) and every process it started (vLLM's engine core among them),
Serve's proxy actor and HAProxy under it. The KV connector's store process is the one
exception, by design: it writes what the engine already answered with, and runs
``store_process.NICENESS`` below the engine that started it so that it yields the cores to
serving.
"""

from __future__ import annotations

import time
import uuid

import openai
import psutil
import pytest

from kvstore.store_process import NICENESS as STORE_NICENESS
from zumik_serve.app.priority import engine_replica_pids, process_niceness, serve_proxy_pids

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def _with_children(pids: list[int], what: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for pid in pids:
        found[pid] = what
        for child in psutil.Process(pid).children(recursive=True):
            try:
                store = "kvstore.store_process" in " ".join(child.cmdline())
                found[child.pid] = f"{'KV store process' if store else child.name()} under the {what}"
            except psutil.NoSuchProcess:
                continue  # ended since it was listed
    return found


def _checked_processes() -> dict[int, str]:
    replicas, proxies = engine_replica_pids(), serve_proxy_pids()
    assert replicas and proxies, (replicas, proxies)
    return {**_with_children(replicas, "engine replica"), **_with_children(proxies, "Serve proxy")}


def test_serving_processes_run_at_the_profiles_niceness(running_stack, client: openai.OpenAI) -> None:
    expected = running_stack.stack.config.profile.niceness
    assert expected == 0
    # A prompt of new full blocks: the connector stores them, through its store process.
    prompt = " ".join(f"{uuid.uuid4().hex}" for _ in range(40))
    client.completions.create(model=running_stack.model, prompt=prompt, max_tokens=1)
    deadline = time.monotonic() + 60
    checked = _checked_processes()
    while not any(what.startswith("KV store process") for what in checked.values()):
        assert time.monotonic() < deadline, f"no KV store process under the engine replica: {checked}"
        time.sleep(0.5)
        checked = _checked_processes()
    assert any("VLLM" in what for what in checked.values()), checked  # vLLM's engine core
    assert any(what.startswith("haproxy") for what in checked.values()), checked
    niceness = {f"{what} ({pid})": process_niceness(pid) for pid, what in checked.items()}
    serving = {name: value for name, value in niceness.items() if not name.startswith("KV store process")}
    assert set(serving.values()) == {expected}, niceness
    # The store process lowers its own priority once it has its configuration, before it builds
    # its tiers or writes anything; until then (its first moments) it runs at the engine's.
    stores = {pid for pid, what in checked.items() if what.startswith("KV store process")}
    while {process_niceness(pid) for pid in stores} != {expected + STORE_NICENESS}:
        assert time.monotonic() < deadline, {pid: process_niceness(pid) for pid in stores}
        time.sleep(0.5)
