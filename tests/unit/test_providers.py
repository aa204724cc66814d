"""The provider adapter against a real HTTP server (the fault server), and BYOK key storage.

Invariants held here:
- every failure is one ProviderFailure with the outcome the router acts on: 429 → rate_limited
  (Retry-After parsed), 5xx → server_error, no answer in time → timeout, nothing listening →
  connect_error, other 4xx → client_error;
- cached_tokens is None when the provider did not report it, the reported int otherwise (0 is 0);
- the API key appears in no failure message and no repr; the body reaches the provider unchanged;
- a stream yields each SSE payload then "[DONE]"; a break before or after the first payload is
  a ProviderFailure; lines split on CR and LF only, so a payload holding U+2028, U+2029 or
  U+0085 raw arrives whole;
- a sealed BYOK key opens only for its tenant and route; Redis never holds the plaintext key;
- the key index reads back as typed values, entries written by the version before included;
- a BYOK body is exactly ``{"api_key": <1-512 characters>}``; anything else is a 400 naming
  ``api_key`` whose message, and whatever the parsed body prints, never holds the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from tests.support.fault_server import Fault, FaultServer
from zumik_serve.errors import InvalidRequestError
from zumik_serve.providers.byok import KeyVault, SealedKeyError, mask
from zumik_serve.providers.openai_http import (
    OpenAICompatProvider,
    ProviderFailure,
    ProviderOutcome,
    ProviderReply,
    parse_retry_after,
    prompt_cache_key_for,
)
from zumik_serve.providers.requests import MAX_API_KEY_CHARS, ByokKeyBody
from zumik_serve.providers.sse import sse_lines, sse_lines_sync
from zumik_serve.providers.store import ByokKeyInfo, RedisByokStore, tag_untagged_keys
from zumik_serve.server_secrets import generate_missing, read_byok_master_key
from zumik_serve.store.local_redis import LocalRedis, free_port

API_KEY = "sk-test-" + "a1b2c3d4e5f6" * 3 + "wxyz"
CHAT_BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as running:
        yield running


@pytest.fixture
async def provider(server: FaultServer) -> AsyncIterator[OpenAICompatProvider]:
    adapter = OpenAICompatProvider("fault", server.base_url, timeout_s=5.0)
    yield adapter
    await adapter.aclose()


async def _failure(provider: OpenAICompatProvider, body: dict[str, object] = CHAT_BODY) -> ProviderFailure:
    with pytest.raises(ProviderFailure) as caught:
        await provider.complete("/chat/completions", body, api_key=API_KEY)
    return caught.value


# -- failures ------------------------------------------------------------------------------


async def test_rate_limited_when_429_with_retry_after_parsed(
    server: FaultServer, provider: OpenAICompatProvider
) -> None:
    server.script([Fault.status(429, retry_after_s=7, message="slow down")])
    failure = await _failure(provider)
    assert failure.outcome is ProviderOutcome.RATE_LIMITED
    assert (failure.status, failure.retry_after_s) == (429, 7)
    assert "slow down" in failure.message


async def test_server_error_when_500(server: FaultServer, provider: OpenAICompatProvider) -> None:
    server.script([Fault.status(500), Fault.status(503, message="overloaded")])
    first, second = await _failure(provider), await _failure(provider)
    assert (first.outcome, first.status, first.retry_after_s) == (ProviderOutcome.SERVER_ERROR, 500, None)
    assert second.outcome is ProviderOutcome.SERVER_ERROR and "overloaded" in second.message


async def test_client_error_when_400(server: FaultServer, provider: OpenAICompatProvider) -> None:
    server.script([Fault.status(400, message="bad field")])
    failure = await _failure(provider)
    assert (failure.outcome, failure.status) == (ProviderOutcome.CLIENT_ERROR, 400)


async def test_timeout_when_provider_hangs(server: FaultServer) -> None:
    server.script([Fault.hang(5.0)])
    adapter = OpenAICompatProvider("fault", server.base_url, timeout_s=0.3)
    began = time.monotonic()
    try:
        failure = await _failure(adapter)
    finally:
        await adapter.aclose()
    assert failure.outcome is ProviderOutcome.TIMEOUT and failure.status is None
    assert time.monotonic() - began < 3.0


async def test_connect_error_when_nothing_listens() -> None:
    adapter = OpenAICompatProvider("gone", f"http://127.0.0.1:{free_port()}/v1", timeout_s=2.0)
    try:
        failure = await _failure(adapter)
    finally:
        await adapter.aclose()
    assert failure.outcome is ProviderOutcome.CONNECT_ERROR and failure.status is None


async def test_connect_error_while_refusing_then_recovers(
    server: FaultServer, provider: OpenAICompatProvider
) -> None:
    await provider.complete("/chat/completions", CHAT_BODY, api_key=API_KEY)  # a pooled connection
    server.script([Fault.refuse(0.5)])
    assert not server.is_listening
    failure = await _failure(provider)
    assert failure.outcome is ProviderOutcome.CONNECT_ERROR
    deadline = time.monotonic() + 5
    while not server.is_listening and time.monotonic() < deadline:
        time.sleep(0.05)
    reply = await provider.complete("/chat/completions", CHAT_BODY, api_key=API_KEY)
    assert reply.body["object"] == "chat.completion"


def test_parse_retry_after_seconds_date_and_garbage() -> None:
    assert parse_retry_after("3") == 3
    assert parse_retry_after("1.2") == 2
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now_s=1445412480.0) == 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# -- replies -------------------------------------------------------------------------------


@pytest.mark.parametrize("cached", [None, 0, 42])
async def test_cached_tokens_reported_as_given_and_none_when_missing(
    server: FaultServer, provider: OpenAICompatProvider, cached: int | None
) -> None:
    server.script([Fault.ok(cached_tokens=cached)])
    reply = await provider.complete("/chat/completions", CHAT_BODY, api_key=API_KEY)
    assert reply.cached_tokens == cached
    assert ("prompt_tokens_details" in reply.body["usage"]) is (cached is not None)


async def test_body_reaches_provider_unchanged_with_authorization(
    server: FaultServer, provider: OpenAICompatProvider
) -> None:
    body = {"model": "gpt-test", "prompt": "Once", "max_tokens": 2, "prompt_cache_key": "zk-abc"}
    reply = await provider.complete("/completions", body, api_key=API_KEY)
    assert reply.status == 200 and reply.body["object"] == "text_completion"
    (seen,) = server.requests
    assert seen.path == "/v1/completions" and seen.body == body
    assert seen.has_authorization
    assert seen.authorization_sha256 == hashlib.sha256(API_KEY.encode()).hexdigest()
    assert not any(name.startswith("x-zumik") for name in seen.headers)


async def test_api_key_absent_from_failures_and_reprs(
    server: FaultServer, provider: OpenAICompatProvider
) -> None:
    server.script([Fault.status(401, message=f"Incorrect API key provided: {API_KEY}")])
    failure = await _failure(provider)
    assert failure.outcome is ProviderOutcome.CLIENT_ERROR
    vault = KeyVault(b"k" * 32)
    reply = ProviderReply(200, {"usage": {}}, None)
    texts = [failure.message, str(failure), repr(failure), repr(provider), repr(vault), repr(reply)]
    texts.append(repr(RedisByokStore(aioredis.Redis(), vault)))
    assert all(API_KEY not in text for text in texts)
    assert "[redacted]" in failure.message


async def test_unsupported_path_is_rejected_before_sending(
    server: FaultServer, provider: OpenAICompatProvider
) -> None:
    with pytest.raises(ValueError, match="unsupported path"):
        await provider.complete("/embeddings", CHAT_BODY, api_key=API_KEY)  # type: ignore[arg-type]
    assert server.requests == []


def test_prompt_cache_key_is_stable_short_and_scoped() -> None:
    key = prompt_cache_key_for("ten_a", "digest-1")
    assert key == prompt_cache_key_for("ten_a", "digest-1")
    assert key.startswith("zk-") and len(key) == 35
    assert key != prompt_cache_key_for("ten_b", "digest-1")
    assert key != prompt_cache_key_for("ten_a", "digest-2")
    assert "ten_a" not in key and "digest" not in key


# -- streams -------------------------------------------------------------------------------


async def test_stream_yields_payloads_then_done(server: FaultServer, provider: OpenAICompatProvider) -> None:
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    payloads = [p async for p in provider.stream("/chat/completions", body, api_key=API_KEY)]
    assert payloads[-1] == "[DONE]" and len(payloads) >= 3
    assert all(p.startswith("{") for p in payloads[:-1])
    assert '"usage"' in payloads[-2]


async def _raw_sse_server(body: bytes) -> tuple[asyncio.Server, str]:
    """A loopback HTTP server that answers every request with ``body`` as an event stream, its
    bytes as given (a provider writing JSON with ``ensure_ascii=False``, as vLLM's server does)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def test_a_streamed_payload_holding_unicode_line_separators_arrives_whole() -> None:
    """SSE splits lines on CR and LF only: a payload whose JSON holds U+2028, U+2029 or U+0085
    raw (JSON does not escape them) is one payload, not cut there (httpx's ``aiter_lines``
    splits on them, and the rest of the line was lost). CRLF line ends are read too."""
    payloads = [
        json.dumps({"choices": [{"index": 0, "delta": {"content": f"a{char}b é"}}]}, ensure_ascii=False)
        for char in ("\u2028", "\u2029", "\x85")
    ]
    body = "".join(f"data: {payload}\r\n\r\n" for payload in [*payloads, "[DONE]"]).encode()
    server, base_url = await _raw_sse_server(body)
    adapter = OpenAICompatProvider("raw", base_url, timeout_s=10)
    try:
        got = [
            p
            async for p in adapter.stream("/chat/completions", {**CHAT_BODY, "stream": True}, api_key=API_KEY)
        ]
    finally:
        await adapter.aclose()
        server.close()
        await server.wait_closed()
    assert got == [*payloads, "[DONE]"]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 64])
