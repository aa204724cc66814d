"""The colocated engine replica runs the gateway and vLLM on Serve's own event loop
(``app/colocated.py``): its process has no second thread running a loop for user code, and it
answers a completion (the engine's output handler runs on that same loop)."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.integration.conftest import DEV_KEY
from zumik_serve.app.colocated import SEPARATE_THREAD_ENV

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def _replica_threads() -> list[tuple[str, str | None]]:
    import os

    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if "EngineReplica" in entry["name"]:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            names, env = ray.get(
                actor.__ray_call__.remote(
                    lambda _self: (
                        [t.name for t in threading.enumerate()],
                        os.environ.get(SEPARATE_THREAD_ENV),
                    )
                ),
                timeout=60,
            )
            found.extend((name, env) for name in names)
    return found


def test_colocated_replica_runs_user_code_on_serves_loop(running_stack) -> None:
    answer = httpx.post(
        f"{running_stack.url}/v1/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={"model": running_stack.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    threads = _replica_threads()
    assert threads, "no engine replica found"
    assert {env for _, env in threads} == {"0"}, threads
    assert not [name for name, _ in threads if "_run_user_code_event_loop" in name], threads
