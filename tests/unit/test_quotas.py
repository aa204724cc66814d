"""Per-tenant quotas through the real HTTP app, in process, over a real Redis.

Invariants held here:
- under a limit a write works; past it the answer is 429 ``insufficient_quota`` with a code
  naming the quota, a message giving the limit and the usage, ``x-should-retry: false`` and no
  Retry-After, and nothing of the refused write is stored (usage, keys);
- a purge gives back exactly what its objects were counted (usage returns to zero);
- a tenant's override beats the profile's default, in both directions, at once;
- another tenant's writes and requests are unaffected by one tenant's exhausted quota;
- requests and tokens per minute are a window shared by every gateway: past it a 429
  ``rate_limit_error`` with Retry-After; a request over the limit on its own is told so; the
  tokens reserved at admission are corrected to the usage the engine reports; an admission
  taken in the release lookup's round trip counts and refuses exactly as one on its own, and is
  taken only at the salt epoch its scope was derived at; a refund takes one back;
- every limit is a strict integer (a string or a bool is refused at load).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from kvstore.keys import ScopeId
from kvstore.tiers.redis_tier import scope_limit_key
from profiles import Profile, load_builtin
from profiles.model import QuotaSpec
from tests.support.inprocess import InProcessGateway, make_gateway
from zumik_serve.cli import main as cli_main
from zumik_serve.errors import RateLimitExceededError
from zumik_serve.qos.quota import QuotaOverrides, RateReservation
from zumik_serve.qos.store import RedisQuotaStore, rate_key
from zumik_serve.routing.store import RedisRoutingStore
from zumik_serve.state.objects import content_digest
from zumik_serve.state.store import blob_key
from zumik_serve.tenancy.tenant import TenantId

pytestmark = pytest.mark.redis

UNLIMITED = QuotaSpec(stored_bytes=None, objects=None, session_turns=None)


def _profile(**limits: int | None) -> Profile:
    quota = UNLIMITED.model_copy(update=limits)
    return load_builtin("local-cpu").model_copy(update={"quota": quota})


def _gateway(redis_url: str, model_dir: Path, **limits: int | None) -> InProcessGateway:
    return make_gateway(redis_url, model_dir, profile=_profile(**limits))


async def _tenant(gateway: InProcessGateway) -> tuple[TenantId, str]:
    """A new tenant's (id, API key): every test counts from zero."""
    key = await gateway.create_tenant(f"q-{uuid.uuid4().hex[:12]}")
    tenant = await gateway.pipeline.authenticate(f"Bearer {key}")
    return tenant.id, key


def _quotas(gateway: InProcessGateway) -> RedisQuotaStore:
    quotas = gateway.context.quotas
    assert quotas is not None
    return quotas


