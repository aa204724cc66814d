"""/v1/responses through the real HTTP app in process (real Redis, the shared FakeEngine).

Invariants held here:
- a Response is the official object; Zumik's data is in headers (the session holding a stored
  chain is x-zumik-session);
- previous_response_id rebuilds the whole conversation (instructions excepted) as the chat
  messages sent to the engine, and a chain is a session, forked into a branch when an older
  response is continued;
- GET returns what POST answered; DELETE makes it unknown (to GET and to previous_response_id);
  store=false keeps nothing; another tenant's id is 404;
- a streamed response is the official event sequence, and the stored response equals the final
  event's;
- a purge of the session removes every response of the chain.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.responses import Response

from tests.support.inprocess import InProcessGateway, make_gateway
from tests.support.openai_schema import assert_matches_openai_type

pytestmark = pytest.mark.redis


@pytest.fixture
async def gateway(module_redis_url: str, tiny_model_dir: Path) -> AsyncIterator[InProcessGateway]:
    yield make_gateway(module_redis_url, tiny_model_dir)


async def _create(http: Any, **body: Any) -> Any:
    return await http.post("/v1/responses", json={"model": "zumik-tiny", "max_output_tokens": 16, **body})


async def test_a_chain_is_one_conversation_in_a_session_and_a_fork_is_a_branch(
    gateway: InProcessGateway,
) -> None:
    async with gateway.client() as http:
        first = await _create(http, input="Hello", instructions="Be brief.")
        assert first.status_code == 200, first.text
        body = first.json()
        assert_matches_openai_type(body, Response)
        assert (
            body["status"] == "completed" and body["output"][0]["content"][0]["text"] == gateway.engine.reply
        )
        session = first.headers["x-zumik-session"]
        assert session.startswith("ses_")
        assert gateway.engine.bodies[-1]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ]
        second = await _create(http, input="And then?", previous_response_id=body["id"])
        assert second.status_code == 200, second.text
        assert second.headers["x-zumik-session"] == session  # the head continued: same session
        assert gateway.engine.bodies[-1]["messages"] == [  # instructions are not carried over
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": gateway.engine.reply},
            {"role": "user", "content": "And then?"},
        ]
        fork = await _create(http, input="Instead?", previous_response_id=body["id"])
        assert fork.status_code == 200
        branch = fork.headers["x-zumik-session"]
        assert branch.startswith("brn_")
        turns = (await http.get(f"/v2/branches/{branch}")).json()
        assert turns["parent"] == session and turns["at_turn"] == 2 and turns["head"] == 4
        assert [t["role"] for t in turns["turns"]] == ["user", "assistant", "user", "assistant"]
        fetched = await http.get(f"/v1/responses/{second.json()['id']}")
        assert fetched.status_code == 200 and fetched.json() == second.json()


async def test_delete_store_false_and_other_tenants_are_404(gateway: InProcessGateway) -> None:
    other = await gateway.create_tenant("responses-other")
    async with gateway.client() as http:
        stored = (await _create(http, input="Hi")).json()
        unstored = await _create(http, input="Hi", store=False)
        assert unstored.status_code == 200 and "x-zumik-session" not in unstored.headers
        assert (await http.get(f"/v1/responses/{unstored.json()['id']}")).status_code == 404
        async with gateway.client(other) as foreign:
            assert (await foreign.get(f"/v1/responses/{stored['id']}")).status_code == 404
            chained = await _create(foreign, input="x", previous_response_id=stored["id"])
            assert chained.status_code == 404
            assert chained.json()["error"]["param"] == "previous_response_id"
            assert (await foreign.delete(f"/v1/responses/{stored['id']}")).status_code == 404
        deleted = await http.delete(f"/v1/responses/{stored['id']}")
        assert deleted.status_code == 200 and deleted.content == b""  # the spec declares no body
        assert (await http.get(f"/v1/responses/{stored['id']}")).status_code == 404
        assert (await _create(http, input="x", previous_response_id=stored["id"])).status_code == 404
        assert (await http.delete(f"/v1/responses/{stored['id']}")).status_code == 404
        assert (await http.get("/v1/responses/resp_nope")).status_code == 404


async def test_stream_is_the_official_event_sequence_and_is_stored(gateway: InProcessGateway) -> None:
    async with (
        gateway.client() as http,
        http.stream(
            "POST", "/v1/responses", json={"model": "zumik-tiny", "input": "Hi", "stream": True}
        ) as response,
    ):
        assert response.status_code == 200
        raw = (await response.aread()).decode()
    events = [json.loads(line[len("data: ") :]) for line in raw.splitlines() if line.startswith("data: ")]
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text == gateway.engine.reply
    async with gateway.client() as http:
        stored = await http.get(f"/v1/responses/{final['id']}")
    assert stored.status_code == 200 and stored.json() == final


async def test_purging_the_session_removes_every_response_of_the_chain(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        first = await _create(http, input="Hello")
        second = await _create(http, input="More", previous_response_id=first.json()["id"])
        session = first.headers["x-zumik-session"]
        purge = await http.post("/v2/purge", json={"target": session})
        assert purge.status_code in (200, 202), purge.text
        receipt = purge.json()["receipt"]
        ids = {first.json()["id"], second.json()["id"]}
        assert receipt["target"] == session and ids <= set(receipt["purged"]), receipt
        for response_id in ids:
            assert (await http.get(f"/v1/responses/{response_id}")).status_code == 404


async def test_a_chain_keeps_the_release_it_started_under(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        first = await _create(http, input="Hello")
        pinned = first.headers["x-zumik-release"]
        moved = await http.post("/v2/aliases/zumik-tiny/releases", json={})
        assert moved.status_code in (200, 201), moved.text
        assert moved.json()["id"] != pinned
        continued = await _create(http, input="More", previous_response_id=first.json()["id"])
        assert continued.headers["x-zumik-release"] == pinned  # the chain's own release
        fresh = await _create(http, input="New")
        assert fresh.headers["x-zumik-release"] == moved.json()["id"]  # a new chain: the alias's now


async def test_a_revoked_session_takes_its_responses_with_it(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        first = await _create(http, input="Hello")
        session = first.headers["x-zumik-session"]
        assert (await http.delete(f"/v2/sessions/{session}")).status_code == 200
        continued = await _create(http, input="More", previous_response_id=first.json()["id"])
        assert continued.status_code == 404 and continued.json()["error"]["param"] == "previous_response_id"


async def test_a_deleted_response_still_holds_its_part_of_a_later_ones_conversation(
    gateway: InProcessGateway,
) -> None:
    async with gateway.client() as http:
        first = (await _create(http, input="Hello")).json()
        second = (await _create(http, input="More", previous_response_id=first["id"])).json()
        assert (await http.delete(f"/v1/responses/{first['id']}")).status_code == 200
        third = await _create(http, input="Last", previous_response_id=second["id"])
        assert third.status_code == 200, third.text
        assert [m["content"] for m in gateway.engine.bodies[-1]["messages"]] == [
            "Hello", gateway.engine.reply, "More", gateway.engine.reply, "Last",
        ]  # fmt: skip
