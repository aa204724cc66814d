"""The Redis commands one request costs, watched from Redis itself (``MONITOR``), through the real
HTTP app in process (real Redis, the shared FakeEngine).

Each round trip costs the gateway a fixed slice of CPU whatever it carries (docs/benchmarks.md),
so the commands a request sends are part of what it costs; a change that adds one fails here.

Invariants held here:
- a plain /v1 chat completion (no snapshot, no session) sends exactly two commands before its
  answer, one script each: the release lookup, which reads the tenant's salt epoch and takes the
  rate admission too; the decision record's save, which writes the rate settlement too. The
  reuse ledger's write follows the answer;
- a stream sends the same two; its rate settlement, when the engine reports usage at the end,
  is one more;
- after a purge moved the tenant's salt epoch on, the admission the lookup carried (its scope
  the old epoch's) is not taken there: the request admits on its own, under the new scope, once;
- a request with a session admits on its own after the lookup (the session's check may refuse
  it: nothing is counted then);
- authenticating a key the gateway has not cached is one command; a cached key, none.

Not counted: a pooled connection's handshake (when the pool grows) and the ping that checks a
connection idle for 2 s; neither comes with every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from kvstore.keys import scope_id
from kvstore.tiers.redis_tier import scope_limit_key
from tests.support.inprocess import InProcessGateway, make_gateway, wait_until
from zumik_serve.qos.store import RATE_ADMIT, RATE_REFUND, RATE_SETTLE
from zumik_serve.reuse.store import ADD
from zumik_serve.routing.store import LOOKUP, SAVE
from zumik_serve.store.client import gateway_client
from zumik_serve.store.local_redis import LocalRedis
from zumik_serve.tenancy.store import TENANT_FOR_KEY, RedisTenantStore
from zumik_serve.tenancy.tenant import Authenticator, cache_salt

pytestmark = pytest.mark.redis

CHAT = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
SCRIPTS = {
    hashlib.sha1(source.encode()).hexdigest(): name
    for name, source in [
        ("LOOKUP", LOOKUP), ("RATE_ADMIT", RATE_ADMIT), ("SAVE", SAVE), ("RATE_SETTLE", RATE_SETTLE),
        ("LEDGER_ADD", ADD), ("TENANT_FOR_KEY", TENANT_FOR_KEY), ("RATE_REFUND", RATE_REFUND),
    ]
}  # fmt: skip
NOT_PER_REQUEST = {"HELLO", "CLIENT", "AUTH", "PING"}  # a new connection's handshake; an idle one's check
END = "zumik-test-end"


@dataclass(frozen=True)
class Command:
    """A command a client sent: its name (a script's: the constant it runs) and its keys."""

    name: str
    keys: tuple[str, ...] = ()


@pytest.fixture
async def gateway(module_redis: LocalRedis, tiny_model_dir: Path) -> InProcessGateway:
    gateway = make_gateway(module_redis.url, tiny_model_dir)
    async with gateway.client() as http:  # the served model's alias published, scripts loaded
        for body in (CHAT, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}):
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    return gateway


@contextlib.asynccontextmanager
async def watching(server: LocalRedis) -> AsyncIterator[list[Command]]:
    """Every command clients send while the block runs, in the order Redis ran them (a script's
    own commands left out); complete when the block ends."""
    admin = aioredis.from_url(server.admin_url)
    seen: list[Command] = []
    ended = asyncio.Event()
    try:
        async with admin.monitor() as monitor:

            async def read() -> None:
                while True:
                    command = _command(await monitor.next_command())
                    if command is not None and command.name == "ECHO":
                        ended.set()
                        return
                    if command is not None:
                        seen.append(command)

            reading = asyncio.create_task(read())
            try:
                yield seen
                await admin.echo(END)  # on another connection: Redis shows it after the block's
                await asyncio.wait_for(ended.wait(), timeout=10)
            finally:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
    finally:
        await admin.aclose()


