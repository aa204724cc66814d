"""Routing on the real stack with two BYOC vLLM replicas and a managed route played by a real
``vllm serve`` on loopback (the profile ``local-cpu-2x``, its managed route pointed there).

- /v1 through the official client goes to the managed route by default; the body is a valid
  chat.completion, the response pins a release and a decision that replays equal;
- with the provider down, requests fall back to the tenant's own engines, each attempt in the
  decision record, and the route's breaker opens after the profile's threshold;
- requests sharing a prefix go to the replica that holds it; requests without reuse spread over
  both replicas;
- another tenant cannot read a tenant's decisions or aliases.
- the replica group (one Serve deployment, Zumik's RequestRouter) publishes vLLM KV events to
  the profile's scheduler owner, naming the very block hashes the gateway computed: for /v2's
  token ids, and for a /v1 chat request through the official client (the gateway renders and
  tokenizes it as vLLM does, ``engines/chat_prompt.py``).

This module replaces the shared stack's app, so it runs after every other integration test.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest

from profiles import load_builtin
from tests.integration.conftest import RunningStack, _create_tenant
from tests.support.vllm_provider import VllmProvider

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm, pytest.mark.redeploys]


@pytest.fixture(scope="module")
def provider(running_stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmProvider]:
    with VllmProvider(running_stack.home) as server:
        yield server


@pytest.fixture(scope="module")
def two_replicas(running_stack: RunningStack, provider: VllmProvider) -> Iterator[RunningStack]:
    profile = load_builtin("local-cpu-2x", env={"ZUMIK_MANAGED_BASE_URL": provider.base_url})
    running_stack.stack.redeploy(profile, print)
    yield running_stack


@pytest.fixture(scope="module")
def tenant(two_replicas: RunningStack) -> Iterator[httpx.Client]:
    key = asyncio.run(_create_tenant(two_replicas.redis_url, f"router-{uuid.uuid4().hex[:8]}"))
    with httpx.Client(
        base_url=two_replicas.url, headers={"Authorization": f"Bearer {key}"}, timeout=180
    ) as client:
        yield client


def test_v1_goes_to_the_managed_route_and_pins_release_and_decision(
    two_replicas: RunningStack, tenant: httpx.Client, other_http: httpx.Client
) -> None:
    sdk = openai.OpenAI(
        base_url=f"{two_replicas.url}/v1",
        api_key=tenant.headers["Authorization"][7:],
        max_retries=0,
        timeout=180,
    )
    raw = sdk.chat.completions.with_raw_response.create(
        model=two_replicas.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.choices[0].message.content is not None
    assert raw.headers["x-zumik-route"] == "managed:managed"
    release, decision = raw.headers["x-zumik-release"], raw.headers["x-zumik-decision-id"]
    assert release.startswith("rel_")
    stored = tenant.get(f"/v2/decisions/{decision}").json()
    assert stored["record"]["pick"] == {"route": "managed", "replica": None}
    assert stored["record"]["inputs"]["release_id"] == release
    assert stored["attempts"][-1]["outcome"] == "ok"
    replayed = tenant.post(f"/v2/decisions/{decision}/replay").json()
    assert replayed["equal"] is True
    assert other_http.get(f"/v2/decisions/{decision}").status_code == 404
    assert tenant.get(f"/v2/aliases/{two_replicas.model}").json()["current"]["id"] == release
    theirs = other_http.get(f"/v2/aliases/{two_replicas.model}")  # their own implicit alias, if any
    assert theirs.status_code == 404 or theirs.json()["current"]["id"] != release

    # Moving the alias makes a new release; the old decision still replays equal.
    moved = tenant.post(f"/v2/aliases/{two_replicas.model}/releases", json={}).json()
    assert moved["previous"] == release and moved["id"] != release
    assert tenant.post(f"/v2/decisions/{decision}/replay").json()["equal"] is True


def test_prefix_goes_where_it_lives_and_no_reuse_spreads(
    tenant: httpx.Client, two_replicas: RunningStack
) -> None:
    document = f"{uuid.uuid4()} " + "The repository policy and the tool registry of this agent. " * 30
    art = tenant.post("/v2/artifacts", json={"role": "document", "content": document}).json()["id"]
    bnd = tenant.post("/v2/bundles", json={"artifacts": [art]}).json()["id"]
    snp = tenant.post("/v2/snapshots", json={"bundle": bnd}).json()["id"]
    routes = []
    for index in range(4):
        response = tenant.post(
            "/v2/generate", json={"snapshot": snp, "input": f"question {index}", "max_tokens": 1}
        )
        assert response.status_code == 200, response.text
        routes.append(response.json()["route"])
    assert len(set(routes)) == 1, routes  # the shared prefix stays on the replica that holds it
    assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    # Without reuse and at equal load the pick is the seeded tiebreak, a fair coin per request:
    # each replica must take at least a quarter. With 12 requests that bound failed 3.9% of fair
    # runs (it did once, 10/2, while 400 in-process decisions split 213/187); with 40 it fails
    # 0.07% of them.
    spread = Counter()
    for _ in range(40):
        response = tenant.post("/v2/generate", json={"input": f"{uuid.uuid4()}", "max_tokens": 1})
        assert response.status_code == 200, response.text
        spread[response.json()["route"]] += 1
    assert len(spread) == 2 and min(spread.values()) >= 10, spread  # both replicas take no-reuse work


def test_provider_down_falls_back_and_opens_the_breaker(
    tenant: httpx.Client, two_replicas: RunningStack, provider: VllmProvider
) -> None:
    provider.stop()
    decisions = []
    for _ in range(4):
        body = {
            "model": two_replicas.model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 1,
        }
        response = tenant.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["x-zumik-route"].startswith("byoc:")
        decisions.append(tenant.get(f"/v2/decisions/{response.headers['x-zumik-decision-id']}").json())
    first = decisions[0]
    assert first["attempts"][0]["route"] == "managed" and first["attempts"][0]["outcome"] == "connect_error"
    last = decisions[-1]["record"]
    managed = next(c for c in last["candidates"] if c["route"] == "managed")
    assert managed["breaker"]["state"] == "open"  # failure_threshold (3) reached: filtered, recorded
    assert all(a["route"] != "managed" for a in decisions[-1]["attempts"])
    for stored in decisions:
        assert tenant.post(f"/v2/decisions/{stored['id']}/replay").json()["equal"] is True


def test_byok_keys_are_sealed_listed_masked_and_per_tenant(
    tenant: httpx.Client, other_http: httpx.Client, two_replicas: RunningStack
) -> None:
    secret = "sk-tenant-" + uuid.uuid4().hex
    stored = tenant.put("/v2/byok/byok", json={"api_key": secret})
    assert stored.status_code == 200, stored.text
    assert secret not in stored.text and stored.json()["key_hint"].endswith(secret[-4:])
    listed = tenant.get("/v2/byok").json()["data"]
    assert [entry["route"] for entry in listed] == ["byok"] and secret not in json.dumps(listed)
    assert other_http.get("/v2/byok").json()["data"] == []
    assert tenant.put("/v2/byok/managed", json={"api_key": secret}).status_code == 404  # not a BYOK route
    assert tenant.put("/v2/byok/byok", json={"key": secret}).status_code == 400
    profile = tenant.get("/v2/profiles").json()["data"][0]
    assert profile["name"] == "local-cpu-2x" and {r["name"] for r in profile["routes"]} == {
        "local",
        "managed",
        "byok",
    }
    assert "base_url" not in json.dumps(profile) and profile["purge_ceiling"] == "crypto_erased"
    assert tenant.delete("/v2/byok/byok").json() == {"route": "byok", "deleted": True}
    assert tenant.get("/v2/byok").json()["data"] == []


def test_the_serving_replicas_engine_reports_the_blocks_of_its_prompt(
    two_replicas: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica group's engines publish vLLM KV events to the profile's scheduler owner: once
    a prompt is served, the owner's residency of the serving replica, built from that engine's
    events alone (never from the gateway's record of sends), holds every full block of the
    prompt, named by vLLM's own hasher over the token ids the engine took and the tenant's
    cache salt. A second prompt over the same prefix stores only its new blocks (a cached
    block publishes nothing), and the gateways' record of sends agrees with the engine's word."""
    from ray import serve
    from transformers import AutoTokenizer
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash
    from vllm.v1.request import Request

    from zumik_serve.model.resolve import resolve_model_dir
    from zumik_serve.routing.block_hashes import event_key
    from zumik_serve.secret_files import secrets_dir
    from zumik_serve.server_secrets import load_server_secrets
    from zumik_serve.tenancy.tenant import TenantId, cache_salt

    profile = load_builtin("local-cpu-2x")
    block_size = profile.engine.block_size
    tenant_id, key = asyncio.run(_create_tenant_with_id(two_replicas.redis_url, f"kv-{uuid.uuid4().hex[:8]}"))
    salt = cache_salt(
        load_server_secrets(secrets_dir(two_replicas.home)).cache_salt_secret, TenantId(tenant_id), 0
    )
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(profile, two_replicas.home)))
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)  # the engines hash with the default seed
    init_none_hash(sha256_cbor)

    def engine_keys(text: str) -> list[str]:
        """vLLM's names of the full blocks of ``text`` sent as /v2 sends it (one user message)."""
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        tokens = list(tokenizer.encode(chat, add_special_tokens=False))
        request = Request(
            request_id="r", prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=1),
            pooling_params=None, cache_salt=salt,
            block_hasher=get_request_block_hasher(block_size, sha256_cbor),
        )  # fmt: skip
        assert len(request.block_hashes) == len(tokens) // block_size
        return [event_key(maybe_convert_block_hash(block_hash)) for block_hash in request.block_hashes]

    owner = serve.get_deployment_handle("SchedulerOwner", "zumik")

    def held_by_engine(replica: str, keys: list[str]) -> set[str]:
        for _ in range(300):  # the engine's events for this prompt reached the owner
            held = set(owner.engine_residency.remote(replica).result())
            if set(keys) <= held:
                break
            time.sleep(0.1)
        return held

    document = f"{uuid.uuid4()} " + "A section of the service handbook the agent quotes. " * 20
    with httpx.Client(
        base_url=two_replicas.url, headers={"Authorization": f"Bearer {key}"}, timeout=180
    ) as client:
        first = client.post("/v2/generate", json={"input": document, "max_tokens": 1})
        assert first.status_code == 200, first.text
        replica = first.json()["route"].split(":", 1)[1]
        keys = engine_keys(document)
        assert len(keys) >= 10 and first.json()["usage"]["prompt_tokens"] // block_size == len(keys)
        held = held_by_engine(replica, keys)
        assert set(keys) <= held, f"{len(set(keys) - held)} of {len(keys)} blocks not reported"

        before = owner.stats.remote().result()
        follow_up = document + " And one question about it, long enough for new full blocks?" * 6
        second = client.post("/v2/generate", json={"input": follow_up, "max_tokens": 1})
        assert second.status_code == 200, second.text
        assert second.json()["route"] == first.json()["route"]  # the prefix lives there
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        more = engine_keys(follow_up)
        assert more[:3] == keys[:3] and len(more) > len(keys)
        held = held_by_engine(replica, more)
        assert set(more) <= held, f"{len(set(more) - held)} of {len(more)} blocks not reported"
    after = owner.stats.remote().result()
    assert after["belief_checked"] > before["belief_checked"]  # the send was checked against them
    assert after["belief_wrong"] == before["belief_wrong"], (before, after)


