"""``zumik bench churn`` in small, on the shared stack: 8 tenants read their own objects through
the ingress while a share of requests is aborted mid-flight and Redis is killed with -9 and
restarted. The engine replica's restart is held to the same "never 401" by the engine-kill test
(``test_faults_recovery.py``) and by ``zumik bench churn``: a vLLM reload (1.5-5 minutes on this
shared 2-core box) does not fit this smoke's time.

Invariants: no answer to a valid key is a 401 or 403; no tenant gets another tenant's content
or reads another tenant's object; no acknowledged object is missing; afterwards every object
reads back exactly. The long run is ``zumik bench churn``
(docs/benchmarks.md); no timing is asserted here.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.integration.conftest import RunningStack
from zumik_serve.bench.churn import (
    ChurnTenant,
    prepare_tenants,
    read_under_churn,
    restart_redis,
)

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm, pytest.mark.disruptive]

TENANTS = 8
OBJECTS = 3
SECONDS = 30.0


def _wait_until_serving(stack: RunningStack, timeout_s: float = 300.0) -> None:
    body = {"model": stack.model, "prompt": "hi", "max_tokens": 1}
    headers = {"Authorization": f"Bearer {stack.tenant_key}"}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as client:
        while True:
            try:
                response = client.post("/v1/completions", json=body)
                if response.status_code == 200:
                    return
                assert response.status_code >= 500, response.text  # never a 401 meanwhile
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the engine did not serve again"
            time.sleep(1.0)


async def _read_back(url: str, tenants: list[ChurnTenant]) -> list[str]:
    wrong = []
    for tenant in tenants:
        headers = {"Authorization": f"Bearer {tenant.api_key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            for obj in tenant.objects:
                response = await client.get(f"/v2/artifacts/{obj.artifact_id}")
                if response.status_code != 200 or response.json()["content"] != obj.content:
                    wrong.append(
                        f"{tenant.name} {obj.artifact_id}: {response.status_code} {response.text[:200]}"
                    )
    return wrong


def test_tenants_reading_under_churn_never_get_401_nor_foreign_data(running_stack: RunningStack) -> None:
    stack = running_stack.stack
    tenants = asyncio.run(prepare_tenants(running_stack.url, running_stack.redis_url, TENANTS, OBJECTS))

    async def redis_restart() -> None:
        await asyncio.to_thread(restart_redis, stack)

    def make_client(key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=running_stack.url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=20)  # fmt: skip

    try:
        tally = asyncio.run(read_under_churn(
            tenants, make_client, seconds=SECONDS, abort_share=0.25, seed=uuid.uuid4().int % 1000,
            disruptions=[("redis kill -9 + restart", redis_restart)] * 2,
        ))  # fmt: skip
    finally:
        _wait_until_serving(running_stack)
    summary = tally.summary()
    print(f"\n[churn] {summary['outcomes']} statuses {summary['statuses']} {summary['disruptions']}")
    assert tally.violation_count == 0, summary["violation_samples"]
    assert len(tally.disruptions) == 2
    assert tally.outcomes["ok"] > 0 and tally.outcomes["aborted"] > 0, summary
    assert asyncio.run(_read_back(running_stack.url, tenants)) == []
