"""The request pipeline through the real HTTP app, in process (real Redis, the shared FakeEngine).

Invariants held here:
- /v1 answers carry only the official fields, Zumik's data goes in headers (decision, route,
  release, QoS, Server-Timing, reuse figures); the served model is named, never an alias;
- authentication comes first: a missing or unknown key is a 401 in the surface's error shape;
- engines get the tenant's server-side cache salt, never the client's, one salt per tenant;
- a failure before the first output is a real status: 5xx with a retry hint, 503 with
  Retry-After when the replica is unreachable, the client's 400 when the engine says so;
- a stream is re-rendered chunk by chunk; a failure after the first byte is an error event then
  ``[DONE]``;
- /v2/generate tokenizes on the gateway and sends token ids only to this deployment's engines;
  its body is a typed model whose errors name the field;
- every decision is recorded and replays equal;
- the reuse ledger feeds escalation: once it holds enough evidence, the decision escalates.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from profiles import parse_profile
from tests.support.fault_server import FaultServer
from tests.support.inprocess import InProcessGateway, make_gateway, wait_until
from zumik_serve.engines.protocol import EngineFailure
from zumik_serve.state.requests import message_text

pytestmark = pytest.mark.redis

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
CHAT = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
OFFICIAL_CHAT_KEYS = {"id", "object", "created", "model", "choices", "usage"}


@pytest.fixture
async def gateway(module_redis_url: str, tiny_model_dir: Path) -> AsyncIterator[InProcessGateway]:
    yield make_gateway(module_redis_url, tiny_model_dir)


async def test_chat_answer_is_official_and_zumik_data_is_in_headers(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == OFFICIAL_CHAT_KEYS
    assert body["model"] == "zumik-tiny" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == gateway.engine.reply
    headers = response.headers
    assert headers["x-zumik-decision-id"].startswith("dec_")
    assert headers["x-zumik-route"] == "byoc:fake-r0"
    assert headers["x-zumik-release"].startswith("rel_") and headers["x-zumik-qos"] == "standard"
    phases = [part.split(";")[0] for part in headers["server-timing"].split(", ")]
    assert phases[:4] == ["queue", "decide", "first-output", "record"]
    assert {"lookup", "to-decide", "in-app"} <= set(phases)  # the app's own clock, around the engine
    assert headers["x-zumik-reuse-captured-tokens"] == "0"
    assert headers["x-zumik-reuse-evidence"] == "opportunity=estimated; captured=observed"
    sent = gateway.engine.bodies[-1]
    assert sent["model"] == "zumik-tiny" and len(sent["cache_salt"]) == 64


async def test_missing_or_unknown_key_is_401_in_each_surface_shape(gateway: InProcessGateway) -> None:
    async with gateway.client(api_key="zk-unknown") as http:
        v1 = await http.post("/v1/chat/completions", json=CHAT)
        v2 = await http.post("/v2/generate", json={"input": "hi"})
    assert v1.status_code == v2.status_code == 401
    assert v1.json()["error"]["type"] == "authentication_error" and "code" in v1.json()["error"]
    assert set(v2.json()) == {"error"} and v2.json()["error"]["type"] == "authentication_error"
    assert gateway.engine.calls == []


async def test_engines_get_one_server_side_salt_per_tenant(gateway: InProcessGateway) -> None:
    first = await gateway.create_tenant("salt-a")
    second = await gateway.create_tenant("salt-b")
    for key in (first, first, second):
        async with gateway.client(key) as http:
            body = {**CHAT, "user": "someone"}
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    salts = [sent["cache_salt"] for sent in gateway.engine.bodies[-3:]]
    assert salts[0] == salts[1] != salts[2]


async def test_client_cache_salt_never_reaches_the_engine(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "cache_salt": "mine"})
    assert response.status_code == 200
    assert gateway.engine.bodies[-1]["cache_salt"] != "mine"


@pytest.mark.parametrize("stream", [False, True])
async def test_failure_before_output_is_retried_then_5xx_with_a_retry_hint(
    gateway: InProcessGateway, stream: bool
) -> None:
    retries = gateway.context.profile.effective_routes()[0].max_retries
    for _ in range(retries + 1):
        gateway.engine.fail_next(EngineFailure(status=500, message="boom"))
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert response.status_code == 500
        message = response.json()["error"]["message"]
        assert "boom" in message and "Retry" in message
        decision = message.split("GET /v2/decisions/")[1].split(" ")[0]
        attempts = (await http.get(f"/v2/decisions/{decision}")).json()["attempts"]
    assert [a["outcome"] for a in attempts] == ["server_error"] * (retries + 1)
    assert attempts[-1]["action"] != "retry"


async def test_one_failure_before_output_is_retried_and_answered(gateway: InProcessGateway) -> None:
    gateway.engine.fail_next(EngineFailure(status=503, message="busy"))
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
        attempts = (await http.get(f"/v2/decisions/{response.headers['x-zumik-decision-id']}")).json()
    assert response.status_code == 200
    assert [(a["outcome"], a["action"]) for a in attempts["attempts"]] == [
        ("server_error", "retry"), ("ok", "done"),
    ]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
async def test_unreachable_replica_is_503_with_retry_after(gateway: InProcessGateway, stream: bool) -> None:
    gateway.engine.fail_next(ConnectionError("replica gone"))
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    decision = response.json()["error"]["message"].split("GET /v2/decisions/")[1].split(" ")[0]
    async with gateway.client() as http:
        record = (await http.get(f"/v2/decisions/{decision}")).json()
    assert [a["outcome"] for a in record["attempts"]] == ["connect_error"]


async def test_context_length_failure_is_the_clients_400(gateway: InProcessGateway) -> None:
    gateway.engine.fail_next(EngineFailure(status=400, message="This model's maximum context length is 2048"))
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "messages"


async def test_stream_whose_first_payload_is_an_error_is_a_failure_before_output(
    gateway: InProcessGateway,
) -> None:
    gateway.engine.break_stream_after(0)  # the first attempt's stream opens with an error payload
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        decision = response.headers["x-zumik-decision-id"]
        attempts = (await http.get(f"/v2/decisions/{decision}")).json()["attempts"]
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert [(a["outcome"], a["action"]) for a in attempts] == [("server_error", "retry"), ("ok", "done")]


async def test_stream_is_rerendered_and_ends_with_done(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        response = await http.post(
            "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == gateway.engine.reply
    assert all(
        chunk["model"] == "zumik-tiny" and chunk["object"] == "chat.completion.chunk" for chunk in chunks
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert "x-zumik-reuse-opportunity-tokens" in response.headers


async def test_failure_mid_stream_is_an_error_event_then_done(gateway: InProcessGateway) -> None:
    gateway.engine.break_stream_after(2)
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "engine died" in error["message"] and error["code"] == "engine_error"
    finished = [c for e in events[:-2] for c in json.loads(e)["choices"] if c["finish_reason"] is not None]
    assert finished == []  # never a made-up finish_reason


async def test_v2_generate_tokenizes_here_and_only_byoc_takes_token_ids(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        response = await http.post("/v2/generate", json={"input": "Say hi", "max_tokens": 3, "seed": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "generation" and body["output"]["content"] == gateway.engine.reply
    assert body["route"] == "byoc:fake-r0" and body["release"].startswith("rel_")
    assert body["reuse"]["captured_evidence"] == "observed"
    assert {"queue_ms", "decide_ms", "first-output_ms", "record_ms"} <= set(body["telemetry"])
    sent = gateway.engine.bodies[-1]
    assert isinstance(sent["prompt"], list) and all(isinstance(token, int) for token in sent["prompt"])
    assert sent["max_tokens"] == 3 and sent["seed"] == 7 and "messages" not in sent


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": 5}, "input"),
        ({"input": [{"role": "user"}]}, "input"),
        ({"input": "hi", "temperture": 0.1}, "temperture"),
        ({"input": "hi", "model": 7}, "model"),
        ({"input": "hi", "qos": 3}, "qos"),
        ({"input": "hi", "timeout_s": -1}, "timeout_s"),
    ],
)
async def test_v2_generate_errors_name_the_field(gateway: InProcessGateway, body: dict, param: str) -> None:
    async with gateway.client() as http:
        response = await http.post("/v2/generate", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_unknown_model_is_404_on_both_surfaces(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        v1 = await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-nope"})
        v2 = await http.post("/v2/generate", json={"input": "hi", "model": "gpt-nope"})
    assert v1.status_code == v2.status_code == 404
    assert v1.json()["error"]["code"] == v2.json()["error"]["code"] == "model_not_found"


async def test_every_decision_is_recorded_and_replays_equal(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
        decision = response.headers["x-zumik-decision-id"]
        record = (await http.get(f"/v2/decisions/{decision}")).json()
        replayed = (await http.post(f"/v2/decisions/{decision}/replay")).json()
    assert record["attempts"][0]["outcome"] == "ok"
    assert replayed["equal"] is True


# --- state, accounting and escalation through the pipeline ------------------------------------


async def _snapshot(http: httpx.AsyncClient, system: str) -> str:
    artifact = (await http.post("/v2/artifacts", json={"role": "system", "content": system})).json()["id"]
    bundle = (await http.post("/v2/bundles", json={"artifacts": [artifact]})).json()["id"]
    return str((await http.post("/v2/snapshots", json={"bundle": bundle})).json()["id"])


@pytest.mark.parametrize("stream", [False, True])
async def test_session_records_the_exchange_in_order(gateway: InProcessGateway, stream: bool) -> None:
    async with gateway.client() as http:
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        response = await http.post(
            "/v1/chat/completions", json={**CHAT, "stream": stream}, headers={"x-zumik-session": session}
        )
        assert response.status_code == 200
        turns = (await http.get(f"/v2/sessions/{session}")).json()["turns"]
    assert [(t["seq"], t["role"], t["content"]) for t in turns] == [
        (1, "user", "Hello there"), (2, "assistant", gateway.engine.reply),
    ]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
async def test_a_message_of_content_parts_is_recorded_as_its_text(
    gateway: InProcessGateway, stream: bool
) -> None:
    """Agent frameworks send a message's content as parts (``[{"type": "text", ...}]``): the
    session records their text, as the Responses API's sessions do; it once dropped the turn."""
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    body = {**CHAT, "messages": [{"role": "user", "content": parts}], "stream": stream}
    async with gateway.client() as http:
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        response = await http.post("/v1/chat/completions", json=body, headers={"x-zumik-session": session})
        assert response.status_code == 200
        turns = (await http.get(f"/v2/sessions/{session}")).json()["turns"]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "Hello there"),
        ("assistant", gateway.engine.reply),
    ]


