"""Receipts that never over-claim: providers, Redis' own durability, and decision records.

Invariants held here (the real app in process over a real redis-server; a loopback HTTP server
plays the managed provider):
- content of a snapshot (or of a Responses chain's session) sent to a managed route is recorded
  before it is sent; a purge of it lists ``provider:<route>`` as ``provider_expiry`` with the
  route's retention and its expiry, and the receipt says ``provider_expiry``, never
  ``unindexed``; the record is refused for a revoked object, and nothing is written then;
- a profile's ceiling can be ``provider_expiry``; ``retention_days`` is a provider route's field
  (30 days when not given), refused on a byoc route;
- ``compacted`` is claimed only on a Redis with AOF on, ``appendfsync always`` and RDB
  snapshots off: a server started with ``--save 900 1`` (or fsync ``everysec``) gets
  ``deleted``, and the entry says why;
- a decision's prompt digest is an HMAC under the tenant's cache salt, not a bare sha256;
  decisions are listed (newest first, paginated, per tenant), and a purge of a target removes
  the decisions whose prompt carried its content and lists ``decision_records``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from profiles import parse_profile
from profiles.model import DEFAULT_PROVIDER_RETENTION_DAYS
from tests.support.fault_server import FaultServer
from tests.support.inprocess import InProcessGateway, make_gateway, shared_secrets_dir
from zumik_serve.home import ZumikHome
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.receipt import StoreEntry, StoreResult, receipt_class, verify_receipt
from zumik_serve.purge.store import durability_gap
from zumik_serve.routing.dispatch import prompt_digest
from zumik_serve.routing.reach import DAY_S, ProviderReach
from zumik_serve.routing.store import RedisRoutingStore
from zumik_serve.store.local_redis import free_port, wait_for_redis
from zumik_serve.tenancy.tenant import DEV_TENANT, TenantId
from zumik_serve.tenancy.tenant_cli import tenant_deletion

pytestmark = pytest.mark.redis

MANAGED = """
name: receipts-managed
model: {{source: "builtin:tiny", served_name: zumik-tiny}}
engine: {{device: cpu, kv_cache_memory_bytes: 1048576}}
routes:
  - {{name: managed, kind: managed, base_url: "{managed}", model: gpt-test, api_key_env: TEST_MANAGED_KEY,
     prices: {{input: "0.15", cached_input: "0.075", output: "0.60"}}, timeout_s: 5{retention}}}
  - {{name: local, kind: byoc, replica_hour_usd: "0.50", tokens_per_replica_hour: 2000000}}
routing:
  default_route: managed
  fallback_order: [managed, local]
