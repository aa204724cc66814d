"""Aliases, releases and decision records in a real Redis, through RoutingService.

Invariants held here:
- publishing stores the release as canonical JSON and points the alias at it; a release never
  changes, and moving the alias appends to its history, oldest first;
- ``expected_release`` makes a publish a compare-and-set: a stale expectation is a 409
  ``alias_moved`` and writes nothing; absent, the alias moves from wherever it points;
- a bad alias name is a 400 naming ``alias``; another model than the served one, a 400 naming
  ``model``; another tenant's alias or decision is not found;
- a stored decision reads back as written (its record not re-parsed) and replays equal; an
  altered one replays not equal;
- a request's release lookup reads the tenant's salt epoch in the same step, so a purge's new
  epoch is what the next request runs with; a pinned release runs while its alias is the one
  named, else the alias' current release; a stored release (which never changes) is parsed
  once per process;
- the store's scripts survive a ``SCRIPT FLUSH`` (reloaded on use);
- a decision's save writes its record byte for byte with a 30-day TTL, lists it by its
  ``now_ms`` (dropping entries older than 30 days, keeping the one exactly 30 days old) and
  indexes it once under each source object, each key expiring with it; with a rate settlement
  it writes the same bytes and settles the tenant's rate exactly as ``settle`` alone does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kvstore.keys import ScopeId
from profiles import load_builtin
from tests.unit.test_routing import ENOUGH, make_inputs, make_replica
from zumik_serve.errors import ConflictError, InvalidRequestError, NotFoundError
from zumik_serve.qos.quota import RateSettlement
from zumik_serve.qos.store import RATE_WINDOW_S, RedisQuotaStore, rate_key
from zumik_serve.routing.decision import decide
from zumik_serve.routing.release import Release
from zumik_serve.routing.requests import PublishRelease
from zumik_serve.routing.retry import ATTEMPTS, Attempt
from zumik_serve.routing.service import RequestRelease, RoutingService
from zumik_serve.routing.store import DECISION_TTL_S, RedisRoutingStore
from zumik_serve.store.local_redis import LocalRedis
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import TenantId

pytestmark = pytest.mark.redis

PROFILE = load_builtin("local-cpu-2x")
SERVED = PROFILE.model.served_name


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    yield server.url
    server.stop()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.from_url(redis_url)
    yield redis_client
    await redis_client.aclose()


def make_service(client: aioredis.Redis) -> RoutingService:
    return RoutingService(RedisRoutingStore(client), PROFILE)


async def test_publish_stores_canonical_json_and_moving_keeps_the_history(client: aioredis.Redis) -> None:
    routing = make_service(client)
    first = await routing.publish("ten_a", "prod", PublishRelease())
    assert first.alias == "prod" and first.model == SERVED and first.previous is None
    assert await client.get(f"z:{{ten_a}}:rel:{first.id}") == first.canonical_json()
    second = await routing.publish("ten_a", "prod", PublishRelease(expected_release=first.id))
    assert second.previous == first.id
    state = await routing.alias("ten_a", "prod")
    assert state.name == "prod" and state.current == second and state.history == (first, second)
    assert await routing.resolve("ten_a", "prod") == second
    assert await client.get(f"z:{{ten_a}}:rel:{first.id}") == first.canonical_json()  # unchanged


async def test_compare_and_set_refuses_a_stale_expectation_and_writes_nothing(client: aioredis.Redis) -> None:
    routing = make_service(client)
    first = await routing.publish("ten_a", "prod", PublishRelease.parse({"expected_release": None}))
    with pytest.raises(ConflictError) as caught:
        await routing.publish("ten_a", "prod", PublishRelease.parse({"expected_release": None}))
    assert caught.value.code == "alias_moved" and caught.value.status == 409
    with pytest.raises(ConflictError):
        await routing.publish("ten_a", "prod", PublishRelease.parse({"expected_release": "rel_" + "b" * 26}))
    assert (await routing.alias("ten_a", "prod")).history == (first,)


async def test_concurrent_publishes_from_the_same_release_let_one_win(client: aioredis.Redis) -> None:
    routing = make_service(client)
    first = await routing.publish("ten_a", "prod", PublishRelease())
    outcomes = await asyncio.gather(
        *(routing.publish("ten_a", "prod", PublishRelease(expected_release=first.id)) for _ in range(8)),
        return_exceptions=True,
    )
    won = [outcome for outcome in outcomes if isinstance(outcome, Release)]
    assert len(won) == 1 and all(isinstance(o, ConflictError) for o in outcomes if o not in won)
    assert (await routing.alias("ten_a", "prod")).history == (first, won[0])


async def test_publish_names_the_bad_field(client: aioredis.Redis) -> None:
    routing = make_service(client)
    with pytest.raises(InvalidRequestError) as caught:
        await routing.publish("ten_a", "Not Valid", PublishRelease())
    assert caught.value.param == "alias"
    with pytest.raises(InvalidRequestError) as caught:
        await routing.publish("ten_a", "prod", PublishRelease(model="gpt-other"))
    assert caught.value.param == "model"
    for body, param in [
        ({"modle": SERVED}, "modle"),
        ({"model": 7}, "model"),
        ({"expected_release": 7}, "expected_release"),
    ]:
        with pytest.raises(InvalidRequestError) as caught:
            PublishRelease.parse(body)
        assert caught.value.param == param and caught.value.status == 400


async def test_aliases_are_per_tenant(client: aioredis.Redis) -> None:
    routing = make_service(client)
    await routing.publish("ten_a", "prod", PublishRelease())
    with pytest.raises(NotFoundError):
        await routing.alias("ten_b", "prod")
    assert await routing.resolve("ten_b", "prod") is None
    implicit = (await routing.release_for_request("ten_b", SERVED)).release  # the served model's own alias
    assert implicit is not None and implicit.alias == SERVED
    assert (await routing.release_for_request("ten_b", "gpt-other")).release is None


async def test_a_requests_release_lookup_reads_the_salt_epoch_it_runs_with(client: aioredis.Redis) -> None:
    routing = make_service(client)
    tenants = RedisTenantStore(client)
    first = await routing.publish("ten_a", "prod", PublishRelease())
    assert await routing.release_for_request("ten_a", "prod") == RequestRelease(first, 0)
    assert await tenants.rotate_salt_epoch(TenantId("ten_a")) == 1  # a purge, on any gateway
    assert await routing.release_for_request("ten_a", "prod") == RequestRelease(first, 1)
    # No alias to resolve (no model, a name no alias can have, another tenant's): the epoch still.
    for model in (None, "Not Valid", "gpt-other"):
        assert await routing.release_for_request("ten_a", model) == RequestRelease(None, 1)
    assert await routing.release_for_request("ten_b", "prod") == RequestRelease(None, 0)


async def test_a_pinned_release_runs_while_its_alias_is_the_one_named(client: aioredis.Redis) -> None:
    routing = make_service(client)
    first = await routing.publish("ten_a", "prod", PublishRelease())
    second = await routing.publish("ten_a", "prod", PublishRelease())
    other = await routing.publish("ten_a", "canary", PublishRelease())
    assert (await routing.release_for_request("ten_a", "prod", pinned=first.id)).release == first
    assert (await routing.release_for_request("ten_a", "prod", pinned=other.id)).release == second
    assert (await routing.release_for_request("ten_a", "prod", pinned="rel_gone")).release == second
    assert (await routing.release_for_request("ten_a", None, pinned=first.id)).release is None


async def test_a_release_may_take_a_subset_of_the_profiles_routes(client: aioredis.Redis) -> None:
    """A release names the routes its requests may take: all of the profile's by default, or the
    ones the publish names (in the profile's order); a name the profile lacks, a repeat or none
    at all is a 400 naming ``routes``, and nothing is published."""
    routing = make_service(client)
    everything = await routing.publish("ten_a", "prod", PublishRelease())
    assert [entry.name for entry in everything.route_table] == ["local", "managed", "byok"]
    narrow = await routing.publish("ten_a", "prod", PublishRelease.parse({"routes": ["byok", "local"]}))
    assert [entry.name for entry in narrow.route_table] == ["local", "byok"]
    assert (await routing.release_for_request("ten_a", "prod")).release == narrow
    for routes in (["local", "nowhere"], ["local", "local"], []):
        with pytest.raises(InvalidRequestError) as refused:
            await routing.publish("ten_a", "prod", PublishRelease.parse({"routes": routes}))
        assert refused.value.param == "routes" and "local, managed, byok" in refused.value.message
    assert (await routing.alias("ten_a", "prod")).current == narrow
    # Another model's requests go to the engines that serve it: a release of it chooses no routes.
    multi = RoutingService(RedisRoutingStore(client), load_builtin("local-cpu-multi"))
    with pytest.raises(InvalidRequestError, match="routes applies to releases of"):
        await multi.publish(
            "ten_a", "lora", PublishRelease.parse({"model": "zumik-tiny-lora", "routes": ["local"]})
        )
    assert (await multi.publish("ten_a", "lora", PublishRelease.parse({"model": "zumik-tiny-lora"}))).model


async def test_a_stored_release_is_parsed_once_and_a_new_one_read_as_stored(client: aioredis.Redis) -> None:
    routing = make_service(client)
    first = await routing.publish("ten_a", "prod", PublishRelease())
    read = (await routing.release_for_request("ten_a", "prod")).release
    again = (await routing.release_for_request("ten_a", "prod")).release
    assert read == first and again is read  # the same bytes: the value parsed the first time
    second = await routing.publish("ten_a", "prod", PublishRelease())
    assert (await routing.release_for_request("ten_a", "prod")).release == second != first


async def test_a_stored_decision_reads_back_as_written_and_replays(client: aioredis.Redis) -> None:
    store = RedisRoutingStore(client)
    routing = RoutingService(store, PROFILE)
    record = decide("dec_" + "a" * 26, make_inputs(make_replica("r0", matched=3), evidence=ENOUGH))
    attempts = [Attempt("local", "r0", 1, "ok", None, "done", "", "closed")]
    await store.save_decision("ten_a", record, attempts)
    stored = await routing.decision("ten_a", record.decision_id)
    assert stored.record == record.to_json()
    assert stored.attempts == ({
        "route": "local", "replica": "r0", "attempt": 1, "outcome": "ok", "status": None, "action": "done",
        "reason": "", "breaker_after": "closed",
    },)  # fmt: skip
    replayed = await routing.replay("ten_a", record.decision_id)
    assert replayed.equal and replayed.record == record.to_json()
    with pytest.raises(NotFoundError):
        await routing.decision("ten_b", record.decision_id)
    with pytest.raises(NotFoundError):
        await routing.decision("ten_a", "not-a-handle")

    key = f"z:{{ten_a}}:dec:{record.decision_id}"
    altered = json.loads(await client.get(key))
    altered["record"]["pick"] = {"route": "managed", "replica": None}
    await client.set(key, json.dumps(altered))
    assert (await routing.replay("ten_a", record.decision_id)).equal is False


async def test_scripts_reload_after_a_script_flush(client: aioredis.Redis) -> None:
    routing = make_service(client)
    first = await routing.publish("ten_a", "prod", PublishRelease())
    await client.script_flush()
    assert await routing.resolve("ten_a", "prod") == first
    await client.script_flush()
    second = await routing.publish("ten_a", "prod", PublishRelease())
    assert second.previous == first.id


async def test_a_decisions_save_writes_its_record_list_and_source_indexes(client: aioredis.Redis) -> None:
    store = RedisRoutingStore(client)
    month_ms = DECISION_TTL_S * 1000
    now_ms = 10 * month_ms
    listed = "z:{ten_a}:decs"
    await client.zadd(listed, {"dec_too_old": now_ms - month_ms - 1, "dec_just_kept": now_ms - month_ms})
    record = decide("dec_" + "b" * 26, make_inputs(make_replica("r0"), evidence=ENOUGH, now_ms=now_ms))
    attempts = [Attempt("local", "r0", 1, "ok", None, "done", "", "closed")]
    await client.script_flush()  # the save's script is loaded on use
    await store.save_decision("ten_a", record, attempts, ["ses_1", "snp_2", "ses_1"])
    key = f"z:{{ten_a}}:dec:{record.decision_id}"
    assert await client.get(key) == (
        b'{"record":' + record.to_json_bytes() + b',"attempts":' + ATTEMPTS.dump_json(tuple(attempts)) + b"}"
    )
    assert await client.zrange(listed, 0, -1, withscores=True) == [
        (b"dec_just_kept", float(now_ms - month_ms)),
        (record.decision_id.encode(), float(now_ms)),
    ]
    for handle in ("ses_1", "snp_2"):
        assert await client.smembers(f"z:{{ten_a}}:dec-src:{handle}") == {record.decision_id.encode()}
    for expiring in (key, listed, "z:{ten_a}:dec-src:ses_1", "z:{ten_a}:dec-src:snp_2"):
        assert DECISION_TTL_S - 5 <= await client.ttl(expiring) <= DECISION_TTL_S
    assert await store.forget_decisions("ten_a", ["snp_2"]) == 1
    assert await client.exists(key) == 0 and await client.zscore(listed, record.decision_id) is None


async def test_a_tenant_keeps_at_most_its_cap_of_decisions_and_the_oldest_go(client: aioredis.Redis) -> None:
    """Decision records are about 2 KB each and the state Redis does not evict: past the cap, a
    save removes the tenant's oldest records with their place in the list, in the same step,
    never the record it saves (one from a gateway whose clock runs behind); another tenant's are
    untouched."""
    store = RedisRoutingStore(client, decisions_per_tenant=3)
    attempts = [Attempt("local", "r0", 1, "ok", None, "done", "", "closed")]
    records = [
        decide(f"dec_{letter * 26}", make_inputs(make_replica("r0"), evidence=ENOUGH, now_ms=1_000 + index))
        for index, letter in enumerate("cdefg")
    ]
    for record in records:
        await store.save_decision("ten_cap", record, attempts, ["ses_1"])
    await store.save_decision("ten_other", records[0], attempts)

    async def listed() -> list[bytes]:
        return list(await client.zrange("z:{ten_cap}:decs", 0, -1))

    kept = [record.decision_id for record in records[2:]]
    assert [item.decode() for item in await listed()] == kept
    for record in records:
        present = await client.exists(f"z:{{ten_cap}}:dec:{record.decision_id}")
        assert present == (record.decision_id in kept), record.decision_id
    page = await store.decision_page("ten_cap", limit=10, after=None)
    assert page is not None and list(page.ids) == kept[::-1] and not page.has_more
    assert await client.exists(f"z:{{ten_other}}:dec:{records[0].decision_id}") == 1

    late = decide("dec_" + "h" * 26, make_inputs(make_replica("r0"), evidence=ENOUGH, now_ms=10))
    await store.save_decision("ten_cap", late, attempts)
    assert [item.decode() for item in await listed()] == [late.decision_id, *kept[1:]]
    assert await client.exists(f"z:{{ten_cap}}:dec:{late.decision_id}") == 1
    assert await client.exists(f"z:{{ten_cap}}:dec:{kept[0]}") == 0
    with pytest.raises(ValueError, match="at least 1"):
        RedisRoutingStore(client, decisions_per_tenant=0)


async def test_a_save_with_a_settlement_writes_the_same_record_and_settles_as_settle_does(
    client: aioredis.Redis,
) -> None:
    store = RedisRoutingStore(client)
    quotas = RedisQuotaStore(client, PROFILE.quota)
    scope = ScopeId("scope")
    attempts = [Attempt("local", "r0", 1, "ok", None, "done", "", "closed")]
    saved: dict[str, bytes | None] = {}
    for tenant, correction in (("ten_a", -40), ("ten_b", -40), ("ten_c", 7)):
        reservation = await quotas.admit_rate(tenant, tokens=50, scope=scope)
        settlement = RateSettlement.of(reservation, reservation.tokens + correction)
        assert settlement is not None and settlement.correction == correction
        record = decide(f"dec_{tenant[-1] * 26}", make_inputs(make_replica("r0"), evidence=ENOUGH))
        if tenant == "ten_b":  # the settlement on its own, as at a stream's end
            await store.save_decision(tenant, record, attempts, ["ses_1"])
            await quotas.settle(tenant, settlement)
        else:
            await store.save_decision(tenant, record, attempts, ["ses_1"], settlement)
        key = f"z:{{{tenant}}}:dec:{record.decision_id}"
        saved[tenant] = await client.get(key)
        assert saved[tenant] == (
            b'{"record":'
            + record.to_json_bytes()
            + b',"attempts":'
            + ATTEMPTS.dump_json(tuple(attempts))
            + b"}"
        )
        assert await client.smembers(f"z:{{{tenant}}}:dec-src:ses_1") == {record.decision_id.encode()}
        assert await client.ttl(rate_key(tenant)) <= 2 * RATE_WINDOW_S  # the rate keeps its own expiry
    rates = {  # a window may begin between two tenants' admissions: their starts may differ
        tenant: {
            field: value
            for field, value in (await client.hgetall(rate_key(tenant))).items()
            if field != b"start"
        }
        for tenant in ("ten_a", "ten_b", "ten_c")
    }
    assert rates["ten_a"] == rates["ten_b"] and rates["ten_a"][b"tokens"] == b"10"
    assert rates["ten_c"][b"tokens"] == b"57"