def test_a_chat_requests_keys_are_the_blocks_its_engine_reports(
    two_replicas: RunningStack, provider: VllmProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A /v1 chat request (the official ``openai`` client, the agent shape: a system prompt and
    a user turn) served by a replica of the group: the keys the gateway sent it with are the
    engine's own, so every full block of the prompt vLLM built is in the owner's residency of
    that replica by its engine's events, and the send is checked against them
    (``belief_checked``: only engine-keyed sends can be); the next turn over the same
    conversation goes to the same replica and finds its prefix cached."""
    from ray import serve
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash
    from vllm.v1.request import Request

    from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
    from zumik_serve.engines.vllm_args import chat_content_format
    from zumik_serve.model.resolve import resolve_model_dir
    from zumik_serve.routing.block_hashes import event_key
    from zumik_serve.secret_files import secrets_dir
    from zumik_serve.server_secrets import load_server_secrets
    from zumik_serve.tenancy.tenant import TenantId, cache_salt

    provider.stop()  # the managed route away: /v1 falls back to the group's replicas
    profile = load_builtin("local-cpu-2x")
    block_size = profile.engine.block_size
    tenant_id, key = asyncio.run(
        _create_tenant_with_id(two_replicas.redis_url, f"chat-{uuid.uuid4().hex[:8]}")
    )
    salt = cache_salt(
        load_server_secrets(secrets_dir(two_replicas.home)).cache_salt_secret, TenantId(tenant_id), 0
    )
    model_dir = resolve_model_dir(profile, two_replicas.home)
    tokenizer = HfChatTokenizer(
        model_dir, chat_content_format=chat_content_format(model_dir, profile.engine.vllm_args)
    )
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    init_none_hash(sha256_cbor)

    def engine_keys(messages: list[dict[str, str]]) -> list[str]:
        tokens = tokenizer.encode_engine_chat({"messages": messages})
        assert isinstance(tokens, list)
        request = Request(
            request_id="r", prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=1),
            pooling_params=None, cache_salt=salt,
            block_hasher=get_request_block_hasher(block_size, sha256_cbor),
        )  # fmt: skip
        return [event_key(maybe_convert_block_hash(block_hash)) for block_hash in request.block_hashes]

    owner = serve.get_deployment_handle("SchedulerOwner", "zumik")
    sdk = openai.OpenAI(base_url=f"{two_replicas.url}/v1", api_key=key, max_retries=0, timeout=180)
    messages = [
        {"role": "system", "content": f"{uuid.uuid4()} You triage the support queue of a bike shop. " * 12},
        {"role": "user", "content": "My chain skips on the third gear."},
    ]
    before = owner.stats.remote().result()
    raw = sdk.chat.completions.with_raw_response.create(
        model=two_replicas.model, messages=messages, max_tokens=1
    )
    route = raw.headers["x-zumik-route"]
    assert route.startswith("byoc:"), route
    replica = route.split(":", 1)[1]
    keys = engine_keys(messages)
    assert len(keys) >= 8 and raw.parse().usage.prompt_tokens // block_size == len(keys)
    for _ in range(300):  # the engine's events for this prompt reached the owner
        held = set(owner.engine_residency.remote(replica).result())
        if set(keys) <= held:
            break
        time.sleep(0.1)
    assert set(keys) <= held, f"{len(set(keys) - held)} of {len(keys)} blocks not reported"

    turn = [
        *messages,
        {"role": "assistant", "content": "Check the hanger."},
        {"role": "user", "content": "How?"},
    ]
    again = sdk.chat.completions.with_raw_response.create(
        model=two_replicas.model, messages=turn, max_tokens=1
    )
    assert again.headers["x-zumik-route"] == route  # the conversation's prefix lives there
    usage = again.parse().usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens >= len(keys) * block_size - block_size
    for _ in range(100):  # the gateways report their sends every 20 ms
        after = owner.stats.remote().result()
        if after["belief_checked"] >= before["belief_checked"] + 2:
            break
        time.sleep(0.1)
    assert after["belief_checked"] >= before["belief_checked"] + 2, (before, after)  # engine-keyed sends


def test_every_replica_runs_its_code_and_its_handles_on_serves_own_loop(
    two_replicas: RunningStack, tenant: httpx.Client
) -> None:
    """The gateways, the replica group and the scheduler owner run their code and route their
    handles' calls (gateway to engine, gateway and engines to the owner) on the loop Serve
    serves them on (``app/serve_loop.py``): after traffic, no replica has a thread running a
    second loop, for user code or for a router. Each was started at the profile's niceness."""
    from tests.support.serve_replicas import loop_threads, replica_threads
    from zumik_serve.app.serve_loop import ON_SERVE_LOOP

    for _ in range(3):
        answer = tenant.post(
            "/v1/completions", json={"model": two_replicas.model, "prompt": "Hello", "max_tokens": 2}
        )
        assert answer.status_code == 200, answer.text
    replicas = replica_threads()
    deployments = {replica.actor.split("#")[1] for replica in replicas}
    assert {"Gateway", "EngineReplica", "SchedulerOwner"} <= deployments, deployments
    niceness = str(load_builtin("local-cpu-2x").niceness)  # every deployment carries it
    for replica in replicas:
        assert replica.loop_env == ON_SERVE_LOOP, replica
        assert not loop_threads(replica), replica
        assert replica.niceness_env == niceness, replica


async def _create_tenant_with_id(redis_url: str, name: str) -> tuple[str, str]:
    import redis.asyncio as aioredis

    from zumik_serve.tenancy.store import RedisTenantStore

    client = aioredis.from_url(redis_url)
    try:
        tenant, key = await RedisTenantStore(client).create_tenant(name)
    finally:
        await client.aclose()
    return str(tenant.id), key