"""
MESSAGES = [{"role": "user", "content": "Hello there"}]
CHAT = {"model": "zumik-tiny", "messages": MESSAGES, "max_tokens": 8}
# The prompt text a decision digests (``routing/dispatch.py``): each message's sorted JSON, in order.
PROMPT = "".join(json.dumps(m, sort_keys=True, ensure_ascii=False) for m in MESSAGES)
CANARY = "CANARY-42 the plan of tenant a"


@pytest.fixture
def managed(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultServer]:
    monkeypatch.setenv("TEST_MANAGED_KEY", "sk-test")
    with FaultServer() as server:
        yield server


def _gateway(redis_url: str, model_dir: Path, managed: FaultServer, retention: str = "") -> InProcessGateway:
    text = MANAGED.format(managed=managed.base_url, retention=retention)
    return make_gateway(redis_url, model_dir, profile=parse_profile(text, source="test"))


async def _snapshot(http: httpx.AsyncClient, content: str = CANARY) -> str:
    art = (await http.post("/v2/artifacts", json={"role": "document", "content": content})).json()["id"]
    bnd = (await http.post("/v2/bundles", json={"artifacts": [art]})).json()["id"]
    created = await http.post("/v2/snapshots", json={"bundle": bnd})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def _verified(http: httpx.AsyncClient, receipt: dict[str, Any]) -> bool:
    keys = (await http.get("/v2/keys")).json()["keys"]
    key = next(k for k in keys if k["key_id"] == receipt["key_id"])
    return verify_receipt(receipt, key["public_key"].encode()).ok


# -- provider_expiry ----------------------------------------------------------------------------


async def test_purge_of_a_snapshot_sent_to_a_managed_route_says_provider_expiry(
    module_redis_url: str, tiny_model_dir: Path, managed: FaultServer
) -> None:
    gateway = _gateway(module_redis_url, tiny_model_dir, managed)
    async with gateway.client() as http:
        snapshot = await _snapshot(http)
        before = int(time.time())
        sent = await http.post("/v1/chat/completions", json=CHAT, headers={"x-zumik-snapshot": snapshot})
        after = int(time.time())
        assert sent.status_code == 200, sent.text
        assert sent.headers["x-zumik-route"] == "managed:managed"
        assert any(CANARY in json.dumps(r.body) for r in managed.requests)  # it reached the provider
        decision = sent.headers["x-zumik-decision-id"]
        listed = (await http.get("/v2/decisions")).json()
        assert decision in [item["id"] for item in listed["data"]]

        response = await http.post("/v2/purge", json={"target": snapshot})
        assert response.status_code == 200, response.text
        receipt = response.json()["receipt"]
        stores = {entry["store"]: entry for entry in receipt["stores"]}
        provider = stores["provider:managed"]
        assert (provider["result"], provider["guarantee_class"]) == ("done", "provider_expiry")
        retention_s = DEFAULT_PROVIDER_RETENTION_DAYS * DAY_S
        assert before + retention_s <= provider["expires_at"] <= after + retention_s
        assert f"up to {DEFAULT_PROVIDER_RETENTION_DAYS} days" in provider["detail"]
        assert receipt["guarantee_class"] == "provider_expiry"  # not "unindexed": the provider bounds it
        assert stores["decision_records"]["result"] == "done"
        # The opportunity index of the purged cache scopes went with Redis' own data.
        assert stores["reuse_index"]["guarantee_class"] == stores["redis_state"]["guarantee_class"]
        assert await _verified(http, receipt)
        # The decision that carried the snapshot's content is gone, from the list too.
        assert (await http.get(f"/v2/decisions/{decision}")).status_code == 404
        assert decision not in [item["id"] for item in (await http.get("/v2/decisions")).json()["data"]]
        # A purge of something that never left for a provider has no provider line.
        other = await _snapshot(http, "never sent anywhere")
        quiet = (await http.post("/v2/purge", json={"target": other})).json()["receipt"]
        assert not [entry for entry in quiet["stores"] if entry["store"].startswith("provider:")]
        assert "decision_records" not in {entry["store"] for entry in quiet["stores"]}


async def test_deleting_a_tenant_names_every_provider_its_plain_requests_reached(
    module_redis_url: str,
    tiny_model_dir: Path,
    managed: FaultServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A /v1 request with no state object still sends the tenant's content to the provider: the
    tenant's deletion receipt has its provider line; a purge of an object it never used has none."""
    gateway = _gateway(module_redis_url, tiny_model_dir, managed)
    key = await gateway.create_tenant("plain-sender")
    async with gateway.client(key) as http:
        other = await _snapshot(http, "never sent anywhere")
        before = int(time.time())
        plain = {**CHAT, "messages": [{"role": "user", "content": CANARY}]}
        sent = await http.post("/v1/chat/completions", json=plain)
        assert sent.status_code == 200 and sent.headers["x-zumik-route"] == "managed:managed", sent.text
        quiet = (await http.post("/v2/purge", json={"target": other})).json()["receipt"]
    assert not [entry for entry in quiet["stores"] if entry["store"].startswith("provider:")]
    monkeypatch.setenv("ZUMIK_SECRETS_DIR", str(shared_secrets_dir()))
    client = aioredis.from_url(module_redis_url)
    try:
        deletion = tenant_deletion(
            client, url=module_redis_url, profile=gateway.context.profile, home=ZumikHome(tmp_path),
            revocation_wait_s=0.0,
        )  # fmt: skip
        outcome = await deletion.delete("plain-sender")
    finally:
        await client.aclose()
    assert outcome.receipt is not None
    provider = next(entry for entry in outcome.receipt["stores"] if entry["store"] == "provider:managed")
    assert (provider["result"], provider["guarantee_class"]) == ("done", "provider_expiry")
    assert provider["expires_at"] >= before + DEFAULT_PROVIDER_RETENTION_DAYS * DAY_S
    assert outcome.receipt["guarantee_class"] == "provider_expiry"