async def test_sse_lines_split_on_cr_and_lf_only_wherever_the_chunks_break(cut: int) -> None:
    stream = "data: a\u2028b\x85c\r\n\r\ndata: é\rdata: x\n\nlast".encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(stream), cut):
            yield stream[start : start + cut]

    pieces = [stream[start : start + cut] for start in range(0, len(stream), cut)]
    want = ["data: a\u2028b\x85c", "", "data: é", "data: x", "", "last"]
    assert [line async for line in sse_lines(chunks())] == want
    assert list(sse_lines_sync(pieces)) == want  # the blocking twin the integration tests read with


async def test_stream_failure_before_first_payload(
    server: FaultServer, provider: OpenAICompatProvider
) -> None:
    server.script([Fault.status(429, retry_after_s=2)])
    with pytest.raises(ProviderFailure) as caught:
        async for _ in provider.stream("/chat/completions", {**CHAT_BODY, "stream": True}, api_key=API_KEY):
            pytest.fail("no payload expected")
    assert (caught.value.outcome, caught.value.retry_after_s) == (ProviderOutcome.RATE_LIMITED, 2)


async def test_stream_broken_after_first_payload(server: FaultServer, provider: OpenAICompatProvider) -> None:
    server.script([Fault.break_stream(after_chunks=2)])
    received: list[str] = []
    with pytest.raises(ProviderFailure) as caught:
        async for payload in provider.stream(
            "/chat/completions", {**CHAT_BODY, "stream": True}, api_key=API_KEY
        ):
            received.append(payload)
    assert len(received) == 2
    assert caught.value.outcome is ProviderOutcome.SERVER_ERROR and API_KEY not in caught.value.message


