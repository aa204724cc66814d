"""API keys and tenants over their life: keys with ids, revocation within a bound, deletion.

Invariants held here (real redis-server; the real HTTP app in process where a request is made):
- creating a tenant is all or nothing: cut the connection after any number of commands and the
  name claim, the record, the first key and its index entry exist together or not at all;
- a key has an id, a hint and a creation time, and is never listed; a key made before key ids
  (no index entry) still authenticates, is listed as legacy and is revoked by its id;
- no key is created for a tenant being deleted;
- after a revocation no gateway accepts the key once ``REVOCATION_BOUND_S`` has passed (two
  Authenticators over one Redis, their clocks driven by the test), and over HTTP it is a 401;
- deleting a tenant that has data of every kind leaves no key and no value naming its id, no
  KV block or index of its scopes, leaves another tenant's data as it was, frees the name, and
  signs a receipt that verifies; a deletion cut short resumes without rotating twice;
- the CLI creates, lists and revokes keys, deletes a tenant to a receipt file that
  ``zumik receipt verify`` accepts, and lists tenants.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from kvstore.codec import encode_block
from kvstore.keys import BlockKey, scope_id
from kvstore.manager import TierManager
from kvstore.sealing import ScopedSealer
from kvstore.tier import BlockAddress
from kvstore.tiers.build import build_tiers
from kvstore.tiers.redis_keyring import RedisKeyring
from profiles import load_builtin
from tests.support.inprocess import DEV_KEY, InProcessGateway, make_gateway, wait_until
from zumik_serve.api.app import build_app
from zumik_serve.app.ray_head import forget_ray_address, record_ray_address, running_ray_address
from zumik_serve.cli import main
from zumik_serve.home import ZumikHome
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.deletion import TenantDeletion
from zumik_serve.purge.job import PurgeStep
from zumik_serve.purge.receipt import verify_receipt
from zumik_serve.purge.service import PurgeService
from zumik_serve.purge.signing_keys import SigningKeys
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.reuse.store import RedisReuseStore
from zumik_serve.routing.store import RedisRoutingStore
from zumik_serve.server_secrets import generate_missing
from zumik_serve.state.store import RedisStateStore
from zumik_serve.store.local_redis import free_port
from zumik_serve.tenancy.store import RedisTenantStore, TenantDeletingError
from zumik_serve.tenancy.tenant import (
    REVOCATION_BOUND_S,
    Authenticator,
    Tenant,
    TenantId,
    cache_salt,
    check_dev_key,
    hash_api_key,
    key_id_of,
    new_api_key,
)

pytestmark = pytest.mark.redis

COMPAT = "c" * 64
CANARY = "CANARY-91d4 what tenant doomed told us"
PROFILE = load_builtin("local-cpu-2x")  # it has a BYOK route and aliases
# What ``_fill`` leaves, by the part of the key after the tenant: objects and their content,
# sessions' turns, idempotency results, the reuse ledger, decision records, releases and aliases,
# BYOK keys, a purge's job and receipts; and the directory's records.
EVERY_KIND = {
    "o", "blob", "bydigest", "derived", "exposed", "turns", "idem", "reuse", "dec", "rel", "alias",
    "byok", "purge", "purge-target", "receipt", "receipts", "tenant", "tenant-name", "tenant-keys", "apikey",
}  # fmt: skip


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(module_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(module_redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def secrets_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    generate_missing(folder, environ={})
    return folder


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- creation is atomic ----------------------------------------------------------------------


class CuttingProxy:
    """A TCP proxy in front of Redis that forwards ``limit`` complete commands (counted over
    all its connections), then closes every connection: a gateway or CLI dying between two
    commands, as far as Redis can tell."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.upstream_port = upstream_port
        self.limit = limit
        self.forwarded = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def replies() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        pump = asyncio.create_task(replies())
        buffer = b""
        try:
            while data := await reader.read(65536):
                buffer += data
                while (end := _command_end(buffer)) is not None:
                    if self.forwarded >= self.limit:
                        return
                    up_writer.write(buffer[:end])
                    await up_writer.drain()
                    self.forwarded += 1
                    buffer = buffer[end:]
        finally:
            await asyncio.sleep(0.05)  # let Redis answer what it was sent
            pump.cancel()
            for w in (writer, up_writer):
                w.close()