def test_a_chat_messages_text_is_its_content_then_its_tool_calls() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert message_text({"role": "assistant", "content": None, "tool_calls": [call]}) == (
        '[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]'
    )
    assert message_text({"role": "assistant", "content": "ok", "tool_calls": []}) == "ok"
    assert message_text({"role": "tool", "content": [{"type": "text", "text": "42"}]}) == "42"
    assert message_text({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}) == ""


@pytest.mark.parametrize("stream", [False, True])
async def test_a_retried_exchange_is_recorded_once(gateway: InProcessGateway, stream: bool) -> None:
    """The OpenAI SDK resends a failed request's body unchanged and without an idempotency key:
    the session records the exchange once; the next request (a longer history) is recorded."""
    body = {**CHAT, "stream": stream}
    follow_up = {**body, "messages": [
        *CHAT["messages"], {"role": "assistant", "content": gateway.engine.reply},
        {"role": "user", "content": "And then?"},
    ]}  # fmt: skip
    headers = {"x-zumik-session": ""}
    async with gateway.client() as http:
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        headers["x-zumik-session"] = session
        chat = "/v1/chat/completions"
        sent = [await http.post(chat, json=b, headers=headers) for b in (body, body, follow_up)]
        assert [r.status_code for r in sent] == [200, 200, 200]
        turns = (await http.get(f"/v2/sessions/{session}")).json()["turns"]
        other = (await http.post("/v2/sessions", json={})).json()["id"]  # the same body, another session
        again = await http.post("/v1/chat/completions", json=body, headers={"x-zumik-session": other})
        assert again.status_code == 200
        other_turns = (await http.get(f"/v2/sessions/{other}")).json()["turns"]
        assert (await http.post("/v2/purge", json={"target": session})).status_code == 200
    redis = aioredis.from_url(gateway.redis_url)
    try:  # the exchange keys (a digest of each request) went with the session; what stays is
        # the purge's own record of the target (a purge again answers with its receipt)
        left = [key async for key in redis.scan_iter(match=f"*{session}*")]
    finally:
        await redis.aclose()
    assert [key for key in left if b":purge-target:" not in key] == []
    assert [(t["seq"], t["role"], t["content"]) for t in turns] == [
        (1, "user", "Hello there"), (2, "assistant", gateway.engine.reply),
        (3, "user", "And then?"), (4, "assistant", gateway.engine.reply),
    ]  # fmt: skip
    assert [t["seq"] for t in other_turns] == [1, 2]


