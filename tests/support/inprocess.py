"""The gateway's real HTTP app in this process, over a real Redis and the shared ``FakeEngine``.

Built with the production wiring (``app/context.py``: ``build_context`` then ``build_app``), so
authentication, admission, releases, state, decisions, accounting and rendering are the ones
that serve; only the engine replica is the stand-in. Requests go through httpx's
``ASGITransport``: no sockets, no Ray, seconds for the whole request-path suite.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from profiles import Profile, load_builtin
from tests.support.fake_engine import FakeEngine
from zumik_serve.api.app import build_app
from zumik_serve.app.context import GatewaySettings, Metrics, build_context
from zumik_serve.engines.protocol import EngineClient
from zumik_serve.pipeline.context import GatewayContext
from zumik_serve.pipeline.pipeline import Pipeline
from zumik_serve.server_secrets import generate_missing
from zumik_serve.store.client import gateway_client
from zumik_serve.tenancy.store import RedisTenantStore

DEV_KEY = "zk-dev-inprocess-key-7d2a9e4c1b60"


@dataclass
class InProcessGateway:
    app: FastAPI
    context: GatewayContext
    engines: dict[str, FakeEngine]
    redis_url: str

    @property
    def engine(self) -> FakeEngine:
        return next(iter(self.engines.values()))

    @property
    def pipeline(self) -> Pipeline:
        pipeline: Pipeline = self.app.state.pipeline
        return pipeline

    def client(self, api_key: str = DEV_KEY) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://zumik.test",
            headers={"Authorization": f"Bearer {api_key}"},
        )

    async def create_tenant(self, name: str, **options: Any) -> str:
        """A new tenant's API key (``options``: ``qos_classes``, ``reuse_accounting``)."""
        client = gateway_client(self.redis_url)
        try:
            _, key = await RedisTenantStore(client).create_tenant(name, **options)
        finally:
            await client.aclose()
        return key


def make_gateway(
    redis_url: str,
    model_dir: Path,
    *,
    profile: Profile | None = None,
    engines: dict[str, FakeEngine] | None = None,
    secrets_dir: Path | None = None,
) -> InProcessGateway:
    """The app of ``profile`` (default ``local-cpu``) over ``engines`` (the BYOC replicas of its
    first BYOC route; default one ``FakeEngine``). Managed routes read their key from the
    environment, as in production (set it with ``monkeypatch.setenv``). Its secrets are read from
    ``secrets_dir`` (default: ``shared_secrets_dir()``), as a gateway reads them: generated there
    first, as ``zumik serve`` does before a gateway starts."""
    secrets_dir = secrets_dir or shared_secrets_dir()
    generate_missing(secrets_dir)
    profile = profile or load_builtin("local-cpu")
    engines = engines or {"r0": FakeEngine()}
    clients: dict[str, EngineClient] = dict(engines)
    context = build_context(gateway_settings(redis_url, model_dir, profile, secrets_dir), clients, Metrics())
    return InProcessGateway(build_app(context), context, engines, redis_url)


def gateway_settings(redis_url: str, model_dir: Path, profile: Profile, secrets_dir: Path) -> GatewaySettings:
    """What ``make_gateway`` builds its gateway with (the secrets are not generated here)."""
    return GatewaySettings(
        profile_name=profile.name,
        served_model=profile.model.served_name,
        model_created_s=1_767_225_600,
        redis_url=redis_url,
        max_body_bytes=profile.gateway.max_body_bytes,
        max_artifact_bytes=profile.gateway.max_artifact_bytes,
        model_dir=str(model_dir),
        compat_digest="",
        block_size=profile.engine.block_size,
        kv_redis_tier=False,
        purge_ceiling=profile.purge.ceiling,
        purge_max_per_minute=profile.purge.max_per_minute,
        profile_json=profile.model_dump_json(),
        dev_key=DEV_KEY,
        secrets_dir=str(secrets_dir),
    )


@functools.cache
def shared_secrets_dir() -> Path:
    """One secrets folder for every in-process gateway of this test process (like the replicas of
    one deployment, they share it), removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="zumik-test-secrets-")) / "secrets"
    atexit.register(shutil.rmtree, folder.parent, True)
    return folder


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, what: str = "the condition"
) -> None:
    """Poll ``condition`` until it holds (background work such as the reuse ledger's write)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def purge_new_artifact(http: httpx.AsyncClient, content: str) -> dict[str, Any]:
    """Store an artifact of ``content``, purge it, and return the purge's signed receipt."""
    created = await http.post("/v2/artifacts", json={"role": "document", "content": content})
    assert created.status_code == 201, created.text
    purged = await http.post("/v2/purge", json={"target": created.json()["id"]})
    assert purged.status_code == 200, purged.text
    receipt: dict[str, Any] = purged.json()["receipt"]
    return receipt