async def test_route_retention_days_sets_the_expiry_of_a_purged_session(
    module_redis_url: str, tiny_model_dir: Path, managed: FaultServer
) -> None:
    """A Responses chain is stored as a session after the answer: its provider is recorded then."""
    gateway = _gateway(module_redis_url, tiny_model_dir, managed, retention=", retention_days: 0")
    async with gateway.client() as http:
        created = await http.post("/v1/responses", json={"model": "zumik-tiny", "input": CANARY})
        assert created.status_code == 200, created.text
        session = created.headers["x-zumik-session"]
        receipt = (await http.post("/v2/purge", json={"target": session})).json()["receipt"]
    provider = next(entry for entry in receipt["stores"] if entry["store"] == "provider:managed")
    # retention_days 0 (zero data retention): the provider's copy ends with the send.
    assert provider["guarantee_class"] == "provider_expiry"
    assert receipt["issued_at"] - 60 <= provider["expires_at"] <= receipt["issued_at"]
    assert receipt["guarantee_class"] == "provider_expiry"


async def test_a_send_is_not_recorded_for_a_revoked_object_and_records_the_latest_expiry(
    module_redis_url: str, tiny_model_dir: Path, managed: FaultServer
) -> None:
    gateway = _gateway(module_redis_url, tiny_model_dir, managed)
    client = aioredis.from_url(module_redis_url)
    store = RedisRoutingStore(client)
    try:
        async with gateway.client() as http:
            live = await _snapshot(http, "live one")
            gone = await _snapshot(http, "revoked one")
            assert (await http.delete(f"/v2/snapshots/{gone}")).status_code == 200
        early = ProviderReach("managed", "managed", 30, 1_000)
        late = ProviderReach("managed", "managed", 30, 2_000)
        assert await store.record_reach(DEV_TENANT, [live, gone], early) == gone
        assert await store.reached(DEV_TENANT, [live, gone]) == []  # nothing written at all
        assert await store.record_reach(DEV_TENANT, [live], late) is None
        assert await store.record_reach(DEV_TENANT, [live], early) is None  # an older send loses
        assert await store.reached(DEV_TENANT, [live]) == [late]
        assert await store.record_reach("ten_other", [live], late) == live  # another tenant's: gone
    finally:
        await client.aclose()


def test_ceiling_can_be_provider_expiry_and_retention_is_a_provider_field() -> None:
    text = MANAGED.format(managed="http://127.0.0.1:9", retention="")
    profile = parse_profile(text + "purge: {ceiling: provider_expiry}\n", source="test")
    assert profile.purge.ceiling == "provider_expiry"
    route = next(route for route in profile.effective_routes() if route.name == "managed")
    assert route.retention_days is None and route.provider_retention_days() == DEFAULT_PROVIDER_RETENTION_DAYS
    deleted = StoreEntry("redis_state", "unlink", StoreResult.DONE, GuaranteeClass.DELETED)
    assert receipt_class([deleted], GuaranteeClass(profile.purge.ceiling)) is GuaranteeClass.PROVIDER_EXPIRY
    bad = text.replace(
        "tokens_per_replica_hour: 2000000}", "tokens_per_replica_hour: 2000000, retention_days: 3}"
    )
    with pytest.raises(ValueError, match="retention_days"):
        parse_profile(bad, source="test")


# -- Redis durability -------------------------------------------------------------------------