async def test_snapshot_messages_come_first_and_the_header_names_it(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        snapshot = await _snapshot(http, "You are terse.")
        response = await http.post("/v1/chat/completions", json=CHAT, headers={"x-zumik-snapshot": snapshot})
        generated = await http.post("/v2/generate", json={"snapshot": snapshot, "input": "Hi"})
    assert response.status_code == 200 and response.headers["x-zumik-snapshot"] == snapshot
    sent = gateway.engine.bodies[-2]["messages"]
    assert sent == [{"role": "system", "content": "You are terse."}, *CHAT["messages"]]
    assert generated.status_code == 200 and generated.json()["snapshot"] == snapshot
    tokenizer = gateway.context.models.tokenizer()
    expected = tokenizer.encode_chat(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
    )
    assert gateway.engine.bodies[-1]["prompt"] == expected


@pytest.mark.parametrize("header", ["x-zumik-snapshot", "x-zumik-session"])
async def test_state_headers_are_refused_on_completions(gateway: InProcessGateway, header: str) -> None:
    async with gateway.client() as http:
        response = await http.post(
            "/v1/completions", json={"model": "zumik-tiny", "prompt": "hi"}, headers={header: "snp_x"}
        )
    assert response.status_code == 400 and response.json()["error"]["param"] == header
    assert gateway.engine.calls == []


async def test_unknown_snapshot_is_404_before_the_engine(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        response = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-zumik-snapshot": "snp_nope"}
        )
    assert response.status_code == 404
    assert gateway.engine.calls == []


async def test_reuse_ledger_is_written_after_the_answer(gateway: InProcessGateway) -> None:
    key = await gateway.create_tenant("ledger")
    gateway.engine.cached_tokens = 7
    async with gateway.client(key) as http:
        for _ in range(2):
            response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.headers["x-zumik-reuse-captured-tokens"] == "7"

        async def recorded() -> bool:
            report = (await http.get("/v2/reuse", params={"group_by": "tenant"})).json()
            return bool(report["groups"]) and report["groups"][0]["requests"] == 2

        await wait_until(recorded, what="the ledger to hold both requests")
        group = (await http.get("/v2/reuse", params={"group_by": "tenant"})).json()["groups"][0]
    observed = next(c for c in group["captured"] if c["evidence"] == "observed")
    assert observed["tokens"] == 14


async def test_a_text_prompts_opportunity_is_its_seen_share_of_the_tokens_the_engine_counted(
    gateway: InProcessGateway,
) -> None:
    """A text-keyed prompt is chunked by bytes (4 x block_size each): CJK text packs more tokens
    into a chunk than block_size (this fake engine counts 1.5 a character, from its escaped
    JSON), so a chunk's tokens are its share of the prompt's bytes, of the counted tokens. A
    stream's header goes out before the count: there, block_size tokens a chunk, and its ledger
    entry keeps the same figure as its header. Tools are rendered into the prompt but not in its
    text: then too, block_size a chunk."""
    key = await gateway.create_tenant("opportunity-cjk")
    cjk = {**CHAT, "messages": [{"role": "user", "content": "漢字の文章" * 120}]}
    text = "".join(json.dumps(m, sort_keys=True, ensure_ascii=False) for m in cjk["messages"]).encode()
    width = 4 * gateway.context.profile.engine.block_size
    covered, chunks = len(text) // width * width, len(text) // width
    async with gateway.client(key) as http:
        await http.post("/v1/chat/completions", json=cjk)  # seen from now on
        whole = await http.post("/v1/chat/completions", json=cjk)
        stream = await http.post("/v1/chat/completions", json={**cjk, "stream": True})
        tools = await http.post("/v1/chat/completions", json={**cjk, "tools": [TOOL]})
        headers = [int(r.headers["x-zumik-reuse-opportunity-tokens"]) for r in (whole, stream, tools)]

        async def recorded() -> bool:
            report = (await http.get("/v2/reuse", params={"group_by": "tenant"})).json()
            return bool(report["groups"]) and report["groups"][0]["requests"] == 4

        await wait_until(recorded, what="the ledger to hold the four requests")
        group = (await http.get("/v2/reuse", params={"group_by": "tenant"})).json()["groups"][0]
    counted, per_chunk = whole.json()["usage"]["prompt_tokens"], gateway.context.profile.engine.block_size
    assert headers[0] == counted * covered // len(text) > chunks * per_chunk
    assert headers[1] == chunks * per_chunk  # before the count
    assert headers[2] == chunks * per_chunk  # the tools' tokens are counted, not in the text
    assert group["opportunity"]["tokens"] == sum(headers)  # the first request saw nothing


async def test_tenant_without_accounting_gets_capture_but_no_opportunity(gateway: InProcessGateway) -> None:
    key = await gateway.create_tenant("no-ledger", reuse_accounting=False)
    async with gateway.client(key) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
        report = (await http.get("/v2/reuse", params={"group_by": "tenant"})).json()
    assert "x-zumik-reuse-opportunity-tokens" not in response.headers
    assert response.headers["x-zumik-reuse-evidence"] == "opportunity=unknown; captured=observed"
    assert report["groups"] == []


ESCALATING = """
name: pipeline-escalation
model: {{source: "builtin:tiny", served_name: zumik-tiny}}
engine: {{device: cpu, kv_cache_memory_bytes: 1048576}}
routes:
  - {{name: managed, kind: managed, base_url: "{managed}", model: gpt-test, api_key_env: TEST_MANAGED_KEY,
     prices: {{input: "0.15", cached_input: "0.075", output: "0.60"}}, timeout_s: 5}}
  - {{name: local, kind: byoc, replica_hour_usd: "0.50", tokens_per_replica_hour: 2000000}}
routing:
  default_route: managed
  fallback_order: [managed, local]
  escalation: {{to: byoc, min_evidence: reported, min_reused_tokens_in_window: 300, window_s: 3600}}
"""


async def test_ledger_evidence_escalates_the_tenant_to_its_own_engines(
    module_redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_MANAGED_KEY", "sk-test")
    with FaultServer(cached_tokens=200) as managed:
        profile = parse_profile(ESCALATING.format(managed=managed.base_url), source="test")
        first = make_gateway(module_redis_url, tiny_model_dir, profile=profile)
        key = await first.create_tenant("escalates")
        async with first.client(key) as http:
            routes = []
            for _ in range(2):  # each reports 200 cached tokens: 400 >= 300 after the second
                response = await http.post("/v1/chat/completions", json=CHAT)
                routes.append(response.headers["x-zumik-route"])

            async def recorded() -> bool:
                report = (await http.get("/v2/reuse", params={"group_by": "tenant"})).json()
                return bool(report["groups"]) and report["groups"][0]["requests"] == 2

            await wait_until(recorded, what="the ledger to hold the managed captures")
        # A gateway that starts now reads the ledger (the first one reuses what it read for 2 s).
        later = make_gateway(module_redis_url, tiny_model_dir, profile=profile)
        async with later.client(key) as http:
            escalated = await http.post("/v1/chat/completions", json=CHAT)
            record = (await http.get(f"/v2/decisions/{escalated.headers['x-zumik-decision-id']}")).json()
    assert routes == ["managed:managed", "managed:managed"]
    assert escalated.headers["x-zumik-route"].startswith("byoc:")
    inputs = record["record"]["inputs"]
    evidence = inputs["evidence"]  # the prompt's prefix family's, with its counts and age
    assert (evidence["level"], evidence["reused_tokens_in_window"]) == ("reported", 400)
    assert evidence["requests_in_window"] == 2 and evidence["family"].startswith("fam_")
    assert 0 <= evidence["age_s"] < 3600
    escalation = record["record"]["escalation"]
    assert escalation["met"] is True
    assert escalation["escalated_cost_pusd"] < escalation["default_cost_pusd"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", "9000"), ("n", 2.0), ("max_tokens", "16"), ("max_completion_tokens", True), ("max_tokens", 8.5)],
)
async def test_counts_that_multiply_the_work_must_be_json_integers(
    gateway: InProcessGateway, field: str, value: object
) -> None:
    """vLLM would coerce "9000" and run 9,000 sequences: only a JSON integer is taken."""
    calls = len(gateway.engine.calls)
    async with gateway.client() as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, field: value})
        v2 = await http.post("/v2/generate", json={"input": "hi", "max_tokens": "16"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    assert response.json()["error"]["message"] == f"{field} must be an integer."
    assert v2.status_code == 400 and v2.json()["error"]["param"] == "max_tokens"
    assert len(gateway.engine.calls) == calls


async def test_a_number_of_thousands_of_digits_is_a_400_not_a_500(gateway: InProcessGateway) -> None:
    raw = b'{"model": "zumik-tiny", "messages": [], "seed": ' + b"9" * 5000 + b"}"
    async with gateway.client() as http:
        v1 = await http.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        v2 = await http.post("/v2/sessions", content=raw, headers={"content-type": "application/json"})
    assert v1.status_code == v2.status_code == 400
    assert "too many digits" in v1.json()["error"]["message"]


@pytest.mark.parametrize(
    ("number", "said"),
    [
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("1e400", "the number 1e400, beyond a double"),
    ],
)
async def test_a_number_json_cannot_carry_is_a_400_on_every_api_and_reaches_no_engine(
    gateway: InProcessGateway, number: str, said: str
) -> None:
    """Python's parser takes NaN and the infinities, and reads 1e400 as infinity; a provider
    route cannot send them on. Each is refused where a body is parsed, naming it."""
    calls = len(gateway.engine.calls)
    chat = b'{"model": "zumik-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}'
    bodies = {
        "/v1/chat/completions": chat % number.encode(),
        "/v1/completions": b'{"model": "zumik-tiny", "prompt": "hi", "top_p": %s}' % number.encode(),
        "/v1/responses": b'{"model": "zumik-tiny", "input": "hi", "temperature": %s}' % number.encode(),
        "/v2/generate": b'{"input": "hi", "temperature": %s}' % number.encode(),
        "/v2/sessions": b'{"metadata": {"x": %s}}' % number.encode(),
    }
    async with gateway.client() as http:
        for path, raw in bodies.items():
            response = await http.post(path, content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error", (path, error)
            assert f"holds {said}" in error["message"] and "finite" in error["message"], (path, error)
    assert len(gateway.engine.calls) == calls


async def test_an_integer_past_a_doubles_range_as_a_timeout_is_a_400_not_a_500(
    gateway: InProcessGateway,
) -> None:
    raw = b'{"input": "hi", "timeout_s": 1' + b"0" * 400 + b"}"
    async with gateway.client() as http:
        response = await http.post("/v2/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "timeout_s"


async def test_an_error_never_quotes_more_than_a_bounded_part_of_the_input(gateway: InProcessGateway) -> None:
    huge = "m" * 100_000
    async with gateway.client() as http:
        answers = [
            await http.post("/v1/chat/completions", json={**CHAT, "model": huge}),
            await http.get(f"/v1/{'p' * 10_000}"),
            await http.get(f"/v2/sessions/ses_{'x' * 10_000}"),
            await http.post(
                "/v1/responses", json={"model": "zumik-tiny", "input": "x", "previous_response_id": huge}
            ),
        ]
    for answer in answers:
        assert 400 <= answer.status_code < 500, answer.status_code
        assert len(answer.content) <= 8 * 1024, (answer.request.url.path[:40], len(answer.content))
        assert "(truncated)" in answer.json()["error"]["message"] or huge not in answer.text


async def test_a_media_url_the_engine_would_fetch_is_refused_in_the_request_and_in_a_snapshot(
    gateway: InProcessGateway,
) -> None:
    """An http(s) media part, in the request's messages or in a snapshot's message artifact, is a
    400 naming where it is; nothing reaches the engine. The same image inline goes through."""
    image = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    ask = {"type": "text", "text": "What is in it?"}
    calls = len(gateway.engine.calls)
    async with gateway.client() as http:
        remote = {**CHAT, "messages": [{"role": "user", "content": [ask, image]}]}
        refused = await http.post("/v1/chat/completions", json=remote)
        message = json.dumps({"role": "user", "content": [ask, image]})
        artifact = await http.post("/v2/artifacts", json={"role": "message", "content": message})
        bundle = await http.post("/v2/bundles", json={"artifacts": [artifact.json()["id"]]})
        snapshot = (await http.post("/v2/snapshots", json={"bundle": bundle.json()["id"]})).json()["id"]
        in_snapshot = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-zumik-snapshot": snapshot}
        )
        assert len(gateway.engine.calls) == calls  # neither reached the engine
        sent = await http.post(
            "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": [ask, inline]}]}
        )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content"
    assert (
        in_snapshot.status_code == 400
        and in_snapshot.json()["error"]["param"] == "snapshot messages[0].content"
    )
    assert "169.254" not in refused.text + in_snapshot.text
    assert sent.status_code == 200 and gateway.engine.bodies[-1]["messages"][0]["content"][1] == inline
