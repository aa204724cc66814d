"""QoS classes, backpressure, deadlines, input limits and request telemetry on the real stack
(Ray Serve + vLLM on CPU + Redis), through the official client where /v1 is involved.

The shared stack's profile (local-cpu) gives ``batch`` 2 running and 8 queued slots per gateway,
so a burst of 10x that capacity must be answered with 429s, never a 5xx or a reset.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from profiles import load_builtin
from profiles.model import QosClass
from tests.integration.conftest import RunningStack
from zumik_serve.providers.sse import sse_lines_sync

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

PROFILE = load_builtin("local-cpu")
BATCH = PROFILE.qos.classes[QosClass.BATCH]
CAPACITY = BATCH.max_running + BATCH.max_queued
ERROR_KEYS = {"message", "type", "param", "code"}


def chat(model: str, content: str = "Say something.", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 16, **extra}


def assert_openai_error(response: httpx.Response, status: int, type_: str) -> dict[str, object]:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == type_, error
    assert len(response.content) <= 8192
    return error


def test_qos_class_is_taken_from_the_header_and_echoed(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=running_stack.model, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-zumik-qos": "interactive"},
    )  # fmt: skip
    assert raw.headers["x-zumik-qos"] == "interactive"
    assert raw.parse().choices[0].message.content is not None
    default = client.chat.completions.with_raw_response.create(
        model=running_stack.model, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    )
    assert default.headers["x-zumik-qos"] == "standard"


def test_unknown_class_is_400_and_a_class_outside_the_policy_is_403(
    http: httpx.Client, running_stack: RunningStack
) -> None:
    error = assert_openai_error(
        http.post("/v1/chat/completions", json=chat(running_stack.model), headers={"x-zumik-qos": "urgent"}),
        400, "invalid_request_error",
    )  # fmt: skip
    assert error["param"] == "x-zumik-qos"
    key = asyncio.run(_tenant(running_stack.redis_url, "batchonly", frozenset({"batch"})))
    with httpx.Client(
        base_url=running_stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as other:
        denied = other.post(
            "/v1/chat/completions", json=chat(running_stack.model), headers={"x-zumik-qos": "interactive"}
        )
        assert "batch" in str(assert_openai_error(denied, 403, "permission_error")["message"])
        allowed = other.post("/v1/chat/completions", json=chat(running_stack.model))
        assert allowed.status_code == 200 and allowed.headers["x-zumik-qos"] == "batch"
        native = other.post("/v2/generate", json={"input": "hi", "max_tokens": 4, "qos": "standard"})
        assert native.status_code == 403 and native.json()["error"]["type"] == "permission_error"


async def _tenant(redis_url: str, name: str, qos: frozenset[str]) -> str:
    import redis.asyncio as aioredis

    from zumik_serve.tenancy.store import RedisTenantStore

    client = aioredis.from_url(redis_url)
    try:
        _, key = await RedisTenantStore(client).create_tenant(name, qos_classes=qos)
    finally:
        await client.aclose()
    return key


def test_a_burst_of_ten_times_capacity_gets_429s_never_5xx(running_stack: RunningStack) -> None:
    results = asyncio.run(_burst(running_stack, 10 * CAPACITY))
    statuses = [status for status, _, _, _ in results]
    print(f"burst of {len(results)} batch requests (capacity {CAPACITY}): "
          f"{statuses.count(200)} x 200, {statuses.count(429)} x 429")  # fmt: skip
    assert set(statuses) <= {200, 429}, sorted(set(statuses))  # no 5xx, no reset (-1)
    assert statuses.count(429) >= 1 and statuses.count(200) >= BATCH.max_running
    for status, headers, body, _ in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            error = json.loads(body)["error"]
            assert set(error) == ERROR_KEYS and error["type"] == "rate_limit_error"
            assert error["code"] == "overloaded"
        else:
            assert json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")
    rejects = sorted(elapsed for status, _, _, elapsed in results if status == 429)
    print(f"time to reject: p50 {rejects[len(rejects) // 2] * 1000:.1f} ms, "
          f"max {rejects[-1] * 1000:.1f} ms")  # fmt: skip


async def _burst(stack: RunningStack, n: int) -> list[tuple[int, dict[str, str], bytes, float]]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    headers = {"Authorization": f"Bearer {stack.tenant_key}", "x-zumik-qos": "batch"}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, limits=limits, timeout=120) as client:

        async def one(index: int) -> tuple[int, dict[str, str], bytes, float]:
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/chat/completions", json=chat(stack.model, f"Count to {index}.", max_tokens=200)
                )
            except httpx.HTTPError as exc:  # a reset or a refused connection: never acceptable
                return -1, {}, repr(exc).encode(), time.perf_counter() - started
            return (
                response.status_code,
                dict(response.headers),
                response.content,
                time.perf_counter() - started,
            )

        async def models_during_burst() -> int:
            await asyncio.sleep(0.2)
            response = await client.get("/v1/models")
            return response.status_code

        *results, models_status = await asyncio.gather(*(one(i) for i in range(n)), models_during_burst())
    assert models_status == 200
    return list(results)  # type: ignore[arg-type]


def test_deadline_cancels_a_long_request_with_504(http: httpx.Client, running_stack: RunningStack) -> None:
    body = chat(
        running_stack.model, "Write a long story.", max_tokens=1500
    )  # the tiny model never stops early
    started = time.perf_counter()
    late = http.post("/v1/chat/completions", json=body, headers={"x-zumik-timeout-s": "0.3"})
    elapsed = time.perf_counter() - started
    error = assert_openai_error(late, 504, "timeout_error")
    assert error["code"] == "deadline_exceeded"
    assert elapsed < 30  # a hang detector: the 1500-token answer was not waited for
    bad = http.post(
        "/v1/chat/completions", json=chat(running_stack.model), headers={"x-zumik-timeout-s": "0"}
    )
    assert assert_openai_error(bad, 400, "invalid_request_error")["param"] == "x-zumik-timeout-s"
    native = http.post(
        "/v2/generate", json={"input": "Write a long story.", "max_tokens": 1500, "timeout_s": 0.3}
    )
    assert native.status_code == 504 and native.json()["error"]["code"] == "deadline_exceeded"
    # Nothing leaked: more requests than the class has slots still get answers.
    for _ in range(PROFILE.qos.classes[PROFILE.qos.default_class].max_running + 2):
        assert (
            http.post("/v1/chat/completions", json=chat(running_stack.model, max_tokens=2)).status_code == 200
        )


def test_deadline_mid_stream_is_an_error_event_then_done(
    http: httpx.Client, running_stack: RunningStack
) -> None:
    body = chat(running_stack.model, "Write a long story.", max_tokens=1500, stream=True)
    with http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-zumik-timeout-s": "1"}
    ) as response:
        assert response.status_code == 200
        lines = list(sse_lines_sync(response.iter_bytes()))
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "deadline_exceeded"
    assert not any('"finish_reason":"stop"' in event for event in events)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 10**9}, "n"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x" * 20}] * 10_000}, "messages"),
    ],
)
def test_input_limits_are_400_naming_the_parameter(
    http: httpx.Client, running_stack: RunningStack, body: dict[str, object], param: str
) -> None:
    request = {**chat(running_stack.model), **body}
    error = assert_openai_error(http.post("/v1/chat/completions", json=request), 400, "invalid_request_error")
    assert error["param"] == param and "x" * 20 not in str(error["message"])


def test_deep_json_and_huge_bodies_and_headers_are_refused(
    http: httpx.Client, running_stack: RunningStack
) -> None:
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_error(
        http.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"}),
        400, "invalid_request_error",
    )  # fmt: skip
    huge = b'{"pad": "' + b"a" * (PROFILE.gateway.max_body_bytes + 1024) + b'"}'
    refused = http.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert_openai_error(refused, 413, "invalid_request_error")
    assert b"aaaa" not in refused.content
    try:
        big_header = http.get("/v1/models", headers={"x-pad": "a" * (1024 * 1024)})
        assert 400 <= big_header.status_code < 500 and b"aaaa" not in big_header.content
    except httpx.RemoteProtocolError:  # the ingress may close the connection instead: also a refusal
        pass
    assert http.get("/v1/models").status_code == 200


def test_models_answer_while_slow_loris_bodies_are_open(
    http: httpx.Client, running_stack: RunningStack
) -> None:
    address = urlsplit(running_stack.url)
    sockets = []
    for _ in range(5):  # each promises a 1 MB body and sends 10 bytes of it
        sock = socket.create_connection((address.hostname, address.port), timeout=10)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {running_stack.tenant_key}\r\n".encode()
            + b'Content-Length: 1000000\r\n\r\n{"model":'
        )
        sockets.append(sock)
    try:
        for _ in range(5):
            assert http.get("/v1/models").status_code == 200
            assert (
                http.post("/v1/chat/completions", json=chat(running_stack.model, max_tokens=2)).status_code
                == 200
            )
    finally:
        for sock in sockets:
            sock.close()


def test_slow_loris_bodies_beyond_a_class_capacity_hold_no_slot_and_end_in_408(
    http: httpx.Client, running_stack: RunningStack
) -> None:
    """More connections than batch has slots (running + queued), each trickling its body a byte
    at a time: batch requests are still served (the body is read before a slot is taken), and
    each trickler gets 408 once ``gateway.body_timeout_s`` has passed (nothing in front of the
    gateway bounds a slow body: uvicorn, Serve and its HAProxy ingress let it trickle)."""
    address = urlsplit(running_stack.url)
    sockets = []
    for _ in range(CAPACITY + 4):
        sock = socket.create_connection((address.hostname, address.port), timeout=10)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {running_stack.tenant_key}\r\nx-zumik-qos: batch\r\n".encode()
            + b'Content-Length: 1000000\r\n\r\n{"model":'
        )
        sockets.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            for sock in sockets:
                sock.sendall(b" ")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for _ in range(3):
            served = http.post(
                "/v1/chat/completions",
                json=chat(running_stack.model, max_tokens=2),
                headers={"x-zumik-qos": "batch"},
            )
            assert served.status_code == 200, served.text[:300]
            assert served.headers["x-zumik-qos"] == "batch"
        stop.set()
        trickler.join()
        for sock in sockets:
            sock.settimeout(PROFILE.gateway.body_timeout_s + 60)  # a hang detector
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 408"), head[:200]
            assert b"body_timeout" in head or b"body_timeout" in sock.recv(65536)
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
    assert http.get("/v1/models").status_code == 200


def test_server_timing_and_an_otlp_span_carrying_the_decision_id(
    http: httpx.Client, running_stack: RunningStack
) -> None:
    response = http.post("/v1/chat/completions", json=chat(running_stack.model, "Tell me about spans."))
    assert response.status_code == 200
    timing = {part.split(";")[0].strip() for part in response.headers["server-timing"].split(",")}
    assert {"queue", "decide", "first-output", "record"} <= timing
    decision = response.headers["x-zumik-decision-id"]
    assert running_stack.otlp is not None
    deadline = time.monotonic() + 30
    spans: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        spans = running_stack.otlp.snapshot()
        roots = [s for s in spans if s["name"] == "zumik.request"
                 and s["attributes"].get("zumik.decision_id") == decision]  # type: ignore[union-attr]  # fmt: skip
        if roots:
            break
        time.sleep(0.3)
    assert roots, f"no span for {decision} among {len(spans)} exported"
    root = roots[0]
    assert root["service"] == "zumik-gateway" and root["attributes"]["zumik.qos"] == "standard"  # type: ignore[index]
    children = {s["name"] for s in spans if s["parent_span_id"] == root["span_id"]}
    assert {"zumik.queue", "zumik.decide", "zumik.first-output", "zumik.record"} <= children


def test_v2_generate_telemetry_and_capture_by_source(http: httpx.Client, running_stack: RunningStack) -> None:
    prompt = "A fixed preamble that repeats across calls so the engine caches it. " * 12
    first = http.post("/v2/generate", json={"input": prompt, "max_tokens": 4, "qos": "interactive"})
    again = http.post("/v2/generate", json={"input": prompt, "max_tokens": 4, "qos": "interactive"})
    assert first.status_code == 200 and again.status_code == 200, again.text[:300]
    body = again.json()
    assert body["qos"] == "interactive"
    telemetry = body["telemetry"]
    assert {"queue_ms", "decide_ms", "first-output_ms", "record_ms"} <= set(telemetry)
    assert telemetry["restore"]["engine_cached_tokens"] > 0  # the connector saw the engine's own hit
    by_source = body["reuse"]["captured_by_source"]
    assert sum(by_source.values()) == body["reuse"]["captured_tokens"] > 0
    assert by_source["engine"] > 0
    assert "server-timing" in again.headers