def _command(info: Any) -> Command | None:
    if info["client_type"] == "lua":
        return None
    parts = info["command"].split(" ")
    name = parts[0].upper()
    if name in NOT_PER_REQUEST:
        return None
    if name == "EVALSHA":
        return Command(SCRIPTS.get(parts[1], parts[1]), tuple(parts[3 : 3 + int(parts[2])]))
    return Command(name, tuple(parts[1:2]))


def names(commands: list[Command]) -> list[str]:
    return [command.name for command in commands]


async def _new_tenant(gateway: InProcessGateway, prefix: str) -> tuple[str, str]:
    """A new tenant's API key and id."""
    key = await gateway.create_tenant(f"{prefix}-{uuid.uuid4().hex[:12]}")
    return key, (await gateway.pipeline.authenticate(f"Bearer {key}")).id


async def _ledger_written(seen: list[Command]) -> None:
    await wait_until(lambda: _true("LEDGER_ADD" in names(seen)), what="the reuse ledger's write")


async def test_a_plain_chat_completion_sends_two_commands_then_the_ledgers_write(
    gateway: InProcessGateway, module_redis: LocalRedis
) -> None:
    async with gateway.client() as http, watching(module_redis) as seen:
        response = await http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
        await _ledger_written(seen)
    assert names(seen) == ["LOOKUP", "SAVE", "LEDGER_ADD"]
    lookup, save, _ = seen
    assert lookup.keys[0] == "zumik:salt-epoch:ten_dev" and lookup.keys[1].endswith(":alias:zumik-tiny")
    assert save.keys[-1] == lookup.keys[2] == "z:{ten_dev}:rate"  # the engine reported usage: settled


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_sends_the_same_two_and_settles_at_its_end_on_the_engines_usage(
    gateway: InProcessGateway, module_redis: LocalRedis, include_usage: bool
) -> None:
    """Whether the client asked for the usage or not, the engine sends it, and the rate
    settles on it (it once kept the reservation of a stream whose client did not ask)."""
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": include_usage}}
    async with gateway.client() as http, watching(module_redis) as seen:
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        await _ledger_written(seen)
    assert ('"usage":{' in response.text) is include_usage  # the client sees it only when asked
    assert names(seen) == ["LOOKUP", "SAVE", "RATE_SETTLE", "LEDGER_ADD"]
    assert not any(key.endswith(":rate") for key in seen[1].keys)  # the usage comes after the save


async def test_after_a_purge_moved_the_salt_epoch_the_request_admits_on_its_own_under_the_new_scope(
    gateway: InProcessGateway, module_redis: LocalRedis
) -> None:
    key, tenant = await _new_tenant(gateway, "epoch")
    client = gateway_client(module_redis.url)
    try:
        async with gateway.client(key) as http:
            for _ in range(2):  # the second: after a purge (RATE_ADMIT's script loaded here)
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
                epoch = await RedisTenantStore(client).rotate_salt_epoch(tenant)
            async with watching(module_redis) as seen:
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
                await wait_until(lambda: _true(names(seen).count("LEDGER_ADD") == 2), what="the ledger")
        counted = await client.hget(f"z:{{{tenant}}}:rate", "requests")
    finally:
        await client.aclose()
    per_request = [name for name in names(seen) if name != "LEDGER_ADD"]
    assert per_request == ["LOOKUP", "RATE_ADMIT", "SAVE", "LOOKUP", "SAVE"]  # the new epoch, then known
    secret = await gateway.context.salts.secret()
    new_scope = scope_id(cache_salt(secret, tenant, epoch))
    assert seen[1].keys[2] == seen[3].keys[-1] == scope_limit_key(new_scope)
    assert int(counted or 0) == 4  # each request counted once


