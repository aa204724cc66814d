"""The separate topology (profile ``local-cpu-separate``): Gateway replicas reach the engine
through a Serve handle. Deployed beside the main app in the same Ray cluster, under /separate.

Invariants: the same /v1 behaviour as the colocated topology; and because the gateway survives
the engine, killing the whole engine replica mid-stream still gives an error event and [DONE].
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.test_v1_faults import (
    assert_error_event_then_done,
    stream_and_break,
    wait_until_serving,
)
from tests.support.beside import deployed_beside

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

APP = "zumik-separate"
PREFIX = "/separate"


@pytest.fixture(scope="module")
def separate(running_stack, http: httpx.Client) -> Iterator[str]:
    with deployed_beside(running_stack, "local-cpu-separate", app=APP, prefix=PREFIX) as prefix:
        yield prefix


def _kill_engine_replica_actor() -> None:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{APP}#EngineReplica"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError("no EngineReplica actor in the separate app")


def test_separate_topology_serves_v1(http: httpx.Client, running_stack, separate: str) -> None:
    response = http.post(
        f"{separate}/v1/chat/completions",
        json={"model": running_stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert response.headers["x-zumik-route"].startswith("byoc:")
    models = http.get(f"{separate}/v1/models")
    assert [m["id"] for m in models.json()["data"]] == [running_stack.model]


def test_separate_topology_engine_replica_killed_mid_stream(
    http: httpx.Client, running_stack, separate: str
) -> None:
    lines = stream_and_break(
        http, f"{separate}/v1/chat/completions", running_stack.model, 3, _kill_engine_replica_actor
    )
    assert_error_event_then_done(lines)
    retry = wait_until_serving(http, f"{separate}/v1/completions", running_stack.model)
    assert retry.json()["usage"]["completion_tokens"] == 2