def _command_end(buffer: bytes) -> int | None:
    """Where the first complete RESP command (an array of bulk strings) in ``buffer`` ends."""
    if not buffer.startswith(b"*") or b"\r\n" not in buffer:
        return None
    head, _, rest = buffer.partition(b"\r\n")
    position = len(head) + 2
    for _ in range(int(head[1:])):
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        length = int(buffer[position + 1 : line_end])
        position = line_end + 2 + length + 2
        if position > len(buffer):
            return None
    return position


async def test_create_tenant_leaves_all_or_nothing_when_cut_after_any_command(
    module_redis_url: str, client: aioredis.Redis
) -> None:
    target = urlsplit(module_redis_url)
    assert target.port is not None
    created = 0
    for limit in range(12):
        name = _name("cut")
        proxy = CuttingProxy(target.port, limit)
        proxy_port = await proxy.start()
        url = urlunsplit(target._replace(netloc=target.netloc.replace(f":{target.port}", f":{proxy_port}")))
        cut_client = aioredis.from_url(url, socket_timeout=2)
        try:
            await RedisTenantStore(cut_client).create_tenant(name)
            created += 1
        except redis.RedisError:
            pass
        finally:
            await proxy.stop()
            await cut_client.aclose()
        tenant_id = await client.get(f"zumik:tenant-name:{name}")
        if tenant_id is None:
            assert [k async for k in client.scan_iter(match=f"*{name}*")] == []
            continue
        tid = tenant_id.decode()
        index = await client.hgetall(f"zumik:tenant-keys:{tid}")
        assert await client.hget(f"zumik:tenant:{tid}", "name") == name.encode()
        assert len(index) == 1
        digest = json.loads(next(iter(index.values())))["sha256"]
        assert await client.get(f"zumik:apikey:{digest}") == tenant_id
    assert created >= 1  # the uncut runs did create


# --- keys ------------------------------------------------------------------------------------


async def test_keys_have_ids_and_hints_and_are_never_listed(client: aioredis.Redis) -> None:
    store = RedisTenantStore(client)
    tenant, first = await store.create_tenant(_name("keys"))
    info, second = await store.create_key(tenant)
    listed = await store.list_keys(tenant.id)
    assert {(k.id, k.hint) for k in listed} == {
        (key_id_of(hash_api_key(first)), first[-4:]),
        (info.id, second[-4:]),
    }
    assert all(k.created_at_s and not k.legacy for k in listed)
    assert first not in repr(listed) and second not in repr(listed)
    assert await store.revoke_key(tenant.id, info.id)
    assert await store.tenant_for_key_hash(hash_api_key(second)) is None
    assert await store.tenant_for_key_hash(hash_api_key(first)) == tenant
    assert not await store.revoke_key(tenant.id, info.id)  # already gone
    other, _ = await store.create_tenant(_name("other"))
    assert not await store.revoke_key(other.id, key_id_of(hash_api_key(first)))  # not its key
    assert await store.tenant_for_key_hash(hash_api_key(first)) == tenant


async def test_key_made_before_key_ids_authenticates_is_listed_and_revoked(client: aioredis.Redis) -> None:
    store = RedisTenantStore(client)
    tenant, current = await store.create_tenant(_name("legacy"))
    old_key = new_api_key()
    await client.set(f"zumik:apikey:{hash_api_key(old_key)}", tenant.id)  # as the first version wrote it
    auth = Authenticator(store, clock=Clock())
    assert await auth.authenticate(f"Bearer {old_key}") == tenant
    listed = await store.list_keys(tenant.id)
    legacy = [k for k in listed if k.legacy]
    assert [(k.id, k.hint, k.created_at_s) for k in legacy] == [
        (key_id_of(hash_api_key(old_key)), None, None)
    ]
    assert await store.revoke_key(tenant.id, legacy[0].id)
    assert await Authenticator(store).authenticate(f"Bearer {old_key}") is None
    assert await Authenticator(store).authenticate(f"Bearer {current}") == tenant


