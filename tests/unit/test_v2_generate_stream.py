"""``POST /v2/generate`` with ``"stream": true``: server-sent events. The production app over
real Redis, the shared fake engine behind it.

Invariants:
- ``delta`` events carry the text as the engine streams it; the last event is ``completed``,
  the same object a whole answer is (its keys, text, usage, decision, snapshot, reuse figures);
- the engine is asked for a stream with its usage, and gets token ids, as a whole answer does;
- an engine failure after the first event ends the stream with an ``error`` event and no
  ``completed``; ``stream`` that is not a boolean is a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.inprocess import InProcessGateway, make_gateway
from zumik_serve.providers.sse import sse_lines

pytestmark = pytest.mark.redis


@pytest.fixture
async def gateway(module_redis_url: str, tiny_model_dir: Path) -> AsyncIterator[InProcessGateway]:
    yield make_gateway(module_redis_url, tiny_model_dir)


async def _events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event, checking that the two name the same kind."""
    events, name = [], ""
    async for line in sse_lines(response.aiter_bytes()):
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
            assert data["type"] == name
            events.append((name, data))
    return events


async def _snapshot(http: httpx.AsyncClient) -> str:
    artifact = (await http.post("/v2/artifacts", json={"role": "system", "content": "Be terse."})).json()[
        "id"
    ]
    bundle = (await http.post("/v2/bundles", json={"artifacts": [artifact]})).json()["id"]
    return str((await http.post("/v2/snapshots", json={"bundle": bundle})).json()["id"])


async def test_a_stream_sends_the_text_then_the_whole_answer(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        snapshot = await _snapshot(http)
        whole = (
            await http.post("/v2/generate", json={"snapshot": snapshot, "input": "Hi", "seed": 1})
        ).json()
        request = {"snapshot": snapshot, "input": "Hi", "seed": 1, "stream": True}
        async with http.stream("POST", "/v2/generate", json=request) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            decision = response.headers["x-zumik-decision-id"]
            events = await _events(response)
    names = [name for name, _ in events]
    assert names[-1] == "completed" and set(names[:-1]) == {"delta"} and len(names) > 2
    completed = events[-1][1]
    text = "".join(data["text"] for name, data in events if name == "delta")
    assert text == completed["output"]["content"] == gateway.engine.reply == whole["output"]["content"]
    assert set(completed) - {"type"} == set(whole)
    assert completed["decision_id"] == decision and completed["snapshot"] == snapshot
    assert completed["finish_reason"] == "stop" and completed["usage"]["completion_tokens"] > 0
    assert completed["reuse"] is not None and completed["reuse"]["captured_evidence"] == "observed"
    sent = gateway.engine.bodies[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert all(isinstance(token, int) for token in sent["prompt"]) and sent["seed"] == 1


async def test_an_engine_failure_after_the_first_event_ends_with_an_error_event(
    gateway: InProcessGateway,
) -> None:
    gateway.engine.break_stream_after(1)
    async with gateway.client() as http:
        async with http.stream("POST", "/v2/generate", json={"input": "Hi", "stream": True}) as response:
            assert response.status_code == 200
            events = await _events(response)
        decision = (await http.get(f"/v2/decisions/{response.headers['x-zumik-decision-id']}")).status_code
    assert [name for name, _ in events] == ["delta", "error"]
    error = events[-1][1]["error"]
    assert error["message"] == "engine died" and error["type"] == "server_error"
    assert decision == 200  # the decision that carried it is recorded all the same


async def test_stream_must_be_a_boolean(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        refused = await http.post("/v2/generate", json={"input": "Hi", "stream": "yes"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    assert gateway.engine.calls == []
