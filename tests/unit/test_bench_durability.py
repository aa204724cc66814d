"""``zumik bench durability``'s writers and set checker (``zumik_serve/bench/durability.py``) on the
production app in this process over a real redis-server, killed with -9 and restarted.

Invariants:

- Across Redis kill -9 cycles, every acknowledged artifact and turn is found by both checkers
  (through the store and through the HTTP API), the outages were felt (indeterminate writes)
  and nothing was refused.
- The checker is not vacuous: an acknowledged artifact or turn removed behind the gateway's back
  is reported lost by both, with its handle.
- A write answered with neither a 201 nor an outage (here a 401) is a refusal and fails the run.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from tests.support.inprocess import make_gateway
from zumik_serve.bench.durability import (
    DurabilityRun,
    WriteLog,
    alternate,
    check_api,
    check_store,
    new_tenant,
    run_cycles,
    write_until_stopped,
)
from zumik_serve.state.store import object_key, turns_key
from zumik_serve.store.local_redis import LocalRedis


async def test_acknowledged_writes_survive_redis_kill_9_and_losses_are_caught(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    redis_dir = tmp_path / "redis"
    server = LocalRedis(data_dir=redis_dir).start()
    try:
        gateway = make_gateway(server.url, tiny_model_dir)
        tenant, key = await new_tenant(server.url, "durability")

        def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://zumik.test",
                                     headers={"Authorization": f"Bearer {key}"}, timeout=10)  # fmt: skip

        async def kill_redis() -> None:
            nonlocal server
            port = server.port
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(0.3)  # writers meet the outage
            server = await asyncio.to_thread(LocalRedis(data_dir=redis_dir, port=port).start)

        async def check(log: WriteLog, at: str):  # type: ignore[no-untyped-def]
            return await check_store(server.url, tenant, log, at)

        run: DurabilityRun = await run_cycles(
            make_client, alternate(2, ("redis", kill_redis), ("redis again", kill_redis)), check,
            writers=3, writes_between=20,
        )  # fmt: skip
        assert run.ok, run.summary()
        assert [c.kind for c in run.cycles] == ["redis", "redis again"] * 2
        assert run.log.outcomes["indeterminate"] > 0, "the outages were not felt"
        store_check, api_check = run.final
        assert store_check.acknowledged == api_check.acknowledged == run.log.acked - len(run.log.sessions)
        assert store_check.lost == api_check.lost == 0

        # Remove one acknowledged artifact and one acknowledged turn behind the gateway's back.
        lost_artifact = next(iter(run.log.acked_artifacts))
        session = next(s for s in run.log.sessions if s.acked)
        last_seq = max(session.acked)
        client = aioredis.from_url(server.url)
        try:
            await client.delete(object_key(tenant, lost_artifact))
            await client.rpop(turns_key(tenant, session.id))
        finally:
            await client.aclose()
        store_check = await check_store(server.url, tenant, run.log, "after the loss")
        async with make_client() as http:
            api_check = await check_api(http, run.log, "after the loss")
        for found in (store_check, api_check):
            assert found.lost == 2 and not found.ok, found
            assert any(lost_artifact in sample for sample in found.lost_samples), found.lost_samples
            assert any(f"turn {last_seq} of {session.id}" in sample for sample in found.lost_samples)
    finally:
        server.stop()


async def test_a_refused_write_fails_the_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    try:
        gateway = make_gateway(server.url, tiny_model_dir)
        log = WriteLog()
        stop = asyncio.Event()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://zumik.test",
                                   headers={"Authorization": "Bearer not-a-key"})  # fmt: skip
        async with client:
            writer = asyncio.create_task(write_until_stopped(client, 0, log, stop))
            while log.outcomes["refused"] < 3:
                await asyncio.sleep(0.01)
            stop.set()
            await writer
    finally:
        server.stop()
    assert log.acked == 0 and "401" in log.refusals[0]
    assert not DurabilityRun(log).ok