async def test_no_key_is_created_for_a_tenant_being_deleted(client: aioredis.Redis) -> None:
    store = RedisTenantStore(client)
    tenant, key = await store.create_tenant(_name("dying"))
    assert await store.revoke_all_keys(tenant.id, '{"marker": 1}') == '{"marker": 1}'
    assert await store.tenant_for_key_hash(hash_api_key(key)) is None
    with pytest.raises(TenantDeletingError, match="being deleted"):
        await store.create_key(tenant)
    assert await store.list_keys(tenant.id) == []


# --- revocation bound ------------------------------------------------------------------------


async def test_no_gateway_accepts_a_revoked_key_once_the_bound_has_passed(module_redis_url: str) -> None:
    clock = Clock()
    clients = [aioredis.from_url(module_redis_url) for _ in range(2)]
    stores = [RedisTenantStore(c) for c in clients]
    gateways = [Authenticator(store, clock=clock) for store in stores]
    tenant, key = await stores[0].create_tenant(_name("bound"))
    header = f"Bearer {key}"
    assert await gateways[0].authenticate(header) == tenant  # cached from t=1000.0
    clock.now += 0.5
    assert await gateways[1].authenticate(header) == tenant  # cached from t=1000.5
    clock.now += 0.2
    revoked_at = clock.now
    assert await stores[1].revoke_key(tenant.id, key_id_of(hash_api_key(key)))
    # Inside the bound a gateway may still answer from its cache (that is what the bound allows).
    assert await gateways[1].authenticate(header) == tenant
    clock.now = revoked_at + REVOCATION_BOUND_S
    assert [await g.authenticate(header) for g in gateways] == [None, None]
    for c in clients:
        await c.aclose()


@dataclass
class Http:
    gateway: InProcessGateway
    clock: Clock


@pytest.fixture
def http(module_redis_url: str, tiny_model_dir: Path, secrets_folder: Path) -> Http:
    gateway = make_gateway(module_redis_url, tiny_model_dir, secrets_dir=secrets_folder)
    clock = Clock()
    directory = RedisTenantStore(aioredis.from_url(module_redis_url))
    context = replace(gateway.context, authenticator=Authenticator(directory, dev_key=DEV_KEY, clock=clock))
    return Http(replace(gateway, app=build_app(context), context=context), clock)


async def test_revoked_key_is_a_401_over_http(
    http: Http, module_redis_url: str, tiny_model_dir: Path
) -> None:
    store = RedisTenantStore(aioredis.from_url(module_redis_url))
    tenant, key = await store.create_tenant(_name("http"))
    spare, spare_key = await store.create_key(tenant)
    async with http.gateway.client(key) as client:
        assert (await client.get("/v1/models")).status_code == 200
        await store.revoke_key(tenant.id, key_id_of(hash_api_key(key)))
        http.clock.now += REVOCATION_BOUND_S
        refused = await client.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    async with http.gateway.client(spare_key) as client:
        assert (await client.get("/v1/models")).status_code == 200
    # A gateway that never saw the key refuses it at once.
    async with make_gateway(module_redis_url, tiny_model_dir, secrets_dir=None).client(key) as client:
        assert (await client.get("/v1/models")).status_code == 401


# --- deletion --------------------------------------------------------------------------------