async def test_stream_timeout_between_chunks_and_early_close(
    server: FaultServer, provider: OpenAICompatProvider
) -> None:
    server.script([Fault.hang(5.0)])
    adapter = OpenAICompatProvider("fault", server.base_url, timeout_s=0.3)
    try:
        with pytest.raises(ProviderFailure) as caught:
            async for _ in adapter.stream(
                "/completions", {"model": "m", "prompt": "x", "stream": True}, api_key="k"
            ):
                pass
    finally:
        await adapter.aclose()
    assert caught.value.outcome is ProviderOutcome.TIMEOUT
    stream = provider.stream("/completions", {"model": "m", "prompt": "x", "stream": True}, api_key=API_KEY)
    first = await anext(stream)
    await stream.aclose()  # closing early releases the response
    assert first.startswith("{")


# -- BYOK ----------------------------------------------------------------------------------


def test_byok_seal_open_round_trip_and_wrong_owner_fails() -> None:
    vault = KeyVault(b"m" * 32)
    sealed = vault.seal("ten_a", "openai", API_KEY)
    assert API_KEY.encode() not in sealed
    assert vault.open("ten_a", "openai", sealed) == API_KEY
    for tenant, route in [("ten_b", "openai"), ("ten_a", "anthropic")]:
        with pytest.raises(SealedKeyError):
            vault.open(tenant, route, sealed)
    with pytest.raises(SealedKeyError):
        KeyVault(b"n" * 32).open("ten_a", "openai", sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealedKeyError):
        vault.open("ten_a", "openai", tampered)
    with pytest.raises(ValueError):
        KeyVault(b"short")


