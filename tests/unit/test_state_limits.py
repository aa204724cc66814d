"""Bundle and snapshot sizes bounded after expansion, through the real HTTP app (real Redis).

Invariants held here:
- the attack of issue #18 (a 4 MiB bundle naming one 2 MiB artifact ~120,000 times) is a 413
  at creation, refused before Redis sends even one copy of the artifact;
- a bundle's references (repeats included) and its expanded bytes, and a snapshot's expanded
  bytes (its artifacts plus its turns), never pass the profile's limits: 413 naming the bound;
- a snapshot made under larger limits is refused when used (generation, compile, /v1) with a
  413, before its content is read;
- each distinct artifact's content is read once when a snapshot is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from profiles import Profile, load_builtin
from tests.support.inprocess import InProcessGateway, make_gateway

pytestmark = pytest.mark.redis

MIB = 1024 * 1024


def profile_with(**gateway: Any) -> Profile:
    base = load_builtin("local-cpu")
    return base.model_copy(update={"gateway": base.gateway.model_copy(update=gateway)})


async def redis_sent_bytes(redis_url: str) -> int:
    """What the Redis server has sent to all its clients so far."""
    client = aioredis.from_url(redis_url)
    try:
        return int((await client.info("stats"))["total_net_output_bytes"])
    finally:
        await client.aclose()


def assert_413(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 413, response.text[:300]
    assert len(response.content) <= 8192
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    return error


async def artifact(http: httpx.AsyncClient, size_bytes: int, fill: str = "x") -> str:
    response = await http.post("/v2/artifacts", json={"role": "document", "content": fill * size_bytes})
    assert response.status_code == 201, response.text[:300]
    handle: str = response.json()["id"]
    return handle


async def test_a_bundle_repeating_a_2_mib_artifact_120k_times_is_refused_before_redis_reads_it(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)  # the shipped limits
    async with gateway.client() as http:
        big = await artifact(http, 2 * MIB)
        body = json.dumps({"artifacts": [big] * 120_000}).encode()
        assert len(body) <= gateway.context.max_body_bytes  # the body itself is allowed
        before = await redis_sent_bytes(module_redis_url)
        refused = await http.post("/v2/bundles", content=body, headers={"content-type": "application/json"})
        sent = await redis_sent_bytes(module_redis_url) - before
    error = assert_413(refused, "bundle_too_large")
    assert error["param"] == "artifacts" and "120000" in error["message"] and "1024" in error["message"]
    assert sent < 2 * MIB  # not one copy of the artifact left Redis (a use would have built 240 GiB)


async def test_bundle_and_snapshot_limits_count_every_reference_and_the_turns(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(
        module_redis_url,
        tiny_model_dir,
        profile=profile_with(max_snapshot_bytes=64 * 1024, max_bundle_artifacts=8),
    )
    async with gateway.client() as http:
        part = await artifact(http, 20 * 1024, fill="p")
        small = await artifact(http, 10, fill="s")
        too_many = await http.post("/v2/bundles", json={"artifacts": [small] * 9})
        assert "at most 8" in assert_413(too_many, "bundle_too_large")["message"]
        assert (await http.post("/v2/bundles", json={"artifacts": [small] * 8})).status_code == 201
        # 80 KiB: a 20 KiB artifact named 4 times
        too_big = await http.post("/v2/bundles", json={"artifacts": [part] * 4})
        error = assert_413(too_big, "bundle_too_large")
        assert str(80 * 1024) in error["message"] and str(64 * 1024) in error["message"]
        bundle = await http.post("/v2/bundles", json={"artifacts": [part] * 3})  # 60 KiB
        assert bundle.status_code == 201
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        turn = await http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "t" * 8192})
        assert turn.status_code == 201, turn.text[:300]
        over = await http.post("/v2/snapshots", json={"bundle": bundle.json()["id"], "session": session})
        assert_413(over, "snapshot_too_large")  # 60 KiB of artifacts + 8 KiB of turns
        within = await http.post(
            "/v2/snapshots", json={"bundle": bundle.json()["id"], "session": session, "upto_turn": 0}
        )
        assert within.status_code == 201, within.text[:300]


async def test_a_snapshot_beyond_the_limits_is_refused_when_used_before_its_content_is_read(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    roomy = make_gateway(module_redis_url, tiny_model_dir, profile=profile_with(max_snapshot_bytes=32 * MIB))
    async with roomy.client() as http:
        part = await artifact(http, 200 * 1024, fill="r")
        bundle = (await http.post("/v2/bundles", json={"artifacts": [part] * 50})).json()["id"]  # ~10 MB
        snapshot = (await http.post("/v2/snapshots", json={"bundle": bundle})).json()["id"]
    strict = make_gateway(module_redis_url, tiny_model_dir, profile=profile_with(max_snapshot_bytes=MIB))
    async with strict.client() as http:
        before = await redis_sent_bytes(module_redis_url)
        uses = [
            await http.post("/v2/generate", json={"input": "hi", "snapshot": snapshot}),
            await http.post(f"/v2/snapshots/{snapshot}/compile"),
            await http.post(f"/v2/snapshots/{snapshot}/warm"),
            await http.post(
                "/v1/chat/completions",
                json={"model": "zumik-tiny", "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-zumik-snapshot": snapshot},
            ),
        ]
        sent = await redis_sent_bytes(module_redis_url) - before
    for response in uses:
        assert_413(response, "snapshot_too_large")
    assert sent < 200 * 1024  # the artifact's content was never read
    assert strict.engine.calls == []


async def test_a_snapshot_reads_each_distinct_artifact_once(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    async with gateway.client() as http:
        part = await artifact(http, 256 * 1024, fill="d")
        bundle = (await http.post("/v2/bundles", json={"artifacts": [part] * 8})).json()["id"]
        snapshot = (await http.post("/v2/snapshots", json={"bundle": bundle})).json()["id"]
        before = await redis_sent_bytes(module_redis_url)
        messages = await gateway.context.state.snapshot_messages(await _tenant(gateway), snapshot)
        sent = await redis_sent_bytes(module_redis_url) - before
    assert len(messages) == 8 and all(m["content"].endswith("d" * 100) for m in messages)
    assert 256 * 1024 <= sent < 2 * 256 * 1024  # one copy of the content, not eight


async def _tenant(gateway: InProcessGateway) -> str:
    from tests.support.inprocess import DEV_KEY

    return (await gateway.pipeline.authenticate(f"Bearer {DEV_KEY}")).id
