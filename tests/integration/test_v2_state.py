"""/v2 state objects against the real server and Redis.

Invariants held here:
- artifacts are content-addressed per tenant (same content, same tenant → same id) and immutable;
- a bundle keeps its order; a bundle of unknown artifacts is a 422 naming the bad entry;
- 50 concurrent appends to one session get 50 distinct, consecutive sequence numbers;
- a branch forks at a turn without touching its parent; a turn that does not exist is a 400;
- a snapshot is a frozen view: later appends do not change it;
- handles are tenant-scoped (another tenant's handle is 404), revocation is immediate on /v2
  and /v1, and a revoked or unknown handle is never silently ignored;
- Idempotency-Key: same key and body → first result; same key, other body → 422.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from zumik_serve.providers.sse import sse_lines_sync

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"])
    return body["error"]


def _artifact(http: httpx.Client, content: str, role: str = "document", **headers: str) -> dict:
    response = http.post("/v2/artifacts", json={"role": role, "content": content}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_artifact_is_content_addressed_per_tenant(http: httpx.Client, other_http: httpx.Client) -> None:
    text = f"policy {uuid.uuid4()}"
    first, second = _artifact(http, text), _artifact(http, text)
    assert first["id"] == second["id"] and first["id"].startswith("art_")
    assert _artifact(other_http, text)["id"] != first["id"]  # the same content, another tenant
    assert _artifact(http, text, role="system")["id"] != first["id"]
    read = http.get(f"/v2/artifacts/{first['id']}").json()
    assert read["content"] == text and read["role"] == "document" and read["size_bytes"] == len(text)


def test_binary_artifact_round_trips(http: httpx.Client) -> None:
    response = http.post(
        "/v2/artifacts",
        json={"role": "document", "content_b64": "AAECAwT/", "media_type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    assert http.get(f"/v2/artifacts/{response.json()['id']}").json()["content_b64"] == "AAECAwT/"


def test_immutable_objects_cannot_be_mutated(http: httpx.Client) -> None:
    artifact = _artifact(http, "immutable")
    for method in ("PUT", "PATCH", "POST"):
        error = _error(http.request(method, f"/v2/artifacts/{artifact['id']}", json={"content": "x"}), 405)
        assert "create a new object" in error["message"]


def test_artifact_over_limit_is_413_before_the_body_is_read(http: httpx.Client, running_stack) -> None:
    limit = running_stack.stack.config.profile.gateway.max_artifact_bytes
    _error(http.post("/v2/artifacts", json={"role": "document", "content": "x" * (limit + 1)}), 413)
    # A declared length far over the limit is refused from the header alone.
    huge = b'{"role": "document", "content": "' + b"x" * (limit * 2) + b'"}'
    _error(http.post("/v2/artifacts", content=huge, headers={"Content-Type": "application/json"}), 413)


def test_bundle_keeps_order_and_rejects_unknown_artifacts(
    http: httpx.Client, other_http: httpx.Client
) -> None:
    a, b = _artifact(http, "bundle a"), _artifact(http, "bundle b")
    bundle = http.post("/v2/bundles", json={"artifacts": [b["id"], a["id"]]})
    assert bundle.status_code == 201
    assert http.get(f"/v2/bundles/{bundle.json()['id']}").json()["artifacts"] == [b["id"], a["id"]]
    foreign = _artifact(other_http, "not yours")
    error = _error(http.post("/v2/bundles", json={"artifacts": [a["id"], foreign["id"]]}), 422)
    assert error["param"] == "artifacts[1]"
    _error(http.post("/v2/bundles", json={"artifacts": ["art_nope"]}), 422)


def test_concurrent_appends_get_distinct_consecutive_seqs(running_stack) -> None:
    async def run() -> list[int]:
        headers = {"Authorization": f"Bearer {running_stack.tenant_key}"}
        async with httpx.AsyncClient(base_url=running_stack.url, headers=headers, timeout=60) as client:
            session = (await client.post("/v2/sessions", json={})).json()["id"]
            responses = await asyncio.gather(
                *(
                    client.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": f"m{i}"})
                    for i in range(50)
                )
            )
            assert all(r.status_code == 201 for r in responses), [
                r.text for r in responses if r.status_code != 201
            ]
            turns = (await client.get(f"/v2/sessions/{session}")).json()["turns"]
            assert [t["seq"] for t in turns] == list(range(1, 51))
            # every append is there once, in the order of its sequence number
            by_seq = {r.json()["seq"]: r.json() for r in responses}
            assert [turns[seq - 1]["content"] for seq in sorted(by_seq)] == [t["content"] for t in turns]
            assert sorted(t["content"] for t in turns) == sorted(f"m{i}" for i in range(50))
            return sorted(by_seq)

    assert asyncio.run(run()) == list(range(1, 51))


def test_branch_forks_without_touching_parent(http: httpx.Client) -> None:
    session = http.post("/v2/sessions", json={}).json()["id"]
    for i in range(3):
        http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": f"p{i}"})
    branch = http.post(f"/v2/sessions/{session}/branches", json={"at_turn": 2})
    assert branch.status_code == 201, branch.text
    branch_id = branch.json()["id"]
    assert branch_id.startswith("brn_") and branch.json()["head"] == 2
    appended = http.post(f"/v2/branches/{branch_id}/turns", json={"role": "assistant", "content": "b"}).json()
    assert appended["seq"] == 3
    assert [t["content"] for t in http.get(f"/v2/branches/{branch_id}").json()["turns"]] == ["p0", "p1", "b"]
    assert [t["content"] for t in http.get(f"/v2/sessions/{session}").json()["turns"]] == ["p0", "p1", "p2"]
    assert (
        http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "p3"}).json()["seq"] == 4
    )
    error = _error(http.post(f"/v2/sessions/{session}/branches", json={"at_turn": 99}), 400)
    assert error["param"] == "at_turn"
    _error(http.post(f"/v2/sessions/{session}/branches", json={"at_turn": -1}), 400)


def test_snapshot_is_a_frozen_view(http: httpx.Client) -> None:
    system = _artifact(http, "You are terse.", role="system")
    bundle = http.post("/v2/bundles", json={"artifacts": [system["id"]]}).json()["id"]
    session = http.post("/v2/sessions", json={"bundle": bundle}).json()["id"]
    http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "first"})
    snapshot = http.post("/v2/snapshots", json={"bundle": bundle, "session": session})
    assert snapshot.status_code == 201, snapshot.text
    snap = snapshot.json()
    assert snap["upto_turn"] == 1 and snap["artifacts"] == [system["id"]]
    http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "second"})
    assert http.get(f"/v2/snapshots/{snap['id']}").json()["upto_turn"] == 1
    compiled = http.post(f"/v2/snapshots/{snap['id']}/compile").json()
    again = http.post(f"/v2/snapshots/{snap['id']}/compile").json()
    assert compiled == again and compiled["num_tokens"] > 0
    assert (
        compiled["compiler_version"]
        and compiled["tokenizer_fingerprint"]
        and compiled["chat_template_digest"]
    )
    assert (
        http.get(f"/v2/snapshots/{snap['id']}").json()["compilations"][0]["num_tokens"]
        == compiled["num_tokens"]
    )
    _error(http.post("/v2/snapshots", json={"session": session, "upto_turn": 7}), 400)
    _error(http.post("/v2/snapshots", json={}), 400)


def test_foreign_and_unknown_handles_are_404(http: httpx.Client, other_http: httpx.Client) -> None:
    mine = _artifact(http, f"secret {uuid.uuid4()}")
    session = http.post("/v2/sessions", json={}).json()["id"]
    _error(other_http.get(f"/v2/artifacts/{mine['id']}"), 404)
    _error(other_http.delete(f"/v2/artifacts/{mine['id']}"), 404)
    _error(other_http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "x"}), 404)
    _error(http.get("/v2/sessions/ses_doesnotexist"), 404)
    _error(http.get(f"/v2/sessions/{mine['id']}"), 404)  # a handle of another kind
    _error(http.get("/v2/widgets/x"), 404)


def test_delete_revokes_at_once_everywhere(http: httpx.Client, running_stack) -> None:
    session = http.post("/v2/sessions", json={}).json()["id"]
    http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "hello"})
    snapshot = http.post("/v2/snapshots", json={"session": session}).json()["id"]
    assert http.delete(f"/v2/snapshots/{snapshot}").json() == {"id": snapshot, "revoked": True}
    _error(http.get(f"/v2/snapshots/{snapshot}"), 404)
    _error(http.delete(f"/v2/snapshots/{snapshot}"), 404)
    _error(http.post("/v2/generate", json={"snapshot": snapshot, "input": "hi", "max_tokens": 2}), 404)
    chat = {"model": running_stack.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    error = _error(http.post("/v1/chat/completions", json=chat, headers={"x-zumik-snapshot": snapshot}), 404)
    assert set(error) == {"message", "type", "param", "code"}  # an OpenAI error object on /v1
    assert http.delete(f"/v2/sessions/{session}").status_code == 200
    _error(http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "x"}), 404)
    _error(http.post("/v1/chat/completions", json=chat, headers={"x-zumik-session": session}), 404)


def test_revoked_artifact_content_gets_a_new_handle(http: httpx.Client) -> None:
    text = f"rotating {uuid.uuid4()}"
    first = _artifact(http, text)
    http.delete(f"/v2/artifacts/{first['id']}")
    second = _artifact(http, text)
    assert second["id"] != first["id"]
    assert http.get(f"/v2/artifacts/{second['id']}").status_code == 200


def test_idempotency_key_replays_first_result_and_rejects_other_body(http: httpx.Client) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = http.post("/v2/sessions", json={}, headers=key)
    again = http.post("/v2/sessions", json={}, headers=key)
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    other = http.post("/v2/snapshots", json={"session": first.json()["id"]}, headers=key)
    error = _error(other, 422)
    assert error["type"] == "idempotency_error"

    session = first.json()["id"]
    turn_key = {"Idempotency-Key": str(uuid.uuid4())}
    turn = {"role": "user", "content": "once"}
    seqs = [
        http.post(f"/v2/sessions/{session}/turns", json=turn, headers=turn_key).json()["seq"]
        for _ in range(3)
    ]
    assert seqs == [1, 1, 1]
    assert len(http.get(f"/v2/sessions/{session}").json()["turns"]) == 1
    _error(
        http.post(
            f"/v2/sessions/{session}/turns", json={"role": "user", "content": "other"}, headers=turn_key
        ),
        422,
    )


def test_generate_from_snapshot_reports_route_and_capture(http: httpx.Client) -> None:
    doc = _artifact(http, "A long stable document about tools and policies. " * 20)
    bundle = http.post("/v2/bundles", json={"artifacts": [doc["id"]]}).json()["id"]
    snapshot = http.post("/v2/snapshots", json={"bundle": bundle}).json()["id"]
    first = http.post("/v2/generate", json={"snapshot": snapshot, "input": "Question one?", "max_tokens": 3})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["output"]["content"] and body["usage"]["completion_tokens"] == 3
    assert body["decision_id"].startswith("dec_") and body["route"].startswith("byoc:")
    assert body["snapshot"] == snapshot and first.headers["x-zumik-snapshot"] == snapshot
    second = http.post(
        "/v2/generate", json={"snapshot": snapshot, "input": "Question two?", "max_tokens": 3}
    ).json()
    assert second["reuse"]["captured_tokens"] > 0 and second["reuse"]["captured_evidence"] == "observed"
    assert (
        second["reuse"]["opportunity_tokens"] > 0 and second["reuse"]["opportunity_evidence"] == "estimated"
    )
    assert {"decide_ms", "first-output_ms", "record_ms"} <= set(second["telemetry"])
    _error(http.post("/v2/generate", json={"input": 5}), 400)


def test_a_streamed_generation_is_the_whole_one_in_pieces(http: httpx.Client) -> None:
    """Greedy, the same snapshot and input: the stream's text and its ``completed`` event are
    what a whole answer is, on the real engine."""
    doc = _artifact(http, "Facts about streaming generations. " * 10)
    bundle = http.post("/v2/bundles", json={"artifacts": [doc["id"]]}).json()["id"]
    snapshot = http.post("/v2/snapshots", json={"bundle": bundle}).json()["id"]
    request = {"snapshot": snapshot, "input": "Say something.", "max_tokens": 6, "temperature": 0}
    whole = http.post("/v2/generate", json=request).json()
    with http.stream("POST", "/v2/generate", json={**request, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = [
            json.loads(line.removeprefix("data: "))
            for line in sse_lines_sync(r.iter_bytes())
            if line.startswith("data: ")
        ]
    assert events[-1]["type"] == "completed" and {e["type"] for e in events[:-1]} <= {"delta"}
    text = "".join(e["text"] for e in events[:-1])
    assert text == events[-1]["output"]["content"] == whole["output"]["content"]
    assert events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] == 6
    assert events[-1]["decision_id"] == r.headers["x-zumik-decision-id"] != whole["decision_id"]


def test_v1_snapshot_header_prepends_and_session_header_appends(http: httpx.Client, running_stack) -> None:
    system = _artifact(http, "Always answer in one word. " * 10, role="system")
    bundle = http.post("/v2/bundles", json={"artifacts": [system["id"]]}).json()["id"]
    snapshot = http.post("/v2/snapshots", json={"bundle": bundle}).json()["id"]
    session = http.post("/v2/sessions", json={}).json()["id"]
    chat = {
        "model": running_stack.model,
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 4,
    }
    plain = http.post("/v1/chat/completions", json=chat).json()
    with_snapshot = http.post(
        "/v1/chat/completions", json=chat, headers={"x-zumik-snapshot": snapshot, "x-zumik-session": session}
    )
    assert with_snapshot.status_code == 200
    assert with_snapshot.headers["x-zumik-snapshot"] == snapshot
    assert with_snapshot.json()["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert "x-zumik" not in with_snapshot.text  # nothing of Zumik in the /v1 body
    turns = http.get(f"/v2/sessions/{session}").json()["turns"]
    assert [(t["seq"], t["role"]) for t in turns] == [(1, "user"), (2, "assistant")]
    assert turns[0]["content"] == "Hi there"
    assert turns[1]["content"] == with_snapshot.json()["choices"][0]["message"]["content"]

    with http.stream(
        "POST", "/v1/chat/completions", json={**chat, "stream": True}, headers={"x-zumik-session": session}
    ) as r:
        assert r.status_code == 200
        list(sse_lines_sync(r.iter_bytes()))
    assert [t["role"] for t in http.get(f"/v2/sessions/{session}").json()["turns"]] == [
        "user",
        "assistant",
    ] * 2


def test_warm_persists_every_block_of_the_snapshot(http: httpx.Client) -> None:
    doc = _artifact(http, f"{uuid.uuid4()} " + "A policy paragraph worth keeping warm. " * 30)
    bundle = http.post("/v2/bundles", json={"artifacts": [doc["id"]]}).json()["id"]
    snapshot = http.post("/v2/snapshots", json={"bundle": bundle}).json()["id"]
    warm = http.post(f"/v2/snapshots/{snapshot}/warm")
    assert warm.status_code == 200, warm.text
    body = warm.json()
    assert body["num_blocks"] == body["num_tokens"] // body["block_size"] > 5
    assert body["persisted_blocks"]["redis"] == body["num_blocks"]
    assert len(body["compat_key"]) == 64
    _error(http.post("/v2/snapshots/snp_unknown/warm"), 404)