def test_mask_shows_prefix_and_tail_only() -> None:
    assert mask("sk-proj-abcdefghijklmnop1234") == "sk-…1234"
    assert mask("sk-short") == "sk-…"
    assert mask("plainkeywithoutdash1234") == "…1234"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.redis
async def test_byok_store_round_trip_without_plaintext_in_redis(redis_url: str, tmp_path: Path) -> None:
    client = aioredis.from_url(redis_url)
    try:
        generate_missing(tmp_path / "secrets", environ={})
        master = read_byok_master_key(tmp_path / "secrets", environ={})
        store = RedisByokStore(client, KeyVault(master))
        stored = await store.put("ten_a", "openai", API_KEY)
        await store.put("ten_a", "groq", "gsk_" + "z" * 40)
        assert await store.get("ten_a", "openai") == API_KEY
        assert await store.get("ten_b", "openai") is None
        described = await store.describe("ten_a")
        assert [item.route for item in described] == ["groq", "openai"]
        assert described[1] == stored  # put answers what describe lists
        assert stored.key_hint == "sk-…wxyz" and stored.updated_at > 0
        assert stored.to_json() == {
            "route": "openai",
            "key_hint": "sk-…wxyz",
            "updated_at": stored.updated_at,
        }

        dump = b""
        async for key in client.scan_iter():
            kind = await client.type(key)
            if kind == b"string":
                dump += key + b"=" + await client.get(key) + b"\n"
            else:
                for field, value in (await client.hgetall(key)).items():
                    dump += key + b"." + field + b"=" + value + b"\n"
        assert b"z:{ten_a}:byok:openai" in dump and b"z:{ten_a}:byok-index" in dump
        assert API_KEY.encode() not in dump and API_KEY[:-4].encode() not in dump
        assert master not in dump  # the master key is a file, never in Redis
        # One tenant's BYOK keys share a Redis Cluster slot (the {tenant} hash tag).
        assert len({key_slot(key) async for key in client.scan_iter(match="z:*ten_a*")}) == 1

        sealed = await client.get("z:{ten_a}:byok:openai")
        assert isinstance(sealed, bytes)
        await client.set("z:{ten_b}:byok:openai", sealed)  # copied to another tenant: does not open
        with pytest.raises(SealedKeyError):
            await store.get("ten_b", "openai")

        assert await store.delete("ten_a", "openai") is True
        assert await store.delete("ten_a", "openai") is False
        assert await store.get("ten_a", "openai") is None
        assert [item.route for item in await store.describe("ten_a")] == ["groq"]
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_byok_index_written_before_reads_back(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        store = RedisByokStore(client, KeyVault(b"m" * 32))
        # json.dumps' defaults, as the version before wrote entries (the ellipsis escaped)
        entry = '{"key_hint": "sk-\\u2026wxyz", "updated_at": 17}'
        await client.hset("z:{ten_a}:byok-index", "openai", entry)
        assert await store.describe("ten_a") == [
            ByokKeyInfo(route="openai", key_hint="sk-…wxyz", updated_at=17)
        ]
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_byok_keys_stored_without_the_hash_tag_move_under_it(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        vault = KeyVault(b"m" * 32)
        store = RedisByokStore(client, vault)
        # The names the version before wrote: no {tenant} hash tag.
        await client.set("z:ten_a:byok:openai", vault.seal("ten_a", "openai", API_KEY))
        await client.set("z:ten_a:byok:groq", vault.seal("ten_a", "groq", "gsk_old" + "o" * 20))
        await client.hset("z:ten_a:byok-index", mapping={
            "openai": '{"key_hint": "sk-\\u2026wxyz", "updated_at": 17}',
            "groq": '{"key_hint": "gsk_old\\u2026", "updated_at": 18}',
        })  # fmt: skip
        await client.set("z:other:thing", "kept")  # not a BYOK key
        assert await store.get("ten_a", "openai") is None  # the old names are not read
        # The tenant set its groq key again under the new name before the migration: that one wins.
        await store.put("ten_a", "groq", "gsk_new" + "n" * 20)

        assert await tag_untagged_keys(client) == 3
        assert await store.get("ten_a", "openai") == API_KEY
        assert await store.get("ten_a", "groq") == "gsk_new" + "n" * 20
        described = {item.route: item for item in await store.describe("ten_a")}
        assert described["openai"] == ByokKeyInfo(route="openai", key_hint="sk-…wxyz", updated_at=17)
        assert described["groq"].key_hint == mask("gsk_new" + "n" * 20)  # the newer entry
        assert await client.exists("z:ten_a:byok:openai", "z:ten_a:byok:groq", "z:ten_a:byok-index") == 0
        assert await client.get("z:other:thing") == b"kept"
        assert await tag_untagged_keys(client) == 0  # run again: nothing left to move
    finally:
        await client.aclose()


def test_byok_body_takes_exactly_an_api_key() -> None:
    body = ByokKeyBody.parse({"api_key": API_KEY})
    assert body.api_key.get_secret_value() == API_KEY
    assert API_KEY not in repr(body) and API_KEY not in str(body)
    assert ByokKeyBody.parse({"api_key": "k" * MAX_API_KEY_CHARS}).api_key.get_secret_value() == "k" * 512


@pytest.mark.parametrize(
    "body",
    [{}, {"key": API_KEY}, {"api_key": API_KEY, "extra": 1}, {"api_key": ""}, {"api_key": 42},
     {"api_key": None}, {"api_key": API_KEY + "x" * MAX_API_KEY_CHARS}],
)  # fmt: skip
def test_byok_body_refusals_name_api_key_and_never_echo_it(body: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        ByokKeyBody.parse(body)
    error = caught.value
    assert error.status == 400 and error.param == "api_key"
    assert error.message == 'send {"api_key": "<your provider key>"} (1-512 characters).'
    assert error.__context__ is None and error.__cause__ is None  # no chained error holds the key
    assert API_KEY not in str(error)
