"""A provider that refuses the credentials Zumik sends never makes a tenant's valid key look
invalid. The production app over real Redis, with a real HTTP server on loopback playing the
managed provider.

Invariants:
- a provider's 401 or 403 reaches the tenant as a 502 server error that says the provider
  refused Zumik's credentials and the tenant's key is fine (whole answers and streams), never as a 401;
- the refusal is the route's failure: the request falls back to the next route, and the attempt
  is recorded as ``auth_error``;
- the tenant's own key still authenticates on every other request.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from profiles import parse_profile
from tests.support.fault_server import Fault, FaultServer
from tests.support.inprocess import make_gateway

PROFILE = """
name: provider-auth
model: {{source: "builtin:tiny", served_name: zumik-tiny}}
engine: {{device: cpu, kv_cache_memory_bytes: 1048576}}
routes:
  - {{name: managed, kind: managed, base_url: "{managed}", model: gpt-test, api_key_env: TEST_MANAGED_KEY,
     prices: {{input: "0.15", cached_input: "0.075", output: "0.60"}}, timeout_s: 5, max_retries: 2}}
  - {{name: local, kind: byoc, replica_hour_usd: "0.50", tokens_per_replica_hour: 2000000}}
routing:
  default_route: managed
  fallback_order: {fallback}
"""
CHAT = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_provider_refusing_zumiks_key_is_a_502_not_the_tenants_401(
    module_redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, status: int, stream: bool
) -> None:
    monkeypatch.setenv("TEST_MANAGED_KEY", "sk-revoked-at-the-provider")
    with FaultServer() as managed:
        profile = parse_profile(PROFILE.format(managed=managed.base_url, fallback="[managed]"), source="test")
        gateway = make_gateway(module_redis_url, tiny_model_dir, profile=profile)
        key = await gateway.create_tenant(f"auth-{status}-{int(stream)}")
        managed.script([Fault.status(status, message="Incorrect API key provided")])
        async with gateway.client(key) as http:
            refused = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            models = await http.get("/v1/models")
    assert refused.status_code == 502, refused.text
    error = refused.json()["error"]
    assert error["type"] == "server_error" and error["code"] != "invalid_api_key", error
    assert "refused the credentials zumik sent it" in error["message"].lower(), error
    assert "your zumik api key is valid" in error["message"].lower(), error
    assert len(managed.requests) == 1  # a refused key is not retried on the same route
    assert models.status_code == 200  # the tenant's key was never in doubt


async def test_provider_auth_failure_falls_back_to_the_next_route_and_is_recorded(
    module_redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_MANAGED_KEY", "sk-revoked-at-the-provider")
    with FaultServer() as managed:
        profile = parse_profile(
            PROFILE.format(managed=managed.base_url, fallback="[managed, local]"), source="test"
        )
        gateway = make_gateway(module_redis_url, tiny_model_dir, profile=profile)
        key = await gateway.create_tenant("auth-fallback")
        managed.script([Fault.status(401)])
        async with gateway.client(key) as http:
            answered = await http.post("/v1/chat/completions", json=CHAT)
            record = (await http.get(f"/v2/decisions/{answered.headers['x-zumik-decision-id']}")).json()
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-zumik-route"].startswith("byoc:")
    attempts = [(a["route"], a["outcome"], a["status"], a["action"]) for a in record["attempts"]]
    assert attempts[0] == ("managed", "auth_error", 502, "fallback")
    assert attempts[-1][:2] == ("local", "ok")
