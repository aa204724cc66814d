"""The real stack, started once per test session and shared by every integration test:
redis-server (AOF), a local Ray head, the Serve app (Gateway + EngineReplica), vLLM on CPU with
the tiny model. Tenants are created through the real tenant store.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from profiles import load_builtin
from tests.support.otlp_receiver import OtlpReceiver
from zumik_serve.app.stack import LocalStack, StackConfig
from zumik_serve.home import ZumikHome
from zumik_serve.store.local_redis import free_port

DEV_KEY = "zk-dev-test-key-4f9a1c7e2b8d0653"
MANAGED_KEY = "sk-test-managed-route"  # the managed route's key, read by the gateway's processes


@dataclass(frozen=True)
class RunningStack:
    url: str
    redis_url: str
    home: ZumikHome
    model: str
    tenant_key: str
    other_tenant_key: str
    stack: LocalStack
    otlp: OtlpReceiver | None = None  # the spans the gateway exported (ZUMIK_TRACES=otlp)


@pytest.fixture(scope="session")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    home = ZumikHome(Path(tmp_path_factory.mktemp("zumik-home")))
    os.environ["ZUMIK_MANAGED_API_KEY"] = MANAGED_KEY  # before Ray starts: its workers inherit it
    # Spans on, exported over OTLP/HTTP to a receiver on loopback (a collector's part), quickly.
    otlp = OtlpReceiver().start()
    os.environ["ZUMIK_TRACES"] = "otlp"
    os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = otlp.endpoint
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    profile = load_builtin("local-cpu")
    config = StackConfig(profile=profile, home=home, port=free_port(), dev_key=DEV_KEY)
    stack = LocalStack(config).start(print)
    try:
        tenant_key = asyncio.run(_create_tenant(stack.redis_url, "acme"))
        other_key = asyncio.run(_create_tenant(stack.redis_url, "globex"))
        yield RunningStack(
            url=stack.url,
            redis_url=stack.redis_url,
            home=home,
            model=profile.model.served_name,
            tenant_key=tenant_key,
            other_tenant_key=other_key,
            stack=stack,
            otlp=otlp,
        )
    finally:
        stack.stop()
        otlp.stop()


async def _create_tenant(redis_url: str, name: str) -> str:
    import redis.asyncio as aioredis

    from zumik_serve.tenancy.store import RedisTenantStore

    client = aioredis.from_url(redis_url)
    try:
        _, key = await RedisTenantStore(client).create_tenant(name)
    finally:
        await client.aclose()
    return key


@pytest.fixture(scope="session")
def client(running_stack: RunningStack) -> openai.OpenAI:
    """The official SDK, retries off so that no failure is hidden."""
    return openai.OpenAI(
        base_url=f"{running_stack.url}/v1", api_key=running_stack.tenant_key, max_retries=0, timeout=120
    )


@pytest.fixture(scope="session")
def http(running_stack: RunningStack) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {running_stack.tenant_key}"}
    with httpx.Client(base_url=running_stack.url, headers=headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def other_http(running_stack: RunningStack) -> Iterator[httpx.Client]:
    """A client of another tenant (globex), for isolation checks."""
    headers = {"Authorization": f"Bearer {running_stack.other_tenant_key}"}
    with httpx.Client(base_url=running_stack.url, headers=headers, timeout=120) as client:
        yield client
