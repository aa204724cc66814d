"""Eight tenants read their own objects through the production app while requests are aborted
mid-flight and Redis is killed with -9 and restarted (``zumik_serve/bench/churn.py``'s readers;
real redis-server, in-process gateway, the fake engine is never called).

Invariants: no answer to a valid key is a 401 or 403; no tenant ever gets another tenant's
content or reads another tenant's object; no acknowledged object goes missing. Outages answer
503 (allowed) and the readers saw both outcomes, so the check is not vacuous.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.support.inprocess import make_gateway
from zumik_serve.bench.churn import ChurnTenant, read_under_churn, store_objects
from zumik_serve.store.local_redis import LocalRedis

TENANTS = 8
OBJECTS = 4


async def test_tenants_reading_under_aborts_and_redis_restarts_never_get_401_or_foreign_data(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    redis_dir = tmp_path / "redis"
    server = LocalRedis(data_dir=redis_dir).start()
    try:
        gateway = make_gateway(server.url, tiny_model_dir)
        app = gateway.app

        def make_client(key: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zumik.test",
                                     headers={"Authorization": f"Bearer {key}"})  # fmt: skip

        tenants = []
        for index in range(TENANTS):
            name = f"churn-{index}"
            key = await gateway.create_tenant(name)
            async with make_client(key) as http:
                tenants.append(ChurnTenant(name, key, await store_objects(http, name, OBJECTS)))

        async def restart_redis() -> None:
            nonlocal server
            port = server.port
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(0.5)  # readers meet the outage
            server = await asyncio.to_thread(LocalRedis(data_dir=redis_dir, port=port).start)

        tally = await read_under_churn(
            tenants, make_client, seconds=9.0, abort_share=0.3, seed=18,
            disruptions=[("redis kill -9 + restart", restart_redis)] * 2,
        )  # fmt: skip
    finally:
        server.stop()
    summary = tally.summary()
    assert tally.violation_count == 0, summary["violation_samples"]
    assert [d["what"] for d in tally.disruptions] == ["redis kill -9 + restart"] * 2
    assert tally.outcomes["ok"] > 100 and tally.outcomes["aborted"] > 10, summary
    assert tally.outcomes["unavailable"] > 0, summary  # the outages were felt
    assert tally.statuses["404"] > 0 and tally.statuses["200"] > 0, summary
