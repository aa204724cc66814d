"""/v2 routing over HTTP, in process (the real app and a real Redis; ``tests/support/inprocess``).

Invariants held here:
- bodies are byte for byte what the handlers rendered before typed store results: a published
  release in record order, an alias view with its releases as stored (keys sorted), a decision
  as stored with its attempts, a replay as ``{"decision_id", "equal", "record"}``, a stored BYOK
  key as ``{"object", "route", "key_hint", "updated_at", "stored_at"}``;
- every body is checked by its request model: an unknown or mistyped field is a 400
  ``invalid_request_error`` naming it (the alias path first), a stale ``expected_release`` a 409;
- a BYOK body that is not exactly ``{"api_key": ...}`` is a 400 naming ``api_key`` that never
  repeats the key; a route that is not BYOK is a 404.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from profiles import load_builtin
from tests.support.inprocess import InProcessGateway, make_gateway
from zumik_serve.tenancy.tenant import DEV_TENANT

pytestmark = pytest.mark.redis

PROFILE = load_builtin("local-cpu-2x")
TENANT = DEV_TENANT  # the in-process gateway's dev key
SECRET = "sk-tenant-" + "0123456789abcdef" * 2


@pytest.fixture
async def gateway(module_redis_url: str, tiny_model_dir: Path) -> AsyncIterator[InProcessGateway]:
    yield make_gateway(module_redis_url, tiny_model_dir, profile=PROFILE)


@pytest.fixture
async def redis(module_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(module_redis_url)
    yield client
    await client.aclose()


def rendered(body: Any) -> bytes:
    """How a JSONResponse writes ``body``."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def test_publish_and_alias_view_render_as_before(
    gateway: InProcessGateway, redis: aioredis.Redis
) -> None:
    async with gateway.client() as http:
        first = await http.post("/v2/aliases/http-prod/releases")
        assert first.status_code == 201
        published = first.json()
        assert list(published) == [
            "id", "alias", "model", "route_table", "policy_version", "profile_name",
            "profile_fingerprint", "created_at", "previous",
        ]  # fmt: skip
        stored = await redis.get(f"z:{{{TENANT}}}:rel:{published['id']}")
        assert first.content == rendered(published) and rendered(json.loads(stored)) != first.content
        moved = await http.post("/v2/aliases/http-prod/releases", json={"expected_release": published["id"]})
        assert moved.status_code == 201 and moved.json()["previous"] == published["id"]
        view = await http.get("/v2/aliases/http-prod")
        history = [
            json.loads(await redis.get(f"z:{{{TENANT}}}:rel:{rid}"))
            for rid in (published["id"], moved.json()["id"])
        ]
        expected = {"alias": "http-prod", "object": "alias", "current": history[-1], "history": history}
        assert view.status_code == 200 and view.content == rendered(expected)
        assert list(view.json()["current"]) == sorted(view.json()["current"])  # as stored


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v2/aliases/Bad Name/releases", {"nope": 1}, 400, "alias"),
        ("/v2/aliases/http-a/releases", {"zeta": 1, "alpha": 2}, 400, "alpha"),
        ("/v2/aliases/http-a/releases", {"model": 5}, 400, "model"),
        ("/v2/aliases/http-a/releases", {"model": "gpt-other"}, 400, "model"),
        ("/v2/aliases/http-a/releases", {"expected_release": ["rel_x"]}, 400, "expected_release"),
        ("/v2/aliases/http-a/releases", {"expected_release": "rel_" + "c" * 26}, 409, None),
        ("/v2/aliases/http-a/releases", {"routes": ["local", "elsewhere"]}, 400, "routes"),
        ("/v2/aliases/http-a/releases", {"routes": "local"}, 400, "routes"),
    ],
)
async def test_publish_refusals_name_the_field(
    gateway: InProcessGateway, path: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    async with gateway.client() as http:
        response = await http.post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == status
    assert error["type"] == ("conflict_error" if status == 409 else "invalid_request_error")
    assert error.get("param") == param
    if status == 409:
        assert error["code"] == "alias_moved"


async def test_decision_and_replay_render_as_stored(gateway: InProcessGateway, redis: aioredis.Redis) -> None:
    async with gateway.client() as http:
        answer = await http.post("/v2/generate", json={"input": "Say hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        decision_id = answer.json()["decision_id"]
        stored = json.loads(await redis.get(f"z:{{{TENANT}}}:dec:{decision_id}"))
        read = await http.get(f"/v2/decisions/{decision_id}")
        assert read.content == rendered({"id": decision_id, "object": "decision", **stored})
        replayed = await http.post(f"/v2/decisions/{decision_id}/replay")
        expected = {"decision_id": decision_id, "equal": True, "record": stored["record"]}
        assert replayed.content == rendered(expected)
        missing = await http.get("/v2/decisions/dec_" + "z" * 26)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "decision_not_found"


async def test_byok_keys_render_as_before_and_refusals_never_echo_the_key(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        put = await http.put("/v2/byok/byok", json={"api_key": SECRET})
        assert put.status_code == 200 and SECRET not in put.text
        body = put.json()
        assert list(body) == ["object", "route", "key_hint", "updated_at", "stored_at"]
        assert (
            body["object"] == "byok_key"
            and body["route"] == "byok"
            and body["key_hint"].endswith(SECRET[-4:])
        )
        listed = await http.get("/v2/byok")
        entry = {k: body[k] for k in ("route", "key_hint", "updated_at")}
        assert listed.content == rendered({"object": "list", "data": [entry]})
        for bad in ({"key": SECRET}, {"api_key": SECRET, "x": 1}, {"api_key": ""}, {"api_key": 3}):
            refused = await http.put("/v2/byok/byok", json=bad)
            assert refused.status_code == 400 and SECRET not in refused.text
            assert refused.json()["error"]["param"] == "api_key"
        assert (await http.put("/v2/byok/managed", json={"api_key": SECRET})).status_code == 404
        deleted = await http.delete("/v2/byok/byok")
        assert deleted.content == rendered({"route": "byok", "deleted": True})
        assert (await http.get("/v2/byok")).json()["data"] == []


async def test_a_request_under_a_release_of_some_routes_takes_only_those(gateway: InProcessGateway) -> None:
    """A release published with ``routes`` pins its requests to them: under a release of the
    local route alone, the decision weighs that route only, where the model's own release
    weighs every route of the profile."""

    async def candidates(http: Any, model: str) -> tuple[set[str], str]:
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answer = await http.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        decision = (await http.get(f"/v2/decisions/{answer.headers['x-zumik-decision-id']}")).json()
        record = decision["record"]
        return {candidate["route"] for candidate in record["candidates"]}, record["inputs"]["release_id"]

    async with gateway.client() as http:
        published = await http.post("/v2/aliases/http-narrow/releases", json={"routes": ["local"]})
        assert published.status_code == 201, published.text
        assert [entry["name"] for entry in published.json()["route_table"]] == ["local"]
        assert await candidates(http, "http-narrow") == ({"local"}, published.json()["id"])
        everything, _ = await candidates(http, PROFILE.model.served_name)
    assert everything == {"local", "managed", "byok"}