@dataclass
class Deleting:
    gateway: InProcessGateway
    client: aioredis.Redis
    tenants: RedisTenantStore
    tier_config: dict[str, Any]
    folder: Path

    def deletion(self, **options: Any) -> TenantDeletion:
        client = self.client
        purge_store = RedisPurgeStore(client, RedisStateStore(client))
        purges = PurgeService(
            purge_store, signing_keys=SigningKeys(self.folder), profile="test",
            ceiling=GuaranteeClass.CRYPTO_ERASED, tiers=build_tiers(self.tier_config), sealed=True,
            salt_secret=self.gateway.context.salts.secret, salt_epoch=self.tenants.salt_epoch,
            rotate_salt_epoch=self.tenants.rotate_salt_epoch,
            forget_scopes=RedisReuseStore(client).forget_scopes, traces=RedisRoutingStore(client),
            key_cache_ttl_s=0.0,
        )  # fmt: skip
        return TenantDeletion(self.tenants, purges, purge_store, revocation_wait_s=0.0, **options)

    async def scopes(self, tenant: TenantId, epochs: int) -> list[str]:
        secret = await self.gateway.context.salts.secret()
        return [scope_id(cache_salt(secret, tenant, epoch)) for epoch in range(epochs)]


@pytest.fixture
def deleting(
    module_redis_url: str, tiny_model_dir: Path, tmp_path: Path, secrets_folder: Path
) -> Iterator[Deleting]:
    gateway = make_gateway(module_redis_url, tiny_model_dir, profile=PROFILE, secrets_dir=secrets_folder)
    client = aioredis.from_url(module_redis_url)
    config = {
        "compat_digest": COMPAT, "host_capacity_bytes": 1 << 20, "shm_root": str(tmp_path / "shm"),
        "redis_url": module_redis_url, "disk_root": str(tmp_path / "disk"),
        "keyring_redis_url": module_redis_url, "seal": True,
    }  # fmt: skip
    yield Deleting(gateway, client, RedisTenantStore(client), config, secrets_folder)


async def _fill(d: Deleting, name: str) -> tuple[Tenant, str]:
    """A tenant with data of every kind a request can leave, and KV blocks in every tier."""
    tenant, key = await d.tenants.create_tenant(name)
    await d.tenants.create_key(tenant)
    async with d.gateway.client(key) as http:
        art = await _created(http, "/v2/artifacts", {"role": "document", "content": CANARY})
        bundle = await _created(http, "/v2/bundles", {"artifacts": [art]})
        session = await _created(http, "/v2/sessions", {"bundle": bundle})
        turn = await http.post(
            f"/v2/sessions/{session}/turns",
            json={"role": "user", "content": CANARY},
            headers={"Idempotency-Key": "t1"},
        )
        assert turn.status_code == 201, turn.text
        branch = await http.post(f"/v2/sessions/{session}/branches", json={"at_turn": 1})
        assert branch.status_code == 201, branch.text
        snapshot = await _created(http, "/v2/snapshots", {"bundle": bundle})
        extra = await http.post(
            "/v2/artifacts", json={"role": "document", "content": "idem"}, headers={"Idempotency-Key": "k1"}
        )
        assert extra.status_code == 201
        chat = {"model": PROFILE.model.served_name, "messages": [{"role": "user", "content": CANARY}],
                "max_tokens": 4}  # fmt: skip
        answered = await http.post("/v1/chat/completions", json=chat, headers={"x-zumik-snapshot": snapshot})
        assert answered.status_code == 200, answered.text
        assert (await http.post("/v2/aliases/doomed-prod/releases")).status_code == 201
        assert (await http.put("/v2/byok/byok", json={"api_key": "sk-doomed-" + "9" * 32})).status_code == 200
        purged = await http.post("/v2/purge", json={"target": extra.json()["id"]})
        assert purged.status_code == 200, purged.text
    await wait_until(
        lambda: _has(d.client, f"z:{{{tenant.id}}}:reuse:*"), what="the reuse ledger of the tenant"
    )
    keyring = RedisKeyring(redis.Redis.from_url(d.tier_config["redis_url"]), cache_ttl_s=0)
    manager = TierManager(build_tiers(d.tier_config), sealer=ScopedSealer(keyring), keyring=keyring)
    (scope,) = await d.scopes(tenant.id, 1)
    for index in range(2):
        address = BlockAddress(COMPAT, BlockKey(f"{index:032x}"), scope)
        manager.store(address, encode_block({"l": np.full((2, 4), 7, dtype=np.uint8)}, address))
    await d.client.zadd(f"zumik:seen:{scope}:{COMPAT[:16]}", {"blockkey": 1})
    return tenant, key


