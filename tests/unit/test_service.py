"""GatewayService: engine failures before output become real statuses; auth needs a known key.

The engine here is an ``EngineClient`` written in the test: it plays a replica that fails,
which the real stack cannot be made to do on demand before the first byte. The mid-stream
failure path is exercised for real in ``tests/integration/test_v1_faults.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from profiles import load_builtin
from zumik_serve.engines.protocol import (
    EngineCall,
    EngineChunks,
    EngineEvent,
    EngineFailure,
    EngineResponse,
    ReplicaAssigned,
)
from zumik_serve.errors import AuthenticationError, ContextLengthExceededError, EngineError
from zumik_serve.pipeline.service import GatewayService, ModelCard
from zumik_serve.routing.dispatch import Dispatcher
from zumik_serve.routing.scheduler import ProfileScheduler
from zumik_serve.tenancy.tenant import Authenticator, Tenant, TenantId, hash_api_key


class ScriptedEngine:
    def __init__(self, *events: EngineEvent, raise_after: Exception | None = None) -> None:
        self._events = events
        self._raise = raise_after
        self.bodies: list[dict[str, Any]] = []

    async def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncIterator[EngineEvent]:
        self.bodies.append(body)
        for event in self._events:
            yield event
        if self._raise is not None:
            raise self._raise

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        return [event async for event in self.generate(call, body)]


class Directory:
    def __init__(self, keys: dict[str, Tenant]) -> None:
        self.keys = {hash_api_key(key): tenant for key, tenant in keys.items()}
        self.lookups = 0

    async def tenant_for_key_hash(self, key_hash: str) -> Tenant | None:
        self.lookups += 1
        return self.keys.get(key_hash)


ACME = Tenant(id=TenantId("ten_acme"), name="acme", created_at_s=1)


class Decisions:
    """Keeps decision records in a list (the Redis store is tested in test_routing_store.py)."""

    def __init__(self) -> None:
        self.saved: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []

    async def save(self, tenant: str, record: dict[str, Any], attempts: list[dict[str, Any]]) -> None:
        self.saved.append((record, attempts))


async def _no_sleep(seconds: float) -> None:
    return None


def _service(engine: ScriptedEngine, directory: Directory | None = None) -> GatewayService:
    scheduler = ProfileScheduler(load_builtin("local-cpu"), replicas={"local": ["r0"]})
    dispatcher = Dispatcher(scheduler, engines={"r0": engine}, decisions=Decisions(), sleep=_no_sleep)
    return GatewayService(
        models=[ModelCard(id="tiny", created_s=1)],
        authenticator=Authenticator(directory or Directory({}), dev_key="dev"),
        dispatcher=dispatcher,
        salt_secret=_secret,
    )


async def _secret() -> bytes:
    return b"k" * 32


@pytest.mark.parametrize("stream", [False, True])
async def test_failure_before_output_is_5xx(stream: bool) -> None:
    service = _service(ScriptedEngine(ReplicaAssigned("r1"), EngineFailure(status=500, message="boom")))
    with pytest.raises(EngineError) as info:
        await service.start(EngineCall.CHAT, {}, stream=stream, tenant=ACME)
    assert info.value.status == 500 and "Retry" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
async def test_unreachable_engine_is_503_with_retry_after(stream: bool) -> None:
    service = _service(ScriptedEngine(raise_after=ConnectionError("replica gone")))
    with pytest.raises(EngineError) as info:
        await service.start(EngineCall.CHAT, {}, stream=stream, tenant=ACME)
    assert info.value.status == 503 and info.value.retry_after_s


async def test_stream_that_starts_with_error_is_raised_before_first_byte() -> None:
    stream = True
    payload = json.dumps(
        {"error": {"message": "maximum context length is 2048", "type": "BadRequestError", "code": 400}}
    )
    service = _service(ScriptedEngine(ReplicaAssigned("r1"), EngineChunks((payload, "[DONE]"))))
    with pytest.raises(ContextLengthExceededError):
        await service.start(EngineCall.CHAT, {}, stream=stream, tenant=ACME)


async def test_good_start_pins_replica_route_and_decision() -> None:
    service = _service(ScriptedEngine(ReplicaAssigned("r7"), EngineResponse({"id": "x"})))
    run = await service.start(EngineCall.COMPLETION, {}, stream=False, tenant=ACME)
    assert run.route == "byoc:r7" and run.decision_id.startswith("dec_")


async def test_authentication_caches_known_keys_and_rejects_unknown() -> None:
    directory = Directory({"zk-good": ACME})
    service = _service(ScriptedEngine(), directory)
    assert (await service.authenticate("Bearer zk-good")) == ACME
    assert (await service.authenticate("Bearer zk-good")) == ACME
    assert directory.lookups == 1
    assert (await service.authenticate("Bearer dev")).name == "dev"
    for header in (None, "", "Bearer", "Bearer zk-bad", "Token zk-good"):
        with pytest.raises(AuthenticationError):
            await service.authenticate(header)


async def test_engine_gets_a_server_side_salt_per_tenant() -> None:
    engine = ScriptedEngine(ReplicaAssigned("r1"), EngineResponse({"id": "x"}))
    service = _service(engine)
    other = Tenant(id=TenantId("ten_other"), name="other", created_at_s=1)
    await service.start(EngineCall.CHAT, {"cache_salt": "client-chosen"}, stream=False, tenant=ACME)
    await service.start(EngineCall.CHAT, {}, stream=False, tenant=ACME)
    await service.start(EngineCall.CHAT, {}, stream=False, tenant=other)
    salts = [body["cache_salt"] for body in engine.bodies]
    assert salts[0] == salts[1] != salts[2]
    assert "client-chosen" not in salts and len(salts[0]) == 64