@pytest.fixture(params=[("--save", "900 1"), ("--appendfsync", "everysec")], ids=["rdb_on", "fsync_everysec"])
def weak_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real redis-server with AOF on but one durability setting weaker than Zumik needs."""
    port = free_port("127.0.0.1")
    settings = {"--save": "", "--appendfsync": "always"}
    settings[request.param[0]] = request.param[1]
    args = [
        shutil.which("redis-server") or "/usr/bin/redis-server", "--bind", "127.0.0.1", "--port", str(port),
        "--dir", str(tmp_path), "--appendonly", "yes", "--appenddirname", "appendonly",
        "--save", settings["--save"], "--appendfsync", settings["--appendfsync"], "--daemonize", "no",
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_redis(url, timeout_s=15, process=process)
        yield url, request.param[1]
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_redis_without_full_durability_is_never_claimed_compacted(
    weak_redis: tuple[str, str], tiny_model_dir: Path
) -> None:
    url, setting = weak_redis
    gateway = make_gateway(url, tiny_model_dir)
    async with gateway.client() as http:
        art = (await http.post("/v2/artifacts", json={"role": "document", "content": CANARY})).json()["id"]
        receipt = (await http.post("/v2/purge", json={"target": art})).json()["receipt"]
    redis_state = next(entry for entry in receipt["stores"] if entry["store"] == "redis_state")
    assert receipt["guarantee_class"] == redis_state["guarantee_class"] == "deleted"
    assert "not claimed compacted" in redis_state["detail"] and repr(setting) in redis_state["detail"]


def test_durability_gap_names_what_keeps_deletes_on_disk() -> None:
    good = {
        "appendonly": "yes",
        "appendfsync": "always",
        "save": "",
        "dbfilename": "dump.rdb",
        "rdb_file": "no",
    }
    assert durability_gap(good) is None
    assert durability_gap({**good, "rdb_file": "unknown"}) is None  # not visible: the config decides
    assert "appendonly" in str(durability_gap({**good, "appendonly": "no"}))
    assert "everysec" in str(durability_gap({**good, "appendfsync": "everysec"}))
    assert "3600 1" in str(durability_gap({**good, "save": "3600 1"}))
    assert "dump.rdb" in str(durability_gap({**good, "rdb_file": "yes"}))


# -- decision records -------------------------------------------------------------------------


@pytest.fixture
async def gateway(module_redis_url: str, tiny_model_dir: Path) -> AsyncIterator[InProcessGateway]:
    yield make_gateway(module_redis_url, tiny_model_dir)


async def test_decision_digest_is_salted_with_the_tenants_cache_salt(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        sent = await http.post("/v1/chat/completions", json=CHAT)
        record = (await http.get(f"/v2/decisions/{sent.headers['x-zumik-decision-id']}")).json()["record"]
    salt = await gateway.context.salts.for_tenant(TenantId(DEV_TENANT))
    digest = record["inputs"]["request_digest"]
    assert digest != hashlib.sha256(PROMPT.encode()).hexdigest()[:32]  # nobody can confirm a guess
    assert digest == prompt_digest(salt, PROMPT)


async def test_decisions_are_listed_newest_first_a_page_at_a_time_per_tenant(
    gateway: InProcessGateway,
) -> None:
    other_key = await gateway.create_tenant("lister")
    async with gateway.client(other_key) as http, gateway.client() as dev:
        ids = [
            (await http.post("/v1/chat/completions", json=CHAT)).headers["x-zumik-decision-id"]
            for _ in range(3)
        ]
        first = (await http.get("/v2/decisions", params={"limit": "2"})).json()
        second = (await http.get("/v2/decisions", params={"limit": "2", "after": first["last_id"]})).json()
        theirs = (await dev.get("/v2/decisions", params={"limit": "100"})).json()
        refusals = [
            await http.get("/v2/decisions", params=params)
            for params in ({"limit": "0"}, {"limit": "101"}, {"limit": "2.0"}, {"after": "snp_x"},
                           {"after": "dec_" + "z" * 26})
        ]  # fmt: skip
    assert [item["id"] for item in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    assert (first["object"], first["first_id"], first["last_id"]) == ("list", ids[2], ids[1])
    assert [item["id"] for item in second["data"]] == [ids[0]] and second["has_more"] is False
    assert set(first["data"][0]) == {"id", "object", "record", "attempts"}
    assert not set(ids) & {item["id"] for item in theirs["data"]}
    assert [(r.status_code, r.json()["error"]["param"]) for r in refusals] == [
        (400, "limit"), (400, "limit"), (400, "limit"), (400, "after"), (400, "after"),
    ]  # fmt: skip


async def test_decision_store_keeps_no_bare_prompt_digest(
    gateway: InProcessGateway, module_redis_url: str
) -> None:
    """What Redis holds of a decision names no sha256 of the prompt a third party could confirm."""
    async with gateway.client() as http:
        sent = await http.post("/v1/chat/completions", json=CHAT)
    client = aioredis.from_url(module_redis_url)
    try:
        raw = await client.get(f"z:{{{DEV_TENANT}}}:dec:{sent.headers['x-zumik-decision-id']}")
    finally:
        await client.aclose()
    assert raw is not None and hashlib.sha256(PROMPT.encode()).hexdigest()[:32].encode() not in raw