def _refused(response: httpx.Response, code: str) -> str:
    """The message of a storage-quota refusal, after checking its shape."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == code
    assert response.headers["x-should-retry"] == "false" and "retry-after" not in response.headers
    message: str = error["message"]
    return message


async def _artifact(http: httpx.AsyncClient, content: str) -> httpx.Response:
    return await http.post("/v2/artifacts", json={"role": "document", "content": content})


async def _purge(http: httpx.AsyncClient, target: str) -> None:
    response = await http.post("/v2/purge", json={"target": target})
    assert response.status_code == 200, response.text


async def test_stored_bytes_over_the_limit_is_refused_and_nothing_is_written(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = _gateway(module_redis_url, tiny_model_dir, stored_bytes=4000)
    tenant, key = await _tenant(gateway)
    quotas = _quotas(gateway)
    redis = aioredis.from_url(module_redis_url)
    async with gateway.client(key) as http:
        first = await _artifact(http, "a" * 1000)
        assert first.status_code == 201, first.text
        held = await quotas.usage(tenant)
        assert held.objects == 1 and 1000 < held.stored_bytes < 1400  # content + its record

        big = "b" * 3000
        message = _refused(await _artifact(http, big), "stored_bytes_quota_exceeded")
        assert "4000" in message and str(held.stored_bytes) in message and "purge" in message
        assert await quotas.usage(tenant) == held
        assert not await redis.exists(blob_key(tenant, content_digest(big.encode(), "text/plain")))
        assert len([k async for k in redis.scan_iter(match=f"z:{{{tenant}}}:o:*")]) == 1

        await _purge(http, first.json()["id"])
        freed = await quotas.usage(tenant)
        assert (freed.objects, freed.stored_bytes) == (0, 0)
        assert (await _artifact(http, big)).status_code == 201
    await redis.aclose()


async def test_objects_quota_override_beats_the_default_and_spares_other_tenants(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = _gateway(module_redis_url, tiny_model_dir, objects=2)
    tenant, key = await _tenant(gateway)
    _, other_key = await _tenant(gateway)
    quotas = _quotas(gateway)
    async with gateway.client(key) as http, gateway.client(other_key) as other:
        for _ in range(2):
            assert (await http.post("/v2/sessions", json={})).status_code == 201
        message = _refused(await http.post("/v2/sessions", json={}), "objects_quota_exceeded")
        assert "holds 2 of its objects quota of 2" in message
        for _ in range(2):  # the other tenant has its own count
            assert (await other.post("/v2/sessions", json={})).status_code == 201

        await quotas.set_overrides(tenant, QuotaOverrides(objects=3))  # higher: effective at once
        assert (await http.post("/v2/sessions", json={})).status_code == 201
        _refused(await http.post("/v2/sessions", json={}), "objects_quota_exceeded")
        await quotas.set_overrides(tenant, QuotaOverrides(objects="unlimited"))
        assert (await http.post("/v2/sessions", json={})).status_code == 201
        await quotas.set_overrides(tenant, QuotaOverrides(), reset=frozenset({"objects"}))  # default
        _refused(await http.post("/v2/sessions", json={}), "objects_quota_exceeded")
        await quotas.set_overrides(tenant, QuotaOverrides(objects=0))  # lower than the default
        _refused(await other.post("/v2/sessions", json={}), "objects_quota_exceeded")  # its default
        assert (await quotas.usage(tenant)).objects == 4


async def test_session_turns_quota_caps_a_session_and_a_purge_gives_its_bytes_back(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = _gateway(module_redis_url, tiny_model_dir, session_turns=3)
    tenant, key = await _tenant(gateway)
    quotas = _quotas(gateway)
    async with gateway.client(key) as http:
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        after_create = await quotas.usage(tenant)
        for index in range(3):
            turn = {"role": "user", "content": f"turn {index}"}
            response = await http.post(
                f"/v2/sessions/{session}/turns", json=turn, headers={"Idempotency-Key": uuid.uuid4().hex}
            )
            assert response.status_code == 201, response.text
        refused = await http.post(
            f"/v2/sessions/{session}/turns", json={"role": "user", "content": "one more"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )  # fmt: skip
        message = _refused(refused, "session_turns_quota_exceeded")
        assert f"Session {session} holds 3 turns" in message and "quota is 3" in message
        read = (await http.get(f"/v2/sessions/{session}")).json()
        assert read["head"] == 3 and [t["content"] for t in read["turns"]][-1] == "turn 2"
        with_turns = await quotas.usage(tenant)
        assert with_turns.stored_bytes > after_create.stored_bytes and with_turns.objects == 1

        branch = (await http.post(f"/v2/sessions/{session}/branches", json={"at_turn": 3})).json()["id"]
        _refused(
            await http.post(
                f"/v2/branches/{branch}/turns", json={"role": "user", "content": "x"},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            ),
            "session_turns_quota_exceeded",
        )  # fmt: skip
        await _purge(http, session)  # the branch is built on it: both go
        freed = await quotas.usage(tenant)
        assert (freed.objects, freed.stored_bytes) == (0, 0)


async def test_every_kind_of_object_is_counted_and_purges_return_usage_to_zero(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = _gateway(module_redis_url, tiny_model_dir)
    tenant, key = await _tenant(gateway)
    quotas = _quotas(gateway)
    async with gateway.client(key) as http:
        art = (await _artifact(http, "shared content")).json()["id"]
        same = await http.post("/v2/artifacts", json={"role": "system", "content": "shared content"})
        bundle = (await http.post("/v2/bundles", json={"artifacts": [art, same.json()["id"]]})).json()["id"]
        session = (await http.post("/v2/sessions", json={"bundle": bundle})).json()["id"]
        await http.post(
            f"/v2/sessions/{session}/turns", json={"role": "user", "content": "hi"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )  # fmt: skip
        await http.post("/v2/snapshots", json={"session": session, "bundle": bundle})
        held = await quotas.usage(tenant)
        assert held.objects == 5  # two artifacts (one content, stored once), bundle, session, snapshot
        await _purge(http, art)  # its closure: the other artifact, the bundle, the session, the snapshot
        freed = await quotas.usage(tenant)
        assert (freed.objects, freed.stored_bytes) == (0, 0)


async def test_requests_per_minute_past_the_limit_is_429_with_retry_after(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    chat = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    gateway = _gateway(module_redis_url, tiny_model_dir, requests_per_minute=2)
    tenant, key = await _tenant(gateway)
    _, other_key = await _tenant(gateway)
    async with gateway.client(key) as http, gateway.client(other_key) as other:
        for _ in range(2):
            assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
        refused = await http.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert "requests per minute: limit 2, used 2" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 120
        assert (await other.post("/v1/chat/completions", json=chat)).status_code == 200

        # A second gateway (another process in production) shares the window.
        second = _gateway(module_redis_url, tiny_model_dir, requests_per_minute=2)
        async with second.client(key) as again:
            assert (await again.post("/v1/chat/completions", json=chat)).status_code == 429
        await _quotas(gateway).set_overrides(tenant, QuotaOverrides(requests_per_minute="unlimited"))
        assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200


async def test_tokens_per_minute_reserves_prompt_and_max_tokens_then_keeps_the_usage(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = _gateway(module_redis_url, tiny_model_dir, tokens_per_minute=300)
    tenant, key = await _tenant(gateway)
    redis = aioredis.from_url(module_redis_url)
    messages = [{"role": "user", "content": "Hello"}]
    async with gateway.client(key) as http:
        alone = await http.post(
            "/v1/chat/completions", json={"model": "zumik-tiny", "messages": messages, "max_tokens": 400}
        )
        assert alone.status_code == 429 and alone.headers["x-should-retry"] == "false"
        assert "This request alone is over the limit" in alone.json()["error"]["message"]
        assert "retry-after" not in alone.headers

        answer = await http.post(
            "/v1/chat/completions", json={"model": "zumik-tiny", "messages": messages, "max_tokens": 200}
        )
        assert answer.status_code == 200, answer.text
        used = answer.json()["usage"]["total_tokens"]
        assert used < 200  # the reservation (prompt + 200) was replaced by the usage
        counted = await redis.hmget(rate_key(tenant), ["tokens", "prev_tokens"])
        assert sum(int(value or 0) for value in counted) == used  # (a minute may have begun since)
        # 200 more fit only because the first request's reservation was corrected.
        again = await http.post(
            "/v1/chat/completions", json={"model": "zumik-tiny", "messages": messages, "max_tokens": 200}
        )
        assert again.status_code == 200, again.text
        third = await http.post(  # fits alone, not with what the two used
            "/v1/chat/completions", json={"model": "zumik-tiny", "messages": messages, "max_tokens": 295}
        )
        assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
        assert third.json()["error"]["type"] == "rate_limit_error"
    await redis.aclose()


@pytest.mark.parametrize("value", ["5", True, -1, 1.5])
def test_every_limit_is_a_strict_integer(value: Any) -> None:
    for field in QuotaSpec.model_fields:
        with pytest.raises(ValidationError):
            QuotaSpec.model_validate({field: value})
        with pytest.raises(ValidationError):
            QuotaOverrides.model_validate({field: value})
    assert QuotaSpec.model_validate({"objects": 5, "kv_bytes": None}).objects == 5


def test_cli_sets_and_shows_a_tenants_overrides(
    module_redis_url: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import asyncio

    gateway = _gateway(module_redis_url, tiny_model_dir)
    name = f"cli-{uuid.uuid4().hex[:12]}"
    asyncio.run(gateway.create_tenant(name))
    monkeypatch.setenv("ZUMIK_REDIS_URL", module_redis_url)
    monkeypatch.setenv("ZUMIK_HOME", str(tmp_path))
    assert cli_main(["tenant", "quota", "set", name, "--objects", "7", "--stored-bytes", "unlimited"]) == 0
    capsys.readouterr()
    assert cli_main(["tenant", "quota", "show", name, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["overrides"] == {"objects": "7", "stored_bytes": "unlimited"}
    assert shown["limits"]["objects"] == 7 and shown["limits"]["stored_bytes"] is None
    assert shown["limits"]["session_turns"] == QuotaSpec().session_turns
    assert cli_main(["tenant", "quota", "set", name, "--objects", "default"]) == 0
    assert cli_main(["tenant", "quota", "set", name, "--objects", "many"]) == 2
    capsys.readouterr()
    assert cli_main(["tenant", "quota", "show", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overrides"] == {"stored_bytes": "unlimited"}


def test_kv_bytes_are_counted_per_scope_and_a_block_past_the_limit_is_not_stored(tmp_path: Path) -> None:
    import redis as sync_redis

    from kvstore.keys import BlockKey, ScopeId
    from kvstore.manager import TierManager
    from kvstore.tier import BlockAddress
    from kvstore.tiers.redis_tier import RedisTier
    from zumik_serve.store.local_redis import LocalRedis

    server = LocalRedis(data_dir=tmp_path).start()
    try:
        tier = RedisTier(sync_redis.Redis.from_url(server.url), scope_max_bytes=250)
        mine, theirs = ScopeId("a" * 16), ScopeId("b" * 16)

        def block(scope: ScopeId, index: int) -> BlockAddress:
            return BlockAddress("c" * 64, BlockKey(f"{index:032x}"), scope)

        assert tier.store(block(mine, 0), b"x" * 100) and tier.store(block(mine, 1), b"y" * 100)
        assert tier.store(block(mine, 1), b"z" * 100)  # the same block again: still 200 bytes
        assert tier.scope_bytes(mine) == 200
        assert not tier.store(block(mine, 2), b"w" * 100)  # past 250: refused, nothing written
        assert tier.contains([block(mine, 2)]) == [False] and tier.scope_bytes(mine) == 200
        assert TierManager([tier]).plan([block(mine, 0), block(mine, 1), block(mine, 2)]).num_blocks == 2
        assert tier.store(block(theirs, 0), b"v" * 200)  # another scope has its own count

        assert tier.remove([block(mine, 0)]) == 1 and tier.scope_bytes(mine) == 100  # given back
        assert tier.store(block(mine, 2), b"w" * 100)
        assert tier.remove_scope(mine) == 2 and tier.scope_bytes(mine) == 0  # blocks only counted
        assert tier.scope_bytes(theirs) == 200

        expiring = RedisTier(sync_redis.Redis.from_url(server.url), ttl_s=3600, scope_max_bytes=150)
        assert expiring.store(block(mine, 5), b"e" * 100)
        assert not expiring.store(block(mine, 6), b"f" * 100)
        # Its TTL ends (the recorded expiry moved to the past, instead of waiting for the clock):
        ended = {expiring.redis_key(block(mine, 5)): 0}
        sync_redis.Redis.from_url(server.url).zadd("kv:expiry:" + mine, ended)
        assert expiring.store(block(mine, 6), b"f" * 100)  # the ended block is no longer counted
        assert expiring.scope_bytes(mine) == 100
    finally:
        server.stop()


async def test_a_tenants_kv_bytes_override_reaches_the_engines_tier_for_its_scope(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    import redis as sync_redis

    from kvstore.keys import BlockKey, scope_id
    from kvstore.tier import BlockAddress
    from kvstore.tiers.redis_tier import RedisTier

    chat = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    gateway = _gateway(module_redis_url, tiny_model_dir, kv_bytes=10_000)
    tenant, key = await _tenant(gateway)
    scope = scope_id(await gateway.context.salts.for_tenant(tenant))
    tier = RedisTier(sync_redis.Redis.from_url(module_redis_url), scope_max_bytes=10_000)  # the default

    def block(index: int) -> BlockAddress:
        return BlockAddress("d" * 64, BlockKey(f"{index:032x}"), scope)

    await _quotas(gateway).set_overrides(tenant, QuotaOverrides(kv_bytes=150))
    async with gateway.client(key) as http:
        assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200  # publishes it
        assert tier.store(block(0), b"k" * 100) and not tier.store(block(1), b"k" * 100)
        await _quotas(gateway).set_overrides(tenant, QuotaOverrides(), reset=frozenset({"kv_bytes"}))
        assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
        assert tier.store(block(1), b"k" * 100)  # back to the profile's 10,000 per scope
    assert tier.remove_scope(scope) == 2 and tier.scope_bytes(scope) == 0


async def test_an_admission_in_the_release_lookup_counts_and_refuses_as_alone_and_only_at_its_epoch(
    module_redis_url: str,
) -> None:
    client = aioredis.from_url(module_redis_url)
    quotas = RedisQuotaStore(client, UNLIMITED.model_copy(update={"requests_per_minute": 2}))
    routing = RedisRoutingStore(client)
    tenant = f"ten_{uuid.uuid4().hex[:12]}"
    admission = quotas.rate_admission(tenant, tokens=5, scope=ScopeId(f"scope-{tenant}"))

    async def counted() -> tuple[int, int]:
        fields = await client.hmget(rate_key(tenant), ["requests", "prev_requests", "tokens", "prev_tokens"])
        values = [int(value or 0) for value in fields]
        return values[0] + values[1], values[2] + values[3]  # (a minute may have begun meanwhile)

    try:
        # Derived at another epoch than the one read (a purge moved it on): not taken, nothing counted.
        missed = await routing.lookup(tenant, None, admission=admission, admission_epoch=1)
        assert missed.salt_epoch == 0 and missed.admitted is None
        assert await client.exists(rate_key(tenant), scope_limit_key(ScopeId(f"scope-{tenant}"))) == 0
        first = await routing.lookup(tenant, None, admission=admission, admission_epoch=0)
        assert isinstance(first.admitted, RateReservation) and first.admitted.tokens == 5
        await quotas.admit_rate(tenant, tokens=5, scope=ScopeId(f"scope-{tenant}"))  # the limit reached
        refused = await routing.lookup(tenant, None, admission=admission)
        assert isinstance(refused.admitted, RateLimitExceededError)
        assert "requests per minute: limit 2, used 2" in refused.admitted.message
        assert await counted() == (2, 10)  # a refusal counts nothing
        await quotas.refund(tenant, first.admitted)  # a request refused after its admission
        assert await counted() == (1, 5)
        again = await routing.lookup(tenant, None, admission=admission)
        assert isinstance(again.admitted, RateReservation) and await counted() == (2, 10)
    finally:
        await client.aclose()