async def _created(http: Any, path: str, body: dict[str, Any]) -> str:
    response = await http.post(path, json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _has(client: aioredis.Redis, pattern: str) -> bool:
    return bool([k async for k in client.scan_iter(match=pattern)])


async def _everything(client: aioredis.Redis) -> dict[str, Any]:
    """Every key and its value, read by type (a SCAN of the whole server)."""
    found: dict[str, Any] = {}
    async for raw in client.scan_iter(count=1000):
        key = raw.decode()
        kind = (await client.type(key)).decode()
        value: Any = None
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1)
        found[key] = value
    return found


def _naming(everything: dict[str, Any], needle: str) -> list[str]:
    return [
        key for key, value in everything.items() if needle in key or needle.encode() in repr(value).encode()
    ]


async def test_deleting_a_tenant_removes_everything_it_has_and_signs_a_receipt(deleting: Deleting) -> None:
    d = deleting
    doomed, doomed_key = await _fill(d, _name("doomed"))
    kept, kept_key = await _fill(d, _name("kept"))
    kept_before = {k: v for k, v in (await _everything(d.client)).items() if kept.id in k}
    before = _naming(await _everything(d.client), doomed.id)
    kinds = {key.split(":")[2] if key.startswith("z:") else key.split(":")[1] for key in before}
    assert kinds >= EVERY_KIND  # the control: the tenant had data of every kind

    outcome = await d.deletion().delete(doomed.name)
    assert outcome.receipt is not None, outcome.job.error
    public_pem = SigningKeys(d.folder).public_keys()[0]["public_key"].encode()
    assert verify_receipt(outcome.receipt, public_pem).ok
    assert outcome.receipt["target"] == doomed.id and outcome.receipt["tenant"] == doomed.id
    assert outcome.receipt["seq"] == 2  # after the tenant's own purge: the chain goes on
    stores = {s["store"] for s in outcome.receipt["stores"]}
    assert {"redis_state", "kv_engine", "kv_host", "kv_redis", "kv_disk"} <= stores
    await d.deletion().forget(outcome)

    everything = await _everything(d.client)
    assert _naming(everything, doomed.id) == []
    assert _naming(everything, doomed.name) == []
    for scope in await d.scopes(doomed.id, 2):
        assert [k for k in everything if scope in k and not k.startswith("kvkey:")] == []
        assert not [p for p in Path(d.tier_config["disk_root"]).rglob(f"*{scope}*")]
        assert not [p for p in Path(d.tier_config["shm_root"]).rglob(f"*{scope}*")]
    assert await Authenticator(d.tenants).authenticate(f"Bearer {doomed_key}") is None
    # The other tenant's data is as it was, and its key works.
    assert {k: v for k, v in everything.items() if kept.id in k} == kept_before
    assert await Authenticator(d.tenants).authenticate(f"Bearer {kept_key}") == kept
    # The name is free.
    again, _ = await d.tenants.create_tenant(doomed.name)
    assert again.id != doomed.id


class Crash(BaseException):
    """The process dying right after a step was saved."""


