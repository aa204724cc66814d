"""The Redis commands one request costs, watched from Redis itself (``MONITOR``), through the real
HTTP app in process (real Redis, the shared FakeEngine).

Each round trip costs the gateway a fixed slice of CPU whatever it carries (docs/benchmarks.md),
so the commands a request sends are part of what it costs; a change that adds one fails here.

Invariants held here:
- a plain /v1 chat completion (no snapshot, no session) sends exactly three commands before its
  answer, one script each: the release lookup, which reads the tenant's salt epoch too; the rate
  admission; the decision record's save, which writes the rate settlement too. The reuse
  ledger's write follows the answer;
- a stream sends the same three; its rate settlement, when the engine reports usage at the end,
  is one more;
- authenticating a key the gateway has not cached is one command; a cached key, none.

Not counted: a pooled connection's handshake (when the pool grows) and the ping that checks a
connection idle for 2 s; neither comes with every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.support.inprocess import InProcessGateway, make_gateway, wait_until
from zumik_serve.qos.store import RATE_ADMIT, RATE_SETTLE
from zumik_serve.reuse.store import ADD
from zumik_serve.routing.store import LOOKUP, SAVE
from zumik_serve.store.client import gateway_client
from zumik_serve.store.local_redis import LocalRedis
from zumik_serve.tenancy.store import TENANT_FOR_KEY, RedisTenantStore
from zumik_serve.tenancy.tenant import Authenticator

pytestmark = pytest.mark.redis

CHAT = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
SCRIPTS = {
    hashlib.sha1(source.encode()).hexdigest(): name
    for name, source in [
        ("LOOKUP", LOOKUP), ("RATE_ADMIT", RATE_ADMIT), ("SAVE", SAVE), ("RATE_SETTLE", RATE_SETTLE),
        ("LEDGER_ADD", ADD), ("TENANT_FOR_KEY", TENANT_FOR_KEY),
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


async def _ledger_written(seen: list[Command]) -> None:
    await wait_until(lambda: _true("LEDGER_ADD" in names(seen)), what="the reuse ledger's write")


async def test_a_plain_chat_completion_sends_three_commands_then_the_ledgers_write(
    gateway: InProcessGateway, module_redis: LocalRedis
) -> None:
    async with gateway.client() as http, watching(module_redis) as seen:
        response = await http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
        await _ledger_written(seen)
    assert names(seen) == ["LOOKUP", "RATE_ADMIT", "SAVE", "LEDGER_ADD"]
    lookup, admit, save, _ = seen
    assert lookup.keys[0] == "zumik:salt-epoch:ten_dev" and lookup.keys[1].endswith(":alias:zumik-tiny")
    assert save.keys[-1] == admit.keys[0] == "z:{ten_dev}:rate"  # the engine reported usage: settled


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_sends_the_same_three_and_settles_at_its_end_when_usage_comes(
    gateway: InProcessGateway, module_redis: LocalRedis, include_usage: bool
) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": include_usage}}
    async with gateway.client() as http, watching(module_redis) as seen:
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        await _ledger_written(seen)
    settled = ["RATE_SETTLE"] if include_usage else []
    assert names(seen) == ["LOOKUP", "RATE_ADMIT", "SAVE", *settled, "LEDGER_ADD"]
    assert not any(key.endswith(":rate") for key in seen[2].keys)  # the usage comes after the save


async def test_authenticating_an_uncached_key_is_one_command_and_a_cached_one_none(
    gateway: InProcessGateway, module_redis: LocalRedis
) -> None:
    client = gateway_client(module_redis.url)
    try:
        store = RedisTenantStore(client)
        key = await gateway.create_tenant("round-trips")
        authenticator = Authenticator(store, clock=lambda: 0.0)  # a cached key never expires here
        assert await authenticator.authenticate("Bearer zk-unknown") is None  # its script loaded
        async with watching(module_redis) as seen:
            first = await authenticator.authenticate(f"Bearer {key}")
            again = await authenticator.authenticate(f"Bearer {key}")
            unknown = await authenticator.authenticate("Bearer zk-unknown")
    finally:
        await client.aclose()
    assert first is not None and first == again and first.name == "round-trips"
    assert unknown is None
    assert names(seen) == ["TENANT_FOR_KEY", "TENANT_FOR_KEY"]  # the key, once; the unknown key


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
