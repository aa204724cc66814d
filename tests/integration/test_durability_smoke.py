"""``zumik bench durability`` (T9) in small, on the shared stack: writers create artifacts and
append turns through a Gateway app of its own (``gateway_app`` of ``test_faults_recovery.py``:
the separate topology's Gateway, two replicas, under ``/gw``) while redis-server is killed with
-9 and restarted, then a Gateway replica's process is killed with -9 (Serve replaces it; seconds,
where the colocated engine replica would cost a vLLM reload).

Invariants: every acknowledged write is present with its exact content after each cycle (read
from the store) and at the end (read through the HTTP API as well); no turn appears that no
writer sent, none twice; no write gets an answer other than a 201 or an outage; the kills were
felt. The long run (20 cycles of each) is ``zumik bench durability`` (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.integration.conftest import RunningStack
from tests.integration.test_faults_recovery import GATEWAY_REPLICAS, GW_APP, gateway_app  # noqa: F401
from zumik_serve.bench.churn import restart_redis
from zumik_serve.bench.durability import (
    Check,
    WriteLog,
    alternate,
    check_store,
    kill_replica_process,
    new_tenant,
    replica_pids,
    run_cycles,
)

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm, pytest.mark.disruptive]

CYCLES = 1  # of each: one Redis kill, one gateway process kill


def test_acknowledged_writes_survive_kill_9_of_redis_and_of_a_gateway_process(
    running_stack: RunningStack,
    gateway_app: str,  # noqa: F811
) -> None:
    tenant, key = asyncio.run(new_tenant(running_stack.redis_url, "durability"))
    before = replica_pids(GW_APP, "Gateway")
    assert len(before) == GATEWAY_REPLICAS, before  # the processes this test kills are found

    def make_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"{running_stack.url}{gateway_app}", timeout=10,
                                 headers={"Authorization": f"Bearer {key}"})  # fmt: skip

    async def kill_redis() -> None:
        await asyncio.to_thread(restart_redis, running_stack.stack)

    async def kill_gateway() -> None:
        await asyncio.to_thread(kill_replica_process, GW_APP, "Gateway", GATEWAY_REPLICAS)

    async def check(log: WriteLog, at: str) -> Check:
        return await check_store(running_stack.redis_url, tenant, log, at)

    run = asyncio.run(run_cycles(
        make_client, alternate(CYCLES, ("redis", kill_redis), ("gateway", kill_gateway)), check,
        writers=3, writes_between=30,
    ))  # fmt: skip
    summary = run.summary()
    print(f"\n[durability] writes {summary['writes']}, causes {summary['indeterminate_causes']}, "
          f"kills {summary['kills']}, final {summary['final']}")  # fmt: skip
    assert run.ok, summary
    assert [c.kind for c in run.cycles] == ["redis", "gateway"]
    assert len(before - replica_pids(GW_APP, "Gateway")) == 1, "no gateway process was replaced"
    assert run.log.outcomes["indeterminate"] > 0, "the kills were not felt; the test proves nothing"
    assert all(check.acknowledged > 0 and check.lost == 0 for check in run.final)
