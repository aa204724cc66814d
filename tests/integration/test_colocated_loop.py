"""The colocated engine replica runs the gateway and vLLM on Serve's own event loop
(``app/serve_loop.py``): its process has no second thread running a loop for user code or for
a handle's router, and it answers a completion (the engine's output handler runs on that same
loop). ``test_routing_2x.py`` checks the same of the separate placement's replicas."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import DEV_KEY
from tests.support.serve_replicas import loop_threads, replica_threads
from zumik_serve.app.serve_loop import ON_SERVE_LOOP

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def test_colocated_replica_runs_user_code_on_serves_loop(running_stack) -> None:
    answer = httpx.post(
        f"{running_stack.url}/v1/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={"model": running_stack.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    replicas = replica_threads("EngineReplica")
    assert replicas, "no engine replica found"
    for replica in replicas:
        assert replica.loop_env == ON_SERVE_LOOP, replica
        assert not loop_threads(replica), replica
