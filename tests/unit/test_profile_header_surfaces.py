"""``x-zumik-profile`` on every generation surface, on real parts (redis-server, the production
HTTP app, the shared fake engine).

Invariants held here:
- /v1/responses (plain and streamed) and /v2/generate read ``x-zumik-profile`` as
  /v1/chat/completions does (``Pipeline.check_profile``): a profile outside the tenant's policy
  (named, or the served one when none is named) is a 403 permission_error naming the header, a
  profile this deployment does not serve a 404 ``profile_not_found``, the served one (or none)
  runs;
- their error bodies are chat's: the same object on /v1, the same fields in /v2's native shape;
- a refused request reaches no engine, and a refused Responses call reads no stored
  conversation (its ``previous_response_id`` is not looked up: the 403 comes first);
- /v2/snapshots/{id}/warm refuses a profile outside the tenant's policy the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.support.inprocess import InProcessGateway, make_gateway

MODEL = "zumik-tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
RESPONSES = {"model": MODEL, "input": "Say hi", "max_output_tokens": 16}
GENERATE = {"input": "Say hi", "max_tokens": 4}
OTHER = "other-profile"  # a profile the allowed tenant may use, served by no deployment here


async def _post(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], profile: str | None
) -> httpx.Response:
    headers = {} if profile is None else {"x-zumik-profile": profile}
    return await http.post(path, json=body, headers=headers)


async def _tenants(gateway: InProcessGateway, prefix: str) -> tuple[str, str]:
    served = gateway.context.profile.name
    limited = await gateway.create_tenant(f"{prefix}-limited", profiles=frozenset({"qwen-small-gpu"}))
    allowed = await gateway.create_tenant(f"{prefix}-allowed", profiles=frozenset({served, OTHER}))
    return limited, allowed


async def _cases(
    gateway: InProcessGateway, keys: tuple[str, str], path: str, body: dict[str, Any]
) -> dict[str, httpx.Response]:
    """The same five requests on one surface: refused without a header and with the served one
    named (a tenant limited to another profile), allowed with and without it, elsewhere."""
    served = gateway.context.profile.name
    limited, allowed = keys
    async with gateway.client(limited) as http:
        refused = await _post(http, path, body, None)
        named = await _post(http, path, body, served)
    async with gateway.client(allowed) as http:
        ok = await _post(http, path, body, served)
        plain = await _post(http, path, body, None)
        elsewhere = await _post(http, path, body, OTHER)
    return {"refused": refused, "named": named, "ok": ok, "plain": plain, "elsewhere": elsewhere}


def _assert_refusals(cases: dict[str, httpx.Response], served: str) -> None:
    for name in ("refused", "named"):
        response = cases[name]
        assert response.status_code == 403, (name, response.text)
        error = response.json()["error"]
        assert error["type"] == "permission_error" and error["param"] == "x-zumik-profile"
        assert "qwen-small-gpu" in error["message"] and served in error["message"]
    elsewhere = cases["elsewhere"]
    assert elsewhere.status_code == 404, elsewhere.text
    error = elsewhere.json()["error"]
    assert error["code"] == "profile_not_found" and error["param"] == "x-zumik-profile"
    assert error["type"] == "not_found_error" and OTHER in error["message"] and served in error["message"]


async def test_responses_and_generate_check_the_profile_header_as_chat_does(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    served = gateway.context.profile.name
    keys = await _tenants(gateway, "surfaces")
    chat = await _cases(gateway, keys, "/v1/chat/completions", CHAT)
    sent_before = len(gateway.engine.bodies)
    responses = await _cases(gateway, keys, "/v1/responses", RESPONSES)
    streamed = await _cases(gateway, keys, "/v1/responses", {**RESPONSES, "stream": True})
    generate = await _cases(gateway, keys, "/v2/generate", GENERATE)
    # Only the allowed requests reached the engine: two per surface.
    assert len(gateway.engine.bodies) - sent_before == 2 * 3

    for cases in (chat, responses, streamed, generate):
        _assert_refusals(cases, served)
    for refusal in ("refused", "named", "elsewhere"):  # /v1: chat's very error object
        assert responses[refusal].json() == chat[refusal].json()
        assert streamed[refusal].json() == chat[refusal].json()
        assert streamed[refusal].headers["content-type"].startswith("application/json")
        v1 = chat[refusal].json()["error"]  # /v2: the same fields, natively (no nulls)
        assert generate[refusal].json() == {"error": {k: v for k, v in v1.items() if v is not None}}

    for name in ("ok", "plain"):
        assert responses[name].status_code == 200, responses[name].text
        assert responses[name].json()["status"] == "completed"
        assert streamed[name].status_code == 200
        assert "response.completed" in streamed[name].text
        assert generate[name].status_code == 200, generate[name].text
        assert generate[name].json()["object"] == "generation"


async def test_a_refused_responses_call_reads_no_stored_conversation(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    served = gateway.context.profile.name
    key = await gateway.create_tenant("chain-owner", profiles=frozenset({served, OTHER}))
    async with gateway.client(key) as http:
        first = await http.post("/v1/responses", json=RESPONSES)
        assert first.status_code == 200, first.text
        follow = {**RESPONSES, "previous_response_id": first.json()["id"]}
        unknown = {**RESPONSES, "previous_response_id": "resp_" + "0" * 32}
        sent_before = len(gateway.engine.bodies)
        elsewhere = await _post(http, "/v1/responses", follow, OTHER)
        elsewhere_unknown = await _post(http, "/v1/responses", unknown, OTHER)
        chained = await _post(http, "/v1/responses", follow, served)
    for response in (elsewhere, elsewhere_unknown):  # the profile is refused before any lookup
        assert response.status_code == 404 and response.json()["error"]["code"] == "profile_not_found"
    assert chained.status_code == 200, chained.text
    assert len(gateway.engine.bodies) == sent_before + 1
    assert len(gateway.engine.bodies[-1]["messages"]) == 3  # the stored exchange, then the input


async def test_warm_checks_the_profile_header(module_redis_url: str, tiny_model_dir: Path) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    limited, allowed = await _tenants(gateway, "warm")
    path = "/v2/snapshots/snp_" + "0" * 26 + "/warm"
    async with gateway.client(limited) as http:
        refused = await _post(http, path, {}, gateway.context.profile.name)
    async with gateway.client(allowed) as http:
        elsewhere = await _post(http, path, {}, OTHER)
        unknown = await _post(http, path, {}, None)  # the served profile: the snapshot is looked up
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "x-zumik-profile"
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["code"] == "profile_not_found"
    assert unknown.status_code == 404 and unknown.json()["error"].get("code") != "profile_not_found"
    assert gateway.engine.bodies == []