async def test_a_request_with_a_session_admits_after_its_check_and_a_refused_one_counts_nothing(
    gateway: InProcessGateway, module_redis: LocalRedis
) -> None:
    key, tenant = await _new_tenant(gateway, "session")
    async with gateway.client(key) as http:
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        async with watching(module_redis) as seen:
            answered = await http.post(
                "/v1/chat/completions", json=CHAT, headers={"x-zumik-session": session}
            )
            unknown = await http.post(
                "/v1/chat/completions", json=CHAT, headers={"x-zumik-session": "ses_nope"}
            )
    assert answered.status_code == 200 and unknown.status_code == 404
    lookups = [command for command in seen if command.name == "LOOKUP"]
    assert len(lookups) == 2 and all(len(lookup.keys) == 2 for lookup in lookups)  # no admission in them
    assert names(seen).count("RATE_ADMIT") == 1  # the answered request's, after its session's check
    client = gateway_client(module_redis.url)
    try:
        assert await client.hget(f"z:{{{tenant}}}:rate", "requests") == b"1"
    finally:
        await client.aclose()


async def test_an_unknown_model_takes_back_the_admission_its_lookup_counted(
    gateway: InProcessGateway, module_redis: LocalRedis
) -> None:
    key, tenant = await _new_tenant(gateway, "unknown")
    async with gateway.client(key) as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        unknown = {**CHAT, "model": "gpt-nope"}
        assert (await http.post("/v1/chat/completions", json=unknown)).status_code == 404  # scripts loaded
        async with watching(module_redis) as seen:
            missing = await http.post("/v1/chat/completions", json=unknown)
    assert missing.status_code == 404, missing.text
    assert names(seen) == ["LOOKUP", "RATE_REFUND"]
    client = gateway_client(module_redis.url)
    try:
        counted = await client.hmget(f"z:{{{tenant}}}:rate", ["requests", "prev_requests"])
    finally:
        await client.aclose()
    assert sum(int(value or 0) for value in counted) == 1  # the answered request only


async def test_authenticating_an_uncached_key_is_one_command_and_a_cached_one_none(
    gateway: InProcessGateway, module_redis: LocalRedis
) -> None:
    client = gateway_client(module_redis.url)
    try:
        store = RedisTenantStore(client)
        key = await gateway.create_tenant("round-trips")
        now = [0.0]
        authenticator = Authenticator(store, clock=lambda: now[0])  # nothing expires until now moves
        assert await authenticator.authenticate("Bearer zk-unknown") is None  # its script loaded
        async with watching(module_redis) as seen:
            first = await authenticator.authenticate(f"Bearer {key}")
            again = await authenticator.authenticate(f"Bearer {key}")
            unknown = await authenticator.authenticate("Bearer zk-unknown")  # known to be unknown
            other = await authenticator.authenticate("Bearer zk-other-unknown")
            now[0] = 1.5  # past the unknown keys' second
            later = await authenticator.authenticate("Bearer zk-unknown")
    finally:
        await client.aclose()
    assert first is not None and first == again and first.name == "round-trips"
    assert unknown is None and other is None and later is None
    # The key, once; the other unknown key; the first unknown key again once its second is over.
    assert names(seen) == ["TENANT_FOR_KEY", "TENANT_FOR_KEY", "TENANT_FOR_KEY"]


async def _true(value: bool) -> bool:
    return value


async def test_a_new_gateway_connection_costs_one_command_and_no_error(module_redis: LocalRedis) -> None:
    """Redis 7.0 answers ``CLIENT SETINFO`` and ``CLIENT MAINT_NOTIFICATIONS`` with errors: the
    gateway's client sends neither (wasted commands, and errors a cut-off handshake would leave
    for the connection's next command). ``MONITOR`` hides ``CLIENT``, so the server's own error
    count is what tells."""
    admin = aioredis.from_url(module_redis.admin_url)
    client = gateway_client(module_redis.url)
    try:
        await admin.ping()
        errors = sum(entry["count"] for entry in (await admin.info("errorstats")).values())
        assert await client.echo(END) == END.encode()  # a new connection: its handshake, then the echo
        after = sum(entry["count"] for entry in (await admin.info("errorstats")).values())
        assert after == errors
    finally:
        await client.aclose()
        await admin.aclose()
