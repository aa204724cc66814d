"""The /v2 state routes through the real HTTP app, in process (real Redis; no engine is called).

Invariants held here (the statuses, error types and params ``tests/integration/test_v2_state.py``
asserts against the full stack, plus the body validation of each route):
- every error is ``{"error": {"type", "message", ...}}``; a body that is not its route's model
  is a 400 naming the field, and malformed JSON or a bad Idempotency-Key is a 400 too;
- content limits are 413s, also from the declared length alone;
- a bundle of artifacts that are not yours is a 422 naming the entry; a turn that does not
  exist is a 400 naming ``at_turn`` / ``upto_turn``;
- objects cannot be changed in place (405); another tenant's or an unknown handle is 404, and a
  revoked one is 404 at once;
- an Idempotency-Key replays the first answer for the same body and is a 422 for another.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.inprocess import InProcessGateway, make_gateway

pytestmark = pytest.mark.redis


@pytest.fixture
async def gateway(module_redis_url: str, tiny_model_dir: Path) -> AsyncIterator[InProcessGateway]:
    yield make_gateway(module_redis_url, tiny_model_dir)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"])
    error: dict[str, Any] = body["error"]
    return error


async def _artifact(http: httpx.AsyncClient, content: str, role: str = "document") -> dict[str, Any]:
    response = await http.post("/v2/artifacts", json={"role": role, "content": content})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v2/artifacts", {"role": "robot", "content": "x"}, "role"),
        ("/v2/artifacts", {"role": "document", "content": "x", "content_b64": "eA=="}, "content"),
        ("/v2/artifacts", {"role": "document", "content_b64": "eA=="}, "media_type"),
        ("/v2/bundles", {"artifacts": []}, "artifacts"),
        ("/v2/bundles", {"artifacts": ["art_a", 1]}, "artifacts.1"),
        ("/v2/sessions", {"bundles": None}, "bundles"),
        ("/v2/snapshots", {}, "bundle"),
        ("/v2/snapshots", {"bundle": "bnd_x", "upto_turn": 1}, "upto_turn"),
    ],
)
async def test_invalid_body_is_a_400_naming_the_field(
    gateway: InProcessGateway, path: str, body: dict[str, Any], param: str
) -> None:
    async with gateway.client() as http:
        error = _error(await http.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


async def test_turn_and_branch_bodies_are_validated_before_the_handle(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        for handle in (session, "ses_unknown"):
            turn = _error(await http.post(f"/v2/sessions/{handle}/turns", json={"role": "user"}), 400)
            assert turn["param"] == "content"
        fork = _error(await http.post(f"/v2/sessions/{session}/branches", json={"at_turn": "1"}), 400)
        assert fork["param"] == "at_turn"
        _error(await http.post("/v2/sessions", content=b"{not json"), 400)
        key = _error(await http.post("/v2/sessions", json={}, headers={"Idempotency-Key": "k" * 256}), 400)
        assert key["param"] == "idempotency-key"


async def test_artifacts_are_content_addressed_and_over_limit_is_413(gateway: InProcessGateway) -> None:
    other = await gateway.create_tenant(f"other-{uuid.uuid4()}")
    text = f"policy {uuid.uuid4()}"
    async with gateway.client() as http, gateway.client(other) as other_http:
        first, second = await _artifact(http, text), await _artifact(http, text)
        assert first["id"] == second["id"] and first["id"].startswith("art_")
        assert (await _artifact(other_http, text))["id"] != first["id"]
        read = (await http.get(f"/v2/artifacts/{first['id']}")).json()
        assert read["content"] == text and read["size_bytes"] == len(text)
        for method in ("PUT", "PATCH", "POST"):
            moved = await http.request(method, f"/v2/artifacts/{first['id']}", json={"content": "x"})
            assert "create a new object" in _error(moved, 405)["message"]
        limit = gateway.context.state.max_artifact_bytes
        _error(await http.post("/v2/artifacts", json={"role": "document", "content": "x" * (limit + 1)}), 413)
        huge = b'{"role": "document", "content": "' + b"x" * (limit * 2) + b'"}'
        _error(
            await http.post("/v2/artifacts", content=huge, headers={"Content-Type": "application/json"}), 413
        )


async def test_bundles_sessions_branches_and_snapshots(gateway: InProcessGateway) -> None:
    other = await gateway.create_tenant(f"other-{uuid.uuid4()}")
    async with gateway.client() as http, gateway.client(other) as other_http:
        a, b = await _artifact(http, "bundle a", role="system"), await _artifact(http, "bundle b")
        bundle = (await http.post("/v2/bundles", json={"artifacts": [b["id"], a["id"]]})).json()
        assert (await http.get(f"/v2/bundles/{bundle['id']}")).json()["artifacts"] == [b["id"], a["id"]]
        foreign = await _artifact(other_http, "not yours")
        unknown = _error(await http.post("/v2/bundles", json={"artifacts": [a["id"], foreign["id"]]}), 422)
        assert unknown["param"] == "artifacts[1]"

        session = (await http.post("/v2/sessions", json={"bundle": bundle["id"]})).json()["id"]
        for i in range(3):
            await http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": f"p{i}"})
        branch = await http.post(f"/v2/sessions/{session}/branches", json={"at_turn": 2})
        assert branch.status_code == 201 and branch.json()["head"] == 2
        appended = await http.post(
            f"/v2/branches/{branch.json()['id']}/turns", json={"role": "assistant", "content": "b"}
        )
        assert appended.json()["seq"] == 3
        turns = (await http.get(f"/v2/branches/{branch.json()['id']}")).json()["turns"]
        assert [t["content"] for t in turns] == ["p0", "p1", "b"]
        assert (
            _error(await http.post(f"/v2/sessions/{session}/branches", json={"at_turn": 99}), 400)["param"]
            == "at_turn"
        )
        _error(await http.post(f"/v2/sessions/{session}/branches", json={"at_turn": -1}), 400)

        snapshot = (
            await http.post("/v2/snapshots", json={"bundle": bundle["id"], "session": session})
        ).json()
        await http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "later"})
        assert (await http.get(f"/v2/snapshots/{snapshot['id']}")).json()["upto_turn"] == 3
        compiled = (await http.post(f"/v2/snapshots/{snapshot['id']}/compile")).json()
        assert compiled == (await http.post(f"/v2/snapshots/{snapshot['id']}/compile")).json()
        assert compiled["snapshot"] == snapshot["id"] and compiled["num_tokens"] > 0
        pinned = (await http.get(f"/v2/snapshots/{snapshot['id']}")).json()["compilations"]
        assert pinned[0]["num_tokens"] == compiled["num_tokens"]
        upto = _error(await http.post("/v2/snapshots", json={"session": session, "upto_turn": 7}), 400)
        assert upto["param"] == "upto_turn"


async def test_foreign_unknown_and_revoked_handles_are_404(gateway: InProcessGateway) -> None:
    other = await gateway.create_tenant(f"other-{uuid.uuid4()}")
    async with gateway.client() as http, gateway.client(other) as other_http:
        mine = await _artifact(http, f"secret {uuid.uuid4()}")
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        _error(await other_http.get(f"/v2/artifacts/{mine['id']}"), 404)
        _error(await other_http.delete(f"/v2/artifacts/{mine['id']}"), 404)
        _error(
            await other_http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "x"}), 404
        )
        _error(await http.get("/v2/sessions/ses_doesnotexist"), 404)
        _error(await http.get(f"/v2/sessions/{mine['id']}"), 404)
        _error(await http.get("/v2/widgets/x"), 404)
        snapshot = (await http.post("/v2/snapshots", json={"session": session})).json()["id"]
        assert (await http.delete(f"/v2/snapshots/{snapshot}")).json() == {"id": snapshot, "revoked": True}
        _error(await http.get(f"/v2/snapshots/{snapshot}"), 404)
        _error(await http.delete(f"/v2/snapshots/{snapshot}"), 404)
        assert (await http.delete(f"/v2/sessions/{session}")).status_code == 200
        _error(await http.post(f"/v2/sessions/{session}/turns", json={"role": "user", "content": "x"}), 404)


async def test_idempotency_key_replays_and_rejects_another_body(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = await http.post("/v2/sessions", json={}, headers=key)
        again = await http.post("/v2/sessions", json={}, headers=key)
        assert first.status_code == again.status_code == 201 and first.json() == again.json()
        other = _error(
            await http.post("/v2/snapshots", json={"session": first.json()["id"]}, headers=key), 422
        )
        assert other["type"] == "idempotency_error"
        session, turn_key = first.json()["id"], {"Idempotency-Key": str(uuid.uuid4())}
        turn = {"role": "user", "content": "once"}
        seqs = [
            (await http.post(f"/v2/sessions/{session}/turns", json=turn, headers=turn_key)).json()["seq"]
            for _ in range(3)
        ]
        assert seqs == [1, 1, 1]
        changed = {"role": "user", "content": "other"}
        _error(await http.post(f"/v2/sessions/{session}/turns", json=changed, headers=turn_key), 422)