@pytest.mark.parametrize(
    "crash_after", [PurgeStep.REVOKE, PurgeStep.ROTATE, PurgeStep.TIERS, PurgeStep.COMPACT]
)
async def test_a_deletion_cut_short_resumes_and_rotates_once(
    deleting: Deleting, crash_after: PurgeStep
) -> None:
    d = deleting
    doomed, key = await _fill(d, _name("crash"))

    async def crash(step: PurgeStep) -> None:
        if step is crash_after:
            raise Crash

    with pytest.raises(Crash):
        await d.deletion(after_step=crash).delete(doomed.name)
    # Keys are revoked from the start; the name stays claimed while the deletion is unfinished.
    assert await d.tenants.tenant_for_key_hash(hash_api_key(key)) is None
    listed = {s.tenant.name: s.deleting for s in await d.tenants.list_tenants()}
    assert listed[doomed.name] is True
    with pytest.raises(TenantDeletingError):
        await d.tenants.create_key(doomed)

    outcome = await d.deletion().delete(doomed.name)
    assert outcome.receipt is not None, outcome.job.error
    assert await d.tenants.salt_epoch(doomed.id) == 1  # rotated once, not again on resume
    assert outcome.job.done == tuple(PurgeStep)
    # Running it again gives the same receipt until it is forgotten.
    assert (await d.deletion().delete(doomed.name)).receipt == outcome.receipt
    public_pem = SigningKeys(d.folder).public_keys()[0]["public_key"].encode()
    assert verify_receipt(outcome.receipt, public_pem).ok
    await d.deletion().forget(outcome)
    assert _naming(await _everything(d.client), doomed.id) == []


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_manages_keys_and_deletes_a_tenant_to_a_verifiable_receipt(
    module_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZUMIK_REDIS_URL", module_redis_url)
    monkeypatch.setenv("ZUMIK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZUMIK_SECRETS_DIR", str(tmp_path / "home-secrets"))
    generate_missing(tmp_path / "home-secrets", environ={})
    name = _name("cli")

    def zumik(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = zumik("tenant", "create", name, "--json")
    assert code == 0
    first = json.loads(out)["api_key"]
    code, out, _ = zumik("tenant", "key", "create", name, "--json")
    assert code == 0
    second = json.loads(out)
    assert second["api_key"].endswith(second["hint"]) and second["key_id"].startswith("key_")
    code, out, _ = zumik("tenant", "key", "list", name, "--json")
    keys = json.loads(out)["keys"]
    assert code == 0 and {k["key_id"] for k in keys} == {key_id_of(hash_api_key(first)), second["key_id"]}
    assert first not in out and second["api_key"] not in out
    code, _, _ = zumik("tenant", "key", "revoke", name, second["key_id"])
    assert code == 0
    code, _, err = zumik("tenant", "key", "revoke", name, second["key_id"])
    assert code == 1 and "has no key" in err
    code, _, err = zumik("tenant", "key", "revoke", name, "not-a-key-id")
    assert code == 2 and "key_0123456789abcdef" in err
    code, _, err = zumik("tenant", "key", "list", "no-such-tenant")
    assert code == 1 and "zumik tenant list" in err
    code, out, _ = zumik("tenant", "list", "--json")
    assert name in [t["tenant"] for t in json.loads(out)["tenants"]]

    code, _, err = zumik("tenant", "delete", name)
    assert code == 2 and "--yes" in err
    # A named cluster that does not answer stops the deletion before anything is revoked: a sweep
    # of this machine alone would leave the other nodes' KV blocks behind.
    nobody = f"127.0.0.1:{free_port()}"
    code, _, err = zumik("tenant", "delete", name, "--yes", "--ray-address", nobody)
    assert code == 1 and f"no Ray cluster answers at {nobody}" in err and "--ray-address" in err
    code, out, _ = zumik("tenant", "key", "list", name, "--json")
    assert code == 0 and len(json.loads(out)["keys"]) == 1
    receipt_file = tmp_path / "receipt.json"
    code, _, err = zumik("tenant", "delete", name, "--yes", "--receipt-out", str(receipt_file))
    assert code == 0, err
    assert "swept on this machine only" in " ".join(err.split())  # no cluster named, none running
    public = SigningKeys(tmp_path / "home-secrets").public_keys()[0]["public_key"]
    (tmp_path / "public.pem").write_text(public)
    code, out, _ = zumik("receipt", "verify", str(receipt_file), "--public-key", str(tmp_path / "public.pem"))
    assert code == 0 and out.startswith("OK")
    code, out, _ = zumik("tenant", "list", "--json")
    assert name not in [t["tenant"] for t in json.loads(out)["tenants"]]
    code, _, err = zumik("tenant", "delete", name, "--yes")
    assert code == 1 and "no tenant is named" in err
    code, _, _ = zumik("tenant", "create", name)  # the name is free
    assert code == 0


def test_the_ray_address_of_a_running_stack_is_found_and_forgotten(tmp_path: Path) -> None:
    """`zumik tenant delete` joins the cluster ``RAY_ADDRESS`` names, else the one a running
    stack of the home recorded; a record whose process is gone is not read."""
    home = ZumikHome(tmp_path / "home")
    assert running_ray_address(home, environ={}) is None
    record_ray_address(home, "10.0.0.5:6379")
    assert running_ray_address(home, environ={}) == "10.0.0.5:6379"
    assert running_ray_address(home, environ={"RAY_ADDRESS": "10.0.0.9:6379"}) == "10.0.0.9:6379"
    (home.run_dir / "ray.json").write_text(json.dumps({"address": "10.0.0.5:6379", "pid": _ended_pid()}))
    assert running_ray_address(home, environ={}) is None
    record_ray_address(home, "10.0.0.5:6379")
    forget_ray_address(home)
    assert running_ray_address(home, environ={}) is None


def _ended_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_tenant_deletion_sweeps_the_nodes_host_tier_folder_every_engine_writes(tmp_path: Path) -> None:
    """`zumik tenant delete` reaches the host tier where the engines' connector writes it (the
    node's shared folder, ``kvstore.tiers.build.host_tier_root``): a block stored there by an
    engine's tier is gone after the deletion's tiers sweep the scope; another scope's stays."""
    import secrets as token_source

    from kvstore.tier import BlockAddress
    from kvstore.tiers.build import build_tiers
    from profiles import load_builtin
    from zumik_serve.tenancy.tenant_cli import deletion_tiers

    profile = load_builtin("local-cpu")
    assert profile.kv_tiers.host_capacity_bytes > 0
    (engine_host, *_) = build_tiers({"host_capacity_bytes": profile.kv_tiers.host_capacity_bytes})
    digest, mine, other = "d" * 64, f"scope-{token_source.token_hex(6)}", f"scope-{token_source.token_hex(6)}"
    ours, theirs = BlockAddress(digest, "k" * 32, mine), BlockAddress(digest, "k" * 32, other)  # type: ignore[arg-type]
    assert engine_host.store(ours, b"block") and engine_host.store(theirs, b"block")
    try:
        tiers, _ = deletion_tiers(profile, redis_url="redis://unused", home_root=tmp_path)
        host = [tier for tier in tiers if tier.tier is engine_host.tier]
        assert len(host) == 1 and host[0].remove_scope(mine) == 1  # type: ignore[arg-type]
        assert engine_host.contains([ours, theirs]) == [False, True]
    finally:
        engine_host.remove_scope(other)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("dev-only-key", "12 characters, fewer than 32"),
        ("change-me-change-me-change-me-change-me", "different characters, fewer than 12"),
    ],
)
def test_a_guessable_dev_key_stops_the_start_before_anything_runs(
    key: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dev key opens the whole API on every port the app listens on (replica ports on all
    interfaces with the HAProxy ingress): `zumik serve` with a guessable one stops at once, saying
    how to make a random one, before it starts Redis or Ray (nothing is created in its home); the
    app's build refuses it too (a Serve config's `ZUMIK_DEV_KEY`)."""
    from zumik_serve.app.application import build_serve_app

    monkeypatch.setenv("ZUMIK_DEV_KEY", key)
    monkeypatch.setenv("ZUMIK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ZUMIK_REDIS_URL", raising=False)
    assert main(["serve", "--port", str(free_port())]) == 1
    message = " ".join(capsys.readouterr().err.split())
    assert "Zumik did not start: ZUMIK_DEV_KEY is too weak" in message and why in message
    assert "secrets.token_hex(16)" in message and not (tmp_path / "home").exists()
    with pytest.raises(ValueError, match="ZUMIK_DEV_KEY is too weak"):
        build_serve_app(
            load_builtin("local-cpu"), model_dir=tmp_path, redis_url="redis://127.0.0.1:1", dev_key=key,
            home=ZumikHome(tmp_path), kv_redis_url="redis://127.0.0.1:1",
        )  # fmt: skip
    check_dev_key("zk-dev-" + "0123456789abcdef" * 2)  # a random hex key passes
    check_dev_key(None)
