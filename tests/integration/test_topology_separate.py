"""The separate topology (profile ``local-cpu-separate``): Gateway replicas reach the engine
through a Serve handle. Deployed beside the main app in the same Ray cluster, under /separate,
with a second profile (``SECOND``, its own engine and scheduler) served by the same gateway.

Invariants: the same /v1 behaviour as the colocated topology; because the gateway survives the
engine, killing the whole engine replica mid-stream still gives an error event and [DONE]; and
``x-zumik-profile`` runs a request on the second profile's own engine and policy, while a
profile served nowhere here is a 404 naming both.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from profiles import load_builtin
from tests.integration.test_v1_faults import (
    assert_error_event_then_done,
    stream_and_break,
    wait_until_serving,
)
from tests.support.beside import deployed_beside

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

APP = "zumik-separate"
PREFIX = "/separate"
SECOND = "local-cpu-separate-second"


@pytest.fixture(scope="module")
def separate(running_stack, http: httpx.Client) -> Iterator[str]:
    second = load_builtin("local-cpu-separate").model_copy(update={"name": SECOND})
    with deployed_beside(
        running_stack, "local-cpu-separate", app=APP, prefix=PREFIX, more=[second]
    ) as prefix:
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


def test_one_gateway_serves_a_second_profile_on_its_own_engine(
    http: httpx.Client, running_stack, separate: str
) -> None:
    from ray import serve

    body = {"model": running_stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    second = http.post(f"{separate}/v1/chat/completions", json=body, headers={"x-zumik-profile": SECOND})
    assert second.status_code == 200, second.text
    assert second.headers["x-zumik-route"].startswith("byoc:")
    decision = http.get(f"{separate}/v2/decisions/{second.headers['x-zumik-decision-id']}").json()
    assert decision["record"]["inputs"]["profile_name"] == SECOND
    first = http.post(f"{separate}/v1/chat/completions", json=body)
    first_decision = http.get(f"{separate}/v2/decisions/{first.headers['x-zumik-decision-id']}").json()
    assert first_decision["record"]["inputs"]["profile_name"] == "local-cpu-separate"
    nowhere = http.post(f"{separate}/v1/chat/completions", json=body, headers={"x-zumik-profile": "nowhere"})
    assert nowhere.status_code == 404 and SECOND in nowhere.json()["error"]["message"]
    listed = [p["name"] for p in http.get(f"{separate}/v2/profiles").json()["data"]]
    assert listed == ["local-cpu-separate", SECOND]
    deployments = serve.status().applications[APP].deployments
    assert deployments[f"{SECOND}-EngineReplica"].status == "HEALTHY"
    assert deployments["EngineReplica"].status == "HEALTHY"


def test_separate_topology_engine_replica_killed_mid_stream(
    http: httpx.Client, running_stack, separate: str
) -> None:
    lines = stream_and_break(
        http, f"{separate}/v1/chat/completions", running_stack.model, 3, _kill_engine_replica_actor
    )
    assert_error_event_then_done(lines)
    retry = wait_until_serving(http, f"{separate}/v1/completions", running_stack.model)
    assert retry.json()["usage"]["completion_tokens"] == 2
